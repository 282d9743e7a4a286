"""The ``kdnas`` command line.

    kdnas distill --config configs/default.yaml --arch L4-H384-A6-F1536-gelu
    kdnas search --config configs/default.yaml
    kdnas profile --config configs/default.yaml --arch L4-H384-A6-F1536-gelu
    kdnas evaluate runs/students/<arch_id>
    kdnas arch L4-H384-A6-F1536-gelu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Quiet by default; users opt back in by setting these themselves.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Library progress bars (loading weights, reading CSVs) are noise next to ours; errors stay one line.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Cold starts of the ephemeral Prefect API take ~20 s on a small box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from kdnas import interrupt  # noqa: E402
from kdnas_core.errors import KdnasError  # noqa: E402


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise KdnasError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.lr=1e-4")
        out[key] = yaml.safe_load(value)
    return out


def cmd_distill(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.recipes import distill_one

    cfg = load_config(args.config, _parse_set(args.set))
    summary = distill_one(cfg, args.arch, split=args.split, out_dir=args.out, max_steps=args.steps)
    r = summary["result"]
    print(f"student   {summary['arch']} (arch_id {summary['arch_id']}, {summary['params'] / 1e6:.1f} M params)")
    print(f"teacher   {summary['teacher']} ({summary['teacher_params'] / 1e6:.1f} M params)")
    print(f"data      {summary['n_texts']} {args.split} texts, {r['steps']} steps, {r['tokens_per_s']:.0f} tokens/s")
    if r["initial_eval_loss"] is not None:
        ratio = r["final_eval_loss"] / r["initial_eval_loss"]
        print(f"KD loss   held-out {r['initial_eval_loss']:.4f} -> {r['final_eval_loss']:.4f} (x{ratio:.2f})")
        parts = ", ".join(f"{k} {v:.4f}" for k, v in r["eval_parts"].items())
        print(f"          after: {parts}")
    print(f"saved     {summary['path']}")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.latency import count_flops, count_params
    from kdnas_core.recipes import Workspace, profile_arch, teacher_latency
    from kdnas_core.search_space import StudentArch

    cfg = load_config(args.config, _parse_set(args.set))
    backends = list(dict.fromkeys(cfg.latency.backends + ["ort-fp32", "ort-int8", "torch"]))
    lat_cfg = cfg.latency.model_copy(update={"backends": backends})
    ws = Workspace.prepare(cfg)
    arch = StudentArch.from_name(args.arch)
    student = profile_arch(ws, arch, lat_cfg, cache=False)
    teacher = teacher_latency(ws, lat_cfg)
    vocab, positions = ws.teacher.config.vocab_size, ws.teacher.config.max_position_embeddings
    params = count_params(arch, vocab, positions)
    print(f"student {arch.name} (arch_id {arch.arch_id}): {params['total'] / 1e6:.1f} M params "
          f"({params['encoder'] / 1e6:.1f} M in the encoder)")
    print(f"teacher {cfg.teacher.name}; hardware: {student.hardware}")
    print(f"{'backend':<10} {'shape':>7} {'student ms':>11} {'p90':>7} {'cv':>5} {'teacher ms':>11} {'speed-up':>9}")
    for backend, results in student.results.items():
        for shape, s in results.items():
            t = teacher.results.get(backend, {}).get(shape)
            flag = " noisy" if s.noisy or (t and t.noisy) else ""
            t_ms = f"{t.median_ms:11.2f}" if t else f"{'-':>11}"
            ratio = f"{t.median_ms / s.median_ms:8.1f}x" if t else f"{'-':>9}"
            print(f"{backend:<10} {shape:>7} {s.median_ms:11.2f} {s.p90_ms:7.2f} {s.cv:5.2f} {t_ms} {ratio}{flag}")
    b, q = cfg.latency.grid[0]
    print(f"forward GFLOPs at {b}x{q}: {count_flops(arch, b, q)['total'] / 1e9:.2f}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.recipes import markdown_table, run_kdnas_search

    cfg = load_config(args.config, _parse_set(args.set))
    if not args.no_prefect:
        return _search_flow(args, cfg)
    if cfg.runner.kind != "local":
        from kdnas_core.errors import ConfigError

        raise ConfigError(f"runner.kind = {cfg.runner.kind!r} fans candidates out through the Prefect flow; "
                          "drop --no-prefect (or set runner.kind: local)")

    def show(o):
        if o.failed:
            print(f"  episode {o.episode}: {o.arch.name:<24} FAILED: {o.extra.get('error')}", flush=True)
            return
        print(f"  episode {o.episode}: {o.arch.name:<24} reward {o.reward:.4f}  L_HS {o.kd_loss:.4f}  "
              f"{o.latency_ms:7.2f} ms", flush=True)

    from kdnas_core.recipes import Workspace

    ws = Workspace.prepare(cfg)
    result, out, teacher_ms = run_kdnas_search(cfg, warm_from=args.warm_from, fresh=args.fresh,
                                               research=args.research, on_observation=show, ws=ws)
    from kdnas_core.search import SUMMARY_COLUMNS as cols

    print(f"\nLeaderboard (teacher {cfg.teacher.name}: {teacher_ms:.2f} ms)")
    print(markdown_table(result.leaderboard[cols].head(args.top)))
    print("\nRecommendations per latency budget")
    for r in result.recommendations:
        if r["arch"]:
            print(f"  {r['budget']:>8} (<= {r['budget_ms']:.2f} ms): {r['arch']} ({r['arch_id']}), "
                  f"reward {r['reward']:.4f}, {r['latency_ms']:.2f} ms, {teacher_ms / r['latency_ms']:.1f}x faster")
        else:
            print(f"  {r['budget']:>8} (<= {r['budget_ms']:.2f} ms): none: {r['reason']}")
    if not args.no_final:
        from kdnas_core.recipes import EventLog, evaluate_students, final_students, write_evaluation

        finals = final_students(cfg, ws, result.recommendations, EventLog(out))
        for arch, final in finals.items():
            print(f"final student {arch}: {final['path']} (ONNX: {final['onnx']}, int8: {final['onnx_int8']})")
        if finals and cfg.evaluate.enabled:
            files = write_evaluation(evaluate_students(ws, [f["path"] for f in finals.values()]), out)
            print((out / "evaluation.md").read_text())
            print(f"evaluation: {files['md']}")
    print(f"\nstate and tables: {out}")
    return 0


def _search_flow(args: argparse.Namespace, cfg) -> int:
    """The search as the Prefect flow `kdnas` (ephemeral API unless PREFECT_API_URL is set)."""
    from flows.search import kdnas
    from kdnas_core.recipes import search_dir

    if args.warm_from or args.fresh:
        raise KdnasError("--warm-from and --fresh need --no-prefect (the flow resumes and warm-starts by itself)")
    if cfg.tracking.enabled:
        from infra.tracking import preflight

        preflight(cfg)  # seconds, before Prefect starts, rather than deep inside the run
    from infra import dask_runner

    dask_runner.preflight(cfg.runner)
    out = kdnas(config_path=str(args.config), overrides=_parse_set(args.set) or None,
                research=args.research, final=not args.no_final)
    print((search_dir(cfg) / "report.md").read_text())
    for arch, final in out["final"].items():
        print(f"final student {arch}: {final['path']} (ONNX: {final['onnx']}, int8: {final['onnx_int8']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Downstream table of saved students against the configured teacher and task."""
    from kdnas_core.config import load_config
    from kdnas_core.recipes import EVAL_COLUMNS, Workspace, evaluate_students, markdown_table, write_evaluation

    cfg = load_config(args.config, _parse_set(args.set))
    table = evaluate_students(Workspace.prepare(cfg), args.students)
    out = args.out or cfg.paths.output_path() / "evaluation"
    files = write_evaluation(table, out)
    task = table.attrs["task"]
    print(f"task: {task['train_texts']} probe-train / {task['test_texts']} held-out texts, classes {task['classes']}")
    for note in task["notes"]:
        print(f"note: {note}")
    print(markdown_table(table[[c for c in EVAL_COLUMNS if c in table.columns]]))
    print(f"\nwritten: {files['md']}, {files['csv']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve deployment kdnas/search from this process (no work pool needed), with a cron schedule."""
    from flows.search import kdnas

    kdnas.serve(name="search", cron=args.cron, parameters={"config_path": str(args.config), "research": True})
    return 0


def cmd_arch(args: argparse.Namespace) -> int:
    from kdnas_core.search_space import StudentArch

    arch = StudentArch.from_name(args.name)
    print(f"{arch.name} arch_id={arch.arch_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdnas", description="Knowledge-distillation neural architecture search")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distil one student architecture from the configured teacher")
    d.add_argument("--config", default="configs/default.yaml", type=Path)
    d.add_argument("--arch", required=True, help="e.g. L4-H384-A6-F1536-gelu")
    d.add_argument("--split", choices=["train", "proxy"], default="train",
                   help="train: full-corpus budget (distill.final); proxy: search budget (distill.proxy)")
    d.add_argument("--steps", type=int, default=None, help="cap on optimiser steps (overrides the budget)")
    d.add_argument("--out", type=Path, default=None, help="student folder (default: <output_dir>/students/<arch_id>)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    d.add_argument("--json", action="store_true", help="also print the summary as JSON")
    d.set_defaults(func=cmd_distill)

    pr = sub.add_parser("profile", help="latency of an architecture and of the teacher (ORT fp32/int8, PyTorch)")
    pr.add_argument("--config", default="configs/default.yaml", type=Path)
    pr.add_argument("--arch", required=True, help="e.g. L4-H384-A6-F1536-gelu")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pr.set_defaults(func=cmd_profile)

    se = sub.add_parser("search", help="run (or resume) a KD-NAS search on this machine")
    se.add_argument("--config", default="configs/default.yaml", type=Path)
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    se.add_argument("--warm-from", type=Path, default=None, help="state.json of a previous search to warm-start from")
    se.add_argument("--fresh", action="store_true", help="start over, ignoring an earlier run of the same config")
    se.add_argument("--research", action="store_true",
                    help="if this config's search has finished, run a new round warm-started from it")
    se.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    se.add_argument("--no-prefect", action="store_true", help="run the plain core loop instead of the Prefect flow")
    se.add_argument("--no-final", action="store_true", help="skip the final distillation of the recommended students")
    se.set_defaults(func=cmd_search)

    ev = sub.add_parser("evaluate", help="downstream probe, gap closed and fidelity of saved students")
    ev.add_argument("students", nargs="+", type=Path, help="student folders (kdnas distill / search output)")
    ev.add_argument("--config", default="configs/default.yaml", type=Path)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ev.add_argument("--out", type=Path, default=None, help="folder for evaluation.md/csv (default: <output_dir>/evaluation)")
    ev.set_defaults(func=cmd_evaluate)

    sv = sub.add_parser("serve", help="serve the Prefect deployment kdnas/search with a cron schedule")
    sv.add_argument("--config", default="configs/default.yaml", type=Path)
    sv.add_argument("--cron", default="0 3 * * 0", help="re-search schedule (default: Sundays 03:00 UTC)")
    sv.set_defaults(func=cmd_serve)

    a = sub.add_parser("arch", help="print an architecture's canonical name and arch_id")
    a.add_argument("name")
    a.set_defaults(func=cmd_arch)

    # --debug before or after the command; SUPPRESS: a subcommand without it keeps the global value
    p.add_argument("--debug", action="store_true", help="show the traceback of an error or of Ctrl-C")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _quiet_libraries() -> None:
    """Library progress bars off even when the libraries were imported before this module set
    the environment (an embedding application, a test session)."""
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with interrupt.Handler(debug=args.debug) as interrupted:
        try:
            _quiet_libraries()
            return args.func(args)
        except KdnasError as err:
            if args.debug:
                raise
            print(f"kdnas: error: {err}", file=sys.stderr)
            return 2
    return interrupted.exit_code  # Ctrl-C: "kdnas: interrupted; ..." is printed, once


if __name__ == "__main__":
    sys.exit(main())

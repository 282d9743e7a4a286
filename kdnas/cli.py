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
        if not sep or not key.strip():
            raise KdnasError(f"--set {item!r}: expected KEY=VALUE, e.g. distill.lr=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise KdnasError(f"--set {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def cmd_distill(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.final import distill_student, student_dir, writing_student
    from kdnas_core.search.space import StudentArch

    cfg = load_config(args.config, _parse_set(args.set))
    arch = StudentArch.from_name(args.arch)
    out = args.out or student_dir(cfg, arch)
    # Checked and locked before the teacher loads: a read-only --out or a second run into the
    # same folder used to surface only at the save, after the whole distillation.
    with writing_student(out, "--out" if args.out else None):
        summary = distill_student(cfg, arch, split=args.split, out_dir=out, max_steps=args.steps)
        r = summary.result
        print(f"student   {summary.arch} (arch_id {summary.arch_id}, {summary.params / 1e6:.1f} M params)")
        print(f"teacher   {summary.teacher} ({summary.teacher_params / 1e6:.1f} M params)")
        print(f"data      {summary.n_texts} {args.split} texts, {r.steps} steps, {r.tokens_per_s:.0f} tokens/s")
        if r.initial_eval_loss is not None:
            ratio = r.final_eval_loss / r.initial_eval_loss
            print(f"KD loss   held-out {r.initial_eval_loss:.4f} -> {r.final_eval_loss:.4f} (x{ratio:.2f})")
            parts = ", ".join(f"{k} {v:.4f}" for k, v in r.eval_parts.items())
            print(f"          after: {parts}")
            if r.best_step is not None:
                kept = "its inherited start (no check beat it)" if r.best_step == 0 else f"step {r.best_step}"
                early = ", stopped early" if r.stopped_early else ""
                print(f"          kept the state of {kept}: best of {len(r.eval_curve)} held-out checks{early}")
        print(f"saved     {summary.path}")
        summary = summary.exported(cfg.latency)
    print(f"ONNX      {summary.onnx} (int8: {Path(summary.onnx_int8).name}); kdnas embed --model {summary.path}")
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.search.candidates import profile_arch, teacher_latency
    from kdnas_core.latency import count_flops, count_params
    from kdnas_core.search.space import StudentArch
    from kdnas_core.workspace import Workspace

    cfg = load_config(args.config, _parse_set(args.set))
    backends = list(dict.fromkeys(cfg.latency.backends + ["ort-fp32", "ort-int8", "torch"]))
    lat_cfg = cfg.latency.model_copy(update={"backends": backends})
    ws = Workspace.prepare(cfg)
    arch = StudentArch.from_name(args.arch)
    student = profile_arch(ws, arch, lat_cfg, cache=False, progress=True)
    teacher = teacher_latency(ws, lat_cfg, progress=True)
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
    b, q = cfg.latency.reward_shape
    print(f"forward GFLOPs at {b}x{q}: {count_flops(arch, b, q)['total'] / 1e9:.2f}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from kdnas_core.config import load_config
    from kdnas_core.pipeline import LocalSteps, SearchOutcome, render_outcome, run_search_job

    cfg = load_config(args.config, _parse_set(args.set))
    if not args.no_prefect:
        outcome = SearchOutcome.from_dict(_search_flow(args, cfg))
    else:
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

        steps = LocalSteps(cfg, warm_from=args.warm_from, fresh=args.fresh, research=args.research, on_observation=show)
        outcome = run_search_job(cfg, steps, final=not args.no_final)
    print()
    print("\n".join(render_outcome(outcome, cfg.teacher.name, args.top)))
    if outcome.tracking_url:
        from infra.tracking import tracking_uri

        uri = tracking_uri(cfg)
        serve = "" if uri.startswith(("http://", "https://")) else f" (serve it first: mlflow ui --backend-store-uri {uri})"
        print(f"MLflow: candidate runs at {outcome.tracking_url}{serve}")
    _print_phases(outcome.phases)
    return 0


def _search_flow(args: argparse.Namespace, cfg) -> dict:
    """The search as the Prefect flow `kdnas` (ephemeral API unless PREFECT_API_URL is set)."""
    if args.warm_from or args.fresh:
        raise KdnasError("--warm-from and --fresh need --no-prefect (the flow resumes and warm-starts by itself)")
    _check_prefect_home()
    from flows.search import kdnas
    from infra.preflight import check_services

    check_services(cfg)  # seconds, before Prefect starts, rather than deep inside the run
    if cfg.evaluate.enabled:  # a task that cannot be read fails now, before Prefect and the teacher
        from kdnas_core.data import load_splits
        from kdnas_core.workspace import read_tasks

        read_tasks(cfg, load_splits(cfg.data, cfg.seed).train)
    _quiet_flow_tracebacks(getattr(args, "debug", False))
    return kdnas(config_path=str(args.config), overrides=_parse_set(args.set) or None,
                 research=args.research, final=not args.no_final, preflight=False)


def _print_phases(seconds: dict[str, float]) -> None:
    from kdnas_core.progress import Phases

    phases = Phases()
    phases.seconds = dict(seconds)
    print("\ntime per phase (this run; reused results take no time):")
    print("\n".join(phases.lines()))


def _check_prefect_home() -> None:
    """Prefect's temporary API keeps its database under PREFECT_HOME: an unwritable one fails
    here in one line, not as a server that cannot start and is retried for minutes."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from kdnas_core.workspace import check_writable

    home = os.environ.get("PREFECT_HOME")
    if not home:  # from a Prefect profile or the default; importing prefect with a bad home warns first
        from prefect.settings import get_current_settings

        home = get_current_settings().home
    check_writable(Path(home).expanduser(), "PREFECT_HOME")


class _NoTraceback:
    """Prefect logs every exception that ends a flow or task run with its traceback. The CLI
    says what went wrong in one line afterwards, so a kdnas error (or Ctrl-C) is not logged at
    all, and any other error is logged without its traceback (``--debug`` shows it)."""

    def filter(self, record) -> bool:
        if not record.exc_info:
            return True
        err = record.exc_info[1]
        if isinstance(err, (KdnasError, KeyboardInterrupt)):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_flow_tracebacks(debug: bool) -> None:
    import logging

    if debug:
        return
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Downstream table of saved students, and of any other encoder folder, against the
    configured (or --teacher) teacher on the configured tasks."""
    from kdnas_core.config import load_config
    from kdnas_core.search.reports import markdown_table
    from kdnas_core.evaluation.table import (
        check_model,
        evaluate_students,
        shown_columns,
        summary_lines,
        write_evaluation,
    )
    from kdnas_core.workspace import Workspace, check_writable

    overrides = _parse_set(args.set) | ({"teacher.name": args.teacher} if args.teacher else {})
    cfg = load_config(args.config, overrides)
    # Arguments first: a mistyped path must not cost the teacher's evaluation.
    for path in args.students:
        check_model(path)
    out = args.out or cfg.paths.output_path() / "evaluation"
    check_writable(out, "--out")
    table = evaluate_students(Workspace.prepare(cfg), args.students)
    files = write_evaluation(table, out)
    for t in table.attrs["tasks"]:
        print(f"task {t['task']} ({t['kind']}): {t['size']}")
        for note in t["notes"]:
            print(f"  note: {note}")
    print(markdown_table(table[shown_columns(table)]))
    print("\n" + "\n".join(summary_lines(table)))
    print(f"\nwritten: {files['md']}, {files['csv']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve deployment kdnas/search from this process (no work pool needed), with a cron schedule."""
    from kdnas_core.config import load_config

    load_config(args.config)  # a deployment whose every scheduled run would fail is refused now
    _check_cron(args.cron)
    from flows.search import kdnas

    kdnas.serve(name="search", cron=args.cron, parameters={"config_path": str(args.config.resolve()), "research": True})
    return 0


def _check_cron(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError:  # pydantic's ValidationError is a ValueError
        raise KdnasError(f"--cron {cron!r}: not a valid cron expression (e.g. '0 3 * * 0': Sundays 03:00)") from None


def cmd_arch(args: argparse.Namespace) -> int:
    from kdnas_core.search.space import StudentArch

    arch = StudentArch.from_name(args.name)
    print(f"{arch.name} arch_id={arch.arch_id}")
    return 0


def _read_input(path: Path | None, encoding: str) -> str:
    """The texts of --input (or stdin) decoded with --encoding; a byte that does not decode is
    one line naming the file, its offset and the option."""
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise KdnasError(f"--encoding {encoding!r}: unknown encoding (e.g. utf-8, latin-1, cp1252)") from None
    stdin = path in (None, Path("-"))
    if not stdin and not path.is_file():
        raise KdnasError(f"--input {path}: no such file")
    if stdin and not hasattr(sys.stdin, "buffer"):  # already text (an embedding application's own stdin)
        return sys.stdin.read()
    data = sys.stdin.buffer.read() if stdin else path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        where = "stdin" if stdin else f"--input {path}"
        raise KdnasError(f"{where}: not {encoding} text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "give its encoding with --encoding, e.g. --encoding latin-1") from None


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeddings of texts (a file or stdin, one per line) from a student folder's ONNX file."""
    import numpy as np

    from kdnas_core.files.atomic import check_can_write, unwritable
    from kdnas_core.onnx_embedder import ONNX_FILES, EmbedError, OnnxEmbedder
    from kdnas_core.student import is_student_folder

    folder = args.model
    if not folder.is_dir():
        raise KdnasError(f"--model {folder}: no such folder")
    # Every argument before the export and the embedding: a bad --output used to fail after them.
    if args.output is not None:
        if args.output.suffix not in (".npy", ".jsonl"):
            raise KdnasError(f"--output {args.output}: expected a .npy or .jsonl file")
        check_can_write(args.output, "--output")
    text = _read_input(args.input, args.encoding)
    onnx = folder / ONNX_FILES[args.precision]
    if not onnx.is_file() and is_student_folder(folder):
        from kdnas_core.config import LatencyConfig
        from kdnas_core.final import export_student
        from kdnas_core.student import verify_student

        verify_student(folder)  # a damaged student is named as such, not as a failed export
        reason = unwritable(onnx)
        if reason is not None:
            raise KdnasError(f"--model {folder}: no {onnx.name} yet, and it cannot be exported into the folder "
                             f"({reason}); copy the folder somewhere writable and embed from the copy")
        print(f"kdnas: exporting the ONNX files of {folder} first", file=sys.stderr)
        export_student(folder, LatencyConfig())
    texts = [t for t in text.splitlines() if t.strip()]
    try:
        vectors = OnnxEmbedder(folder, args.precision)(texts)
    except EmbedError as err:
        raise KdnasError(str(err)) from None
    if args.output is not None and args.output.suffix == ".npy":
        from kdnas_core.files.atomic import write_npy

        write_npy(args.output, vectors)
        print(f"{len(texts)} embeddings of width {vectors.shape[1]} written to {args.output}", file=sys.stderr)
        return 0
    rows = "".join(json.dumps({"text": t, "embedding": np.round(v, 7).tolist()}) + "\n" for t, v in zip(texts, vectors))
    if args.output is None:
        sys.stdout.write(rows)
    else:
        from kdnas_core.files.atomic import write_text

        write_text(args.output, rows)
        print(f"{len(texts)} embeddings of width {vectors.shape[1]} written to {args.output}", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse prints the whole usage before its message)."""

    def error(self, message: str):
        raise KdnasError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    # Long because every subcommand and flag is declared here, in the order --help lists them.
    p = _Parser(prog="kdnas", description="Knowledge-distillation neural architecture search")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error or of Ctrl-C")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # accepted after the sub-command too (kdnas search --debug); SUPPRESS keeps a flag given first
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    d = sub.add_parser("distill", parents=[common], help="distil one student architecture from the configured teacher")
    d.add_argument("--config", default="configs/default.yaml", type=Path)
    d.add_argument("--arch", required=True, help="e.g. L4-H384-A6-F1536-gelu")
    d.add_argument("--split", choices=["train", "proxy"], default="train",
                   help="train: full-corpus budget (distill.final); proxy: search budget (distill.proxy)")
    d.add_argument("--steps", type=_positive_int, default=None, help="cap on optimiser steps (overrides the budget)")
    d.add_argument("--out", type=Path, default=None, help="student folder (default: <output_dir>/students/<arch_id>)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    d.add_argument("--json", action="store_true", help="also print the summary as JSON")
    d.set_defaults(func=cmd_distill)

    pr = sub.add_parser("profile", parents=[common], help="latency of an architecture and of the teacher (ORT fp32/int8, PyTorch)")
    pr.add_argument("--config", default="configs/default.yaml", type=Path)
    pr.add_argument("--arch", required=True, help="e.g. L4-H384-A6-F1536-gelu")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    pr.set_defaults(func=cmd_profile)

    se = sub.add_parser("search", parents=[common], help="run (or resume) a KD-NAS search on this machine")
    se.add_argument("--config", default="configs/default.yaml", type=Path)
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    se.add_argument("--warm-from", type=Path, default=None, help="state.json of a previous search to warm-start from")
    se.add_argument("--fresh", action="store_true", help="start over, ignoring an earlier run of the same config")
    se.add_argument("--new-round", "--research", dest="research", action="store_true",
                    help="if this config's search has finished, start a new search round warm-started from it")
    se.add_argument("--top", type=int, default=10, help="leaderboard rows to print")
    se.add_argument("--no-prefect", action="store_true", help="run the plain core loop instead of the Prefect flow")
    se.add_argument("--no-final", action="store_true", help="skip the final distillation of the recommended students")
    se.set_defaults(func=cmd_search)

    ev = sub.add_parser("evaluate", parents=[common],
                        help="downstream tasks, gap closed, summary and fidelity of students and other encoders")
    ev.add_argument("students", nargs="+", type=Path,
                    help="kdnas student folders, Hugging Face encoder folders or model2vec folders")
    ev.add_argument("--teacher", default=None, help="the teacher to compare against (default: the config's teacher.name)")
    ev.add_argument("--config", default="configs/default.yaml", type=Path)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ev.add_argument("--out", type=Path, default=None, help="folder for evaluation.md/csv (default: <output_dir>/evaluation)")
    ev.set_defaults(func=cmd_evaluate)

    sv = sub.add_parser("serve", parents=[common], help="serve the Prefect deployment kdnas/search with a cron schedule")
    sv.add_argument("--config", default="configs/default.yaml", type=Path)
    sv.add_argument("--cron", default="0 3 * * 0", help="re-search schedule (default: Sundays 03:00 UTC)")
    sv.set_defaults(func=cmd_serve)

    em = sub.add_parser("embed", parents=[common], help="sentence embeddings of texts from a student's ONNX file")
    em.add_argument("--model", required=True, type=Path, help="a student folder (kdnas distill or search output)")
    em.add_argument("--input", type=Path, default=None, help="text file, one text per line (default: stdin)")
    em.add_argument("--output", type=Path, default=None, help="a .npy or .jsonl file (default: JSON lines on stdout)")
    em.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="which ONNX file (default fp32)")
    em.add_argument("--encoding", default="utf-8", help="text encoding of --input or stdin (default utf-8)")
    em.set_defaults(func=cmd_embed)

    a = sub.add_parser("arch", parents=[common], help="print an architecture's canonical name and arch_id")
    a.add_argument("name")
    a.set_defaults(func=cmd_arch)
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


def _one_line_warnings() -> None:
    """Warnings as one ``kdnas: warning:`` line each, without the source line Python adds."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        first = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        print(f"kdnas: warning: {first}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    with interrupt.Handler(debug=debug) as interrupted:
        try:
            args = build_parser().parse_args(argv)
            _quiet_libraries()
            _one_line_warnings()
            code = args.func(args)
            sys.stdout.flush()  # a reader gone (`| head -1`) shows here, not in the interpreter's exit
            return code
        except Exception as err:  # noqa: BLE001 - never a traceback for the user, unless asked for
            if debug or interrupt.requested():  # after Ctrl-C, the handler says the one line
                raise
            if interrupt.output_closed(err):
                return interrupt.PIPE_EXIT_CODE
            return _report(err)
    return interrupted.exit_code  # Ctrl-C: "kdnas: interrupted; ..." is printed, once


def _report(err: Exception) -> int:
    """One line for an error: kdnas's own (exit 2), a full disk (2), anything else (1)."""
    from kdnas_core.files.atomic import DiskFullError, disk_full_message, is_disk_full

    if isinstance(err, KdnasError):
        print(f"kdnas: error: {err}", file=sys.stderr)
        return 2
    if is_disk_full(err):
        where = getattr(err, "filename", None) or "."
        print(f"kdnas: error: {DiskFullError(disk_full_message(Path(where), 'results'))}", file=sys.stderr)
        return 2
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    print(f"kdnas: error: unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the scale curve. One student cut from the teacher, final-distilled on more and more
texts of a general corpus, each point scored on the held-out tasks against its own inherited start
and its untrained floor.

    python -m bench.scale                                   # mpnet-base, the 0.1x student, 1k 4k 16k texts
    python -m bench.scale --students L3-H768-A12-F384-gelu L6-H768-A12-F768-gelu --sizes 4000 16000 64000 128000
    python -m bench.scale --sizes 4000 16000 --split 128000 --precision bf16 --work runs/scale-bf16 --name ...
                          # points of another run's split: its teacher states and held-out texts reused
    python -m bench.scale --smoke                           # tiny random teacher: correctness only

Every point of a student starts from the same inherited weights and uses the same recipe
(configs/benchmark.yaml's distillation, ``--epochs`` epochs, held-out checks every
``distill.final.eval_every`` steps keeping the best state, the start included). The texts of a
smaller point are the first texts of the largest point's training split (``data.train_size`` takes
a prefix of one seeded shuffle), so the teacher runs once over the largest split and every point
reads its targets from that one cache. Wall time per point is the student's training time plus its
share (n / largest) of the teacher's pass.

The curve's prediction for 10x more texts is a straight line through the points in log(texts):
a reading of the trend, not a promise.
"""

from __future__ import annotations

from bench.common import (
    GENERAL_MIX,
    RESULTS,
    ROOT,
    add_common_args,
    add_precision_arg,
    argv_of,
    final_distilled,
    header,
    out_folder,
    publish,
    smoke_config,
)

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from kdnas_core.config import KDNASConfig, apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.corpora import WORDNET_ROOT  # noqa: E402
from kdnas_core.hardware import precision_name  # noqa: E402
from kdnas_core.data import TokenizedTexts, length_bucketed_batches  # noqa: E402
from kdnas_core.evaluation.evaluate import compare  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.evaluation.table import PRIMARY, describe_tasks  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

DEFAULTS = dict(students=["L3-H768-A12-F384-gelu"], sizes=[1000, 4000, 16000], epochs=3, probe_train=3000,
                test_texts=3000, pairs=2000)
SMOKE = dict(students=["L1-H64-A4-F128-gelu"], sizes=[80, 240], epochs=1, probe_train=100, test_texts=100, pairs=100)


def make_config(args, work: Path) -> KDNASConfig:
    if args.smoke:
        base = smoke_config(work)
        # The tiny corpus, with WordNet beside it where this machine has it (install-data.sh).
        mix = [{"source": "text", "path": base["data"]["path"], "weight": 1}]
        if WORDNET_ROOT.is_dir():
            mix.append({"source": "wordnet", "weight": 1})
        extra = {"data.max_texts": 800}
    else:
        base = yaml.safe_load((ROOT / "configs" / "benchmark.yaml").read_text())
        mix, extra = GENERAL_MIX, {"data.proxy_size": 500}
    overrides = {
        "paths.output_dir": str(work),
        "data.source": "mix",
        "data.path": None,
        "data.mix": mix,
        "data.train_size": args.split or max(args.sizes),
        "distill.final.epochs": args.epochs,
        "evaluate.tasks": [
            {"test_size": args.test_texts, "train_size": args.probe_train},
            {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase", "test_size": args.pairs},
            {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics", "test_size": args.pairs},
        ],
        "tracking.enabled": False,
        **extra,
    }
    if args.cache_dir:
        overrides["paths.cache_dir"] = str(args.cache_dir)
    if args.precision:
        overrides["distill.precision"] = args.precision
    return config_from_dict(apply_overrides(base, overrides), "scale benchmark config")


def first_texts(ws: Workspace, n: int, states) -> list:
    """Batches of the first ``n`` training texts, grouped as the final distillation's batching says; their
    indices point into the largest split's token order, so the one teacher-state cache serves
    every size."""
    toks = ws.tokens("train")
    if n > len(toks):
        raise SystemExit(f"--sizes {n}: the corpus gives only {len(toks)} training texts")
    sub = TokenizedTexts(toks.ids[:n], toks.pad_id, f"{toks.fingerprint}:first{n}")
    return ws.arranged(sub, length_bucketed_batches(sub, ws.cfg.data.batch_size, ws.cfg.seed), states, "final")


def distil_point(ws: Workspace, start, arch: StudentArch, n: int, states, eval_states, folder: Path):
    """The student distilled on the first ``n`` texts (reused from ``folder`` when finished)."""
    if not (folder / "result.json").is_file():
        print(f"distilling {arch.name} on {n} texts", flush=True)
    # every point starts from the same inherited weights
    return final_distilled(ws, copy.deepcopy(start.model), first_texts(ws, n, states), states, eval_states, start.init_heads,
                           folder)


def fit_log_line(ns: list[int], ys: list[float]) -> tuple[float, float] | None:
    """Slope and intercept of y against log10(n), or None with fewer than two finite points."""
    pts = [(np.log10(n), y) for n, y in zip(ns, ys) if np.isfinite(y)]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (arch, g) in enumerate(df[df.texts > 0].groupby("arch", sort=False)):
        color = f"C{i}"
        ax.errorbar(g.texts, g.summary, yerr=1.96 * g.summary_se, fmt="o-", color=color, capsize=3, label=arch)
        start = df[(df.arch == arch) & (df.texts == 0)]
        if len(start):
            ax.axhline(float(start.summary.iloc[0]), color=color, ls="--", lw=1, label=f"{arch}: inherited start")
    ax.set_xscale("log")
    ax.set_xlabel("texts distilled on (log)")
    ax.set_ylabel("summary gap closed (±95 %); teacher 1, untrained floor 0")
    ax.set_title("Scale curve: final distillation on more texts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, RESULTS, "tiny random teacher, two tiny sizes")
    p.add_argument("--students", nargs="+", default=None, help=f"architectures (default {DEFAULTS['students']})")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help=f"texts per point (default {DEFAULTS['sizes']})")
    for knob in ("epochs", "probe_train", "test_texts", "pairs"):
        p.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None, help=f"default {DEFAULTS[knob]}")
    add_precision_arg(p, "every point")
    p.add_argument("--split", type=int, default=None,
                   help="texts in the training split the points take their first n from (default: the largest "
                        "size); give another run's largest size to reuse its teacher states and held-out texts")
    p.add_argument("--name", default="scale-curve", help="the report's file name without suffix")
    p.add_argument("--work", type=Path, default=None, help="work folder (default runs/scale)")
    p.add_argument("--cache-dir", type=Path, default=None, help="override paths.cache_dir")
    args = p.parse_args(argv)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.sizes = sorted(set(args.sizes))
    if args.split is not None and args.split < max(args.sizes):
        p.error(f"--split {args.split}: must be at least the largest --sizes ({max(args.sizes)})")
    args.out = out_folder(args.out, args.smoke, RESULTS)
    work = args.work or (args.out / "work" if args.smoke else ROOT / "runs" / "scale")
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    cfg = make_config(args, work)
    ws = Workspace.prepare(cfg)
    archs = [StudentArch.from_name(a) for a in args.students]
    layers = ws.layers_for(sorted({a.layers for a in archs}), "final")
    t0 = time.perf_counter()
    states = ws.cached_states("train", layers)
    eval_states = ws.eval_states(layers)
    teacher_s = time.perf_counter() - t0
    teacher = ws.teacher_eval
    n_train = len(ws.splits.train)

    rows = []
    for arch in archs:
        start = ws.start_student(arch)
        floor = ws.evaluate(ws.untrained_student(arch, cfg.seed), f"{arch.name}: untrained")
        inherited = ws.evaluate(ws.build_student(arch), f"{arch.name}: inherited, not distilled")
        rows.append(compare(inherited, teacher, floor, cfg.evaluate, cfg.seed)
                    | {"arch": arch.name, "texts": 0, "_eval": inherited})
        for n in args.sizes:
            # one epoch keeps the folder name the first runs gave their points (they kept no recipe)
            epochs = cfg.distill.final.epochs
            folder = work / "students" / (f"{arch.name}-{n}" + (f"-{epochs}ep" if epochs != 1 else ""))
            model, result = distil_point(ws, start, arch, n, states, eval_states, folder)
            ev = ws.evaluate(model, f"{arch.name} on {n} texts")
            curve = result.get("eval_curve") or []
            rows.append(compare(ev, teacher, floor, cfg.evaluate, cfg.seed) | {
                "arch": arch.name, "texts": n, "epochs": cfg.distill.final.epochs, "steps": result["steps"],
                "train_min": result["seconds"] / 60, "tokens_per_s": result["tokens_per_s"], "teacher_min": teacher_s * n / n_train / 60,
                "heldout_start": curve[0][1] if curve else result.get("initial_eval_loss"),
                "heldout_best": min((v for _, v in curve), default=result.get("final_eval_loss")),
                "best_step": result.get("best_step"), "_eval": ev})
    labels = [t.label for t in ws.tasks]
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "_eval"} for r in rows])
    stem = args.out / args.name
    df.to_csv(f"{stem}.csv", index=False)
    plot(df, Path(f"{stem}.png"))

    shown = pd.DataFrame({
        "student": df.arch,
        "texts": ["inherited start" if n == 0 else f"{n:,}" for n in df.texts],
        **{t: [f"{g:.3f} ± {s:.3f}" for g, s in zip(df[f"{t}.gap_closed"], df[f"{t}.gap_closed_se"])] for t in labels},
        "summary": [f"{g:.3f} ± {s:.3f}" for g, s in zip(df.summary, df.summary_se)],
        "pct_teacher": [f"{100 * v:.1f}" for v in df.summary_pct_teacher],
        "dropin": [f"{100 * v:.1f}" if np.isfinite(v) else "" for v in df.get("dropin", [np.nan] * len(df))],
        "held-out KD loss start -> best (step)": [
            "" if n == 0 else f"{a:.4f} -> {b:.4f} ({s:.0f})" if s == s and s is not None else f"{a:.4f} -> {b:.4f}" for n, a, b, s in
            zip(df.texts, df.get("heldout_start", [np.nan] * len(df)), df.get("heldout_best", [np.nan] * len(df)),
                df.get("best_step", [None] * len(df)))],
        "train + teacher min": ["" if n == 0 else f"{a:.1f} + {b:.1f}" for n, a, b in
                                zip(df.texts, df.get("train_min", [0] * len(df)), df.get("teacher_min", [0] * len(df)))],
    })
    lines = [
        *header(f"Scale curve: {cfg.teacher.name} teacher, final distillation on more texts", __file__, argv, cfg),
        f"- corpus: {', '.join(f'{m.source} (weight {m.weight:g})' for m in cfg.data.mix)}; "
        f"the points' texts are the first n of one seeded {n_train:,}-text training split",
        f"- recipe: configs/benchmark.yaml's distillation, {cfg.distill.final.epochs} epochs, "
        f"{precision_name(cfg.distill.precision, cfg.distill.device)} (batch "
        f"{cfg.data.batch_size}), held-out KD loss on {len(ws.texts('eval'))} held-out corpus texts "
        + (f"every {cfg.distill.final.eval_every} steps, the student ending at its best check (its inherited start "
           "included)" if cfg.distill.final.eval_every else "at the start and the end only"),
        f"- teacher pass over the largest split and the held-out texts: {teacher_s / 60:.1f} min "
        "(each point is charged its share)",
        *[f"- task {t['task']} ({t['kind']}, {PRIMARY[t['kind']]}): {t['size']}" for t in describe_tasks(ws)],
        "- gap closed = (row - its untrained floor) / (teacher - floor) per task, ± paired-bootstrap SE; summary = "
        "mean over the tasks; dropin: teacher-built index, student queries, % of the teacher's recall@10",
        "",
        markdown_table(shown),
        "",
        "## Against the inherited start",
        "",
    ]
    for arch in archs:
        base = next(r for r in rows if r["arch"] == arch.name and r["texts"] == 0)
        for r in (r for r in rows if r["arch"] == arch.name and r["texts"] > 0):
            below = [f"{t} ({r[f'{t}.gap_closed'] - base[f'{t}.gap_closed']:+.3f} ± "
                     f"{np.hypot(r[f'{t}.gap_closed_se'], base[f'{t}.gap_closed_se']):.3f})"
                     for t in labels if r[f"{t}.gap_closed"] < base[f"{t}.gap_closed"]]
            lines.append(f"- {arch.name} on {r['texts']:,} texts: summary {r['summary'] - base['summary']:+.3f} over its "
                         f"start; " + (f"below its start on {', '.join(below)}" if below else "at or above its start on every task"))
    lines += ["", "## What the curve predicts for 10x more texts", ""]
    for arch in archs:
        pts = [r for r in rows if r["arch"] == arch.name and r["texts"] > 0]
        ns = [r["texts"] for r in pts]
        for key, what in (("summary", "summary gap closed"), ("dropin", "drop-in retrieval")):
            fit = fit_log_line(ns, [r.get(key, np.nan) for r in pts])
            if fit is None:
                continue
            slope, icpt = fit
            ten = 10 * max(ns)
            at = icpt + slope * np.log10(ten)
            lines.append(f"- {arch.name}, {what}: {slope:+.3f} per 10x texts over {min(ns):,}-{max(ns):,}; "
                         f"at {ten:,} texts the line gives {at:.3f}"
                         + (" (past 1, the teacher: read it as a trend that has not flattened yet, not a value)"
                            if at > 1 else ""))
    lines += ["", f"![scale curve]({stem.name}.png)", ""]
    return publish("\n".join(lines), Path(f"{stem}.md"))


if __name__ == "__main__":
    main()

"""Benchmark: distillation recipes side by side. One student cut from the teacher, distilled on the
same first n texts of the general mix once per recipe variant (overrides of ``distill.*``), each
scored on the held-out tasks against its own inherited start and its untrained floor, in one run.

    python -m bench.recipes --student L2-H768-A12-F1024-gelu --texts 16000 --split 64000 --precision bf16 \\
        --variant base --variant length:distill.final.pooled_relation=0,distill.final.batching=length
    python -m bench.recipes --smoke                          # tiny random teacher: correctness only

A variant is ``NAME`` (configs/benchmark.yaml's recipe) or ``NAME:KEY=VALUE[,KEY=VALUE...]`` with
YAML values. Only ``distill.*`` keys may differ, so every variant reads the same texts, teacher
states and held-out tasks (``--split`` as in bench.scale: reuse another run's teacher states).
"""

from __future__ import annotations

from bench.common import RESULTS, ROOT, add_common_args, add_precision_arg, argv_of, header, out_folder, publish

import argparse  # noqa: E402
import copy  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench.scale import distil_point, make_config  # noqa: E402
from kdnas_core.config import KDNASConfig, apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.errors import ConfigError  # noqa: E402
from kdnas_core.evaluation.evaluate import compare  # noqa: E402
from kdnas_core.evaluation.table import describe_tasks  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

# Tasks of domains the corpus and the headline's tasks leave out (chatbot questions and their
# answers; news documents of graded similarity): a recipe picked on the headline's tasks is checked
# on these.
UNSEEN_TASKS = [
    {"kind": "retrieval", "source": "packaged", "path": "chatterbot-qa"},
    {"kind": "similarity", "source": "packaged", "path": "lee-similarity"},
]
DEFAULTS = dict(student="L3-H768-A12-F384-gelu", texts=16000, probe_train=3000, test_texts=3000, pairs=2000,
                variants=["base", "length:distill.final.pooled_relation=0,distill.final.batching=length"])
SMOKE = dict(student="L1-H64-A4-F128-gelu", texts=240, probe_train=100, test_texts=100, pairs=100,
             variants=["base", "neighbours:distill.final.pooled_relation=0.5,distill.final.batching=neighbours"])


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:KEY=VALUE,...`` -> (name, {key: value}); only ``distill.*`` keys."""
    name, _, rest = text.partition(":")
    if not name or "/" in name:
        raise SystemExit(f"--variant {text!r}: expected NAME or NAME:KEY=VALUE[,KEY=VALUE...]")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("distill."):
            raise SystemExit(f"--variant {text!r}: {item!r} is not distill.KEY=VALUE (only the recipe may differ)")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def variant_config(base: KDNASConfig, name: str, overrides: dict) -> KDNASConfig:
    try:
        return config_from_dict(apply_overrides(base.model_dump(mode="json"), overrides), f"--variant {name}")
    except ConfigError as err:  # already one line naming the field
        raise SystemExit(str(err)) from None


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, RESULTS, "tiny random teacher, two recipes")
    p.add_argument("--student", default=None, help=f"architecture (default {DEFAULTS['student']})")
    p.add_argument("--texts", type=int, default=None, help=f"texts distilled on (default {DEFAULTS['texts']})")
    p.add_argument("--variant", dest="variants", action="append", default=None,
                   help=f"NAME[:distill.KEY=VALUE,...], repeated (default {' '.join(DEFAULTS['variants'])})")
    p.add_argument("--epochs", type=int, default=1, help="distill.final.epochs of every variant (default 1)")
    for knob in ("probe_train", "test_texts", "pairs"):
        p.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None, help=f"default {DEFAULTS[knob]}")
    p.add_argument("--tasks", choices=["headline", "unseen"], default="headline",
                   help="headline: bench.scale's tasks (tweets, verses, chatbot topics); unseen: chatbot questions -> "
                        "answers and Lee's news-document similarity, tasks no recipe was chosen on")
    add_precision_arg(p, "every variant")
    p.add_argument("--split", type=int, default=None,
                   help="texts in the training split the student takes its first --texts from (default --texts); "
                        "give a bench.scale run's largest size to reuse its teacher states")
    p.add_argument("--name", default="recipes", help="the report's file name without suffix")
    p.add_argument("--work", type=Path, default=None, help="work folder (default runs/recipes)")
    p.add_argument("--cache-dir", type=Path, default=None, help="override paths.cache_dir")
    args = p.parse_args(argv)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    variants = [parse_variant(v) for v in args.variants]
    if len({n for n, _ in variants}) != len(variants):
        p.error("--variant names must differ")
    if args.split is not None and args.split < args.texts:
        p.error(f"--split {args.split}: must be at least --texts ({args.texts})")
    args.sizes = [args.texts]
    args.out = out_folder(args.out, args.smoke, RESULTS)
    work = args.work or (args.out / "work" if args.smoke else ROOT / "runs" / "recipes")
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    base = make_config(args, work)
    if args.tasks == "unseen":
        base = config_from_dict(apply_overrides(base.model_dump(mode="json"), {"evaluate.tasks": UNSEEN_TASKS}),
                                "recipes benchmark config")
    configs = {name: variant_config(base, name, o) for name, o in variants}  # every error before any work
    ws = Workspace.prepare(base)
    arch = StudentArch.from_name(args.student)
    # The union of what each variant's final loss reads (with or without the hidden-state term).
    layers = tuple(sorted({n for c in configs.values() for n in Workspace(c, ws.teacher).layers_for([arch.layers], "final")}))
    t0 = time.perf_counter()
    states, eval_states = ws.cached_states("train", layers), ws.eval_states(layers)
    teacher_s = time.perf_counter() - t0
    teacher = ws.teacher_eval
    start = ws.start_student(arch)
    floor = ws.evaluate(ws.untrained_student(arch, base.seed), f"{arch.name}: untrained")
    inherited = ws.evaluate(ws.build_student(arch), f"{arch.name}: inherited, not distilled")
    rows = [compare(inherited, teacher, floor, base.evaluate, base.seed) | {"variant": "inherited start"}]
    for name, overrides in variants:
        # Same texts, teacher and tasks (only distill.* differs): the workspace is shared, its recipe swapped.
        vws = copy.copy(ws)
        vws.cfg = configs[name]
        folder = work / "students" / f"{arch.name}-{args.texts}-{name}"
        t1 = time.perf_counter()
        model, result = distil_point(vws, start, arch, args.texts, states, eval_states, folder)
        ev = ws.evaluate(model, f"{arch.name}, {name}")
        curve = result.get("eval_curve") or []
        rows.append(compare(ev, teacher, floor, base.evaluate, base.seed) | {
            "variant": name, "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
            "steps": result["steps"], "train_min": result["seconds"] / 60, "wall_min": (time.perf_counter() - t1) / 60,
            "heldout_start": curve[0][1] if curve else result.get("initial_eval_loss"),
            "heldout_best": min((v for _, v in curve), default=result.get("final_eval_loss")),
            "best_step": result.get("best_step")})
    labels = [t.label for t in ws.tasks]
    df = pd.DataFrame(rows)
    stem = args.out / args.name
    df.to_csv(f"{stem}.csv", index=False)

    def cell(g, s):
        return f"{g:.3f} ± {s:.3f}"

    shown = pd.DataFrame({
        "variant": df.variant,
        "overrides": df.overrides.fillna(""),
        **{t: [cell(g, s) for g, s in zip(df[f"{t}.gap_closed"], df[f"{t}.gap_closed_se"])] for t in labels},
        "summary": [cell(g, s) for g, s in zip(df.summary, df.summary_se)],
        "pct_teacher": [f"{100 * v:.1f}" for v in df.summary_pct_teacher],
        "dropin": [f"{100 * v:.1f}" if np.isfinite(v) else "" for v in df.get("dropin", [np.nan] * len(df))],
        "held-out KD loss start -> best": ["" if v == "inherited start" else f"{a:.4f} -> {b:.4f}"
                                           for v, a, b in zip(df.variant, df.heldout_start, df.heldout_best)],
        "train min": ["" if v == "inherited start" else f"{m:.1f}" for v, m in zip(df.variant, df.train_min)],
    })
    lines = [
        *header(f"Distillation recipes: {base.teacher.name} teacher, {arch.name} on {args.texts:,} texts", __file__,
                argv, configs),
        f"- corpus: {', '.join(f'{m.source} (weight {m.weight:g})' for m in base.data.mix)}; the first "
        f"{args.texts:,} texts of one seeded {len(ws.splits.train):,}-text training split, the same for every variant",
        f"- recipe: configs/benchmark.yaml's distillation with each variant's overrides, {args.epochs} epoch(s), "
        + (f"held-out KD loss every {base.distill.final.eval_every} steps, the student ending at its best check (its "
           "inherited start included)" if base.distill.final.eval_every else "held-out KD loss at the start and the end"),
        f"- teacher pass (or cache read) over the split and the held-out texts: {teacher_s / 60:.1f} min",
        *[f"- task {t['task']} ({t['kind']}): {t['size']}" for t in describe_tasks(ws)],
        "- gap closed = (row - its untrained floor) / (teacher - floor) per task, ± paired-bootstrap SE; summary = "
        "mean over the tasks; dropin: teacher-built index, student queries, % of the teacher's recall@10",
        "",
        markdown_table(shown),
        "",
        "## Against the inherited start and the first variant",
        "",
    ]
    first = rows[1]
    for r in rows[1:]:
        below = [f"{t} ({r[f'{t}.gap_closed'] - rows[0][f'{t}.gap_closed']:+.3f} ± "
                 f"{np.hypot(r[f'{t}.gap_closed_se'], rows[0][f'{t}.gap_closed_se']):.3f})"
                 for t in labels if r[f"{t}.gap_closed"] < rows[0][f"{t}.gap_closed"]]
        vs = "" if r is first else (f"; {r['summary'] - first['summary']:+.3f} ± "
                                    f"{np.hypot(r['summary_se'], first['summary_se']):.3f} (unpaired) against "
                                    f"{first['variant']}")
        lines.append(f"- {r['variant']}: summary {r['summary'] - rows[0]['summary']:+.3f} over the start{vs}; "
                     + (f"below the start on {', '.join(below)}" if below else "at or above the start on every task"))
    lines.append("")
    return publish("\n".join(lines), Path(f"{stem}.md"))


if __name__ == "__main__":
    main()

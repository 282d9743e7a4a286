"""How a teacher-initialised student's head count changes what it inherits: the same layers,
hidden width and FFN, cut from the teacher with each head count, scored before any distillation
(and optionally after a proxy-sized distillation), at the headline's scale and floors.

A student head wider than the teacher's lays several teacher heads side by side in one softmax,
which is not an attention pattern the teacher ever computed; narrower or equal heads keep one
teacher head each. This measures what that costs.

    .venv/bin/python bench/head_width.py                          # L6-H384 and L3-H768 at every head count
    .venv/bin/python bench/head_width.py --shapes L6-H384-F512-gelu --heads 4 6
    .venv/bin/python bench/head_width.py --shapes L3-H384-F768-gelu L3-H384-F768-silu --heads 12 \
        --out bench/results/activation-inherit       # the same question for the activation

Writes bench/results/head-width.{md,csv}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import headline  # noqa: E402  (sets the offline environment before transformers is imported)
from common import short_commit  # noqa: E402
from kdnas_core.evaluate import compare  # noqa: E402
from kdnas_core.search_space import StudentArch  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def arch_with_heads(shape: str, heads: int) -> StudentArch | None:
    """``L6-H384-F512-gelu`` with ``heads`` heads, or None where the width does not split evenly."""
    layers, hidden, ffn, act = shape.split("-")
    h = int(hidden[1:])
    if h % heads:
        return None
    return StudentArch.from_name(f"{layers}-{hidden}-A{heads}-{ffn}-{act}")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["L6-H384-F512-gelu", "L3-H768-F1024-gelu"])
    ap.add_argument("--heads", nargs="+", type=int, default=[2, 3, 4, 6, 12])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "headline-full",
                    help="the headline's folder: its teacher states and embeddings are reused")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "head-width")
    args = ap.parse_args(argv)
    scale = dict(headline.VARIANTS["full"])
    cfg = headline.make_config(argparse.Namespace(smoke=False, cache_dir=None), scale, args.work)
    ws = Workspace.prepare(cfg)
    d_t = ws.teacher.config.hidden_size // ws.teacher.config.num_attention_heads
    teacher = headline.Row(f"teacher {cfg.teacher.name}", "teacher", "", ws.teacher.model)
    rows = []
    for shape in args.shapes:
        for a in args.heads:
            arch = arch_with_heads(shape, a)
            if arch is None:
                continue
            row = headline.Row(arch.name, "inherited", arch.name, ws.build_student(arch))
            headline.with_floor(row, ws.untrained_student(arch, cfg.seed))
            row.latency = {"ort-fp32": headline.quick_latency(row.model, cfg)}
            rows.append(row)
    headline.evaluate_rows(ws, [teacher] + [x for r in rows for x in (r, r.floor)], None, args.work)
    out = []
    for r in rows:
        arch = StudentArch.from_name(r.arch)
        d = compare(r.eval, teacher.eval, r.floor.eval, cfg.evaluate, cfg.seed)
        out.append({"arch": r.arch, "head_dim": arch.hidden // arch.heads,
                    "teacher_heads_per_student_head": round(arch.hidden / arch.heads / d_t, 2),
                    "fp32_ms": round(r.latency["ort-fp32"], 2), "summary": d["summary"],
                    "summary_se": d["summary_se"], **{t.label: d.get(f"{t.label}.gap_closed") for t in ws.tasks},
                    "recall@10": d.get("recall@10")})
    df = pd.DataFrame(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out.with_suffix(".csv"), index=False)
    commit = short_commit()
    md = [f"# Teacher-initialised students before distillation: {', '.join(args.shapes)} at "
          f"{', '.join(map(str, args.heads))} heads ({datetime.date.today()})\n",
          f"Command: `python bench/head_width.py {' '.join(argv if argv is not None else sys.argv[1:])}` at "
          f"{commit}; teacher {cfg.teacher.name} (head width {d_t}); headline-full tasks, floors and seed; "
          "summary = mean gap closed over the tasks of the student cut from the teacher, not distilled; "
          "fp32_ms: ONNX Runtime, 1 thread, batch 1 x 128, 8 runs (only to compare rows).\n",
          headline.markdown_table(df), ""]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return args.out


if __name__ == "__main__":
    main()

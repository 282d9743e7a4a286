"""A/B of where a teacher-initialised student's projection heads start, at the headline's full
scale: rows of bench/results/headline-full.csv distilled again with this checkout's
``inherit.init_projections``, everything else equal (teacher, data, recipe, seed, floors).

    .venv/bin/python bench/init_heads_ab.py            # the truncated teacher and the 0.1x pick

Writes bench/results/init-heads-ab.md: the headline's numbers (before) next to this run's (after).
"""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import headline  # noqa: E402
from common import short_commit  # noqa: E402
from kdnas_core.evaluate import compare  # noqa: E402
from kdnas_core.inherit import full_width  # noqa: E402
from kdnas_core.search_space import StudentArch  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["L6-H384-A4-F512-gelu"], help="KD-NAS-style rows (uniform layers)")
    ap.add_argument("--before", type=Path, default=ROOT / "bench" / "results" / "headline-full.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "init-heads-ab.md")
    args = ap.parse_args(argv)
    scale = dict(headline.VARIANTS["full"])
    work = ROOT / "runs" / "init-heads-ab"
    work.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(smoke=False, cache_dir=None)
    cfg = headline.make_config(ns, scale, work)
    ws = Workspace.prepare(cfg)
    first = Workspace(cfg.model_copy(update={"student": cfg.student.model_copy(update={"layers": "first"})}), ws.teacher)
    rows = [headline.inherited_row(first, full_width(ws.teacher.config, 1), "truncated teacher: its first 1 layer(s)",
                                   "hand-picked")]
    rows += [headline.inherited_row(ws, StudentArch.from_name(a), f"{a}", "kd-nas") for a in args.archs]
    headline.distil_rows(ws, rows, work)
    teacher = headline.Row(f"teacher {cfg.teacher.name}", "teacher", "", ws.teacher.model)
    scored = [teacher] + [x for r in rows for x in (r, r.floor)]
    headline.evaluate_rows(ws, scored, None, work)
    before = pd.read_csv(args.before)
    out = []
    for r in rows:
        d = compare(r.eval, teacher.eval, r.floor.eval, cfg.evaluate, cfg.seed)
        old = before[(before.arch == r.arch) & before.kind.isin(["kd-nas", "hand-picked", "random-search"])]
        old = old.iloc[0] if len(old) else None
        for label, src in (("before (headline-full)", old), ("after (this checkout)", d | r.result)):
            if src is None:
                continue
            get = src.get  # a dict (this run) or a pandas row (the headline's csv)
            out.append({"row": r.name, "heads": label, "summary": get("summary"), "summary_se": get("summary_se"),
                        **{t.label: get(f"{t.label}.gap_closed") for t in ws.tasks},
                        "dropin": get("dropin"), "recall@10": get("recall@10")})
        out.append({"row": r.name, "heads": "start KD loss after", "summary": r.result.get("initial_eval_loss")})
    # Its first run listed the L6 rows twice (cause not found); a row is shown once.
    df = pd.DataFrame(out).drop_duplicates()
    commit = short_commit()
    md = [f"# Where teacher-initialised students' projection heads start ({datetime.date.today()})\n",
          f"Command: `python bench/init_heads_ab.py {' '.join(argv if argv is not None else sys.argv[1:])}` at "
          f"{commit} (plus uncommitted changes, if any); headline-full scale (4000 texts x 2 epochs, mpnet-base, "
          "the same recipe, seed and floors); 'before' is bench/results/headline-full.csv.\n",
          headline.markdown_table(df), ""]
    args.out.write_text("\n".join(md))
    print("\n".join(md))
    return args.out


if __name__ == "__main__":
    main()

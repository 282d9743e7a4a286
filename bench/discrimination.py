"""Does the evaluation tell students apart? Saved students re-scored on every configured task.

For each task and for the summary (mean gap closed over the tasks) this reports how far apart
the students' scores are against their standard errors, and the share of student pairs whose
difference is at least 2 paired-bootstrap standard errors (both students resampled on the same
items, so what the items share cancels). The probe-only row is what kdnas measured before
the task list: the classification task alone.

    python -m bench.discrimination                    # the students of bench/proxy_rank.py (runs/proxy-rank/)
    python -m bench.discrimination runs/students/*    # any saved students
    python -m bench.discrimination --smoke            # three students of a tiny random teacher, 2 steps each

Writes bench/results/discrimination.{md,csv}.
"""

from __future__ import annotations

from bench.common import RESULTS, ROOT, add_common_args, argv_of, header, out_folder, smoke_config

import argparse  # noqa: E402
import itertools  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.evaluation.evaluate import gap_closed, gap_draws  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.student import load_student, saved_meta, untrained_floor  # noqa: E402
from kdnas_core.evaluation.table import describe_tasks  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def _mean_draws(draws: list[np.ndarray]) -> np.ndarray:
    stacked = np.vstack(draws)
    ok = np.isfinite(stacked).any(0)
    out = np.full(stacked.shape[1], np.nan)
    out[ok] = np.nanmean(stacked[:, ok], axis=0)
    return out


def score(ws: Workspace, dirs: list[Path]) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Per student: gap closed per task and the summary, with the bootstrap draws behind each."""
    cfg = ws.cfg
    teacher = ws.teacher_eval
    floors: dict[str, object] = {}
    rows, draws = [], {}
    for d in dirs:
        model, arch = load_student(d)
        key = (arch.arch_id, type(model).__name__)  # a student cut from the teacher keeps the teacher's class
        if key not in floors:
            floors[key] = ws.evaluate(untrained_floor(model.config, cfg.seed), f"{arch.name} untrained")
        floor, ev = floors[key], ws.evaluate(model, arch.name)
        name = f"{arch.name} ({saved_meta(d).get('init', '?')} init)"
        row, mine = {"student": name}, {}
        for i, t in enumerate(ws.tasks):
            o, f, te = ev.outcomes[t.label], floor.outcomes[t.label], teacher.outcomes[t.label]
            mine[t.label] = gap_draws(o, f, te, o.primary, cfg.evaluate.bootstrap, cfg.seed + i)
            row[t.label] = gap_closed(o.metric(o.primary), f.metric(o.primary), te.metric(o.primary))
            row[f"{t.label}_se"] = float(np.nanstd(mine[t.label], ddof=1))
        mine["summary"] = _mean_draws([mine[t.label] for t in ws.tasks])
        row["summary"] = float(np.nanmean([row[t.label] for t in ws.tasks]))
        row["summary_se"] = float(np.nanstd(mine["summary"], ddof=1))
        rows.append(row)
        draws[name] = mine
    return pd.DataFrame(rows), draws


def separation(table: pd.DataFrame, draws: dict, measures: list[str]) -> pd.DataFrame:
    out = []
    for m in measures:
        values = table.set_index("student")[m]
        pairs = list(itertools.combinations(values.index, 2))
        z = []
        for a, b in pairs:
            diff = draws[a][m] - draws[b][m]  # same resamples: a paired difference
            se = float(np.nanstd(diff, ddof=1))
            z.append(abs(values[a] - values[b]) / se if se > 0 else np.nan)
        z = np.asarray(z)
        out.append({"measure": m, "spread (max - min)": float(values.max() - values.min()),
                    "median SE": float(table[f"{m}_se"].median()),
                    "spread / median SE": float((values.max() - values.min()) / table[f"{m}_se"].median()),
                    "pairs ≥ 2 SE apart": f"{int(np.nansum(z >= 2))} / {len(pairs)}",
                    "median |diff| / paired SE": float(np.nanmedian(z))})
    return pd.DataFrame(out)


def smoke_students(base: dict, work: Path) -> list[Path]:
    """Three saved students of the tiny random teacher (two cut from it, one random), 2 steps each."""
    from kdnas_core.final import distill_student

    dirs = []
    for init, arch in (("teacher", "L1-H32-A2-F64-gelu"), ("teacher", "L2-H64-A4-F128-gelu"),
                       ("random", "L1-H32-A2-F64-gelu")):
        cfg = config_from_dict(apply_overrides(base, {"student.init": init}), "smoke")
        out = work / "students" / f"{init}-{arch}"
        if not (out / "config.json").is_file():
            distill_student(cfg, arch, out_dir=out, max_steps=2, progress=False)
        dirs.append(out)
    return dirs


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("students", nargs="*", type=Path)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--test-texts", type=int, default=None, help="items per task (default 2000; --smoke: 100)")
    ap.add_argument("--name", default="discrimination", help="the report's file name without suffix")
    add_common_args(ap, RESULTS, "three students of a tiny random teacher")
    args = ap.parse_args(argv)
    args.out = out_folder(args.out, args.smoke, RESULTS)
    import yaml

    n = args.test_texts or (100 if args.smoke else 2000)
    base = smoke_config(args.out / "work") if args.smoke else yaml.safe_load((ROOT / args.config).read_text())
    dirs = args.students or (smoke_students(base, args.out / "work") if args.smoke
                             else sorted((ROOT / "runs" / "proxy-rank").glob("*/students/*")))
    cfg = config_from_dict(apply_overrides(base, {
        "evaluate.tasks": [{"train_size": n, "test_size": n},
                           {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase", "test_size": n},
                           {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics", "test_size": n}],
        "tracking.enabled": False}), "smoke" if args.smoke else args.config)
    ws = Workspace.prepare(cfg).validate()
    table, draws = score(ws, dirs)
    labels = [t.label for t in ws.tasks]
    sep = separation(table, draws, [*labels, "summary"])
    sep["measure"] = [f"{m} (probe only: what kdnas reported before)" if m == labels[0] else m for m in sep.measure]
    md = [*header("Does the evaluation tell students apart?", __file__, argv, cfg), "",
          f"Teacher {cfg.teacher.name}; {len(dirs)} saved students; gap closed per task against each student's "
          f"untrained floor, {cfg.evaluate.bootstrap} paired-bootstrap resamples.\n",
          *[f"- {t['task']} ({t['kind']}): {t['size']}" for t in describe_tasks(ws)], "",
          "## Separation\n", markdown_table(sep), "",
          "## Students\n", markdown_table(table.sort_values("summary")), ""]
    out = args.out / f"{args.name}.md"
    out.write_text("\n".join(md))
    table.to_csv(out.with_suffix(".csv"), index=False)
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()

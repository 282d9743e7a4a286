"""The multilingual table: a multilingual teacher, the KD-NAS pick per budget and a hand-picked
layer-dropped teacher at the pick's latency, each scored on translation retrieval per language
pair and direction, with speed-up, parameters and file size.

    .venv/bin/python bench/multilingual.py                      # configs/multilingual.yaml (me5-small)
    .venv/bin/python bench/multilingual.py --episodes 2 --train-texts 3000   # quicker

Every student is distilled with the config's recipe on its corpus (translation pairs of software messages),
trimmed to the corpus's vocabulary when the config says so, and scored by kdnas's own
evaluation (gap closed against each student's untrained floor, the summary over the tasks).
Writes bench/results/multilingual.{md,csv}; work files go to the config's output folder so a
rerun resumes.
"""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.evaluators import latency_profile  # noqa: E402
from kdnas_core.final import final_student  # noqa: E402
from kdnas_core.inherit import full_width  # noqa: E402
from kdnas_core.reports import markdown_table  # noqa: E402
from kdnas_core.search_space import StudentArch  # noqa: E402
from kdnas_core.searching import search_without_prefect  # noqa: E402
from kdnas_core.student_eval import describe_tasks, evaluate_students  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def layer_dropped(ws: Workspace, target_ms: float) -> StudentArch:
    """The teacher's full width with the number of evenly spread layers whose latency is
    closest to ``target_ms`` (sentence-transformers' layer reduction)."""
    options = [full_width(ws.teacher.config, k) for k in ws.cfg.search_space.layers if k < ws.teacher.num_layers]
    return min(options, key=lambda a: abs(latency_profile(ws, a).latency_ms - target_ms))


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("model.safetensors")) / 1e6


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/multilingual.yaml")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--train-texts", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None, help="pairs per translation task")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multilingual.md")
    args = ap.parse_args(argv)
    import yaml

    raw = yaml.safe_load((ROOT / args.config).read_text())
    overrides = {"tracking.enabled": False}
    for knob, field in (("episodes", "search.episodes"), ("candidates", "search.candidates_per_episode"),
                        ("train_texts", "data.train_size")):
        if getattr(args, knob) is not None:
            overrides[field] = getattr(args, knob)
    if args.test_size:
        overrides["evaluate.tasks"] = [{**t, "test_size": args.test_size} for t in raw["evaluate"]["tasks"]]
    cfg = config_from_dict(apply_overrides(raw, overrides), args.config)
    ws = Workspace.prepare(cfg)
    result, out, teacher_ms = search_without_prefect(cfg, ws=ws)
    picks = [r for r in result.recommendations if r["arch"]]
    if not picks:
        raise SystemExit(f"KD-NAS found no student within any budget: {result.recommendations}")
    archs = {r["arch"]: f"KD-NAS pick, budget {r['budget']}" for r in picks}
    hand = layer_dropped(ws, picks[0]["latency_ms"])
    archs.setdefault(hand.name, f"layer-dropped teacher ({hand.layers} evenly spread layers)")
    finals = {name: final_student(cfg, ws, StudentArch.from_name(name)) for name in archs}
    table = evaluate_students(ws, [f.path for f in finals.values()])

    b, s = cfg.latency.reward_shape
    teacher_params = sum(p.numel() for p in ws.teacher.model.parameters())
    rows = []
    for r in table.to_dict("records"):
        role, arch = r["role"], r["arch"]
        ms = teacher_ms if role == "teacher" else latency_profile(ws, StudentArch.from_name(arch)).latency_ms
        final = finals.get(arch)
        rows.append({"row": "teacher" if role == "teacher" else f"{archs[arch]}: {role}",
                     "arch": arch or f"{ws.teacher.num_layers}x{ws.teacher.hidden}",
                     "speedup_fp32": teacher_ms / ms, "params_m": r["params_m"],
                     "params_pct_teacher": 100 * r["params_m"] * 1e6 / teacher_params,
                     "file_mb": folder_mb(final.path) if final is not None and role == "student" else None,
                     **{c: v for c, v in r.items() if c.endswith((".recall@1", ".mrr"))},
                     "summary": r.get("summary"), "summary_se": r.get("summary_se")})
    slim = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    slim.to_csv(args.out.with_suffix(".csv"), index=False)
    teacher = table.iloc[0]
    kept = [f"- {t['task']}: {t['size']}" for t in describe_tasks(ws)]
    md = [f"# Multilingual students ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores)\n",
          f"Command: `python bench/multilingual.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; config "
          f"{args.config}: teacher {cfg.teacher.name}, corpus {cfg.data.source} {cfg.data.languages}, "
          f"student.vocab {cfg.student.vocab}, search {cfg.search.episodes} x {cfg.search.candidates_per_episode}. "
          f"Latency: ONNX Runtime fp32, batch {b} x {s}, teacher {teacher_ms:.1f} ms.\n",
          "Tasks (each held out from the corpus):", *kept, "",
          markdown_table(slim.drop(columns=[c for c in slim.columns if c.endswith(".mrr")])), "",
          "## Against the target (≥ 5x fp32 and ≥ 90 % of the teacher's recall@1 on every pair)\n"]
    recall = [c for c in slim.columns if c.endswith(".recall@1")]
    for r in slim[slim.row.str.endswith(": student")].to_dict("records"):
        shares = {c.split(".")[0]: r[c] / teacher[c] for c in recall if teacher[c]}
        worst = min(shares, key=shares.get)
        met = r["speedup_fp32"] >= 5 and shares[worst] >= 0.9
        md.append(f"- {r['row']} {r['arch']}: {r['speedup_fp32']:.1f}x, {r['params_pct_teacher']:.0f} % of the "
                  f"teacher's parameters, lowest share of the teacher's recall@1 {100 * shares[worst]:.0f} % "
                  f"({worst}): {'met' if met else 'missed'}.")
    args.out.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return args.out


if __name__ == "__main__":
    main()

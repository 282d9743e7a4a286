"""Does the multilingual search's proxy rank two students the way their final distillation does?
Each architecture is proxy-distilled as the search does (configs/multilingual.yaml: 1,000
messages x 2 epochs, held-out pooled cosine distance to the translation targets) under several
seeds (each seed draws its own splits and student start), so a proxy gap can be read against
seed noise.

    .venv/bin/python bench/multilingual_proxy.py                    # the two 0.2x candidates
    .venv/bin/python bench/multilingual_proxy.py --archs L6-H256-A8-F1536-gelu L3-H384-A12-F512-gelu --seeds 0 1 2 3

Writes bench/results/multilingual-proxy-seeds.{md,csv}. The final students' retrieval is in
bench/results/multilingual.md and multilingual-translation-16k.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import short_commit  # noqa: E402
from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.evaluators import ProxyEvaluator  # noqa: E402
from kdnas_core.reports import markdown_table  # noqa: E402
from kdnas_core.search_space import StudentArch  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/multilingual.yaml")
    ap.add_argument("--archs", nargs="+", default=["L6-H384-A12-F256-gelu", "L6-H256-A8-F1536-gelu"],
                    help="default: the 0.2x pick of bench/results/multilingual.md and the hand-picked student")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multilingual-proxy-seeds.md")
    args = ap.parse_args(argv)
    import yaml

    raw = yaml.safe_load((ROOT / args.config).read_text())
    rows, teacher = [], None
    for seed in args.seeds:
        cfg = config_from_dict(apply_overrides(copy.deepcopy(raw), {"tracking.enabled": False, "seed": seed}),
                               args.config)
        ws = Workspace(cfg, teacher) if teacher is not None else Workspace.prepare(cfg)
        teacher = ws.teacher
        evaluator = ProxyEvaluator(ws, progress=False)
        for name in args.archs:
            r = evaluator.distill(StudentArch.from_name(name), progress=False)
            rows.append({"arch": name, "seed": seed, "proxy_loss": r.kd_loss})
            print(rows[-1], flush=True)
    full = pd.DataFrame(rows)
    table = full.groupby("arch", sort=False).proxy_loss.agg(["mean", "std", "min", "max"]).reset_index()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    full.to_csv(args.out.with_suffix(".csv"), index=False)
    md = [f"# Multilingual proxy loss across seeds ({datetime.date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, commit {short_commit()})\n",
          f"Command: `python bench/multilingual_proxy.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; "
          f"config {args.config}, seeds {args.seeds}: each seed its own splits and student start.\n",
          markdown_table(table), ""]
    args.out.write_text("\n".join(md))
    print("\n".join(md))
    return args.out


if __name__ == "__main__":
    main()

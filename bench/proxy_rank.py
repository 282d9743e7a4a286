"""Does the proxy predict the final result? Rank correlation between what the search sees of a
candidate (its proxy L_HS and reward) and what the user gets (the final student's downstream
score), over architectures spread across the search space, for both student inits.

    .venv/bin/python bench/proxy_rank.py                 # MiniLM-L6 teacher, 12 archs, both inits
    .venv/bin/python bench/proxy_rank.py --archs 6 --train-texts 1000   # quicker, noisier

Every architecture is proxy-distilled at the search's budget (configs/default.yaml) and
final-distilled at a smaller final scale that fits 2 cores (stated in the report), then scored
on the same held-out texts. Parameter count is the baseline a proxy has to beat. Writes
bench/results/proxy-rank.{md,csv}; work files go to runs/proxy-rank/ so a rerun resumes.
"""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.evaluators import ProxyEvaluator, latency_profile, teacher_latency  # noqa: E402
from kdnas_core.final import final_student  # noqa: E402
from kdnas_core.latency import count_params  # noqa: E402
from kdnas_core.reports import markdown_table  # noqa: E402
from kdnas_core.reward import reward  # noqa: E402
from kdnas_core.student_eval import evaluate_students  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def spread_archs(ws: Workspace, n: int, seed: int = 0) -> list:
    """``n`` architectures spread over the space by parameter count (quantiles of a sample)."""
    rng = random.Random(seed)
    t = ws.teacher.config
    pool = {a.arch_id: a for a in (ws.space.sample(rng) for _ in range(400))}
    ranked = sorted(pool.values(), key=lambda a: count_params(a, t.vocab_size, t.max_position_embeddings)["encoder"])
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)]


def correlations(df: pd.DataFrame, predictors: list[str], targets: list[str]) -> pd.DataFrame:
    from scipy.stats import kendalltau, spearmanr

    rows = []
    for init, part in df.groupby("init"):
        for p in predictors:
            for t in targets:
                sign = -1 if p in ("proxy_L_HS",) else 1  # lower loss predicts a better student
                tau = kendalltau(sign * part[p], part[t]).statistic
                rho = spearmanr(sign * part[p], part[t]).statistic
                rows.append({"init": init, "predictor": p, "target": t, "kendall_tau": tau, "spearman": rho})
    return pd.DataFrame(rows)


def rescore(proxy_csv: Path, scores_csv: Path, out: Path) -> None:
    """The correlations of an earlier run's proxy numbers with its students re-scored by
    bench/discrimination.py (every task of the evaluation, and the summary)."""
    df = pd.read_csv(proxy_csv)
    scores = pd.read_csv(scores_csv)
    scores["init"] = scores.student.str.extract(r"\((\w+) init\)", expand=False)
    scores["arch"] = scores.student.str.split(" ").str[0]
    targets = [c for c in scores.columns if c not in ("student", "init", "arch") and not c.endswith("_se")]
    df = df.drop(columns=[c for c in targets if c in df.columns]).merge(scores[["init", "arch", *targets]],
                                                                       on=["init", "arch"])
    corr = correlations(df, ["proxy_L_HS", "reward", "params_m"], targets)
    md = [f"# Proxy vs the final students' downstream summary ({datetime.date.today()})\n",
          f"The students of `{proxy_csv.name}` re-scored by `bench/discrimination.py` (`{scores_csv.name}`): "
          "gap closed per task and the summary, against each student's untrained floor. Predictors are signed so "
          "that a positive tau means 'ranks like the final result'.\n",
          markdown_table(corr), "", markdown_table(df[["init", "arch", "proxy_L_HS", "reward", "params_m", *targets]]), ""]
    out.write_text("\n".join(md))
    print("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--archs", type=int, default=12)
    ap.add_argument("--inits", nargs="+", default=["teacher", "random"])
    ap.add_argument("--train-texts", type=int, default=2000)
    ap.add_argument("--final-epochs", type=int, default=1)
    ap.add_argument("--probe-train", type=int, default=2000)
    ap.add_argument("--test-texts", type=int, default=2000)
    ap.add_argument("--rescore", type=Path, default=None, metavar="SCORES_CSV",
                    help="no distillation: correlate bench/results/proxy-rank.csv with these re-scored students "
                         "(bench/results/discrimination.csv)")
    args = ap.parse_args(argv)
    if args.rescore:
        results = ROOT / "bench" / "results"
        return rescore(results / "proxy-rank.csv", args.rescore, results / "proxy-rank-summary.md")
    import yaml

    base = yaml.safe_load((ROOT / args.config).read_text())
    rows = []
    for init in args.inits:
        cfg = config_from_dict(apply_overrides(base, {
            "student.init": init, "paths.output_dir": str(ROOT / "runs" / "proxy-rank" / init),
            "data.train_size": args.train_texts, "distill.final": {"epochs": args.final_epochs},
            "evaluate.tasks": [{"train_size": args.probe_train, "test_size": args.test_texts},
                               {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase",
                                "test_size": args.test_texts},
                               {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics",
                                "test_size": args.test_texts}],
            "tracking.enabled": False}), args.config)
        ws = Workspace.prepare(cfg).validate()
        b, s = cfg.latency.reward_shape
        teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
        ev = ProxyEvaluator(ws)
        archs = spread_archs(ws, args.archs)
        for arch in archs:
            proxy = ev.distill(arch)
            latency = latency_profile(ws, arch).latency_ms
            final = final_student(cfg, ws, arch)
            t = ws.teacher.config
            rows.append({"init": init, "arch": arch.name, "path": final.path,
                         "params_m": count_params(arch, t.vocab_size, t.max_position_embeddings)["encoder"] / 1e6,
                         "proxy_L_HS": proxy.kd_loss, "latency_ms": latency,
                         "reward": reward(proxy.kd_loss, latency, teacher_ms, cfg.reward.alpha, cfg.reward.beta),
                         "final_L_HS": final.result["final_eval_loss"]})
        table = evaluate_students(ws, [r["path"] for r in rows if r["init"] == init])
        students = table[table["role"] == "student"].set_index("arch")
        for r in rows:
            if r["init"] == init:
                r["summary"] = students.loc[r["arch"], "summary"]
                r["summary_se"] = students.loc[r["arch"], "summary_se"]
                r["recall@10"] = students.loc[r["arch"], "recall@10"]
    df = pd.DataFrame(rows)
    corr = correlations(df, ["proxy_L_HS", "reward", "params_m"], ["summary", "recall@10"])
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    df.drop(columns=["path"]).to_csv(out / "proxy-rank.csv", index=False)
    md = [f"# Proxy vs final ranking ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores)\n",
          f"Command: `python bench/proxy_rank.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
          f"Teacher {base.get('teacher', {}).get('name', 'minilm-l6')}; proxy budget of {args.config}; final "
          f"distillation on {args.train_texts} texts x {args.final_epochs} epoch(s); probe {args.probe_train} / "
          f"{args.test_texts} held-out texts. Predictors are signed so that a positive tau means 'ranks like the "
          "final result'; parameter count is the baseline a proxy has to beat.\n",
          "## Rank correlations\n", markdown_table(corr), "\n## Architectures\n",
          markdown_table(df.drop(columns=["path"])), ""]
    (out / "proxy-rank.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

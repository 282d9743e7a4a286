"""Does the proxy predict the final result? Rank correlation between what the search sees of a
candidate (its proxy L_HS and reward) and what the user gets (the final student's downstream
score), over architectures spread across the search space, for both student inits.

    python -m bench.proxy_rank                 # MiniLM-L6 teacher, 12 archs, both inits
    python -m bench.proxy_rank --archs 6 --train-texts 1000   # quicker, noisier
    python -m bench.proxy_rank --smoke         # a tiny random teacher, 3 archs, both inits: correctness only
    python -m bench.proxy_rank --rescore bench/results/discrimination.csv   # no distillation, see rescore()

Every architecture is proxy-distilled at the search's budget (configs/default.yaml) and
final-distilled at a smaller final scale that fits 2 cores (stated in the report), then scored
on the same held-out texts. Parameter count is the baseline a proxy has to beat. Writes
bench/results/proxy-rank.{md,csv} (--name sets the file name); work files go to runs/proxy-rank/
so a rerun resumes.
"""

from __future__ import annotations

from bench.common import RANDOM_INIT_FINAL, RESULTS, ROOT, add_common_args, argv_of, header, out_folder, smoke_config

import argparse  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.search.candidates import ProxyEvaluator, latency_profile, teacher_latency  # noqa: E402
from kdnas_core.final import final_student  # noqa: E402
from kdnas_core.latency import count_params  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.reward import reward  # noqa: E402
from kdnas_core.evaluation.table import evaluate_students  # noqa: E402
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


def rescore(proxy_csv: Path, scores_csv: Path, out: Path, argv: list[str]) -> Path:
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
    md = [*header("Proxy vs the final students' downstream summary", __file__, argv), "",
          f"The students of `{proxy_csv.name}` re-scored by `bench/discrimination.py` (`{scores_csv.name}`): "
          "gap closed per task and the summary, against each student's untrained floor. Predictors are signed so "
          "that a positive tau means 'ranks like the final result'.\n",
          markdown_table(corr), "", markdown_table(df[["init", "arch", "proxy_L_HS", "reward", "params_m", *targets]]), ""]
    out.write_text("\n".join(md))
    print("\n".join(md))
    return out


# --smoke: 2 archs of a tiny random teacher, 64 train texts, 1 epoch, 100 probe / test items.
SMOKE = {"archs": 2, "train_texts": 64, "probe_train": 100, "test_texts": 100}


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--archs", type=int, default=None, help="default 12 (at least 2)")
    ap.add_argument("--inits", nargs="+", default=["teacher", "random"])
    ap.add_argument("--train-texts", type=int, default=None, help="default 2000")
    ap.add_argument("--final-epochs", type=int, default=1)
    ap.add_argument("--probe-train", type=int, default=None, help="default 2000")
    ap.add_argument("--test-texts", type=int, default=None, help="default 2000")
    ap.add_argument("--rescore", type=Path, default=None, metavar="SCORES_CSV",
                    help="no distillation: correlate <out>/proxy-rank.csv with these re-scored students "
                         "(bench/results/discrimination.csv); writes <out>/proxy-rank-summary.md")
    ap.add_argument("--name", default=None, help="the report's file name without suffix (default proxy-rank, "
                    "with --rescore proxy-rank-summary)")
    add_common_args(ap, RESULTS, "a tiny random teacher")
    args = ap.parse_args(argv)
    for k, full in (("archs", 12), ("train_texts", 2000), ("probe_train", 2000), ("test_texts", 2000)):
        if getattr(args, k) is None:
            setattr(args, k, SMOKE[k] if args.smoke else full)
    out = out_folder(args.out, args.smoke, RESULTS)
    if args.rescore:
        return rescore(out / "proxy-rank.csv", args.rescore, out / f"{args.name or 'proxy-rank-summary'}.md", argv)
    import yaml

    work = out / "work" if args.smoke else ROOT / "runs" / "proxy-rank"
    base = smoke_config(work) if args.smoke else yaml.safe_load((ROOT / args.config).read_text())
    rows, configs = [], {}
    for init in args.inits:
        cfg = config_from_dict(apply_overrides(base, {
            "student.init": init, "paths.output_dir": str(work / init),
            "data.train_size": args.train_texts, "distill.final.epochs": args.final_epochs,
            "evaluate.tasks": [{"train_size": args.probe_train, "test_size": args.test_texts},
                               {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase",
                                "test_size": args.test_texts},
                               {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics",
                                "test_size": args.test_texts}],
            "tracking.enabled": False,
            **(RANDOM_INIT_FINAL if init == "random" else {})}),
            "smoke" if args.smoke else args.config)
        configs[init] = cfg
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
                         "final_L_HS": final.result.final_eval_loss})
        table = evaluate_students(ws, [r["path"] for r in rows if r["init"] == init])
        students = table[table["role"] == "student"].set_index("arch")
        for r in rows:
            if r["init"] == init:
                r["summary"] = students.loc[r["arch"], "summary"]
                r["summary_se"] = students.loc[r["arch"], "summary_se"]
                r["recall@10"] = students.loc[r["arch"], "recall@10"]
    df = pd.DataFrame(rows)
    corr = correlations(df, ["proxy_L_HS", "reward", "params_m"], ["summary", "recall@10"])
    stem = out / (args.name or "proxy-rank")
    df.drop(columns=["path"]).to_csv(stem.with_suffix(".csv"), index=False)
    md = [*header("Proxy vs final ranking", __file__, argv, configs), "",
          f"Teacher {base.get('teacher', {}).get('name', 'minilm-l6')}; proxy budget of "
          f"{'the smoke config' if args.smoke else args.config}; final "
          f"distillation on {args.train_texts} texts x {args.final_epochs} epoch(s); probe {args.probe_train} / "
          f"{args.test_texts} held-out texts. Predictors are signed so that a positive tau means 'ranks like the "
          "final result'; parameter count is the baseline a proxy has to beat.\n",
          "## Rank correlations\n", markdown_table(corr), "\n## Architectures\n",
          markdown_table(df.drop(columns=["path"])), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return stem.with_suffix(".md")


if __name__ == "__main__":
    main()

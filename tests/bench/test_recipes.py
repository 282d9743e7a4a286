"""python -m bench.recipes --smoke end to end on a tiny random teacher: correctness, not timing."""

import pandas as pd
import pytest

from tests.bench.runner import check_header, run_bench

pytestmark = pytest.mark.bench


def test_recipes_smoke_scores_every_variant_against_the_start(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    run_bench("recipes", argv, tmp_path)
    text = check_header(tmp_path / "out" / "recipes.md", "recipes", argv)
    df = pd.read_csv(tmp_path / "out" / "recipes.csv")
    assert df.variant.tolist() == ["inherited start", "base", "neighbours"]
    assert df.summary.notna().all() and df.summary_se.gt(0).all()
    assert df.steps.iloc[1:].tolist() == [15, 15]  # 240 texts at batch 16, one epoch, whatever the grouping
    assert "## Against the inherited start and the first variant" in text
    # each variant trained its own student, in its own folder
    assert len(list((tmp_path / "work" / "students").glob("*/result.json"))) == 2


@pytest.mark.parametrize("variant,message", [
    ("odd:data.train_size=10", "is not distill.KEY=VALUE"),
    ("lonely:distill.batching=neighbours", "batching: neighbours only changes"),
])
def test_a_variant_that_changes_more_than_the_recipe_is_one_line(tmp_path, variant, message):
    argv = ["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--variant", variant]
    proc = run_bench("recipes", argv, tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "work" / "students").exists()

"""python -m bench.scale --smoke end to end on a tiny random teacher: correctness, not timing."""

import argparse
import json

import pandas as pd
import pytest

from tests.bench.runner import check_header, run_bench

pytestmark = pytest.mark.bench


def test_scale_smoke_scores_every_point_against_its_start(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    run_bench("scale", argv, tmp_path)
    text = check_header(tmp_path / "out" / "scale-curve.md", "scale", argv)
    df = pd.read_csv(tmp_path / "out" / "scale-curve.csv")
    # the inherited start, then each size, all against one floor and one teacher
    assert list(df.texts) == [0, 80, 240]
    assert df.summary.notna().all() and df["summary_se"].gt(0).all()
    assert df[df.texts > 0].steps.tolist() == [5, 15]  # 80 and 240 texts at batch 16, one epoch
    assert "## Against the inherited start" in text and "## What the curve predicts" in text
    # a rerun reuses the distilled points (result.json per point) and writes the same table
    run_bench("scale", argv, tmp_path)
    again = pd.read_csv(tmp_path / "out" / "scale-curve.csv")
    assert again.summary.tolist() == pytest.approx(df.summary.tolist())
    # a point distilled with another recipe is refused, never reported as this recipe's
    done = next((tmp_path / "work" / "students").glob("*-80")) / "result.json"
    done.write_text(json.dumps(json.loads(done.read_text()) | {"recipe": "another-5"}))
    proc = run_bench("scale", argv, tmp_path, check=False)
    assert proc.returncode != 0 and "distilled with another recipe" in proc.stderr.strip().splitlines()[-1]


def test_benchmark_overrides_keep_the_configs_held_out_checks():
    """A section given whole (``"distill.final": {...}``) replaced configs/benchmark.yaml's
    eval_every: the headline's and the scale curve's final students had no held-out checks."""
    from bench import headline, scale

    args = argparse.Namespace(smoke=False, cache_dir=None, sizes=[1000], epochs=2, test_texts=100,
                              probe_train=100, pairs=100, precision="fp32", split=None)
    cfg = scale.make_config(args, scale.ROOT / "runs" / "unused")
    assert cfg.distill.final.eval_every == 100 and cfg.data.train_size == 1000  # the split is the largest size
    args.split = 4000  # --split: another run's split, so its teacher states and held-out texts are reused
    assert scale.make_config(args, scale.ROOT / "runs" / "unused").data.train_size == 4000
    args.precision = "bf16"  # --precision reaches the distillation config
    assert scale.make_config(args, scale.ROOT / "runs" / "unused").distill.precision == "bf16"
    hargs = argparse.Namespace(smoke=False, cache_dir=None)
    cfg = headline.make_config(hargs, headline.VARIANTS["full"], headline.ROOT / "runs" / "unused")
    assert cfg.distill.final.eval_every == 100 and cfg.distill.final.epochs == 2

"""bench/headline.py --smoke end to end on a tiny random teacher: correctness, not timing."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_headline_smoke_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("headline", ROOT / "bench" / "headline.py")
    headline = importlib.util.module_from_spec(spec)
    sys.modules["headline"] = headline  # dataclasses look their module up while being defined
    spec.loader.exec_module(headline)
    md = headline.main(["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                        "--cache-dir", str(tmp_path / "cache")])
    df = pd.read_csv(tmp_path / "out" / "headline-smoke.csv")
    kinds = set(df.kind)
    assert {"teacher", "off-the-shelf", "hand-picked", "kd-nas", "floor", "kd-nas int8", "inherited",
            "kd-nas random init"} <= kinds
    # the model2vec row needs model2vec's distillation (model2vec + skeletoken), a bench-only extra
    assert ("static" in kinds) == (importlib.util.find_spec("skeletoken") is not None)
    # MiniLM shape, the truncated and the layer-dropped teacher, teacher depth but narrow
    assert (df.kind == "hand-picked").sum() == 4
    # Every student row has its untrained floor, a latency and scores on the same held-out texts.
    students = df[df.kind.isin(["hand-picked", "random-search", "kd-nas", "kd-nas random init", "static"])]
    assert (df.kind == "floor").sum() == len(students)
    assert students.fp32_ms.gt(0).all() and students.int8_ms.gt(0).all()
    task = [c for c in df.columns if c.endswith(".accuracy")][0]  # the smoke run's classification task
    assert df[task].between(0, 1).all() and df["recall@10"].between(0, 1).all() and "summary" in df.columns
    teacher = df[df.kind == "teacher"].iloc[0]
    assert teacher.speedup_fp32 == pytest.approx(1.0) and teacher["recall@10"] == pytest.approx(1.0)
    text = md.read_text()
    assert "## Against the targets" in text and "every scored text lies outside" in text and "machine:" in text
    assert (tmp_path / "out" / "headline-smoke.png").stat().st_size > 10_000

"""python -m bench.headline --smoke end to end on a tiny random teacher: correctness, not timing."""

import importlib.util
import json
import shutil

import pandas as pd
import pytest

from tests.bench.runner import check_header, run_bench

pytestmark = pytest.mark.bench


def test_headline_smoke_writes_every_row(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--cache-dir", str(tmp_path / "cache")]
    run_bench("headline", argv, tmp_path)
    md = tmp_path / "out" / "headline-smoke.md"
    check_header(md, "headline", argv)
    df = pd.read_csv(tmp_path / "out" / "headline-smoke.csv")
    kinds = set(df.kind)
    assert {"teacher", "off-the-shelf", "hand-picked", "kd-nas", "floor", "kd-nas int8", "inherited",
            "kd-nas random init"} <= kinds
    # the model2vec row needs model2vec's distillation (model2vec + skeletoken), a bench-only extra
    assert ("static" in kinds) == (importlib.util.find_spec("skeletoken") is not None)
    # MiniLM shape, the truncated and the layer-dropped teacher, teacher depth but narrow; at one
    # layer both cuts keep layer 0, and that student is listed (and distilled) once
    hands = df[df.kind == "hand-picked"].model.tolist()
    truncated = [m for m in hands if m.startswith("truncated teacher")]
    dropped = [m for m in hands if m.startswith("layer-dropped teacher")]
    assert len(truncated) == 1 and len(hands) == 3 + len(dropped)
    assert bool(dropped) == (" its first 1 layer(s)" not in truncated[0])
    # Every student row has its untrained floor, a latency and scores on the same held-out texts;
    # MiniLM as shipped has its floor too (one floor rule for every row).
    students = df[df.kind.isin(["hand-picked", "random-search", "kd-nas", "kd-nas random init", "static"])]
    assert (df.kind == "floor").sum() == len(students) + (df.kind == "off-the-shelf").sum()
    assert students.fp32_ms.gt(0).all() and students.int8_ms.gt(0).all()
    task = [c for c in df.columns if c.endswith(".accuracy")][0]  # the smoke run's classification task
    assert df[task].between(0, 1).all() and df["recall@10"].between(0, 1).all() and "summary" in df.columns
    teacher = df[df.kind == "teacher"].iloc[0]
    assert teacher.speedup_fp32 == pytest.approx(1.0) and teacher["recall@10"] == pytest.approx(1.0)
    text = md.read_text()
    assert "## Against the targets" in text and "every scored text lies outside" in text and "machine:" in text
    assert "## Against the inherited start" in text and "over its start" in text
    assert (tmp_path / "out" / "headline-smoke.png").stat().st_size > 10_000
    # --no-random-init, on the same work folder (searches and students reused): no random-init rows;
    # --name names the report (it once went to headline-<variant> whatever the name). With the
    # teacher-state cache evicted, finished students need no teacher pass over the training texts
    # (the resumed searches still build their small proxy and eval states).
    states = tmp_path / "cache" / "teacher_states"
    passes = lambda: [json.loads(m.read_text())["n_texts"] for m in states.glob("*/meta.json")]  # noqa: E731
    train_texts = max(passes())
    shutil.rmtree(states)
    again = ["--smoke", "--no-random-init", "--name", "headline-again", "--out", str(tmp_path / "again"),
             "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache")]
    proc = run_bench("headline", again, tmp_path)
    assert "distilling" not in proc.stdout and max(passes()) < train_texts
    assert not (tmp_path / "again" / "headline-smoke.md").exists()
    kinds = set(pd.read_csv(tmp_path / "again" / "headline-again.csv").kind)
    assert "kd-nas random init" not in kinds and {"kd-nas", "hand-picked"} <= kinds
    text = (tmp_path / "again" / "headline-again.md").read_text()
    assert "no random-init rows (--no-random-init)" in text and "(headline-again.png)" in text
    # A finished student is reused without teacher states only for the texts it was trained on:
    # its result records the splits' fingerprint, and another one is refused, never reported.
    done = next((tmp_path / "work" / "students").glob("*/result.json"))
    assert json.loads(done.read_text())["texts"]
    done.write_text(json.dumps(json.loads(done.read_text()) | {"texts": "other-texts"}))
    proc = run_bench("headline", again, tmp_path, check=False)
    assert proc.returncode != 0 and "distilled with another recipe" in proc.stderr.strip().splitlines()[-1]

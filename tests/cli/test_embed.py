"""`kdnas embed`: texts in (file or stdin), the student's ONNX embeddings out (.npy or JSON lines),
the same as kdnas's own embedding of the saved student."""

import io
import json

import numpy as np
import pytest

from kdnas.cli import main
from kdnas_core.config import load_config
from kdnas_core.evaluate import embed
from kdnas_core.final import distill_student
from kdnas_core.student import load_sentence_student

TEXTS = ["the cat sat on the mat", "a much longer sentence about the weather in the hills today", "ok"]


@pytest.fixture()
def student(tiny_config):
    cfg = load_config(tiny_config)
    return cfg, distill_student(cfg, "L1-H32-A2-F64-gelu", max_steps=2, progress=False)


def test_embed_writes_what_kdnas_computes(student, tmp_path, monkeypatch, capsys):
    cfg, s = student
    model, _ = load_sentence_student(s.path)
    from transformers import AutoTokenizer

    expected = embed(model, AutoTokenizer.from_pretrained(s.path), TEXTS, cfg.data.max_length)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")  # blank lines are skipped
    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", s.path, "--input", str(texts), "--output", str(out)]) == 0  # exports first
    np.testing.assert_allclose(np.load(out), expected, atol=1e-4)

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS)))
    capsys.readouterr()
    assert main(["embed", "--model", s.path, "--precision", "int8"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS and len(rows[0]["embedding"]) == expected.shape[1]


def test_a_wrong_output_suffix_is_one_line(student, tmp_path, capsys):
    _, s = student
    assert main(["embed", "--model", s.path, "--input", str(tmp_path / "none.txt")]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["embed", "--model", s.path, "--output", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a .npy or .jsonl file" in err[0]

"""`kdnas embed`: texts in (file or stdin), the student's ONNX embeddings out (.npy or JSON lines),
the same as kdnas's own embedding of the saved student."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

from kdnas.cli import main
from kdnas_core.config import load_config
from kdnas_core.evaluation.evaluate import embed
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


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdnas: error: "), err
    return err[0]


def test_texts_in_another_encoding_are_one_line_naming_file_offset_and_option(student, tmp_path, capsys):
    """Bytes that are not UTF-8 ended in 'unexpected UnicodeDecodeError', after the export."""
    _, s = student
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the caf\u00e9 on the corner\nok\n".encode("latin-1"))
    capsys.readouterr()
    assert main(["embed", "--model", s.path, "--input", str(latin)]) == 2
    line = _one_error_line(capsys)
    assert f"--input {latin}: not utf-8 text (byte 0xe9 at offset 7)" in line and "--encoding" in line, line
    assert not (Path(s.path) / "model.onnx").exists()  # refused before the export
    assert main(["embed", "--model", s.path, "--input", str(latin), "--encoding", "klingon"]) == 2
    assert "--encoding 'klingon': unknown encoding" in _one_error_line(capsys)
    assert main(["embed", "--model", s.path, "--input", str(latin), "--encoding", "latin-1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the caf\u00e9 on the corner", "ok"]


def test_an_output_that_cannot_be_written_is_refused_before_the_work(student, tmp_path, capsys):
    """A folder named like an output file, or a path under a file, failed after the export and
    the embedding ('unexpected IsADirectoryError'); a missing folder is created."""
    from tests.cli.test_distill import read_only_folder

    _, s = student
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    (tmp_path / "emb.npy" / "mine").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    with read_only_folder(tmp_path / "ro") as ro:
        for out, reason in ((tmp_path / "emb.npy", "is a folder, expected a file"),
                            (tmp_path / "notes.txt" / "e.jsonl", "notes.txt is a file, not a folder"),
                            (ro / "e.npy", "")):
            capsys.readouterr()
            assert main(["embed", "--model", s.path, "--input", str(texts), "--output", str(out)]) == 2
            line = _one_error_line(capsys)
            assert f"--output = '{out}': not writable (" in line and reason in line, line
    assert (tmp_path / "emb.npy" / "mine").is_dir() and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (Path(s.path) / "model.onnx").exists()
    out = tmp_path / "new" / "folder" / "e.npy"
    assert main(["embed", "--model", s.path, "--input", str(texts), "--output", str(out)]) == 0
    assert np.load(out).shape[0] == len(TEXTS)


def test_a_student_without_onnx_files_in_a_read_only_place_is_one_line(student, tmp_path, capsys):
    """The export into the folder failed with 'unexpected OSError'."""
    import shutil

    from tests.cli.test_distill import read_only_folder

    _, s = student
    with read_only_folder(tmp_path / "ro", lambda ro: shutil.copytree(s.path, ro / "s")) as ro:
        capsys.readouterr()
        assert main(["embed", "--model", str(ro / "s"), "--input", str(tmp_path / "t.txt")]) == 2
        assert "--input" in _one_error_line(capsys)
        (tmp_path / "t.txt").write_text("hello")
        assert main(["embed", "--model", str(ro / "s"), "--input", str(tmp_path / "t.txt")]) == 2
        line = _one_error_line(capsys)
        assert f"--model {ro / 's'}: no model.onnx yet, and it cannot be exported into the folder (" in line, line

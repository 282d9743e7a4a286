"""`kdnas evaluate` as a user runs it: a student and another encoder folder in, a table, the
summary lines and the written files out."""

from kdnas.cli import main
from kdnas_core.config import load_config
from kdnas_core.final import distill_student
from kdnas_core.workspace import Workspace


def test_evaluate_prints_the_table_and_each_summary(tiny_config, tmp_path, capsys):
    cfg = load_config(tiny_config)
    student = distill_student(cfg, "L1-H32-A2-F64-gelu", ws=Workspace.prepare(cfg), max_steps=2, progress=False)
    out = tmp_path / "eval"
    capsys.readouterr()
    rc = main(["evaluate", str(student.path), str(tmp_path / "teacher"), "--config", str(tiny_config),
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "| student | L1-H32-A2-F64-gelu |" in printed and "| baseline | teacher |" in printed
    assert "L1-H32-A2-F64-gelu: summary gap closed" in printed and f"written: {out / 'evaluation.md'}" in printed
    assert (out / "evaluation.md").is_file() and (out / "evaluation.csv").is_file()


def _copy_without(src, dest, names):
    import shutil

    shutil.copytree(src, dest)
    for name in names:
        (dest / name).unlink()
    return dest


def test_every_model_folder_that_cannot_be_used_is_refused_before_any_work(tiny_config, tmp_path, capsys, monkeypatch):
    """A Hugging Face folder without tokenizer files loaded with an empty tokenizer (every word
    [UNK]) and was scored as if it were valid; a damaged model2vec folder failed only after the
    teacher's evaluation."""
    import pytest

    from kdnas_core.workspace import Workspace as Ws

    teacher = tmp_path / "teacher"
    tokenizer_files = [p.name for p in teacher.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens"))]
    no_tokenizer = _copy_without(teacher, tmp_path / "no-tokenizer", tokenizer_files)
    no_weights = _copy_without(teacher, tmp_path / "no-weights", ["model.safetensors"])
    m2v = tmp_path / "m2v"
    m2v.mkdir()
    (m2v / "config.json").write_text('{"model_type": "model2vec", "normalize": true}')  # and nothing else
    monkeypatch.setattr(Ws, "prepare", classmethod(lambda cls, cfg: pytest.fail("the teacher was loaded first")))
    for folder, said in ((no_tokenizer, "its tokenizer has"), (no_weights, "no weights"),
                         (m2v, "cannot load as a model2vec model")):
        capsys.readouterr()
        rc = main(["evaluate", str(folder), "--config", str(tiny_config), "--out", str(tmp_path / "eval")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and said in err and str(folder) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "eval").exists()

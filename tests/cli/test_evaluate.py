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

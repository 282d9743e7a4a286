"""`kdnas distill` with an output folder it cannot use: a read-only place, or a folder another
distillation is writing. Each is one line before the teacher loads, and nothing is replaced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from kdnas.cli import main
from kdnas_core.workspace import Workspace

ARCH = "L1-H32-A2-F64-gelu"


@contextmanager
def read_only_folder(path: Path, fill=lambda folder: None):
    """``path``, filled by ``fill``, then read-only: a tmpfs remounted read-only as root (whom
    permissions do not stop), mode 0555 otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        fill(path)
        folders = [path, *(p for p in path.rglob("*") if p.is_dir())]
        for p in folders:
            p.chmod(0o555)
        try:
            yield path
        finally:
            for p in folders:
                p.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fill(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def no_teacher(monkeypatch):
    monkeypatch.setattr(Workspace, "prepare", classmethod(lambda cls, cfg: pytest.fail("the teacher was loaded first")))


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("kdnas: error: "), err
    return err[0]


def test_a_read_only_out_is_refused_before_the_teacher_loads(tiny_config, tmp_path, capsys, monkeypatch):
    """It distilled for the whole run and then failed with 'unexpected OSError'."""
    no_teacher(monkeypatch)
    with read_only_folder(tmp_path / "ro") as ro:
        for out in (ro / "student", ro / "deeper" / "student"):
            capsys.readouterr()
            assert main(["distill", "--arch", ARCH, "--steps", "1", "--config", str(tiny_config), "--out", str(out)]) == 2
            line = one_error_line(capsys)
            assert f"--out = '{out}': not writable (" in line, line
            assert not out.exists()


def test_a_second_distillation_into_the_same_folder_is_refused_naming_the_first(tiny_config, tmp_path, capsys):
    """Both used to print 'saved', and one student silently replaced the other."""
    out = tmp_path / "students" / "s"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from kdnas_core.final import writing_student
        with writing_student({str(out)!r}):
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["distill", "--arch", ARCH, "--steps", "1", "--config", str(tiny_config), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"a distillation into {out} is already running (pid {holder.pid} on " in line, line
        assert not out.exists()
    finally:
        holder.communicate("", timeout=60)
    assert main(["distill", "--arch", ARCH, "--steps", "1", "--config", str(tiny_config), "--out", str(out)]) == 0
    assert (out / "kdnas_arch.json").is_file() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["s"]  # no lock file or temporary folder left


def test_a_users_files_next_to_out_are_never_touched(tiny_config, tmp_path, capsys):
    """--out in a folder of the user's: the student and nothing else is written there."""
    home = tmp_path / "models"
    (home / ".s-backup").mkdir(parents=True)
    (home / ".s-backup" / "keep.txt").write_text("mine")
    shutil.copy(tiny_config, home / "notes.yaml")
    assert main(["distill", "--arch", ARCH, "--steps", "1", "--config", str(tiny_config), "--out", str(home / "s")]) == 0
    assert (home / ".s-backup" / "keep.txt").read_text() == "mine"
    assert (home / "notes.yaml").read_text() == tiny_config.read_text()
    assert sorted(p.name for p in home.iterdir()) == [".s-backup", "notes.yaml", "s"]


def test_files_a_user_added_to_a_student_are_never_deleted(tiny_config, tmp_path, capsys, monkeypatch):
    """Distilling again into a student folder replaced the whole folder: notes and results the
    user had put beside the weights were deleted without a word."""
    out = tmp_path / "s"
    argv = ["distill", "--arch", ARCH, "--steps", "1", "--config", str(tiny_config), "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # its own files, the ONNX exports included, are kdnas's to replace
    (out / "NOTES.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.csv").write_text("task,score\n")
    no_teacher(monkeypatch)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert f"{out}: holds files kdnas did not write (NOTES.md, eval/results.csv)" in line, line
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "eval" / "results.csv").is_file()

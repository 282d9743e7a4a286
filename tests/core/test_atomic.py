"""Atomic writes, kdnas's own temporary folders and full disks (ENOSPC injected; the real
full-disk runs on a small tmpfs are in tests/reliability/test_faults.py)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdnas_core.atomic import (
    PARTIAL_MARKER,
    DiskFullError,
    check_free_space,
    commit_dir,
    damaged_files,
    partial_dir,
    remove_stale_partials,
    write_json,
    write_manifest,
)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_json_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "state.json", {"episode": 1})
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(DiskFullError, match=r"state.json: no space left on the device for state.json .*rerun the same command"):
        write_json(path, {"episode": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "episode": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no .state.json.tmp left


def test_free_space_is_checked_before_a_large_write(tmp_path):
    with pytest.raises(DiskFullError, match=r"MB needed, .* MB free"):
        check_free_space(tmp_path, 1 << 60, "a huge cache")
    check_free_space(tmp_path, 1, "a tiny file")


def test_only_marked_folders_of_dead_writers_are_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = partial_dir(tmp_path, ".x-")
    (stale / PARTIAL_MARKER).write_text(str(dead))
    alive = partial_dir(tmp_path, ".x-")
    (alive / PARTIAL_MARKER).write_text(str(os.getppid()))  # another live process is still writing it
    users = tmp_path / ".x-users-backup"
    users.mkdir()
    mine = partial_dir(tmp_path, ".x-")  # this process's own, in progress
    assert remove_stale_partials(tmp_path, ".x-") == [stale]
    assert alive.is_dir() and users.is_dir() and mine.is_dir()


def test_folders_get_the_users_permissions_not_mkdtemp_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        tmp = partial_dir(tmp_path, ".s-")
        commit_dir(tmp, tmp_path / "s")
    finally:
        os.umask(umask)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755
    assert not (tmp_path / "s" / PARTIAL_MARKER).exists()


def test_the_manifest_names_the_files_that_changed(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * 100)
    (tmp_path / "b.json").write_text("{}")
    assert damaged_files(tmp_path) is None  # saved before manifests existed: trusted
    write_manifest(tmp_path)
    assert damaged_files(tmp_path) == []
    (tmp_path / "a.bin").write_bytes(b"a" * 10)
    (tmp_path / "b.json").unlink()
    assert damaged_files(tmp_path) == ["a.bin", "b.json"]

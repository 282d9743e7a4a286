"""Atomic writes, kdnas's own temporary folders and full disks (ENOSPC injected; the real
full-disk runs on a small tmpfs are in tests/reliability/test_faults.py)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdnas_core.files.atomic import (
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


def test_every_file_of_a_student_gets_the_users_permissions(bert_teacher, tmp_path):
    """safetensors writes model.safetensors (and 2_Dense/model.safetensors) through a private
    temporary file: they were 0600 while the rest of the folder followed the umask."""
    import torch

    from kdnas_core.search.space import StudentArch
    from kdnas_core.sentence import SentenceHead
    from kdnas_core.student import build_student, save_student

    arch = StudentArch(1, 32, 2, 64)
    head = SentenceHead("mean").with_projection(torch.nn.Linear(32, 64), SentenceHead("mean", (), True))
    umask = os.umask(0o027)
    try:
        folder = save_student(build_student(arch, bert_teacher), bert_teacher.tokenizer, arch, tmp_path / "s",
                              head=head)
    finally:
        os.umask(umask)
    modes = {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}
    assert {"model.safetensors", "2_Dense/model.safetensors"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode != (0o750 if (folder / name).is_dir() else 0o640)} == {}


def test_files_written_atomically_get_the_users_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """Two ``kdnas embed --output same.npy`` at once: both wrote into one '.same.npy.tmp', the
    first rename moved it away and the second failed with an unexpected FileNotFoundError."""
    import threading

    from kdnas_core.files.atomic import _write_atomically

    path = tmp_path / "same.txt"
    both_in, both_written = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)
    errors = []

    def writer(text):
        def write(tmp):
            both_in.wait()
            tmp.write_text(text)
            both_written.wait()  # then both rename: the overlap that went wrong, every time

        try:
            _write_atomically(path, write)
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t * 1000,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["same.txt"]


def test_a_folder_in_the_way_of_a_file_is_one_line_and_kept(tmp_path):
    from kdnas_core.errors import KdnasError

    (tmp_path / "out.json" / "mine").mkdir(parents=True)
    with pytest.raises(KdnasError, match=r"out.json: is a folder, expected a file name"):
        write_json(tmp_path / "out.json", {})
    assert (tmp_path / "out.json" / "mine").is_dir()


def test_a_destination_under_a_file_is_refused_without_creating_anything(tmp_path):
    from kdnas_core.files.atomic import check_can_write
    from kdnas_core.errors import KdnasError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KdnasError, match=r"--output = '.*notes.txt/deeper/e.npy': not writable \(.*notes.txt is a file"):
        check_can_write(tmp_path / "notes.txt" / "deeper" / "e.npy", "--output")
    check_can_write(tmp_path / "new" / "deeper" / "e.npy", "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_arrays_written_in_chunks_read_back_the_same(tmp_path):
    import numpy as np

    from kdnas_core.files.atomic import write_npy

    a = np.random.default_rng(0).standard_normal((3000, 7)).astype(np.float32)
    np.testing.assert_array_equal(np.load(write_npy(tmp_path / "a.npy", a)), a)
    np.testing.assert_array_equal(np.load(write_npy(tmp_path / "b.npy", a[:, ::2])), a[:, ::2])  # not contiguous

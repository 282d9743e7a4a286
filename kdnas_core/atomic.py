"""Writes that never leave a half-written file, and temporary folders kdnas can recognise later.

Every folder kdnas builds (a student, a checkpoint, a teacher-state cache) is written into a
temporary sibling and renamed into place. The temporary folder carries a marker file with the
writer's pid, so a later run removes it only when kdnas made it and its writer is gone: a
folder that merely looks like ours by name is never touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdnas_core.errors import KdnasError

PARTIAL_MARKER = ".kdnas-partial"
MANIFEST = ".kdnas-sha256.json"


class DiskFullError(KdnasError):
    pass


def _free_mb(path: Path) -> float:
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return shutil.disk_usage(p).free / 2**20
    return float("nan")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors reports I/O failures as its own error type, with the OS error in the text.
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text


def disk_full_message(path: Path, what: str, needed_mb: float | None = None) -> str:
    need = f"{needed_mb:.0f} MB needed, " if needed_mb is not None else ""
    return (f"{path}: no space left on the device for {what} ({need}{_free_mb(path):.0f} MB free); "
            "free some space and rerun the same command to resume")


@contextmanager
def disk_full_is_one_line(path: Path, what: str) -> Iterator[None]:
    """Turn 'no space left on device' (an OSError, or safetensors' own error) into one line
    that names where and what was being written."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(disk_full_message(path, what)) from None
        raise


def check_free_space(path: Path, needed_bytes: int, what: str) -> None:
    """Refuse before writing when the device cannot hold ``needed_bytes`` (a memory-mapped file
    on a full device kills the process with SIGBUS instead of raising)."""
    free = _free_mb(path)
    if free == free and needed_bytes / 2**20 > free:  # NaN: path unknown, nothing to compare
        raise DiskFullError(disk_full_message(path, what, needed_bytes / 2**20))


def _write_atomically(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_full_is_one_line(path, path.name):
            write(tmp)
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return _write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def write_npy(path: Path, array) -> Path:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return _write_atomically(path, write)


def sha256_file(path: Path) -> str:
    """Content hash of a file, read in 4 MiB chunks: how caches detect damage or tampering."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- folders


def partial_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder to build into, marked as kdnas's with this process's pid.

    mkdtemp makes folders private (0700); the finished folder gets the permissions any other
    folder the user creates would get.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    (tmp / PARTIAL_MARKER).write_text(str(os.getpid()))
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``partial_dir`` into place (its marker removed first)."""
    (Path(tmp) / PARTIAL_MARKER).unlink(missing_ok=True)
    Path(tmp).rename(final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(parent: Path, prefix: str) -> list[Path]:
    """Remove temporary folders under ``parent`` named ``prefix*`` that kdnas marked and whose
    writer is gone (killed, or out of disk). Unmarked folders are left alone, whatever their name."""
    removed = []
    for p in Path(parent).glob(f"{prefix}*") if Path(parent).is_dir() else ():
        marker = p / PARTIAL_MARKER
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def discard_partial(tmp: Path) -> None:
    """Remove a temporary folder this process made (only if it still carries the marker)."""
    if (Path(tmp) / PARTIAL_MARKER).is_file():
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of every file in ``folder`` (or of ``names``), kept in the folder's manifest."""
    folder = Path(folder)
    if names is None:
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARKER)]
    digests = {name: sha256_file(folder / name) for name in names}
    (folder / MANIFEST).write_text(json.dumps(digests, indent=1))
    return digests


def damaged_files(folder: Path) -> list[str] | None:
    """Files of ``folder`` that no longer match its manifest; None when it has no manifest."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return [MANIFEST]
    bad = []
    for name, digest in manifest.items():
        try:
            if sha256_file(Path(folder) / name) != digest:
                bad.append(name)
        except OSError:
            bad.append(name)
    return bad

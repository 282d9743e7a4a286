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


def umask() -> int:
    """This process's umask, read without changing it: ``os.umask`` can only be read by setting
    it, and for that instant another thread (``search.max_parallel``) would create files
    world-writable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_permissions(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a file or folder the
    user creates gets: mkstemp, mkdtemp and safetensors' own temporary files are private (0600),
    which other users of a shared model folder could not read."""
    mask = umask()
    path = Path(path)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def unwritable(path: Path, folder: bool = False) -> str | None:
    """Why the file (or ``folder``) ``path`` could not be written, or None when it can. Nothing
    is created: the nearest existing ancestor is probed with an anonymous temporary file."""
    path = Path(path)
    if not folder and path.is_dir():
        return "is a folder, expected a file"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def check_can_write(path: Path, name: str | None = None, folder: bool = False) -> None:
    """Refuse before the work, in one line naming ``path`` (and the option ``name``), a
    destination that cannot be written: found at the end, it cost the whole run."""
    reason = unwritable(path, folder)
    if reason is not None:
        where = f"{name} = {str(path)!r}" if name else str(path)
        raise KdnasError(f"{where}: not writable ({reason})")


def temporary_sibling(path: Path) -> Path:
    """An empty file next to ``path`` to write into and rename: named per writer, so two
    processes writing the same file never write into one temporary file (the later rename
    then moved a file the other was still writing, and the other's rename failed)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _write_atomically(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():  # rename cannot replace a folder, and the folder is not ours to remove
        raise KdnasError(f"{path}: is a folder, expected a file name")
    tmp = None
    try:
        with disk_full_is_one_line(path, path.name):
            tmp = temporary_sibling(path)
            write(tmp)
            user_permissions(tmp)
            tmp.replace(path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return _write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent))


def write_npy(path: Path, array) -> Path:
    import numpy as np

    class _Chunks:
        """Not a real file to numpy, so it writes in chunks through ``write``: its fast path
        (``tofile``) reports a full disk as '... requested and ... written', without errno,
        which read as an unexpected error instead of a full disk."""

        def __init__(self, f):
            self.write = f.write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(_Chunks(f), array, allow_pickle=False)

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
    user_permissions(tmp)
    (tmp / PARTIAL_MARKER).write_text(str(os.getpid()))
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished ``partial_dir`` into place (its marker removed first), every file in it
    with the user's permissions."""
    (Path(tmp) / PARTIAL_MARKER).unlink(missing_ok=True)
    user_permissions(tmp)
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


def adopt_stale_partial(parent: Path, prefix: str, needs: str) -> Path | None:
    """A temporary folder under ``parent`` named ``prefix*`` that kdnas marked, whose writer is
    gone and that holds ``needs`` (the writer's saved progress): marked as this process's and
    returned, so that a long build resumes where it was stopped instead of starting again."""
    for p in sorted(Path(parent).glob(f"{prefix}*")) if Path(parent).is_dir() else ():
        marker = p / PARTIAL_MARKER
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid) and (p / needs).is_file():
            marker.write_text(str(os.getpid()))
            return p
    return None


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

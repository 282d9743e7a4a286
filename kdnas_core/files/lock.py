"""One process per search folder or student folder: a second writer is refused, clearly.

``fcntl.flock`` locks belong to the open file, so the kernel releases them when the holder dies,
even by kill -9: a crashed search never leaves a stale lock behind. (Locks are per host; on a
shared network file system two hosts can still start the same search.)
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdnas_core.errors import KdnasError


class AlreadyRunning(KdnasError):
    pass


def _open_locked(path: Path, what: str):
    """``path`` opened and locked, or AlreadyRunning naming the holder. A lock file that is
    removed when its holder finishes (``remove=True``) may be unlinked between our open and our
    flock: then we hold a lock nobody else can see, so we try again on the file now there."""
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise AlreadyRunning(f"{what} is already running ({holder}); wait for it or stop it, then rerun "
                                 f"to resume ({path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()


@contextmanager
def exclusive(folder: Path, what: str, name: str = ".lock", remove: bool = False) -> Iterator[None]:
    """Hold the lock file ``folder/name`` while the block runs. ``remove``: delete the lock file
    afterwards, for a lock that sits next to a folder of the user's choosing (a student's
    ``--out``), where a file left behind would be litter."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    f = _open_locked(path, what)
    try:
        f.seek(0)
        f.truncate()
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {now}")
        f.flush()
        yield
    finally:
        if remove:  # while still held: the next writer then creates and locks a new file
            path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

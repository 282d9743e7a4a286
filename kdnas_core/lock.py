"""One process per search folder: a second start of the same search is refused, clearly.

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


@contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
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
        f.seek(0)
        f.truncate()
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {now}")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()

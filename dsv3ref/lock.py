"""One writer at a time: an exclusive lock on a destination, which a dead process cannot leave stuck.

The lock is a file beside the destination (`.DST.lock`) that names its holder (process id, host, start
time), held with `flock` while the work runs. The kernel releases an flock when its process dies, so
a lock file left by a killed writer is recognized as stale (nobody holds it) and taken over, and the
takeover is said with the dead holder's name; a live holder makes the second writer stop at once
with an error naming it. (A lock file created with O_EXCL alone cannot tell a live holder from a
dead one without guessing from process ids, which other hosts and reused ids defeat.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(OSError):
    """Another process holds the lock: its message names the lock file and the holder."""


def _holder(fd: int) -> str:
    """Who a lock file says holds it, in words ("" for an empty file)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} (since {info['started']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return repr(text[:80]) if text else ""


@contextmanager
def exclusive(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold the lock `lock_file` for the duration of the block; LockHeldError at once if another process
    holds it. what: the work it guards, in words, for the messages. The file is removed on exit."""
    lock_file = Path(lock_file)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            os.close(fd)
            raise LockHeldError(f"{what}: {holder} is doing it (lock {lock_file}); wait for it to finish") from None
        try:  # the holder before us may have removed the file between our open and flock: lock the new one
            current = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        stale = _holder(fd)
        if stale:
            print(f"{what}: the lock {lock_file} was left by {stale}, which is no longer running; taking it over",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(fd)

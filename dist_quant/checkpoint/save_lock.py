"""One run per save_path: an exclusive lock on ``save_path/.dist_quant.lock`` for the whole run.

Two runs writing into one folder would publish a mixture of both. The lock is an ``flock`` on a file inside
save_path, held by the driver process until it publishes or gives up; the kernel drops it when the process dies,
so a killed run never blocks the next one. The file records who holds it (host, pid, start time, command), which
the second run's error repeats.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from dist_quant.errors import OutputError

LOCK_FILE = ".dist_quant.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"host {info['host']}, pid {info['pid']}, started {info['started']}"
                f" ({' '.join(map(str, info.get('command', [])))[:200]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


class SaveLock:
    """Held from construction until ``release()`` (or the end of the process)."""

    def __init__(self, save_path: Path):
        self.path = save_path / LOCK_FILE
        while True:
            try:  # a read-only file system, a folder without write permission (EROFS, EACCES...)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise OutputError(f"cannot create the lock file {self.path}: {error.strerror}; choose a save_path "
                                  "you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"save path {save_path} is in use by another dist-quant run ({_holder(self.path)}); "
                                  "wait for it to finish, or choose another save_path") from None
            except OSError as error:
                os.close(fd)
                raise OutputError(f"cannot lock {self.path}: {error.strerror}; choose a save_path on a filesystem "
                                  "that supports file locks") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

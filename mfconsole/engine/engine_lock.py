"""One engine per data directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "engine.lock"


class EngineError(Exception):
    """A reason the engine cannot start, phrased for the operator."""


class DataDirLock:
    """One engine per data_dir: an exclusive flock on ``data_dir/engine.lock``.
    The kernel drops it when the process dies, so a crash never leaves a stale lock."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(self.path.parent)
            os.close(fd)
            raise EngineError(
                f"another mfconsole engine{f' (pid {holder})' if holder else ''} is already "
                f"serving {self.path.parent}; stop it first, or attach the console to it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def holder_pid(data_dir: Path) -> int | None:
    """PID of the engine serving ``data_dir``, or None when none is."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

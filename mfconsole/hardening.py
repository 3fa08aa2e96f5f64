"""Process hardening, applied once at the start of `mfconsole serve` and of the console.

The engine holds decrypted objects, patient fields and the store key in memory, so:

- no core dumps: RLIMIT_CORE is 0 (soft and hard, so nothing in the process can raise
  it again) and the process is not dumpable (``PR_SET_DUMPABLE`` 0: no core even from
  a kernel core pattern that pipes to a helper; ``/proc/PID`` becomes root's and other
  processes of the same user cannot ptrace it or read its memory). The process itself
  keeps reading its own ``/proc/self``; SO_PEERCRED on the control socket is unaffected.
- uncaught exceptions (main thread, other threads, "unraisable" ones in ``__del__``)
  are logged as their class and the innermost frame that raised them, never their
  message or traceback: pydicom and others quote raw element bytes in messages.

Linux only for the dump settings; elsewhere they are skipped quietly.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any

log = logging.getLogger("mfconsole.crash")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3

_installed = False


def harden() -> None:
    """Everything below; safe to call more than once."""
    global _installed
    disable_core_dumps()
    # A logging call that fails would print the record, arguments and all, to stderr.
    logging.raiseExceptions = False
    if not _installed:
        install_excepthooks()
        _installed = True


def disable_core_dumps() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def is_dumpable() -> bool | None:
    """PR_GET_DUMPABLE for this process (None where it cannot be asked)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return None


def describe(exc_type: type[BaseException] | None, tb: TracebackType | None) -> str:
    """'ValueError at mfconsole.x.func line 12': the exception class and the innermost
    frame of its traceback. Names of code, never values."""
    name = getattr(exc_type, "__qualname__", None) or getattr(exc_type, "__name__", "exception")
    module = getattr(exc_type, "__module__", "builtins")
    what = name if module in ("builtins", "__main__", None) else f"{module}.{name}"
    site = raised_at(tb)
    return f"{what} at {site}" if site else what


def raised_at(tb: TracebackType | None) -> str:
    """'module.function line N' of the innermost frame of a traceback ('' without one)."""
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{tb.tb_frame.f_globals.get('__name__', '?')}.{code.co_name} line {tb.tb_lineno}"


def _excepthook(exc_type: type[BaseException], exc: BaseException | None,
                tb: TracebackType | None) -> None:
    log.critical("uncaught exception, the process ends: %s", describe(exc_type, tb))


def _threading_excepthook(args: Any) -> None:
    if args.exc_type is SystemExit:       # what the default hook ignores too
        return
    thread = args.thread.name if args.thread is not None else "?"
    log.error("uncaught exception in thread %s: %s", thread, describe(args.exc_type, args.exc_traceback))


def _unraisablehook(args: Any) -> None:
    log.error("exception ignored (%s): %s", getattr(args.object, "__qualname__", None)
              or type(args.object).__name__, describe(args.exc_type, args.exc_traceback))


def install_excepthooks() -> None:
    sys.excepthook = _excepthook
    threading.excepthook = _threading_excepthook
    sys.unraisablehook = _unraisablehook

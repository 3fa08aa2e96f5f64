"""Logging with PHI redaction.

Every log file (the current one and the rotated ones) is created 0600, whatever the
umask: opened with os.open(…, 0o600) and re-moded, so an older 0644 file is narrowed.

Our own INFO+ messages carry only routing-safe identifiers by construction. Third-party
libraries (pynetdicom, pydicom, warnings) are not trusted: their records pass a filter
that removes quoted values and byte strings, which is where a patient name would appear
("Invalid value for VR PN: 'DOE^JOHN'"), and exception tracebacks from them are reduced
to the exception type.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path

# Rotation: 10 MiB × 10 (module attributes, read at setup, so a test can make it small).
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 10
FILE_MODE = 0o600

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*"|\(\d+ bytes?\)""")
# Bare values after "value"/"name"/"=": a conservative catch for unquoted reprs.
_AFTER_VALUE = re.compile(r"(?i)\b(value|name|id)\s*[:=]\s*\S+")


def redact(text: str) -> str:
    text = _QUOTED.sub("<redacted>", text)
    return _AFTER_VALUE.sub(lambda m: f"{m.group(1)}=<redacted>", text)


class RedactingFilter(logging.Filter):
    """Applied on handlers so every record, whoever logged it, is checked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("mfconsole"):
            return True
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg += f" [{type(exc).__name__}]" if exc else ""
            record.exc_info = None
            record.exc_text = None
        record.stack_info = None
        return True


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files are 0600 from their creation on. Rotation renames
    (the mode travels with the file) and opens the new file through ``_open`` again."""

    def _open(self):  # type: ignore[override]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
                os.fchmod(fd, FILE_MODE)        # a file from before, or made by someone else
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


def quiet_third_parties() -> None:
    """Quiet the third-party loggers (pynetdicom is a library of codecs and UIDs here:
    nothing in the engine associates through it)."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def setup(log_dir: Path, level: str = "INFO", *, stderr: bool = True) -> logging.Handler:
    """Log to ``log_dir/mfconsole.log`` (rotated) and optionally stderr."""
    quiet_third_parties()
    log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    root = logging.getLogger()
    threshold = getattr(logging, level.upper(), logging.INFO)
    # The root level, not only the handlers': below it, records are never even built
    # (a per-object DEBUG line would otherwise cost GIL time on every C-STORE).
    root.setLevel(threshold)
    for h in list(root.handlers):
        if getattr(h, "_mfconsole", False):
            root.removeHandler(h)
            h.close()
    formatter = logging.Formatter(FORMAT)
    base = log_dir / "mfconsole.log"
    # Rotated files left by an older version may be 0644: narrow them too.
    for old in log_dir.glob("mfconsole.log.*"):
        if old.is_file() and not old.is_symlink() and old.stat().st_mode & 0o077:
            old.chmod(FILE_MODE)
    file_handler = PrivateRotatingFileHandler(base, maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT,
                                              encoding="utf-8")
    handlers: list[logging.Handler] = [file_handler]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setLevel(threshold)
        h.setFormatter(formatter)
        h.addFilter(RedactingFilter())
        h._mfconsole = True  # type: ignore[attr-defined]
        root.addHandler(h)
    return file_handler

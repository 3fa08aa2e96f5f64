"""A credential kept in a file (a bearer token, a password): read at each use, so a
rotation needs no restart. One line; the message of a failure names the key, never
the value. Imports nothing of mfconsole: destinations' HTTP plumbing and the alert
channels both read their credentials with it."""

from __future__ import annotations

from pathlib import Path


class SecretFileError(ValueError):
    """The file cannot be used; the message names the key and why."""


def read_secret(path: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"cannot read {key}: "
                              f"{getattr(exc, 'strerror', None) or exc.__class__.__name__}") from None
    if not value:
        raise SecretFileError(f"{key} is empty")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise SecretFileError(f"{key} holds control characters (one line expected)")
    return value

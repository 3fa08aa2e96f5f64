"""The checks every section of config.toml validates its numbers with: each returns
None when the value is fine, else why (the reader puts the key path in front).
Imports nothing of mfconsole: config.py and the modules that read their own
sections ([health], [audit_export], [alerts]) share them without a circle."""

from __future__ import annotations


def port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def not_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"

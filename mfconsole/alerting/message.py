"""What an alert says: a subject derived from the condition's key and whether it
started or cleared, and a body of routing-safe words (the problem's text from
mfconsole/health.py, names, times and the host). Never a UID or a DICOM value: the
texts it is made of carry none.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

STARTED, CLEARED = "started", "cleared"
SUBJECT_PREFIX = "[mfconsole]"

# Conditions whose pair reads better as two words of their own than as started/cleared.
_PAIRS = {
    "destination_down": ("down", "recovered"),
    "listener_down": ("down", "recovered"),
    "engine_down": ("down", "recovered"),
}


@dataclass(frozen=True)
class Message:
    """One message of the outbox, as a channel sends it."""
    id: int                 # the outbox row: receivers may deduplicate on it
    key: str                # the condition (health.Problem.key)
    kind: str               # STARTED or CLEARED
    subject: str
    text: str
    created_at: float

    @classmethod
    def of(cls, row: Any) -> "Message":
        return cls(id=row["id"], key=row["key"], kind=row["kind"], subject=row["subject"],
                   text=row["text"], created_at=row["created_at"])


def subject(key: str, kind: str) -> str:
    """``[mfconsole] pacs down`` / ``[mfconsole] pacs recovered``; other conditions
    name what they are about and the word started or cleared, e.g. ``[mfconsole]
    pacs dead letters started``, ``[mfconsole] store space cleared``."""
    what, _, about = key.partition(":")
    if what in _PAIRS:
        word = _PAIRS[what][0 if kind == STARTED else 1]
        return f"{SUBJECT_PREFIX} {about or what.split('_')[0]} {word}"
    label = what.replace("_", " ")
    return f"{SUBJECT_PREFIX} {f'{about} ' if about else ''}{label} {kind}"


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(at))


def body(kind: str, text: str, since: float, now: float) -> str:
    """The text of a message: the condition as last seen, since when, and where."""
    host = socket.gethostname()
    if kind == STARTED:
        lines = [text, f"since {stamp(since)} (on {host})"]
    else:
        lines = [f"cleared: {text}", f"from {stamp(since)} to {stamp(now)} (on {host})"]
    return "\n".join(lines)

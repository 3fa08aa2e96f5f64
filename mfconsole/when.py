"""Points in time as an operator writes them, for every filter that takes one (the
CLI's --since/--until, the console's since:/until:): ``30m``, ``2h``, ``1d`` ago, an
ISO date or date-time (local time), or seconds since the epoch."""

from __future__ import annotations

import re
import time
from datetime import datetime

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def ago(text: str, now: float | None = None) -> float | None:
    """``2h`` → the epoch time two hours before ``now``; None when ``text`` is not
    such a duration."""
    m = _AGO.match(text.strip())
    return None if m is None else (now or time.time()) - float(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str | float | None, now: float | None = None) -> float | None:
    """Epoch seconds (None for nothing); ValueError naming the forms it accepts."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    relative = ago(text, now)
    if relative is not None:
        return relative
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is not a time: write 30m, 2h, 1d (ago), 2026-12-04 or "
                         "2026-12-04T08:30") from None

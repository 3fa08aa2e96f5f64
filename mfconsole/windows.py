"""Delivery windows of a destination: when its workers may send, in the server's local
time.

```toml
windows = ["Mon-Fri 18:00-07:00", "Sat-Sun 00:00-24:00"]   # only inside one of these
blackout = ["Mon 02:00-03:00"]                              # never inside one of these
```

A range is ``[DAYS ]HH:MM-HH:MM``. DAYS (optional: every day) are English day names
of three letters, any case, as a range or list: ``Mon-Fri``, ``Sat,Sun``,
``Fri-Mon`` (wraps over the week), ``Mon,Wed-Fri``. A range whose end is before its
start wraps midnight and ends on the next day: ``Fri 22:00-06:00`` is from Friday
22:00 to Saturday 06:00 (the days name the day a range starts). ``24:00`` is the end
of a day; ``00:00-24:00`` the whole day. The start is inside a range, the end is not.

A destination with ``windows`` sends only while one of them is open; ``blackout``
ranges close it whatever ``windows`` say. This module imports nothing of mfconsole:
config.py reads the keys with it, the engine's pacing and ``status`` ask the same
``Schedule`` whether it is open now and when that changes next.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(?:(?P<days>[A-Za-z][A-Za-z,\- ]*?)\s+)?"
                    r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")
_EXAMPLE = 'e.g. "18:00-07:00" or "Mon-Fri 08:00-18:00"'
# How far ahead next_change looks: a week covers every weekly schedule.
_HORIZON_DAYS = 8


@dataclass(frozen=True)
class Range:
    """One range: from ``start`` to ``end`` (minutes of the day; end may be 1440, and
    below start when it wraps midnight), starting on ``days`` (0 = Monday)."""
    days: frozenset[int]
    start: int
    end: int
    text: str

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Wraps midnight: the evening of a starting day, or the morning after one.
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


def parse(text: str) -> tuple[Range | None, str | None]:
    """(range, None), or (None, why ``text`` is not one)."""
    found = _RANGE.match(text) if isinstance(text, str) else None
    if found is None:
        return None, f"is not a time range: {_EXAMPLE}"
    days, why = _days(found["days"]) if found["days"] else (frozenset(range(7)), None)
    if why:
        return None, why
    start, why_start = _minute(found["start"], end=False)
    end, why_end = _minute(found["end"], end=True)
    if why_start or why_end:
        return None, why_start or why_end
    if start == end:
        return None, "starts where it ends: an empty range (00:00-24:00 is a whole day)"
    return Range(days, start, end, text.strip()), None


def _minute(text: str, *, end: bool) -> tuple[int, str | None]:
    hours, minutes = (int(x) for x in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        return 0, (f"'{text}' is not a time of day (00:00 to 23:59"
                   + (", or 24:00 for the end of the day)" if end else ")"))
    return hours * 60 + minutes, None


def _days(text: str) -> tuple[frozenset[int], str | None]:
    out: set[int] = set()
    for part in text.replace(" ", "").lower().split(","):
        ends = part.split("-")
        if len(ends) > 2 or not all(e in DAYS for e in ends):
            return frozenset(), (f"'{text.strip()}' are not days: three-letter English day "
                                 "names, as a range or a list (Mon-Fri, Sat,Sun)")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(out), None


@dataclass(frozen=True)
class Schedule:
    """A destination's ``windows`` and ``blackout``; open when inside a window (or no
    windows are given) and inside no blackout range."""
    windows: tuple[Range, ...] = ()
    blackout: tuple[Range, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.windows or self.blackout)

    def open_at(self, ts: float) -> bool:
        local = time.localtime(ts)
        weekday, minute = local.tm_wday, local.tm_hour * 60 + local.tm_min
        if self.windows and not any(r.contains(weekday, minute) for r in self.windows):
            return False
        return not any(r.contains(weekday, minute) for r in self.blackout)

    def next_change(self, ts: float) -> float | None:
        """When open_at changes next after ``ts`` (a range boundary, local time), or
        None when it never does (e.g. one range of every day, 00:00-24:00)."""
        now = self.open_at(ts)
        midnight = datetime.fromtimestamp(ts).replace(hour=0, minute=0, second=0, microsecond=0)
        minutes = sorted({m % 1440 for r in (*self.windows, *self.blackout) for m in (r.start, r.end)})
        for day in range(_HORIZON_DAYS):
            for minute in minutes:
                # Naive local time to a timestamp: a boundary in a DST gap lands an hour
                # off, which open_at then judges for what it is.
                at = (midnight + timedelta(days=day, minutes=minute)).timestamp()
                if at > ts and self.open_at(at) != now:
                    return at
        return None


def schedule(windows: tuple[str, ...] = (), blackout: tuple[str, ...] = ()) -> Schedule:
    """The schedule of valid range texts (config.py has checked them)."""
    def ranges(texts: tuple[str, ...]) -> tuple[Range, ...]:
        return tuple(r for r in (parse(t)[0] for t in texts) if r is not None)
    return Schedule(ranges(windows), ranges(blackout))


def describe(ts: float | None) -> str:
    """A boundary in words an operator reads: "18:00", or "Sat 18:00" beyond today."""
    if ts is None:
        return ""
    at, today = time.localtime(ts), time.localtime()
    clock = time.strftime("%H:%M", at)
    if (at.tm_year, at.tm_yday) == (today.tm_year, today.tm_yday):
        return clock
    return f"{DAYS[at.tm_wday].capitalize()} {clock}"

"""Pacing of one destination: its delivery windows and its rate cap, shared by all its
worker threads (engine/delivery.py asks before every claim and every send).

Windows (mfconsole/windows.py) are judged on the server's local time: outside them the
workers claim nothing, so nothing is sent and no attempt is counted; a round under way
stops before its next send. ``urgent_ignores_window`` lets urgent deliveries through
(``window`` says "urgent only").

The rate cap is a schedule of send times, not a bucket of saved-up tokens: each send
reserves the next slot, at least ``objects / max_objects_per_s`` (and ``bytes /
max_mb_per_s``) after the previous one, so no burst ever exceeds the cap and an idle
spell saves nothing up. A send that is late (a slow peer, a commit) does not make
the next one early: the cap is a ceiling, never a target. The clocks are
parameters, so tests judge windows at any hour.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

MIB = 1024 * 1024
# With a cap, a group (a run of pipelined C-STOREs, a STOW request) holds what the cap
# lets through in this long, at least one object: the sends spread over the second
# instead of leaving in bursts.
GROUP_S = 0.1

OPEN, CLOSED, URGENT_ONLY = "open", "closed", "urgent only"


class Pacer:
    def __init__(self, destination: Any, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.schedule = destination.schedule()
        self.urgent_ignores_window = destination.urgent_ignores_window
        self.objects_per_s: float | None = destination.max_objects_per_s
        self.bytes_per_s: float | None = (destination.max_mb_per_s * MIB
                                          if destination.max_mb_per_s else None)
        self.clock, self.monotonic = clock, monotonic
        self._lock = threading.Lock()
        self._next = 0.0          # monotonic time of the next free send slot

    @property
    def capped(self) -> bool:
        return bool(self.objects_per_s or self.bytes_per_s)

    # -- windows -------------------------------------------------------------------

    def window(self, in_order: bool = False) -> str:
        """OPEN, CLOSED, or URGENT_ONLY (closed, but urgent deliveries may go; never on
        an in-order destination, where they would overtake)."""
        if not self.schedule or self.schedule.open_at(self.clock()):
            return OPEN
        return URGENT_ONLY if self.urgent_ignores_window and not in_order else CLOSED

    def seconds_to_change(self) -> float:
        """Until the window opens or closes next (an hour when it never does)."""
        now = self.clock()
        at = self.schedule.next_change(now) if self.schedule else None
        return 3600.0 if at is None else max(0.0, at - now)

    # -- the rate cap --------------------------------------------------------------

    def group_limits(self, max_count: int, max_bytes: int) -> tuple[int, int]:
        """A sender's (objects, bytes) per group, cut to GROUP_S worth of the cap."""
        if self.objects_per_s:
            max_count = max(1, min(max_count, int(self.objects_per_s * GROUP_S)))
        if self.bytes_per_s:
            cut = max(1, int(self.bytes_per_s * GROUP_S))
            max_bytes = min(max_bytes, cut) if max_bytes else cut
        return max_count, max_bytes

    def reserve(self, objects: int, nbytes: int) -> float:
        """Reserve the next send slot for ``objects`` objects of ``nbytes``: the
        seconds to wait before sending them (0 without a cap)."""
        if not self.capped:
            return 0.0
        cost = max(objects / self.objects_per_s if self.objects_per_s else 0.0,
                   nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        with self._lock:
            now = self.monotonic()
            start = max(now, self._next)
            self._next = start + cost
        return start - now

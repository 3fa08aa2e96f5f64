"""Study-stable delivery: a destination with trigger = "study_stable" gets a study at
a time, once no instance of it has arrived for ``stable_after_s``.

At ingest (engine/store.py) each delivery to such a destination is made ``held`` in
the object's own commit, and one upsert per object keeps the study's hold row
(repository ``study_holds``): the last arrival and the release time, pushed back by
each new instance. Times are wall-clock and stored, so a restart (even kill -9) keeps
the timer: the study is released at the time it would have been.

Worker 0 of the destination (engine/delivery.py) releases the studies whose time has
passed, in one transaction: their held deliveries become pending, due at one time per
study (in release order) so that the claim finds each study's deliveries together; a
study-stable destination's claim then takes whole studies (outbox.claim), and a
study-level handler runs once over them (engine/transform.py). It wakes for the
earliest release time it knows of (``ReleaseClock``), not by polling the table.

A late instance (its study already released) follows the destination's
late_instance: "alone" (pending at once, sent by itself) or "update" (held again as
a new group of the study; when released, a study-level handler runs again on every
object of the study sent so far plus the late ones).

A destination that is no longer study-stable (a reload switched it to "instance", or
removed it) has everything it holds released at once: nothing stays held for a
trigger nobody runs.
"""

from __future__ import annotations

import threading
import time

from mfconsole.repository import Tx

# The due times of the studies released together differ by this much, in release
# order: the claim (ordered by due time, then id) finds each study's deliveries
# together even when their instances arrived interleaved.
STUDY_STEP_S = 1e-6


def release(tx: Tx, destination: str, everything: bool = False,
            now: float | None = None) -> float | None:
    """Release the destination's studies whose time has passed (``everything``: all
    it holds, whatever their time), each with an audit row; the earliest release
    time still ahead (None: nothing held)."""
    now = now or time.time()
    due = tx.holds_due(destination, float("inf") if everything else now)
    for n, hold in enumerate(due):
        at = now - (len(due) - n) * STUDY_STEP_S
        released = tx.release_study(destination, hold["study_uid"], now, at)
        quiet = now - hold["last_at"]
        why = ("the destination is no longer study-stable" if everything and hold["release_at"] > now
               else f"quiet for {quiet:.1f} s")
        tx.audit("study_released", ts=now, destination=destination, status="update"
                 if hold["updating"] else None,
                 detail=f"study {hold['study_uid']}: {released} held deliveries queued "
                        f"({why}{'; a late group of a study released before' if hold['updating'] else ''})")
    if everything:
        stray = tx.release_stray_held(destination, now)
        if stray:
            tx.audit("study_released", ts=now, destination=destination,
                     detail=f"{stray} held deliveries with no hold under way queued")
    return None if everything else tx.next_release(destination)


class ReleaseClock:
    """When worker 0 should next release studies: never later than the earliest
    release time stored (a lower bound: a study pushed back since is simply looked
    at again). ``due`` is a comparison, no query; ``noted`` is what ingest tells it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at: float | None = 0.0     # 0: look at the table at the first round
        # The earliest hold noted since the last ``set``: a release under way may not
        # have seen it (committed after its query), so ``set`` keeps it.
        self._noted: float | None = None

    def due(self, now: float) -> bool:
        at = self._at
        return at is not None and at <= now

    def noted(self, release_at: float) -> None:
        """A delivery was held until about ``release_at``."""
        with self._lock:
            self._at = release_at if self._at is None else min(self._at, release_at)
            self._noted = release_at if self._noted is None else min(self._noted, release_at)

    def set(self, at: float | None) -> None:
        """What ``release`` returned (the earliest release time it left in the table)."""
        with self._lock:
            noted, self._noted = self._noted, None
            self._at = noted if at is None else at if noted is None else min(at, noted)

    def seconds(self, now: float) -> float | None:
        at = self._at
        return None if at is None else max(0.0, at - now)

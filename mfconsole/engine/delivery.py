"""Delivery workers: per destination, ``max_associations`` threads that claim due
deliveries, send them, and record each outcome (outbox.record applies the
classification: delivered, retry with backoff, dead letter, or pause).

A worker claims a small batch, sends it over one reused association, then records
all outcomes in one store call. A destination-scope failure (peer down, rejected
association) stops the batch: the rest goes back untouched, so one outage costs one
attempt, not one per queued object. A message-scope failure dead-letters (or
retries) that delivery only and the batch goes on: a poison object never blocks
the objects behind it.

Worker 0 always works the queue. The others only join when the backlog is deeper than
what the workers before them hold, and an association they cannot open is not held
against the destination: many PACS take one association at a time (DCMTK storescp
without --fork simply does not answer a second one), and the extra workers must not
turn that into retries and a "down" destination.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

from mfconsole.engine import outbox
from mfconsole.engine.outcomes import DESTINATION, MESSAGE, PERMANENT, TRANSIENT, Outcome
from mfconsole.engine.store import Store
from mfconsole.engine.vault import VaultError

log = logging.getLogger("mfconsole.delivery")

BATCH = 32
IDLE_POLL_S = 0.25


class Sender(Protocol):
    def send(self, obj: Any) -> Outcome: ...
    def close(self) -> None: ...
    def close_if_idle(self, idle_s: float) -> None: ...


class DestinationWorkers:
    """The worker threads of one destination, and the event that wakes them."""

    def __init__(self, destination: Any, store: Store, make_sender: Callable[[], Sender],
                 make_outbound: Callable[[outbox.Claimed, bytes], Any]):
        self.cfg = destination
        self.name = destination.name
        self.store = store
        self.make_sender = make_sender
        self.make_outbound = make_outbound
        self.policy = outbox.Policy(destination.retry_initial_s, destination.retry_max_s,
                                    destination.down_after, destination.bounded_attempts)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = 0

    def start(self) -> None:
        for i in range(self.cfg.max_associations):
            t = threading.Thread(target=self._run, args=(i,), name=f"deliver-{self.name}-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _wait(self, seconds: float) -> None:
        self.wake.wait(max(0.0, min(seconds, 1.0)))
        self.wake.clear()

    def _run(self, index: int) -> None:
        sender = self.make_sender()
        idle_s = getattr(self.cfg, "idle_timeout_s", 30.0)
        try:
            while not self._stop.is_set():
                try:
                    busy = self._round(sender, index)
                except Exception as exc:   # never let a worker die silently
                    log.error("destination %s: worker error %s; retrying in 1 s",
                              self.name, exc.__class__.__name__)
                    sender.close()
                    self._stop.wait(1.0)
                    continue
                if not busy:
                    sender.close_if_idle(idle_s)
                    self._wait(IDLE_POLL_S)
        finally:
            sender.close()

    def _round(self, sender: Sender, index: int) -> bool:
        """One claim-send-record round; False when there was nothing to do."""
        st = outbox.state(self.store.reader(), self.name)
        if st.paused:
            sender.close()
            self._wait(1.0)
            return True
        wait = st.next_attempt_at - time.time()
        if wait > 0:
            sender.close()
            self._wait(wait)
            return True
        if index > 0 and (st.down or outbox.due_count(self.store.reader(), self.name,
                                                          limit=index * BATCH + 1) <= index * BATCH):
            return False
        # A destination marked down is probed with one object at a time.
        items = self.store.call(outbox.claim, self.name, 1 if st.down else BATCH)
        if not items:
            return False
        results: list[tuple[outbox.Claimed, Outcome]] = []
        untouched: list[int] = []
        for i, item in enumerate(items):
            if self._stop.is_set():
                untouched = [x.delivery_id for x in items[i:]]
                break
            outcome = self._attempt(sender, item)
            if index > 0 and not results and outcome.scope == DESTINATION \
                    and outcome.persistence == TRANSIENT:
                # An extra association the peer would not give: leave it to worker 0.
                self.store.call(lambda conn: outbox.release(conn, [x.delivery_id for x in items]))
                self._stop.wait(self.policy.retry_initial_s)
                return True
            results.append((item, outcome))
            if not outcome.is_success and outcome.scope == DESTINATION:
                untouched = [x.delivery_id for x in items[i + 1:]]
                break
        self.store.call(self._record, results, untouched)
        for item, outcome in results:
            if outcome.is_success:
                self.sent += 1
            else:
                log.warning("destination %s: %s for %s (delivery %d): %s", self.name, outcome.label,
                            item.sop_instance_uid, item.delivery_id, outcome.reason)
        return True

    def _attempt(self, sender: Sender, item: outbox.Claimed) -> Outcome:
        try:
            data = self.store.read_object(item.object_id)
        except (KeyError, VaultError, OSError) as exc:
            return Outcome(PERMANENT, MESSAGE, "unreadable",
                           f"stored object {item.object_id} cannot be read ({exc.__class__.__name__})")
        return sender.send(self.make_outbound(item, data))

    def _record(self, conn: Any, results: list[tuple[outbox.Claimed, Outcome]],
                untouched: list[int]) -> None:
        for item, outcome in results:
            outbox.record(conn, self.name, item, outcome, self.policy)
        outbox.release(conn, untouched)

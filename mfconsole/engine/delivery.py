"""Delivery workers: per destination, ``max_associations`` threads that claim due
deliveries, send them, and record each outcome (outbox.record applies the
classification: delivered, retry with backoff, dead letter, or pause).

A worker claims a batch (32 deliveries, more for a fast peer: about ROUND_S of
sending), sends it over one reused connection, and hands the outcomes to the store a
few dozen at a time (see FLUSH_OBJECTS). Neither the claim nor the outcome write (each a
commit, an fsync) is waited for between two objects when rounds are short: the next
batch is claimed while this one is sent, and outcomes are written while the next
ones go (at most RECORDS_IN_FLIGHT writes outstanding; all of them committed before
the worker idles, pauses or stops, and when a round stops early). Senders that take
several objects per request (STOW-RS) say so with ``max_batch``; the batch is cut
into groups of one study each, bounded by count and bytes. Each group's objects are
read and decrypted on the worker's reader thread while the group before it is sent
(the first group of the next round too, once its claim is in): a peer that answers
one C-STORE at a time does not wait for our reads. A group over READ_AHEAD_BYTES is
read only when its turn comes, so a worker holds about two groups at most. A
destination-scope failure (peer down, rejected association) stops the batch: the rest
goes back untouched, so one outage costs one attempt, not one per queued object. A
message-scope failure dead-letters (or retries) that delivery only and the batch goes
on: a poison object never blocks the objects behind it.

Worker 0 always works the queue. The others only join when the backlog is deeper than
what the workers before them hold; they connect before claiming, and a connection
they cannot get is not held against the destination: many PACS take one association
at a time, and the extra workers must not turn that into retries and a "down"
destination.

Pacing (engine/pacing.py): outside the destination's delivery windows the workers
claim nothing (and close their connections); a round under way stops before its next
send. With a rate cap, each group waits for its slot. Urgent deliveries (a rule's
priority) are claimed first; one that is stored while a round is under way makes a
worker stop that round after the group it is sending and give back the rest (and
what it claimed ahead), so it waits for one group, not a whole batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from mfconsole import contract
from mfconsole.contract import DESTINATION, MESSAGE, PERMANENT, Outbound, Outcome, Sender
from mfconsole.engine import holds, outbox
from mfconsole.engine.latency import SEND_BUCKETS, Histogram
from mfconsole.engine.pacing import CLOSED, OPEN, URGENT_ONLY, Pacer
from mfconsole.engine.store import Store, StoreError
from mfconsole.engine.transform import Origin
from mfconsole.engine.vault import VaultError
from mfconsole.repository import Tx

log = logging.getLogger("mfconsole.delivery")

BATCH = 32    # deliveries claimed per round at least (more when one request takes more)
# A worker whose rounds go fast claims more: enough for about ROUND_S of sending at its
# last round's rate, at most BATCH_MAX. Each round pays a claim commit, a state read and
# the hand-over between two claims; rounds of 32 small objects sent at thousands per
# second paid them every 10 ms.
ROUND_S = 0.05
BATCH_MAX = 256
# A sender that lets its groups be cut (``min_group``: DIMSE, whose requests are one
# object each) gets groups of about GROUP_S of sending at the last round's rate,
# between its min_group and max_batch: few groups (the bookkeeping between two of them
# is time a one-at-a-time peer waits) for a fast peer, small ones for a slow peer,
# because an urgent delivery waits for the group in flight.
GROUP_S = 0.02
# The pace is taken from rounds of at least this many objects (a probe of one says
# little about the peer; objects settled without being sent, unreadable or filtered,
# can still make it look fast, within BATCH_MAX and max_batch), and forgotten when the
# worker idles, waits or pauses: the next burst starts small.
PACE_MIN_OBJECTS = 8
# Outcomes are handed to the store once FLUSH_OBJECTS of them have gathered (checked
# after each group), at the end of the round, and at least every FLUSH_S: after a
# crash, what the peer had already taken and we had not recorded is sent again (at
# least once), so keep that window short without a commit per object. (128 was
# measured no faster: bench/forward.py SR, paired with dcmsend over 27 turns each,
# 1.03x with 32 and 1.05x with 128; rounds of 0.1 s, 1.05x.)
FLUSH_OBJECTS = 32
FLUSH_S = 0.5
# Outcome writes a worker has handed to the store without waiting for their commit
# (it sends on meanwhile); it waits for the oldest before handing over more. A crash
# re-sends at most these and what was not handed over yet (fewer than FLUSH_OBJECTS,
# and the group being sent).
RECORDS_IN_FLIGHT = 1
# A round projected to take less than this claims the next batch while it sends.
AHEAD_ROUND_S = 0.2
IDLE_POLL_S = 0.25
# The next group of a round, up to this many bytes, is read and decrypted (on the
# lane's reader thread) while the group before it is sent: with a peer that answers
# each C-STORE before taking the next, the read is otherwise time the peer waits.
READ_AHEAD_BYTES = 16 * 1024 * 1024


def round_size(rate: float, request: int) -> int:
    """Deliveries a worker claims, its last round having gone at ``rate`` objects/s
    (0: not known): about ROUND_S of sending, within BATCH..BATCH_MAX, and at least
    one full request of a batching sender."""
    return max(min(BATCH_MAX, int(rate * ROUND_S)), BATCH, request)


def group_size(rate: float, least: int, most: int) -> int:
    """Objects per group for a sender that lets its groups be cut to ``least``: about
    GROUP_S of sending at ``rate``, ``least`` while the rate is not known."""
    return most if least >= most else max(least, min(most, int(rate * GROUP_S)))


def _unreadable(object_id: int, exc: Exception) -> Outcome:
    if isinstance(exc, (KeyError, VaultError, OSError)):
        return Outcome(PERMANENT, MESSAGE, "unreadable",
                       f"stored object {object_id} cannot be read ({exc.__class__.__name__})")
    return contract.internal_error(exc, "reading the stored object")


def groups(items: list[outbox.Claimed], max_count: int, max_bytes: int,
           by_calling_ae: bool = False) -> list[list[outbox.Claimed]]:
    """Consecutive items of one study, at most ``max_count`` objects and ``max_bytes``
    (an object larger than that travels alone). ``by_calling_ae``: the sender presents
    each object's calling AE title, so a group holds one, and the items are taken by
    calling AE first (one association each, not one per change), urgent ones still
    before the others."""
    if by_calling_ae:     # stable: order kept within
        items = sorted(items, key=lambda item: (-item.priority, item.calling_ae))
    out: list[list[outbox.Claimed]] = []
    size = 0
    for item in items:
        current = out[-1] if out else None
        if (current is None or len(current) >= max_count or item.study_uid != current[0].study_uid
                or (by_calling_ae and item.calling_ae != current[0].calling_ae)
                or (max_bytes and size + item.size > max_bytes)):
            out.append([item])
            size = item.size
        else:
            current.append(item)
            size += item.size
    return out


class _Lane:
    """What one worker thread has going: its sender, the next batch it claimed ahead
    (the Future of that claim's commit), and its outcome writes not yet committed."""

    def __init__(self, sender: Sender, index: int, owner: str):
        self.sender, self.index, self.owner = sender, index, owner
        self.rate = 0.0        # objects/s of its last completed round (0: not known yet)
        self.ahead: Future | None = None
        # The batch claimed ahead and its groups, made when its first group was read
        # ahead: the round that sends it keeps them (its pace may have changed since).
        self.planned: tuple[list[outbox.Claimed], list[list[outbox.Claimed]]] | None = None
        # Each outcome with the handler version it ran and what coercion changed.
        self.records: deque[tuple[Future, list[tuple[outbox.Claimed, Outcome, Any, Any]]]] = deque()
        self.unrecorded: list[int] = []    # deliveries whose outcome write failed
        self._reader: ThreadPoolExecutor | None = None    # reads ahead (started on first use)
        self._next_read: tuple[list[int], Future] | None = None

    def read_ahead(self, read: Callable[[list[int]], list[Any]], ids: list[int]) -> None:
        """Read the objects ``ids`` (the group to be sent next) on the reader thread."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"read-{self.owner}")
        self._next_read = (ids, self._reader.submit(read, ids))

    def take_read(self, ids: list[int]) -> list[Any] | None:
        """What was read ahead for exactly these objects, or None (nothing was, or
        another group was: the round changed course)."""
        pending, self._next_read = self._next_read, None
        return pending[1].result() if pending is not None and pending[0] == ids else None

    def forget_read(self) -> None:
        self._next_read = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = None


class DestinationWorkers:
    """The worker threads of one destination, and the event that wakes them."""

    def __init__(self, destination: Any, store: Store, make_sender: Callable[[], Sender],
                 transform: Callable[..., tuple[Any, Any]] | None = None,
                 held: outbox.Held | None = None,
                 coerce: Callable[..., tuple[Any, Any]] | None = None, pacer: Pacer | None = None,
                 latency: Histogram | None = None):
        self.cfg = destination
        self.name = destination.name
        self.store = store
        self.make_sender = make_sender
        self.transform = transform    # the route's handler step (engine/transform.py)
        self.coerce = coerce          # then coercion (engine/coercion.py)
        self.policy = outbox.Policy(destination.retry_initial_s, destination.retry_max_s,
                                    destination.down_after, destination.bounded_attempts)
        self.held = held if held is not None else outbox.Held()   # shared with the sweep
        self.wake = threading.Event()
        # Set when an urgent delivery is stored for it (``new_work``); cleared by the
        # worker that claims next, which takes urgent deliveries first.
        self.urgent = threading.Event()
        self.pacer = pacer or Pacer(destination)    # windows and rate cap, shared by the workers
        # Set while a worker waits out a pause, a backoff or a closed window: new
        # objects change none of them, so they do not wake it (at ingest rates that
        # would be a state read per object); operators and the sweep still do (``wake``).
        self._holding = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = 0
        # Seconds per object delivered (the metrics export); the engine's, so that it
        # outlives these workers across a reload.
        self.latency = latency if latency is not None else Histogram(SEND_BUCKETS)
        # Study-stable (engine/holds.py): claims take whole studies; worker 0 releases
        # held studies when the clock says one is due.
        self.whole_studies = bool(getattr(destination, "study_stable", False))
        self.releases = holds.ReleaseClock()

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

    def new_work(self, urgent: bool = False) -> None:
        """Deliveries were queued: wake an idle worker (one that is not holding).
        ``urgent``: one of them is, and a round under way gives way to it."""
        if urgent:
            self.urgent.set()
        if not self._holding and not self.wake.is_set():
            self.wake.set()

    def hold_until(self, release_at: float) -> None:
        """A delivery was held for its study until about ``release_at`` (ingest)."""
        self.releases.noted(release_at)

    def _release_studies(self) -> None:
        """Worker 0: release the studies whose time has passed (all it holds when the
        destination is no longer study-stable); a failure is retried next round."""
        if not self.whole_studies and self.store.reader().next_release(self.name) is None:
            self.releases.set(None)      # nothing held: no write at all
            return
        try:
            at = self.store.call(holds.release, self.name, not self.whole_studies)
        except Exception as exc:
            log.error("destination %s: releasing held studies failed (%s); retried",
                      self.name, exc.__class__.__name__)
            return
        self.releases.set(at)

    def _wait(self, seconds: float) -> None:
        self.wake.wait(max(0.0, min(seconds, 1.0)))
        self.wake.clear()

    def _hold(self, seconds: float) -> None:
        """Wait out a pause, a backoff or a closed window (new objects do not end it;
        see ``_holding``)."""
        self._holding = True
        try:
            self._wait(seconds)
        finally:
            self._holding = False

    def _run(self, index: int) -> None:
        lane = _Lane(self.make_sender(), index, threading.current_thread().name)
        idle_s = getattr(self.cfg, "idle_timeout_s", 30.0)
        try:
            while not self._stop.is_set():
                try:
                    busy = self._round(lane)
                except Exception as exc:   # never let a worker die silently
                    log.error("destination %s: worker error %s%s; retrying in 1 s",
                              self.name, exc.__class__.__name__, contract.raised_at(exc))
                    self._settle(lane)
                    lane.sender.close()
                    self._stop.wait(1.0)
                    continue
                if not busy:
                    self._settle(lane)   # every outcome committed before the worker idles
                    lane.sender.close_if_idle(idle_s)
                    self._wait(IDLE_POLL_S)
        finally:
            self._settle(lane)
            lane.sender.close()
            lane.close()

    def _round(self, lane: _Lane) -> bool:
        """One claim-send-record round; False when there was nothing to do."""
        sender, index = lane.sender, lane.index
        if index == 0 and self.releases.due(time.time()):
            self._release_studies()
        st = outbox.state(self.store.reader(), self.name)
        if st.paused:
            self._settle(lane)
            sender.close()
            self._hold(1.0)
            return True
        window = self.pacer.window(sender.in_order)
        if window == CLOSED:
            # Outside its window: no claim, no attempt, no connection held.
            self._settle(lane)
            sender.close()
            self._hold(self.pacer.seconds_to_change())
            return True
        urgent_only = window == URGENT_ONLY
        wait = st.next_attempt_at - time.time()
        if wait > 0:
            self._settle(lane)
            sender.close()
            self._hold(wait)
            return True
        # A destination marked down is probed with one object at a time.
        # A round is at least one full request of a batching sender (STOW).
        batch = round_size(lane.rate, sender.max_batch[0])
        size = 1 if st.down else batch
        if lane.ahead is not None and not st.down and window == OPEN and not self.urgent.is_set():
            # Claimed while the previous round was sending (its lease is committed by now).
            items = self._take_ahead(lane)
            if not items:
                return False
            refused = self._prepare(sender, items)
            if refused is not None:
                if index > 0:
                    self._give_back(items)
                    self._stop.wait(self.policy.retry_initial_s)
                    return True
                self._give_back(items[1:])   # one attempt, of the oldest object
                items = items[:1]
        else:
            # An urgent delivery stored since the batch ahead was claimed overtakes it.
            self._drop_ahead(lane)
            # Worker k joins only while more than k batches of the size for an unknown
            # pace are due (its own batch size follows its own pace: not a shared measure).
            skip = index * round_size(0.0, sender.max_batch[0])
            mine = outbox.due(self.store.reader(), self.name, skip + size,
                              ordered=sender.in_order, urgent_only=urgent_only)[skip:]
            if not mine or (index > 0 and st.down):
                if index > 0:
                    sender.close()   # extras are for bursts: give the association back
                return False
            # Connect before claiming: many PACS take one association at a time (DCMTK
            # storescp without --fork leaves a second request unanswered), and objects
            # claimed by a worker waiting for its association would wait with it.
            refused = self._prepare(sender, mine)
            if refused is not None and index > 0:
                # An extra association the peer would not give is not held against it.
                self._stop.wait(self.policy.retry_initial_s)
                return True
            # This claim takes the urgent deliveries stored so far first (cleared only
            # now: a worker that finds nothing of its share to claim leaves it set for
            # the one whose round must give way).
            self.urgent.clear()
            items = self.store.call(outbox.claim, self.name, 1 if refused is not None else size,
                                    None, sender.in_order, self.held, lane.owner, urgent_only,
                                    self.whole_studies)
            if not items:
                return False
        # The next batch may be claimed while this one is sent (see _work). Not when
        # probing a peer that is down, nor when this batch took everything due, nor
        # outside the window (urgent deliveries only).
        ahead = refused is None and not st.down and len(items) >= size and not urgent_only
        self._work(lane, items, refused, size if ahead else 0)
        return True

    def _prepare(self, sender: Sender, items: list[Any]) -> Outcome | None:
        try:
            return sender.prepare(items)
        except Exception as exc:   # a fault of ours while connecting: attributed like a drop
            sender.close()
            refused = dataclasses.replace(
                contract.no_response(f"internal error while connecting: {exc.__class__.__name__}"
                                     f"{contract.raised_at(exc)}"), status="internal error")
            log.error("destination %s: %s", self.name, refused.reason)
            return refused

    def _work(self, lane: _Lane, items: list[outbox.Claimed], refused: Outcome | None,
              ahead: int) -> None:
        """Send claimed items and hand every outcome to the store. ``ahead``: claim that
        many more meanwhile, for the next round, once the first objects show the round
        is short (under AHEAD_ROUND_S): then the claim's commit would be a visible share
        of it. A long round (a slow peer, large objects) gains nothing from claiming
        early, and would take objects the extra workers could be sending (they join
        only while the backlog beyond the workers before them is deep).

        Outcomes are written without the worker waiting for them between two objects,
        once FLUSH_OBJECTS have gathered after a group, at least every FLUSH_S and at
        the end of the round, at most RECORDS_IN_FLIGHT writes outstanding; a round
        that stops early (a failure, a stop) waits for all of them, so the next round
        reads the state they set. Items not attempted go back untouched; if recording
        fails, they stay in flight and ``_settle`` (or else ``sweep``) requeues them."""
        sender = lane.sender
        results: list[tuple[outbox.Claimed, Outcome, Any, Any]] = []
        handed: set[int] = set()
        flushed = time.monotonic()

        def flush(wait: bool = False) -> list[Outcome]:
            nonlocal flushed
            flushed = time.monotonic()
            if not results:
                return []
            batch, results[:] = list(results), []
            self._hand_over(lane, batch)
            handed.update(entry[0].delivery_id for entry in batch)
            attributed: list[Outcome] = []
            while wait and lane.records:
                attributed = self._collect(lane, strict=True)
            return attributed

        completed = False
        try:
            if refused is not None:    # counted as one attempt, of the oldest object
                results.append((items[0], refused, None, None))
                batches = []
            else:
                batches = self._plan(lane, sender, items)
                completed = True
            started, attempted = time.monotonic(), 0
            for n, group in enumerate(batches):
                if self._stop.is_set() or not self._may_send(sender, group, attempted):
                    completed = False
                    break
                if ahead and attempted and lane.ahead is None and (
                        (time.monotonic() - started) / attempted * len(items) < AHEAD_ROUND_S):
                    lane.ahead = self.store.submit(outbox.claim, self.name, ahead, None,
                                                   sender.in_order, self.held, lane.owner, False,
                                                   self.whole_studies)
                attempted += len(group)
                read = lane.take_read([item.object_id for item in group])
                self._read_ahead(lane, batches[n + 1] if n + 1 < len(batches)
                                 else self._next_round_first(lane, sender))
                group_outcomes = self._attempt(sender, group, read)
                results += [(item, *done) for item, done in zip(group, group_outcomes)]
                final = [o for o, _, _ in group_outcomes]
                if any(o.ambiguous for o in final):
                    # Whose fault a cut-short transfer is decides whether the batch goes on.
                    final = flush(wait=True)[-len(final):]
                elif len(results) >= FLUSH_OBJECTS or time.monotonic() - flushed > FLUSH_S:
                    flush()
                # A destination-scope failure stops the batch (one outage, one attempt);
                # so does any failure on an in-order destination (nothing overtakes).
                if len(final) < len(group) or any(
                        not o.is_done and (o.scope == DESTINATION or sender.in_order) for o in final):
                    completed = False
                    break
            flush()
            if completed and attempted >= PACE_MIN_OBJECTS:
                lane.rate = attempted / max(time.monotonic() - started, 1e-6)
            if not completed:
                # What the next round decides from (a pause, a backoff, a peer marked
                # down) must be committed before it reads the destination's state.
                self._drop_ahead(lane)
                while lane.records:
                    self._collect(lane, strict=True)
        finally:
            untouched = [x.delivery_id for x in items if x.delivery_id not in handed]
            if untouched:
                try:
                    self._give_back(untouched, ids=True)
                except Exception as exc:
                    log.error("destination %s: %d claimed deliveries could not be released "
                              "(%s); they are requeued by the next sweep", self.name,
                              len(untouched), exc.__class__.__name__)

    def _groups(self, lane: _Lane, sender: Sender,
                items: list[outbox.Claimed]) -> list[list[outbox.Claimed]]:
        """The round's groups (``groups``, sized by GROUP_S and the rate cap); the
        deliveries through a study-level handler make one group per study and handler,
        whatever the batch limits: the handler runs once over the study and its one
        result is sent."""
        study: dict[tuple[str, str], list[outbox.Claimed]] = {}
        rest: list[outbox.Claimed] = []
        for item in items:
            if self.transform is not None and self.transform.is_study(item.handler):
                study.setdefault((item.study_uid, item.handler or ""), []).append(item)
            else:
                rest.append(item)
        count, nbytes = sender.max_batch
        count = group_size(lane.rate, getattr(sender, "min_group", count), count)
        return [*study.values(), *groups(rest, *self.pacer.group_limits(count, nbytes),
                                         by_calling_ae=getattr(sender, "by_calling_ae", False))]

    def _read_ahead(self, lane: _Lane, group: list[outbox.Claimed]) -> None:
        """Read the group's objects on the lane's reader thread, unless it is too large
        (``READ_AHEAD_BYTES``) or a study-level handler reads it for itself."""
        if (group and sum(item.size for item in group) <= READ_AHEAD_BYTES
                and not (self.transform is not None and self.transform.is_study(group[0].handler))):
            lane.read_ahead(self._read, [item.object_id for item in group])

    def _next_round_first(self, lane: _Lane, sender: Sender) -> list[outbox.Claimed]:
        """The first group of the next round, when its batch is claimed already (the
        claim ahead committed); else none."""
        if lane.ahead is None or not lane.ahead.done() or lane.ahead.exception() is not None:
            return []
        items = lane.ahead.result()
        return self._plan(lane, sender, items)[0] if items else []

    def _plan(self, lane: _Lane, sender: Sender,
              items: list[outbox.Claimed]) -> list[list[outbox.Claimed]]:
        """The groups of a batch, made once: the next round sends the batch claimed
        ahead in the groups its first group was read ahead in."""
        if lane.planned is not None and lane.planned[0] is items:
            return lane.planned[1]
        planned = self._groups(lane, sender, items)
        lane.planned = (items, planned)
        return planned

    def _may_send(self, sender: Sender, group: list[outbox.Claimed], attempted: int) -> bool:
        """Whether the next group of a round goes now (after its rate-cap slot): not
        when an urgent delivery waits for this round to end (it is not in it: it was
        stored after the claim), nor outside the window (but for urgent deliveries,
        when they may go then), nor when the worker stops."""
        if attempted and self.urgent.is_set() and not sender.in_order:
            return False
        wait = self.pacer.reserve(len(group), sum(item.size for item in group))
        if wait > 0 and self._stop.wait(wait):
            return False
        window = self.pacer.window(sender.in_order)
        return window == OPEN or (window == URGENT_ONLY and all(item.priority for item in group))

    # -- the lane: claims ahead and outcome writes in flight ------------------------

    def _give_back(self, items: list[Any], ids: bool = False) -> None:
        """Claimed deliveries back to pending untouched (no attempt counted)."""
        delivery_ids = list(items) if ids else [x.delivery_id for x in items]
        if delivery_ids:
            self.store.call(outbox.release, delivery_ids)
            self.held.discard(delivery_ids)

    def _take_ahead(self, lane: _Lane) -> list[outbox.Claimed]:
        ahead, lane.ahead = lane.ahead, None
        return ahead.result() if ahead is not None else []

    def _drop_ahead(self, lane: _Lane) -> None:
        """Give back the batch claimed ahead, if any (this round stopped early)."""
        if lane.ahead is not None:
            self._give_back(self._take_ahead(lane))

    def _hand_over(self, lane: _Lane, batch: list[tuple[outbox.Claimed, Outcome, Any, Any]]) -> None:
        """Outcomes to the store, not waited for (beyond RECORDS_IN_FLIGHT writes
        outstanding, the oldest is)."""
        while len(lane.records) >= RECORDS_IN_FLIGHT:
            self._collect(lane, strict=True)
        lane.records.append((self.store.submit(self._record, batch), batch))

    def _collect(self, lane: _Lane, strict: bool) -> list[Outcome]:
        """Wait for the oldest outcome write: the outcomes as recorded. One that failed
        leaves its deliveries in flight for ``_settle`` to give back (StoreError when
        ``strict``: the round ends there, as the worker error it is)."""
        future, batch = lane.records.popleft()
        ids = [entry[0].delivery_id for entry in batch]
        try:
            attributed: list[Outcome] = future.result()
        except Exception as exc:
            lane.unrecorded += ids
            log.error("destination %s: %d outcome(s) could not be recorded (%s); those "
                      "deliveries are queued again", self.name, len(ids), exc.__class__.__name__)
            if strict:
                raise StoreError(f"outcomes not recorded: {exc.__class__.__name__}") from exc
            return []
        self.held.discard(ids)
        for (item, *_), outcome in zip(batch, attributed):
            if outcome.is_success:
                self.sent += 1
            elif not outcome.is_done:
                log.warning("destination %s: %s for %s (delivery %d): %s", self.name, outcome.label,
                            item.sop_instance_uid, item.delivery_id, outcome.reason)
        return attributed

    def _settle(self, lane: _Lane) -> None:
        """Before the worker idles, waits or stops: every outcome write committed, the
        batch claimed ahead and the deliveries whose outcome could not be written
        given back, nothing left held (what could not be given back, ``sweep`` requeues)."""
        try:
            while lane.records:
                self._collect(lane, strict=False)
            self._drop_ahead(lane)
            unrecorded, lane.unrecorded = lane.unrecorded, []
            self._give_back(unrecorded, ids=True)
        except Exception as exc:
            log.error("destination %s: claimed deliveries could not be released (%s); they "
                      "are requeued by the next sweep", self.name, exc.__class__.__name__)
        finally:
            lane.ahead = None
            lane.planned = None
            lane.rate = 0.0
            lane.forget_read()
            self.held.drop(lane.owner)

    def _attempt(self, sender: Sender, group: list[outbox.Claimed],
                 read: list[bytes | Outcome] | None = None) -> list[tuple[Outcome, Any, Any]]:
        """Send one group: (outcome, handler stamp, what coercion changed) per object,
        shorter when the sender stopped early. ``read``: its objects' bytes, read ahead
        (``_read``). An object that cannot be read, or that its handler filters
        or fails on, or whose coercion cannot be made, or that raises anywhere on its
        way out, is settled on its own and the rest of the group still goes."""
        if self.transform is not None and self.transform.is_study(group[0].handler):
            return self._attempt_study(sender, group)
        objs: list[Outbound] = []
        settled: dict[int, tuple[Outcome, Any, Any]] = {}
        stamps: dict[int, Any] = {}
        coerced: dict[int, str | None] = {}
        if read is None:
            read = self._read([item.object_id for item in group])
        for i, (item, data) in enumerate(zip(group, read)):
            if isinstance(data, Outcome):
                settled[i] = (data, None, None)
                continue
            obj: Any = Outbound(item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax,
                                data, item.study_uid, item.calling_ae)
            if item.handler and self.transform is not None:
                try:
                    obj, stamps[i] = self.transform(item.handler, f"{item.listener}->{self.name}",
                                                    item.delivery_id, obj, Origin.of(item))
                except Exception as exc:
                    settled[i] = (contract.internal_error(exc, f"running handler {item.handler}"),
                                  None, None)
                    continue
                if isinstance(obj, Outcome):
                    settled[i] = (obj, stamps[i], None)
                    continue
            if self.coerce is not None:
                try:
                    obj, coerced[i] = self.coerce(item, obj)
                except Exception as exc:
                    settled[i] = (contract.internal_error(exc, "coercing the outgoing copy"),
                                  stamps.get(i), None)
                    continue
                if isinstance(obj, Outcome):
                    settled[i] = (obj, stamps.get(i), None)
                    continue
            objs.append(obj)
        sent = iter(self._send(sender, objs))
        out: list[tuple[Outcome, Any, Any]] = []
        for i in range(len(group)):
            if i in settled:
                out.append(settled[i])
                continue
            outcome = next(sent, None)
            if outcome is None:    # the batch stopped early
                break
            out.append((outcome, stamps.get(i), coerced.get(i)))
        return out

    def _read(self, ids: list[int]) -> list[bytes | Outcome]:
        """Each object's bytes (one query for them all), or the outcome of one that
        cannot be read."""
        try:
            read = self.store.read_objects(ids)
        except Exception as exc:     # the query itself: every object's outcome
            read = [exc] * len(ids)
        return [_unreadable(object_id, data) if isinstance(data, Exception) else data
                for object_id, data in zip(ids, read)]

    def _attempt_study(self, sender: Sender, group: list[outbox.Claimed]) -> list[tuple[Outcome, Any, Any]]:
        """One study through a study-level handler: the handler runs once over the
        group's objects (with late_instance = "update", also over the objects of the
        study sent here before: the peer gets the study as it now is), and the one
        Outbound's outcome is each delivery's. An object that cannot be read is settled
        on its own; the others still go."""
        assert self.transform is not None
        settled: dict[int, tuple[Outcome, Any, Any]] = {}
        sources: list[tuple[int, Outbound]] = []
        for i, (item, data) in enumerate(zip(group, self._read([item.object_id for item in group]))):
            if isinstance(data, Outcome):
                settled[i] = (data, None, None)
                continue
            sources.append((item.object_id, Outbound(item.sop_class_uid, item.sop_instance_uid,
                                                     item.transfer_syntax, data, item.study_uid,
                                                     item.calling_ae)))
        if getattr(self.cfg, "late_instance", "alone") == "update" and sources:
            mine = {item.object_id for item in group}
            earlier = [dict(row) for row in self.store.reader().study_objects_sent(
                self.name, group[0].study_uid) if row["object_id"] not in mine]
            for row, data in zip(earlier, self._read([row["object_id"] for row in earlier])):
                if not isinstance(data, Outcome):    # purged since: the study as still stored
                    sources.append((row["object_id"], Outbound(
                        row["sop_class_uid"], row["sop_instance_uid"], row["transfer_syntax"],
                        data, row["study_uid"] or "")))
        outcome: Outcome | None = None
        stamp: Any = None
        if sources:
            sources.sort(key=lambda pair: pair[0])     # arrival order
            first = group[0]
            try:
                result, stamp = self.transform.study(first.handler or "", f"{first.listener}->{self.name}",
                                                     first.delivery_id, [o for _, o in sources],
                                                     Origin.of(first))
            except Exception as exc:
                result = contract.internal_error(exc, f"running handler {first.handler}")
            if isinstance(result, Outcome):
                outcome = result
            else:
                sent = self._send(sender, [result])
                outcome = sent[0] if sent else None
        out: list[tuple[Outcome, Any, Any]] = []
        for i in range(len(group)):
            if i in settled:
                out.append(settled[i])
            elif outcome is None:     # the send stopped early
                break
            else:
                out.append((outcome, stamp, None))
        return out

    def _send(self, sender: Sender, objs: list[Outbound]) -> list[Outcome]:
        """``sender.send_many``; an exception is the outcome of the object it was
        raised for (each is sent alone to find it), never the batch's."""
        if not objs:
            return []
        try:
            started = time.monotonic()
            outcomes = sender.send_many(objs)
            # A request of several objects: its time shared among them.
            delivered = sum(1 for o in outcomes if o.is_success)
            if delivered:
                self.latency.observe((time.monotonic() - started) / len(outcomes), delivered)
            return outcomes
        except Exception as exc:
            sender.close()   # the connection is in an unknown state
            if len(objs) == 1:
                outcome = contract.internal_error(exc, f"sending to {self.name}")
                log.error("destination %s: %s", self.name, outcome.reason)
                return [outcome]
        out: list[Outcome] = []
        for obj in objs:
            out += self._send(sender, [obj])
            if not out[-1].is_success and out[-1].scope == DESTINATION:
                break
        return out

    def _record(self, tx: Tx, results: list[tuple[outbox.Claimed, Outcome, Any, Any]]) -> list[Outcome]:
        recorded = outbox.record_all(tx, self.name, results, self.policy)
        if getattr(self.cfg, "storage_commitment", False):   # custody still to be confirmed
            from mfconsole.engine.commitment import mark_delivered

            mark_delivered(tx, results, recorded)
        return recorded

"""The delivery queue: claim, record outcomes, dead letters, pause/resume.

What happens to a delivery, decided here and stored through the repository: plain
functions over a ``Tx`` (the writer's transaction: the store's writer thread while the
engine runs, ``repository.writing`` for a command while it does not) or, for reads, a
``Reads``. Every state change writes an audit row in the same transaction.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from mfconsole.contract import (BOUNDED, DESTINATION, FILTERED, MESSAGE, PERMANENT, TRANSIENT,
                                WARNING, Outcome)
from mfconsole.repository import DeadLetterFilter, Reads, Tx
from mfconsole.repository.states import (COMMITTED, DEAD, DELIVERED, DISCARDED, HELD, IN_FLIGHT,
                                         PENDING, REPLAYED)
from mfconsole.repository.states import FILTERED as FILTERED_STATE
from mfconsole.rules import NORMAL, URGENT

LEASE_S = 300.0


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    object_id: int
    attempts: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str = ""
    size: int = 0
    handler: str | None = None
    listener: str | None = None
    suspect: int = 0      # earlier transfers of this delivery that were cut short
    rule: str | None = None          # the rule that made it (its coercion applies)
    # Where the object came from: what a handler's Context says, and the calling AE a
    # destination with send_as = "calling_ae" presents.
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""                   # "address:port", as the listener wrote it
    received_at: float = 0.0
    priority: int = 0     # 1: urgent (a rule's priority = "urgent")


@dataclass(frozen=True)
class DestinationState:
    name: str
    paused: bool = False
    pause_reason: str | None = None
    down: bool = False
    failures: int = 0
    next_attempt_at: float = 0.0
    suspect_delivery: int | None = None   # in flight at the last cut-short transfer
    delivered_since_suspect: bool = False


def state(reads: Reads, name: str) -> DestinationState:
    row = reads.destination_state(name)
    if row is None:
        return DestinationState(name)
    return DestinationState(name, bool(row["paused"]), row["pause_reason"], bool(row["down"]),
                            row["failures"], row["next_attempt_at"], row["suspect_delivery"],
                            bool(row["delivered_since_suspect"]))


def due(reads: Reads, destination: str, limit: int, now: float | None = None,
        ordered: bool = False, urgent_only: bool = False) -> list[Claimed]:
    """Up to ``limit`` due pending deliveries, not leased: urgent ones first, then the
    others, each the oldest due first; or with ``ordered`` strictly in arrival order
    whatever their priority, stopping at the first one not yet due (an in-order
    destination never lets a message overtake another, urgent or waiting for its
    retry). Unordered, deliveries whose earlier transfers were cut short (suspects)
    come after all the others, urgent or not: a possible poison object is never the
    one that probes a peer. ``urgent_only``: none but urgent ones (a destination
    outside its delivery window that lets urgent deliveries through); nothing when
    ``ordered``, as those would overtake."""
    now = now or time.time()
    if ordered:
        return [] if urgent_only else _due(reads, destination, True, None, None, now, limit)
    items: list[Claimed] = []
    for suspects in (False, True):
        for priority in (URGENT,) if urgent_only else (URGENT, NORMAL):
            if len(items) < limit:
                items += _due(reads, destination, False, suspects, priority, now, limit - len(items))
    return items


def _due(reads: Reads, destination: str, ordered: bool, suspects: bool | None,
         priority: int | None, now: float, limit: int) -> list[Claimed]:
    rows = reads.due(destination, ordered=ordered, suspects=suspects, now=now, limit=limit,
                     priority=priority)
    items = []
    for r in rows:
        if r["retry_at"] > now:
            break
        items.append(_claimed(r))
    return items


def _claimed(r: Any) -> Claimed:
    return Claimed(r["id"], r["object_id"], r["attempts"], r["sop_instance_uid"],
                   r["sop_class_uid"], r["transfer_syntax"], r["study_uid"] or "",
                   r["size"] or 0, r["handler"], r["listener"], r["suspect"] or 0,
                   r["rule"], r["calling_ae"] or "", r["called_ae"] or "",
                   r["peer"] or "", r["received_at"] or 0.0, r["priority"] or 0)


# The most deliveries a claim takes to complete its studies (whole_studies).
STUDY_CLAIM_MAX = 10_000


def whole(reads: Reads, destination: str, items: list[Claimed]) -> list[Claimed]:
    """``items`` with every other pending delivery of their studies to the destination
    (due or not): a study-stable destination sends a study together and retries it
    together (its deliveries' backoffs differ by their jitter). Each study's
    deliveries follow its first one, in arrival order."""
    if not items:
        return items
    studies = list(dict.fromkeys(item.study_uid for item in items))
    rows = reads.pending_of_studies(destination, studies, STUDY_CLAIM_MAX)
    mine = {item.delivery_id for item in items}
    by_study: dict[str, list[Claimed]] = {uid: [] for uid in studies}
    for item in items:
        by_study[item.study_uid].append(item)
    for r in rows:
        if r["id"] not in mine:
            by_study[r["study_uid"] or ""].append(_claimed(r))
    return [item for uid in studies for item in by_study[uid]]


class Held:
    """Which in-flight deliveries a live worker of this process is working on (claimed:
    not the ``held`` state of a study-stable destination's deliveries). Only
    one engine serves a data directory, so an in-flight row nobody holds is stranded
    (its outcome could not be written): ``sweep`` puts it back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[int, str] = {}

    def add(self, owner: str, delivery_ids: Iterable[int]) -> None:
        with self._lock:
            for i in delivery_ids:
                self._owner[i] = owner

    def drop(self, owner: str) -> None:
        with self._lock:
            self._owner = {i: o for i, o in self._owner.items() if o != owner}

    def discard(self, delivery_ids: Iterable[int]) -> None:
        """No longer held: their outcome is committed, or they were given back."""
        with self._lock:
            for i in delivery_ids:
                self._owner.pop(i, None)

    def __contains__(self, delivery_id: int) -> bool:
        with self._lock:
            return delivery_id in self._owner


def claim(tx: Tx, destination: str, limit: int, now: float | None = None,
          ordered: bool = False, held: Held | None = None, owner: str = "",
          urgent_only: bool = False, whole_studies: bool = False) -> list[Claimed]:
    """Lease up to ``limit`` due pending deliveries (see ``due``), held by ``owner``;
    with ``whole_studies`` (a study-stable destination) then the rest of their
    studies too (see ``whole``). Nothing from a paused destination: a worker that
    was connecting when an operator paused it must not make an attempt after the
    pause (checked in the same transaction as the lease)."""
    now = now or time.time()
    if state(tx, destination).paused:
        return []
    items = due(tx, destination, limit, now, ordered, urgent_only)
    if whole_studies:
        items = whole(tx, destination, items)
    tx.lease([item.delivery_id for item in items], now + LEASE_S, now)
    if held is not None:
        held.add(owner, (item.delivery_id for item in items))
    return items


def sweep(tx: Tx, held: Held, now: float | None = None) -> int:
    """In-flight deliveries no live worker holds (a failed outcome write, a worker
    that died) go back to pending; they are sent again (at least once, never lost)."""
    now = now or time.time()
    stranded = [r for r in tx.in_flight() if r["id"] not in held]
    tx.unlease([r["id"] for r in stranded], now, due=True)
    for r in stranded:
        tx.audit("requeued", ts=now, destination=r["destination"], object_id=r["object_id"],
                 delivery_id=r["id"], detail="in flight with no worker holding it (its outcome was "
                                             "not written); queued again")
    return len(stranded)


def release(tx: Tx, delivery_ids: Iterable[int]) -> None:
    """Give leased deliveries back untouched (not attempted: no attempt counted)."""
    tx.unlease(delivery_ids, time.time(), due=False)


def backoff(failures: int, initial: float, maximum: float, rng: random.Random = random.Random()) -> float:
    """Exponential backoff with equal jitter: half fixed, half random."""
    delay = min(maximum, initial * (2 ** max(0, failures - 1)))
    return delay / 2 + rng.uniform(0, delay / 2)


@dataclass(frozen=True)
class Policy:
    retry_initial_s: float = 5.0
    retry_max_s: float = 600.0
    down_after: int = 5
    bounded_attempts: int = 3


def attribute(dest: DestinationState, item: Claimed, outcome: Outcome, policy: Policy,
              others_delivered: bool = False) -> Outcome:
    """Who is at fault for a transfer cut short while this object was in flight
    (``outcome.ambiguous``): the object when others get through, the peer when nothing
    does. The object, when this connection had delivered others before it, or when it
    was in flight at an earlier cut-short transfer and either other objects were
    delivered since or no other object has been cut short since. Otherwise the peer (as
    any transport failure). A poison object so ends as a dead letter after
    ``bounded_attempts`` cut-short transfers and never marks a healthy peer down."""
    if not outcome.ambiguous:
        return outcome
    mine = outcome.others_delivered or (item.suspect > 0 and (
        dest.delivered_since_suspect or dest.suspect_delivery == item.delivery_id))
    if not mine:
        return outcome
    times = item.suspect + 1
    others = "; other objects were delivered" if (outcome.others_delivered or others_delivered
                                                  or dest.delivered_since_suspect) else ""
    if times >= policy.bounded_attempts:
        return Outcome(PERMANENT, MESSAGE, outcome.status,
                       f"{outcome.reason}, {times} times with this object in flight{others}: "
                       "the object, not the peer, is taken to be at fault", ambiguous=True)
    return Outcome(TRANSIENT, MESSAGE, outcome.status,
                   f"{outcome.reason} ({times} of {policy.bounded_attempts} with this object in "
                   f"flight{others}); retried on its own schedule", ambiguous=True)


def record(tx: Tx, destination: str, item: Claimed, outcome: Outcome,
           policy: Policy, handler: Any = None, coerced: str | None = None) -> Outcome:
    """Apply one attempt's outcome to its delivery (and the destination's state);
    return the outcome as recorded (a cut-short transfer attributed, see
    ``attribute``). ``handler`` (name, version, digest) is the handler version this
    attempt ran; ``coerced`` what coercion changed on the copy it sent (None: no
    coercion applied)."""
    now = time.time()
    attempts = item.attempts + 1
    tx.ensure_destination(destination, now)
    dest = state(tx, destination)
    if outcome.ambiguous:
        outcome = attribute(dest, item, outcome, policy,
                            tx.delivered_other_than(destination, item.delivery_id))
    if outcome.ambiguous:
        tx.mark_suspect(destination, item.delivery_id)
    if handler is not None:
        tx.set_handler_version(item.delivery_id, handler.version, handler.digest)
    _set_coerced(tx, item, coerced)
    if outcome.persistence == FILTERED:
        new_state, retry_at, event = FILTERED_STATE, None, "filtered"
    elif outcome.is_success:
        new_state, retry_at = DELIVERED, None
        event = "delivered_with_warning" if outcome.persistence == WARNING else "delivered"
        tx.destination_delivered(destination, outcome.status, outcome.reason, now)
        if dest.down:
            tx.audit("destination_up", ts=now, destination=destination,
                     detail="delivery succeeded; destination is up again")
    elif outcome.scope == DESTINATION and (
            outcome.persistence == PERMANENT
            or (outcome.persistence == BOUNDED and dest.failures + 1 >= policy.bounded_attempts)):
        # Not the object's fault: keep it queued (attempt not counted) and pause.
        new_state, retry_at, attempts = PENDING, now, item.attempts
        pause(tx, destination, outcome.reason, status=outcome.status)
        event = None
    elif outcome.scope == MESSAGE and (outcome.persistence == PERMANENT or (
            outcome.persistence == BOUNDED and attempts >= policy.bounded_attempts)):
        # Only the object's own failures end it: a destination-scope bounded outcome
        # (RJ 2/2/1) below its bound is retried like a transient one, never dead.
        new_state, retry_at, event = DEAD, None, "dead_lettered"
    else:   # transient, or bounded with tries left
        failures = dest.failures + 1 if outcome.scope == DESTINATION else dest.failures
        if outcome.scope == DESTINATION:
            delay = backoff(failures, policy.retry_initial_s, policy.retry_max_s)
        else:   # this object's own schedule (cut-short transfers count, when they are its)
            delay = backoff(max(attempts if not outcome.ambiguous else item.suspect + 1, 1),
                            policy.retry_initial_s, policy.retry_max_s)
        # A peer that said when to come back (HTTP Retry-After) is not asked sooner.
        delay = max(delay, outcome.retry_after_s or 0.0)
        new_state, retry_at, event = PENDING, now + delay, "retry_scheduled"
        if outcome.scope == DESTINATION:
            down = failures >= policy.down_after
            tx.destination_failed(destination, failures=failures, down=down,
                                  next_attempt_at=now + delay, status=outcome.status,
                                  reason=outcome.reason, now=now)
            if down and not dest.down:
                tx.audit("destination_down", ts=now, destination=destination, status=outcome.status,
                         detail=f"{failures} transient failures in a row: {outcome.reason}; "
                                "probing at the backoff interval")
    tx.set_outcome(item.delivery_id, state=new_state, attempts=attempts,
                   retry_at=retry_at if retry_at is not None else now, status=outcome.status,
                   label=outcome.label, reason=outcome.reason, now=now)
    if event is not None:
        tx.audit(event, ts=now, destination=destination, listener=item.listener,
                 object_id=item.object_id, delivery_id=item.delivery_id,
                 sop_instance_uid=item.sop_instance_uid, status=outcome.status,
                 detail=f"attempt {attempts}: {outcome.label}: {outcome.reason}"
                        + (f"; next try in {retry_at - now:.1f} s"
                           if event == "retry_scheduled" and retry_at else "")
                        # as Tx.delivered words it for a run of plain successes
                        + (f"; coerced: {coerced or 'nothing changed'}"
                           if outcome.is_success and coerced is not None else ""))
    return outcome


def _set_coerced(tx: Tx, item: Claimed, coerced: str | None) -> None:
    """Record what coercion changed; a delivery tried before is cleared when it no
    longer applies (its configuration changed since), others are not written to."""
    if coerced is not None or item.attempts or item.suspect:
        tx.set_coerced(item.delivery_id, coerced)


Result = tuple  # (Claimed, Outcome, handler stamp) or (…, what coercion changed)


def record_all(tx: Tx, destination: str, results: Iterable[Result],
               policy: Policy) -> list[Outcome]:
    """``record`` for each (item, outcome, handler stamp[, coerced]), in order; the
    outcomes as recorded. A run of deliveries that simply succeeded is written in bulk
    (a few statements for the run, not five per delivery), with what ``record``
    would write for each one in turn."""
    out: list[Outcome] = []
    run: list[Result] = []
    for entry in results:
        outcome = entry[1]
        if outcome.is_success and not outcome.ambiguous:
            run.append(entry)
            continue
        if run:
            out += _record_delivered(tx, destination, run)
            run = []
        out.append(record(tx, destination, entry[0], outcome, policy, entry[2],
                          entry[3] if len(entry) > 3 else None))
    if run:
        out += _record_delivered(tx, destination, run)
    return out


def _record_delivered(tx: Tx, destination: str, run: list[Result]) -> list[Outcome]:
    """``record`` of successes (not cut short): a few statements for the whole run."""
    now = time.time()
    tx.ensure_destination(destination, now)
    if state(tx, destination).down:
        tx.audit("destination_up", ts=now, destination=destination,
                 detail="delivery succeeded; destination is up again")
    last = run[-1][1]
    tx.destination_delivered(destination, last.status, last.reason, now)
    ids: list[int] = []
    for n, (item, outcome, handler, *coerced) in enumerate(run):
        if handler is not None:
            tx.set_handler_version(item.delivery_id, handler.version, handler.digest)
        _set_coerced(tx, item, coerced[0] if coerced else None)
        ids.append(item.delivery_id)
        following = run[n + 1][1] if n + 1 < len(run) else None
        if following is None or (following.persistence, following.status, following.label,
                                 following.reason) != (outcome.persistence, outcome.status,
                                                       outcome.label, outcome.reason):
            tx.delivered(destination, ids, now=now, status=outcome.status, label=outcome.label,
                         reason=outcome.reason, event="delivered_with_warning"
                         if outcome.persistence == WARNING else "delivered")
            ids = []
    return [entry[1] for entry in run]


def pause(tx: Tx, destination: str, reason: str, *, status: str = "operator",
          actor: str = "engine") -> None:
    now = time.time()
    tx.ensure_destination(destination, now)
    tx.pause_destination(destination, reason, now,
                         status if actor == "engine" and status != "operator" else None)
    tx.audit("destination_paused", ts=now, destination=destination, status=status,
             detail=f"by {actor}: {reason}", actor=actor)


def resume(tx: Tx, destination: str, *, actor: str = "operator") -> None:
    now = time.time()
    tx.ensure_destination(destination, now)
    tx.resume_destination(destination, now)
    # Queued items become due now rather than at their backed-off time.
    tx.make_due(destination, now)
    tx.audit("destination_resumed", ts=now, destination=destination, detail=f"by {actor}",
             actor=actor)


# -- dead letters -----------------------------------------------------------------

def dead_letters(reads: Reads, destination: str | None = None, reason: str | None = None,
                 ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    return reads.dead_letters(DeadLetterFilter(destination=destination, reason=reason,
                                               ids=None if ids is None else tuple(ids)))


# Operator actions over many dead letters run in transactions of this many rows (and
# stay under SQLite's limit on bound variables).
BULK_BATCH = 500


def replay(tx: Tx, delivery_ids: Iterable[int], *, to: str | None = None,
           actor: str = "operator", as_stored: bool = False,
           notes: list[str] | None = None) -> list[int]:
    """Dead letters back to pending (optionally for another destination). Returns the
    ids of the deliveries now queued (new rows when re-targeted).

    A dead letter of a superseded version (the same SOP Instance UID was received
    again with other bytes) sends the current version instead, unless ``as_stored``;
    if the current version is already queued or delivered there, nothing is queued.
    Either way it is said in ``notes`` and in the audit row."""
    now = time.time()
    queued: list[int] = []
    for row in dead_letters(tx, ids=delivery_ids):
        target = to or row["destination"]
        object_id, said = row["object_id"], ""
        if row["superseded"] and not as_stored:
            current = tx.latest_version(row["sop_instance_uid"])
            said = (f"dead letter {row['id']} holds version {row['version']} of "
                    f"{row['sop_instance_uid']}, superseded by version {current['version']} "
                    f"(object {current['id']})")
            existing = tx.latest_delivery_of(current["id"], target,
                                             (HELD, PENDING, IN_FLIGHT, DELIVERED, FILTERED_STATE,
                                              COMMITTED))
            object_id = current["id"]
            if existing is not None:
                said += f", whose delivery {existing['id']} to {target} is {existing['state']}: nothing queued"
                tx.set_state(row["id"], REPLAYED, now)
                _replay_audit(tx, now, row, target, object_id, existing["id"], actor, said)
                if notes is not None:
                    notes.append(said)
                continue
            said += f": version {current['version']} queued instead"
        elif row["superseded"]:
            said = (f"dead letter {row['id']} holds version {row['version']}, which is superseded; "
                    "sent as stored, as asked")
        if object_id == row["object_id"] and target == row["destination"]:
            tx.requeue(row["id"], now)
            new_id = row["id"]
        else:
            # The rule goes with it: its coercion is about the object, wherever it goes;
            # so does its priority.
            new_id, = tx.add_deliveries(object_id, row["listener"],
                                        [(target, row["handler"], row["rule"], row["priority"])], now)
            tx.set_state(row["id"], REPLAYED, now)
        queued.append(new_id)
        _replay_audit(tx, now, row, target, object_id, new_id, actor, said)
        if notes is not None and said:
            notes.append(said)
    return queued


def _replay_audit(tx: Tx, now: float, row: dict[str, Any], target: str,
                  object_id: int, delivery_id: int, actor: str, said: str) -> None:
    detail = f"by {actor}: dead letter {row['id']} of {row['destination']}"
    if target != row["destination"]:
        detail += f" re-targeted to {target}"
    tx.audit("replayed", ts=now, destination=target, object_id=object_id, delivery_id=delivery_id,
             sop_instance_uid=row["sop_instance_uid"], detail=detail + (f"; {said}" if said else ""),
             actor=actor)


def batches(ids: list[int], size: int = BULK_BATCH) -> Iterable[list[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def discard(tx: Tx, delivery_ids: Iterable[int], *, actor: str = "operator") -> int:
    now = time.time()
    rows = dead_letters(tx, ids=delivery_ids)
    for row in rows:
        tx.set_state(row["id"], DISCARDED, now)
        tx.audit("discarded", ts=now, destination=row["destination"], object_id=row["object_id"],
                 delivery_id=row["id"], sop_instance_uid=row["sop_instance_uid"],
                 detail=f"by {actor}: dead letter discarded", actor=actor)
    return len(rows)

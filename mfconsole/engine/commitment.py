"""Storage Commitment of dimse destinations (``storage_commitment = true``): what the
PACS's answers mean for deliveries, and the thread that asks.

A delivery delivered there (C-STORE Success or Warning) stays ``delivered`` and is
marked awaiting commitment in the same transaction (``mark_delivered``). The
destination's commitment thread (``CommitmentWorker``) puts the awaiting deliveries
under a new Transaction UID (written before the N-ACTION-RQ leaves), sends the request
(mfconsole/ul/commitment.py) and waits for the N-EVENT-REPORT on that association
while it is open; a report on a new association comes through the listener
(``Engine.commitment_report``). Either way ``apply_report`` decides, in one
transaction with its audit rows:

* in the Referenced SOP Sequence → ``committed``;
* in the Failed SOP Sequence with a retryable Failure Reason (0x0110, 0x0112, 0x0213,
  0x0131; unknown ones too) → queued again (C-STORE, then a new request), at most
  ``commitment_retries`` times; then, or with a permanent reason (0x0122, 0x0119),
  a dead letter naming the reason (code and name);
* in neither list → asked again, as after a timeout.

No report within ``commitment_timeout_s`` → the transaction expires and its deliveries
are asked for again under a new Transaction UID, at most ``commitment_retries`` more
times; then a dead letter ("commitment timeout"), an audit row and a log warning:
never committed. A request the PACS did not take (no association, N-ACTION-RSP
failure) is tried again after the destination's backoff and does not count.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pydicom.uid import generate_uid

from mfconsole.contract import PERMANENT, TRANSIENT, Outcome, raised_at
from mfconsole.dimse import commitment as sc
from mfconsole.engine import outbox
from mfconsole.repository import Tx
from mfconsole.repository import commitments as repo
from mfconsole.repository.states import DEAD

log = logging.getLogger("mfconsole.commitment")

BATCH = 500          # references per N-ACTION-RQ
POLL_S = 0.5         # how often the thread looks for deliveries to ask about


@dataclass
class Applied:
    """What a report changed (the engine wakes the delivery workers on re-sends)."""
    destination: str | None
    committed: int = 0
    resent: int = 0
    dead: int = 0
    again: int = 0
    refused: str = ""         # why nothing was applied (a report not for this peer)
    words: list[str] = field(default_factory=list)


def mark_delivered(tx: Tx, results: list[Any], recorded: list[Outcome]) -> None:
    """The deliveries this record call made ``delivered``: awaiting commitment."""
    repo.await_commitment(tx, [entry[0].delivery_id for entry, outcome in zip(results, recorded)
                               if outcome.is_success])


def _audit(tx: Tx, event: str, destination: str, row: dict[str, Any], now: float,
           status: str, detail: str) -> None:
    tx.audit(event, ts=now, destination=destination, listener=row.get("listener"),
             object_id=row["object_id"], delivery_id=row["delivery_id"],
             sop_instance_uid=row["sop_instance_uid"], status=status, detail=detail)


def _ask_again_or_give_up(tx: Tx, destination: str, rows: list[dict[str, Any]], retries: int,
                          now: float, why: str) -> tuple[int, int]:
    """Deliveries whose transaction ended without their answer: asked again while
    requests are left (1 + ``retries`` in all), else dead letters. (again, dead)."""
    again = [r["delivery_id"] for r in rows if r["commit_requests"] <= retries]
    repo.awaiting_again(tx, again)
    dead = 0
    for r in rows:
        if r["commit_requests"] > retries:
            reason = (f"{why} after {r['commit_requests']} storage commitment request(s); the "
                      "PACS has not confirmed custody (the object is kept: replay to send it again)")
            repo.give_up(tx, r["delivery_id"], DEAD, now, "commitment timeout",
                         f"{PERMANENT}/message", reason)
            _audit(tx, "dead_lettered", destination, r, now, "commitment timeout", reason)
            dead += 1
    return len(again), dead


def apply_report(tx: Tx, report: sc.Report, via: str, retries_of: Callable[[str], int],
                 expected: str | None = None) -> Applied:
    """Apply an N-EVENT-REPORT (matched by its Transaction UID). ``expected``: the
    destination the reporting peer is (a report on a new association), which must be
    the transaction's."""
    now = time.time()
    txn = report.transaction_uid
    row = repo.transaction(tx, txn)
    if row is None or (expected is not None and row["destination"] != expected):
        why = "a transaction we did not request" if row is None else \
            f"a transaction of destination {row['destination']}"
        tx.audit("commitment_unmatched", ts=now, destination=expected,
                 status=f"event type {report.event_type}",
                 detail=f"N-EVENT-REPORT ({via}) for {why}: nothing changed")
        return Applied(None, refused=why)
    dest = row["destination"]
    if row["state"] != repo.REQUESTED:
        tx.audit("commitment_late", ts=now, destination=dest, status=f"event type {report.event_type}",
                 detail=f"N-EVENT-REPORT ({via}) for transaction {txn}, already {row['state']}: "
                        "nothing changed (its deliveries were asked about again)")
        return Applied(dest)
    retries = retries_of(dest)
    waiting: dict[str, list[dict[str, Any]]] = {}
    for r in repo.under(tx, txn):
        waiting.setdefault(r["sop_instance_uid"], []).append(r)
    out = Applied(dest)
    ok: list[dict[str, Any]] = []
    for _, instance in report.succeeded:
        ok += waiting.pop(instance, [])
    repo.committed(tx, [r["delivery_id"] for r in ok], now)
    for r in ok:
        _audit(tx, "committed", dest, r, now, "committed", f"storage commitment transaction {txn} ({via})")
    out.committed = len(ok)
    for _, instance, reason in report.failed:
        for r in waiting.pop(instance, []):
            words = sc.reason_words(reason)
            status = f"commitment 0x{reason:04X}" if reason is not None else "commitment failed"
            if sc.retryable(reason) and r["commit_resends"] < retries:
                detail = (f"the PACS reported it failed ({words}) in transaction {txn}: sent again "
                          f"({r['commit_resends'] + 1} of {retries}), then asked again")
                repo.resend(tx, r["delivery_id"], now, status, f"{TRANSIENT}/message", detail)
                _audit(tx, "commitment_failed", dest, r, now, status, detail)
                out.resent += 1
            else:
                detail = (f"the PACS reported it failed ({words}) in transaction {txn}"
                          + ("" if not sc.retryable(reason) else
                             f", after {r['commit_resends']} re-send(s)")
                          + "; the PACS has not taken custody (the object is kept: fix the "
                          "cause, then replay)")
                repo.give_up(tx, r["delivery_id"], DEAD, now, status, f"{PERMANENT}/message", detail)
                _audit(tx, "dead_lettered", dest, r, now, status, detail)
                out.dead += 1
            out.words.append(words)
    left = [r for rows in waiting.values() for r in rows]
    if left:
        again, dead = _ask_again_or_give_up(tx, dest, left, retries, now,
                                            "not named in the storage commitment report")
        out.again, out.dead = again, out.dead + dead
    repo.close_transaction(tx, txn, repo.REPORTED, now, report.event_type, via)
    tx.audit("commitment_reported", ts=now, destination=dest, status=f"event type {report.event_type}",
             detail=f"transaction {txn} ({via}): {out.committed} committed, {out.resent} sent again, "
                    f"{out.dead} dead-lettered, {out.again} to ask again"
                    + (f"; failure reasons: {', '.join(sorted(set(out.words)))}" if out.words else ""))
    return out


def expire(tx: Tx, destination: str, retries: int, timeout_s: float) -> tuple[int, int, int]:
    """Transactions of ``destination`` past their deadline: (transactions, deliveries
    to ask again, dead letters)."""
    now = time.time()
    ended = again = dead = 0
    for txn in repo.overdue(tx, destination, now):
        rows = repo.under(tx, txn)
        a, d = _ask_again_or_give_up(tx, destination, rows, retries, now,
                                     f"no N-EVENT-REPORT within commitment_timeout_s={timeout_s:g}")
        repo.close_transaction(tx, txn, repo.EXPIRED, now)
        tx.audit("commitment_timeout", ts=now, destination=destination, status="commitment timeout",
                 detail=f"transaction {txn}: no N-EVENT-REPORT within commitment_timeout_s="
                        f"{timeout_s:g}; {a} to ask again, {d} dead-lettered (never committed)")
        ended, again, dead = ended + 1, again + a, dead + d
    return ended, again, dead


def request_failed(tx: Tx, destination: str, transaction_uid: str, reason: str) -> None:
    """The PACS did not take the request: its deliveries wait for the next one (this
    one does not count)."""
    now = time.time()
    repo.awaiting_again(tx, [r["delivery_id"] for r in repo.under(tx, transaction_uid)], uncount=True)
    repo.close_transaction(tx, transaction_uid, repo.FAILED, now)
    tx.audit("commitment_request_failed", ts=now, destination=destination, status="commitment",
             detail=f"transaction {transaction_uid}: {reason}; asked again after a backoff")


class CommitmentWorker:
    """The commitment thread of one destination: expires overdue transactions, sends
    requests for awaiting deliveries, one at a time."""

    def __init__(self, destination: Any, store: Any, scu: Any,
                 on_report: Callable[[sc.Report, str], int], wake_deliveries: Callable[[], None]):
        self.cfg = destination
        self.name = destination.name
        self.store = store
        self.scu = scu
        self.on_report = on_report
        self.wake_deliveries = wake_deliveries
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported: set[str] = set()
        self._failures = 0
        self._next_try = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"commit-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def reported(self, transaction_uid: str) -> None:
        """A report for one of ours came (on any association): a wait for it ends."""
        self._reported.add(transaction_uid)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._expire()
                busy = time.monotonic() >= self._next_try and self._request()
            except Exception as exc:   # never let the thread die silently
                log.error("destination %s: commitment error %s%s", self.name,
                          exc.__class__.__name__, raised_at(exc))
                busy = False
            if not busy:
                self.wake.wait(POLL_S)
                self.wake.clear()

    def _expire(self) -> None:
        c = self.cfg
        ended, again, dead = self.store.call(expire, self.name, c.commitment_retries,
                                             c.commitment_timeout_s)
        if ended:
            log.warning("destination %s: %d storage commitment transaction(s) got no report within "
                        "commitment_timeout_s=%g: %d deliveries to ask again, %d dead-lettered "
                        "(never committed)", self.name, ended, c.commitment_timeout_s, again, dead)

    def _request(self) -> bool:
        c = self.cfg
        txn = generate_uid()
        now = time.time()
        rows = self.store.call(repo.open_request, self.name, txn, BATCH, now,
                               now + c.commitment_timeout_s, "")
        if not rows:
            return False
        refs = [(r["sop_class_uid"], r["sop_instance_uid"]) for r in rows]
        result = self.scu.request(
            txn, refs, wait_s=min(c.idle_timeout_s, c.commitment_timeout_s),
            on_report=lambda report: self.on_report(report, "same association"),
            reported=lambda: txn in self._reported or self._stop.is_set())
        self._reported.discard(txn)
        if not result.accepted:
            self._failures += 1
            delay = outbox.backoff(self._failures, c.retry_initial_s, c.retry_max_s)
            self._next_try = time.monotonic() + delay
            self.store.call(request_failed, self.name, txn, result.reason)
            log.warning("destination %s: storage commitment request not taken (%s); again in %.1f s",
                        self.name, result.reason, delay)
            return False
        self._failures = 0
        return True


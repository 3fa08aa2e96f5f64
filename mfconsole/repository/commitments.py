"""Storage Commitment bookkeeping (PS3.4 Annex J), as SQL behind plain functions over
a ``Tx`` (the writer's transaction) or ``Reads``. What the answers mean (committed,
re-sent, dead letter) is decided in mfconsole/engine/commitment.py.

A delivered delivery of a destination with storage_commitment carries
``commit_state``: 'awaiting' (a request is to be sent) or 'requested' (under the
transaction ``commit_txn``, a row of ``commitments``). The row is written before the
N-ACTION-RQ leaves, so a report arriving on another association is matched.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from mfconsole.repository.reads import Reads
from mfconsole.repository.states import (COMMIT_AWAITING, COMMIT_REQUESTED, COMMITTED, DELIVERED,
                                         PENDING)
from mfconsole.repository.writes import Tx

# commitments.state
REQUESTED, REPORTED, EXPIRED, FAILED = "requested", "reported", "expired", "failed"


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def await_commitment(tx: Tx, delivery_ids: Sequence[int]) -> None:
    """Deliveries just delivered (C-STORE Success or Warning) whose custody is to be
    confirmed: marked in the transaction that recorded them delivered."""
    if delivery_ids:
        tx.conn.execute(
            f"UPDATE deliveries SET commit_state = ?, commit_txn = NULL WHERE state = ? "
            f"AND id IN ({_marks(len(delivery_ids))})", (COMMIT_AWAITING, DELIVERED, *delivery_ids))


def open_request(tx: Tx, destination: str, transaction_uid: str, limit: int, now: float,
                 deadline: float, via: str = "") -> list[dict[str, Any]]:
    """Up to ``limit`` awaiting deliveries of ``destination`` put under a new
    transaction (recorded with its deadline); their references, [] when none wait."""
    rows = [dict(r) for r in tx.conn.execute(
        "SELECT d.id AS delivery_id, d.object_id, o.sop_class_uid, o.sop_instance_uid "
        "FROM deliveries d JOIN objects o ON o.id = d.object_id "
        "WHERE d.destination = ? AND d.commit_state = ? AND d.state = ? ORDER BY d.id LIMIT ?",
        (destination, COMMIT_AWAITING, DELIVERED, limit))]
    if not rows:
        return []
    ids = [r["delivery_id"] for r in rows]
    tx.conn.execute(
        f"UPDATE deliveries SET commit_state = ?, commit_txn = ?, commit_requests = commit_requests + 1 "
        f"WHERE id IN ({_marks(len(ids))})", (COMMIT_REQUESTED, transaction_uid, *ids))
    tx.conn.execute(
        "INSERT INTO commitments (transaction_uid, destination, state, objects, requested_at, "
        "deadline, via) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (transaction_uid, destination, REQUESTED, len(rows), now, deadline, via))
    return rows


def transaction(reads: Reads, transaction_uid: str) -> dict[str, Any] | None:
    row = reads.conn.execute("SELECT * FROM commitments WHERE transaction_uid = ?",
                             (transaction_uid,)).fetchone()
    return dict(row) if row is not None else None


def close_transaction(tx: Tx, transaction_uid: str, state: str, now: float,
                      event_type: int | None = None, via: str | None = None) -> None:
    tx.conn.execute(
        "UPDATE commitments SET state = ?, reported_at = ?, event_type = COALESCE(?, event_type), "
        "via = COALESCE(?, via) WHERE transaction_uid = ?",
        (state, now, event_type, via, transaction_uid))


def under(reads: Reads, transaction_uid: str) -> list[dict[str, Any]]:
    """The deliveries still waiting under a transaction, with what a decision needs."""
    return [dict(r) for r in reads.conn.execute(
        "SELECT d.id AS delivery_id, d.object_id, d.listener, d.attempts, d.commit_requests, "
        "d.commit_resends, o.sop_class_uid, o.sop_instance_uid "
        "FROM deliveries d JOIN objects o ON o.id = d.object_id "
        "WHERE d.commit_txn = ? AND d.commit_state = ? AND d.state = ? ORDER BY d.id",
        (transaction_uid, COMMIT_REQUESTED, DELIVERED))]


def committed(tx: Tx, delivery_ids: Sequence[int], now: float) -> None:
    if delivery_ids:
        tx.conn.execute(
            f"UPDATE deliveries SET state = ?, commit_state = NULL, updated_at = ? "
            f"WHERE id IN ({_marks(len(delivery_ids))})", (COMMITTED, now, *delivery_ids))


def awaiting_again(tx: Tx, delivery_ids: Sequence[int], *, uncount: bool = False) -> None:
    """Back to 'awaiting' (a new request will carry them); ``uncount``: the request
    never reached the peer, so it does not count against commitment_retries."""
    if delivery_ids:
        tx.conn.execute(
            f"UPDATE deliveries SET commit_state = ?, commit_txn = NULL, commit_requests = "
            f"commit_requests - ? WHERE id IN ({_marks(len(delivery_ids))})",
            (COMMIT_AWAITING, 1 if uncount else 0, *delivery_ids))


def resend(tx: Tx, delivery_id: int, now: float, status: str, label: str, reason: str) -> None:
    """The PACS reported the object failed with a reason worth another C-STORE: queued
    again, due now; the commitment cycle starts over once it is delivered."""
    tx.conn.execute(
        "UPDATE deliveries SET state = ?, retry_at = ?, lease_until = NULL, commit_state = NULL, "
        "commit_txn = NULL, commit_requests = 0, commit_resends = commit_resends + 1, "
        "last_status = ?, last_class = ?, last_reason = ?, updated_at = ? WHERE id = ?",
        (PENDING, now, status, label, reason, now, delivery_id))


def give_up(tx: Tx, delivery_id: int, state: str, now: float, status: str, label: str,
            reason: str) -> None:
    """Out of the commitment cycle into ``state`` (a dead letter)."""
    tx.conn.execute(
        "UPDATE deliveries SET state = ?, commit_state = NULL, commit_requests = 0, "
        "commit_resends = 0, last_status = ?, last_class = ?, last_reason = ?, updated_at = ? "
        "WHERE id = ?", (state, status, label, reason, now, delivery_id))


def overdue(reads: Reads, destination: str, now: float) -> list[str]:
    """Transactions of ``destination`` still unanswered past their deadline."""
    return [r[0] for r in reads.conn.execute(
        "SELECT transaction_uid FROM commitments "
        # the literal state: the partial index commitments_open is for it
        f"WHERE state = '{REQUESTED}' AND destination = ? AND deadline < ? ORDER BY deadline",
        (destination, now))]


def counts(reads: Reads) -> dict[str, dict[str, int]]:
    """destination -> {"awaiting_commitment": n, "commitment_requested": n}: delivered
    deliveries whose custody is not yet confirmed."""
    out: dict[str, dict[str, int]] = {}
    for r in reads.conn.execute(
            "SELECT destination, commit_state, COUNT(*) FROM deliveries "
            "WHERE commit_state IS NOT NULL GROUP BY destination, commit_state"):
        key = "awaiting_commitment" if r[1] == COMMIT_AWAITING else "commitment_requested"
        out.setdefault(r[0], {})[key] = r[2]
    return out


def objects_of(reads: Reads, delivery_ids: Iterable[int]) -> dict[int, str]:
    ids = list(delivery_ids)
    if not ids:
        return {}
    return {r[0]: r[1] for r in reads.conn.execute(
        f"SELECT d.id, o.sop_instance_uid FROM deliveries d JOIN objects o ON o.id = d.object_id "
        f"WHERE d.id IN ({_marks(len(ids))})", ids)}


def transactions(reads: Reads, destination: str | None = None) -> list[dict[str, Any]]:
    """Every commitment transaction (of ``destination``), oldest first: the console's
    and the tests' view of what was asked and how it ended."""
    where, params = ("WHERE destination = ?", (destination,)) if destination else ("", ())
    return [dict(r) for r in reads.conn.execute(
        f"SELECT * FROM commitments {where} ORDER BY requested_at, transaction_uid", params)]


def deliveries(reads: Reads, destination: str) -> list[dict[str, Any]]:
    """A destination's deliveries with their commitment fields and whether their
    object was purged, by id."""
    return [dict(r) for r in reads.conn.execute(
        "SELECT d.id, d.object_id, d.state, d.last_status, d.last_reason, d.commit_state, "
        "d.commit_txn, d.commit_requests, d.commit_resends, o.sop_instance_uid, o.purged_at "
        "FROM deliveries d JOIN objects o ON o.id = d.object_id WHERE d.destination = ? "
        "ORDER BY d.id", (destination,))]

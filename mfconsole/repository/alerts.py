"""Alert bookkeeping, as SQL behind plain functions over a ``Tx`` (the writer's
transaction) or ``Reads``. When a condition counts as started or cleared is decided
in mfconsole/engine/alerts.py; these functions only store it.

``alert_conditions``: one row per condition (a health problem key) seen and not yet
over. ``alert_outbox``: one row per message and channel; ``sent_at`` is set in the
transaction that records the channel's success, and the row stays (the history).
"""

from __future__ import annotations

from typing import Any

from mfconsole.repository.reads import Reads
from mfconsole.repository.writes import Tx


def conditions(reads: Reads) -> dict[str, dict[str, Any]]:
    return {r["key"]: dict(r) for r in reads.conn.execute(
        "SELECT key, severity, text, since, last_seen, absent_since, notified_started "
        "FROM alert_conditions ORDER BY key")}


def add_condition(tx: Tx, key: str, severity: int, text: str, now: float) -> None:
    tx.conn.execute("INSERT INTO alert_conditions (key, severity, text, since, last_seen) "
                    "VALUES (?, ?, ?, ?, ?)", (key, severity, text, now, now))


def seen(tx: Tx, key: str, severity: int, text: str, now: float) -> None:
    """Present now: its latest words, and no longer on its way out."""
    tx.conn.execute("UPDATE alert_conditions SET severity = ?, text = ?, last_seen = ?, "
                    "absent_since = NULL WHERE key = ?", (severity, text, now, key))


def announced(tx: Tx, key: str) -> None:
    tx.conn.execute("UPDATE alert_conditions SET notified_started = 1 WHERE key = ?", (key,))


def absent(tx: Tx, key: str, now: float) -> None:
    """First seen gone now (an announced condition: its clearing waits for hold_s)."""
    tx.conn.execute("UPDATE alert_conditions SET absent_since = ? WHERE key = ? "
                    "AND absent_since IS NULL", (now, key))


def forget(tx: Tx, key: str) -> None:
    tx.conn.execute("DELETE FROM alert_conditions WHERE key = ?", (key,))


def enqueue(tx: Tx, key: str, kind: str, channel: str, subject: str, text: str,
            now: float) -> int:
    return tx.conn.execute(
        "INSERT INTO alert_outbox (key, kind, channel, subject, text, created_at, "
        "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (key, kind, channel, subject, text, now, now)).lastrowid


def next_unsent(reads: Reads, channel: str) -> dict[str, Any] | None:
    """The channel's oldest message not yet sent: a channel sends in order, so a
    "cleared" never overtakes its "started"."""
    row = reads.conn.execute(
        "SELECT * FROM alert_outbox WHERE channel = ? AND sent_at IS NULL ORDER BY id LIMIT 1",
        (channel,)).fetchone()
    return dict(row) if row is not None else None


def mark_sent(tx: Tx, message_id: int, now: float) -> bool:
    """Sent: False when it already was (nothing to record twice)."""
    return tx.conn.execute(
        "UPDATE alert_outbox SET sent_at = ?, attempts = attempts + 1, last_error = NULL "
        "WHERE id = ? AND sent_at IS NULL", (now, message_id)).rowcount == 1


def mark_failed(tx: Tx, message_id: int, next_attempt_at: float, error: str) -> None:
    tx.conn.execute(
        "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
        "WHERE id = ? AND sent_at IS NULL", (next_attempt_at, error, message_id))


def forget_sent(tx: Tx, before: float) -> int:
    """Messages sent before ``before`` (the retention): their audit rows remain."""
    return tx.conn.execute("DELETE FROM alert_outbox WHERE sent_at IS NOT NULL AND sent_at < ?",
                           (before,)).rowcount


def outbox(reads: Reads, limit: int = 1000) -> list[dict[str, Any]]:
    """The newest messages (sent or not), oldest first: for operators and tests."""
    rows = [dict(r) for r in reads.conn.execute(
        "SELECT * FROM alert_outbox ORDER BY id DESC LIMIT ?", (limit,))]
    return rows[::-1]

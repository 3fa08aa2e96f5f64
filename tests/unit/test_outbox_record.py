"""outbox.record and outbox.attribute on a real schema (in-memory SQLite): which
outcome ends a delivery, which pauses or marks the destination, and how a cut-short
transfer is attributed. The integration tests drive the same paths against peers;
these pin the edge cases."""

from __future__ import annotations

import time

import pytest

from mfconsole.contract import BOUNDED, DESTINATION, MESSAGE, TRANSIENT, Outcome, no_response
from mfconsole.engine import outbox
from mfconsole.repository import Tx, connect, migrate

POLICY = outbox.Policy(retry_initial_s=1, retry_max_s=2, down_after=5, bounded_attempts=3)


@pytest.fixture
def conn(tmp_path):
    """A Tx over a migrated database (autocommit between calls: each call stands alone)."""
    c = connect(tmp_path / "t.db")
    migrate(c)
    yield Tx(c)
    c.close()


def queued(tx: Tx, n: int = 1) -> list[outbox.Claimed]:
    now = time.time()
    for i in range(n):
        object_id = tx.insert_object({"sop_instance_uid": f"1.2.{i}", "version": 1, "digest": "d",
                                      "blob": "file", "received_at": now}, None)
        tx.add_deliveries(object_id, None, [("pacs", None)], 0)
    return outbox.claim(tx, "pacs", n)


def state_of(tx: Tx, item: outbox.Claimed) -> dict:
    row = tx.delivery(item.delivery_id)
    return {k: row[k] for k in ("state", "attempts", "suspect")}


def test_a_destination_bounded_outcome_never_dead_letters_an_object_with_many_attempts(conn):
    item, = queued(conn)
    item = outbox.Claimed(**{**item.__dict__, "attempts": 7})   # earlier transient failures
    rj = Outcome(BOUNDED, DESTINATION, "A-ASSOCIATE-RJ 2/2/1", "user identity")
    outbox.record(conn, "pacs", item, rj, POLICY)
    assert state_of(conn, item)["state"] == "pending"
    assert not outbox.state(conn, "pacs").paused          # below the destination's bound


def test_a_message_bounded_outcome_ends_after_bounded_attempts(conn):
    item, = queued(conn)
    item = outbox.Claimed(**{**item.__dict__, "attempts": 2})
    outbox.record(conn, "pacs", item, Outcome(BOUNDED, MESSAGE, "0x0110", "processing failure"), POLICY)
    assert state_of(conn, item)["state"] == "dead"


def test_a_first_cut_short_transfer_on_a_fresh_association_counts_against_the_peer(conn):
    item, = queued(conn)
    recorded = outbox.record(conn, "pacs", item, no_response("aborted"), POLICY)
    assert recorded.scope == DESTINATION
    assert state_of(conn, item) == {"state": "pending", "attempts": 1, "suspect": 1}
    assert outbox.state(conn, "pacs").failures == 1


def test_after_others_were_delivered_it_counts_against_the_object(conn):
    item, = queued(conn)
    recorded = outbox.record(conn, "pacs", item, no_response("aborted", others_delivered=True), POLICY)
    assert (recorded.persistence, recorded.scope) == (TRANSIENT, MESSAGE)
    assert outbox.state(conn, "pacs").failures == 0


def test_the_same_object_cut_short_again_and_again_is_dead_after_bounded_attempts(conn):
    item, = queued(conn)
    for n in range(3):
        if n:
            item, = outbox.claim(conn, "pacs", 1, now=time.time() + 3600)
        recorded = outbox.record(conn, "pacs", item, no_response("aborted"), POLICY)
    assert state_of(conn, item) == {"state": "dead", "attempts": 3, "suspect": 3}
    assert "3 times with this object in flight" in recorded.reason


def test_two_different_objects_cut_short_in_a_row_is_the_peer(conn):
    a, b = queued(conn, 2)
    outbox.record(conn, "pacs", a, no_response("aborted"), POLICY)
    recorded = outbox.record(conn, "pacs", b, no_response("aborted"), POLICY)
    assert recorded.scope == DESTINATION and outbox.state(conn, "pacs").failures == 2
    # And the first one, cut short again now, is not blamed either: another failed since.
    a = outbox.claim(conn, "pacs", 2, now=time.time() + 3600)
    again = [x for x in a if x.suspect][0]
    assert outbox.record(conn, "pacs", again, no_response("aborted"), POLICY).scope == DESTINATION


def test_suspects_are_claimed_last_and_never_probe_first(conn):
    a, b = queued(conn, 2)
    outbox.record(conn, "pacs", a, no_response("aborted"), POLICY)
    outbox.release(conn, [b.delivery_id])
    due = outbox.due(conn, "pacs", 2, now=time.time() + 3600)
    assert [d.delivery_id for d in due] == [b.delivery_id, a.delivery_id]
    assert outbox.due(conn, "pacs", 1, now=time.time() + 3600)[0].delivery_id == b.delivery_id


def test_a_paused_destination_gives_no_claim(conn):
    queued(conn, 0)
    object_id = conn.insert_object({"sop_instance_uid": "9.9", "version": 1, "digest": "d", "blob": "file",
                                    "received_at": time.time()}, None)
    conn.add_deliveries(object_id, None, [("pacs", None)], 0)
    outbox.pause(conn, "pacs", "operator pause", actor="alice")
    assert outbox.claim(conn, "pacs", 5) == []
    outbox.resume(conn, "pacs", actor="alice")
    assert [c.object_id for c in outbox.claim(conn, "pacs", 5)] == [object_id]


def test_record_all_writes_what_record_writes_one_by_one(tmp_path):
    """record_all writes runs of plain successes in bulk: the rows it leaves (deliveries,
    destination state, audit trail in order) are those of record called for each
    outcome in turn, through a down destination coming back, warnings and failures."""
    from mfconsole.contract import PERMANENT, WARNING, Outcome as O

    stamp = type("Stamp", (), {"version": "v2", "digest": "abc"})()
    outcomes = [(O(TRANSIENT, DESTINATION, "transport", "refused"), None, None)] * 5 + [
        (O("delivered", status="0x0000", reason="ok"), None, None),
        (O("delivered", status="0x0000", reason="ok"), stamp, "PatientID prefix"),
        (O(PERMANENT, MESSAGE, "0xA900", "no match"), None, None),
        (no_response("aborted", others_delivered=True), None, ""),
        (O("delivered", status="0x0000", reason="ok"), None, ""),
        (O(WARNING, status="0xB000", reason="coerced"), stamp, "IssuerOfPatientID set"),
    ]

    def run(path, bulk):
        c = connect(path)
        migrate(c)
        tx = Tx(c)
        items = queued(tx, len(outcomes))
        entries = [(item, o, s, c) for item, (o, s, c) in zip(items, outcomes)]
        recorded = (outbox.record_all(tx, "pacs", entries, POLICY) if bulk else
                    [outbox.record(tx, "pacs", i, o, POLICY, s, c) for i, o, s, c in entries])
        skip = ("updated_at", "retry_at", "created_at", "next_attempt_at", "ts", "id")
        deliveries = [{k: v for k, v in r.items() if k not in skip} for r in tx.rows("deliveries")]
        dest = {k: v for k, v in tx.destination_state("pacs").items() if k not in skip}
        audit = [{k: v for k, v in r.items() if k not in skip}
                 for r in tx.rows("audit") if r["event"] != "retry_scheduled"]
        retries = [r["delivery_id"] for r in tx.rows("audit", event="retry_scheduled")]
        c.close()
        return [(o.label, o.status, o.reason) for o in recorded], deliveries, dest, audit, retries

    one_by_one, bulk = run(tmp_path / "a.db", False), run(tmp_path / "b.db", True)
    assert bulk == one_by_one
    assert one_by_one[2]["down"] == 0 and "destination_up" in [a["event"] for a in one_by_one[3]]
    assert [d["state"] for d in one_by_one[1]].count("delivered") == 4
    assert one_by_one[2]["last_status"] == "0xB000"
    # What coercion changed: on the delivery, and in its delivered audit row.
    assert [d["coerced"] for d in one_by_one[1]][5:] == [None, "PatientID prefix", None, "", "",
                                                          "IssuerOfPatientID set"]
    assert [a["detail"].partition("; coerced: ")[2] for a in one_by_one[3]
            if a["event"].startswith("delivered")] == ["", "PatientID prefix", "nothing changed",
                                                        "IssuerOfPatientID set"]

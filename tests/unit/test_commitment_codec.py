"""Storage Commitment: the N-ACTION / N-EVENT-REPORT bytes (against pydicom and
pynetdicom's own encoders), the listener's negotiation of the commitment context,
and the bookkeeping on a real schema (a report's references, failure reasons,
timeouts, the purge keeping what awaits commitment)."""

from __future__ import annotations

import time

import pytest

from mfconsole.config import ListenerConfig
from mfconsole.contract import DELIVERED, Outcome
from mfconsole.dimse import commitment as sc
from mfconsole.engine import commitment, outbox
from mfconsole.repository import AuditFilter, Tx, connect, migrate
from mfconsole.repository import commitments as repo
from mfconsole.ul import dimse, negotiation, pdu

from harness import plant

POLICY = outbox.Policy(retry_initial_s=1, retry_max_s=2, down_after=5, bounded_attempts=3)
CT = "1.2.840.10008.5.1.4.1.1.2"


# -- bytes -------------------------------------------------------------------------

def test_n_action_command_set_reads_back_as_pynetdicom_writes_it():
    from pynetdicom.dimse_primitives import N_ACTION
    from pynetdicom.dsutils import encode

    ours = dimse.decode_command(sc.action_set(7))
    assert (ours.command_field, ours.message_id, ours.has_data_set) == (sc.N_ACTION_RQ, 7, True)
    assert ours.requested_sop_class_uid == sc.SOP_CLASS
    assert ours.requested_sop_instance_uid == sc.SOP_INSTANCE
    assert ours.action_type == sc.ACTION_REQUEST
    # pynetdicom's N-ACTION-RQ of the same request decodes to the same fields.
    primitive = N_ACTION()
    primitive.MessageID, primitive.RequestedSOPClassUID = 7, sc.SOP_CLASS
    primitive.RequestedSOPInstanceUID, primitive.ActionTypeID = sc.SOP_INSTANCE, 1
    primitive.ActionInformation = None
    from pynetdicom.dimse_messages import N_ACTION_RQ

    msg = N_ACTION_RQ()
    msg.primitive_to_message(primitive)
    theirs = dimse.decode_command(encode(msg.command_set, True, True))
    assert (theirs.requested_sop_class_uid, theirs.requested_sop_instance_uid,
            theirs.action_type, theirs.message_id) == (sc.SOP_CLASS, sc.SOP_INSTANCE, 1, 7)


@pytest.mark.parametrize("ts", [sc.EXPLICIT_LE, sc.IMPLICIT_LE])
def test_action_information_carries_the_transaction_and_every_reference(ts):
    refs = [(CT, f"1.2.3.{i}") for i in range(3)]
    assert sc.read_action(sc.action_information("2.25.1", refs, ts), ts) == ("2.25.1", refs)


@pytest.mark.parametrize("ts", [sc.EXPLICIT_LE, sc.IMPLICIT_LE])
def test_event_information_round_trips_successes_and_failures_with_reasons(ts):
    report = sc.Report("2.25.9", sc.EVENT_FAILURES, ((CT, "1.2.1"),),
                       ((CT, "1.2.2", 0x0112), (CT, "1.2.3", 0x0122), (CT, "1.2.4", None)))
    assert sc.read_report(sc.event_information(report, ts), ts, sc.EVENT_FAILURES) == report


def test_a_report_without_transaction_or_with_another_event_type_is_refused():
    with pytest.raises(sc.CommitmentError, match="Transaction UID"):
        sc.read_report(sc.event_information(sc.Report("", 1), sc.EXPLICIT_LE), sc.EXPLICIT_LE, 1)
    with pytest.raises(sc.CommitmentError, match="event type 3"):
        sc.read_report(b"", sc.EXPLICIT_LE, 3)


def test_event_report_response_reads_back():
    rsp = dimse.decode_command(sc.event_report_response(5, 2, 0))
    assert (rsp.command_field, rsp.message_id, rsp.status, rsp.event_type, rsp.has_data_set) == (
        sc.N_EVENT_REPORT_RSP, 5, 0, 2, False)
    assert rsp.sop_class_uid == sc.SOP_CLASS and rsp.sop_instance_uid == sc.SOP_INSTANCE


def test_failure_reasons_by_name_and_what_they_lead_to():
    assert sc.reason_words(0x0112) == "0x0112 no such object instance"
    assert sc.reason_words(0x0122) == "0x0122 referenced SOP class not supported"
    assert sc.retryable(0x0112) and sc.retryable(0x0110) and sc.retryable(0x9999)
    assert not sc.retryable(0x0122) and not sc.retryable(0x0119)


def test_role_selection_item_is_proposed():
    rq = pdu.decode_associate_rq(pdu.encode_associate_rq(
        "PACS", "MF", [(1, sc.SOP_CLASS, [sc.EXPLICIT_LE])], max_length=16382,
        implementation_class_uid="1.2.3", implementation_version="X",
        roles={sc.SOP_CLASS: (1, 0)})[6:])
    assert rq.roles == {sc.SOP_CLASS: (1, 0)}


# -- the listener's negotiation ----------------------------------------------------

def _rq(role: tuple[int, int] | None) -> pdu.AssociateRQ:
    roles = {sc.SOP_CLASS: role} if role is not None else None
    raw = pdu.encode_associate_rq("MF_SCP", "PACS", [(1, sc.SOP_CLASS, [sc.IMPLICIT_LE])],
                                  max_length=16382, implementation_class_uid="1.2.3",
                                  implementation_version="X", roles=roles)
    return pdu.decode_associate_rq(raw[6:])


def _listener() -> ListenerConfig:
    return ListenerConfig(name="l", ae_title="MF_SCP", host="127.0.0.1", port=1, calling_aets=("*",))


def test_commitment_context_is_accepted_as_scp_role_only_from_a_commitment_peer():
    ok = negotiation.negotiate(_rq((0, 1)), _listener(), 0, commitment=True)
    assert ok.accepted == {1: sc.IMPLICIT_LE} and ok.commitment == {1}
    assert b"\x54\x00" in ok.ac          # the role selection answer
    plain = negotiation.negotiate(_rq(None), _listener(), 0, commitment=True)
    assert plain.accepted == {1: sc.IMPLICIT_LE}
    for refused in (negotiation.negotiate(_rq((0, 1)), _listener(), 0, commitment=False),
                    negotiation.negotiate(_rq((1, 0)), _listener(), 0, commitment=True)):
        assert refused.accepted == {} and refused.commitment == set()


# -- bookkeeping -------------------------------------------------------------------

@pytest.fixture
def tx(tmp_path):
    c = connect(tmp_path / "t.db")
    migrate(c)
    yield Tx(c)
    c.close()


def delivered(tx: Tx, n: int, received_at: float | None = None) -> list[outbox.Claimed]:
    """``n`` objects delivered to "pacs" (C-STORE Success) and awaiting commitment."""
    now = received_at or time.time()
    for i in range(n):
        object_id = tx.insert_object({"sop_instance_uid": f"1.2.{i}", "sop_class_uid": CT,
                                      "version": 1, "digest": "d", "blob": "file",
                                      "received_at": now}, None)
        tx.add_deliveries(object_id, None, [("pacs", None)], 0)
    items = outbox.claim(tx, "pacs", n)
    results = [(i, Outcome(DELIVERED, status="0x0000"), None) for i in items]
    commitment.mark_delivered(tx, results, outbox.record_all(tx, "pacs", results, POLICY))
    return items


def row(tx: Tx, item: outbox.Claimed) -> dict:
    return next(r for r in repo.deliveries(tx, "pacs") if r["id"] == item.delivery_id)


def request(tx: Tx, txn: str = "2.25.1", timeout: float = 300) -> list[dict]:
    now = time.time()
    return repo.open_request(tx, "pacs", txn, 500, now, now + timeout)


def test_delivered_deliveries_await_commitment_and_are_requested_once(tx):
    items = delivered(tx, 3)
    assert {row(tx, i)["commit_state"] for i in items} == {"awaiting"}
    assert repo.counts(tx) == {"pacs": {"awaiting_commitment": 3}}
    refs = request(tx)
    assert [r["sop_instance_uid"] for r in refs] == ["1.2.0", "1.2.1", "1.2.2"]
    assert request(tx, "2.25.2") == []            # nothing left awaiting
    assert repo.counts(tx) == {"pacs": {"commitment_requested": 3}}
    assert repo.transaction(tx, "2.25.1")["objects"] == 3


def test_a_report_commits_resends_and_dead_letters_by_reason(tx):
    items = delivered(tx, 4)
    request(tx)
    report = sc.Report("2.25.1", sc.EVENT_FAILURES, ((CT, "1.2.0"),),
                       ((CT, "1.2.1", 0x0112), (CT, "1.2.2", 0x0122)))   # 1.2.3 not named
    applied = commitment.apply_report(tx, report, "same association", lambda _: 2)
    assert (applied.committed, applied.resent, applied.dead, applied.again) == (1, 1, 1, 1)
    got = [row(tx, i) for i in items]
    assert [g["state"] for g in got] == ["committed", "pending", "dead", "delivered"]
    assert got[1]["commit_resends"] == 1 and got[1]["last_status"] == "commitment 0x0112"
    assert "0x0122 referenced SOP class not supported" in got[2]["last_reason"]
    assert got[3]["commit_state"] == "awaiting"
    assert repo.transaction(tx, "2.25.1")["state"] == "reported"
    events = [r["event"] for r in tx.audit_page(AuditFilter(), None, 100)]
    assert {"committed", "commitment_failed", "dead_lettered", "commitment_reported"} <= set(events)
    # A second report for the same transaction changes nothing.
    again = commitment.apply_report(tx, report, "same association", lambda _: 2)
    assert again.committed == 0 and row(tx, items[0])["state"] == "committed"


def test_a_retryable_reason_ends_as_a_dead_letter_once_resends_are_spent(tx):
    item, = delivered(tx, 1)
    plant(tx, "UPDATE deliveries SET commit_resends = 2 WHERE id = ?", (item.delivery_id,))
    request(tx)
    commitment.apply_report(tx, sc.Report("2.25.1", 2, (), ((CT, "1.2.0", 0x0110),)), "x", lambda _: 2)
    assert row(tx, item)["state"] == "dead"
    assert "after 2 re-send(s)" in row(tx, item)["last_reason"]


def test_a_report_for_an_unknown_or_another_peers_transaction_changes_nothing(tx):
    item, = delivered(tx, 1)
    request(tx)
    ok = sc.Report("2.25.1", 1, ((CT, "1.2.0"),))
    assert commitment.apply_report(tx, sc.Report("2.25.404", 1, ((CT, "1.2.0"),)), "x",
                                   lambda _: 2).destination is None
    assert commitment.apply_report(tx, ok, "x", lambda _: 2, expected="other").destination is None
    assert row(tx, item)["state"] == "delivered"
    assert commitment.apply_report(tx, ok, "x", lambda _: 2, expected="pacs").committed == 1


def test_timeouts_ask_again_then_dead_letter_never_committed(tx):
    item, = delivered(tx, 1)
    request(tx, "2.25.1", timeout=-1)                       # already overdue
    assert commitment.expire(tx, "pacs", 1, 5) == (1, 1, 0)
    assert row(tx, item)["commit_state"] == "awaiting"
    request(tx, "2.25.2", timeout=-1)
    assert commitment.expire(tx, "pacs", 1, 5) == (1, 0, 1)
    got = row(tx, item)
    assert got["state"] == "dead" and got["last_status"] == "commitment timeout"
    assert "no N-EVENT-REPORT within commitment_timeout_s=5 after 2" in got["last_reason"]
    assert repo.transaction(tx, "2.25.2")["state"] == "expired"
    # A late report for an expired transaction changes nothing.
    commitment.apply_report(tx, sc.Report("2.25.2", 1, ((CT, "1.2.0"),)), "x", lambda _: 1)
    assert row(tx, item)["state"] == "dead"


def test_a_request_the_peer_did_not_take_does_not_count(tx):
    item, = delivered(tx, 1)
    request(tx)
    commitment.request_failed(tx, "pacs", "2.25.1", "connection refused")
    got = row(tx, item)
    assert (got["commit_state"], got["commit_requests"]) == ("awaiting", 0)
    assert repo.transaction(tx, "2.25.1")["state"] == "failed"


def test_the_purge_keeps_objects_awaiting_commitment(tx):
    old = time.time() - 10 * 86400
    waiting, done = delivered(tx, 2, received_at=old)
    request(tx)
    commitment.apply_report(tx, sc.Report("2.25.1", 1, ((CT, "1.2.1"),)), "x", lambda _: 2)
    assert row(tx, done)["state"] == "committed"
    tx.purge_batch(time.time() - 86400, (0, 0), 300, time.time())
    purged = {r["object_id"]: r["purged_at"] for r in repo.deliveries(tx, "pacs")}
    assert purged[waiting.object_id] is None            # awaiting commitment: kept
    assert purged[done.object_id] is not None           # committed: finished


# -- configuration and console -----------------------------------------------------

def test_check_names_the_commitment_keys(tmp_path):
    from harness import write_config
    from mfconsole.config import ConfigError, load

    path = write_config(tmp_path, destinations=[{
        "name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS",
        "storage_commitment": "yes", "commitment_timeout_s": 0, "commitment_retries": 11}])
    with pytest.raises(ConfigError) as info:
        load(path)
    keys = {k for k, _ in info.value.problems}
    assert {"destinations[0].storage_commitment", "destinations[0].commitment_timeout_s",
            "destinations[0].commitment_retries"} <= keys, info.value.problems
    ok = write_config(tmp_path / "ok", destinations=[{
        "name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS",
        "storage_commitment": True}])
    dest = load(ok).destinations[0]
    assert (dest.storage_commitment, dest.commitment_timeout_s, dest.commitment_retries) == (True, 300, 2)


def test_the_destinations_screen_shows_committed_beside_delivered():
    from mfconsole.console.destinations import delivered_cell

    assert delivered_cell({"delivered": 3}) == "3"
    assert delivered_cell({"delivered": 2, "committed": 1204}) == "2 +1 204 committed"
    assert delivered_cell({"committed": 5}) == "0 +5 committed"

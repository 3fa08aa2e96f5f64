"""Storage Commitment (Push Model) of a dimse destination against real peers: the
repository's pynetdicom commitment SCP (tests/commit_scp.py, a subprocess stopped by
PID) for reports on the same or a new association, failures and silence; Orthanc with
AllowStorageCommitment for 100 objects. Asserts on our database and on what the peer
received."""

from __future__ import annotations

import pytest

import dicomgen
from commit_scp import CommitSCP
from mfconsole.repository import AuditFilter
from mfconsole.repository import commitments as repo

from harness import delivery_states, poll, store_files
from peers import free_port

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2, "acse_timeout_s": 5,
        "dimse_timeout_s": 5, "idle_timeout_s": 2}


@pytest.fixture
def commit_scp(tmp_path):
    started: list[CommitSCP] = []

    def make(*args: str) -> CommitSCP:
        scp = CommitSCP(*args, record_dir=tmp_path / f"scp{len(started)}").start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def commit_dest(port: int, ae_title: str = "COMMITSCP", **extra) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": port,
            "ae_title": ae_title, "calling_ae_title": "MF_SCP", "storage_commitment": True,
            **FAST, **extra}


def states(engine) -> dict[str, int]:
    return delivery_states(engine.store.reader())


def txns(engine) -> list[dict]:
    return repo.transactions(engine.store.reader())


def dels(engine) -> list[dict]:
    return repo.deliveries(engine.store.reader(), "pacs")


def audit(engine, event: str) -> list[dict]:
    return engine.store.reader().audit_page(AuditFilter(event=event), None, 1000)


def send(engine, tmp_path, n: int) -> list[str]:
    files = dicomgen.write_corpus(tmp_path / "in", n)
    return store_files(engine.listeners[0].address[1], files)


def test_report_on_the_same_association_commits(engine_factory, commit_scp, tmp_path):
    scp = commit_scp("--report", "same")
    engine = engine_factory(destinations=[commit_dest(scp.port)])
    uids = send(engine, tmp_path, 12)
    poll(lambda: states(engine).get("committed") == 12, timeout=30)
    assert sorted(s["sop_instance_uid"] for s in scp.stores()) == sorted(uids)
    # Every transaction the SCP was asked about is ours, reported on that association.
    asked = {r["transaction_uid"]: r for r in txns(engine)}
    assert {a["transaction_uid"] for a in scp.actions()} == set(asked)
    assert all(t["state"] == "reported" and t["via"] == "same association" for t in asked.values())
    reports = poll(lambda: len(scp.reports()) == len(scp.actions()) and scp.reports(), timeout=10)
    assert {r["how"] for r in reports} == {"same"}
    assert all(r["rsp_status"] == 0 for r in reports)
    # Nothing is left awaiting, and status says so.
    dest = engine.snapshot()["destinations"][0]
    assert dest["counts"].get("committed") == 12
    assert not dest["counts"].get("awaiting_commitment") and not dest["counts"].get("commitment_requested")
    assert len(audit(engine, "committed")) == 12


def test_report_on_a_new_association_commits(engine_factory, commit_scp, tmp_path):
    port = free_port()
    scp = commit_scp("--report", "new", "--report-to", f"MF_SCP@127.0.0.1:{port}")
    engine = engine_factory(port=port, destinations=[commit_dest(scp.port)])
    send(engine, tmp_path, 10)
    poll(lambda: states(engine).get("committed") == 10, timeout=30)
    # The SCP writes its record once our N-EVENT-REPORT-RSP (sent after the commit) is in.
    reports = poll(lambda: len(scp.reports()) == len(scp.actions()) and scp.reports(), timeout=10)
    assert reports and {r["how"] for r in reports} == {"new"}
    assert all(r["rsp_status"] == 0 for r in reports)
    via = {t["via"] for t in txns(engine) if t["state"] == "reported"}
    assert via and all(v.startswith("new association from 127.0.0.1") for v in via)


def test_retryable_failure_is_sent_again_and_committed(engine_factory, commit_scp, tmp_path):
    scp = commit_scp("--report", "same", "--fail-reason", "0x0112", "--fail-times", "1")
    engine = engine_factory(destinations=[commit_dest(scp.port)])
    uids = send(engine, tmp_path, 4)
    poll(lambda: states(engine).get("committed") == 4, timeout=30)
    first = poll(lambda: scp.reports(), timeout=10)[0]
    failed_first = {f[0] for f in first["failed"]}
    assert all(f[1] == 0x0112 for f in first["failed"])
    assert failed_first and failed_first <= set(uids)
    stores = [s["sop_instance_uid"] for s in scp.stores()]
    assert all(stores.count(uid) == 2 for uid in failed_first)    # sent again
    failures = audit(engine, "commitment_failed")
    assert len(failures) == len(failed_first)
    assert all(a["status"] == "commitment 0x0112" and "no such object instance" in a["detail"]
               for a in failures)


def test_permanent_failure_is_a_dead_letter_naming_the_reason(engine_factory, commit_scp, tmp_path):
    scp = commit_scp("--report", "same", "--fail-reason", "0x0122", "--fail-times", "-1")
    engine = engine_factory(destinations=[commit_dest(scp.port)])
    send(engine, tmp_path, 3)
    poll(lambda: states(engine).get("dead") == 3, timeout=30)
    dead = dels(engine)
    assert all(d["last_status"] == "commitment 0x0122" for d in dead)
    assert all("0x0122 referenced SOP class not supported" in d["last_reason"] for d in dead)
    assert len(scp.stores()) == 3                                   # never sent again
    assert not states(engine).get("committed")


def test_silence_times_out_is_asked_again_then_reported_never_committed(engine_factory,
                                                                        commit_scp, tmp_path):
    scp = commit_scp("--report", "never")
    engine = engine_factory(destinations=[commit_dest(scp.port, commitment_timeout_s=1,
                                                      commitment_retries=1)])
    uids = send(engine, tmp_path, 3)
    poll(lambda: states(engine).get("dead") == 3, timeout=30)
    asked = [ref for a in scp.actions() for ref in a["refs"]]
    assert all(asked.count(uid) == 2 for uid in uids)               # 1 request + 1 retry
    dead = dels(engine)
    assert all(d["last_status"] == "commitment timeout" and "commitment_timeout_s=1" in d["last_reason"]
               for d in dead)
    assert len(audit(engine, "commitment_timeout")) == len(scp.actions())
    assert not states(engine).get("committed")
    assert not audit(engine, "committed")
    assert all(d["purged_at"] is None for d in dead)       # a dead letter keeps its object


def test_a_report_from_a_peer_that_is_no_commitment_destination_is_refused(engine_factory,
                                                                           commit_scp, tmp_path):
    from pynetdicom import AE, build_role

    scp = commit_scp("--report", "never")
    engine = engine_factory(destinations=[commit_dest(scp.port)])
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context("1.2.840.10008.1.20.1", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", engine.listeners[0].address[1], ae_title="MF_SCP",
                         ext_neg=[build_role("1.2.840.10008.1.20.1", scp_role=True, scu_role=False)])
    try:
        assert not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()
    refused = poll(lambda: audit(engine, "commitment_refused"), timeout=10)
    assert refused[0]["calling_ae"] == "STRANGER"


def test_orthanc_commits_100_objects(engine_factory, tmp_path):
    """Orthanc (AllowStorageCommitment for our AE) reports on a new association to
    our listener: every delivery ends committed, and Orthanc holds every object."""
    from peers import Orthanc, require_dicomweb_plugin, require_tool

    require_tool("Orthanc")
    require_dicomweb_plugin()
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", extra_config={"DicomModalities": {"mf": {
        "AET": "MF_SCP", "Host": "127.0.0.1", "Port": port, "AllowStorageCommitment": True}}})
    orthanc.start()
    try:
        engine = engine_factory(port=port, destinations=[commit_dest(orthanc.dicom_port, "ORTHANC")])
        uids = send(engine, tmp_path, 100)
        poll(lambda: states(engine).get("committed") == 100, timeout=120,
             message="100 deliveries committed")
        assert orthanc.sop_instance_uids() == sorted(uids)
        asked = txns(engine)
        assert asked and all(t["state"] == "reported" for t in asked)
        assert sum(t["objects"] for t in asked) == 100
        # Orthanc reports on an association of its own, to our listener.
        assert all(t["via"].startswith("new association from 127.0.0.1") for t in asked)
        dest = engine.snapshot()["destinations"][0]
        assert dest["counts"].get("committed") == 100 and not dest["counts"].get("delivered")
    finally:
        orthanc.kill()

"""Self-checks for tests/fault_scp.py: every fault mode, driven by a real
pynetdicom SCU over loopback against the SCP running as a subprocess."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import statistics
import threading
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from fault_scp import FaultSCP, free_port
from harness import poll

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SCU_AET = "MFTEST"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


@pytest.fixture
def fault_scp(tmp_path):
    """``scp = fault_scp("--status", "0xA700")`` -> a started FaultSCP."""
    started: list[FaultSCP] = []

    def make(*args: str, port: int | None = None, name: str | None = None, **kw) -> FaultSCP:
        scp = FaultSCP(port, *args, record_dir=tmp_path / (name or f"scp{len(started)}"), **kw)
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()


def make_ds(sop_class: str = CT, ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "ZZTEST^FAULT"
    ds.PatientID = "ZZTEST-FAULT"
    ds.Modality = "CT" if sop_class == CT else "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def associate(
    scp: FaultSCP,
    contexts=((CT, (ExplicitVRLittleEndian,)),),
    *,
    called: str | None = None,
    ext_neg=None,
    dimse_timeout: float = 5,
):
    ae = AE(ae_title=SCU_AET)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    ae.dimse_timeout = dimse_timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    return ae.associate(
        "127.0.0.1", scp.port, ae_title=called or scp.ae_title, ext_neg=ext_neg
    )


def send(scp: FaultSCP, *datasets, **kw) -> list[int | None]:
    """Send *datasets* over one association, release; return the statuses."""
    assoc = associate(scp, **kw)
    assert assoc.is_established
    try:
        return [_status(assoc.send_c_store(ds)) for ds in datasets]
    finally:
        assoc.release()


def _status(rsp: Dataset):
    return rsp.Status if "Status" in rsp else None


def user_identity(user: str, passcode: str | None = None) -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = 1 if passcode is None else 2
    item.primary_field = user.encode()
    if passcode is not None:
        item.secondary_field = passcode.encode()
    return item


def _eventually(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def events_when(scp: FaultSCP, predicate) -> list[dict]:
    """``scp.associations()`` once ``predicate(rows)`` holds: pynetdicom fires
    EVT_ACCEPTED/REJECTED/RELEASED/ABORTED (which FaultSCP records) only after the
    A-ASSOCIATE-AC/RJ, A-RELEASE-RP or A-ABORT went out, so the SCU can see the
    answer before the row is written."""
    return poll(lambda: (rows := scp.associations()) and predicate(rows) and rows,
                timeout=5, message="association events recorded")


def rj_triple(assoc) -> tuple[int, int, int]:
    p = assoc.acceptor.primitive
    return (p.result, p.result_source, p.diagnostic)


# --------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------


def test_start_stop_and_echo(fault_scp):
    scp = fault_scp()
    assert scp.running and scp.port > 0
    assoc = associate(scp, contexts=[(Verification, (ImplicitVRLittleEndian,))])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    pid = scp.pid
    t0 = time.monotonic()
    assert scp.stop() == 0  # SIGTERM -> clean exit 0
    assert time.monotonic() - t0 < 3
    assert not scp.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    # restart on the same port (a peer coming back)
    port = scp.port
    scp.start()
    assert scp.port == port
    assert associate(scp, contexts=[(Verification, (ImplicitVRLittleEndian,))]).is_established


def test_start_fails_loudly_when_port_busy(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        scp = FaultSCP(port, record_dir=tmp_path / "busy")
        with pytest.raises(RuntimeError, match="cannot listen"):
            scp.start()
        assert not scp.running


def test_bad_option_fails_start(tmp_path):
    with pytest.raises(RuntimeError, match="invalid SOURCE,REASON"):
        FaultSCP("--reject", "1,2,7", record_dir=tmp_path / "bad").start()


def test_free_port():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_called_ae_title_must_match(fault_scp):
    scp = fault_scp()
    assoc = associate(scp, called="SOMEONEELSE")
    assert assoc.is_rejected
    assert rj_triple(assoc) == (1, 1, 7)
    rows = [r for r in events_when(scp, lambda rs: any(r["event"] == "rejected" for r in rs))
            if r["event"] == "rejected"]
    assert rows == [
        {"event": "rejected", "calling_ae": SCU_AET, "called_ae": "SOMEONEELSE",
         "username": None, "result": 1, "source": 1, "reason": 7}
    ]  # fmt: skip


# --------------------------------------------------------------------------
# statuses
# --------------------------------------------------------------------------


def test_default_status_is_success(fault_scp):
    scp = fault_scp()
    ds = make_ds()
    assert send(scp, ds) == [0x0000]

    [row] = scp.received()
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert row["sop_class_uid"] == CT
    assert row["transfer_syntax"] == ExplicitVRLittleEndian
    assert row["calling_ae"] == SCU_AET
    assert row["called_ae"] == scp.ae_title
    assert (row["status"], row["action"], row["recorded"]) == (0, "answered", True)
    events = [a["event"] for a in events_when(scp, lambda rs: rs[-1]["event"] != "accepted")]
    assert events == ["accepted", "released"]


def test_status_failure_for_every_object(fault_scp):
    scp = fault_scp("--status", "0xA700")
    assert send(scp, make_ds(), make_ds()) == [0xA700, 0xA700]
    rows = scp.received()
    assert [(r["status"], r["status_hex"], r["recorded"]) for r in rows] == [
        (0xA700, "0xA700", False)
    ] * 2
    # nothing but the logs for failures
    assert not list(scp.record_dir.glob("*.dcm-raw"))


def test_status_for_one_instance(fault_scp):
    bad, good = make_ds(), make_ds()
    scp = fault_scp("--status", "0xB007", "--status-for", f"{bad.SOPInstanceUID}=0xA700")
    assert send(scp, bad, good) == [0xA700, 0xB007]
    rows = {r["sop_instance_uid"]: r for r in scp.received()}
    assert rows[bad.SOPInstanceUID]["recorded"] is False
    assert rows[good.SOPInstanceUID]["recorded"] is True  # warning = stored
    assert scp.raw(rows[good.SOPInstanceUID]["sha256"])


def test_status_sequence_fails_then_succeeds(fault_scp):
    scp = fault_scp("--status-sequence", "0xA700,0x0000")
    ds = make_ds()
    assert send(scp, ds) == [0xA700]  # 1st overall
    assert send(scp, ds) == [0x0000]  # 2nd overall (new association: global count)
    assert send(scp, ds, make_ds()) == [0x0000, 0x0000]  # last entry repeats
    assert [(r["n"], r["status"]) for r in scp.received()] == [
        (1, 0xA700), (2, 0), (3, 0), (4, 0)
    ]  # fmt: skip


def test_delay_before_answer(fault_scp):
    scp = fault_scp("--delay-s", "0.6")
    assoc = associate(scp)
    t0 = time.monotonic()
    assert assoc.send_c_store(make_ds()).Status == 0
    elapsed = time.monotonic() - t0
    assoc.release()
    assert 0.6 <= elapsed < 2.0, elapsed


# --------------------------------------------------------------------------
# association rejection
# --------------------------------------------------------------------------


@pytest.mark.parametrize("triple", [(1, 1, 7), (2, 3, 2), (1, 2, 2), (2, 1, 1)])
def test_reject_exact_triple(fault_scp, triple):
    scp = fault_scp("--reject", ",".join(map(str, triple)))
    t0 = time.monotonic()
    assoc = associate(scp)
    assert time.monotonic() - t0 < 2
    assert assoc.is_rejected and not assoc.is_established
    assert rj_triple(assoc) == triple
    [row] = events_when(scp, bool)
    assert row["event"] == "rejected"
    assert (row["result"], row["source"], row["reason"]) == triple
    assert (row["calling_ae"], row["called_ae"]) == (SCU_AET, scp.ae_title)
    # the SCP keeps serving (and keeps rejecting)
    assert rj_triple(associate(scp)) == triple
    assert scp.received() == []


def test_require_user_and_passcode(fault_scp):
    """pynetdicom's own rejection for an EVT_USER_ID handler returning
    ``(False, None)`` is A-ASSOCIATE-RJ result 2 (rejected-transient), source 2
    (service-provider ACSE), reason 1 (no-reason-given) -- see
    ACSE._negotiate_as_acceptor.  fault_scp uses the same triple for a request
    without any user identity item (pynetdicom itself would accept that)."""
    scp = fault_scp("--require-user", "alice:s3cret")

    ok = associate(scp, ext_neg=[user_identity("alice", "s3cret")])
    assert ok.is_established
    assert ok.send_c_store(make_ds()).Status == 0
    ok.release()

    for ext_neg in (
        [user_identity("alice", "wrong")],
        [user_identity("mallory", "s3cret")],
        [user_identity("alice")],  # passcode required, username-only offered
        None,  # no user identity at all
    ):
        assoc = associate(scp, ext_neg=ext_neg)
        assert assoc.is_rejected, ext_neg
        assert rj_triple(assoc) == (2, 2, 1)

    rows = events_when(scp, lambda rs: sum(r["event"] == "rejected" for r in rs) >= 4)
    ids = [(r["username"], r["verified"]) for r in rows if r["event"] == "user_id"]
    assert ids == [("alice", True), ("alice", False), ("mallory", False), ("alice", False), (None, False)]
    accepted = [r for r in rows if r["event"] == "accepted"]
    assert [r["username"] for r in accepted] == ["alice"]
    rejected = [r for r in rows if r["event"] == "rejected"]
    assert [(r["username"], r["result"], r["source"], r["reason"]) for r in rejected] == [
        ("alice", 2, 2, 1), ("mallory", 2, 2, 1), ("alice", 2, 2, 1), (None, 2, 2, 1)
    ]  # fmt: skip
    assert len(scp.received()) == 1


def test_require_user_name_only(fault_scp):
    scp = fault_scp("--require-user", "bob")
    assert associate(scp, ext_neg=[user_identity("bob")]).is_established
    assert associate(scp, ext_neg=[user_identity("bob", "anything")]).is_established
    assoc = associate(scp, ext_neg=[user_identity("eve")])
    assert assoc.is_rejected and rj_triple(assoc) == (2, 2, 1)


# --------------------------------------------------------------------------
# presentation contexts
# --------------------------------------------------------------------------


def test_transfer_syntax_restriction(fault_scp):
    scp = fault_scp("--transfer-syntaxes", ExplicitVRLittleEndian)
    assoc = associate(
        scp,
        contexts=[(CTImageStorage, (JPEGBaseline8Bit,)), (MRImageStorage, (ExplicitVRLittleEndian,))],
    )
    assert assoc.is_established
    try:
        [rej] = assoc.rejected_contexts
        assert (rej.abstract_syntax, rej.result) == (CT, 0x04)  # TS not supported
        [acc] = assoc.accepted_contexts
        assert (acc.abstract_syntax, acc.transfer_syntax[0]) == (MR, ExplicitVRLittleEndian)
        with pytest.raises(ValueError):
            assoc.send_c_store(make_ds(CT, JPEGBaseline8Bit))
        assert assoc.send_c_store(make_ds(MR)).Status == 0
    finally:
        assoc.release()

    # implicit LE is refused too
    assoc = associate(scp, contexts=[(CT, (ImplicitVRLittleEndian,)), (MR, (ExplicitVRLittleEndian,))])
    assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [(CT, 0x04)]
    assoc.release()


def test_default_transfer_syntaxes_all_accepted(fault_scp):
    from fault_scp import DEFAULT_TRANSFER_SYNTAXES

    scp = fault_scp()
    contexts = [(CT, (ts,)) for ts in DEFAULT_TRANSFER_SYNTAXES]
    assoc = associate(scp, contexts=contexts)
    assert assoc.is_established
    assert sorted(c.transfer_syntax[0] for c in assoc.accepted_contexts) == sorted(
        DEFAULT_TRANSFER_SYNTAXES
    )
    assert assoc.rejected_contexts == []
    assoc.release()


def test_reject_sop_class(fault_scp):
    scp = fault_scp("--reject-sop-class", CT)
    assoc = associate(
        scp, contexts=[(CT, (ExplicitVRLittleEndian,)), (MR, (ExplicitVRLittleEndian,))]
    )
    assert assoc.is_established
    try:
        assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [
            (CT, 0x03)  # abstract syntax not supported
        ]
        assert [c.abstract_syntax for c in assoc.accepted_contexts] == [MR]
    finally:
        assoc.release()


# --------------------------------------------------------------------------
# no answer / abort
# --------------------------------------------------------------------------


def test_no_response_dimse_timeout(fault_scp):
    scp = fault_scp("--no-response")
    assoc = associate(scp, dimse_timeout=1)
    ds = make_ds()
    t0 = time.monotonic()
    rsp = assoc.send_c_store(ds)
    elapsed = time.monotonic() - t0
    assert rsp == Dataset()  # empty: no response within dimse_timeout
    assert assoc.is_aborted and not assoc.is_established
    assert 0.9 <= elapsed < 2.5, elapsed

    [row] = scp.wait_received(1)
    assert (row["sop_instance_uid"], row["action"], row["status"]) == (
        ds.SOPInstanceUID, "no-response", None
    )  # fmt: skip
    # the SCP notices the abort and still shuts down cleanly and quickly
    t0 = time.monotonic()
    assert scp.stop() == 0
    assert time.monotonic() - t0 < 3


def test_no_response_sigterm_while_waiting(fault_scp):
    """SIGTERM while a handler is sitting on an unanswered C-STORE."""
    scp = fault_scp("--no-response")
    assoc = associate(scp, dimse_timeout=30)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rsp", assoc.send_c_store(make_ds())))
    t.start()
    scp.wait_received(1)
    t0 = time.monotonic()
    assert scp.stop() == 0
    assert time.monotonic() - t0 < 3
    t.join(5)
    assert not t.is_alive()
    assert result["rsp"] == Dataset()  # never answered; aborted on shutdown
    assert assoc.is_aborted


def test_abort_on_store(fault_scp):
    scp = fault_scp("--abort-on-store")
    assoc = associate(scp)
    ds = make_ds()
    t0 = time.monotonic()
    rsp = assoc.send_c_store(ds)
    assert time.monotonic() - t0 < 2
    assert rsp == Dataset()
    # the requestor's reactor thread marks the association aborted a moment
    # after send_c_store() has returned
    assert _eventually(lambda: assoc.is_aborted and not assoc.is_established)
    [row] = scp.received()
    assert (row["sop_instance_uid"], row["action"], row["status"], row["recorded"]) == (
        ds.SOPInstanceUID, "abort", None, False
    )  # fmt: skip
    assert events_when(scp, lambda rs: any(a["event"] == "aborted" for a in rs))
    # next association is accepted again (and aborted again on store)
    assoc = associate(scp)
    assert assoc.is_established
    assert assoc.send_c_store(make_ds()) == Dataset()


# --------------------------------------------------------------------------
# recording: bytes exactly as received
# --------------------------------------------------------------------------


def test_record_raw_bytes_from_dataset(fault_scp):
    scp = fault_scp()
    sent = {}
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = make_ds(ts=ts)
        expected = encode(ds, ts == ImplicitVRLittleEndian, True)
        sent[ds.SOPInstanceUID] = (ts, expected)
        assert send(scp, ds, contexts=[(CT, (ts,))]) == [0]

    rows = scp.received()
    assert len(rows) == 2
    for row in rows:
        ts, expected = sent[row["sop_instance_uid"]]
        assert row["transfer_syntax"] == ts
        assert row["sha256"] == hashlib.sha256(expected).hexdigest()
        assert row["size"] == len(expected)
        assert scp.raw(row["sha256"]) == expected


def test_record_raw_bytes_not_reencoded(fault_scp, tmp_path, monkeypatch):
    """Send a file whose data set has elements out of ascending tag order (a
    pydicom decode/re-encode would sort them): the record must be verbatim.

    pynetdicom's SCU itself decodes and re-encodes a file it is given unless
    ``_config.STORE_SEND_CHUNKED_DATASET`` is set (then it streams the bytes
    after the file meta verbatim)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = make_ds()
    head = Dataset()  # (0008,xxxx) + (0020,xxxx)
    for kw in ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(head, kw, getattr(ds, kw))
    tail = Dataset()  # (0010,xxxx)
    tail.PatientName = ds.PatientName
    tail.PatientID = ds.PatientID
    raw = encode(tail, False, True) + encode(head, False, True)  # 0010 before 0008

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp_path / "out_of_order.dcm"
    path.write_bytes(buf.getvalue() + raw)
    _, offset = split_dataset(path)
    assert path.read_bytes()[offset:] == raw

    # and a normally written file, for good measure
    normal = tmp_path / "normal.dcm"
    ds2 = make_ds()
    dcmwrite(normal, ds2, enforce_file_format=True)
    _, offset2 = split_dataset(normal)
    raw2 = normal.read_bytes()[offset2:]

    scp = fault_scp()
    assert send(scp, path, normal) == [0, 0]
    rows = {r["sop_instance_uid"]: r for r in scp.received()}
    for uid, expected in ((ds.SOPInstanceUID, raw), (ds2.SOPInstanceUID, raw2)):
        row = rows[uid]
        assert row["sha256"] == hashlib.sha256(expected).hexdigest()
        assert scp.raw(row["sha256"]) == expected
    assert sorted(p.name for p in scp.record_dir.glob("*.dcm-raw")) == sorted(
        f"{r['sha256']}.dcm-raw" for r in rows.values()
    )


# --------------------------------------------------------------------------
# TCP_NODELAY
# --------------------------------------------------------------------------


def _scu_nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _median_store_latency(scp: FaultSCP, n: int = 15) -> float:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    # The SCU needs TCP_NODELAY too: pynetdicom's requestor socket leaves Nagle
    # on, and then *every* C-STORE waits ~40 ms for the SCP's delayed ACK,
    # whatever the SCP does (measured: ~50 ms median vs ~6 ms).
    assoc = ae.associate(
        "127.0.0.1", scp.port, ae_title=scp.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _scu_nodelay)],
    )  # fmt: skip
    assert assoc.is_established
    ds = make_ds()
    assoc.send_c_store(ds)  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert assoc.send_c_store(ds).Status == 0
        times.append(time.perf_counter() - t0)
    assoc.release()
    return statistics.median(times)


def test_tcp_nodelay_on_accepted_socket(fault_scp):
    scp = fault_scp()
    median = _median_store_latency(scp)
    [accepted] = [a for a in scp.associations() if a["event"] == "accepted"]
    assert accepted["tcp_nodelay"] is True
    # well under one delayed-ACK period (~40 ms) per round trip
    assert median < 0.030, f"median C-STORE round trip {median * 1000:.1f} ms"


def test_tcp_nodelay_diagnostic_switch(fault_scp):
    scp = fault_scp("--no-tcp-nodelay")
    assert associate(scp).is_established
    [accepted] = [a for a in events_when(scp, bool) if a["event"] == "accepted"]
    assert accepted["tcp_nodelay"] is False

"""Outbound DIMSE delivery against real peers: one test case per row of the two DIMSE
tables of docs/outcomes.md ("C-STORE response status" and "Association").

Peers: tests/fault_scp.py (a pynetdicom SCP that answers chosen statuses, rejects
associations with chosen A-ASSOCIATE-RJ triples, never answers, or aborts) and DCMTK
storescp in its fault modes. Each case asserts on what the engine stored (delivery
state, attempts, last status and class, destination state, audit events) and on what
the peer saw (FaultSCP's received/associations records, storescp's files and log).

Waits are polls with deadlines that also stop early on an outcome the table rules out
(a dead letter where a retry is due, a pause where a retry is due...), so a wrong
classification fails fast and says what happened instead.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import generate_uid


import dicomgen
from fault_scp import FaultSCP
from harness import holds, poll, store_files, stored_sha256
from mfconsole import ops
from peers import StoreSCP, free_port

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

POLICY = {"retry_initial_s": 0.1, "retry_max_s": 0.3, "down_after": 3, "bounded_attempts": 3,
          "connect_timeout_s": 1, "acse_timeout_s": 2, "dimse_timeout_s": 2}
# How long "nothing more happens" is watched: a few retry intervals.
HOLD_S = 0.4


def dest(port: int, host: str = "127.0.0.1", **extra: Any) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": host, "port": port, "ae_title": "PACS",
            **POLICY, **extra}


# -- peers ------------------------------------------------------------------------

@pytest.fixture
def fault_scp(tmp_path):
    """``fault_scp(*options, port=None)``: a started FaultSCP (AE title PACS) recording
    to ``tmp_path/fault_scp``; a restart on the same port appends to the same records."""
    started: list[FaultSCP] = []

    def make(*args: str, port: int | None = None) -> FaultSCP:
        scp = FaultSCP(port, *args, record_dir=tmp_path / "fault_scp", ae_title="PACS")
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()


# One FaultSCP answers every per-object status case: a status per SOP Instance UID
# (--status-for), success for any other UID. Each status belongs to one test only.
ANSWERED = ("B000", "B006", "B007", "A900", "A9FF", "C000", "C122", "CFFF", "0122", "0117",
            "0210", "0211", "0212", "0110", "D000", "0105")
STATUS_UIDS = {status: generate_uid() for status in ANSWERED}


@pytest.fixture(scope="module")
def answering_scp(tmp_path_factory):
    scp = FaultSCP(None, *[f"--status-for={uid}={s}" for s, uid in STATUS_UIDS.items()],
                   record_dir=tmp_path_factory.mktemp("answering_scp"), ae_title="PACS")
    with scp:     # started and stopped by PID
        yield scp


def start_peer(spec: str, fault_scp, storescp_factory) -> FaultSCP | StoreSCP:
    """``"fault_scp --status 0110"`` or ``"storescp --refuse"``."""
    kind, *args = spec.split()
    return fault_scp(*args) if kind == "fault_scp" else start_storescp(storescp_factory, *args)


def start_storescp(storescp_factory, *args: str) -> StoreSCP:
    """A storescp that is done with the bare TCP probe its fixture waited with: an
    association arriving while storescp --refuse still deals with it is sometimes
    aborted instead of rejected (2 in 20 here)."""
    scp = storescp_factory(*args)
    # The probe is logged as an association; with --refuse, its RJ then fails (gone).
    done = "Association Reject Failed" if "--refuse" in args else "Association Received"
    poll(lambda: done in scp.log_text(), timeout=5, message="storescp done with its probe")
    return scp


def restart_plain(peer: FaultSCP | StoreSCP, fault_scp) -> FaultSCP | StoreSCP:
    """The same peer on the same port, without its fault options."""
    peer.stop()
    if isinstance(peer, StoreSCP):
        peer.extra_args = []
        return peer.start()
    return fault_scp(port=peer.port)


def stores_seen(peer: FaultSCP | StoreSCP, uid: str | None = None) -> list[dict] | int:
    """FaultSCP: its C-STORE rows (for ``uid``); storescp: C-STORE requests in its log."""
    if isinstance(peer, StoreSCP):
        return peer.log_text().count("Received Store Request")
    return [r for r in peer.received() if uid is None or r["sop_instance_uid"] == uid]


def storescp_uids(scp: StoreSCP) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received_files()]


def rejections(scp: FaultSCP) -> list[tuple[int, int, int]]:
    return [(a["result"], a["source"], a["reason"]) for a in scp.associations()
            if a["event"] == "rejected"]


# -- the engine side --------------------------------------------------------------

def sr(tmp_path: Path, name: str = "sr") -> Path:
    return dicomgen.save(dicomgen.make_sr(), tmp_path / "in" / f"{name}.dcm")


def answered_with(tmp_path: Path, status: str) -> Path:
    """An SR that ``answering_scp`` answers with ``status``."""
    ds = dicomgen.make_sr()
    ds.SOPInstanceUID = STATUS_UIDS[status]
    return dicomgen.save(ds, tmp_path / "in" / f"{status}.dcm")


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send(engine, *paths: Path) -> list[str]:
    return store_files(engine.listeners[0].address[1], list(paths))


def delivery(engine, uid: str) -> dict:
    reads = engine.store.reader()
    return [d for o in reads.rows("objects", sop_instance_uid=uid)
            for d in reads.rows("deliveries", object_id=o["id"])][0]


def destination(engine) -> dict:
    row = engine.store.reader().destination_state("pacs")
    return row if row else {"paused": 0, "down": 0, "failures": 0, "pause_reason": None}


def events(engine, uid: str | None = None) -> list[str]:
    """Audit event names of one object's delivery, or of the destination itself."""
    return [r["event"] for r in engine.store.reader().rows("audit", destination="pacs",
                                                            sop_instance_uid=uid)]


def dead_count(engine) -> int:
    return len(engine.store.reader().rows("deliveries", state="dead"))


def settled(engine, uid: str, state: str, max_attempts: int | None = None, timeout: float = 10) -> dict:
    """Poll until the delivery of ``uid`` is in ``state``; fail at once if it reaches the
    other final state, the destination is paused, or more than ``max_attempts`` were made."""
    def check() -> dict | None:
        d = delivery(engine, uid)
        if d["state"] == state:
            return d
        dest_state = destination(engine)
        if (d["state"] in ("delivered", "dead") or dest_state["paused"]
                or (max_attempts is not None and d["attempts"] > max_attempts)):
            raise AssertionError(f"expected {state}, got delivery {d}; destination {dest_state}")
        return None
    return poll(check, timeout=timeout, message=f"delivery of {uid} to be {state}")


def became(engine, flag: str, timeout: float = 10) -> dict:
    """Poll until the destination is ``down`` or ``paused``, or anything is dead; return
    the destination state (the caller asserts which it was)."""
    poll(lambda: destination(engine)["paused"] or destination(engine)["down"] or dead_count(engine),
         timeout=timeout, message=f"destination {flag}")
    state = destination(engine)
    assert state[flag] and dead_count(engine) == 0, f"expected {flag}: {state}, {dead_count(engine)} dead"
    return state


def resume(engine) -> None:
    ops.resume(engine.config, "pacs")     # what `mfconsole resume pacs` does


# == C-STORE response status ======================================================

@pytest.mark.parametrize("peer", [
    "fault_scp",
    "storescp -B",
    # Rejects only requests without an Implementation Class UID; pynetdicom sends one.
    "storescp -B --reject",
    # DCMTK 3.6.7's --sleep-after does not delay the response (measured): no fault.
    "storescp -B --sleep-after 2",
])
def test_0000_success_delivers_once(peer, engine_factory, storescp_factory, answering_scp, tmp_path):
    scp = answering_scp if peer == "fault_scp" else start_storescp(storescp_factory, *peer.split()[1:])
    engine = engine_factory(destinations=[dest(scp.port)])
    uid, = send(engine, sr(tmp_path))
    d = settled(engine, uid, "delivered", max_attempts=1)
    assert (d["attempts"], d["last_status"], d["last_class"]) == (1, "0x0000", "delivered/message")
    assert events(engine, uid) == ["delivered"]
    if isinstance(scp, StoreSCP):
        assert poll(lambda: storescp_uids(scp)) == [uid]
        assert stores_seen(scp) == 1
    else:
        digest = stored_sha256(engine.data_dir, engine.config.store.key_file)[uid]
        assert [(r["status"], r["sha256"]) for r in stores_seen(scp, uid)] == [(0, digest)]


def test_b000_b006_b007_warnings_deliver_with_the_warning_recorded(engine_factory, answering_scp,
                                                                    tmp_path):
    scp = answering_scp
    files = {status: answered_with(tmp_path, status) for status in ("B000", "B006", "B007")}
    engine = engine_factory(destinations=[dest(scp.port)])
    send(engine, *files.values())
    for status, path in files.items():
        uid = uid_of(path)
        d = settled(engine, uid, "delivered", max_attempts=1)
        assert (d["attempts"], d["last_status"], d["last_class"]) == (1, f"0x{status}", "warning/message")
        assert events(engine, uid) == ["delivered_with_warning"]
        assert [r["status_hex"] for r in stores_seen(scp, uid)] == [f"0x{status}"]


def test_a700_a7ff_0213_out_of_resources_retry_mark_down_then_deliver(engine_factory, fault_scp, tmp_path):
    # Three transient answers in a row: down_after (3) is reached, and bounded_attempts
    # (3) would have dead-lettered a bounded or message-scope failure. Then success.
    scp = fault_scp("--status-sequence", "A700,A7FF,0213,0000")
    engine = engine_factory(destinations=[dest(scp.port)])
    uid, = send(engine, sr(tmp_path))
    d = settled(engine, uid, "delivered")
    assert (d["attempts"], d["last_status"]) == (4, "0x0000")
    assert [r["status_hex"] for r in stores_seen(scp, uid)] == ["0xA700", "0xA7FF", "0x0213", "0x0000"]
    assert events(engine, uid) == ["retry_scheduled"] * 3 + ["delivered"]
    details = [r["detail"] for r in engine.store.reader().rows("audit", event="retry_scheduled")]
    assert all("transient/destination" in x for x in details), details
    assert events(engine) == ["destination_down", "destination_up"]
    state = destination(engine)
    assert (state["paused"], state["down"], state["failures"]) == (0, 0, 0)


@pytest.mark.parametrize("statuses", [
    ["A900", "A9FF"],            # data set does not match SOP class
    ["C000", "C122", "CFFF"],    # cannot understand
    ["0122"],                    # SOP class not supported
    ["0117"],                    # invalid SOP instance
    ["0210", "0211", "0212"],    # duplicate invocation / unrecognized / mistyped
], ids="-".join)
def test_permanent_message_status_dead_letters_only_that_object(statuses, engine_factory, answering_scp,
                                                                tmp_path):
    scp = answering_scp
    poison = {status: answered_with(tmp_path, status) for status in statuses}
    good = sr(tmp_path, "good")
    engine = engine_factory(destinations=[dest(scp.port)])
    send(engine, *poison.values(), good)
    assert settled(engine, uid_of(good), "delivered", max_attempts=1)["attempts"] == 1
    for status, path in poison.items():
        uid = uid_of(path)
        d = settled(engine, uid, "dead", max_attempts=1)
        assert (d["attempts"], d["last_status"], d["last_class"]) == (1, f"0x{status}", "permanent/message")
        assert events(engine, uid) == ["dead_lettered"]
        assert [r["status_hex"] for r in stores_seen(scp, uid)] == [f"0x{status}"]
    state = destination(engine)
    assert (state["paused"], state["down"], state["failures"]) == (0, 0, 0)


@pytest.mark.parametrize("statuses", [
    ["0110"],            # processing failure
    ["D000", "0105"],    # anything else: not in the table
], ids="-".join)
def test_bounded_status_retries_bounded_attempts_times_then_dead_letters(statuses, engine_factory,
                                                                         answering_scp, tmp_path):
    scp = answering_scp
    poison = {status: answered_with(tmp_path, status) for status in statuses}
    good = sr(tmp_path, "good")
    engine = engine_factory(destinations=[dest(scp.port)])
    send(engine, *poison.values(), good)
    assert settled(engine, uid_of(good), "delivered", max_attempts=1)["attempts"] == 1
    for status, path in poison.items():
        uid = uid_of(path)
        d = settled(engine, uid, "dead", max_attempts=3)
        assert (d["attempts"], d["last_status"], d["last_class"]) == (3, f"0x{status}", "bounded/message")
        assert events(engine, uid) == ["retry_scheduled", "retry_scheduled", "dead_lettered"]
        assert [r["status_hex"] for r in stores_seen(scp, uid)] == [f"0x{status}"] * 3
    state = destination(engine)
    assert (state["paused"], state["down"]) == (0, 0)


def test_0124_not_authorized_pauses_the_destination_and_keeps_the_queue(engine_factory, fault_scp,
                                                                         tmp_path):
    first, second = sr(tmp_path, "first"), sr(tmp_path, "second")
    scp = fault_scp("--status-sequence", "0124,0000")     # 0000 from the second C-STORE on
    engine = engine_factory(destinations=[dest(scp.port)])
    send(engine, first, second)
    state = became(engine, "paused")
    assert "not authorized" in state["pause_reason"]
    d = delivery(engine, uid_of(first))
    # Queued, and the attempt is not held against the object.
    assert (d["state"], d["attempts"], d["last_status"], d["last_class"]) == (
        "pending", 0, "0x0124", "permanent/destination")
    poll(lambda: delivery(engine, uid_of(second))["state"] == "pending",
         message="the rest of the batch back in the queue")
    assert events(engine) == ["destination_paused"]
    # One C-STORE told the engine enough: the rest of the batch stays, nothing is retried.
    assert holds(lambda: len(stores_seen(scp)) == 1, HOLD_S), stores_seen(scp)
    resume(engine)
    for path in (first, second):
        assert settled(engine, uid_of(path), "delivered")["attempts"] == 1
        assert stores_seen(scp, uid_of(path))[-1]["status"] == 0


@pytest.mark.parametrize("peer", [
    "fault_scp --no-response",      # DIMSE timeout
    "fault_scp --abort-on-store",   # A-ABORT instead of a response
    "storescp --abort-after",       # A-ABORT after the C-STORE-RQ, before the response
    "storescp --abort-during",      # A-ABORT while the data set comes in
    "storescp --sleep-during 1",    # slower than dimse_timeout_s: DIMSE timeout
])
def test_no_response_timeout_or_abort_is_transient_then_delivered(peer, engine_factory, storescp_factory,
                                                                 fault_scp, tmp_path):
    scp = start_peer(peer, fault_scp, storescp_factory)
    engine = engine_factory(destinations=[dest(scp.port, dimse_timeout_s=0.5)])
    uid, = send(engine, sr(tmp_path))
    poll(lambda: delivery(engine, uid)["attempts"] >= 1 or dead_count(engine), message="a first attempt")
    d = delivery(engine, uid)
    assert d["state"] in ("pending", "in_flight") and d["last_class"] == "transient/destination", d
    assert stores_seen(scp, uid), "the peer never saw the C-STORE"
    scp = restart_plain(scp, fault_scp)
    d = settled(engine, uid, "delivered")
    assert d["attempts"] >= 2
    assert set(events(engine, uid)) == {"retry_scheduled", "delivered"}
    if isinstance(scp, StoreSCP):
        assert poll(lambda: storescp_uids(scp)) == [uid]
    else:
        assert stores_seen(scp, uid)[-1]["status"] == 0


# == Association ==================================================================

@pytest.mark.parametrize("triple", [(2, 3, 1), (2, 3, 2)], ids=lambda t: "RJ-%d-%d-%d" % t)
def test_transient_rejection_retries_marks_down_then_delivers(triple, engine_factory, fault_scp, tmp_path):
    scp = fault_scp("--reject", ",".join(map(str, triple)))
    engine = engine_factory(destinations=[dest(scp.port)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, "down")
    assert state["paused"] == 0 and state["failures"] >= 3
    assert state["last_status"] == "A-ASSOCIATE-RJ %d/%d/%d" % triple
    d = delivery(engine, uid)
    assert d["state"] in ("pending", "in_flight") and d["attempts"] >= 3, d
    assert d["last_class"] == "transient/destination"
    poll(lambda: len(rejections(scp)) >= 3, message="3 rejections recorded by the peer")
    assert set(rejections(scp)) == {triple}
    assert stores_seen(scp) == []
    scp = restart_plain(scp, fault_scp)
    settled(engine, uid, "delivered")
    assert events(engine) == ["destination_down", "destination_up"]
    assert stores_seen(scp, uid)[-1]["status"] == 0


def test_rj_2_2_1_failed_user_identity_is_bounded_then_pauses(engine_factory, fault_scp, tmp_path):
    # A real 2/2/1: pynetdicom's own answer when the SCP's user identity handler refuses.
    scp = fault_scp("--require-user", "alice:secret")
    passcode = tmp_path / "passcode"
    passcode.write_text("wrong\n")
    passcode.chmod(0o600)                # a passcode file others can read is a config error
    engine = engine_factory(destinations=[dest(scp.port, username="alice", passcode_file=str(passcode),
                                               down_after=10)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, "paused")
    assert "user identity" in state["pause_reason"]
    d = delivery(engine, uid)
    assert (d["state"], d["last_status"]) == ("pending", "A-ASSOCIATE-RJ 2/2/1"), d
    # Exactly bounded_attempts associations, then nothing until an operator resumes.
    poll(lambda: len(rejections(scp)) >= 3, message="3 rejections recorded by the peer")
    assert holds(lambda: len(rejections(scp)) == 3, HOLD_S), rejections(scp)
    assert set(rejections(scp)) == {(2, 2, 1)}
    assert [a["verified"] for a in scp.associations() if a["event"] == "user_id"] == [False] * 3
    assert events(engine) == ["destination_paused"]
    assert stores_seen(scp) == []


@pytest.mark.parametrize("peer, called_ae, triple", [
    ("fault_scp --reject 1,1,3", "PACS", (1, 1, 3)),    # calling AE title not recognized
    ("fault_scp", "WRONG", (1, 1, 7)),                  # a real 1/1/7: FaultSCP checks the called AE
    ("fault_scp --reject 1,1,2", "PACS", (1, 1, 2)),    # application context name not supported
    ("fault_scp --reject 1,2,2", "PACS", (1, 2, 2)),
    ("storescp --refuse", "PACS", (1, 1, 1)),           # DCMTK: rejected permanent, no reason given
], ids=["RJ-1-1-3", "RJ-1-1-7", "RJ-1-1-2", "RJ-1-2-2", "storescp-refuse"])
def test_permanent_rejection_pauses_the_destination_and_keeps_the_queue(peer, called_ae, triple,
                                                                        engine_factory, storescp_factory,
                                                                        fault_scp, tmp_path):
    scp = start_peer(peer, fault_scp, storescp_factory)
    if isinstance(scp, StoreSCP):
        # Minus the fixture's probe, refused too (see start_storescp).
        refused = lambda: scp.log_text().count("Refusing Association") - 1
    else:
        refused = lambda: len(rejections(scp))
    engine = engine_factory(destinations=[dest(scp.port, ae_title=called_ae)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, "paused")
    assert "check the destination's AE titles" in state["pause_reason"]
    if isinstance(scp, FaultSCP):
        poll(lambda: rejections(scp) == [triple], message="the rejection recorded by the peer")
    # One association told the engine enough; none while paused.
    assert holds(lambda: refused() == 1, HOLD_S), refused()
    d = delivery(engine, uid)
    assert (d["state"], d["attempts"], d["last_status"], d["last_class"]) == (
        "pending", 0, "A-ASSOCIATE-RJ %d/%d/%d" % triple, "permanent/destination")


@pytest.mark.parametrize("case", ["sop-class", "compressed"])
def test_refused_presentation_context_dead_letters_that_object(case, engine_factory, fault_scp, tmp_path):
    if case == "sop-class":
        poison = sr(tmp_path, "poison")
        good = dicomgen.save(dicomgen.make_image(pixel_bytes=512), tmp_path / "in" / "ct.dcm")
        scp = fault_scp("--reject-sop-class", dicomgen.BASIC_TEXT_SR)
    else:   # a compressed object; the peer takes uncompressed syntaxes only
        poison = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
        assert str(dcmread(poison).file_meta.TransferSyntaxUID) == JPEG_BASELINE
        good = sr(tmp_path, "good")
        scp = fault_scp("--transfer-syntaxes", f"{EXPLICIT_LE},{IMPLICIT_LE}")
    engine = engine_factory(destinations=[dest(scp.port)])
    # The poison comes alone: the association offers nothing else the peer would take.
    poison_uid, = send(engine, poison)
    d = settled(engine, poison_uid, "dead", max_attempts=1)
    assert (d["attempts"], d["last_status"], d["last_class"]) == (
        1, "no presentation context", "permanent/message")
    good_uid, = send(engine, good)
    settled(engine, good_uid, "delivered", max_attempts=1)
    assert stores_seen(scp, poison_uid) == []
    assert [r["status"] for r in stores_seen(scp, good_uid)] == [0]
    state = destination(engine)
    assert (state["paused"], state["down"]) == (0, 0)


@pytest.mark.parametrize("peer", ["fault_scp --transfer-syntaxes " + IMPLICIT_LE, "storescp +xi"],
                         ids=["fault_scp", "storescp"])
def test_uncompressed_object_goes_in_another_uncompressed_syntax(peer, engine_factory, storescp_factory,
                                                                 fault_scp, tmp_path):
    path = sr(tmp_path)     # explicit VR little endian; the peer takes implicit only
    scp = start_peer(peer, fault_scp, storescp_factory)
    engine = engine_factory(destinations=[dest(scp.port)])
    uid, = send(engine, path)
    assert settled(engine, uid, "delivered", max_attempts=1)["attempts"] == 1
    if isinstance(scp, StoreSCP):
        got = dcmread(poll(lambda: scp.received_files())[0])
        assert str(got.file_meta.TransferSyntaxUID) == IMPLICIT_LE
    else:
        row, = stores_seen(scp, uid)
        assert row["transfer_syntax"] == IMPLICIT_LE
        got = read_dataset(DicomBytesIO(scp.raw(row["sha256"])), True, True)
    sent = dcmread(path)
    assert (got.SOPInstanceUID, got.PatientID, got.ContentSequence[0].TextValue) == (
        sent.SOPInstanceUID, sent.PatientID, sent.ContentSequence[0].TextValue)


class ResettingPeer:
    """Accepts TCP connections and resets them at once (RST), counting them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def transport_fault(request):
    """(kind, host, port, peer): connection refused, DNS failure, connect timeout (a
    listener whose accept queue is full: SYNs are dropped), reset after the accept."""
    kind = request.param
    if kind == "refused":   # (a FaultSCP is started on that port later)
        yield kind, "127.0.0.1", free_port(), None
    elif kind == "dns":
        yield kind, "mfconsole-test.invalid", 11112, None
    elif kind == "connect-timeout":
        with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
            with socket.create_connection(full.getsockname()):
                yield kind, "127.0.0.1", full.getsockname()[1], None
    else:
        peer = ResettingPeer()
        yield kind, "127.0.0.1", peer.port, peer
        peer.close()


@pytest.mark.parametrize("transport_fault", ["refused", "dns", "connect-timeout", "reset"], indirect=True)
def test_transport_failure_is_transient_destination(transport_fault, engine_factory, fault_scp, tmp_path):
    kind, host, port, peer = transport_fault
    # (a host that is not loopback needs TLS or allow_cleartext; the DNS case is about the name)
    extra = {"allow_cleartext": True} if host != "127.0.0.1" else {}
    engine = engine_factory(destinations=[dest(port, host=host, connect_timeout_s=0.3, **extra)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, "down")
    assert state["paused"] == 0 and state["failures"] >= 3 and state["last_status"] == "transport"
    d = delivery(engine, uid)
    assert d["state"] in ("pending", "in_flight") and d["attempts"] >= 3, d
    assert d["last_class"] == "transient/destination"
    if kind != "reset":    # (a reset may come before or after pynetdicom counts the connection)
        assert "cannot connect" in d["last_reason"], d["last_reason"]
    assert events(engine) == ["destination_down"]
    if peer is not None:
        assert peer.connections >= 3
    if kind == "refused":   # the peer comes up: the next probe delivers
        scp = fault_scp(port=port)
        settled(engine, uid, "delivered")
        assert [r["status"] for r in stores_seen(scp, uid)] == [0]
        assert events(engine) == ["destination_down", "destination_up"]


# The TLS rows of the association table (verification failure → pause; I/O error
# mid-handshake → retry) are checked against storescp +tls in test_tls.py
# (test_dimse_destination_into_storescp_over_tls, test_a_handshake_cut_short_is_retried_not_paused).

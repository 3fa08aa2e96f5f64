"""Every per-destination option of a ``kind = "dimse"`` destination (config.toml,
[[destinations]]) is applied, shown against real network peers on loopback:

connect_timeout_s   a listener whose accept queue is full (SYNs dropped)
acse_timeout_s      a TCP peer that accepts and never answers the A-ASSOCIATE-RQ
dimse_timeout_s     FaultSCP --no-response, then FaultSCP answering normally
network_timeout_s   pynetdicom's idle timer (an association silent for that long is
                    aborted) and the socket read deadline (a peer that stops half-way
                    through its C-STORE-RSP PDU and keeps the connection open)
username, passcode_file   FaultSCP --require-user (A-ASSOCIATE-RJ 2/2/1 on mismatch)
priority            the Priority field of the C-STORE-RQ the peer received
(transfer syntaxes) the uncompressed fallback, and the refusal to transcode
calling_ae_title    the Calling AE Title the peer saw
max_associations, idle_timeout_s   association reuse and release when idle

Assertions are on what the peer saw (FaultSCP's received.jsonl/associations.jsonl) and
what the engine recorded (deliveries, audit, destination_state). Durations are measured
from the delivery row's creation (the ingest commit) to the audit row of the attempt.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID


import dicomgen
from fault_scp import FaultSCP
from harness import holds, poll, store_files
from mfconsole.engine import logs, outbox
# dimse_dest: a destination named "pacs", called AE "PACS", with FAST_RETRY's policy.
from test_forward_dimse import deliveries, dimse_dest

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
# One attempt, then nothing for a long while: the first failure can be timed alone.
ONE_ATTEMPT = {"retry_initial_s": 60, "retry_max_s": 60}


# -- peers ------------------------------------------------------------------------

@pytest.fixture
def fault_scp(tmp_path):
    """``fault_scp(*options, name=..., port=None)``: a started FaultSCP, AE title PACS,
    recording to ``tmp_path/<name>``."""
    started: list[FaultSCP] = []

    def make(*args: str, name: str, port: int | None = None) -> FaultSCP:
        scp = FaultSCP(port, *args, record_dir=tmp_path / name, ae_title="PACS")
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()


class BlackHole:
    """A listening socket whose accept queue is full: Linux drops further SYNs, so a
    connect() is neither accepted nor refused until the caller gives up. (A non-routable
    address is no good here: this sandbox connects to 10.255.255.1.)"""

    def __enter__(self) -> "BlackHole":
        self.server = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.server.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", self.port))
            except TimeoutError:
                probe.close()
                return self      # the queue is full: this connect was not answered
            self.fillers.append(probe)
        self.__exit__()
        raise RuntimeError("could not fill the accept queue of a backlog-0 listener")

    def __exit__(self, *exc: Any) -> None:
        for s in self.fillers:
            s.close()
        self.server.close()


class LoopbackServer:
    """A TCP server on 127.0.0.1 with an accept thread; ``handle(conn)`` per connection.
    ``close()`` closes the listener and every socket in ``self.sockets``."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            self.sockets.append(conn)
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.server.close()


class SilentPeer(LoopbackServer):
    """Accepts TCP connections, reads what comes, never answers; keeps them open."""

    def __init__(self) -> None:
        self.first_bytes: list[int] = []       # PDU type of each connection's first PDU
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        first = True
        try:
            while data := conn.recv(65536):
                if first:
                    self.first_bytes.append(data[0])
                    first = False
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class StallingProxy(LoopbackServer):
    """A TCP relay in front of a peer. On its first ``stall`` connections it passes the
    peer's PDUs until the first P-DATA-TF (the C-STORE response), forwards only the PDU
    header and half of that PDU's body, then goes silent with both connections open: a
    peer that hangs mid-PDU. Later connections are relayed untouched."""

    def __init__(self, target_port: int, stall: int = 1) -> None:
        self.target_port = target_port
        self.stall_left = stall
        self.stalled = threading.Event()
        super().__init__()

    def handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self.sockets.append(upstream)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stall, self.stall_left = self.stall_left > 0, self.stall_left - 1
        threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, client, stall), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        for s in (upstream, client):
            s.close()

    def _down(self, upstream: socket.socket, client: socket.socket, stall: bool) -> None:
        try:
            while (header := _recv_exact(upstream, 6)) is not None:
                body = _recv_exact(upstream, struct.unpack(">L", header[2:])[0]) or b""
                if stall and header[0] == 0x04:
                    client.sendall(header + body[:len(body) // 2])
                    self.stalled.set()
                    return         # silent from now on; the sockets stay open
                client.sendall(header + body)
        except OSError:
            pass
        client.close()


# -- the engine side --------------------------------------------------------------

def send(engine, *paths: Path) -> list[str]:
    return store_files(engine.listeners[0].address[1], list(paths))


def srs(folder: Path, count: int = 1) -> list[Path]:
    return dicomgen.write_corpus(folder, count)


def delivery(engine, uid: str, destination: str = "pacs") -> dict:
    reads = engine.store.reader()
    return [d for o in reads.rows("objects", sop_instance_uid=uid)
            for d in reads.rows("deliveries", object_id=o["id"], destination=destination)][0]


def settled(engine, uid: str, state: str, destination: str = "pacs", timeout: float = 15) -> dict:
    return poll(lambda: (d := delivery(engine, uid, destination))["state"] == state and d,
                timeout=timeout, message=f"delivery of {uid} to {destination} to be {state}")


def dest_state(engine, name: str = "pacs") -> dict:
    row = engine.store.reader().destination_state(name)
    return row if row else {"paused": 0, "down": 0, "failures": 0, "pause_reason": None}


def audit(engine, destination: str, event: str) -> list[dict]:
    return engine.store.reader().rows("audit", destination=destination, event=event)


def first_failure(engine, uid: str, destination: str = "pacs", timeout: float = 15) -> tuple[float, dict]:
    """(seconds from the ingest commit to the record of the first failed attempt, that
    attempt's audit row: status, and "attempt 1: <class>: <reason>; next try..." as
    detail)."""
    row = poll(lambda: audit(engine, destination, "retry_scheduled"), timeout=timeout,
               message=f"a first failed attempt for {destination}")[0]
    assert row["detail"].startswith("attempt 1: "), row
    return row["ts"] - delivery(engine, uid, destination)["created_at"], row


def events_of(scp: FaultSCP, name: str) -> list[dict]:
    return [a for a in scp.associations() if a["event"] == name]


def elements(ds: Dataset) -> dict:
    """{tag: value}, sequences as lists of the same, group lengths left out: what an
    object says, whatever its transfer syntax."""
    return {elem.tag: ([elements(item) for item in elem.value] if elem.VR == "SQ" else elem.value)
            for elem in ds if elem.tag.element != 0}


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    ts = UID(transfer_syntax)
    return read_dataset(DicomBytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


def stored_bytes(engine, uid: str) -> bytes:
    oid = engine.store.reader().rows("objects", sop_instance_uid=uid)[0]["id"]
    return engine.store.read_object(oid)


# == timeouts =====================================================================

def test_connect_timeout_s_bounds_a_connect_that_never_completes(engine_factory, tmp_path):
    with BlackHole() as hole:
        engine = engine_factory(destinations=[
            dimse_dest(hole.port, name="fast", connect_timeout_s=1, **ONE_ATTEMPT),
            dimse_dest(hole.port, name="slow", connect_timeout_s=4, **ONE_ATTEMPT)])
        uid, = send(engine, *srs(tmp_path / "in"))
        fast_s, fast = first_failure(engine, uid, "fast", timeout=10)
        slow_s, slow = first_failure(engine, uid, "slow", timeout=15)
    # Upper bounds with room for a loaded machine, yet below the other value (and the
    # defaults: 2 s in FAST_RETRY, 10 s in the engine).
    assert 0.9 <= fast_s < 3, fast_s
    assert 3.9 <= slow_s < 7, slow_s
    for name, attempt, value in (("fast", fast, 1), ("slow", slow, 4)):
        assert attempt["status"] == "transport" and "transient/destination" in attempt["detail"], attempt
        assert f"connect_timeout_s={value}" in attempt["detail"], attempt["detail"]
        assert delivery(engine, uid, name)["state"] == "pending"


def test_acse_timeout_s_bounds_an_unanswered_association_request(engine_factory, tmp_path):
    peer = SilentPeer()
    try:
        engine = engine_factory(destinations=[
            dimse_dest(peer.port, name="fast", acse_timeout_s=1, **ONE_ATTEMPT),
            dimse_dest(peer.port, name="slow", acse_timeout_s=4, **ONE_ATTEMPT)])
        uid, = send(engine, *srs(tmp_path / "in"))
        fast_s, fast = first_failure(engine, uid, "fast", timeout=10)
        slow_s, slow = first_failure(engine, uid, "slow", timeout=15)
    finally:
        peer.close()
    assert peer.first_bytes == [0x01, 0x01], "expected one A-ASSOCIATE-RQ per destination"
    assert 0.9 <= fast_s < 3, fast_s         # the defaults: 5 s in FAST_RETRY, 30 s in the engine
    assert 3.9 <= slow_s < 7, slow_s
    for name, attempt, value in (("fast", fast, 1), ("slow", slow, 4)):
        assert "transient/destination" in attempt["detail"], attempt
        assert delivery(engine, uid, name)["state"] == "pending"
        # The peer accepted the TCP connection and then said nothing: we gave up on the
        # association request; it did not abort anything.
        assert f"acse_timeout_s={value}" in attempt["detail"], attempt["detail"]


def test_dimse_timeout_s_bounds_an_unanswered_c_store_then_delivers(engine_factory, fault_scp, tmp_path):
    silent = fault_scp("--no-response", name="silent")
    engine = engine_factory(destinations=[dimse_dest(silent.port, dimse_timeout_s=1, retry_initial_s=0.3)])
    uid, = send(engine, *srs(tmp_path / "in"))
    seconds, attempt = first_failure(engine, uid)
    assert 0.9 <= seconds < 3.5, seconds     # FAST_RETRY's default would be 5 s
    assert attempt["status"] == "no response" and "transient/destination" in attempt["detail"], attempt
    assert "dimse_timeout_s=1" in attempt["detail"], attempt["detail"]
    assert [r["action"] for r in silent.received() if r["sop_instance_uid"] == uid][:1] == ["no-response"]
    port = silent.port
    silent.stop()
    answering = fault_scp(name="answering", port=port)
    d = settled(engine, uid, "delivered")
    assert d["attempts"] >= 2
    assert [r["status"] for r in answering.received() if r["sop_instance_uid"] == uid] == [0]
    assert deliveries(engine).get("dead", 0) == 0


def test_network_timeout_s_aborts_an_association_silent_that_long(engine_factory, fault_scp, tmp_path):
    """pynetdicom 3's network_timeout on a requestor is the DUL idle timer: restarted
    by every PDU received, checked by the association's reactor; when it expires the
    association is aborted (Association._run_reactor, network_timeout_response). Here
    it is shorter than idle_timeout_s, so it is what ends the idle association."""
    scp = fault_scp(name="scp")
    engine = engine_factory(destinations=[dimse_dest(scp.port, network_timeout_s=1, idle_timeout_s=30)])
    first, second = srs(tmp_path / "in", 2)
    uid, = send(engine, first)
    settled(engine, uid, "delivered")
    t0 = time.monotonic()
    poll(lambda: events_of(scp, "aborted"), timeout=5, message="the idle association aborted")
    assert 0.3 <= time.monotonic() - t0 < 4
    assert events_of(scp, "released") == []
    # The engine notices on its next object and associates again.
    uid, = send(engine, second)
    assert settled(engine, uid, "delivered")["attempts"] == 1
    assert len(events_of(scp, "accepted")) == 2


def test_network_timeout_s_bounds_a_peer_that_stops_mid_pdu(engine_factory, fault_scp, tmp_path):
    """The peer sends half of its C-STORE-RSP PDU and then nothing, connection open.
    pynetdicom's DUL thread is then inside a blocking recv() of the PDU's remainder;
    only a socket deadline (network_timeout_s) gets it out. Without one the DIMSE
    timeout expires, the sender aborts, and Association.abort() waits for a DUL that
    never returns: the worker hangs for good."""
    scp = fault_scp(name="scp")
    proxy = StallingProxy(scp.port, stall=1)
    try:
        engine = engine_factory(destinations=[dimse_dest(proxy.port, network_timeout_s=1, dimse_timeout_s=6,
                                                         retry_initial_s=0.3)])
        uid, = send(engine, *srs(tmp_path / "in"))
        assert proxy.stalled.wait(5), "the C-STORE response never came through the proxy"
        seconds, attempt = first_failure(engine, uid, timeout=10)
        assert seconds < 4.5, f"{seconds:.1f} s: network_timeout_s=1 was not what ended the wait"
        assert "transient/destination" in attempt["detail"], attempt
        assert "network_timeout_s=1" in attempt["detail"], attempt["detail"]
        # The second association goes through the proxy untouched.
        assert settled(engine, uid, "delivered")["attempts"] == 2
    finally:
        proxy.close()   # before the engine stops: a hung worker gets its recv() back


# == user identity ================================================================

PASSCODE = "Pc-7f3a91-s3cret"
WRONG_PASSCODE = "Wr-0be44c-n0tit"


def test_user_identity_username_and_passcode_file(engine_factory, fault_scp, tmp_path, caplog):
    folder = tmp_path / "engine"                     # where engine_factory writes config.toml
    (folder / "secrets").mkdir(parents=True)
    for name, text in (("carol.passcode", PASSCODE), ("dave.passcode", WRONG_PASSCODE)):
        (folder / "secrets" / name).write_text(text + "\n")
        (folder / "secrets" / name).chmod(0o600)
    alice = fault_scp("--require-user", "alice", name="alice")
    carol = fault_scp("--require-user", f"carol:{PASSCODE}", name="carol")
    dave = fault_scp("--require-user", f"dave:{PASSCODE}", name="dave")
    policy = {"retry_initial_s": 0.2, "retry_max_s": 0.4, "down_after": 10, "bounded_attempts": 3}
    engine = engine_factory(folder="engine", destinations=[
        dimse_dest(alice.port, name="user_only", username="alice", **policy),
        # passcode_file relative to the config file's folder
        dimse_dest(carol.port, name="with_passcode", username="carol",
                   passcode_file="secrets/carol.passcode", **policy),
        dimse_dest(dave.port, name="wrong_passcode", username="dave",
                   passcode_file="secrets/dave.passcode", **policy)])
    # Everything the engine logs from here on, DEBUG included, must be free of passcodes
    # (the engine's own logging set-up again, at DEBUG; the next engine resets it).
    logs.setup(engine.data_dir / "logs", "DEBUG", stderr=False)
    uid, = send(engine, *srs(tmp_path / "in"))

    settled(engine, uid, "delivered", "user_only")
    [ident] = events_of(alice, "user_id")
    assert (ident["username"], ident["user_id_type"], ident["verified"]) == ("alice", 1, True)
    assert [a["username"] for a in events_of(alice, "accepted")] == ["alice"]

    settled(engine, uid, "delivered", "with_passcode")
    [ident] = events_of(carol, "user_id")
    assert (ident["username"], ident["user_id_type"], ident["verified"]) == ("carol", 2, True)
    assert [a["username"] for a in events_of(carol, "accepted")] == ["carol"]

    # Wrong passcode: A-ASSOCIATE-RJ 2/2/1, bounded_attempts tries, then paused; the
    # object stays queued (it is not at fault) and nothing is dead-lettered.
    poll(lambda: dest_state(engine, "wrong_passcode")["paused"], message="wrong_passcode paused")
    assert "user identity" in dest_state(engine, "wrong_passcode")["pause_reason"]
    d = delivery(engine, uid, "wrong_passcode")
    assert (d["state"], d["last_status"]) == ("pending", "A-ASSOCIATE-RJ 2/2/1"), d
    # (FaultSCP records a rejection after the A-ASSOCIATE-RJ went out: polled for)
    poll(lambda: len(events_of(dave, "rejected")) >= 3, message="three rejections recorded")
    assert holds(lambda: len(events_of(dave, "rejected")) == 3), events_of(dave, "rejected")
    assert [(a["username"], a["user_id_type"], a["verified"]) for a in events_of(dave, "user_id")] == [
        ("dave", 2, False)] * 3
    assert deliveries(engine).get("dead", 0) == 0
    assert dave.received() == []

    # The passcodes (right and wrong) are in no log and nowhere in the data directory
    # (database, WAL, logs, blobs).
    log_file = engine.data_dir / "logs" / "mfconsole.log"
    assert "wrong_passcode" in log_file.read_text()          # the log is written at all
    for secret in (PASSCODE, WRONG_PASSCODE):
        assert secret not in caplog.text
        for path in engine.data_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


# == priority and calling AE title ================================================

def test_priority_and_calling_ae_title_reach_the_peer(engine_factory, fault_scp, tmp_path):
    peers = {name: fault_scp(name=name) for name in ("high", "low", "medium")}
    engine = engine_factory(destinations=[
        dimse_dest(peers["high"].port, name="high", priority="high", calling_ae_title="MF_HIGH"),
        dimse_dest(peers["low"].port, name="low", priority="low", calling_ae_title="MF_LOW"),
        dimse_dest(peers["medium"].port, name="medium", calling_ae_title="MF_DEFAULT")])  # defaults
    uids = send(engine, *srs(tmp_path / "in", 2))
    for name in peers:
        for uid in uids:
            settled(engine, uid, "delivered", name)
    # PS3.7 9.1.1.1 Priority: LOW = 0002H, MEDIUM = 0000H, HIGH = 0001H.
    expected = {"high": (1, "MF_HIGH"), "low": (2, "MF_LOW"), "medium": (0, "MF_DEFAULT")}
    for name, (priority, calling) in expected.items():
        rows = peers[name].received()
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(uids), name
        assert {(r["priority"], r["calling_ae"], r["called_ae"]) for r in rows} == {(priority, calling, "PACS")}, rows
        assert {a["calling_ae"] for a in events_of(peers[name], "accepted")} == {calling}


# == transfer syntaxes ============================================================

def test_uncompressed_fallback_reencodes_without_changing_an_element(engine_factory, fault_scp, tmp_path):
    scp = fault_scp("--transfer-syntaxes", IMPLICIT_LE, name="implicit_only")
    engine = engine_factory(destinations=[dimse_dest(scp.port)])
    files = [dicomgen.save(dicomgen.make_sr(), tmp_path / "in" / "sr.dcm"),
             dicomgen.save(dicomgen.make_image(pixel_bytes=4096), tmp_path / "in" / "ct.dcm")]
    uids = send(engine, *files)
    for uid in uids:
        assert settled(engine, uid, "delivered")["attempts"] == 1
        held = engine.store.reader().rows("objects", sop_instance_uid=uid)[0]["transfer_syntax"]
        assert held == EXPLICIT_LE
        [row] = [r for r in scp.received() if r["sop_instance_uid"] == uid]
        assert (row["transfer_syntax"], row["status"]) == (IMPLICIT_LE, 0)
        ours, theirs = stored_bytes(engine, uid), scp.raw(row["sha256"])
        assert ours != theirs          # re-encoded, not passed through
        assert elements(decode(theirs, IMPLICIT_LE)) == elements(decode(ours, EXPLICIT_LE))


@pytest.mark.parametrize("with_uncompressed", [True, False], ids=["batch", "alone"])
def test_compressed_object_the_peer_refuses_is_dead_lettered_not_transcoded(
        with_uncompressed, engine_factory, fault_scp, tmp_path):
    """The peer takes uncompressed syntaxes only. The JPEG object is a message-scope
    dead letter on its first attempt (status-classes.md: presentation context rejected
    = permanent, message), first in its batch or alone; the uncompressed object of the
    same SOP class behind it is delivered, and the destination is never held at fault."""
    scp = fault_scp("--transfer-syntaxes", f"{IMPLICIT_LE},{EXPLICIT_LE}", name="uncompressed_only")
    engine = engine_factory(destinations=[dimse_dest(scp.port, retry_initial_s=0.2, retry_max_s=0.5)])
    jpeg = Path(get_testdata_file("JPEG-lossy.dcm"))
    assert dcmread(jpeg, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    files = [jpeg]
    if with_uncompressed:
        files.append(dicomgen.save(dicomgen.make_image(pixel_bytes=4096, sop_class=dicomgen.SECONDARY_CAPTURE),
                                   tmp_path / "in" / "sc.dcm"))
    # Queue both before the worker looks: one batch, the JPEG first.
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    uids = send(engine, *files)
    engine.store.call(outbox.resume, "pacs")

    d = settled(engine, uids[0], "dead", timeout=8)
    assert (d["attempts"], d["last_status"], d["last_class"]) == (1, "no presentation context",
                                                                  "permanent/message"), d
    assert re.search(r"peer does not accept JPEG .+ for Secondary Capture Image Storage; "
                     r"mfconsole does not transcode", d["last_reason"]), d["last_reason"]
    if with_uncompressed:
        assert settled(engine, uids[1], "delivered")["attempts"] == 1
        assert [r["status"] for r in scp.received() if r["sop_instance_uid"] == uids[1]] == [0]
    assert [r for r in scp.received() if r["sop_instance_uid"] == uids[0]] == []
    assert audit(engine, "pacs", "retry_scheduled") == []
    state = dest_state(engine)
    assert (state["down"], state["failures"]) == (0, 0), state
    assert deliveries(engine).get("dead") == 1


# == association reuse ============================================================

def test_max_associations_and_idle_timeout_s(engine_factory, fault_scp, tmp_path):
    # 20 ms per C-STORE at the peer: a batch keeps its association busy long enough
    # for a second worker to join while the backlog is deep.
    scp = fault_scp("--delay-s", "0.02", name="scp")
    engine = engine_factory(destinations=[dimse_dest(scp.port, max_associations=2, idle_timeout_s=2)])
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    uids = send(engine, *srs(tmp_path / "burst", 100))
    engine.store.call(outbox.resume, "pacs")
    poll(lambda: deliveries(engine).get("delivered") == 100, timeout=30, message="100 delivered")
    assert sorted({r["sop_instance_uid"] for r in scp.received()}) == sorted(uids)
    # A deep backlog uses max_associations associations at once, never more, each
    # reused for many objects.
    open_now = peak = 0
    for a in scp.associations():
        open_now += {"accepted": 1, "released": -1, "aborted": -1}.get(a["event"], 0)
        peak = max(peak, open_now)
    assert peak == 2, scp.associations()
    assert len(events_of(scp, "accepted")) == 2, scp.associations()
    poll(lambda: len(events_of(scp, "released")) == 2, timeout=6, message="the burst's associations released")

    # Empty queue: one object on a fresh association, released by us (A-RELEASE, not
    # an abort) idle_timeout_s after it was last used.
    uid, = send(engine, *srs(tmp_path / "single"))
    settled(engine, uid, "delivered")
    delivered = time.monotonic()
    assert len(events_of(scp, "accepted")) == 3
    poll(lambda: len(events_of(scp, "released")) == 3, timeout=6, message="the idle association released")
    released_after = time.monotonic() - delivered
    assert 1.7 <= released_after < 4.5, released_after
    assert events_of(scp, "aborted") == []

"""Forwarding through mfconsole's own C-STORE SCU (mfconsole/ul/sender.py on
mfconsole/ul/requestor.py) against real peers: DCMTK storescp (one association at a
time, and --fork), Orthanc, and FaultSCP (pynetdicom) in its fault modes: what the
peer holds, byte for byte, and the outcome classes the engine recorded."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

import dicomgen
from fault_scp import FaultSCP
from harness import holds, poll, store_files, stored_sha256
from test_forward_dimse import deliveries, received_by_storescp, same_elements, storescu
from test_forward_outcomes import (HOLD_S, POLICY, became, delivery, destination, rejections, send,
                                   settled, sr, stores_seen, uid_of)

def dest(port: int, **extra) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "PACS",
            **POLICY, **extra}


@pytest.fixture
def fault_scp(tmp_path):
    started: list[FaultSCP] = []

    def make(*args: str, port: int | None = None) -> FaultSCP:
        scp = FaultSCP(port, *args, record_dir=tmp_path / f"fault_scp{len(started)}", ae_title="PACS")
        started.append(scp)
        return scp.start()

    yield make
    for scp in started:
        scp.stop()


def corpus(tmp_path: Path, sr_count: int = 40, ct_count: int = 5) -> list[Path]:
    files = dicomgen.write_corpus(tmp_path / "sr", sr_count)
    return files + dicomgen.write_corpus(tmp_path / "ct", ct_count, kind="ct", pixel_bytes=300 * 1024)


@pytest.mark.parametrize("scp_args", [("-B",), ("-B", "--fork"), ("-B", "-pdu", "4096")],
                         ids=["one-at-a-time", "fork", "max-pdu-4k"])
def test_sr_and_ct_reach_storescp_byte_identical(scp_args, engine_factory, storescp_factory, tmp_path):
    scp = storescp_factory(*scp_args)
    engine = engine_factory(destinations=[dest(scp.port, max_associations=2)])
    files = corpus(tmp_path)
    implicit = dicomgen.save(dicomgen.make_sr(), tmp_path / "implicit.dcm", implicit=True)
    port = engine.listeners[0].address[1]
    assert storescu(port, files).returncode == 0
    assert storescu(port, [implicit], "-xi").returncode == 0
    expected = stored_sha256(engine.data_dir, engine.config.store.key_file)
    assert len(expected) == 46
    poll(lambda: deliveries(engine).get("delivered") == 46, timeout=60)
    poll(lambda: len(scp.received_files()) >= 46, timeout=30)
    assert received_by_storescp(scp) == expected
    # (-pdu 4096: DCMTK refuses a P-DATA-TF longer than it announced, so delivery
    # itself shows we fragmented to the AC's maximum length; the pipelining peer below
    # measures it.)


def test_to_orthanc_elements_identical(engine_factory, orthanc, tmp_path):
    engine = engine_factory(destinations=[dest(orthanc.dicom_port, ae_title=orthanc.ae_title)])
    files = corpus(tmp_path, 10, 2)
    assert storescu(engine.listeners[0].address[1], files).returncode == 0
    poll(lambda: deliveries(engine).get("delivered") == len(files), timeout=60)
    digests = stored_sha256(engine.data_dir, engine.config.store.key_file)
    with httpx.Client(base_url=orthanc.base_url, trust_env=False, timeout=30) as web:
        for path in files:
            uid = uid_of(path)
            found = web.post("/tools/lookup", content=uid).json()
            assert found, f"{path.name} not in Orthanc"
            held = tmp_path / f"orthanc-{path.name}"
            held.write_bytes(web.get(f"/instances/{found[0]['ID']}/file").content)
            data, ts = dicomgen.dataset_bytes(held)
            oid = engine.store.reader().rows("objects", sop_instance_uid=uid)[0]["id"]
            sent = engine.store.read_object(oid)
            assert hashlib.sha256(sent).hexdigest() == digests[uid]
            assert same_elements(sent, data, ts), path.name


def test_to_pynetdicom_scp_byte_identical_with_priority(engine_factory, fault_scp, tmp_path):
    scp = fault_scp()
    engine = engine_factory(destinations=[dest(scp.port, priority="high")])
    files = corpus(tmp_path, 20, 2)
    send(engine, *files)
    poll(lambda: deliveries(engine).get("delivered") == len(files), timeout=60)
    digests = stored_sha256(engine.data_dir, engine.config.store.key_file)
    got = {r["sop_instance_uid"]: r for r in scp.received()}
    assert {u: r["sha256"] for u, r in got.items()} == digests
    assert {r["priority"] for r in got.values()} == {1}     # PS3.7: HIGH is 1
    assert {r["calling_ae"] for r in got.values()} == {"MFCONSOLE"}
    # (SR first, then CT: a new association proposing both, as the pynetdicom sender does)
    assert all(a["tcp_nodelay"] for a in scp.associations() if a["event"] == "accepted")
    assert not [a for a in scp.associations() if a["event"] == "aborted"]


def test_status_per_object(engine_factory, fault_scp, tmp_path):
    uids = {s: generate_uid() for s in ("B000", "C000", "0110", "A700")}
    scp = fault_scp(*[f"--status-for={u}={s}" for s, u in uids.items() if s != "A700"])
    paths = {}
    for status, uid in uids.items():
        ds = dicomgen.make_sr()
        ds.SOPInstanceUID = uid
        paths[status] = dicomgen.save(ds, tmp_path / "in" / f"{status}.dcm")
    good = sr(tmp_path, "good")
    engine = engine_factory(destinations=[dest(scp.port)])
    send(engine, paths["B000"], paths["C000"], paths["0110"], good)
    d = settled(engine, uids["B000"], "delivered", max_attempts=1)
    assert (d["last_status"], d["last_class"]) == ("0xB000", "warning/message")
    d = settled(engine, uids["C000"], "dead", max_attempts=1)
    assert (d["last_status"], d["last_class"]) == ("0xC000", "permanent/message")
    d = settled(engine, uids["0110"], "dead", max_attempts=3)
    assert (d["attempts"], d["last_class"]) == (3, "bounded/message")
    settled(engine, uid_of(good), "delivered", max_attempts=1)
    assert (destination(engine)["paused"], destination(engine)["down"]) == (0, 0)


@pytest.mark.parametrize("args, called_ae, triple, flag", [
    (("--reject", "1,1,3"), "PACS", (1, 1, 3), "paused"),
    ((), "WRONG", (1, 1, 7), "paused"),
    (("--reject", "2,3,1"), "PACS", (2, 3, 1), "down"),
], ids=["RJ-1-1-3", "RJ-1-1-7", "RJ-2-3-1"])
def test_rejection_outcomes(args, called_ae, triple, flag, engine_factory, fault_scp, tmp_path):
    scp = fault_scp(*args)
    engine = engine_factory(destinations=[dest(scp.port, ae_title=called_ae)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, flag)
    assert state["last_status"] == "A-ASSOCIATE-RJ %d/%d/%d" % triple
    poll(lambda: rejections(scp), message="the rejection recorded by the peer")
    assert set(rejections(scp)) == {triple}
    d = delivery(engine, uid)
    assert d["state"] in ("pending", "in_flight")
    if flag == "paused":
        assert "check the destination's AE titles" in state["pause_reason"]
        assert holds(lambda: len(rejections(scp)) == 1, HOLD_S)
        assert (d["attempts"], d["last_class"]) == (0, "permanent/destination")
    else:
        assert d["last_class"] == "transient/destination"
    assert stores_seen(scp) == []


def test_user_identity_accepted_and_refused(engine_factory, fault_scp, tmp_path):
    folder = tmp_path / "engine"
    folder.mkdir()
    for name, text in (("good", "s3cret"), ("bad", "wrong")):
        (folder / name).write_text(text + "\n")
        (folder / name).chmod(0o600)
    alice = fault_scp("--require-user", "alice:s3cret")
    bob = fault_scp("--require-user", "alice:s3cret")
    engine = engine_factory(destinations=[
        {**dest(alice.port), "name": "pacs", "username": "alice", "passcode_file": "good"},
        {**dest(bob.port), "name": "other", "username": "alice", "passcode_file": "bad",
         "down_after": 10}])
    uid, = send(engine, sr(tmp_path))
    settled(engine, uid, "delivered")
    ident = [a for a in alice.associations() if a["event"] == "user_id"]
    assert [(a["username"], a["user_id_type"], a["verified"]) for a in ident] == [("alice", 2, True)]
    poll(lambda: engine.store.reader().destination_state("other")["paused"], timeout=10,
         message="other paused")
    assert set(rejections(bob)) == {(2, 2, 1)}
    assert "user identity" in engine.store.reader().destination_state("other")["pause_reason"]


@pytest.mark.parametrize("position", [12, 0], ids=["amid-others", "first"])
def test_peer_aborting_on_one_object_dead_letters_it_only(position, engine_factory, fault_scp, tmp_path):
    files = dicomgen.write_corpus(tmp_path / "sr", 20)
    poison = uid_of(files[position])
    scp = fault_scp("--abort-for", poison)
    engine = engine_factory(destinations=[dest(scp.port, retry_max_s=0.3)])
    store_files(engine.listeners[0].address[1], files)
    poll(lambda: deliveries(engine) == {"delivered": 19, "dead": 1}, timeout=30,
         message="all delivered but the poison, dead")
    d = delivery(engine, poison)
    assert d["state"] == "dead" and d["last_class"] == "permanent/message", d
    assert "with this object in flight" in d["last_reason"]
    assert [r["sop_instance_uid"] for r in scp.received() if r["action"] == "abort"] == [poison] * 3
    st = destination(engine)
    assert (st["down"], st["paused"]) == (0, 0), st


def test_peer_aborting_everything_is_down_not_dead(engine_factory, fault_scp, tmp_path):
    scp = fault_scp("--abort-on-store")
    engine = engine_factory(destinations=[dest(scp.port, retry_max_s=0.3)])
    store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 4))
    poll(lambda: destination(engine)["down"] == 1, timeout=20, message="destination down")
    poll(lambda: len(scp.received()) >= 8, timeout=30, message="attempts")
    assert "dead" not in deliveries(engine)


def test_no_response_is_ambiguous_then_dead_after_bounded_attempts(engine_factory, fault_scp, tmp_path):
    scp = fault_scp("--no-response")
    engine = engine_factory(destinations=[dest(scp.port, dimse_timeout_s=0.5, down_after=10)])
    uid, = send(engine, sr(tmp_path))
    poll(lambda: delivery(engine, uid)["attempts"] >= 1, message="a first attempt")
    d = delivery(engine, uid)
    assert d["last_class"] == "transient/destination" and "dimse_timeout_s=0.5" in d["last_reason"], d
    d = poll(lambda: delivery(engine, uid)["state"] == "dead" and delivery(engine, uid), timeout=30,
             message="dead letter")
    assert d["last_class"] == "permanent/message", d
    assert [r["action"] for r in stores_seen(scp, uid)][:3] == ["no-response"] * 3


def test_no_response_then_peer_answers_delivers(engine_factory, fault_scp, tmp_path):
    scp = fault_scp("--no-response")
    engine = engine_factory(destinations=[dest(scp.port, dimse_timeout_s=0.5)])
    uid, = send(engine, sr(tmp_path))
    poll(lambda: delivery(engine, uid)["attempts"] >= 1, message="a first attempt")
    port = scp.port
    scp.stop()
    scp = fault_scp(port=port)
    assert settled(engine, uid, "delivered")["attempts"] >= 2
    assert stores_seen(scp, uid)[-1]["status"] == 0


def test_connection_refused_is_transport_failure(engine_factory, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = engine_factory(destinations=[dest(port, connect_timeout_s=0.3)])
    uid, = send(engine, sr(tmp_path))
    state = became(engine, "down")
    assert state["last_status"] == "transport"
    assert "connection refused" in delivery(engine, uid)["last_reason"]


# -- pipelining, against a minimal acceptor that grants an async ops window ----------

class PipeliningPeer:
    """Accepts one association, grants max ops invoked 4 and a 4 KiB maximum PDU, reads
    C-STORE-RQs and answers each only once the next has arrived (the rest when the
    requestor goes quiet): proof that requests are written while earlier responses are
    outstanding. Records the longest P-DATA-TF body it got."""

    def __init__(self, abort_at: int = 0) -> None:
        self.abort_at = abort_at     # A-ABORT instead of reading on, at this request
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.outstanding_max = 0
        self.longest_pdata = 0
        self.stored: list[bytes] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        from mfconsole.ul import dimse, pdu
        from mfconsole.ul.requestor import Association

        conn, _ = self.server.accept()
        conn.settimeout(10)
        reader = Association(conn, pdu.AssociateAC(), {}, 1)
        _, body = reader.read_pdu(10)
        rq = pdu.decode_associate_rq(body)
        results = [(cx.id, 0, cx.transfer_syntaxes[0]) for cx in rq.contexts]
        conn.sendall(pdu.encode_associate_ac(rq, results, max_length=4096, implementation_class_uid="1.2.3",
                                             implementation_version="PIPE", async_ops=(4, 1)))
        queue: list[dimse.Command] = []
        command, data = bytearray(), bytearray()
        while True:
            try:
                t, body = reader.read_pdu(0.3)
            except socket.timeout:   # the requestor waits for the rest: answer them
                while queue:
                    self._answer(conn, queue.pop(0))
                continue
            if t == pdu.RELEASE_RQ:
                for c in queue:
                    self._answer(conn, c)
                conn.sendall(pdu.encode_release_rp())
                break
            self.longest_pdata = max(self.longest_pdata, len(body))
            for cx, control, fragment in pdu.decode_pdata(memoryview(body)):
                if control & 1:
                    command += fragment
                    continue
                data += fragment
                if control & 2:
                    if len(self.stored) + 1 == self.abort_at:
                        conn.sendall(pdu.encode_abort(pdu.ABORT_USER))
                        # Half-close and drain: closing with unread bytes would reset
                        # the connection and could discard the A-ABORT before it is read.
                        conn.shutdown(socket.SHUT_WR)
                        try:
                            while conn.recv(65536):
                                pass
                        except OSError:
                            pass
                        conn.close()
                        return
                    queue.append(dimse.decode_command(bytes(command)))
                    self.stored.append(bytes(data))
                    command, data = bytearray(), bytearray()
                    self.outstanding_max = max(self.outstanding_max, len(queue))
                    if len(queue) >= 2:
                        self._answer(conn, queue.pop(0))
        conn.close()

    @staticmethod
    def _answer(conn: socket.socket, c) -> None:
        from mfconsole.dimse import cstore
        from mfconsole.ul import pdu

        rsp = cstore.response_set(cstore.C_STORE_RSP, c.message_id, c.sop_class_uid, 0, c.sop_instance_uid)
        conn.sendall(pdu.encode_pdata([(1, 3, rsp)]))


def test_requests_are_pipelined_within_the_granted_window(tmp_path):
    from mfconsole import egress
    from mfconsole.contract import Outbound
    from mfconsole.dimse.sender import Peer
    from mfconsole.ul.sender import UlSender

    peer = PipeliningPeer()
    objs = []
    for path in dicomgen.write_corpus(tmp_path / "sr", 8) + dicomgen.write_corpus(
            tmp_path / "ct", 2, kind="ct", pixel_bytes=20 * 1024):
        data, ts = dicomgen.dataset_bytes(path)
        ds = dcmread(path, stop_before_pixels=True)
        objs.append(Outbound(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, data))
    sender = UlSender(Peer("127.0.0.1", peer.port, "PACS", dimse_timeout_s=5), egress.unchecked)
    outcomes = sender.send_many(objs)
    assert sender.assoc.window == 4
    sender.close()
    peer.thread.join(10)
    assert [o.label for o in outcomes] == ["delivered/message"] * 10
    assert peer.stored == [o.data for o in objs]
    assert peer.outstanding_max >= 2
    assert peer.longest_pdata == 4096    # fragments fill, and keep to, the AC's maximum


def test_abort_mid_pipeline_is_ambiguous_for_the_first_unanswered_only(tmp_path):
    """The peer took requests 1-4, answered 1-3 (4's answer waits for 5), and aborts on
    5: 1-3 delivered, 4 gets the ambiguous no-response outcome with others delivered,
    and the batch ends there (5 onwards go back to the queue untouched)."""
    from mfconsole import egress
    from mfconsole.contract import Outbound
    from mfconsole.dimse.sender import Peer
    from mfconsole.ul.sender import UlSender

    peer = PipeliningPeer(abort_at=5)
    objs = []
    for path in dicomgen.write_corpus(tmp_path / "sr", 8):
        data, ts = dicomgen.dataset_bytes(path)
        ds = dcmread(path, stop_before_pixels=True)
        objs.append(Outbound(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, data))
    sender = UlSender(Peer("127.0.0.1", peer.port, "PACS", dimse_timeout_s=5), egress.unchecked)
    outcomes = sender.send_many(objs)
    peer.thread.join(10)
    assert [o.label for o in outcomes] == ["delivered/message"] * 3 + ["transient/destination"]
    last = outcomes[-1]
    assert last.ambiguous and last.others_delivered and "aborted" in last.reason
    assert sender.assoc is None

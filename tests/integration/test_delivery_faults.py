"""Delivery under faults: a poison object never loops or marks a healthy peer down, an
exception never strands a batch in flight, a failed outcome write is swept back, the
retention purge and bulk replay run in bounded batches, and replaying a superseded
version says so. Real peers (DCMTK storescp, the fault SCP); asserts on delivery rows,
audit rows and what the peer received."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

import dicomgen
from fault_scp import FaultSCP
from harness import delivery_states, holds, mfconsole, plant, poll, store_files, stored_sha256
from test_forward_dimse import deliveries, dimse_dest

from mfconsole.engine import engine as engine_module
from mfconsole.engine import outbox
from mfconsole.repository import Tx, db_path, reading
from mfconsole.repository.states import INLINE

EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2"


# -- objects ---------------------------------------------------------------------------


def encode(ds, ts: str) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = ts != EXPLICIT_BE
    out.is_implicit_VR = ts == IMPLICIT_LE
    write_dataset(out, ds)
    return out.getvalue()


def part10(path: Path, ds, data: bytes, ts: str) -> Path:
    """A Part 10 file holding ``data`` (the data set bytes, as a modality wrote them)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + data)
    return path


def odd_length_image(path: Path) -> tuple[Path, bytes]:
    """An 8-bit 3x3 image whose Pixel Data has an odd length (9 bytes) and no padding:
    what some mammography units write. Returns the file and its data set bytes."""
    ds = dicomgen.make_image(pixel_bytes=2)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 3, 8, 8, 7
    pixels = bytes(range(1, 10))
    data = encode(ds, EXPLICIT_LE) + struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" \
        + struct.pack("<L", len(pixels)) + pixels
    assert len(data) % 2 == 1
    return part10(path, ds, data, EXPLICIT_LE), data


def big_endian_with_short_us(path: Path) -> Path:
    """Explicit VR big endian SR with a 3-byte US element: valid enough to store, but
    pydicom cannot write it back in another transfer syntax."""
    ds = dicomgen.make_sr()
    data = encode(ds, EXPLICIT_BE) + struct.pack(">HH", 0x0054, 0x0011) + b"US" \
        + struct.pack(">H", 3) + b"\0\1\2"
    return part10(path, ds, data, EXPLICIT_BE)


def uid_of(path: Path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- reading the store -------------------------------------------------------------------

def delivery(engine, uid: str) -> dict:
    reads = engine.store.reader()
    rows = [d for o in reads.rows("objects", sop_instance_uid=uid)
            for d in reads.rows("deliveries", object_id=o["id"])]
    return max(rows, key=lambda d: d["id"]) if rows else {}


def destination(engine, name: str = "pacs") -> dict:
    row = engine.store.reader().destination_state(name)
    return row if row else {"down": 0, "paused": 0, "failures": 0}


def audit_events(engine, event: str) -> list[dict]:
    return engine.store.reader().rows("audit", event=event)


def queue_then_send(engine, name: str, files: list[Path]) -> None:
    """Store ``files`` while ``name`` is paused, then resume it: one batch holds them all."""
    engine.store.call(outbox.pause, name, "test: queue first")
    store_files(engine.listeners[0].address[1], files)
    engine.store.call(outbox.resume, name)
    engine.deliveries[name].wake.set()


def storescp_uids(scp) -> list[str]:
    return [uid_of(p) for p in scp.received_files()]


def settled(engine) -> bool:
    return not {"pending", "in_flight"} & set(deliveries(engine))


# -- a poison object -----------------------------------------------------------------

def test_odd_length_object_among_100_reaches_storescp_padded_with_default_retries(
        engine_factory, storescp_factory, tmp_path):
    """DCMTK storescp aborts the association on an odd-length data set ("Odd Fragment
    Length"). With the default retry settings the 100 good objects are delivered at
    once, the odd one is padded by one byte (as DICOM prescribes) and delivered too,
    and the destination is never marked down."""
    scp = storescp_factory("-B")   # -B: the data set bytes exactly as received
    engine = engine_factory(destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                           "port": scp.port, "ae_title": "PACS"}])
    files = dicomgen.write_corpus(tmp_path / "good", 100)
    odd_file, odd_data = odd_length_image(tmp_path / "odd" / "odd.dcm")
    files.insert(37, odd_file)
    t0 = time.monotonic()
    store_files(engine.listeners[0].address[1], files)
    poll(lambda: deliveries(engine) == {"delivered": 101}, timeout=60,
         message="all 101 delivered")
    took = time.monotonic() - t0
    assert took < 5.0, f"the good objects waited on the odd one: {took:.1f} s"   # < first backoff
    assert destination(engine)["down"] == 0 and destination(engine)["failures"] == 0
    assert not audit_events(engine, "destination_down")
    assert not audit_events(engine, "retry_scheduled")
    uids = storescp_uids(scp)
    assert sorted(uids) == sorted(uid_of(f) for f in files)   # each exactly once
    # What the peer stored is the odd object with its last element padded: one NUL.
    odd_uid = uid_of(odd_file)
    got = next(p for p in scp.received_files() if uid_of(p) == odd_uid)
    received, _ = dicomgen.dataset_bytes(got)
    assert received == odd_data[:-21] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\0\0" \
        + struct.pack("<L", 10) + bytes(range(1, 10)) + b"\0"
    assert "padded" in delivery(engine, odd_uid)["last_reason"]


@pytest.mark.parametrize("count,position", [(30, 12), (10, 0)], ids=["amid-others", "first"])
def test_object_the_peer_aborts_on_is_dead_lettered_and_never_marks_it_down(
        engine_factory, tmp_path, count, position):
    """The peer aborts the association on one object's C-STORE, whatever we do: the
    object is retried on its own schedule and dead-lettered after bounded_attempts; the
    rest go through; the destination is never down. As the very first object on a
    fresh association the first abort may be the peer's and counts against it once;
    the good objects then go first."""
    files = dicomgen.write_corpus(tmp_path / "sr", count)
    poison = uid_of(files[position])
    scp = FaultSCP(None, "--abort-for", poison, record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dimse_dest(scp.port)])
        store_files(engine.listeners[0].address[1], files)
        poll(lambda: settled(engine) and deliveries(engine) == {"delivered": count - 1, "dead": 1},
             timeout=30, message="all delivered but the poison, dead")
        d = delivery(engine, poison)
        assert d["state"] == "dead" and d["suspect"] == 3, d
        assert d["last_class"] == "permanent/message"
        assert "3 times with this object in flight" in d["last_reason"]
        assert "other objects were delivered" in d["last_reason"]
        st = destination(engine)
        assert (st["down"], st["paused"]) == (0, 0), st
        aborts = [r["n"] for r in scp.received() if r["action"] == "abort"]
        assert [r["sop_instance_uid"] for r in scp.received() if r["action"] == "abort"] == [poison] * 3
        good = {r["sop_instance_uid"] for r in scp.received() if r["status"] == 0}
        assert len(good) == count - 1 and poison not in good
        if position:
            assert st["failures"] == 0 and not audit_events(engine, "destination_down")
        else:   # the good ones were not held behind the poison's retries
            assert min(r["n"] for r in scp.received() if r["status"] == 0) < aborts[1]
    finally:
        scp.stop()


def test_a_peer_that_aborts_everything_is_down_and_dead_letters_nothing(engine_factory, tmp_path):
    """Nothing gets through: the destination is at fault, not the objects. It is marked
    down and no object is dead-lettered however often it is retried."""
    scp = FaultSCP(None, "--abort-on-store", record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dimse_dest(scp.port, retry_max_s=0.3)])
        store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 4))
        poll(lambda: destination(engine)["down"] == 1, timeout=20, message="destination down")
        poll(lambda: len(scp.received()) >= 12, timeout=30, message="a dozen attempts")
        assert "dead" not in deliveries(engine)
        assert holds(lambda: "dead" not in deliveries(engine), 2.0)
    finally:
        scp.stop()


# -- exceptions never strand a batch -------------------------------------------------------

def test_reencode_failure_is_a_dead_letter_and_its_batch_mates_are_delivered_once(
        engine_factory, storescp_factory, tmp_path):
    """A big endian object with a 3-byte US element, for a peer that takes implicit VR
    only: re-encoding raises. That object is a dead letter naming the exception class
    and where; the 6 others are delivered once each; nothing stays in flight, and the
    same holds after a restart."""
    scp = storescp_factory("+xi")
    dest = dimse_dest(scp.port)
    files = []
    for i in range(7):
        if i == 3:
            files.append(big_endian_with_short_us(tmp_path / "bad.dcm"))
        else:
            ds = dicomgen.make_sr()
            files.append(part10(tmp_path / f"good{i}.dcm", ds, encode(ds, EXPLICIT_BE), EXPLICIT_BE))
    bad = uid_of(files[3])
    engine = engine_factory("e1", destinations=[dest])
    queue_then_send(engine, "pacs", files)
    poll(lambda: deliveries(engine) == {"delivered": 6, "dead": 1}, timeout=30,
         message="6 delivered, 1 dead")
    d = delivery(engine, bad)
    assert d["state"] == "dead" and d["last_status"] == "internal error"
    assert "BytesLengthException while re-encoding Explicit VR Big Endian" in d["last_reason"]
    assert " in pydicom." in d["last_reason"] and " line " in d["last_reason"]
    assert holds(lambda: "in_flight" not in deliveries(engine), 2.0)
    poll(lambda: len(scp.received_files()) == 6, message="storescp wrote 6 files")
    assert sorted(storescp_uids(scp)) == sorted(uid_of(f) for i, f in enumerate(files) if i != 3)
    engine.stop()

    # After a restart nothing is re-claimed, nothing is sent again.
    from mfconsole.config import load
    from mfconsole.engine.engine import Engine
    again = Engine(load(engine.config.path), log_to_stderr=False)
    again.start()
    try:
        assert holds(lambda: deliveries(again) == {"delivered": 6, "dead": 1}, 2.0)
        assert len(scp.received_files()) == 6
    finally:
        again.stop()


def test_a_failed_outcome_write_is_swept_back_and_delivered_without_restart(
        engine_factory, tmp_path, monkeypatch):
    """The store turns read-only while an object is with the peer: its outcome cannot be
    written, so it stays in flight. Once the store can write again the sweep puts it
    back to pending and it is delivered (sent again: at least once), without a restart."""
    monkeypatch.setattr(engine_module, "SWEEP_INTERVAL_S", 0.3)
    scp = FaultSCP(None, "--delay-s", "1.5", record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dimse_dest(scp.port)])
        uid, = store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 1))
        # Claimed and sent; the peer answers 1.5 s later, when nothing can be written.
        poll(lambda: delivery(engine, uid)["state"] == "in_flight", timeout=10, interval=0.005,
             message="the object in flight")
        read_only(engine, True)
        poll(lambda: any(r["status"] == 0 for r in scp.received()), timeout=10,
             message="the peer answered")
        # The answer came, its outcome could not be written: still in flight.
        assert holds(lambda: delivery(engine, uid)["state"] == "in_flight", 1.0)
        read_only(engine, False)
        poll(lambda: delivery(engine, uid)["state"] == "delivered", timeout=20,
             message="delivered after the store came back")
        assert [e["delivery_id"] for e in audit_events(engine, "requeued")] == [delivery(engine, uid)["id"]]
        assert len([r for r in scp.received() if r["status"] == 0]) == 2   # sent again, once
    finally:
        scp.stop()


def read_only(engine, on: bool) -> None:
    """Make the store's writer refuse every write, as a full or read-only disk would
    (even BEGIN fails), or not. Set on its connection directly: with it on, nothing
    can go through the writer."""
    plant(engine.store._conn, f"PRAGMA query_only = {int(on)}")


# -- bulk work in bounded batches ----------------------------------------------------------

def _finished_objects(engine, count: int, *, dead: int = 0, days_old: float = 40) -> None:
    """``count`` old objects whose deliveries are finished (and ``dead`` dead letters),
    written straight into the store."""
    sealed, result = engine.store.vault.seal_bytes(b"x" * 100)
    when = time.time() - days_old * 86400

    def fill(tx: Tx, start: int, n: int, state: str) -> None:
        for i in range(start, start + n):
            object_id = tx.insert_object(
                {"sop_instance_uid": f"1.2.3.{i}", "version": 1,
                 "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.11", "study_uid": "1.2.3",
                 "size": result.size, "digest": f"d{i}", "blob": INLINE, "key_id": result.key_id,
                 "listener": "modalities", "received_at": when + i, "superseded": 0}, sealed)
            [delivery_id] = tx.add_deliveries(object_id, None, [("pacs", None)], when)
            tx.set_outcome(delivery_id, state=state, attempts=1, retry_at=when, status=None,
                           label=None, reason="test", now=when)

    for start in range(0, count, 2000):
        engine.store.call(fill, start, min(2000, count - start), "delivered")
    if dead:
        engine.store.call(fill, count, dead, "dead")


def test_purge_runs_in_bounded_batches_and_keeps_dead_letters(engine_factory, tmp_path):
    engine = engine_factory(destinations=[dimse_dest(1)], egress={"allowed_tcp": ["127.0.0.1:1"]})
    engine.store.call(outbox.pause, "pacs", "test")
    _finished_objects(engine, 1000, dead=5)
    seen: list[int] = []
    commits = engine.store.commits
    purged = engine.store.purge_expired(30, batch=100, progress=seen.append)
    assert purged == 1000
    assert len(seen) >= 10 and seen[-1] == 1000      # one transaction per batch
    assert engine.store.commits - commits >= 10
    left = len(engine.store.reader().rows("objects", purged_at=None))
    assert left == 5                                  # the dead letters' objects stay
    assert len(engine.store.reader().rows("blob_data")) == 5
    plan = engine.store.reader().unpurged_scan_plan()
    assert "objects_unpurged" in plan
    poll(lambda: audit_events(engine, "purged"), message="the purge audited")


def test_replay_all_past_sqlites_variable_limit_in_batches(engine_factory, tmp_path):
    """40 000 dead letters (more than SQLite binds in one statement) replayed by filter
    from the command line, in batches, with progress."""
    engine = engine_factory(destinations=[dimse_dest(1)], egress={"allowed_tcp": ["127.0.0.1:1"]})
    engine.store.call(outbox.pause, "pacs", "test")
    _finished_objects(engine, 0, dead=40_000, days_old=0)
    config = engine.config.path
    engine.stop()
    result = mfconsole("--config", str(config), "dead-letters", "replay", "--all", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "40000 dead letter(s) queued again" in result.stdout
    assert "replayed 500 of 40000" in result.stderr and "replayed 40000 of 40000" in result.stderr
    with reading(db_path(config.parent / "var")) as reads:
        assert delivery_states(reads) == {"pending": 40_000}
        assert len(reads.rows("audit", event="replayed")) == 40_000


def test_replaying_a_superseded_version_sends_the_current_one_and_says_so(engine_factory, tmp_path):
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dimse_dest(scp.port)])
        ds = dicomgen.make_sr(text="first version")
        v1 = part10(tmp_path / "v1.dcm", ds, encode(ds, EXPLICIT_LE), EXPLICIT_LE)
        engine.store.call(outbox.pause, "pacs", "test: queue first")
        port = engine.listeners[0].address[1]
        store_files(port, [v1])
        uid = str(ds.SOPInstanceUID)
        first = delivery(engine, uid)
        engine.store.call(lambda tx: tx.set_outcome(
            first["id"], state="dead", attempts=first["attempts"], retry_at=first["retry_at"],
            status=first["last_status"], label=first["last_class"], reason="test", now=time.time()))
        ds.ContentSequence[0].TextValue = "second version"
        v2 = part10(tmp_path / "v2.dcm", ds, encode(ds, EXPLICIT_LE), EXPLICIT_LE)
        store_files(port, [v2])
        versions = engine.store.reader().rows("objects", order_by="version", sop_instance_uid=uid)
        assert [v["version"] for v in versions] == [1, 2]
        second = delivery(engine, uid)
        # The current version's own delivery is dead-lettered too, then discarded: the
        # replay of version 1 must queue version 2, not re-send stale bytes.
        engine.store.call(Tx.set_state, second["id"], "discarded", time.time())
        notes: list[str] = []
        queued = engine.store.call(lambda tx: outbox.replay(tx, [first["id"]], notes=notes))
        assert len(queued) == 1 and queued[0] != first["id"]
        assert "superseded by version 2" in notes[0] and "version 2 queued instead" in notes[0]
        new = engine.store.reader().delivery(queued[0])
        assert new["object_id"] == versions[1]["id"]
        engine.store.call(outbox.resume, "pacs")
        engine.deliveries["pacs"].wake.set()
        poll(lambda: scp.received(), message="the peer got the replay")
        assert [r["sha256"] for r in scp.received()] == [
            stored_sha256(engine.data_dir, engine.config.store.key_file)[uid]]   # version 2's
        # Replaying again: version 2 is now delivered there, so nothing is queued.
        poll(lambda: delivery(engine, uid)["state"] == "delivered", message="delivered")
        engine.store.call(Tx.set_state, first["id"], "dead", time.time())
        notes.clear()
        assert engine.store.call(lambda tx: outbox.replay(tx, [first["id"]], notes=notes)) == []
        assert "is delivered: nothing queued" in notes[0]
        detail = audit_events(engine, "replayed")[-1]["detail"]
        assert "superseded by version 2" in detail
    finally:
        scp.stop()


# -- the same attribution for STOW-RS and MLLP --------------------------------------------

def test_stow_request_dropped_on_one_object_isolates_it_as_a_dead_letter(engine_factory, tmp_path):
    """The archive drops the connection whenever a request carries one particular
    object: the batch is halved until that object travels alone, it ends as a dead
    letter, its study-mates are stored, and the destination is never down."""
    from stow_server import StowServer, drop, stored

    files = dicomgen.write_corpus(tmp_path / "sr", 10)   # one study: batched together
    poison = uid_of(files[4])
    store_ok, dropped = stored(), drop()

    def drop_if_poison(server, req, handler):
        (dropped if poison in req.uids else store_ok)(server, req, handler)

    server = StowServer(default=drop_if_poison).start()
    try:
        engine = engine_factory(destinations=[{
            "name": "web", "kind": "stow", "url": server.url, "retry_initial_s": 0.2,
            "retry_max_s": 1.0, "down_after": 5, "response_timeout_s": 5}])
        queue_then_send(engine, "web", files)
        poll(lambda: deliveries(engine) == {"delivered": 9, "dead": 1}, timeout=30,
             message="9 stored, the poison dead")
        d = delivery(engine, poison)
        assert d["state"] == "dead" and d["suspect"] == 3 and d["last_class"] == "permanent/message"
        assert set(server.stored) == {uid_of(f) for f in files} - {poison}
        assert destination(engine, "web")["down"] == 0
        assert any(len(r.uids) > 1 and poison in r.uids for r in server.requests)   # it was batched
    finally:
        server.stop()


def _mllp_engine(engine_factory, tmp_path, acks: str):
    from mllp_peer import MllpPeer
    from test_forward_mllp import ehr_dest, with_handlers

    peer = MllpPeer(tmp_path / "ehr", acks=acks).start()
    with_handlers(tmp_path / "engine")
    engine = engine_factory(destinations=[ehr_dest(peer.port, bounded_attempts=3, down_after=3)],
                            routes=[{"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
    return peer, engine


def test_mllp_message_answered_with_garbage_is_dead_lettered_and_the_rest_go_in_order(
        engine_factory, tmp_path):
    """The receiver answers one message with a garbled ACK every time (it answers the
    others): after bounded_attempts that message is a dead letter and the ones behind
    it follow, in order."""
    peer, engine = _mllp_engine(engine_factory, tmp_path, "AA,GARBLED,GARBLED,GARBLED,AA")
    try:
        store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 3))
        poll(lambda: deliveries(engine) == {"delivered": 2, "dead": 1}, timeout=30,
             message="2 delivered, 1 dead")
        ids = [r["id"] for r in engine.store.reader().rows("deliveries")]
        got = [g["control_id"] for g in peer.received()]
        assert got == [f"MF{i:012d}" for i in (ids[0], ids[1], ids[1], ids[1], ids[2])]
        dead = engine.store.reader().rows("deliveries", state="dead")[0]
        assert dead["id"] == ids[1] and dead["suspect"] == 3
    finally:
        peer.stop()


def test_mllp_receiver_that_never_acks_is_down_and_dead_letters_nothing(engine_factory, tmp_path):
    """No ACK at all is the receiver's failure: messages go in order, so nothing can
    show the message is at fault. Retried, down, and nothing dead-lettered."""
    peer, engine = _mllp_engine(engine_factory, tmp_path, "NONE")
    try:
        store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 2))
        poll(lambda: destination(engine, "ehr")["down"] == 1, timeout=30, message="down")
        poll(lambda: len(peer.received()) >= 5, timeout=30, message="5 tries")
        assert "dead" not in deliveries(engine)
        assert {g["control_id"] for g in peer.received()} == {peer.received()[0]["control_id"]}
    finally:
        peer.stop()

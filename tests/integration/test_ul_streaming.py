"""Streaming ingest on mfconsole's upper layer (mfconsole/ul/incoming.py): an object
over 1 MiB is scanned and sealed into its blob file as its fragments arrive, so the
in-flight budget holds only its first MiB. What is stored must be byte for byte what
was sent; an object refused or cut short must leave no blob behind, and the listener
serves on. Driven by DCMTK storescu where the peer matters, by raw sockets where the
test must decide which bytes are on the wire when.
"""

from __future__ import annotations

import hashlib
import struct

import dicomgen
from harness import poll, stored_sha256
from test_ul_acceptor import (EXPLICIT_LE, IMPLICIT_LE, UL, assert_still_serves, audit, dcmconv,
                              objects, port_of, storescu)
from test_ul_bounds import MiB, associated, big_object, pdv, send_data, status_of, store_rq

from mfconsole.ul import incoming

CT = "1.2.840.10008.5.1.4.1.1.2"


def blob_files(engine) -> list:
    return sorted((engine.data_dir / "blobs").rglob("*.blob"))


def release(sock) -> None:
    sock.sendall(b"\x05\x00" + struct.pack(">I", 4) + b"\0" * 4)   # A-RELEASE-RQ
    sock.recv(16)
    sock.close()


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def test_large_objects_stream_byte_exact_and_hold_only_their_first_mib(engine_factory, tmp_path):
    engine = engine_factory(listener=UL)
    ds = dicomgen.make_image(pixel_bytes=24 * MiB)
    explicit = dicomgen.save(ds, tmp_path / "explicit.dcm")
    implicit = dcmconv(explicit, tmp_path / "implicit" / "ct.dcm", IMPLICIT_LE)
    # Two objects of the same SOP instance in two encodings: stored as two versions.
    wire = {}
    for path, option in ((explicit, "-xe"), (implicit, "-xi")):
        res = storescu(port_of(engine), [path], option, "--max-send-pdu", "65536")
        assert res.returncode == 0, res.stdout + res.stderr
        wire[option] = hashlib.sha256(dicomgen.dataset_bytes(path)[0]).hexdigest()
    rows = objects(engine)
    assert [r["version"] for r in rows] == [1, 2]
    assert [r["transfer_syntax"] for r in rows] == [EXPLICIT_LE, IMPLICIT_LE]
    assert all(r["blob"].endswith(".blob") for r in rows)   # files, sealed as they came
    # The latest version is the implicit one, byte for byte; the first one was the
    # explicit encoding (its digest differs: the store kept both).
    assert stored_sha256(engine.data_dir) == {str(ds.SOPInstanceUID): wire["-xi"]}
    assert len(blob_files(engine)) == 2
    budget = engine.inflight
    assert budget.used == 0
    # Its first MiB (incoming.STREAM_AT) and one PDU: not 24 MiB.
    assert incoming.STREAM_AT == MiB and budget.peak <= MiB + 64 * 1024, budget.peak


def test_a_large_object_malformed_mid_stream_is_refused_and_leaves_no_blob(engine_factory, tmp_path):
    engine = engine_factory(listener=UL)
    good, good_uid = big_object(tmp_path, "good", 3 * MiB)
    header = good[:good.index(b"\xe0\x7f\x10\x00")]   # everything before the pixel data
    # 2 MiB of a private OB value, then an element with a VR that does not exist, then
    # 2 MiB more: the walk fails in the middle of the stream.
    bad = (header + element(0x00091010, b"OB", b"\0" * (2 * MiB))
           + b"\x09\x00\x12\x10ZZ\x04\x00abcd" + b"\0" * (2 * MiB))
    sock = associated(engine)
    sock.sendall(pdv(1, 0x03, store_rq(1, CT, good_uid)))
    send_data(sock, bad, last=True)
    assert status_of(sock) == 0xC000
    [row] = audit(engine, "refused")
    assert row["status"] == "0xC000" and "unknown VR" in row["detail"], dict(row)
    poll(lambda: not blob_files(engine), message="the refused object's blob removed")
    # The association goes on: the good object, streamed, is stored.
    sock.sendall(pdv(1, 0x03, store_rq(2, CT, good_uid)))
    send_data(sock, good, last=True)
    assert status_of(sock) == 0x0000
    release(sock)
    assert stored_sha256(engine.data_dir) == {good_uid: hashlib.sha256(good).hexdigest()}
    assert len(blob_files(engine)) == 1


def test_a_connection_cut_mid_stream_leaves_no_blob(engine_factory, tmp_path):
    engine = engine_factory(listener=UL)
    data, uid = big_object(tmp_path, "a", 6 * MiB)
    sock = associated(engine)
    sock.sendall(pdv(1, 0x03, store_rq(1, CT, uid)))
    send_data(sock, data[:3 * MiB], last=False)
    poll(lambda: len(blob_files(engine)) == 1, message="the object streaming into its blob")
    sock.close()
    poll(lambda: not blob_files(engine), message="the cut object's blob removed")
    poll(lambda: engine.inflight.used == 0, message="its budget given back")
    assert objects(engine) == []
    assert_still_serves(engine)


def test_large_refusals_and_duplicates_keep_one_blob_per_stored_object(engine_factory, tmp_path):
    engine = engine_factory(listener=UL, store={"max_object_mb": 3})
    data, uid = big_object(tmp_path, "a", int(2.5 * MiB))
    over, over_uid = big_object(tmp_path, "over", int(3.5 * MiB))   # under the abort margin
    sock = associated(engine)
    # The command names another SOP instance than the data set: 0xA900, nothing kept.
    sock.sendall(pdv(1, 0x03, store_rq(1, CT, uid[:-1] + ("8" if uid.endswith("9") else "9"))))
    send_data(sock, data, last=True)
    assert status_of(sock) == 0xA900
    # Over max_object_mb, known only once it is whole: 0xA700, nothing kept.
    sock.sendall(pdv(1, 0x03, store_rq(2, CT, over_uid)))
    send_data(sock, over, last=True)
    assert status_of(sock) == 0xA700
    # Stored, then the same bytes again: a duplicate, whose blob is not kept.
    for msg_id in (3, 4):
        sock.sendall(pdv(1, 0x03, store_rq(msg_id, CT, uid)))
        send_data(sock, data, last=True)
        assert status_of(sock) == 0x0000
    release(sock)
    assert len(objects(engine)) == 1
    assert len(audit(engine, "duplicate")) == 1
    assert {r["status"] for r in audit(engine, "refused", expected=2)} == {"0xA900", "0xA700"}
    poll(lambda: len(blob_files(engine)) == 1, message="only the stored object's blob")
    assert stored_sha256(engine.data_dir) == {uid: hashlib.sha256(data).hexdigest()}

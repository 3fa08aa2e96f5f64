"""The listener (mfconsole/ul/acceptor.py) driven by real peers: DCMTK echoscu, storescu and dcmsend, pynetdicom
as SCU, and raw sockets for what no well-behaved peer sends.

Assertions are on stored state (object rows; the stored bytes decrypted and hashed,
compared with the data set bytes the peer put on the wire), on the audit trail and
the associations board, and on what the peer reports (statuses, A-ASSOCIATE-RJ
reasons, the A-ABORT it receives).

For byte-exact DCMTK sends, each file is first written by DCMTK itself (dcmconv, in
the transfer syntax storescu then proposes), so storescu sends it without
re-encoding: the data set bytes of that file are the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

import dicomgen
from harness import poll, run, stored_sha256
from peers import require_tool

SCP_AE = "MF_SCP"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
CT = "1.2.840.10008.5.1.4.1.1.2"
UL = {"acse_timeout_s": 3, "network_timeout_s": 3,
      "dimse_timeout_s": 5}

# storescu's proposal for a syntax, and dcmconv's option to write a file in it.
STORESCU = {IMPLICIT_LE: "-xi", EXPLICIT_LE: "-xe", EXPLICIT_BE: "-xb", DEFLATED: "-xd"}
DCMCONV = {IMPLICIT_LE: "+ti", EXPLICIT_LE: "+te", EXPLICIT_BE: "+tb", DEFLATED: "+td"}
# Compressed files of pydicom's test data, and storescu's proposal for each syntax.
COMPRESSED = ("JPEG2000.dcm", "JPEG-lossy.dcm", "SC_rgb_rle.dcm", "MR_small_jpeg_ls_lossless.dcm")
PROPOSE = {"1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
           "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.80": "-xt",
           "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.50": "-xy",
           "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs"}


@pytest.fixture
def ul(engine_factory):
    def make(**listener):
        return engine_factory(listener={**UL, **listener})
    return make


def port_of(engine) -> int:
    return engine.listeners[0].address[1]


def objects(engine) -> list[dict]:
    return engine.store.reader().rows("objects")


def audit(engine, event: str, expected: int = 1, timeout: float = 5.0) -> list[dict]:
    """Audit rows of ``event`` (they are committed with the next group)."""
    def rows():
        found = engine.store.reader().rows("audit", event=event)
        return found if len(found) >= expected else None
    return poll(rows, timeout, message=f"{expected} '{event}' audit row(s)")


def wire_sha256(path: Path) -> str:
    return hashlib.sha256(dicomgen.dataset_bytes(path)[0]).hexdigest()


def assert_stored_exactly(engine, paths: list[Path]) -> None:
    """Each file's data set is stored, byte for byte, in its transfer syntax (for
    Deflate: the inflated bytes, as DCMTK deflates afresh what it sends)."""
    stored = stored_sha256(engine.data_dir)
    rows = {r["sop_instance_uid"]: r for r in objects(engine)}
    for path in paths:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"{path.name} not stored"
        original, ts = dicomgen.dataset_bytes(path)
        assert rows[uid]["transfer_syntax"] == ts, path.name
        if ts == DEFLATED:
            plain = engine.store.read_object(rows[uid]["id"])
            assert hashlib.sha256(plain).hexdigest() == stored[uid]
            assert zlib.decompress(plain, -15) == zlib.decompress(original, -15), path.name
        else:
            assert stored[uid] == wire_sha256(path), f"{path.name}: stored bytes differ from the wire"
        assert rows[uid]["listener"] == "modalities" and rows[uid]["association"]


def dcmconv(src: Path, dst: Path, ts: str) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = run([require_tool("dcmconv"), DCMCONV[ts], str(src), str(dst)])
    assert res.returncode == 0, res.stderr
    return dst


def storescu(port: int, files: list[Path], *extra: str, aet: str = "MODALITY",
             aec: str = SCP_AE) -> subprocess.CompletedProcess:
    return run([require_tool("storescu"), "-v", "-aet", aet, "-aec", aec, *extra,
                "127.0.0.1", str(port), *map(str, files)])


def echoscu(port: int, aet: str = "MODALITY", aec: str = SCP_AE) -> subprocess.CompletedProcess:
    return run([require_tool("echoscu"), "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)])


def scu(*contexts: tuple[str, list[str]], max_pdu: int = 16384) -> AE:
    ae = AE(ae_title="PYSCU")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


@pytest.fixture
def raw_sends(monkeypatch):
    """pynetdicom sends a file's data set bytes as they are on disk (never re-encoded)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# --------------------------------------------------------------------------
# DCMTK peers
# --------------------------------------------------------------------------

def test_echoscu_and_association_rejections(ul):
    engine = ul(calling_aets=["MODALITY", "CT01"])
    port = port_of(engine)
    ok = echoscu(port, aet="CT01")
    assert ok.returncode == 0 and "Received Echo Response (Success)" in ok.stdout + ok.stderr
    wrong_called = echoscu(port, aet="CT01", aec="NOT_US")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    unlisted = echoscu(port, aet="INTRUDER")
    assert unlisted.returncode != 0
    assert "Calling AE Title Not Recognized" in unlisted.stdout + unlisted.stderr

    rows = audit(engine, "association_rejected", 2)
    assert sorted((r["calling_ae"], r["detail"]) for r in rows) == [
        ("CT01", "called AE title not recognized (called AE NOT_US)"),
        ("INTRUDER", "calling AE title not recognized (called AE MF_SCP)")]
    [accepted] = audit(engine, "association_accepted")
    assert accepted["calling_ae"] == "CT01" and accepted["peer"].startswith("127.0.0.1:")
    recent = poll(lambda: len(r := engine.board.snapshot()["recent"]) == 3 and r,
                  message="three associations on the board")
    assert sorted((r["status"], r["reason"]) for r in recent) == [
        ("rejected", "called AE title not recognized"),
        ("rejected", "calling AE title not recognized"), ("released", "")]


@pytest.mark.parametrize("ts", [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED],
                         ids=["xi", "xe", "xb", "xd"])
def test_storescu_each_transfer_syntax_stored_byte_exact(ul, tmp_path, ts):
    engine = ul(accept_deflate=ts == DEFLATED)
    sources = [dicomgen.save(dicomgen.make_sr(), tmp_path / "src" / "sr.dcm"),
               dicomgen.save(dicomgen.make_image(pixel_bytes=300 * 1024), tmp_path / "src" / "ct.dcm")]
    files = [dcmconv(p, tmp_path / "wire" / p.name, ts) for p in sources]
    assert {dicomgen.dataset_bytes(p)[1] for p in files} == {ts}
    res = storescu(port_of(engine), files, STORESCU[ts])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert out.count("Received Store Response (Success)") == 2, out
    assert_stored_exactly(engine, files)


def test_deflate_not_accepted_unless_configured(ul, tmp_path):
    engine = ul()
    path = dcmconv(dicomgen.save(dicomgen.make_sr(), tmp_path / "sr.dcm"), tmp_path / "d.dcm", DEFLATED)
    ae = scu((dicomgen.BASIC_TEXT_SR, [DEFLATED]), (dicomgen.BASIC_TEXT_SR, [EXPLICIT_LE]))
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    try:
        assert {cx.transfer_syntax[0] for cx in assoc.accepted_contexts} == {EXPLICIT_LE}
    finally:
        assoc.release()
    # storescu -xd falls back to an uncompressed syntax: stored, never as deflate.
    res = storescu(port_of(engine), [path], "-xd")
    assert res.returncode == 0, res.stdout + res.stderr
    [row] = objects(engine)
    assert row["transfer_syntax"] != DEFLATED


def test_storescu_compressed_files_stored_as_sent(ul):
    engine = ul()
    port = port_of(engine)
    files = []
    for name in COMPRESSED:
        path = Path(get_testdata_file(name))
        files.append(path)
        res = storescu(port, [path], PROPOSE[dicomgen.dataset_bytes(path)[1]])
        assert res.returncode == 0 and "Received Store Response (Success)" in res.stdout + res.stderr, \
            res.stdout + res.stderr
    rows = {r["sop_instance_uid"]: r for r in objects(engine)}
    assert len(rows) == len(files)
    stored = stored_sha256(engine.data_dir)
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        original, ts = dicomgen.dataset_bytes(path)
        assert rows[uid]["transfer_syntax"] == ts, path.name
        # storescu re-encodes the data set around the compressed pixel data; the
        # encapsulated frames themselves must be what the file holds.
        plain = engine.store.read_object(rows[uid]["id"])
        assert hashlib.sha256(plain).hexdigest() == stored[uid]
        want = dcmread(path).PixelData
        assert want in plain, f"{path.name}: pixel data not stored as sent"


def test_dcmsend_several_files_one_association(ul, tmp_path):
    engine = ul()
    files = [dcmconv(p, tmp_path / "wire" / p.name, EXPLICIT_LE)
             for p in dicomgen.write_corpus(tmp_path / "src", 5)]
    res = run([require_tool("dcmsend"), "-v", "-aet", "DCMSEND", "-aec", SCP_AE,
               "127.0.0.1", str(port_of(engine)), *map(str, files)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert_stored_exactly(engine, files)
    [row] = poll(lambda: [r for r in engine.board.snapshot()["recent"] if r["calling_ae"] == "DCMSEND"],
                 message="the association on the board")
    assert (row["status"], row["objects"]) == ("released", 5)


# --------------------------------------------------------------------------
# pynetdicom as SCU
# --------------------------------------------------------------------------

@pytest.mark.parametrize("max_pdu", [4096, 16384, 1024 * 1024, 0], ids=["4k", "16k", "1m", "unlimited"])
def test_pynetdicom_scu_any_max_pdu(ul, tmp_path, raw_sends, max_pdu):
    engine = ul()
    files = [dicomgen.save(dicomgen.make_sr(), tmp_path / "sr.dcm"),
             dicomgen.save(dicomgen.make_image(pixel_bytes=200 * 1024 + 1), tmp_path / "ct.dcm"),
             dicomgen.save(dicomgen.make_sr(), tmp_path / "impl.dcm", implicit=True)]
    ae = scu((Verification, [EXPLICIT_LE]), (dicomgen.BASIC_TEXT_SR, [EXPLICIT_LE]),
             (dicomgen.BASIC_TEXT_SR, [IMPLICIT_LE]), (CT, [EXPLICIT_LE]), max_pdu=max_pdu)
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    assert assoc.is_established
    # What we advertise: the listener's max_pdu_kb (default 256 KiB).
    assert assoc.acceptor.maximum_length == 256 * 1024
    try:
        assert int(assoc.send_c_echo().Status) == 0
        assert [int(assoc.send_c_store(p).Status) for p in files] == [0, 0, 0]
    finally:
        assoc.release()
    assert assoc.is_released
    assert_stored_exactly(engine, files)


def test_peer_release_and_abort_on_the_board(ul, tmp_path, raw_sends):
    engine = ul()
    port = port_of(engine)
    ae = scu((CT, [EXPLICIT_LE]), (Verification, [EXPLICIT_LE]))
    released = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert int(released.send_c_echo().Status) == 0
    released.release()
    assert released.is_released

    aborted = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert aborted.is_established
    # Half a C-STORE (its command only), then A-ABORT: nothing may be stored.
    sock = aborted.dul.socket.socket
    command = (struct.pack("<HHI", 0, 0x0100, 2) + struct.pack("<H", 1)
               + struct.pack("<HHI", 0, 0x0110, 2) + struct.pack("<H", 7)
               + struct.pack("<HHI", 0, 0x0800, 2) + struct.pack("<H", 1))
    cx = aborted.accepted_contexts[0].context_id
    sock.sendall(b"\x04\x00" + struct.pack(">I", len(command) + 6)
                 + struct.pack(">IBB", len(command) + 2, cx, 0x03) + command)
    aborted.abort()
    poll(lambda: len(engine.board.snapshot()["recent"]) == 2, message="both associations to end")
    recent = {r["status"]: r for r in engine.board.snapshot()["recent"]}
    assert set(recent) == {"released", "aborted"}
    assert recent["aborted"]["reason"] == "aborted by the peer"
    assert objects(engine) == []
    assert engine.board.snapshot()["live"] == []
    assert echoscu(port).returncode == 0


def test_wrong_called_or_calling_and_max_associations_rj_reasons(ul):
    """The A-ASSOCIATE-RJ is read off a raw socket: pynetdicom's requestor has a race
    with an acceptor that answers within microseconds (it can see the transport
    closed after the RJ before it looks for the RJ, and reports an abort)."""
    engine = ul(calling_aets=["PYSCU"], max_associations=1)
    port = port_of(engine)

    def rj(called: str, calling: str) -> tuple[int, int, int]:
        sock = connect(engine)
        sock.sendall(associate_rq(called, calling, contexts=((1, Verification, EXPLICIT_LE),)))
        data = recv_pdu(sock)
        sock.close()
        assert data[:1] == b"\x03" and len(data) == 10, data
        return (data[7], data[8], data[9])

    assert rj("NOT_US", "PYSCU") == (1, 1, 7)
    assert rj(SCP_AE, "STRANGER") == (1, 1, 3)
    held = scu((Verification, [EXPLICIT_LE])).associate("127.0.0.1", port, ae_title=SCP_AE)
    try:
        assert held.is_established
        assert rj(SCP_AE, "PYSCU") == (2, 3, 2)
    finally:
        held.release()
    rows = audit(engine, "association_rejected", 3)
    assert [r["detail"].rsplit(" (called AE", 1)[0] for r in rows] == [
        "called AE title not recognized", "calling AE title not recognized",
        "local limit exceeded (max_associations)"]


def test_refused_objects_keep_the_listener_statuses(ul, tmp_path, raw_sends):
    """The status decision is the pynetdicom listener's (listener.store_object)."""
    engine = ul()
    ds = dicomgen.make_sr()
    path = dicomgen.save(ds, tmp_path / "sr.dcm")
    raw = bytearray(path.read_bytes())
    # The file meta says another instance: the command then differs from the data set.
    uid = str(ds.SOPInstanceUID).encode()
    at = raw.index(uid)
    raw[at:at + len(uid)] = uid[:-1] + (b"9" if uid[-1:] != b"9" else b"8")
    path.write_bytes(bytes(raw))
    ae = scu((dicomgen.BASIC_TEXT_SR, [EXPLICIT_LE]))
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    try:
        assert int(assoc.send_c_store(path).Status) == 0xA900
    finally:
        assoc.release()
    [row] = audit(engine, "refused")
    assert row["status"] == "0xA900" and "does not match" in row["detail"]
    assert objects(engine) == []


def test_object_over_max_object_mb_aborted_while_it_arrives(engine_factory, tmp_path, raw_sends):
    engine = engine_factory(listener=UL, store={"max_object_mb": 1})
    path = dicomgen.save(dicomgen.make_image(pixel_bytes=3 * 1024 * 1024), tmp_path / "big.dcm")
    assoc = scu((CT, [EXPLICIT_LE])).associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    assert assoc.is_established
    rsp = assoc.send_c_store(path)
    assert "Status" not in rsp
    poll(lambda: assoc.is_aborted, timeout=3, message="the SCU to see the A-ABORT")
    [row] = audit(engine, "refused")
    assert row["status"] == "abort" and "max_object_mb" in row["detail"]
    assert objects(engine) == []
    assert echoscu(port_of(engine)).returncode == 0


# --------------------------------------------------------------------------
# Raw sockets: what no well-behaved peer sends
# --------------------------------------------------------------------------

def connect(engine) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(engine)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the listener sends until it closes, and how long that took."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        raise AssertionError(f"not closed within {timeout}s (received {got!r})") from None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - t0


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def recv_pdu(sock: socket.socket, timeout: float = 5) -> bytes:
    """One whole PDU from the listener (and not a byte of the next)."""
    sock.settimeout(timeout)
    header = recv_exact(sock, 6)
    return header + recv_exact(sock, struct.unpack(">I", header[2:6])[0])


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(called: str = SCP_AE, calling: str = "RAW", *, contexts=((1, CT, EXPLICIT_LE),),
                 max_pdu: int = 16384) -> bytes:
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + b"\0" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1"))
    for cx_id, abstract, ts in contexts:
        body += item(0x20, bytes((cx_id, 0, 0, 0)) + item(0x30, abstract.encode())
                     + item(0x40, ts.encode()))
    body += item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    return b"\x01\x00" + struct.pack(">I", len(body)) + body


def read_exactly(sock: socket.socket, n: int, timeout: float) -> bytes:
    """The next ``n`` bytes the listener sends (fails if it closes first or is slower)."""
    sock.settimeout(timeout)
    return recv_exact(sock, n)


def abort_reason(data: bytes) -> tuple[int, int]:
    """(source, reason) of the A-ABORT the listener sent."""
    assert data[:1] == b"\x07" and len(data) == 10, data
    return data[8], data[9]


def assert_still_serves(engine) -> None:
    res = echoscu(port_of(engine))
    assert res.returncode == 0, res.stdout + res.stderr


def test_garbage_first_pdu_closed_at_once(ul):
    engine = ul(acse_timeout_s=20)
    sock = connect(engine)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data, took = read_until_closed(sock, 5)
    sock.close()
    assert abort_reason(data) == (2, 1)   # provider, unrecognized PDU
    assert took < 1.0
    poll(lambda: engine.board.snapshot()["recent"], message="the board row")
    [row] = engine.board.snapshot()["recent"]
    assert (row["status"], row["reason"]) == ("aborted", "not a DICOM PDU")
    assert_still_serves(engine)


def test_unknown_pdu_type_aborted(ul):
    engine = ul(acse_timeout_s=20)
    sock = connect(engine)
    sock.sendall(b"\x09\x00" + struct.pack(">I", 4) + b"\0" * 4)
    data, took = read_until_closed(sock, 5)
    sock.close()
    assert abort_reason(data) == (2, 1) and took < 1.0
    assert_still_serves(engine)


def test_truncated_pdu(ul):
    """Half an A-ASSOCIATE-RQ: a peer that closes is gone at once; one that stays is
    dropped at network_timeout_s (the whole PDU's deadline), not acse_timeout_s."""
    engine = ul(acse_timeout_s=20, network_timeout_s=2)
    rq = associate_rq()
    closer = connect(engine)
    closer.sendall(rq[:40])
    closer.close()
    poll(lambda: engine.board.snapshot()["recent"], message="the board row")
    [row] = engine.board.snapshot()["recent"]
    assert row["reason"] == "connection closed in the middle of a PDU"
    stayer = connect(engine)
    stayer.sendall(rq[:40])
    data, took = read_until_closed(stayer, 6)
    stayer.close()
    assert abort_reason(data) == (2, 0) and 1.5 <= took <= 3.5, took
    assert_still_serves(engine)
    assert objects(engine) == []


def test_oversize_associate_rq_refused_without_reading_it(ul):
    engine = ul(acse_timeout_s=20, network_timeout_s=20)
    sock = connect(engine)
    sock.sendall(b"\x01\x00" + struct.pack(">I", 2 * 1024 * 1024) + b"\0" * 4096)
    data, took = read_until_closed(sock, 5)
    sock.close()
    assert abort_reason(data) == (2, 6) and took < 1.0
    [row] = audit(engine, "refused")
    assert row["status"] == "abort"
    assert row["detail"] == "PDU type 0x01 length 2097152 exceeds 1048576"
    assert_still_serves(engine)


def test_pdata_before_association_aborted(ul):
    engine = ul(acse_timeout_s=20)
    sock = connect(engine)
    pdv = struct.pack(">IBB", 6, 1, 0x03) + b"\0" * 4
    t0 = time.monotonic()
    sock.sendall(b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv)
    # The A-ABORT comes at once (not at acse_timeout_s); the listener then waits, as
    # PS3.8 says (ARTIM), for us to close: we do, instead of waiting 20 s for it.
    data = read_exactly(sock, 10, timeout=5)
    assert time.monotonic() - t0 < 5
    sock.close()
    assert abort_reason(data) == (2, 2)   # unexpected PDU
    assert_still_serves(engine)
    assert objects(engine) == []


def test_malformed_associate_rq_aborted(ul):
    engine = ul(acse_timeout_s=2)
    rq = bytearray(associate_rq())
    rq[6 + 68 + 2:6 + 68 + 4] = struct.pack(">H", 60000)   # the first item overruns the PDU
    sock = connect(engine)
    sock.sendall(bytes(rq))
    data, _ = read_until_closed(sock, 5)
    sock.close()
    assert abort_reason(data) == (2, 6)
    assert_still_serves(engine)


def test_pdv_for_an_unaccepted_context_aborts(ul):
    engine = ul()
    sock = connect(engine)
    # Context 1: CT (accepted); context 3: a query SOP class (not accepted).
    sock.sendall(associate_rq(contexts=((1, CT, EXPLICIT_LE), (3, "1.2.840.10008.5.1.4.1.2.2.1", EXPLICIT_LE))))
    ac = sock.recv(65536)
    assert ac[:1] == b"\x02", ac
    results = {ac[i + 4]: ac[i + 6] for i in range(6 + 68, len(ac)) if ac[i] == 0x21 and ac[i + 1] == 0}
    assert results.get(1) == 0 and results.get(3) == 3, results
    pdv = struct.pack(">IBB", 6, 3, 0x03) + b"\0" * 4
    sock.sendall(b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv)
    data, _ = read_until_closed(sock, 5)
    sock.close()
    assert abort_reason(data) == (2, 6)
    poll(lambda: engine.board.snapshot()["recent"], message="the board row")
    [row] = engine.board.snapshot()["recent"]
    assert (row["status"], row["reason"]) == ("aborted", "PDV for presentation context 3, not accepted")
    assert_still_serves(engine)


def test_pre_association_limit_per_peer_closes_the_newest(ul):
    engine = ul(acse_timeout_s=20, max_pending_per_address=3)
    listener = engine.listeners[0]
    assert listener.pending_per_peer == 3
    idle = [connect(engine) for _ in range(3)]
    poll(lambda: listener.pending == 3, message="3 pending connections")
    newest = connect(engine)
    data, took = read_until_closed(newest, 2)
    newest.close()
    assert data == b"" and took < 1.0
    assert listener.pending == 3 and all(s.fileno() >= 0 for s in idle)
    idle.pop().close()
    poll(lambda: listener.pending == 2, message="one pending connection gone")
    assert_still_serves(engine)
    # A rejected peer that keeps its connection open (ARTIM) still counts: lingering
    # cannot be used to get round the limit.
    lingering = connect(engine)
    lingering.sendall(associate_rq("NOT_US"))
    assert recv_pdu(lingering)[:1] == b"\x03"
    assert listener.pending == 3
    refused = connect(engine)
    assert read_until_closed(refused, 2)[0] == b""
    for s in idle + [lingering, refused]:
        s.close()
    poll(lambda: listener.pending == 0, message="no pending connection")
    # The limits are live keys: a reload changes them for the next connection.
    path = engine.config.path
    path.write_text(path.read_text().replace("max_pending_per_address = 3", "max_pending_per_address = 1"))
    assert engine.reload() == ["listener modalities: updated (associations in progress kept)"]
    first = connect(engine)
    poll(lambda: listener.pending == 1, message="1 pending connection")
    second = connect(engine)
    assert read_until_closed(second, 2)[0] == b""
    first.close()
    second.close()


# --------------------------------------------------------------------------
# The headline: idle connections cost no thread
# --------------------------------------------------------------------------

def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def test_thousand_idle_connections_cost_no_thread(ul, record_property):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        engine = ul(acse_timeout_s=60, network_timeout_s=60)
        listener = engine.listeners[0]
        assert echoscu(port_of(engine)).returncode == 0
        before = threads()
        idle = []
        try:
            for _ in range(1000):
                idle.append(socket.create_connection(("127.0.0.1", port_of(engine)), timeout=10))
            poll(lambda: listener.pending == 1000, timeout=20, message="1000 pending connections")
            grown = threads() - before
            c0 = cpu_s()
            time.sleep(2)
            idle_cpu = cpu_s() - c0
            t0 = time.monotonic()
            res = echoscu(port_of(engine))
            echo_s = time.monotonic() - t0
            record_property("echo_s_with_1000_idle", round(echo_s, 3))
            record_property("threads_grown", grown)
            record_property("cpu_s_over_2s_idle", round(idle_cpu, 3))
            assert res.returncode == 0, res.stdout + res.stderr
            assert echo_s < 1.0, echo_s
            assert grown <= 4, f"{grown} threads more with 1000 idle connections"
            assert idle_cpu < 0.3, f"{idle_cpu:.2f} s of CPU in 2 s with 1000 idle connections"
            # Every idle connection is on the board (the echo's row leaves it once
            # echoscu has closed its end).
            poll(lambda: len(engine.board.snapshot()["live"]) == 1000, message="1000 live rows")
        finally:
            for s in idle:
                s.close()
        poll(lambda: listener.pending == 0, timeout=10, message="idle connections gone")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------
# Reload: live keys in place, the others by a restart
# --------------------------------------------------------------------------

def test_reload_live_keys_in_place_and_the_others_by_a_restart(ul):
    engine = ul(calling_aets=["MODALITY"])
    port = port_of(engine)
    path = engine.config.path
    text = path.read_text()
    assert echoscu(port, aet="NEWCOMER").returncode != 0
    path.write_text(text.replace('calling_aets = ["MODALITY"]', 'calling_aets = ["MODALITY", "NEWCOMER"]'))
    report = engine.reload()
    assert report == ["listener modalities: updated (associations in progress kept)"], report
    first = engine.listeners[0]
    assert echoscu(port, aet="NEWCOMER").returncode == 0

    path.write_text(path.read_text().replace('calling_aets = ["MODALITY", "NEWCOMER"]',
                                             'calling_aets = ["MODALITY", "NEWCOMER"]\nmax_pdu_kb = 64'))
    report = engine.reload()
    assert report == [f"listener modalities: restarted on 127.0.0.1:{port}"], report
    assert engine.listeners[0] is first and first.cfg.max_pdu_kb == 64
    assert echoscu(port, aet="NEWCOMER").returncode == 0


def test_nagle_on_sender_is_not_held_by_delayed_acks(ul, tmp_path, record_property):
    """Stock DCMTK (no TCP_NODELAY in its environment) leaves Nagle on: unless we ACK
    at once (TCP_QUICKACK before every wait for bytes) each object waits ~40 ms for a
    delayed ACK."""
    engine = ul()
    files = dicomgen.write_corpus(tmp_path / "sr", 40)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    t0 = time.monotonic()
    res = subprocess.run([require_tool("storescu"), "-aet", "NAGLE", "-aec", SCP_AE, "127.0.0.1",
                          str(port_of(engine)), *map(str, files)],
                         capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - t0
    record_property("nagle_40_objects_s", round(elapsed, 3))
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(objects(engine)) == 40
    assert elapsed < 1.2, f"40 objects took {elapsed:.2f} s (delayed ACKs: ~1.6 s or more)"


def test_large_associate_rqs_share_a_budget(ul):
    """An A-ASSOCIATE-RQ may be up to 1 MiB, but connections that each declare a
    large one are read only within a shared budget: the one over it is refused."""
    from mfconsole.ul import acceptor

    engine = ul(acse_timeout_s=20, network_timeout_s=20)
    listener = engine.listeners[0]
    per = 1024 * 1024 - 16
    holders = []
    for _ in range(acceptor.RQ_BUDGET // per):
        s = connect(engine)
        s.sendall(b"\x01\x00" + struct.pack(">I", per) + b"\0" * 100)
        holders.append(s)
    poll(lambda: listener.large_rq_bytes == len(holders) * per, message="the budget in use")
    over = connect(engine)
    over.sendall(b"\x01\x00" + struct.pack(">I", per) + b"\0" * 100)
    data, took = read_until_closed(over, 5)
    over.close()
    assert abort_reason(data) == (2, 0) and took < 1.0
    [row] = audit(engine, "refused")
    assert row["status"] == "abort" and "budget" in row["detail"]
    for s in holders:
        s.close()
    poll(lambda: listener.large_rq_bytes == 0, message="the budget released")
    assert_still_serves(engine)


def test_pdata_over_the_advertised_max_aborts(ul, raw_sends):
    engine = ul(max_pdu_kb=64, acse_timeout_s=20, network_timeout_s=20)
    assoc = scu((CT, [EXPLICIT_LE])).associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    assert assoc.is_established
    t0 = time.monotonic()
    try:
        assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">I", 0x7FFFFFF0) + b"\0" * 65536)
    except OSError:
        pass
    poll(lambda: not assoc.is_established, timeout=3, message="the association to end")
    assert time.monotonic() - t0 < 1.5
    [row] = audit(engine, "refused")
    assert row["detail"] == f"PDU type 0x04 length {0x7FFFFFF0} exceeds {64 * 1024 + 1024}"
    assert objects(engine) == []
    assert_still_serves(engine)


# --------------------------------------------------------------------------
# DIMSE over raw sockets: fragmentation, unknown operations, timeouts
# --------------------------------------------------------------------------

def command_set(**fields: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value
                    for element, value in sorted(fields.values()))
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def raw_association(engine, max_pdu: int = 16384) -> socket.socket:
    sock = connect(engine)
    sock.sendall(associate_rq(contexts=((1, CT, EXPLICIT_LE), (3, Verification, IMPLICIT_LE)),
                              max_pdu=max_pdu))
    assert recv_pdu(sock)[:1] == b"\x02"
    return sock


def read_message(sock: socket.socket) -> tuple[list[int], bytes]:
    """(lengths of the P-DATA PDUs, the command set) of one response."""
    lengths, command = [], b""
    while True:
        data = recv_pdu(sock)
        assert data[:1] == b"\x04", data
        lengths.append(len(data) - 6)
        pos = 6
        while pos < len(data):
            n = struct.unpack(">I", data[pos:pos + 4])[0]
            control = data[pos + 5]
            command += data[pos + 6:pos + 4 + n]
            pos += 4 + n
            if control & 0x02:
                return lengths, command


def element(command: bytes, tag: int) -> bytes:
    pos = 0
    while pos < len(command):
        _, el, n = struct.unpack("<HHI", command[pos:pos + 8])
        if el == tag:
            return command[pos + 8:pos + 8 + n]
        pos += 8 + n
    raise KeyError(hex(tag))


def test_echo_response_fragmented_to_a_tiny_peer_max_pdu_and_unknown_operations(ul):
    engine = ul()
    sock = raw_association(engine, max_pdu=40)
    echo = command_set(cls=(0x0002, Verification.encode()), field=(0x0100, us(0x0030)),
                       msgid=(0x0110, us(5)), dstype=(0x0800, us(0x0101)))
    sock.sendall(b"\x04\x00" + struct.pack(">I", len(echo) + 6)
                 + struct.pack(">IBB", len(echo) + 2, 3, 0x03) + echo)
    lengths, rsp = read_message(sock)
    assert len(lengths) > 1 and max(lengths) <= 40, lengths
    assert element(rsp, 0x0100) == us(0x8030) and element(rsp, 0x0120) == us(5)
    assert element(rsp, 0x0900) == us(0)

    # A C-FIND-RQ on the storage context: answered "unrecognized operation".
    find = command_set(cls=(0x0002, CT.encode()), field=(0x0100, us(0x0020)),
                       msgid=(0x0110, us(6)), dstype=(0x0800, us(0x0101)))
    sock.sendall(b"\x04\x00" + struct.pack(">I", len(find) + 6)
                 + struct.pack(">IBB", len(find) + 2, 1, 0x03) + find)
    _, rsp = read_message(sock)
    assert element(rsp, 0x0100) == us(0x8020) and element(rsp, 0x0900) == us(0x0211)
    sock.sendall(b"\x05\x00" + struct.pack(">I", 4) + b"\0" * 4)   # A-RELEASE-RQ
    assert recv_pdu(sock)[:1] == b"\x06"
    sock.close()
    poll(lambda: engine.board.snapshot()["recent"], message="the board row")
    assert engine.board.snapshot()["recent"][0]["status"] == "released"


def test_silence_after_association_and_inside_a_message_is_aborted(ul):
    engine = ul(network_timeout_s=1.5, dimse_timeout_s=1)
    idle = raw_association(engine)
    t0 = time.monotonic()
    data = recv_pdu(idle)   # then ARTIM: we close when the peer does, or acse_timeout_s later
    idle.close()
    assert abort_reason(data) == (2, 0)
    assert 1.3 <= time.monotonic() - t0 <= 3, time.monotonic() - t0

    partial = raw_association(engine)
    half = command_set(cls=(0x0002, CT.encode()), field=(0x0100, us(0x0001)))
    partial.sendall(b"\x04\x00" + struct.pack(">I", len(half) + 6)
                    + struct.pack(">IBB", len(half) + 2, 1, 0x01) + half)   # not the last fragment
    t0 = time.monotonic()
    data = recv_pdu(partial)
    partial.close()
    assert abort_reason(data) == (2, 0)
    assert 0.8 <= time.monotonic() - t0 <= 2.5, time.monotonic() - t0
    recent = poll(lambda: len(r := engine.board.snapshot()["recent"]) == 2 and r, message="two rows")
    reasons = sorted(r["reason"] for r in recent)
    assert reasons == ["nothing received for 1 s", "nothing received for 1.5 s"], reasons
    assert_still_serves(engine)

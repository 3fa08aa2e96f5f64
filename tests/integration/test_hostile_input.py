"""Hostile input against the C-STORE SCP: bad UIDs, malformed data sets, oversize
objects, non-DICOM and silent/stalling peers.

Every refusal is checked where it matters: the DIMSE status the sending SCU got,
the stored state (objects rows, blob files under data_dir/blobs), the audit trail,
and that the canary PHI the hostile objects carry leaks nowhere under data_dir.

Malformed bytes are sent with pynetdicom's "chunked" C-STORE: given a file path with
``_config.STORE_SEND_CHUNKED_DATASET`` set, pynetdicom takes the command UIDs from the
file meta and sends the data set bytes exactly as they are on disk (it never decodes
or re-encodes them). ``test_chunked_send_delivers_bytes_untouched`` checks that
premise on the receiving side.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

import dicomgen
from harness import CANARY_ID, CANARY_NAME, poll

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
SCP_AE = "MF_SCP"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF

FAST = {"acse_timeout_s": 3, "network_timeout_s": 3, "dimse_timeout_s": 5}
_UI_VALIDATOR = _config.VALIDATORS["UI"]

# The SCU's pydicom complains about the hostile UIDs it is made to carry.
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length")]


# --------------------------------------------------------------------------
# Byte-level DICOM: the tests decide every byte, pydicom never "fixes" them.
# --------------------------------------------------------------------------

def el(tag: int, vr: str, value: bytes = b"", *, enc: str = "LE",
       length: int | None = None) -> bytes:
    """One element; ``length`` overrides the declared length (no padding then)."""
    if length is None and len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    n = len(value) if length is None else length
    g, e = tag >> 16, tag & 0xFFFF
    if enc == "IMPL":
        return struct.pack("<HHI", g, e, n) + value
    bo = ">" if enc == "BE" else "<"
    if vr in LONG_VRS:
        return struct.pack(f"{bo}HH2sHI", g, e, vr.encode(), 0, n) + value
    return struct.pack(f"{bo}HH2sH", g, e, vr.encode(), n) + value


def header_elements(sop_class: str, sop_instance: str, *, study: str | None = None,
                    series: str | None = None) -> dict[int, tuple[str, bytes]]:
    """The usual top-level header, carrying the canary PHI."""
    return {
        0x00080016: ("UI", sop_class.encode("latin-1")),
        0x00080018: ("UI", sop_instance.encode("latin-1")),
        0x00080060: ("CS", b"OT"),
        0x00100010: ("PN", CANARY_NAME.encode()),
        0x00100020: ("LO", CANARY_ID.encode()),
        0x0020000D: ("UI", (study or generate_uid()).encode()),
        0x0020000E: ("UI", (series or generate_uid()).encode()),
    }


def encode(elements: dict[int, tuple[str, bytes]], *, enc: str = "LE", tail: bytes = b"") -> bytes:
    return b"".join(el(t, vr, v, enc=enc) for t, (vr, v) in sorted(elements.items())) + tail


def part10(path: Path, dataset: bytes, *, sop_class: str, sop_instance: str,
           ts: str = EXPLICIT_LE) -> Path:
    """A Part 10 file: valid file meta (explicit LE) + ``dataset`` bytes as given."""
    meta = (el(0x00020001, "OB", b"\x00\x01")
            + el(0x00020002, "UI", sop_class.encode("latin-1"))
            + el(0x00020003, "UI", sop_instance.encode("latin-1"))
            + el(0x00020010, "UI", ts.encode())
            + el(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode()))
    group_length = el(0x00020000, "UL", struct.pack("<I", len(meta)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + group_length + meta + dataset)
    return path


def nested_sequences(levels: int) -> bytes:
    """``levels`` nested undefined-length sequences (explicit VR LE)."""
    inner = el(0x00100010, "PN", CANARY_NAME.encode())
    for _ in range(levels):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        inner = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, UNDEFINED) + item
                 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return inner


# --------------------------------------------------------------------------
# The sending side: pynetdicom as SCU.
# --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _raw_sends(monkeypatch):
    """Send data set bytes of a file path untouched (see the module docstring)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def scu(*contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = 5
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def port_of(scp) -> int:
    """The DICOM port of an in-process Engine or of a `mfconsole serve` process."""
    return scp.port if hasattr(scp, "port") else scp.listeners[0].address[1]


def c_store(scp, path: Path, sop_class: str, ts: str = EXPLICIT_LE) -> int | None:
    """C-STORE ``path`` on a fresh association; the status, or None if aborted."""
    assoc = scu((sop_class, [ts])).associate("127.0.0.1", port_of(scp), ae_title=SCP_AE)
    assert assoc.is_established, "association not established"
    try:
        rsp = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def c_echo_and_store(scp, tmp_path: Path) -> tuple[float, str]:
    """A legitimate association: C-ECHO then C-STORE of a small SR. (seconds, UID)."""
    ds = dicomgen.make_sr()
    path = dicomgen.save(ds, tmp_path / f"legit-{ds.SOPInstanceUID}.dcm")
    t0 = time.monotonic()
    ae = scu((Verification, [EXPLICIT_LE]), (ds.SOPClassUID, [EXPLICIT_LE]))
    assoc = ae.associate("127.0.0.1", port_of(scp), ae_title=SCP_AE)
    assert assoc.is_established, "legitimate association not established"
    try:
        assert int(assoc.send_c_echo().Status) == 0x0000
        assert int(assoc.send_c_store(path).Status) == 0x0000
    finally:
        assoc.release()
    return time.monotonic() - t0, str(ds.SOPInstanceUID)


# --------------------------------------------------------------------------
# Stored state.
# --------------------------------------------------------------------------

def objects(engine) -> list[dict]:
    return engine.store.reader().rows("objects")


def blob_files(engine) -> list:
    """Every stored blob: files (large objects) and blob_data rows (small ones)."""
    files = [p for p in engine.store.blob_root.rglob("*") if p.is_file()]
    inline = [r["object_id"] for r in engine.store.reader().rows("blob_data")]
    return files + inline


def refused_rows(engine, expected: int, timeout: float = 5.0) -> list[dict]:
    """Audit rows for refusals (audit rows are committed with the next group)."""
    def rows():
        found = engine.store.reader().rows("audit", event="refused")
        return found if len(found) >= expected else None
    return poll(rows, timeout, message=f"{expected} 'refused' audit row(s)")


def assert_nothing_stored(engine) -> None:
    assert objects(engine) == []
    assert blob_files(engine) == []


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def assert_no_canary(engine) -> None:
    """The canary PHI is in no audit row, no log line, no byte of any file under data_dir."""
    needles = (CANARY_NAME.encode(), CANARY_ID.encode(), b"ZZCANARY", b"CANARY-0001")
    for row in engine.store.reader().rows("audit"):
        text = " ".join(str(v) for v in row.values())
        assert "CANARY" not in text.upper(), f"canary PHI in audit row {dict(row)}"
    log_file = engine.data_dir / "logs" / "mfconsole.log"
    assert log_file.is_file(), "no log file"
    files = [p for p in engine.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files), "expected the SQLite WAL to be checked"
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"canary PHI in {path.relative_to(engine.data_dir)}"


# --------------------------------------------------------------------------
# 1-3: identifying UIDs. 0xA900, nothing stored, no file outside data_dir.
# --------------------------------------------------------------------------

TOO_LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 40   # 66 characters
HOSTILE_UIDS = {
    "traversal": "../../etc/passwd",
    "dotdot-inside": "1.2/../3",
    "nul-inside": "1.2.3\x004.5",
    "65-plus-chars": TOO_LONG_UID,
}


@pytest.mark.parametrize("uid", list(HOSTILE_UIDS.values()), ids=list(HOSTILE_UIDS))
def test_traversal_shaped_uids_refused_0xA900(engine_factory, tmp_path, uid):
    engine = engine_factory(listener=FAST)
    passwd = Path("/etc/passwd")
    passwd_before = (passwd.stat().st_mtime_ns, hashlib.sha256(passwd.read_bytes()).hexdigest())
    tmp_before = set(os.listdir("/tmp"))
    outside_before = tree(tmp_path) - tree(engine.data_dir)

    # The command carries the same UID as the data set when pynetdicom can send it
    # (it refuses to encode a command UID over 64 characters: that one gets a valid
    # command UID and must still be refused for the data set's UID).
    command_uid = uid if len(uid) <= 64 else generate_uid()
    dataset = encode(header_elements(CT, uid))
    path = part10(tmp_path / "send" / "hostile.dcm", dataset, sop_class=CT, sop_instance=command_uid)

    assert c_store(engine, path, CT) == 0xA900
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == "0xA900"
    assert "SOP Instance UID" in row["detail"], row["detail"]
    assert uid not in row["detail"]

    # Nothing appeared outside data_dir (the only other things under tmp_path are the
    # config and the file we sent), and nothing passwd-shaped appeared anywhere.
    outside_after = tree(tmp_path) - tree(engine.data_dir)
    assert outside_after - outside_before - {path.parent, path} == set()
    everything = tree(tmp_path)
    assert not [p for p in everything if "passwd" in p.as_posix() or p.name == "etc"]
    assert not [n for n in set(os.listdir("/tmp")) - tmp_before if "passwd" in n or n == "etc"]
    assert (passwd.stat().st_mtime_ns, hashlib.sha256(passwd.read_bytes()).hexdigest()) == passwd_before

    # The listener still works afterwards.
    c_echo_and_store(engine, tmp_path)
    assert len(objects(engine)) == 1


@pytest.mark.parametrize("missing", [0x00080018, 0x0020000D], ids=["no-SOPInstanceUID", "no-StudyInstanceUID"])
def test_missing_identifying_uid_refused_0xA900(engine, tmp_path, missing):
    uid = generate_uid()
    elements = header_elements(CT, uid)
    del elements[missing]
    path = part10(tmp_path / "missing.dcm", encode(elements), sop_class=CT, sop_instance=uid)

    assert c_store(engine, path, CT) == 0xA900
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == "0xA900" and "missing" in row["detail"]


@pytest.mark.parametrize("what", ["instance", "class"])
def test_command_uid_differs_from_dataset_refused_0xA900(engine, tmp_path, what):
    dataset_uid, command_uid = generate_uid(), generate_uid()
    if what == "instance":
        dataset = encode(header_elements(CT, dataset_uid))
        path = part10(tmp_path / "mismatch.dcm", dataset, sop_class=CT, sop_instance=command_uid)
    else:
        # The command says CT, the data set says Secondary Capture.
        dataset = encode(header_elements(dicomgen.SECONDARY_CAPTURE, dataset_uid))
        path = part10(tmp_path / "mismatch.dcm", dataset, sop_class=CT, sop_instance=dataset_uid)

    assert c_store(engine, path, CT) == 0xA900
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == "0xA900" and "does not match" in row["detail"]


# --------------------------------------------------------------------------
# 4: malformed structure. 0xC000, nothing stored.
# --------------------------------------------------------------------------

def _truncated() -> bytes:
    # Pixel Data declares 1 000 000 bytes; 10 follow.
    return el(0x7FE00010, "OB", length=1_000_000) + b"\x01" * 10


def _undefined_length_text() -> bytes:
    # Text Value (UT) with undefined length: only SQ, UN and pixel data may have it.
    return el(0x0040A160, "UT", length=UNDEFINED) + b"NOT A SEQUENCE  " + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


MALFORMED = {
    "truncated-element": (_truncated, "exceeds"),
    "undefined-length-non-sequence": (_undefined_length_text, "undefined length not allowed"),
    "40-nested-sequences": (lambda: nested_sequences(40), "deeper than"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_dataset_refused_0xC000(engine, tmp_path, kind):
    make_tail, reason = MALFORMED[kind]
    uid = generate_uid()
    dataset = encode(header_elements(CT, uid), tail=make_tail())
    path = part10(tmp_path / f"{kind}.dcm", dataset, sop_class=CT, sop_instance=uid)

    status = c_store(engine, path, CT)
    assert status is not None and status & 0xF000 == 0xC000, f"status {status!r}"
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == f"0x{status:04X}" and reason in row["detail"], row["detail"]


def test_chunked_send_delivers_bytes_untouched(engine, tmp_path):
    """The premise of the malformed tests: what is on disk is what arrives."""
    uid = generate_uid()
    # A private UN element: a re-encoding SCU would have to guess its VR.
    elements = header_elements(CT, uid)
    elements[0x00091010] = ("UN", b"\x00\x01\x02\x03")
    dataset = encode(elements)
    path = part10(tmp_path / "raw.dcm", dataset, sop_class=CT, sop_instance=uid)
    assert c_store(engine, path, CT) == 0x0000
    [row] = objects(engine)
    assert engine.store.read_object(row["id"]) == dataset


# --------------------------------------------------------------------------
# 5: oversize.
# --------------------------------------------------------------------------

def test_oversize_object_aborted_and_next_association_stores(engine_factory, tmp_path):
    engine = engine_factory(listener=FAST, store={"max_object_mb": 1})
    ds = dicomgen.make_image(pixel_bytes=3 * 1024 * 1024)
    path = dicomgen.save(ds, tmp_path / "big.dcm")
    assert path.stat().st_size > 3 * 1024 * 1024

    ae = scu((CT, [EXPLICIT_LE]))
    assoc = ae.associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    assert assoc.is_established
    t0 = time.monotonic()
    rsp = assoc.send_c_store(path)
    elapsed = time.monotonic() - t0
    # Aborted while it arrives (no response at all), well before all of it is held.
    assert "Status" not in rsp, f"expected an abort, got {rsp}"
    poll(lambda: assoc.is_aborted, timeout=3, message="the SCU to see the A-ABORT")
    assert elapsed < 5, f"oversize refusal took {elapsed:.1f}s"
    # The partial blob goes on a pool thread after the abort (behind any write of it in
    # progress): wait for exactly that, then check nothing else was kept.
    poll(lambda: blob_files(engine) == [], timeout=5, message="the aborted object's blob removed")
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == "abort" and "max_object_mb" in row["detail"], row

    _, uid = c_echo_and_store(engine, tmp_path)
    assert [r["sop_instance_uid"] for r in objects(engine)] == [uid]
    assert len(blob_files(engine)) == 1


def test_object_between_limit_and_abort_threshold_refused(engine_factory, tmp_path):
    """Just over max_object_mb: received whole (under the abort threshold), then refused."""
    engine = engine_factory(listener=FAST, store={"max_object_mb": 1})
    ds = dicomgen.make_image(pixel_bytes=1024 * 1024 + 64 * 1024)
    path = dicomgen.save(ds, tmp_path / "slightly-big.dcm")
    status = c_store(engine, path, CT)
    assert status is not None and status & 0xF000 in (0xA000, 0xC000), f"status {status!r}"
    assert_nothing_stored(engine)
    [row] = refused_rows(engine, 1)
    assert row["status"] == f"0x{status:04X}" and "max_object_mb" in row["detail"], row


# --------------------------------------------------------------------------
# 6-8: non-DICOM, silent, stalling and lying peers.
# --------------------------------------------------------------------------

def connect(engine) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port_of(engine)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def wait_closed(socks: list[socket.socket], timeout: float, since: float | None = None) -> dict:
    """Read (and discard, e.g. an A-ABORT) until each socket sees EOF or a reset.
    Returns {socket: seconds from ``since`` until it closed} for those closed in time."""
    since = time.monotonic() if since is None else since
    end = time.monotonic() + timeout
    closed: dict[socket.socket, float] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    try:
        while len(closed) < len(socks) and time.monotonic() < end:
            for key, _ in sel.select(min(end - time.monotonic(), 0.1)):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    closed[s] = time.monotonic() - since
                    sel.unregister(s)
    finally:
        sel.close()
    return closed


def test_http_request_on_dicom_port_closed_and_listener_still_serves(engine_factory, tmp_path):
    engine = engine_factory(listener=FAST)
    sock = connect(engine)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        closed = wait_closed([sock], timeout=FAST["acse_timeout_s"] + 2)
        assert sock in closed, "HTTP client never disconnected"
    finally:
        sock.close()
    # Closed by the ACSE deadline at the latest (pynetdicom answers A-ABORT, then
    # waits ARTIM for the peer to close).
    assert closed[sock] < FAST["acse_timeout_s"] + 1.5
    elapsed, _ = c_echo_and_store(engine, tmp_path)
    assert elapsed < 2.0
    assert len(objects(engine)) == 1 and len(blob_files(engine)) == 1


def test_silent_clients_do_not_block_and_are_dropped_at_deadline(engine_factory, tmp_path,
                                                                  record_property):
    acse, network = 3, 5
    # max_associations 4 < 11 idle connections: they must not count against it.
    engine = engine_factory(listener={"max_associations": 4, "acse_timeout_s": acse,
                                      "network_timeout_s": network, "dimse_timeout_s": 5})
    t0 = time.monotonic()
    silent = [connect(engine) for _ in range(10)]
    half = connect(engine)
    half.sendall(b"\x01\x00\x00")   # half of a PDU header, then nothing
    try:
        time.sleep(0.3)   # let the server accept them all
        elapsed, uid = c_echo_and_store(engine, tmp_path)
        record_property("legitimate_association_s", round(elapsed, 3))
        assert elapsed < 2.0, f"legitimate association took {elapsed:.2f}s"
        assert [r["sop_instance_uid"] for r in objects(engine)] == [uid]

        closed = wait_closed(silent + [half], timeout=network + 3 - (time.monotonic() - t0), since=t0)
    finally:
        for s in silent + [half]:
            s.close()
    open_silent = [s for s in silent if s not in closed]
    assert not open_silent, f"{len(open_silent)} silent client(s) still connected"
    assert half in closed, "half-header client still connected"
    # Silent clients go at the ACSE deadline (ARTIM): not before, not much after.
    times = sorted(closed[s] for s in silent)
    record_property("silent_closed_s", [round(t, 2) for t in times])
    record_property("half_header_closed_s", round(closed[half], 2))
    # (Slack: pynetdicom starts two polling threads per connection; 11 at once take a while.)
    assert acse - 0.5 <= times[0] and times[-1] <= acse + 2.0, times
    # The half header is a PDU read in progress: bounded by the network timeout.
    assert closed[half] <= network + 2.0, closed[half]


def test_peer_stalling_mid_pdu_is_dropped_and_blocks_nobody(engine_factory, tmp_path):
    network = 3
    # ACSE deadline well after the network one: it must be the read deadline that acts.
    engine = engine_factory(listener={"max_associations": 4, "acse_timeout_s": 20,
                                      "network_timeout_s": network, "dimse_timeout_s": 5})
    stalled = connect(engine)
    t0 = time.monotonic()
    # A-ASSOCIATE-RQ header claiming 1000 bytes, then 10 of them.
    stalled.sendall(b"\x01\x00" + struct.pack(">I", 1000) + b"\x00\x01\x00\x00MF_SCP")
    try:
        time.sleep(0.2)
        elapsed, _ = c_echo_and_store(engine, tmp_path)
        assert elapsed < 2.0, f"legitimate association took {elapsed:.2f}s"
        closed = wait_closed([stalled], timeout=network + 3, since=t0)
    finally:
        stalled.close()
    assert stalled in closed, "stalled peer still connected"
    assert network - 0.5 <= closed[stalled] <= network + 1.5, closed[stalled]
    assert len(objects(engine)) == 1


def test_peer_dripping_a_pdu_is_dropped_at_the_network_deadline(engine_factory, tmp_path):
    """A byte every 0.4 s never trips a per-read timeout; the whole PDU has a deadline."""
    network = 2
    engine = engine_factory(listener={"acse_timeout_s": 20, "network_timeout_s": network,
                                      "dimse_timeout_s": 5})
    sock = connect(engine)
    pdu = b"\x01\x00" + struct.pack(">I", 1000) + b"\x00\x01\x00\x00" + b"MF_SCP".ljust(16)
    stop = threading.Event()

    def drip() -> None:
        for byte in pdu:
            if stop.wait(0.4):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    t0 = time.monotonic()
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        closed = wait_closed([sock], timeout=network + 3, since=t0)
    finally:
        stop.set()
        dripper.join(5)
        sock.close()
    assert sock in closed, "dripping peer still connected"
    assert closed[sock] <= network + 1.5, closed[sock]
    c_echo_and_store(engine, tmp_path)


def test_pdu_header_declaring_huge_length_closes_at_once(engine_factory, tmp_path):
    """A PDU header declaring ~2 GiB: refused from its header, nothing of it buffered."""
    engine = engine_factory(listener={"acse_timeout_s": 20, "network_timeout_s": 20})
    sock = connect(engine)
    t0 = time.monotonic()
    try:
        sock.sendall(b"\x01\x00" + struct.pack(">I", 0x7FFFFFF0))
        try:
            sock.sendall(b"\0" * 65536)
        except OSError:
            pass
        closed = wait_closed([sock], timeout=3, since=t0)
    finally:
        sock.close()
    assert sock in closed and closed[sock] < 1.5, closed
    [row] = refused_rows(engine, 1)
    assert row["status"] == "abort" and "PDU type 0x01" in row["detail"], row
    # The connection is no longer counted as waiting for its association request.
    listener = engine.listeners[0]
    poll(lambda: listener.pending == 0, timeout=2, message="the connection to be forgotten")
    c_echo_and_store(engine, tmp_path)


def test_pdata_pdu_over_advertised_max_aborts_association(engine_factory, tmp_path):
    engine = engine_factory(listener={"acse_timeout_s": 20, "network_timeout_s": 20,
                                      "max_pdu_kb": 64})
    assoc = scu((CT, [EXPLICIT_LE])).associate("127.0.0.1", port_of(engine), ae_title=SCP_AE)
    assert assoc.is_established
    t0 = time.monotonic()
    try:
        # Write behind the SCU's back: a P-DATA-TF claiming ~2 GiB, and some of it.
        raw = assoc.dul.socket.socket
        raw.sendall(b"\x04\x00" + struct.pack(">I", 0x7FFFFFF0) + b"\0" * 65536)
    except OSError:
        pass
    poll(lambda: not assoc.is_established, timeout=3, message="association to end")
    assert time.monotonic() - t0 < 1.5
    [row] = refused_rows(engine, 1)
    assert row["status"] == "abort" and "PDU type 0x04" in row["detail"], row
    assert_nothing_stored(engine)
    c_echo_and_store(engine, tmp_path)


def test_command_uid_over_64_chars_aborts_in_a_separate_scp(serve_factory, tmp_path, monkeypatch):
    """A command (not data set) UID over 64 characters never reaches our handler:
    pynetdicom's decoder refuses it and aborts. The SCP runs as `mfconsole serve` so
    that relaxing pynetdicom's UID validation for our hostile SCU does not relax it
    in the SCP too."""
    server = serve_factory(listener=FAST)
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    path = part10(tmp_path / "cmd65.dcm", encode(header_elements(CT, TOO_LONG_UID)),
                  sop_class=CT, sop_instance=TOO_LONG_UID)
    status = c_store(server, path, CT)
    assert status is None or status & 0xF000 in (0xA000, 0xC000), f"status {status!r}"
    monkeypatch.setitem(_config.VALIDATORS, "UI", _UI_VALIDATOR)
    c_echo_and_store(server, tmp_path)
    with server.db() as db:
        assert db.object_count() == 1
        assert len([r for r in db.rows("objects") if len(r["sop_instance_uid"]) > 64]) == 0
        assert len(db.rows("blob_data")) == 1
    assert [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file()] == []
    server.stop()
    for path in (p for p in server.data_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert CANARY_NAME.encode() not in data and CANARY_ID.encode() not in data, path


# --------------------------------------------------------------------------
# 9: refusals are audited, and the canary PHI leaks nowhere.
# --------------------------------------------------------------------------

def test_refusals_audited_without_phi(engine_factory, tmp_path):
    engine = engine_factory(listener=FAST, store={"max_object_mb": 1})
    sent: list[tuple[str, Path, str]] = []   # (name, path, SOP class)

    def hostile(name: str, dataset: bytes, command_uid: str, sop_class: str = CT) -> None:
        path = part10(tmp_path / "phi" / f"{name}.dcm", dataset, sop_class=sop_class,
                      sop_instance=command_uid)
        sent.append((name, path, sop_class))

    for name, uid in HOSTILE_UIDS.items():
        hostile(name, encode(header_elements(CT, uid)), uid if len(uid) <= 64 else generate_uid())
    for missing in (0x00080018, 0x0020000D):
        elements = header_elements(CT, generate_uid())
        del elements[missing]
        hostile(f"missing-{missing:08X}", encode(elements), generate_uid())
    hostile("mismatch", encode(header_elements(CT, generate_uid())), generate_uid())
    for kind, (make_tail, _) in MALFORMED.items():
        uid = generate_uid()
        hostile(kind, encode(header_elements(CT, uid), tail=make_tail()), uid)
    for name, size in (("over-limit", 1024 * 1024 + 64 * 1024), ("oversize", 3 * 1024 * 1024)):
        ds = dicomgen.make_image(pixel_bytes=size)   # canary PHI by default
        sent.append((name, dicomgen.save(ds, tmp_path / "phi" / f"{name}.dcm"), CT))

    statuses = {name: c_store(engine, path, sop_class) for name, path, sop_class in sent}
    assert all(s is None or s & 0xF000 in (0xA000, 0xC000) for s in statuses.values()), statuses
    c_echo_and_store(engine, tmp_path)   # one good object (canary inside, encrypted)
    assert len(objects(engine)) == 1 and len(blob_files(engine)) == 1

    rows = refused_rows(engine, len(sent))
    assert len(rows) == len(sent), [r["detail"] for r in rows]
    for row in rows:
        assert row["status"] and row["detail"], row
        assert row["listener"] == "modalities" and row["peer"].startswith("127.0.0.1:"), row
        assert row["object_id"] is None
        for value in tuple(row.values()):
            assert "passwd" not in str(value) and "\0" not in str(value), row
    assert sorted(r["status"] for r in rows) == sorted(
        "abort" if s is None else f"0x{s:04X}" for s in statuses.values())

    log_text = (engine.data_dir / "logs" / "mfconsole.log").read_text()
    assert log_text.count("refused object from") >= len(sent) - 1, "refusals not logged"
    assert_no_canary(engine)


# --------------------------------------------------------------------------
# 10: vendor data is stored, not refused.
# --------------------------------------------------------------------------

def siemens_csa_non_image(uid: str, enc: str) -> bytes:
    """A Siemens CSA non-image object: private SOP class, private groups, and an
    undefined-length UN private sequence (its contents implicit VR LE, PS3.5 6.2.2)."""
    low = header_elements(SIEMENS_CSA_NON_IMAGE, uid)
    low[0x00080060] = ("CS", b"MR")
    low[0x00290010] = ("LO", b"SIEMENS CSA NON-IMAGE")
    low[0x00291008] = ("CS", b"SPEC NUM 4")
    low[0x00291009] = ("LO", b"20260101")
    low[0x00291010] = ("OB", os.urandom(4096))
    item = el(0x00291031, "LO", b"VENDOR ITEM", enc="IMPL")
    sequence = (struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + item
                + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    private_sq = el(0x00291020, "UN", enc=enc, length=UNDEFINED) + sequence
    high = {0x7FE10010: ("LO", b"SIEMENS CSA NON-IMAGE"), 0x7FE11010: ("OB", os.urandom(65536))}
    return encode(low, enc=enc) + private_sq + encode(high, enc=enc)


def _bundled(name: str) -> tuple[Path, str, str]:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file(name))
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


@pytest.mark.parametrize("kind", ["implicit-le-bundled", "explicit-be-bundled",
                                  "siemens-csa-explicit-le", "siemens-csa-implicit-le"])
def test_vendor_and_legacy_encodings_are_stored(engine, tmp_path, kind):
    if kind.endswith("bundled"):
        path, sop_class, ts = _bundled("MR_small_implicit.dcm" if kind.startswith("implicit")
                                       else "MR_small_bigendian.dcm")
        dataset, _ = dicomgen.dataset_bytes(path)
        assert ts == (IMPLICIT_LE if kind.startswith("implicit") else EXPLICIT_BE)
    else:
        uid, sop_class = generate_uid(), SIEMENS_CSA_NON_IMAGE
        ts = EXPLICIT_LE if "explicit" in kind else IMPLICIT_LE
        dataset = siemens_csa_non_image(uid, "LE" if ts == EXPLICIT_LE else "IMPL")
        path = part10(tmp_path / f"{kind}.dcm", dataset, sop_class=sop_class, sop_instance=uid, ts=ts)

    assert c_store(engine, path, sop_class, ts) == 0x0000
    [row] = objects(engine)
    assert (row["sop_class_uid"], row["transfer_syntax"]) == (sop_class, ts)
    assert engine.store.read_object(row["id"]) == dataset   # stored byte for byte
    assert len(blob_files(engine)) == 1
    assert len(engine.store.reader().rows("audit", event="refused")) == 0

"""Conformance of mfconsole's upper layer (mfconsole/ul: the default for listeners and
dimse destinations) against real peers, for what the other ul tests leave open
(test_ul_acceptor.py has the pre-association hostile cases, echoscu, storescu per
syntax at the default maximum PDU, pynetdicom SCU at 4 KiB..unlimited; test_ul_tls.py
TLS and mTLS policy; test_ul_sender.py / test_forward_*.py the sender against storescp
(16 KiB, 4 KiB), Orthanc and FaultSCP, and the peer aborting after or during an
object; tests/unit/test_ul_requestor.py the release collision, requestor side):

* The listener: every syntax it accepts (implicit LE, explicit LE, explicit BE,
  deflate, encapsulated ones passed through) from DCMTK storescu and dcmsend,
  pynetdicom and Orthanc (as C-STORE SCU, through its REST API), into listeners that
  advertise 4 KiB, 16 KiB and 1 MiB (max_pdu_kb has no "unlimited": a listener always
  bounds what it reads), each peer announcing its own maximum (4 KiB to 1 MiB, and
  pynetdicom's unlimited 0); and large objects over TLS and mTLS. What is stored must
  be the data set bytes on the wire (DCMTK writes each file first, with dcmconv, so
  that it sends it without re-encoding; pynetdicom sends file bytes untouched), and the
  peer must have been answered Success for each.
* The sender: one engine forwards every syntax to DCMTK storescp (128 KiB, and over
  mTLS at 4 KiB), pynetdicom SCPs (4 KiB, 1 MiB, unlimited) and Orthanc (4 KiB); each
  peer must hold the stored bytes in the stored syntax, in no P-DATA-TF over its
  maximum.
* Release and abort by the peer at every phase, the listener's own abort (at its
  stop), and hostile PDUs inside an association, over raw sockets; the same phases and
  hostile answers against the sender, from a scripted acceptor (release collision
  included: the listener never asks to release, so it has none). Asserted: what the
  peer received, that nothing is stored half, what was recorded (the associations
  board, the audit trail, the delivery outcome), and that the listener serves on.

Engines are module-scoped where cases do not interfere: each case uses its own SOP
instances and its own connections (raw ones each from its own loopback address), and
looks only at those.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import struct
import threading
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

import dicomgen
from harness import poll, run, write_config
from peers import Orthanc, StoreSCP, require_dicomweb_plugin, require_tool
from tlsgen import make_pki

from mfconsole.dimse import cstore
from mfconsole.dimse.odd_length import even_length
from mfconsole.repository.states import INLINE
from mfconsole.ul import dimse, pdu

SCP_AE = "MF_SCP"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNCOMPRESSED = (IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED)
CT = dicomgen.CT_IMAGE
MiB = 1024 * 1024
# Over incoming.STREAM_AT (1 MiB): sealed into its blob as it arrives; many PDUs at any size.
BIG = MiB + 200 * 1024

# dcmconv's option to write a file in a syntax, and storescu's to propose it.
DCMCONV = {IMPLICIT_LE: "+ti", EXPLICIT_LE: "+te", EXPLICIT_BE: "+tb", DEFLATED: "+td"}
PROPOSE = {IMPLICIT_LE: "-xi", EXPLICIT_LE: "-xe", EXPLICIT_BE: "-xb", DEFLATED: "-xd",
           "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
           "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.80": "-xt"}
# Encapsulated (compressed) objects: passed through as they are, never decoded.
ENCAPSULATED = ("JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm", "MR_small_jpeg_ls_lossless.dcm")
SYNTAXES = {"implicit": IMPLICIT_LE, "explicit": EXPLICIT_LE, "big-endian": EXPLICIT_BE,
            "deflate": DEFLATED, "encapsulated": "encapsulated"}

TIMEOUTS = {"acse_timeout_s": 3, "network_timeout_s": 5, "dimse_timeout_s": 5}
# The listeners of the module's engine: name -> max_pdu_kb. (A listener always advertises
# a maximum: max_pdu_kb is 4..16384, there is no "unlimited" to configure.)
LISTENERS = {"pdu4k": 4, "pdu16k": 16, "pdu1m": 1024}
# What each kind of peer announces itself, per listener: its own maximum PDU (what the
# listener may send it) and, for DCMTK, a smaller one it sends with.
DCMTK_PDU = {"pdu4k": ["-pdu", "131072"], "pdu16k": ["-pdu", "4096", "--max-send-pdu", "4096"],
             "pdu1m": []}
PYNETDICOM_PDU = {"pdu4k": 0, "pdu16k": MiB, "pdu1m": 4096}


# ==========================================================================
# Fixtures: one listening engine, one Orthanc, one PKI for the module
# ==========================================================================

def start_engine(folder: Path, **config):
    from mfconsole.config import load
    from mfconsole.control import serve_control
    from mfconsole.engine.engine import Engine

    engine = Engine(load(write_config(folder, **config)), log_to_stderr=False, control=serve_control)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_listener(pki, mtls: bool) -> dict:
    table = {"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"])}
    if mtls:
        table.update(require_client_cert=True, ca_file=str(pki["ca.crt"]))
    return table


@pytest.fixture(scope="module")
def listening(tmp_path_factory, pki):
    """An engine with five listeners and no destination: pdu4k, pdu16k, pdu1m
    (cleartext), tls4k (TLS) and mtls1m (mTLS); every one accepts deflate."""
    names = list(LISTENERS)
    engine = start_engine(
        tmp_path_factory.mktemp("listening"), destinations=[],
        listener={"name": names[0], "max_pdu_kb": LISTENERS[names[0]], "accept_deflate": True,
                  **TIMEOUTS},
        more_listeners=[{"name": n, "max_pdu_kb": LISTENERS[n]} for n in names[1:]] + [
            {"name": "tls4k", "max_pdu_kb": 4, "tls": tls_listener(pki, False)},
            {"name": "mtls1m", "max_pdu_kb": 1024, "tls": tls_listener(pki, True)}])
    try:
        yield engine
    finally:
        engine.stop()


def port(engine, listener: str) -> int:
    [found] = [lst for lst in engine.listeners if lst.cfg.name == listener]
    return found.address[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with a 4 KiB maximum PDU (its smallest), as SCU and as SCP."""
    require_tool("Orthanc")
    require_dicomweb_plugin()
    peer = Orthanc(tmp_path_factory.mktemp("orthanc"), extra_config={"MaximumPduLength": 4096})
    try:
        yield peer.start()
    finally:
        peer.kill()


@pytest.fixture
def raw_sends(monkeypatch):
    """pynetdicom sends a file's data set bytes as they are on disk (never re-encoded)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# ==========================================================================
# Objects on the wire
# ==========================================================================

def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def inflated(data: bytes, ts: str) -> bytes:
    """A deflated data set inflated (what follows the end of its stream ignored: a pad
    byte, or what Orthanc leaves in its file); any other as it is."""
    return zlib.decompressobj(-15).decompress(data) if ts == DEFLATED else data


def dcmconv(src: Path, dst: Path, *options: str) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    res = run([require_tool("dcmconv"), *options, str(src), str(dst)])
    assert res.returncode == 0, res.stderr
    return dst


def wire_files(folder: Path, syntax: str) -> list[Path]:
    """Fresh objects written by DCMTK in ``syntax``: an SR and a CT of BIG bytes; for
    "encapsulated", pydicom's compressed test files under new UIDs."""
    if syntax == "encapsulated":
        out = []
        for name in ENCAPSULATED:
            ds = dcmread(get_testdata_file(name))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if 0xFFFCFFFC in ds:   # trailing padding: DCMTK does not send it
                del ds[0xFFFCFFFC]
            ds.StudyInstanceUID = ds.SeriesInstanceUID = generate_uid()
            src = folder / "src" / name
            src.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(src, enforce_file_format=True)
            out.append(dcmconv(src, folder / "wire" / name))   # same syntax, DCMTK's encoding
        return out
    ct = dicomgen.make_image(pixel_bytes=BIG)
    if syntax == DEFLATED:
        # Half of it compressible: Orthanc 1.10 stores a deflated object in a file the
        # length of the inflated data set, cutting a stream longer than that short.
        ct.PixelData = ct.PixelData[:len(ct.PixelData) // 2] + bytes(len(ct.PixelData) // 2)
    sources = [dicomgen.save(dicomgen.make_sr(), folder / "src" / "sr.dcm"),
               dicomgen.save(ct, folder / "src" / "ct.dcm")]
    return [dcmconv(p, folder / "wire" / p.name, DCMCONV[syntax]) for p in sources]


def stored_row(engine, uid: str) -> dict:
    rows = engine.store.reader().rows("objects", sop_instance_uid=uid)
    assert len(rows) == 1, f"{len(rows)} objects stored for {uid}"
    return rows[0]


def assert_stored_as_sent(engine, listener: str, files: list[Path]) -> None:
    """Each file's data set stored once, byte for byte, in its syntax, from ``listener``
    (deflate: the inflated bytes, as DCMTK deflates afresh what it sends)."""
    for path in files:
        data, ts = dicomgen.dataset_bytes(path)
        row = stored_row(engine, sop_uid(path))
        assert (row["listener"], row["transfer_syntax"]) == (listener, ts), path.name
        stored = engine.store.read_object(row["id"])
        assert sha(inflated(stored, ts)) == sha(inflated(data, ts)), \
            f"{path.name} via {listener}: stored bytes differ from the wire"


def orphan_blobs(engine) -> set[str]:
    """Blob files no stored object owns (an object cut short must leave none)."""
    blobs = engine.data_dir / "blobs"
    files = {str(p.relative_to(blobs)) for p in blobs.rglob("*.blob")}
    owned = {r["blob"] for r in engine.store.reader().rows("objects") if r["blob"] != INLINE}
    return files - owned


# ==========================================================================
# Peers as SCU
# ==========================================================================

def dcmtk_send(tool: str, engine, listener: str, files: list[Path], *extra: str) -> str:
    """storescu (one run per proposal: it proposes one set of syntaxes for all its
    files) or dcmsend (proposes each file's own) -v; their output."""
    out = ""
    if tool == "dcmsend":
        groups = [("", files)]
    else:
        by_ts: dict[str, list[Path]] = {}
        for path in files:
            by_ts.setdefault(dicomgen.dataset_bytes(path)[1], []).append(path)
        groups = [(PROPOSE[ts], group) for ts, group in by_ts.items()]
    for option, group in groups:
        res = run([require_tool(tool), "-v", "-aet", tool.upper(), "-aec", SCP_AE,
                   *([option] if option else []), *DCMTK_PDU.get(listener, []), *extra,
                   "127.0.0.1", str(port(engine, listener)), *map(str, group)])
        out += res.stdout + res.stderr
        assert res.returncode == 0, out
    return out


def pynetdicom_send(engine, listener: str, files: list[Path], max_pdu: int, *,
                    ssl_context=None) -> int:
    """C-STORE every file (in its own syntax) on one association, announcing ``max_pdu``;
    the acceptor's maximum PDU it read."""
    ae = AE(ae_title="PYSCU")
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for path in files:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(str(meta.SOPClassUID), [str(meta.file_meta.TransferSyntaxUID)])
    tls_args = (ssl_context, "127.0.0.1") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port(engine, listener), ae_title=SCP_AE, tls_args=tls_args)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(p).Status) for p in files]
    finally:
        assoc.release()
    assert statuses == [0] * len(files)
    assert assoc.is_released
    return assoc.acceptor.maximum_length


def orthanc_modality(orthanc, name: str, listener_port: int) -> None:
    r = orthanc.http.put(f"/modalities/{name}",
                         json={"AET": SCP_AE, "Host": "127.0.0.1", "Port": listener_port})
    r.raise_for_status()


def orthanc_send(orthanc, engine, listener: str, files: list[Path]) -> dict:
    ids = []
    for path in files:
        r = orthanc.http.post("/instances", content=path.read_bytes())
        r.raise_for_status()
        ids.append(r.json()["ID"])
    orthanc_modality(orthanc, listener, port(engine, listener))
    r = orthanc.http.post(f"/modalities/{listener}/store", json={"Resources": ids, "Synchronous": True})
    assert r.status_code == 200, r.text
    return r.json()


# ==========================================================================
# The listener: senders x syntaxes x maximum PDU, stored byte for byte
# ==========================================================================

SENDERS = ("storescu", "dcmsend", "pynetdicom", "orthanc")
MAX_SEND_PDV = re.compile(r"Association Accepted \(Max Send PDV: (\d+)\)")


@pytest.mark.parametrize("syntax", list(SYNTAXES.values()), ids=list(SYNTAXES))
@pytest.mark.parametrize("sender", SENDERS)
def test_listener_stores_what_each_peer_sent_at_each_max_pdu(sender, syntax, listening, orthanc,
                                                           tmp_path, raw_sends):
    for listener, kb in LISTENERS.items():
        files = wire_files(tmp_path / listener, syntax)
        if sender in ("storescu", "dcmsend"):
            out = dcmtk_send(sender, listening, listener, files)
            if sender == "storescu":
                assert out.count("Received Store Response (Success)") == len(files), out
                # What DCMTK read in our A-ASSOCIATE-AC (it sends no PDU over 128 KiB;
                # --max-send-pdu lowers that further, unlogged).
                pdvs = {int(n) for n in MAX_SEND_PDV.findall(out)}
                assert pdvs == {min(kb * 1024, 131072) - 12}, pdvs
            else:
                assert re.search(rf"with status SUCCESS\s*:\s*{len(files)}\b", out), out
                if syntax in (IMPLICIT_LE, EXPLICIT_BE):
                    # dcmsend proposes explicit LE first for any uncompressed object (and
                    # we take the requestor's order): it converts, as dcmconv does.
                    files = [dcmconv(p, p.parent / "te" / p.name, "+te") for p in files]
        elif sender == "pynetdicom":
            assert pynetdicom_send(listening, listener, files, PYNETDICOM_PDU[listener]) == kb * 1024
        else:
            answer = orthanc_send(orthanc, listening, listener, files)
            assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (len(files), 0), answer
        assert_stored_as_sent(listening, listener, files)


def client_context(pki, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    if cert is not None:
        ctx.load_cert_chain(str(pki[f"{cert}.crt"]), str(pki[f"{cert}.key"]))
    return ctx


@pytest.mark.parametrize("sender", ["storescu", "pynetdicom"])
def test_tls_and_mtls_listeners_store_large_objects_byte_exact(sender, listening, pki, tmp_path,
                                                               raw_sends):
    """TLS records are 16 KiB at most: a 1 MiB P-DATA-TF (pynetdicom) or DCMTK's 128 KiB
    ones cross many of them, into an object streamed to its blob."""
    for listener, cert in (("tls4k", None), ("mtls1m", "client")):
        files = wire_files(tmp_path / listener, EXPLICIT_LE)
        if sender == "storescu":
            auth = ["+tla"] if cert is None else ["+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"])]
            out = dcmtk_send("storescu", listening, listener, files, *auth, "+cf", str(pki["ca.crt"]))
            assert out.count("Received Store Response (Success)") == len(files), out
        else:
            kb = 4 if listener == "tls4k" else 1024
            assert pynetdicom_send(listening, listener, files, 0,
                                   ssl_context=client_context(pki, cert)) == kb * 1024
        assert_stored_as_sent(listening, listener, files)
    rows = [r for r in listening.board.snapshot()["recent"] if r["listener"] in ("tls4k", "mtls1m")]
    assert rows and all(r["tls"].startswith("TLSv1.") for r in rows), rows


# ==========================================================================
# The listener and a raw-socket peer: release and abort at every phase, hostile PDUs
# ==========================================================================

class RawPeer:
    """A requestor over a raw socket, for what well-behaved toolkits never send when
    the test needs it. Bytes are built with mfconsole.ul.pdu's encoders."""

    count = 0

    def __init__(self, engine, listener: str = "pdu16k"):
        self.engine, self.listener = engine, listener
        # Each from its own loopback address: its board rows and audit rows are its own
        # (an ephemeral port of 127.0.0.1 is reused by later connections of the module).
        RawPeer.count += 1
        source = (f"127.77.{RawPeer.count // 250}.{RawPeer.count % 250 + 1}", 0)
        self.sock = socket.create_connection(("127.0.0.1", port(engine, listener)), timeout=10,
                                             source_address=source)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = "%s:%d" % self.sock.getsockname()[:2]
        self.max_send = 0

    @staticmethod
    def rq(contexts=((1, CT, [EXPLICIT_LE]),), max_pdu: int = 16384) -> bytes:
        return pdu.encode_associate_rq(SCP_AE, "RAWPEER", list(contexts), max_length=max_pdu,
                                       implementation_class_uid="1.2.3.4", implementation_version="RAW")

    def associate(self, contexts=((1, CT, [EXPLICIT_LE]),)) -> pdu.AssociateAC:
        self.sock.sendall(self.rq(contexts))
        kind, body = self.read()
        assert kind == pdu.ASSOCIATE_AC, (kind, body)
        ac = pdu.decode_associate_ac(body)
        self.max_send = ac.max_length
        return ac

    def read(self, timeout: float = 5) -> tuple[int, bytes]:
        """One whole PDU (and not a byte of the next)."""
        self.sock.settimeout(timeout)
        head = self._exact(6)
        return head[0], self._exact(int.from_bytes(head[2:], "big"))

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"closed after {data!r}"
            data += chunk
        return data

    def answer(self, timeout: float = 5) -> bytes:
        """The next whole PDU the listener sends, or b"" when it closes instead. (A
        requestor closes the transport after an A-RELEASE-RP or an A-ABORT: reading on
        would only wait out the listener's ARTIM.)"""
        self.sock.settimeout(timeout)
        try:
            head = self.sock.recv(6, socket.MSG_WAITALL)
        except ConnectionResetError:
            return b""
        if not head:
            return b""
        assert len(head) == 6, head
        return head + self._exact(int.from_bytes(head[2:], "big"))

    def command(self, uid: str, msg_id: int = 1, cx: int = 1) -> None:
        self.sock.sendall(pdu.encode_pdata([(cx, 0x03, cstore.command_set(msg_id, 0, CT, uid))]))

    def data(self, data: bytes, *, last: bool, cx: int = 1) -> None:
        """Data set fragments in P-DATA-TFs of the listener's maximum length."""
        size = self.max_send - 6
        for start in range(0, len(data), size):
            end = min(len(data), start + size)
            self.sock.sendall(pdu.encode_pdata([(cx, 0x02 if last and end == len(data) else 0x00,
                                                 data[start:end])]))

    def store(self, data: bytes, uid: str, msg_id: int = 1) -> int:
        """A whole C-STORE: the status of its response."""
        self.command(uid, msg_id)
        self.data(data, last=True)
        kind, body = self.read()
        assert kind == pdu.P_DATA_TF, (kind, body)
        [(_, control, fragment)] = pdu.decode_pdata(memoryview(body))
        rsp = dimse.decode_command(bytes(fragment))
        assert control == 0x03 and rsp.message_id == msg_id, rsp
        return rsp.status

    def close(self) -> None:
        self.sock.close()

    # -- what was recorded -------------------------------------------------------------

    def board_row(self) -> dict:
        return poll(lambda: next((r for r in self.engine.board.snapshot()["recent"]
                                  if r["peer"] == self.peer), None), message=f"the board row of {self.peer}")

    def audit_events(self) -> list[str]:
        return [r["event"] for r in self.engine.store.reader().rows("audit", peer=self.peer)]


def abort_pdu(data: bytes) -> tuple[int, int]:
    """(source, reason) of the A-ABORT that is all of ``data``."""
    assert data[:1] == b"\x07" and len(data) == 10, data
    return data[8], data[9]


def ct_object(size: int) -> tuple[bytes, str]:
    """A fresh CT's data set in explicit VR little endian, and its SOP Instance UID."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = dicomgen.make_image(pixel_bytes=size)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue(), str(ds.SOPInstanceUID)


def echo_works(engine, listener: str) -> None:
    res = run([require_tool("echoscu"), "-aet", "ECHO", "-aec", SCP_AE, "127.0.0.1",
               str(port(engine, listener))])
    assert res.returncode == 0, res.stdout + res.stderr


def assert_nothing_of(engine, uid: str) -> None:
    """Nothing half-stored: no object, no blob left behind, no in-flight bytes held."""
    assert engine.store.reader().rows("objects", sop_instance_uid=uid) == []
    poll(lambda: not orphan_blobs(engine), message="no blob without its object")
    poll(lambda: engine.inflight.used == 0, message="the in-flight budget given back")


A_RELEASE_RQ, A_ABORT = pdu.encode_release_rq(), pdu.encode_abort(pdu.ABORT_USER)
PHASES = ("before-rq", "after-rq", "associated", "mid-object", "mid-streamed-object",
          "between-objects")


# (A requestor cannot release before it has read the A-ASSOCIATE-AC: "after-rq" is an
# abort only; a release then is the "associated" case.)
@pytest.mark.parametrize("phase, action", [(p, a) for p in PHASES for a in ("abort", "release")
                                           if (p, a) != ("after-rq", "release")])
def test_listener_peer_releases_or_aborts_at_every_phase(phase, action, listening):
    engine, raw = listening, RawPeer(listening)
    end = A_ABORT if action == "abort" else A_RELEASE_RQ
    stored, in_flight = None, None
    if phase == "before-rq":
        raw.sock.sendall(end)
    elif phase == "after-rq":
        raw.sock.sendall(raw.rq() + end)         # before the A-ASSOCIATE-AC is read
        assert raw.read()[0] == pdu.ASSOCIATE_AC
    else:
        raw.associate()
        if phase in ("mid-object", "mid-streamed-object"):
            data, in_flight = ct_object(300 * 1024 if phase == "mid-object" else 3 * MiB)
            raw.command(in_flight)
            raw.data(data[:len(data) // 2], last=False)
            if phase == "mid-streamed-object":
                poll(lambda: orphan_blobs(engine), message="the object streaming into its blob")
        elif phase == "between-objects":
            data, stored = ct_object(300 * 1024)
            assert raw.store(data, stored) == 0
        raw.sock.sendall(end)
    got = raw.answer()
    raw.close()
    row = raw.board_row()
    accepted = phase != "before-rq"
    if phase == "before-rq" and action == "release":
        assert abort_pdu(got) == (2, pdu.UNEXPECTED_PDU)
        assert (row["status"], row["reason"]) == ("aborted", "A-RELEASE-RQ before an association")
    elif action == "release":
        assert got == pdu.encode_release_rp()
        assert (row["status"], row["reason"]) == ("released", "")
    else:
        assert got == b""                        # nothing answers an A-ABORT
        assert (row["status"], row["reason"]) == ("aborted", "aborted by the peer")
    assert row["objects"] == (1 if stored else 0)
    assert row["calling_ae"] == ("RAWPEER" if accepted else "")
    if in_flight:
        assert_nothing_of(engine, in_flight)
    if stored:
        assert sha(engine.store.read_object(stored_row(engine, stored)["id"])) == sha(data)
    echo_works(engine, "pdu16k")
    want = sorted((["association_accepted"] if accepted else []) + (["stored"] if stored else []))
    poll(lambda: sorted(raw.audit_events()) == want, message=f"audit {want} for {raw.peer}")


def test_listener_stopping_aborts_an_object_in_flight_and_keeps_none_of_it(tmp_path):
    """The other side of "abort mid P-DATA": the listener's own A-ABORT, when it stops
    with an association still inside an object (after shutdown_timeout)."""
    engine = start_engine(tmp_path / "engine", destinations=[], listener={"name": "pdu16k",
                                                                          "max_pdu_kb": 16})
    try:
        raw = RawPeer(engine)
        raw.associate()
        data, uid = ct_object(3 * MiB)
        raw.command(uid)
        raw.data(data[:2 * MiB], last=False)
        poll(lambda: orphan_blobs(engine), message="the object streaming into its blob")
        engine.listeners[0].stop(0.2)
        assert abort_pdu(raw.answer()) == (pdu.ABORT_USER, pdu.REASON_NOT_SPECIFIED)
        assert raw.answer() == b""
        raw.close()
        row = raw.board_row()
        assert (row["status"], row["reason"], row["objects"]) == ("aborted", "listener stopped", 0)
        assert_nothing_of(engine, uid)
    finally:
        engine.stop()


def pdv(cx: int, control: int, fragment: bytes) -> bytes:
    return pdu.encode_pdata([(cx, control, fragment)])


# Inside an association, in the middle of an object: what the peer sends instead of
# its next data fragment -> (A-ABORT reason the peer must get, board reason).
HOSTILE = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", pdu.UNRECOGNIZED_PDU, "not a DICOM PDU"),
    "unknown-pdu-type": (b"\x09\x00" + struct.pack(">I", 4) + b"\0" * 4, pdu.UNRECOGNIZED_PDU,
                         "not a DICOM PDU"),
    "malformed-pdv": (b"\x04\x00" + struct.pack(">I", 10) + struct.pack(">IBB", 900, 1, 0) + b"\0" * 4,
                      pdu.INVALID_PARAMETER, "malformed P-DATA-TF: PDV declares 900 bytes, 6 left"),
    "associate-rq-again": (None, pdu.UNEXPECTED_PDU, "A-ASSOCIATE-RQ in an association"),
    "release-rp-unasked": (pdu.encode_release_rp(), pdu.UNEXPECTED_PDU, "A-RELEASE-RP in an association"),
    "pdv-unaccepted-context": (pdv(3, 0x00, b"\0" * 64), pdu.INVALID_PARAMETER,
                               "PDV for presentation context 3, not accepted"),
    "pdv-unproposed-context": (pdv(99, 0x00, b"\0" * 64), pdu.INVALID_PARAMETER,
                               "PDV for presentation context 99, not accepted"),
    "data-on-another-context": (pdv(5, 0x00, b"\0" * 64), pdu.UNEXPECTED_PARAMETER,
                                "data set fragment without its command"),
    "truncated-pdu": (b"\x04\x00" + struct.pack(">I", 8192) + b"\0" * 100, None,
                      "connection closed in the middle of a PDU"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_listener_hostile_pdus_inside_an_object(case, listening):
    """The pre-association cases (garbage, unknown type, truncated, P-DATA before an
    association, over 1 MiB, unaccepted context first) are test_ul_acceptor.py's; here
    each comes inside an association, with half an object in flight."""
    hostile, reason, why = HOSTILE[case]
    engine, raw = listening, RawPeer(listening)
    # 1: CT (accepted); 3: a query model (refused); 5: CT in implicit VR (accepted).
    ac = raw.associate(((1, CT, [EXPLICIT_LE]), (3, "1.2.840.10008.5.1.4.1.2.2.1", [EXPLICIT_LE]),
                        (5, CT, [IMPLICIT_LE])))
    assert {cx: r for cx, (r, _) in ac.results.items()} == {1: 0, 3: 3, 5: 0}
    data, uid = ct_object(300 * 1024)
    raw.command(uid)
    raw.data(data[:100 * 1024], last=False)
    raw.sock.sendall(hostile if hostile is not None else raw.rq())
    if reason is None:    # the peer goes away with the PDU half sent
        raw.close()
    else:
        assert abort_pdu(raw.answer()) == (pdu.ABORT_PROVIDER, reason)
        raw.close()
    row = raw.board_row()
    assert (row["status"], row["reason"], row["objects"]) == ("aborted", why, 0)
    assert_nothing_of(engine, uid)
    echo_works(engine, "pdu16k")
    poll(lambda: raw.audit_events() == ["association_accepted"], message="the audit of the association")


def associate_rq_of(length: int) -> bytes:
    """A well-formed A-ASSOCIATE-RQ whose body is ``length`` bytes: CT in explicit LE
    (context 1), then contexts proposing made-up transfer syntaxes to fill it."""
    filler = []
    body = lambda: len(RawPeer.rq([(1, CT, [EXPLICIT_LE])] + filler)) - 6
    cx = 3
    while body() < length:
        left = length - body()
        n = min(60000, max(1, left - 8 - 4 - len(CT) - 4))   # one item, its sub-items
        filler.append((cx, CT, ["9" * n]))
        cx += 2
        if body() > length:   # the last one overshot by its headers: shrink it
            filler[-1] = (filler[-1][0], CT, ["9" * (n - (body() - length))])
    rq = RawPeer.rq([(1, CT, [EXPLICIT_LE])] + filler)
    assert len(rq) - 6 == length
    return rq


def test_associate_rq_of_1_mib_accepted_and_one_byte_more_refused(listening):
    engine = listening
    listener = [lst for lst in engine.listeners if lst.cfg.name == "pdu16k"][0]
    # Exactly the limit: read whole (within the budget of large requests), answered.
    raw = RawPeer(engine)
    raw.sock.sendall(associate_rq_of(MiB))
    kind, body = raw.read()
    assert kind == pdu.ASSOCIATE_AC
    results = pdu.decode_associate_ac(body).results
    assert results[1] == (pdu.ACCEPTANCE, EXPLICIT_LE) and len(results) > 16
    assert {r for cx, (r, _) in results.items() if cx != 1} == {pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED}
    raw.max_send = pdu.decode_associate_ac(body).max_length
    data, uid = ct_object(64 * 1024)
    assert raw.store(data, uid) == 0
    raw.sock.sendall(A_RELEASE_RQ)
    assert raw.answer() == pdu.encode_release_rp()
    raw.close()
    assert raw.board_row()["status"] == "released"
    assert listener.large_rq_bytes == 0
    # One byte over: refused from its header, before any of its body is read.
    over = RawPeer(engine)
    over.sock.sendall(associate_rq_of(MiB + 1)[:4096])   # (the rest would not be read)
    assert abort_pdu(over.answer()) == (pdu.ABORT_PROVIDER, pdu.INVALID_PARAMETER)
    over.close()
    row = over.board_row()
    assert (row["status"], row["calling_ae"]) == ("aborted", "")
    assert row["reason"] == f"PDU type 0x01 length {MiB + 1} exceeds {MiB}"
    refusals = poll(lambda: engine.store.reader().rows("audit", peer=over.peer), message="the refusal")
    assert [(r["event"], r["status"], r["detail"]) for r in refusals] == [
        ("refused", "abort", f"PDU type 0x01 length {MiB + 1} exceeds {MiB}")]
    echo_works(engine, "pdu16k")


# ==========================================================================
# The sender: every syntax to DCMTK, pynetdicom and Orthanc at their maximum PDU
# ==========================================================================

ENCAPSULATED_TS = ("1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.51",
                   "1.2.840.10008.1.2.4.80")


class PynetdicomSCP:
    """pynetdicom as storage SCP, in this process: every storage SOP class in every
    syntax we forward, ``max_pdu`` announced (0: unlimited). Records what each
    C-STORE carried (syntax, data set bytes as received) and the longest P-DATA-TF."""

    def __init__(self, max_pdu: int, ae_title: str = "PACS"):
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [*UNCOMPRESSED, *ENCAPSULATED_TS])
        ae.add_supported_context(Verification)
        self.max_pdu = max_pdu
        self.received: dict[str, list[tuple[str, str]]] = {}
        self.longest_pdata = 0
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_DATA_RECV, self._pdu)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        data = event.request.DataSet.getvalue()
        self.received.setdefault(str(event.request.AffectedSOPInstanceUID), []).append(
            (str(event.context.transfer_syntax), sha(data)))
        return 0

    def _pdu(self, event) -> None:
        if event.data[:1] == b"\x04":
            self.longest_pdata = max(self.longest_pdata, len(event.data) - 6)

    def stop(self) -> None:
        self.server.shutdown()


def dimse_destination(name: str, peer_port: int, **extra) -> dict:
    return {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": peer_port, "ae_title": "PACS",
            "retry_initial_s": 0.1, "retry_max_s": 0.5, "connect_timeout_s": 2, "acse_timeout_s": 5,
            "dimse_timeout_s": 10, **extra}


def delivered(engine, destination: str) -> int:
    return len(engine.store.reader().rows("deliveries", destination=destination, state="delivered"))


def same_elements(a: bytes, b: bytes, transfer_syntax: str) -> bool:
    """The same elements and values (Orthanc re-serialises what it stores)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    a, b = inflated(a, ts), inflated(b, ts)
    x, y = (read_dataset(DicomBytesIO(v), ts.is_implicit_VR, ts.is_little_endian) for v in (a, b))
    tags = lambda ds: {t for t in ds.keys() if t.element != 0 and t != 0xFFFCFFFC}
    return tags(x) == tags(y) and all(x[t].value == y[t].value for t in tags(x))


PEERS = ("storescp-128k", "storescp-mtls-4k", "pynetdicom-4k", "pynetdicom-1m",
         "pynetdicom-unlimited", "orthanc-4k")


@pytest.fixture(scope="module")
def forwarded(tmp_path_factory, pki, orthanc):
    """One engine forwarding one object of each syntax (an SR and a CT over 1 MiB per
    uncompressed syntax, four encapsulated ones) to each peer of PEERS; once all are
    delivered: (engine, {peer: the peer object}, {SOP Instance UID: stored syntax})."""
    root = tmp_path_factory.mktemp("forwarded")
    scps = [StoreSCP(root / "storescp-128k" / "received", extra_args=("-B", "-pdu", "131072")),
            StoreSCP(root / "storescp-mtls-4k" / "received", extra_args=(
                "-B", "-pdu", "4096", "+tls", str(pki["server.key"]), str(pki["server.crt"]),
                "+cf", str(pki["ca.crt"]), "-rc"))]
    peers: dict[str, object] = dict(zip(PEERS[:2], (scp.start() for scp in scps)))
    peers.update({f"pynetdicom-{n}": PynetdicomSCP(size) for n, size in (("4k", 4096), ("1m", MiB),
                                                                        ("unlimited", 0))})
    peers["orthanc-4k"] = orthanc
    mtls = {"ca_file": str(pki["ca.crt"]), "cert_file": str(pki["client.crt"]),
            "key_file": str(pki["client.key"])}
    ports = {name: getattr(p, "dicom_port", None) or p.port for name, p in peers.items()}
    engine = None
    try:
        engine = start_engine(root / "engine", listener={"accept_deflate": True, **TIMEOUTS},
                              destinations=[dimse_destination(name, ports[name], max_associations=1, **(
                                  {"tls": mtls} if "mtls" in name else
                                  {"ae_title": orthanc.ae_title} if name.startswith("orthanc") else {}))
                                  for name in PEERS])
        files = [f for name, syntax in SYNTAXES.items() for f in wire_files(root / "objects" / name, syntax)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
            pynetdicom_send(engine, "modalities", files, 0)
        syntaxes = {sop_uid(p): dicomgen.dataset_bytes(p)[1] for p in files}
        try:
            poll(lambda: all(delivered(engine, name) == len(files) for name in PEERS), timeout=30,
                 message=f"{len(files)} objects delivered to each peer")
        except AssertionError:
            raise AssertionError({name: [(r["state"], r["attempts"], r["last_reason"]) for r in
                                         engine.store.reader().rows("deliveries", destination=name)
                                         if r["state"] != "delivered"] for name in PEERS}) from None
        yield engine, peers, syntaxes
    finally:
        if engine is not None:
            engine.stop()
        for name, peer in peers.items():
            if not name.startswith("orthanc"):
                peer.stop()


@pytest.mark.parametrize("peer", PEERS)
def test_sender_delivers_every_syntax_byte_exact_within_the_peer_max_pdu(peer, forwarded, tmp_path):
    engine, peers, syntaxes = forwarded
    scp = peers[peer]
    reads = engine.store.reader()
    stored = {r["sop_instance_uid"]: r for r in reads.rows("objects")}
    assert set(stored) == set(syntaxes) and {r["transfer_syntax"] for r in stored.values()} == {
        *UNCOMPRESSED, *ENCAPSULATED_TS}
    # What must be on the wire: the stored bytes; a deflated stream of odd length with
    # the trailing NUL of PS3.5 A.5 (mfconsole/dimse/odd_length.py).
    sent = {uid: sha(even_length(engine.store.read_object(r["id"]), r["transfer_syntax"])[0])
            for uid, r in stored.items()}
    rows = reads.rows("deliveries", destination=peer)
    assert {(r["state"], r["attempts"]) for r in rows} == {("delivered", 1)}
    if peer.startswith("storescp"):
        poll(lambda: len(scp.received_files()) == len(stored), message="every file written")
        # -B: the data set bytes as received (deflate: as inflated, DCMTK does not keep
        # the NUL that pads an odd stream).
        got = {}
        for path in scp.received_files():
            data, ts = dicomgen.dataset_bytes(path)
            got[sop_uid(path)] = (ts, sha(inflated(data, ts)))
        assert got == {uid: (r["transfer_syntax"], sha(inflated(engine.store.read_object(r["id"]),
                                                                 r["transfer_syntax"])))
                       for uid, r in stored.items()}
    elif peer.startswith("pynetdicom"):
        assert scp.received == {uid: [(syntaxes[uid], digest)] for uid, digest in sent.items()}
        if scp.max_pdu:    # fragments fill, and keep to, the peer's maximum
            assert scp.longest_pdata == scp.max_pdu
        else:              # unlimited: large PDUs, bounded by the sender (requestor.UNLIMITED_FRAGMENT)
            assert MiB <= scp.longest_pdata <= MiB + 6
    else:
        for uid, row in stored.items():
            [found] = scp.http.post("/tools/lookup", content=uid).json()
            held = tmp_path / f"{uid}.dcm"
            held.write_bytes(scp.instance_file(found["ID"]))
            data, ts = dicomgen.dataset_bytes(held)
            assert ts == syntaxes[uid]
            assert same_elements(engine.store.read_object(row["id"]), data, ts), uid


# ==========================================================================
# The sender and a scripted acceptor: release and abort at every phase, hostile answers
# ==========================================================================

class ScriptedPeer:
    """A storage SCP over raw sockets (4 KiB maximum PDU, one association at a time)
    that does ``fault`` on its first association and serves well after that. Records,
    per connection, the PDU types it received from us (closing 0 = end of stream), and
    each data set it received whole and answered Success."""

    def __init__(self, fault: str, max_pdu: int = 4096):
        self.fault, self.max_pdu = fault, max_pdu
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received: list[list[int]] = []      # per connection: PDU types from us
        self.answered: dict[str, list[str]] = {}  # SOP Instance UID -> sha256 of each answered
        self.collided = False                     # our A-RELEASE-RP came after its own RQ
        self.done = 0                             # connections over
        self._conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        for sock in (self.server, self._conn):
            try:   # (shutdown, not close, wakes a thread blocked on the socket)
                sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass
        self.thread.join(10)
        self.server.close()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.settimeout(10)
            self._conn = conn
            self.received.append([])
            try:
                self._serve(conn, self.fault if len(self.received) == 1 else "")
            except (OSError, pdu.PDUError):
                pass
            finally:
                conn.close()
                self.done += 1

    def _read(self, conn) -> tuple[int, bytes] | None:
        head = conn.recv(6, socket.MSG_WAITALL)
        if len(head) < 6:
            self.received[-1].append(0)
            return None
        body = conn.recv(int.from_bytes(head[2:], "big"), socket.MSG_WAITALL)
        self.received[-1].append(head[0])
        return head[0], body

    def _drain(self, conn) -> None:
        """What we send until we close: a requestor must close after an A-ABORT (or after
        answering an A-RELEASE-RQ with its RP)."""
        while self._read(conn) is not None:
            pass

    def _serve(self, conn, fault: str) -> None:
        _, body = self._read(conn)
        rq = pdu.decode_associate_rq(body)
        instead = {"abort-before-ac": pdu.encode_abort(pdu.ABORT_USER),
                   "release-rq-before-ac": A_RELEASE_RQ,
                   "garbage-for-ac": b"HTTP/1.1 400 Bad Request\r\n\r\n",
                   "unknown-pdu-for-ac": b"\x09\x00" + struct.pack(">I", 4) + b"\0" * 4,
                   "pdata-for-ac": pdv(1, 0x03, b"\0" * 8),
                   "huge-ac": b"\x02\x00" + struct.pack(">I", 0x7FFFFFF0) + b"\0" * 64}.get(fault)
        if instead is not None:
            conn.sendall(instead)
            return self._drain(conn)
        accepted = {cx.id: cx.transfer_syntaxes[0] for cx in rq.contexts}
        ac = pdu.encode_associate_ac(rq, [(cx, 0, ts) for cx, ts in accepted.items()],
                                     max_length=self.max_pdu, implementation_class_uid="1.2.3.4",
                                     implementation_version="SCRIPTED")
        if fault == "truncated-ac":
            conn.sendall(ac[:len(ac) // 2])
            return
        if fault in ("abort-after-ac", "release-after-ac"):   # in the same write as the AC
            conn.sendall(ac + (A_ABORT if fault == "abort-after-ac" else A_RELEASE_RQ))
            return self._drain(conn)
        conn.sendall(ac)
        command, data, fragments, answered = bytearray(), bytearray(), 0, 0
        while (got := self._read(conn)) is not None:
            kind, body = got
            if kind == pdu.RELEASE_RQ:
                if fault == "release-collision":     # both sides release (PS3.8 7.2)
                    conn.sendall(A_RELEASE_RQ)
                    while (got := self._read(conn)) is not None and got[0] != pdu.RELEASE_RP:
                        pass
                    self.collided = got is not None
                conn.sendall(pdu.encode_release_rp())
                return self._drain(conn)
            if kind != pdu.P_DATA_TF:
                return self._drain(conn)
            for cx, control, fragment in pdu.decode_pdata(memoryview(body)):
                if control & 0x01:
                    command += fragment
                    continue
                data += fragment
                fragments += 1
                if fragments == 2 and fault in ("abort-mid-object", "release-mid-object"):
                    conn.sendall(A_ABORT if fault == "abort-mid-object" else A_RELEASE_RQ)
                    return self._drain(conn)
                if not control & 0x02:
                    continue
                rq_ = dimse.decode_command(bytes(command))
                rsp = cstore.response_set(cstore.C_STORE_RSP, rq_.message_id, rq_.sop_class_uid, 0,
                                          rq_.sop_instance_uid)
                if fault == "response-on-unaccepted-context":
                    conn.sendall(pdv(99, 0x03, rsp))
                    return self._drain(conn)
                conn.sendall(pdv(cx, 0x03, rsp))
                self.answered.setdefault(rq_.sop_instance_uid, []).append(sha(data))
                command, data, fragments = bytearray(), bytearray(), 0
                answered += 1
                if answered == 1 and fault in ("abort-between-objects", "release-between-objects"):
                    conn.sendall(A_ABORT if fault == "abort-between-objects" else A_RELEASE_RQ)
                    return self._drain(conn)


# What the first failed attempt recorded: the peer refused or broke the association
# itself (destination), or broke it with an object in flight after the SR went through
# (that object's own: message).
REFUSED_RQ = "transient/destination: 127.0.0.1:{port} aborted the association request"
GONE = "transient/{scope}: peer aborted the association during the C-STORE"
CLOSED = "transient/{scope}: connection to 127.0.0.1:{port} closed during the C-STORE"
# fault -> (what the first failed attempt recorded, None: no attempt failed; what we
#           sent the peer on that association after the A-ASSOCIATE-RQ, in order: 0 is
#           our closing the connection, "..." any number of P-DATA-TF)
SENDER_FAULTS = {
    "abort-before-ac": (REFUSED_RQ, [0]),
    "release-rq-before-ac": (REFUSED_RQ, [pdu.ABORT, 0]),
    "garbage-for-ac": (REFUSED_RQ, [pdu.ABORT, 0]),
    "unknown-pdu-for-ac": (REFUSED_RQ, [pdu.ABORT, 0]),
    "pdata-for-ac": (REFUSED_RQ, [pdu.ABORT, 0]),
    "huge-ac": (REFUSED_RQ, [pdu.ABORT, 0]),
    "truncated-ac": ("transient/destination: 127.0.0.1:{port} closed the connection without "
                     "answering the association request", []),   # (the peer closed first)
    # (seen before a C-STORE is written: the objects go on a new association, no attempt lost)
    "abort-after-ac": (None, [0]),
    "release-after-ac": (None, [pdu.RELEASE_RP, 0]),
    "abort-mid-object": (GONE.format(scope="message"), ["...", 0]),
    "release-mid-object": (CLOSED.format(scope="message", port="{port}"), ["...", pdu.RELEASE_RP, 0]),
    "abort-between-objects": (GONE.format(scope="message"), ["...", 0]),
    "release-between-objects": (CLOSED.format(scope="message", port="{port}"),
                                ["...", pdu.RELEASE_RP, 0]),
    "release-collision": (None, ["...", pdu.RELEASE_RQ, pdu.RELEASE_RP, 0]),
    "response-on-unaccepted-context": ("transient/destination: unreadable answer from 127.0.0.1:{port} "
                                       "during the C-STORE (PDUError)", ["...", pdu.ABORT, 0]),
}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """One engine, a destination per SENDER_FAULTS entry (each its own ScriptedPeer),
    and two objects of one study (an SR, then a CT of many fragments at 4 KiB) routed
    to all: sent together, in one batch, once every destination has both queued."""
    from mfconsole.engine import outbox

    root = tmp_path_factory.mktemp("scripted")
    peers = {fault: ScriptedPeer(fault) for fault in SENDER_FAULTS}
    engine = None
    try:
        engine = start_engine(root / "engine", listener=TIMEOUTS, destinations=[
            dimse_destination(fault, peer.port, max_associations=1, idle_timeout_s=0.3)
            for fault, peer in peers.items()])
        for fault in peers:
            engine.store.call(outbox.pause, fault, "test: queue both objects first")
        study = generate_uid()
        files = [dicomgen.save(dicomgen.make_sr(study), root / "sr.dcm"),
                 dicomgen.save(dicomgen.make_image(study, pixel_bytes=64 * 1024), root / "ct.dcm")]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
            pynetdicom_send(engine, "modalities", files, 0)
        for fault in peers:
            engine.store.call(outbox.resume, fault)
        try:
            poll(lambda: all(delivered(engine, f) == 2 for f in peers), timeout=30,
                 message="both objects delivered to each peer")
        except AssertionError:
            raise AssertionError({f: [(r["state"], r["attempts"], r["last_reason"]) for r in
                                      engine.store.reader().rows("deliveries", destination=f)]
                                  for f in peers}) from None
        yield engine, peers, {sop_uid(p): p for p in files}
    finally:
        if engine is not None:
            engine.stop()
        for peer in peers.values():
            peer.stop()


def shape(kinds: list[int]) -> list:
    """PDU types with each run of P-DATA-TF as one "..."."""
    out: list = []
    for kind in kinds:
        item = "..." if kind == pdu.P_DATA_TF else kind
        if not (item == "..." and out and out[-1] == "..."):
            out.append(item)
    return out


@pytest.mark.parametrize("fault", list(SENDER_FAULTS))
def test_sender_peer_releases_aborts_or_misbehaves_at_every_phase(fault, scripted):
    engine, peers, files = scripted
    peer = peers[fault]
    recorded, ours = SENDER_FAULTS[fault]
    # The faulty association: the A-ASSOCIATE-RQ, then what we did.
    poll(lambda: peer.done, message="the first association over")
    first = peer.received[0]
    assert first[0] == pdu.ASSOCIATE_RQ and shape(first[1:]) == ours, shape(first)
    # Each object reached the peer whole and was answered Success once: nothing resent
    # that the peer had taken, nothing taken half.
    stored = {uid: sha(engine.store.read_object(stored_row(engine, uid)["id"])) for uid in files}
    assert peer.answered == {uid: [digest] for uid, digest in stored.items()}
    retries = [r["detail"] for r in engine.store.reader().rows("audit", destination=fault,
                                                                  event="retry_scheduled")]
    if recorded is None:
        assert retries == []
        assert (peer.collided, len(peer.received)) == ((True, 1) if fault == "release-collision" else
                                                       (False, 2))
    else:
        assert retries and retries[0].startswith("attempt 1: " + recorded.format(port=peer.port)), retries
        assert len(peer.received) >= 2

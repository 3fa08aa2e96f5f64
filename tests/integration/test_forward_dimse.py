"""Forwarding to DIMSE destinations against real peers: DCMTK storescp (bit-preserving,
so what it wrote is what it received) and Orthanc. Asserts on what the peer holds and
on the delivery rows, never on log lines alone."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time
from pathlib import Path

import httpx
from pydicom import dcmread

import dicomgen
from harness import delivery_states, mfconsole, poll, stored_sha256, write_config
from peers import require_tool

FAST_RETRY = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "down_after": 3,
              "connect_timeout_s": 2, "acse_timeout_s": 5, "dimse_timeout_s": 5}


def dimse_dest(port: int, **extra) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": port,
            "ae_title": "PACS", **FAST_RETRY, **extra}


def storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-aet", "MODALITY", "-aec", "MF_SCP", *extra,
                           "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300)


def deliveries(engine) -> dict[str, int]:
    return delivery_states(engine.store.reader())


def stored_digests(engine) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the stored object (the database's digest is keyed)."""
    return stored_sha256(engine.data_dir, engine.config.store.key_file)


def received_by_storescp(scp) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the data set bytes storescp wrote (-B keeps them
    exactly as received)."""
    out = {}
    for path in scp.received_files():
        data, _ = dicomgen.dataset_bytes(path)
        out[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = hashlib.sha256(data).hexdigest()
    return out


def same_elements(a: bytes, b: bytes, transfer_syntax: str) -> bool:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    x, y = (read_dataset(DicomBytesIO(v), ts.is_implicit_VR, ts.is_little_endian) for v in (a, b))
    tags = lambda ds: {t for t in ds.keys() if t.element != 0 and t != 0xFFFCFFFC}
    return tags(x) == tags(y) and all(x[t].value == y[t].value for t in tags(x))


def test_forward_to_storescp_is_byte_identical(engine_factory, storescp_factory, tmp_path):
    scp = storescp_factory("-B")
    engine = engine_factory(destinations=[dimse_dest(scp.port)])
    port = engine.listeners[0].address[1]
    files = dicomgen.write_corpus(tmp_path / "sr", 40)
    files += dicomgen.write_corpus(tmp_path / "ct", 5, kind="ct", pixel_bytes=300 * 1024)
    implicit = dicomgen.save(dicomgen.make_sr(), tmp_path / "implicit.dcm", implicit=True)
    assert storescu(port, files).returncode == 0
    assert storescu(port, [implicit], "-xi").returncode == 0
    expected = stored_digests(engine)
    assert len(expected) == 46
    poll(lambda: len(scp.received_files()) >= 46, timeout=60)
    poll(lambda: deliveries(engine).get("delivered") == 46, timeout=10)
    assert received_by_storescp(scp) == expected


def test_forward_compressed_to_orthanc_is_byte_identical(engine_factory, orthanc, tmp_path):
    from pydicom.data import get_testdata_file

    engine = engine_factory(destinations=[{**dimse_dest(orthanc.dicom_port), "ae_title": orthanc.ae_title}])
    # Compressed objects go in as they are; Orthanc accepts them (no transcoding anywhere).
    from pynetdicom import AE
    ae = AE(ae_title="MODALITY")
    names = ["JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "CT_small.dcm", "test-SR.dcm"]
    paths = [Path(get_testdata_file(n)) for n in names]
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", engine.listeners[0].address[1], ae_title="MF_SCP")
    assert assoc.is_established
    statuses = [assoc.send_c_store(p).Status for p in paths]
    assoc.release()
    assert statuses == [0] * len(paths)
    poll(lambda: deliveries(engine).get("delivered") == len(paths), timeout=60)
    digests = stored_digests(engine)
    with httpx.Client(base_url=orthanc.base_url, trust_env=False, timeout=30) as web:
        for path in paths:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            found = web.post("/tools/lookup", content=uid).json()
            assert found, f"{path.name} not in Orthanc"
            held = tmp_path / f"orthanc-{path.name}"
            held.write_bytes(web.get(f"/instances/{found[0]['ID']}/file").content)
            ds = dcmread(held, stop_before_pixels=True)
            # Orthanc adds/rewrites file meta only; the data set bytes must be ours.
            data, _ = dicomgen.dataset_bytes(held)
            # Orthanc re-serialises what it stores (DCMTK writes the data set afresh:
            # sequence and item lengths may change), so its copy is compared element by
            # element, pixel data fragments included; the byte-exact check is the
            # storescp -B test above. What we sent is what we stored (digest).
            oid = engine.store.reader().rows("objects", sop_instance_uid=uid)[0]["id"]
            sent = engine.store.read_object(oid)
            assert hashlib.sha256(sent).hexdigest() == digests[uid]
            assert same_elements(sent, data, str(ds.file_meta.TransferSyntaxUID)), path.name
            assert ds.file_meta.TransferSyntaxUID == dcmread(path).file_meta.TransferSyntaxUID


def test_peer_down_then_back_delivers_everything_without_dead_letters(engine_factory, storescp_factory,
                                                                      tmp_path):
    scp = storescp_factory("-B")
    port_ = scp.port
    scp.stop()
    engine = engine_factory(destinations=[dimse_dest(port_)])
    files = dicomgen.write_corpus(tmp_path / "sr", 30)
    assert storescu(engine.listeners[0].address[1], files).returncode == 0
    reads = engine.store.reader()
    # Retries back off and the destination is marked down while the peer is away.
    poll(lambda: len(reads.rows("destination_state", name="pacs", down=1)) == 1, timeout=30)
    attempts_while_down = sum(r["attempts"] for r in reads.rows("deliveries"))
    assert attempts_while_down < 30, "an outage must cost one attempt per round, not one per object"
    scp.start()
    poll(lambda: deliveries(engine).get("delivered") == 30, timeout=60)
    assert deliveries(engine).get("dead", 0) == 0
    assert len(received_by_storescp(scp)) == 30
    events = [r["event"] for r in reads.rows("audit", destination="pacs")]
    assert "destination_down" in events and "destination_up" in events


def test_destination_outside_egress_never_receives_a_byte(tmp_path):
    """A listener that is not in [egress].allowed_tcp: echo is refused before any
    connection, and a destination pointing at it does not load."""
    config = write_config(tmp_path / "e", destinations=[dimse_dest(1)])
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen(8)
        trap.settimeout(0.5)
        port = trap.getsockname()[1]
        res = mfconsole("--config", str(config), "echo", f"PACS@127.0.0.1:{port}")
        assert res.returncode == 1 and "not in [egress].allowed_tcp" in res.stderr
        try:
            trap.accept()
            raise AssertionError("something connected to the trap")
        except socket.timeout:
            pass
    bad = write_config(tmp_path / "b", destinations=[dimse_dest(port)],
                       egress={"allowed_tcp": ["127.0.0.1:1"], "allowed_http": []})
    res = mfconsole("--config", str(bad), "check")
    assert res.returncode == 2 and "destinations[0].host" in res.stderr


def test_echo_and_test_commands(storescp_factory, tmp_path):
    scp = storescp_factory()
    config = write_config(tmp_path / "e", destinations=[dimse_dest(scp.port)])
    res = mfconsole("--config", str(config), "echo", "pacs")
    assert res.returncode == 0 and "C-ECHO OK" in res.stdout
    res = mfconsole("--config", str(config), "echo", f"WRONG@127.0.0.1:{scp.port}")
    assert res.returncode == 0   # storescp accepts any called AE (see tests/peers.py)
    scp.stop()
    res = mfconsole("--config", str(config), "echo", "pacs")
    assert res.returncode == 1 and "cannot connect" in res.stderr and "connection refused" in res.stderr
    scp.start()
    res = mfconsole("--config", str(config), "test", "pacs")
    assert res.returncode == 0 and "accepted" in res.stdout


def test_single_association_peer_is_not_slowed_by_extra_workers(engine_factory, storescp_factory,
                                                                   tmp_path):
    """storescp without --fork takes one association at a time and leaves a second
    request unanswered. The extra worker must not sit on a batch of claimed objects
    while it waits (they would be late by acse_timeout_s)."""
    from mfconsole.engine import outbox

    scp = storescp_factory("-B")
    engine = engine_factory(destinations=[dimse_dest(scp.port, acse_timeout_s=20, max_associations=2)])
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    files = dicomgen.write_corpus(tmp_path / "sr", 120)
    assert storescu(engine.listeners[0].address[1], files).returncode == 0
    t0 = time.monotonic()
    engine.store.call(outbox.resume, "pacs")
    poll(lambda: deliveries(engine).get("delivered") == 120, timeout=60)
    assert time.monotonic() - t0 < 10
    assert len(received_by_storescp(scp)) == 120

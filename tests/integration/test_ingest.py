"""Ingest through real DCMTK senders into `mfconsole serve` / an in-process engine.

Assertions are on stored state: object rows, delivery rows, and the decrypted blob
compared byte for byte with what the sender put on the wire.
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

import dicomgen
from harness import CANARY_ID, CANARY_NAME, mfconsole, poll, run, write_config
from peers import require_tool

from mfconsole.repository import db_path

# pydicom's bundled files that are valid Storage objects with distinct SOP Instance
# UIDs, across transfer syntaxes (implicit, explicit, big endian, deflate, JPEG,
# JPEG-LS, JPEG 2000, RLE), SRs, RT and waveforms.
BUNDLED = [
    "CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "test-SR.dcm", "reportsi.dcm",
    "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm",
    "waveform_ecg.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm",
    "GDCMJ2K_TextGBR.dcm",
]
SENT = re.compile(r"Sending file: (?P<path>\S+)")
CONVERT = re.compile(r"Converting transfer syntax: (?P<src>.+?) -> (?P<dst>.+)$")
RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


# storescu proposes a compressed syntax only when told to; each maps to its option.
PROPOSE = {"1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
           "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.80": "-xt",
           "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.50": "-xy",
           "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs"}


def bundled_files() -> list[Path]:
    out = []
    for name in BUNDLED:
        path = get_testdata_file(name, download=False)
        if path:
            out.append(Path(path))
    return out


def storescu(port: int, files: list[Path], *, aet: str = "MODALITY", aec: str = "MF_SCP",
             extra: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    exe = require_tool("storescu")
    return run([exe, "-v", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
                *map(str, files)], timeout=timeout)


def successes(output: str) -> list[Path]:
    """Files storescu reported Success for, from its -v log."""
    done, current = [], None
    for line in output.splitlines():
        if m := SENT.search(line):
            current = Path(m["path"])
        elif (m := RESPONSE.search(line)) and current is not None:
            if m["status"].startswith("Success") or m["status"].startswith("Warning"):
                done.append(current)
            current = None
    return done


def assert_same_content(plain: bytes, transfer_syntax: str, original: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    tsu = UID(transfer_syntax)
    stream = DicomBytesIO(plain)
    if tsu == "1.2.840.10008.1.2.1.99":
        import zlib
        stream = DicomBytesIO(zlib.decompress(plain, -15))
    got = Dataset(read_dataset(stream, tsu.is_implicit_VR, tsu.is_little_endian))
    want = dcmread(original)
    want_plain = Dataset({e.tag: e for e in want})
    # Group lengths are optional and senders drop or add them.
    for ds in (got, want_plain):
        for elem in list(ds):
            if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC:
                del ds[elem.tag]
    # Compare values, not VRs: a sender may re-encode an OB/OW ambiguity (pixel data of
    # an encapsulated syntax declared OW) without changing a byte of the value.
    differs = sorted(
        {str(t) for t in set(got.keys()) ^ set(want_plain.keys())}
        | {str(t) for t in set(got.keys()) & set(want_plain.keys())
           if got[t].value != want_plain[t].value})
    assert not differs, f"{original.name}: stored content differs in {differs}"


def meta_uid_differs(path: Path) -> bool:
    ds = dcmread(path, stop_before_pixels=True)
    return ds.file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID


def stored_rows(reads) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in reads.rows("objects"):
        rows.setdefault(r["sop_instance_uid"], []).append(r)
    return rows


def decrypt(engine_store, row) -> bytes:
    return engine_store.read_object(row["id"])


def assert_blobs_match_rows(store) -> None:
    """No blob without a row, no row without its blob: files for large objects,
    blob_data rows for small ones."""
    from mfconsole.repository.states import INLINE

    reads = store.reader()
    rows = reads.rows("objects", purged_at=None)
    files = {p.relative_to(store.blob_root).as_posix() for p in store.blob_root.rglob("*")
             if p.is_file()}
    assert files == {r["blob"] for r in rows if r["blob"] != INLINE}
    inline = {r["object_id"] for r in reads.rows("blob_data")}
    assert inline == {r["id"] for r in rows if r["blob"] == INLINE}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("corpus")
    files = dicomgen.write_corpus(folder / "sr", 400)
    files += dicomgen.write_corpus(folder / "ct", 100, kind="ct", pixel_bytes=64 * 1024)
    implicit = [dicomgen.save(dicomgen.make_sr(), folder / "impl" / f"i{i}.dcm", implicit=True)
                for i in range(20)]
    return files + implicit


def test_concurrent_ingest_stores_each_object_once_and_byte_exact(engine, corpus):
    port = engine.listeners[0].address[1]
    bundled = bundled_files()
    compressed = {p: PROPOSE[dicomgen.dataset_bytes(p)[1]] for p in bundled
                  if dicomgen.dataset_bytes(p)[1] in PROPOSE}
    plain = [p for p in bundled if p not in compressed] + corpus
    files = plain + list(compressed)
    assert len(files) >= 520 and len(compressed) >= 5
    chunks = [plain[i::4] for i in range(4)]
    results: list[subprocess.CompletedProcess] = [None] * 4  # type: ignore[list-item]

    def send(i: int) -> None:
        results[i] = storescu(port, chunks[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Compressed files go as they are (never transcoded), each with its proposal.
    results += [storescu(port, [p], extra=(option,)) for p, option in compressed.items()]
    for t in threads:
        t.join()
    for res in results:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sent = [p for res in results for p in successes(res.stdout + res.stderr)]
    assert sorted(sent) == sorted(files)

    rows = stored_rows(engine.store.reader())
    expected = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        expected[str(ds.SOPInstanceUID)] = path
    assert set(rows) == set(expected)
    for uid, versions in rows.items():
        assert len(versions) == 1, f"{uid} stored {len(versions)} times"
        row = versions[0]
        plain = decrypt(engine.store, row)
        assert engine.store.vault.digest(plain, row["key_id"]) == row["digest"]   # keyed
        assert hashlib.sha256(plain).hexdigest() != row["digest"]
        assert len(plain) == row["size"]
        # storescu re-encodes what it sends (DCMTK writes the data set afresh), so the
        # content must match element for element, pixel data included; the byte-exact
        # check is test_raw_bytes_are_stored_exactly.
        assert_same_content(plain, row["transfer_syntax"], expected[uid])
    # Every object is queued for the configured destination, once.
    queued = engine.store.reader().rows("deliveries")
    counts = {"n": len(queued), "d": len({r["object_id"] for r in queued})}
    assert counts["n"] == counts["d"] == len(rows)
    # Group commit: concurrent associations shared commits.
    assert engine.store.commits < engine.store.committed_jobs


def test_raw_bytes_are_stored_exactly(engine_factory, corpus):
    """A sender that streams files as they are (pynetdicom, chunked): what we store is
    byte for byte what was on the wire, in every transfer syntax (deflate included, as
    this listener is configured to accept it)."""
    from pynetdicom import AE, _config
    from pydicom.uid import UID

    engine = engine_factory(listener={"accept_deflate": True})
    port = engine.listeners[0].address[1]
    files = bundled_files() + corpus[:20] + corpus[-5:]
    ae = AE(ae_title="RAWSENDER")
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, [dicomgen.dataset_bytes(path)[1]])
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MF_SCP")
        assert assoc.is_established
        statuses = [assoc.send_c_store(path).Status for path in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    # Chunked sending takes the command's UIDs from the file meta; rtplan.dcm and
    # rtdose.dcm carry a meta SOP Instance UID that differs from the data set's, which
    # is exactly the mismatch the SCP must refuse with 0xA900.
    mismatched = {p for p in files if meta_uid_differs(p)}
    assert {p.name for p in mismatched} >= {"rtplan.dcm", "rtdose.dcm"}
    assert [(p.name, hex(s)) for p, s in zip(files, statuses)
            if s != (0xA900 if p in mismatched else 0)] == []
    rows = {r["sop_instance_uid"]: r for r in engine.store.reader().rows("objects")}
    for path in mismatched:
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in rows
    for path in set(files) - mismatched:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        original, ts = dicomgen.dataset_bytes(path)
        assert rows[uid]["transfer_syntax"] == ts
        assert decrypt(engine.store, rows[uid]) == original, path.name
        assert rows[uid]["digest"] == engine.store.vault.digest(original)
        assert UID(ts)


def test_deflate_is_not_offered_unless_configured(engine):
    from pynetdicom import AE
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    ae = AE(ae_title="DFLSENDER")
    ae.add_requested_context(dicomgen.BASIC_TEXT_SR, [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(dicomgen.BASIC_TEXT_SR, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", engine.listeners[0].address[1], ae_title="MF_SCP")
    try:
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == {ExplicitVRLittleEndian}


def test_duplicate_and_conflicting_versions(engine, tmp_path):
    port = engine.listeners[0].address[1]
    ds = dicomgen.make_sr()
    first = dicomgen.save(ds, tmp_path / "a.dcm")
    assert storescu(port, [first, first]).returncode == 0
    ds.TextValue = "changed"  # same SOP Instance UID, different bytes
    ds.ContentSequence[0].TextValue = "Amended finding."
    second = dicomgen.save(ds, tmp_path / "b.dcm")
    assert storescu(port, [second]).returncode == 0
    reads = engine.store.reader()
    rows = reads.rows("objects", order_by="version", sop_instance_uid=str(ds.SOPInstanceUID))
    assert [(r["version"], r["superseded"]) for r in rows] == [(1, 1), (2, 0)]
    deliveries = [d for oid in (rows[0]["id"], rows[1]["id"])
                  for d in reads.rows("deliveries", object_id=oid)]
    assert sorted(d["object_id"] for d in deliveries) == [rows[0]["id"], rows[1]["id"]]
    # (the default destination is unreachable: its retry events are not what this checks)
    events = [r["event"] for r in reads.rows("audit", sop_instance_uid=str(ds.SOPInstanceUID))
              if r["event"] in ("stored", "duplicate", "conflict")]
    assert events == ["stored", "duplicate", "conflict", "stored"]
    # Only two blobs exist for the three receptions.
    assert_blobs_match_rows(engine.store)
    assert len(reads.rows("blob_data")) == 2


def test_echo_and_association_rejections(engine_factory):
    engine = engine_factory(calling_aets=["MODALITY", "CT01"])
    port = str(engine.listeners[0].address[1])
    echoscu = require_tool("echoscu")
    ok = run([echoscu, "-aet", "CT01", "-aec", "MF_SCP", "127.0.0.1", port])
    assert ok.returncode == 0, ok.stderr
    wrong_called = run([echoscu, "-aet", "CT01", "-aec", "NOT_US", "127.0.0.1", port])
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    unlisted = run([echoscu, "-aet", "INTRUDER", "-aec", "MF_SCP", "127.0.0.1", port])
    assert unlisted.returncode != 0
    assert "Calling AE Title Not Recognized" in unlisted.stdout + unlisted.stderr

    def rejected():
        return engine.store.reader().rows("audit", event="association_rejected")
    rows = poll(lambda: (r := rejected()) and len(r) >= 2 and r, message="audit rows")
    assert ("CT01", "called AE title not recognized") in [
        (r["calling_ae"], r["detail"].split(" (")[0]) for r in rows]
    assert ("INTRUDER", "calling AE title not recognized") in [
        (r["calling_ae"], r["detail"].split(" (")[0]) for r in rows]
    # The board is updated after the audit row is written: wait for it as well.
    def board_rejections():
        return {r["reason"] for r in engine.board.snapshot()["recent"] if r["status"] == "rejected"}
    assert poll(lambda: board_rejections() >= {"called AE title not recognized",
                                               "calling AE title not recognized"},
                message="both rejections on the associations board")


def test_over_max_associations_is_a_transient_reject(engine_factory):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    engine = engine_factory(listener={"max_associations": 2})
    port = engine.listeners[0].address[1]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="MF_SCP") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", port, ae_title="MF_SCP")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
    finally:
        for a in held:
            a.release()


def test_canary_phi_is_nowhere_in_plaintext(serve_factory, tmp_path):
    srv = serve_factory(calling_aets=["MODALITY"])
    files = dicomgen.write_corpus(tmp_path / "phi", 20)
    files.append(dicomgen.save(dicomgen.make_image(pixel_bytes=3 * 1024 * 1024), tmp_path / "big.dcm"))
    assert storescu(srv.port, files).returncode == 0
    # A rejected association and a refused object also leave traces that must be clean.
    storescu(srv.port, files[:1], aet="INTRUDER")
    status = mfconsole("--config", str(srv.config), "status", "--json")
    assert srv.stop() == 0
    haystacks = {"status": status.stdout.encode() + status.stderr.encode(),
                 "stderr": srv.log_path.read_bytes()}
    for path in srv.data_dir.rglob("*"):
        if path.is_file():
            haystacks[str(path)] = path.read_bytes()
    assert any(name.endswith("-wal") or name.endswith(".db") for name in haystacks)
    assert any(name.endswith(".blob") for name in haystacks)
    for canary in (CANARY_NAME, CANARY_ID, "ZZCANARY"):
        for name, data in haystacks.items():
            assert canary.encode() not in data, f"canary {canary!r} found in {name}"
    with srv.db() as db:
        assert db.object_count() == 21


def test_serve_lifecycle_single_instance_and_status(serve_factory):
    srv = serve_factory()
    second = mfconsole("--config", str(srv.config), "serve", timeout=30)
    assert second.returncode == 1
    assert "already serving" in second.stderr and str(srv.proc.pid) in second.stderr
    status = mfconsole("--config", str(srv.config), "status", "--json")
    assert status.returncode == 0
    import json
    data = json.loads(status.stdout)
    assert data["engine"]["running"] and data["engine"]["pid"] == srv.proc.pid
    assert data["listeners"][0]["state"] == "listening"
    assert srv.stop(signal.SIGTERM) == 0
    data = json.loads(mfconsole("--config", str(srv.config), "status", "--json").stdout)
    assert not data["engine"]["running"]


def test_sigterm_finishes_the_association_in_progress(serve_factory, tmp_path):
    srv = serve_factory()
    files = dicomgen.write_corpus(tmp_path / "slow", 60, kind="ct", pixel_bytes=256 * 1024)
    exe = require_tool("storescu")
    proc = subprocess.Popen([exe, "-v", "-aet", "MODALITY", "-aec", "MF_SCP", "127.0.0.1",
                             str(srv.port), *map(str, files)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with srv.db() as db:
        poll(lambda: db.object_count() >= 5, timeout=30)
    assert srv.stop(signal.SIGTERM) == 0
    out, _ = proc.communicate(timeout=60)
    confirmed = successes(out)
    with srv.db() as db:
        stored = {r["sop_instance_uid"] for r in db.rows("objects")}
    for path in confirmed:
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) in stored


@pytest.mark.slow
def test_kill9_never_loses_a_confirmed_object(serve_factory, tmp_path):
    """kill -9 the engine at random moments while storescu sends; after a restart,
    everything storescu saw Success for is present and decrypts to its bytes."""
    from mfconsole.config import load
    from mfconsole.engine.store import Store
    from mfconsole.engine.vault import Vault, load_or_create_key

    rng = random.Random(20261122)
    srv = serve_factory()
    exe = require_tool("storescu")
    confirmed: list[Path] = []
    for round_ in range(5):
        # Small SRs (stored in the database) and objects over INLINE_MAX (files), mixed.
        files = dicomgen.write_corpus(tmp_path / f"round{round_}", 150)
        files[::10] = dicomgen.write_corpus(tmp_path / f"round{round_}ct", len(files[::10]),
                                            kind="ct", pixel_bytes=300 * 1024)
        proc = subprocess.Popen([exe, "-v", "-aet", "MODALITY", "-aec", "MF_SCP", "127.0.0.1",
                                 str(srv.port), *map(str, files)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        time.sleep(rng.uniform(0.05, 0.6))   # the random moment is the point of the test
        srv.kill9()
        out, _ = proc.communicate(timeout=60)
        confirmed += successes(out)
        srv.start()
    srv.stop()
    assert confirmed, "storescu never got a Success before the kill: the test proves nothing"
    config = load(srv.config)
    store = Store(config.engine.data_dir, Vault([load_or_create_key(config.store.key_file)]))
    store.open()
    try:
        rows = {r["sop_instance_uid"]: r for r in store.reader().rows("objects")}
        for path in confirmed:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in rows, f"{path.name} was confirmed but is not stored"
            original, _ = dicomgen.dataset_bytes(path)
            assert decrypt(store, rows[uid]) == original
        assert_blobs_match_rows(store)
        assert {r["blob"] == "inline" for r in rows.values()} == {True, False}, \
            "the crash rounds must cover both small (in the database) and large (file) objects"
    finally:
        store.close()


def test_no_numpy_in_the_installed_environment():
    from importlib import metadata
    from importlib.util import find_spec

    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    assert "numpy" not in names
    assert find_spec("numpy") is None
    out = run([sys.executable, "-c", "import mfconsole.cli, mfconsole.engine.engine, "
               "mfconsole.dimse.listener, sys; print('numpy' in sys.modules)"])
    assert out.stdout.strip() == "False"


def test_serve_refuses_a_key_file_others_can_read(tmp_path):
    """A key readable by group/others is a clear one-line error (exit 1), not a
    traceback, and nothing is stored or listened on."""
    from mfconsole.engine.vault import load_or_create_key

    config = write_config(tmp_path / "k")
    key = tmp_path / "k" / "var" / "keys" / "store.key"
    load_or_create_key(key)
    key.chmod(0o644)
    res = mfconsole("--config", str(config), "serve", timeout=30)
    assert res.returncode == 1
    assert f"chmod 600 {key}" in res.stderr
    assert "Traceback" not in res.stderr
    assert not db_path(tmp_path / "k" / "var").exists()

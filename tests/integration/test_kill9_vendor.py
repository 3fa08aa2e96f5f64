"""kill -9 the engine again and again while it forwards real vendor objects (pydicom's
bundled files: GE, Toshiba, Siemens, Philips, SonoSite, Mortara, OFFIS, QIICR...;
implicit/explicit/big endian, deflate, RLE, JPEG, JPEG-LS, JPEG 2000) to a slow DIMSE
peer. After the last restart every object the engine acknowledged is delivered intact
or dead-lettered with a reason: none lost, none corrupt, none stored twice.

Asserts on what the peer received (its SHA-256 of each data set) and on the object and
delivery rows, never on log lines.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import dicomgen
from fault_scp import FaultSCP
from harness import poll, stored_sha256
from test_forward_dimse import dimse_dest

# Real objects from several vendors and in many transfer syntaxes. Several share a SOP
# Instance UID with another (the MR_small family, rtdose/rtdose_rle): the first is sent
# as it is, the others as copies with a new UID (see _vendor_corpus), so that no object
# is sent twice with different bytes. Files the listener refuses are left out.
VENDOR_FILES = (
    "CT_small.dcm",                   # GE, CT, explicit LE
    "MR_small.dcm",                   # Toshiba, MR, explicit LE
    "MR_small_implicit.dcm",          # implicit LE
    "MR_small_bigendian.dcm",         # explicit BE
    "MR_small_RLE.dcm",               # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm",      # JPEG 2000 lossless
    "JPEG2000.dcm",                   # GE, JPEG 2000
    "JPEG-lossy.dcm",                 # GE, JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",           # GDCM, JPEG lossless SV1
    "SC_rgb_jpeg_dcmtk.dcm",          # DCMTK, JPEG baseline
    "JPEGLSNearLossless_08.dcm",      # JPEG-LS near-lossless (no Study UID: refused)
    "image_dfl.dcm",                  # deflated explicit LE, odd-length deflate stream
    "rtplan.dcm",                     # RT Plan, implicit LE
    "rtdose.dcm",                     # RT Dose, implicit LE
    "rtdose_rle.dcm",                 # RT Dose, RLE
    "test-SR.dcm",                    # Comprehensive SR
    "reportsi.dcm",                   # OFFIS, Basic Text SR
    "ExplVR_BigEnd.dcm",              # GE, US, explicit BE
    "examples_palette.dcm",           # Philips, US, palette colour (280 KB)
    "examples_overlay.dcm",           # Siemens, MR with overlay (320 KB)
    "examples_ybr_color.dcm",         # SonoSite, US multi-frame, JPEG baseline
    "examples_jpeg2k.dcm",            # GE, US, JPEG 2000 lossless
    "waveform_ecg.dcm",               # Mortara, 12-lead ECG (290 KB)
    "liver_1frame.dcm",               # QIICR, Segmentation
    "SC_rgb_small_odd.dcm",           # odd rows/columns
    "693_J2KI.dcm",                   # CT, JPEG 2000
)
INITIAL = 126          # objects sent before the first kill
KILLS = 4
WAVE_NEW = 6           # new objects sent after each restart (while forwarding resumes)
WAVE_AGAIN = 2         # acknowledged objects sent again after each restart (same bytes)
PROGRESS = 12          # C-STOREs the peer must answer between two kills
DELAY_S = "0.05"       # the peer's delay per C-STORE: the queue drains in several seconds


def _copy_with_new_uid(src: Path, dest: Path, tag: str) -> Path:
    """``src`` re-written by pydicom (same transfer syntax) with a new, deterministic
    SOP Instance UID in the data set and the file meta."""
    ds = dcmread(src)
    uid = generate_uid(entropy_srcs=["mfconsole test_kill9_vendor", src.name, tag])
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(dest)
    return dest


def _head(path: Path):
    return dcmread(path, stop_before_pixels=True)


def _uid(path: Path) -> str:
    return str(_head(path).SOPInstanceUID)


def _vendor_corpus(folder: Path) -> list[Path]:
    """The bundled files (only those present: pydicom-data is not downloaded), each
    with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    out, seen = [], set()
    for name in VENDOR_FILES:
        found = get_testdata_file(name, download=False)
        if found is None:
            continue
        path = Path(found)
        head = _head(path)
        uid = str(head.SOPInstanceUID)
        # A file whose meta names another instance than its data set (rtplan, rtdose) is
        # refused by the listener when sent as it is (command UID != data set UID).
        if uid in seen or head.file_meta.MediaStorageSOPInstanceUID != uid:
            path = _copy_with_new_uid(path, folder / name, "original")
            uid = _uid(path)
        seen.add(uid)
        out.append(path)
    return out


def _send(port: int, paths: list[Path]) -> dict[Path, int]:
    """C-STORE each file over one association, its data set bytes exactly as in the
    file (pynetdicom's chunked mode; by default it decodes and re-encodes, which changes
    a deflated stream). Path -> status; -1 when the listener did not accept the
    presentation context."""
    from pynetdicom import AE, _config

    heads = {p: _head(p) for p in paths}
    ae = AE(ae_title="MODALITY")
    for sop, ts in dict.fromkeys((str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                                 for h in heads.values()):
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="MF_SCP")
    assert assoc.is_established
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    statuses = {}
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for path, h in heads.items():
            if (str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) not in accepted:
                statuses[path] = -1
                continue
            rsp = assoc.send_c_store(path)
            statuses[path] = int(rsp.Status) if "Status" in rsp else -2
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def _answered_ok(scp: FaultSCP) -> list[dict]:
    return [r for r in scp.received() if r["status"] == 0]


def _active(db) -> int:
    return sum(len(db.rows("deliveries", state=state)) for state in ("pending", "in_flight"))


@pytest.mark.slow
def test_kill9_cycles_while_forwarding_vendor_objects(serve_factory, tmp_path):
    scp = FaultSCP(None, "--delay-s", DELAY_S, record_dir=tmp_path / "scp", ae_title="PACS").start()
    serve = serve_factory(destinations=[dimse_dest(scp.port)], listener={"accept_deflate": True})

    # The vendor files first, as they are: the listener may refuse some (then they are
    # not acknowledged and must not be stored).
    vendor = _vendor_corpus(tmp_path / "vendor")
    statuses = _send(serve.port, vendor)
    sources = [p for p in vendor if statuses[p] == 0]
    refused = {_uid(p) for p in vendor if statuses[p] != 0}
    kinds = {(str(h.get("Manufacturer", "")), str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
             for h in map(_head, sources)}
    syntaxes = {ts for _, _, ts in kinds}
    assert len(kinds) >= 10 and len(syntaxes) >= 8, (statuses, kinds)
    acknowledged: dict[str, Path] = {_uid(p): p for p in sources}

    # Copies with new SOP Instance UIDs (same transfer syntax, same content otherwise).
    (tmp_path / "copies").mkdir()
    copies = iter(_copy_with_new_uid(sources[i % len(sources)], tmp_path / "copies" / f"{i:04d}.dcm",
                                     str(i))
                  for i in range(10_000))

    def send_acknowledged(paths: list[Path]) -> None:
        got = _send(serve.port, paths)
        assert set(got.values()) == {0}, got
        acknowledged.update({_uid(p): p for p in paths})

    send_acknowledged([next(copies) for _ in range(INITIAL - len(acknowledged))])

    in_flight_at_kill = []
    for cycle in range(KILLS):
        baseline = len(_answered_ok(scp))
        poll(lambda: len(_answered_ok(scp)) >= baseline + PROGRESS, timeout=30, interval=0.02,
             message=f"cycle {cycle}: the peer answers {PROGRESS} more C-STOREs")
        serve.kill9()
        with serve.db() as db:
            assert _active(db) > 0, f"cycle {cycle}: the kill must land while forwarding"
            in_flight_at_kill.append(len(db.rows("deliveries", state="in_flight")))
        serve.start()
        # While the restarted engine forwards: new objects, and a few acknowledged ones
        # again with the same bytes (a modality retrying after the crash).
        again = list(acknowledged.values())[cycle * WAVE_AGAIN:(cycle + 1) * WAVE_AGAIN]
        send_acknowledged([next(copies) for _ in range(WAVE_NEW)] + again)

    expected = set(acknowledged)
    assert len(expected) == INITIAL + KILLS * WAVE_NEW
    with serve.db() as db:
        # Settled: a delivery row for every acknowledged object, none pending or in flight.
        poll(lambda: _active(db) == 0 and len(db.rows("deliveries")) == len(expected),
             timeout=60, interval=0.05, message="every delivery settled")
        objects = {r["sop_instance_uid"]: {k: r[k] for k in ("id", "sop_instance_uid", "version", "size")}
                   for r in db.rows("objects")}
        for uid, sha in stored_sha256(serve.data_dir).items():   # the stored plaintext's
            objects[uid]["digest"] = sha
        per_uid = Counter(r["sop_instance_uid"] for r in db.rows("objects"))
        rows_per_uid = [(uid, n) for uid, n in per_uid.items() if n > 1]
        uid_of = {r["id"]: r["sop_instance_uid"] for r in db.rows("objects")}
        outcome = {uid_of[d["object_id"]]: {"sop_instance_uid": uid_of[d["object_id"]],
                                            **{k: d[k] for k in ("destination", "state", "last_status",
                                                                 "last_reason")}}
                   for d in db.rows("deliveries")}
        delivery_count = len(db.rows("deliveries"))

    # Stored once each, exactly the acknowledged ones, each as it was sent.
    assert [tuple(r) for r in rows_per_uid] == []
    assert set(objects) == expected
    assert not refused & set(objects)
    assert {o["version"] for o in objects.values()} == {1}
    for uid, path in acknowledged.items():
        data, _ = dicomgen.dataset_bytes(path)
        assert objects[uid]["digest"] == hashlib.sha256(data).hexdigest(), f"{path.name} stored altered"

    # One delivery per object, each delivered or dead-lettered with a reason.
    assert delivery_count == len(expected)
    assert {o["destination"] for o in outcome.values()} == {"pacs"}
    states = {uid: o["state"] for uid, o in outcome.items()}
    assert set(states.values()) <= {"delivered", "dead"}, states
    dead = {uid for uid, s in states.items() if s == "dead"}
    for uid in dead:
        assert (outcome[uid]["last_reason"] or "").strip(), f"{uid} dead-lettered without a reason"
    # The peer accepts every SOP class and transfer syntax sent: a dead letter can only be
    # an object the engine cannot send as it is (an odd-length data set it cannot pad),
    # never one the kills made it give up on.
    assert all(objects[uid]["size"] % 2 == 1 for uid in dead), \
        {uid: (objects[uid]["size"], outcome[uid]["last_reason"]) for uid in dead}

    # What the peer answered Success for: every delivered object, intact every time it
    # arrived (a transfer cut by a kill may arrive twice), and nothing else.
    received: dict[str, list[dict]] = {}
    for row in _answered_ok(scp):
        received.setdefault(row["sop_instance_uid"], []).append(row)
    assert set(received) <= expected
    for uid in expected - dead:
        assert uid in received, f"{acknowledged[uid].name} ({uid}) marked delivered but never arrived"
        want = objects[uid]
        for row in received[uid]:
            # An odd-length data set may go out padded to an even length (PS3.5 7.1.1):
            # one byte more; anything else must arrive exactly as stored.
            assert row["sha256"] == want["digest"] or (
                want["size"] % 2 == 1 and row["size"] == want["size"] + 1), \
                f"{acknowledged[uid].name}: corrupt at the peer"
    print(f"\nkill9-vendor: {len(expected)} objects from {len(sources)} vendor files "
          f"({len(syntaxes)} transfer syntaxes), refused {[p.name for p in vendor if statuses[p]]}, "
          f"{KILLS} kills, in flight at each kill {in_flight_at_kill}, "
          f"dead {[outcome[u]['last_reason'] for u in dead]}, "
          f"peer C-STOREs {sum(map(len, received.values()))}")

"""Priority and pacing per destination against real peers: DCMTK storescp (slowed by a
rate cap, or by --sleep-during), storescu sending the urgent study, the engine's
control socket for `status` and `reload`, fault_scp taking several associations at
once. Rates are measured at the peer, from the times its files were written.

What is asserted: a 5 000-object backlog does not hold back an urgent study; a
destination outside its window receives nothing and counts no attempt, then gets
everything once a reload opens it; a 20/s cap measures 20/s ±10 % at the peer, one
association or several."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

import dicomgen
from fault_scp import FaultSCP
from harness import holds, mfconsole, poll, store_files
from mfconsole.engine import outbox
from mfconsole.engine.store import IngestRequest, Route
from peers import require_tool

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2, "acse_timeout_s": 5,
        "dimse_timeout_s": 30}
STROKE = {"name": "stroke", "when": {"modality": "CT", "study_description": "STROKE"},
          "to": ["pacs"], "priority": "urgent"}


def dest(scp, **keys) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
            "ae_title": scp.ae_title, "max_associations": 1, **FAST, **keys}


def storescu(port: int, files: list[Path], aet: str = "CT1") -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", "MF_SCP", "127.0.0.1",
                          str(port), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def stroke_ct(folder: Path) -> Path:
    ds = dicomgen.make_image(pixel_bytes=4096)
    ds.StudyDescription = "CT HEAD STROKE PROTOCOL"
    return dicomgen.save(ds, folder / "stroke.dcm")


def files_of(scp, prefix: str = "") -> list[os.DirEntry]:
    """What storescp wrote (its names start with the modality: "CT.", "SRt.")."""
    if not scp.output_dir.is_dir():
        return []
    return [e for e in os.scandir(scp.output_dir) if e.name.startswith(prefix) and e.is_file()]


def rate_at_peer(paths: list) -> float:
    """Objects per second at the peer: the spans between the times its files were
    written (the first file starts the clock)."""
    times = sorted(os.stat(p).st_mtime_ns for p in paths)
    return (len(times) - 1) / ((times[-1] - times[0]) / 1e9)


def deliveries(engine) -> dict[str, int]:
    return engine.store.reader().delivery_counts().get("pacs", {})


def status_of(engine) -> dict:
    res = mfconsole("--config", str(engine.config.path), "status", "--json")
    assert res.returncode == 0, res.stderr
    return next(d for d in json.loads(res.stdout)["destinations"] if d["name"] == "pacs")


def backlog(engine, count: int) -> None:
    """``count`` SR objects stored for pacs through the store's own ingest (sealed,
    committed with their delivery, as a listener would), 16 at a time."""
    template = dicomgen.make_sr()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    marker = "1.2.3.999999999999"
    template.SOPInstanceUID = marker
    write_dataset(buffer, template)
    data = buffer.getvalue()

    def one(i: int) -> str:
        uid = f"1.2.3.{i:012d}"             # as long as the marker: lengths stay right
        request = IngestRequest(
            sop_instance_uid=uid, sop_class_uid=dicomgen.BASIC_TEXT_SR,
            study_uid=str(template.StudyInstanceUID), series_uid=None, modality="SR",
            transfer_syntax=ExplicitVRLittleEndian, listener="modalities", calling_ae="BACKLOG",
            peer="127.0.0.1:1", routes=(Route("pacs"),))
        return engine.store.ingest(data.replace(marker.encode(), uid.encode()), request).outcome

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(count))) == {"stored"}


def test_an_urgent_study_overtakes_a_5000_object_backlog(engine_factory, storescp, tmp_path):
    engine = engine_factory(destinations=[dest(storescp, max_objects_per_s=50)], routes=[],
                            rules=[STROKE], routing={"fallback": ["pacs"]})
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    backlog(engine, 5000)
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()
    storescp.wait_for_files(50, timeout=30)          # the backlog is going out, at 50/s

    ct = stroke_ct(tmp_path)
    storescu(engine.listeners[0].address[1], [ct])   # returns once the CT is stored
    stored = time.monotonic()
    poll(lambda: files_of(storescp, "CT."), timeout=10, interval=0.01, message="the urgent CT at storescp")
    waited = time.monotonic() - stored
    pending = deliveries(engine).get("pending", 0)
    print(f"urgent CT at storescp {waited * 1000:.0f} ms after it was stored; "
          f"{pending} of the backlog still queued")
    assert waited < 3.0 and pending > 4000
    poll(lambda: engine.store.reader().rows("deliveries", priority=1, state="delivered"),
         timeout=10, message="the urgent delivery recorded")
    reads = engine.store.reader()
    obj, = reads.rows("objects", sop_instance_uid=str(dcmread(ct, stop_before_pixels=True).SOPInstanceUID))
    delivery, = reads.rows("deliveries", object_id=obj["id"])
    assert (delivery["priority"], delivery["state"]) == (1, "delivered")
    stored_row, = reads.rows("audit", event="stored", object_id=obj["id"])
    assert stored_row["detail"].endswith("(rule stroke; urgent)")


def test_an_urgent_study_overtakes_the_batch_a_slow_peer_is_working_through(
        engine_factory, storescp_factory, tmp_path):
    """storescp taking a second per object (--sleep-after 1: it answers, then sleeps
    before it reads the next request): a claimed batch of 32 takes half a minute. The
    urgent CT waits for the group in flight (8 pipelined C-STOREs), not for the rest of
    the batch, which goes back to the queue behind it."""
    slow = storescp_factory("--sleep-after", "1", name="slow")
    engine = engine_factory(destinations=[dest(slow)], routes=[], rules=[STROKE],
                            routing={"fallback": ["pacs"]})
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    backlog(engine, 64)
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()
    poll(lambda: len(files_of(slow)) >= 2, timeout=20, message="the batch under way")
    storescu(engine.listeners[0].address[1], [stroke_ct(tmp_path)])
    before = len(files_of(slow))
    stored = time.monotonic()
    poll(lambda: files_of(slow, "CT."), timeout=20, interval=0.05, message="the urgent CT at storescp")
    waited = time.monotonic() - stored
    ahead_of_it = len(files_of(slow, "SRt.")) - before
    print(f"urgent CT after {waited:.1f} s at 1 s per object, {ahead_of_it} object(s) ahead of it")
    # At most the group that was in flight (8 pipelined C-STOREs), never the 30-odd
    # objects left of the claimed batch.
    assert ahead_of_it <= 10 and waited < 12
    # What was given back was not attempted: no attempt counted, no retry scheduled.
    rows = engine.store.reader().rows("deliveries")
    assert all(d["attempts"] == 0 for d in rows if d["state"] != "delivered")
    assert not engine.store.reader().rows("audit", event="retry_scheduled")


def test_with_two_workers_the_one_sending_a_batch_gives_way(engine_factory, tmp_path):
    """fault_scp taking a quarter of a second per object, two associations, 40 queued:
    worker 0 holds 32, worker 1 the other 8. The urgent CT is stored while worker 0 has
    most of its batch left; worker 1, finding nothing of its own share, must leave the
    signal to worker 0, which gives way after its group."""
    scp = FaultSCP(None, "--delay-s", "0.25", record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dest(scp, max_associations=2)], routes=[],
                                rules=[STROKE], routing={"fallback": ["pacs"]})
        engine.store.call(outbox.pause, "pacs", "test: queue first")
        backlog(engine, 40)
        engine.store.call(outbox.resume, "pacs")
        engine.deliveries["pacs"].wake.set()
        scp.wait_received(3, timeout=20)
        storescu(engine.listeners[0].address[1], [stroke_ct(tmp_path)])
        stored, before = time.monotonic(), len(scp.received())
        poll(lambda: any(r["sop_class_uid"] == dicomgen.CT_IMAGE for r in scp.received()),
             timeout=20, interval=0.05, message="the urgent CT at fault_scp")
        waited = time.monotonic() - stored
        order = [r["sop_class_uid"] for r in scp.received()]
        ahead_of_it = order.index(dicomgen.CT_IMAGE) - before
        print(f"two workers: urgent CT after {waited:.2f} s at 0.25 s per object, "
              f"{ahead_of_it} object(s) ahead of it")
        # One group (8) of worker 0 and what worker 1 still had, never worker 0's batch.
        assert waited < 4.0 and ahead_of_it <= 16
    finally:
        scp.stop()


def test_outside_its_window_a_destination_receives_nothing_until_a_reload_opens_it(
        engine_factory, storescp, tmp_path):
    hour = time.localtime().tm_hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"      # opens in 1-2 h
    engine = engine_factory(destinations=[dest(storescp, windows=[closed])], routes=[],
                            rules=[STROKE], routing={"fallback": ["pacs"]})
    files = dicomgen.write_corpus(tmp_path / "sr", 5)
    store_files(engine.listeners[0].address[1], files)
    storescu(engine.listeners[0].address[1], [stroke_ct(tmp_path)])     # urgent, and waits too
    assert deliveries(engine) == {"pending": 6}
    assert holds(lambda: not files_of(storescp) and deliveries(engine) == {"pending": 6}, 2.0)
    rows = engine.store.reader().rows("deliveries")
    assert all(d["attempts"] == 0 for d in rows)
    assert not engine.store.reader().rows("audit", destination="pacs", event="retry_scheduled")

    status = status_of(engine)
    opens = f"{(hour + 2) % 24:02d}:00"
    assert status["state"] == "outside_window" and status["window"]["open"] is False
    assert status["window"]["next_change"].endswith(opens) and status["failures"] == 0
    assert status["urgent_pending"] == 1
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    # "00:00" today, or "Mon 00:00" when the window opens tomorrow (run after 22:00)
    said = status["window"]["next_change"]
    assert "outside_window" in text and f"outside window, next opens at {said}" in text
    assert "urgent pending 1 (sent before the rest)" in text

    path = engine.config.path
    inside = f"{(hour - 1) % 24:02d}:00-{(hour + 2) % 24:02d}:00"
    path.write_text(path.read_text().replace(closed, inside))
    res = mfconsole("--config", str(path), "reload")
    assert res.returncode == 0 and "destination pacs: updated" in res.stdout, res.stdout + res.stderr
    storescp.wait_for_files(6, timeout=30)
    poll(lambda: deliveries(engine) == {"delivered": 6}, timeout=10, message="all delivered")
    assert all(d["attempts"] == 1 for d in engine.store.reader().rows("deliveries"))
    assert status_of(engine)["state"] == "up"
    # The window opened on a queue: the urgent CT, stored last, went first.
    delivered = engine.store.reader().rows("audit", event="delivered", destination="pacs")
    urgent, = engine.store.reader().rows("deliveries", priority=1)
    assert delivered[0]["delivery_id"] == urgent["id"]


def test_a_blackout_holds_normal_objects_and_lets_urgent_ones_through(engine_factory, storescp, tmp_path):
    hour = time.localtime().tm_hour
    now = f"{(hour - 1) % 24:02d}:00-{(hour + 2) % 24:02d}:00"
    engine = engine_factory(destinations=[dest(storescp, blackout=[now], urgent_ignores_window=True)],
                            routes=[], rules=[STROKE], routing={"fallback": ["pacs"]})
    port = engine.listeners[0].address[1]
    store_files(port, dicomgen.write_corpus(tmp_path / "sr", 3))
    storescu(port, [stroke_ct(tmp_path)])
    poll(lambda: deliveries(engine) == {"pending": 3, "delivered": 1}, timeout=15,
         message="the urgent CT delivered")
    assert holds(lambda: [e.name[:3] for e in files_of(storescp)] == ["CT."]
                 and deliveries(engine) == {"pending": 3, "delivered": 1}, 1.5)
    status = status_of(engine)
    assert status["state"] == "outside_window" and status["window"]["urgent_ignores_window"]
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    assert "(urgent deliveries still go)" in text


def test_a_20_per_second_cap_measures_20_per_second_at_storescp(engine_factory, storescp, tmp_path):
    engine = engine_factory(destinations=[dest(storescp, max_objects_per_s=20)])
    engine.store.call(outbox.pause, "pacs", "test: queue first")
    store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 100))
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()
    received = storescp.wait_for_files(100, timeout=30)
    rate = rate_at_peer(received)
    print(f"20/s cap: {rate:.2f} objects/s at storescp over {len(received)} objects")
    assert 18.0 <= rate <= 22.0
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    assert "rate cap 20 objects/s" in text


def test_the_cap_is_shared_by_every_association_of_the_destination(engine_factory, tmp_path):
    """fault_scp takes several associations at once: three workers, one cap."""
    scp = FaultSCP(None, record_dir=tmp_path / "scp", ae_title="PACS").start()
    try:
        engine = engine_factory(destinations=[dest(scp, max_associations=3, max_objects_per_s=20)])
        engine.store.call(outbox.pause, "pacs", "test: queue first")
        store_files(engine.listeners[0].address[1], dicomgen.write_corpus(tmp_path / "sr", 100))
        engine.store.call(outbox.resume, "pacs")
        engine.deliveries["pacs"].wake.set()
        scp.wait_received(100, timeout=30)
        accepted = [a for a in scp.associations() if a["event"] == "accepted"]
        raw = sorted((tmp_path / "scp").glob("*.dcm-raw"))
        rate = rate_at_peer(raw)
        print(f"20/s cap over {len(accepted)} associations: {rate:.2f} objects/s at fault_scp")
        assert len(accepted) >= 2 and len(raw) == 100
        assert 18.0 <= rate <= 22.0
    finally:
        scp.stop()

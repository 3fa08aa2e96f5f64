"""Coercion of the outgoing copy and send_as against real peers: DCMTK storescu sending
as CT1 / MR1 into a listener, Orthanc (C-STORE and DICOMweb STOW-RS) and DCMTK storescp
receiving. Asserts on what the peer holds (Orthanc's REST API: tags, pixel data,
the calling AE it recorded), on the stored blob, on the delivery rows and audit, and
that no patient value reaches a log, an audit row or the coerced-record column."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

import dicomgen
from harness import CANARY_ID, CANARY_NAME, holds, poll, run, write_config
from mfconsole.engine import outbox
from peers import require_tool

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2, "acse_timeout_s": 5,
        "dimse_timeout_s": 5}
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT1_RULE = {"name": "ct1", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"],
            "coerce": [{"prefix": "PatientID", "value": "CT1-"}, {"issuer_of_patient_id": "HOSP_A"}]}


def storescu(port: int, aet: str, files: list[Path]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", "MF_SCP", "127.0.0.1",
                          str(port), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def image(folder: Path, name: str, *, modality: str = "CT", patient_id: str = CANARY_ID) -> Path:
    ds = dicomgen.make_image(pixel_bytes=8192, patient_id=patient_id,
                             sop_class=MR_IMAGE if modality == "MR" else dicomgen.CT_IMAGE)
    ds.Modality = modality
    return dicomgen.save(ds, folder / f"{name}.dcm")


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def orthanc_dest(orthanc, **extra) -> dict:
    return {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
            "ae_title": orthanc.ae_title, "calling_ae_title": "MF_SCU", **FAST, **extra}


def orthanc_id(orthanc, uid: str) -> str:
    found = orthanc.http.post("/tools/lookup", content=uid).json()
    return found[0]["ID"] if found else ""


def deliveries(engine) -> list[dict]:
    return engine.store.reader().rows("deliveries", order_by="id")


def no_phi(engine, *more: str) -> None:
    """No patient value (the canary, and what coercion made of it) in the log, an audit
    row or the column recording what coercion changed."""
    text = (engine.data_dir / "logs" / "mfconsole.log").read_text()
    reads = engine.store.reader()
    rows = json.dumps(reads.rows("audit"), default=str)
    coerced = json.dumps([d["coerced"] for d in reads.rows("deliveries")])
    for value in (CANARY_NAME, CANARY_ID, f"CT1-{CANARY_ID}", *more):
        assert value not in text and value not in rows and value not in coerced, value


def test_coercion_and_send_as_into_orthanc(engine_factory, orthanc, tmp_path):
    """The acceptance of issue 17: Orthanc holds PatientID prefixed and IssuerOfPatientID
    set, the pixel data the source had, from calling AE CT1; the stored blob is as
    received; the delivery records which attributes changed, never values. An MR1
    object queued beside them goes on its own association, as MR1, uncoerced."""
    engine = engine_factory(
        destinations=[orthanc_dest(orthanc, send_as="calling_ae")], routes=[],
        rules=[CT1_RULE, {"name": "mr1", "when": {"calling_aet": ["MR1"]}, "to": ["pacs"]}],
        routing={"fallback": []})
    port = engine.listeners[0].address[1]
    cts = [image(tmp_path, f"ct{i}") for i in range(3)]
    mr = image(tmp_path, "mr", modality="MR")
    # Held while all four arrive, so one worker's batch mixes both calling AEs.
    engine.store.call(outbox.pause, "pacs", "test: hold until all are stored")
    storescu(port, "CT1", cts)
    storescu(port, "MR1", [mr])
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()
    poll(lambda: all(d["state"] == "delivered" for d in deliveries(engine)) and len(deliveries(engine)) == 4,
         timeout=60, message="four deliveries delivered")

    for path in cts:
        oid = orthanc_id(orthanc, uid_of(path))
        tags = orthanc.http.get(f"/instances/{oid}/tags", params={"simplify": ""}).json()
        assert tags["PatientID"] == f"CT1-{CANARY_ID}" and tags["IssuerOfPatientID"] == "HOSP_A"
        assert orthanc.http.get(f"/instances/{oid}/metadata/RemoteAET").text == "CT1"
        source = dcmread(path)
        pixels = orthanc.http.get(f"/instances/{oid}/content/7fe0-0010/0").content
        assert hashlib.sha256(pixels).hexdigest() == hashlib.sha256(source.PixelData).hexdigest()
        # The stored blob is the object as received: same bytes as the file's data set.
        row = engine.store.reader().rows("objects", sop_instance_uid=uid_of(path))[0]
        data, ts = dicomgen.dataset_bytes(path)
        assert row["transfer_syntax"] == ts and engine.store.read_object(row["id"]) == data
    oid = orthanc_id(orthanc, uid_of(mr))
    tags = orthanc.http.get(f"/instances/{oid}/tags", params={"simplify": ""}).json()
    assert tags["PatientID"] == CANARY_ID and "IssuerOfPatientID" not in tags
    assert orthanc.http.get(f"/instances/{oid}/metadata/RemoteAET").text == "MR1"

    rows = deliveries(engine)
    assert sorted((d["rule"], d["coerced"]) for d in rows) == [
        ("ct1", "PatientID prefix, IssuerOfPatientID set")] * 3 + [("mr1", None)]
    delivered = [a for a in engine.store.reader().rows("audit", event="delivered")]
    assert sum(a["detail"].endswith("; coerced: PatientID prefix, IssuerOfPatientID set")
               for a in delivered) == 3
    objects = engine.store.reader().rows("objects")
    assert {o["called_ae"] for o in objects} == {"MF_SCP"}
    no_phi(engine)

    # `objects show` names the rule and what changed; no value.
    res = run([sys.executable, "-m", "mfconsole", "--config", str(engine.config.path), "objects",
               "show", str(rows[0]["object_id"])])
    assert res.returncode == 0, res.stderr
    assert "rule ct1; coerced: PatientID prefix, IssuerOfPatientID set" in res.stdout
    assert CANARY_ID not in res.stdout

    # `routes explain --reveal` beside the running engine: the engine audits the reveal.
    res = run([sys.executable, "-m", "mfconsole", "--config", str(engine.config.path), "routes",
               "explain", str(cts[0]), "--calling", "CT1", "--reveal"])
    assert res.returncode == 0, res.stderr
    assert f"PatientID: '{CANARY_ID}' -> 'CT1-{CANARY_ID}'" in res.stdout
    revealed = poll(lambda: engine.store.reader().rows("audit", event="phi_revealed"), timeout=10,
                    message="the reveal audited")
    assert revealed[0]["actor"] and "for pacs" in revealed[0]["detail"]
    no_phi(engine)


def test_stow_destination_coercion_into_orthanc(engine_factory, orthanc, tmp_path):
    """A destination's own coercion, on STOW-RS: the instance Orthanc stores carries it."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "sites.csv").write_text("from,to\nHospital A,General Hospital\n")
    engine = engine_factory(destinations=[{
        "name": "web", "kind": "stow", "url": orthanc.dicomweb_url, "retry_initial_s": 0.2,
        "coerce": [{"map": "InstitutionName", "table": "sites.csv", "missing": "fail"},
                   {"set": "StationName", "value": "MFC"}]}])
    ct = image(tmp_path, "ct")
    ds = dcmread(ct)
    ds.InstitutionName = "Hospital A"
    ds.save_as(ct)
    other = image(tmp_path, "other")          # no InstitutionName: not in the table
    storescu(engine.listeners[0].address[1], "CT1", [ct, other])
    poll(lambda: {d["state"] for d in deliveries(engine)} == {"delivered", "dead"}, timeout=60,
         message="one delivered, one dead")
    oid = orthanc_id(orthanc, uid_of(ct))
    tags = orthanc.http.get(f"/instances/{oid}/tags", params={"simplify": ""}).json()
    assert tags["InstitutionName"] == "General Hospital" and tags["StationName"] == "MFC"
    pixels = orthanc.http.get(f"/instances/{oid}/content/7fe0-0010/0").content
    assert pixels == ds.PixelData
    dead = next(d for d in deliveries(engine) if d["state"] == "dead")
    assert dead["last_status"] == "coercion"
    assert 'InstitutionName map: the value is not in sites.csv (missing = "fail")' in dead["last_reason"]
    assert orthanc_id(orthanc, uid_of(other)) == ""
    no_phi(engine, "Hospital A", "General Hospital")


def test_a_rule_removed_while_its_delivery_waits_dead_letters_it(engine_factory, storescp, tmp_path):
    """Sending a copy without the coercion its rule asked for could merge patients at
    the PACS: the delivery is dead-lettered, and a replay once the rule is back sends it
    coerced. A coercion that cannot be made dead-letters that object; the others go."""
    dest = {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": storescp.port,
            "ae_title": storescp.ae_title, **FAST}
    engine = engine_factory(destinations=[dest], routes=[], rules=[CT1_RULE], routing={"fallback": []})
    port = engine.listeners[0].address[1]
    cfg = dict(port=port, destinations=[dest], routes=[], routing={"fallback": []})

    engine.store.call(outbox.pause, "pacs", "test: hold")
    storescu(port, "CT1", [image(tmp_path, "waiting")])
    poll(lambda: len(deliveries(engine)) == 1, timeout=10, message="the delivery queued")
    write_config(engine.config.path.parent, rules=[{"name": "other", "when": {"calling_aet": ["X"]},
                                                    "to": ["pacs"]}], **cfg)
    assert not [line for line in engine.reload() if line.startswith("refused")]
    engine.store.call(outbox.resume, "pacs")
    engine.deliveries["pacs"].wake.set()
    dead = poll(lambda: [d for d in deliveries(engine) if d["state"] == "dead"], timeout=20,
                message="the delivery dead-lettered")[0]
    assert dead["last_status"] == "rule removed" and dead["last_reason"].startswith(
        "routed by rule ct1, which is no longer configured: its coercion cannot be applied")
    assert holds(lambda: not storescp.received_files(), 0.5)

    # The rule back, the dead letter replayed: sent, coerced.
    write_config(engine.config.path.parent, rules=[CT1_RULE], **cfg)
    assert not [line for line in engine.reload() if line.startswith("refused")]
    engine.store.call(outbox.replay, [dead["id"]])
    engine.deliveries["pacs"].wake.set()
    # Delivered: storescp has written the file before it answered.
    poll(lambda: deliveries(engine)[0]["state"] == "delivered", timeout=20,
         message="the replay delivered")
    got = dcmread(storescp.received_files()[0])
    assert got.PatientID == f"CT1-{CANARY_ID}" and got.IssuerOfPatientID == "HOSP_A"

    # One object whose coercion cannot be made (a Patient ID the prefix makes too long):
    # that one is dead-lettered, naming the attribute; the rest of the batch goes.
    files = [image(tmp_path, "fine1"), image(tmp_path, "long", patient_id="L" * 62),
             image(tmp_path, "fine2")]
    storescu(port, "CT1", files)
    poll(lambda: [d["state"] for d in deliveries(engine)].count("delivered") == 3, timeout=30,
         message="the two fine ones delivered")
    failed = poll(lambda: [d for d in deliveries(engine) if d["state"] == "dead"], timeout=10,
                  message="the one that cannot be coerced dead-lettered")
    assert len(failed) == 1 and failed[0]["last_status"] == "coercion"
    assert failed[0]["last_reason"].startswith(
        "coercion not made: PatientID prefix: the new value is 66 characters")
    assert {uid_of(p) for p in files} - {uid_of(files[1])} <= {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in storescp.received_files()}
    no_phi(engine, "L" * 62)


def test_handler_context_says_where_the_object_came_from(engine_factory, storescp, tmp_path):
    folder = tmp_path / "engine"
    (folder / "handlers").mkdir(parents=True)
    (folder / "handlers" / "origin.py").write_text(
        'VERSION = "1.0.0"\n'
        "import copy\n"
        "def handle(obj, ctx):\n"
        "    ds = copy.deepcopy(obj.dataset)\n"
        "    ds.ImageComments = '|'.join([ctx.calling_ae, ctx.called_ae, ctx.peer, ctx.listener,\n"
        "                                 ctx.received_at.tzname(), str(int(ctx.received_at.timestamp()))])\n"
        "    return ds\n")
    engine = engine_factory(destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                           "port": storescp.port, "ae_title": storescp.ae_title, **FAST}],
                            routes=[{"from": "modalities", "to": ["pacs"], "handler": "origin"}])
    storescu(engine.listeners[0].address[1], "CT1", [image(tmp_path, "ct")])
    poll(lambda: [d["state"] for d in deliveries(engine)] == ["delivered"], timeout=20,
         message="the object delivered")
    calling, called, peer, listener, zone, stamp = \
        dcmread(storescp.received_files()[0]).ImageComments.split("|")
    received = engine.store.reader().rows("objects")[0]["received_at"]
    assert (calling, called, peer, listener, zone) == ("CT1", "MF_SCP", "127.0.0.1", "modalities", "UTC")
    assert int(stamp) == int(received)

"""Rules at ingest against real peers: DCMTK storescu sending as CT1 / MR1 / another AE
into one listener, DCMTK storescp destinations, `mfconsole reload` and `status` over
the engine's control socket. Asserts on what each storescp wrote, on the stored
objects, deliveries and audit rows, and greps logs and audit for the canary PHI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

import dicomgen
from harness import CANARY_ID, CANARY_NAME, holds, mfconsole, poll
from peers import require_tool

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2, "acse_timeout_s": 5,
        "dimse_timeout_s": 5}
QA_SITE = "QA Phantom Site"      # an institution name: matched by a rule, never logged


def dest(name: str, scp) -> dict:
    return {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": scp.port,
            "ae_title": scp.ae_title, **FAST}


def storescu(port: int, aet: str, files: list[Path]) -> None:
    res = subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", "MF_SCP", "127.0.0.1",
                          str(port), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def image(folder: Path, name: str, modality: str = "CT", *, pixel_bytes: int = 4096,
          institution: str = "Hospital A") -> Path:
    ds = dicomgen.make_image(pixel_bytes=pixel_bytes,
                             sop_class=MR_IMAGE if modality == "MR" else dicomgen.CT_IMAGE)
    ds.Modality, ds.InstitutionName = modality, institution
    return dicomgen.save(ds, folder / f"{name}.dcm")


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def received(scp) -> set[str]:
    """The SOP Instance UIDs of the files storescp wrote. It writes them in place: one
    that appeared may still be being written, so a file that does not read yet is read
    again (for at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return {uid_of(p) for p in scp.received_files()}
        except (InvalidDicomError, EOFError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def routed(engine) -> dict[str, list[str]]:
    """SOP Instance UID -> the destinations its deliveries go to."""
    reads = engine.store.reader()
    objects = {o["id"]: o["sop_instance_uid"] for o in reads.rows("objects")}
    out: dict[str, list[str]] = {uid: [] for uid in objects.values()}
    for d in reads.rows("deliveries", order_by="id"):
        out[objects[d["object_id"]]].append(d["destination"])
    return out


def no_canary(engine) -> None:
    """Neither the patient's name or ID nor a value a rule matched on, in the log or in
    any audit row."""
    text = (engine.data_dir / "logs" / "mfconsole.log").read_text()
    rows = json.dumps(engine.store.reader().rows("audit"), default=str)
    for value in (CANARY_NAME, CANARY_ID, QA_SITE, "Hospital A"):
        assert value not in text and value not in rows, value


def test_rules_route_by_calling_ae_modality_and_header(engine_factory, storescp_factory, tmp_path):
    pacs, pacs2 = storescp_factory(ae_title="PACS", name="pacs"), storescp_factory(ae_title="PACS2", name="pacs2")
    archive = storescp_factory(ae_title="ARCHIVE", name="archive")
    engine = engine_factory(
        destinations=[dest("pacs", pacs), dest("pacs2", pacs2), dest("archive", archive)], routes=[],
        rules=[{"name": "qa-phantoms", "when": {"institution_name": "^QA Phantom"}, "action": "discard"},
               {"name": "ct", "when": {"calling_aet": ["CT1"], "modality": ["CT"]}, "to": ["pacs"]},
               {"name": "mr", "when": {"calling_aet": ["MR1"], "modality": ["MR"]}, "to": ["pacs2"]}],
        routing={"fallback": ["archive"]})
    port = engine.listeners[0].address[1]
    # One CT and one phantom over 1 MiB: scanned as they stream into their blob.
    cts = [image(tmp_path, f"ct{i}", pixel_bytes=1536 * 1024 if i == 0 else 4096) for i in range(3)]
    mrs = [image(tmp_path, f"mr{i}", "MR") for i in range(3)]
    phantoms = [image(tmp_path, f"qa{i}", institution=QA_SITE, pixel_bytes=1536 * 1024 if i else 4096)
                for i in range(2)]
    stray = image(tmp_path, "stray")
    storescu(port, "CT1", cts + phantoms)
    storescu(port, "MR1", mrs)
    storescu(port, "CT9", [stray])          # no rule for CT9: the fallback

    ct_uids, mr_uids = {uid_of(p) for p in cts}, {uid_of(p) for p in mrs}
    poll(lambda: len(pacs.received_files()) >= 3 and len(pacs2.received_files()) >= 3
         and archive.received_files(), timeout=60, message="every routed object delivered")
    assert received(pacs) == ct_uids and received(pacs2) == mr_uids
    assert received(archive) == {uid_of(stray)}
    # Everything is stored; the phantoms have no delivery, and nothing more arrives.
    table = routed(engine)
    assert len(table) == 9
    assert all(table[uid_of(p)] == [] for p in phantoms)
    assert holds(lambda: len(pacs.received_files()) == 3 and len(archive.received_files()) == 1, 1.0)

    audit = engine.store.reader().rows("audit", order_by="id")
    discarded = [a for a in audit if a["event"] == "discarded_by_rule"]
    assert len(discarded) == 2 and {a["status"] for a in discarded} == {"qa-phantoms"}
    assert {a["sop_instance_uid"] for a in discarded} == {uid_of(p) for p in phantoms}
    assert all(a["object_id"] and a["calling_ae"] == "CT1" for a in discarded)
    stored = {a["sop_instance_uid"]: a["detail"] for a in audit if a["event"] == "stored"}
    assert stored[uid_of(stray)].endswith("routes=1 (fallback)")
    assert all(stored[u].endswith("routes=1 (rule ct)") for u in ct_uids)

    # Counted per rule: in the snapshot the console reads, and in `mfconsole status`.
    expected = {"ct": (3, 0), "mr": (3, 0), "qa-phantoms": (0, 2)}
    snap = engine.snapshot()["routing"]
    assert {r["name"]: (r["sent"], r["discarded"]) for r in snap["rules"]} == expected
    assert (snap["fallback_sent"], snap["unrouted"]) == (1, 0)
    res = mfconsole("--config", str(engine.config.path), "status", "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)["routing"]
    assert {r["name"]: (r["sent"], r["discarded"]) for r in status["rules"]} == expected
    assert status["fallback"] == ["archive"] and status["fallback_sent"] == 1
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    assert "qa-phantoms" in text and "discarded       2" in text
    no_canary(engine)


def test_unrouted_objects_are_stored_and_audited(engine_factory, storescp, tmp_path):
    engine = engine_factory(destinations=[dest("pacs", storescp)], routes=[],
                            rules=[{"name": "mr-only", "when": {"modality": "MR"}, "to": ["pacs"]}],
                            routing={"fallback": []})
    ct = image(tmp_path, "ct")
    storescu(engine.listeners[0].address[1], "CT1", [ct])
    poll(lambda: [a for a in engine.store.reader().rows("audit") if a["event"] == "unrouted"],
         timeout=10, message="the unrouted audit row")
    assert routed(engine) == {uid_of(ct): []}
    assert engine.rule_counts.view()["unrouted"] == 1
    assert holds(lambda: not storescp.received_files(), 0.5)
    no_canary(engine)


def test_reload_changes_a_rule_for_the_next_object_on_the_same_association(
        engine_factory, storescp_factory, tmp_path):
    from pynetdicom import AE

    pacs, pacs2 = storescp_factory(ae_title="PACS", name="pacs"), storescp_factory(ae_title="PACS2", name="pacs2")
    engine = engine_factory(destinations=[dest("pacs", pacs), dest("pacs2", pacs2)], routes=[],
                            rules=[{"name": "ct", "when": {"modality": "CT", "institution_name": "A$"},
                                    "to": ["pacs"]}],
                            routing={"fallback": []})
    first, second = image(tmp_path, "first"), image(tmp_path, "second")
    ae = AE(ae_title="CT1")
    ae.add_requested_context(dicomgen.CT_IMAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", engine.listeners[0].address[1], ae_title="MF_SCP")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(first).Status == 0
        path = engine.config.path
        path.write_text(path.read_text().replace('to = ["pacs"]', 'to = ["pacs2"]'))
        res = mfconsole("--config", str(path), "reload")           # over the control socket
        assert res.returncode == 0, res.stderr
        assert "rules: 1 rule(s), match = first, fallback = []" in res.stdout
        assert assoc.is_established
        assert assoc.send_c_store(second).Status == 0
    finally:
        assoc.release()
    assert pacs.wait_for_files(1, timeout=30) and pacs2.wait_for_files(1, timeout=30)
    assert received(pacs) == {uid_of(first)} and received(pacs2) == {uid_of(second)}
    board = engine.board.snapshot()["recent"]
    assert [(b["calling_ae"], b["objects"], b["status"]) for b in board if b["direction"] == "in"] == \
        [("CT1", 2, "released")]
    assert engine.rule_counts.view()["rules"]["ct"]["sent"] == 2    # counts survive the reload
    no_canary(engine)


def test_a_bad_rule_on_reload_is_refused_and_the_running_rules_stay(engine_factory, storescp, tmp_path):
    engine = engine_factory(destinations=[dest("pacs", storescp)], routes=[],
                            rules=[{"name": "ct", "when": {"modality": "CT"}, "to": ["pacs"]}],
                            routing={"fallback": []})
    path = engine.config.path
    path.write_text(path.read_text().replace('"modality" = "CT"', '"study_description" = "(bad"'))
    report = engine.reload()
    assert report[0].startswith("refused") and "rules[0].when.study_description" in report[0]
    ct = image(tmp_path, "ct")
    storescu(engine.listeners[0].address[1], "CT1", [ct])
    assert storescp.wait_for_files(1, timeout=30)
    assert received(storescp) == {uid_of(ct)}

"""DICOM in, FHIR out, end to end: `storescu`-style associations store three series of
one study into the engine; a kind = "fhir" destination with trigger = "study_stable"
and the shipped study_to_imagingstudy handler on its route sends one ImagingStudy to
tests/fhir_server.py (which validates every resource as R4) once the study is quiet,
with the right series and instance counts. Resends keep it one: the same study again
is a duplicate (nothing sent); a corrected study (late_instance = "update") updates
that resource; an answer lost after the server applied the update is retried and
updates it again. No canary PHI reaches the engine's log or audit."""

from __future__ import annotations

import json
import shutil

from pydicom import dcmread
from pydicom.uid import generate_uid

from fhir_server import FhirServer, drop
from harness import CANARY_NAME, REPO, poll
from test_study_stable import counts, send_series, study_files, uids

STABLE_S = 2


def engine_to(engine_factory, folder, fhir: FhirServer):
    (folder / "engine" / "handlers").mkdir(parents=True)
    shutil.copy(REPO / "handlers" / "study_to_imagingstudy.py", folder / "engine" / "handlers")
    return engine_factory(
        destinations=[{"name": "ehr", "kind": "fhir", "url": fhir.url, "trigger": "study_stable",
                       "stable_after_s": STABLE_S, "late_instance": "update",
                       "retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2}],
        routes=[{"from": "modalities", "to": ["ehr"], "handler": "study_to_imagingstudy"}],
        egress={"allowed_tcp": [], "allowed_http": [fhir.url]})


def applied_then_dropped():
    """The server applies the update, then the connection drops before the answer."""
    class Unanswered:
        def reply(self, *args, **kwargs):
            pass

    def run(server, req, h):
        server.conditional_update(req, Unanswered())
        return drop()(server, req, h)
    return run


def test_a_study_becomes_one_imagingstudy_and_a_resend_updates_it(engine_factory, tmp_path):
    fhir = FhirServer().start()
    try:
        engine = engine_to(engine_factory, tmp_path, fhir)
        study = generate_uid()
        series = study_files(tmp_path / "in", study, 3, 2)
        for files in series:
            for f in files:                      # canary PHI in every header
                ds = dcmread(f)
                ds.PatientName = CANARY_NAME
                ds.save_as(f)
        port = engine.listeners[0].address[1]
        send_series(port, series, pause=STABLE_S * 0.4)   # pauses shorter than the quiet period
        assert fhir.puts() == []                           # held while the study is arriving
        poll(lambda: counts(engine, "ehr").get("delivered") == 6, timeout=STABLE_S + 20)

        put, = fhir.puts()
        assert put.query["identifier"] == [f"urn:dicom:uid|urn:oid:{study}"]
        (kind, _), = fhir.resources
        resource, = fhir.resources.values()
        assert kind == "ImagingStudy"
        assert resource["numberOfSeries"] == 3 and resource["numberOfInstances"] == 6
        assert {s["uid"] for s in resource["series"]} == {
            str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID) for files in series}
        assert sorted(i["uid"] for s in resource["series"] for i in s["instance"]) == sorted(
            uids([f for files in series for f in files]))

        # The modality sends the same study again: duplicates, routed nowhere new (in
        # the commit that answers them: no delivery, so nothing can be sent).
        send_series(port, series, pause=0)
        assert counts(engine, "ehr") == {"delivered": 6}
        assert len(engine.store.reader().rows("audit", event="duplicate")) == 6

        # ... and then corrected (new versions of every instance): held again, re-built
        # over the study, sent as a conditional update of the same resource.
        for files in series:
            for f in files:
                ds = dcmread(f)
                ds.StudyDescription = "corrected"
                ds.save_as(f)
        send_series(port, series, pause=0)
        poll(lambda: len(fhir.puts()) == 2, timeout=STABLE_S + 20)
        poll(lambda: counts(engine, "ehr").get("delivered") == 12, timeout=10)
        assert len(fhir.resources) == 1
        again, = fhir.resources.values()
        assert again["id"] == resource["id"] and again["description"] == "corrected"
        assert again["numberOfSeries"] == 3 and again["numberOfInstances"] == 6
        assert [r.status for r in fhir.puts()] == [201, 200]

        log = (tmp_path / "engine").rglob("*.log")
        assert all(CANARY_NAME not in p.read_text(errors="replace") for p in log)
        assert CANARY_NAME not in json.dumps(engine.store.reader().rows("audit"), default=str)
    finally:
        fhir.stop()



def test_an_update_whose_answer_was_lost_is_sent_again_and_stays_one_resource(engine_factory, tmp_path):
    fhir = FhirServer().start().script(applied_then_dropped())
    try:
        engine = engine_to(engine_factory, tmp_path, fhir)
        study = generate_uid()
        series = study_files(tmp_path / "in", study, 2, 2)
        send_series(engine.listeners[0].address[1], series, pause=0)
        poll(lambda: counts(engine, "ehr").get("delivered") == 4, timeout=STABLE_S + 20)
        first, second = fhir.puts()
        assert first.body == second.body and first.query == second.query
        assert second.status == 200                   # the retry found the applied one
        resource, = fhir.resources.values()
        assert resource["numberOfInstances"] == 4
    finally:
        fhir.stop()

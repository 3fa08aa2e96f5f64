"""Study-stable delivery end to end (trigger = "study_stable"): three series of one
study stored with pauses shorter than stable_after_s go out together once the study is
quiet — one STOW request (tests/stow_server.py records requests) and every instance
in Orthanc; a DIMSE peer (DCMTK storescp) gets nothing before the quiet period; a
late instance follows late_instance ("alone" / "update"); kill -9 of `mfconsole serve`
while held loses nothing and keeps the timer; a study-level handler makes one HL7
message per study for an MLLP peer (tests/mllp_peer.py), and one again, over the
whole study, for a late group with late_instance = "update". status --json counts
held deliveries and shows the held studies."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

import dicomgen
from harness import holds, mfconsole, poll, store_files
from mfconsole.config import DestinationConfig, DestinationKind
from mllp_peer import MllpPeer
from test_forward_dimse import dimse_dest
from test_forward_mllp import ehr_dest

STABLE_S = 2
FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "connect_timeout_s": 2}


def study_files(folder: Path, study: str, series: int, per_series: int) -> list[list[Path]]:
    """``series`` series of ``per_series`` small CT images each, all of one study."""
    out = []
    for s in range(series):
        files = []
        series_uid = generate_uid()
        for i in range(per_series):
            ds = dicomgen.make_image(study, pixel_bytes=2048)
            ds.SeriesInstanceUID = series_uid
            files.append(dicomgen.save(ds, folder / f"s{s}i{i}.dcm"))
        out.append(files)
    return out


def uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def held_stow(url: str, name: str = "web", **extra) -> dict:
    return {"name": name, "kind": "stow", "url": url, "trigger": "study_stable",
            "stable_after_s": STABLE_S, **FAST, **extra}


def counts(engine, destination: str) -> dict[str, int]:
    return engine.store.reader().delivery_counts(destination).get(destination, {})


def send_series(port: int, series: list[list[Path]], pause: float) -> float:
    """Each series over its own association, ``pause`` between them; the time the last
    one was answered."""
    for n, files in enumerate(series):
        if n:
            time.sleep(pause)
        store_files(port, files)
    return time.time()


def test_three_series_go_out_as_one_stow_request_after_the_quiet_period(
        engine_factory, stow_server, orthanc, tmp_path):
    stable = 5     # room for two CLI runs while it is held
    web = stow_server()
    engine = engine_factory(destinations=[held_stow(web.url, stable_after_s=stable),
                                          held_stow(orthanc.dicomweb_url, "archive", stable_after_s=stable)])
    study = generate_uid()
    series = study_files(tmp_path / "in", study, 3, 3)
    everything = uids([f for s in series for f in s])
    port = engine.listeners[0].address[1]
    last = send_series(port, series, pause=stable * 0.4)      # shorter than the quiet period
    # Stored and routed, nothing sent: every delivery is held until the study is quiet.
    assert counts(engine, "web") == {"held": 9} and counts(engine, "archive") == {"held": 9}
    status = json.loads(mfconsole("--config", str(engine.config.path), "status", "--json").stdout)
    web_status = {d["name"]: d for d in status["destinations"]}["web"]
    assert web_status["counts"] == {"held": 9}
    held, = web_status["held_studies"]
    assert held["study_uid"] == study and held["objects"] == 9
    assert 0 < held["seconds_to_release"] <= stable
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    assert re.search(r"web .* held +9", text) and f"study {study}: 9 object(s), release" in text
    assert web.posts() == []
    poll(lambda: counts(engine, "web").get("delivered") == 9, timeout=stable + 15)
    post, = web.posts()                              # one request for the whole study
    assert set(post.uids) == everything
    assert post.at >= last + stable - 0.05         # not before the quiet period
    poll(lambda: orthanc.count() == 9, timeout=20)
    assert set(orthanc.sop_instance_uids()) == everything
    assert counts(engine, "archive") == {"delivered": 9}
    assert engine.store.reader().held_studies() == []
    text = mfconsole("--config", str(engine.config.path), "status").stdout
    assert re.search(r"web .* held +0", text) and "0 studies held" in text


def test_a_straggler_after_release_goes_alone(engine_factory, stow_server, tmp_path):
    web = stow_server()
    engine = engine_factory(destinations=[held_stow(web.url)])
    study = generate_uid()
    first, late = study_files(tmp_path / "in", study, 2, 2)
    port = engine.listeners[0].address[1]
    store_files(port, first)
    poll(lambda: counts(engine, "web").get("delivered") == 2, timeout=STABLE_S + 15)
    store_files(port, late[:1])
    poll(lambda: counts(engine, "web").get("delivered") == 3, timeout=10)
    assert [set(p.uids) for p in web.posts()] == [uids(first), uids(late[:1])]
    # Never held: no second release, and the study's hold stays ended.
    reads = engine.store.reader()
    assert len(reads.rows("audit", event="study_released")) == 1
    assert reads.rows("study_holds")[0]["release_at"] is None


def test_a_straggler_with_update_is_held_again_and_its_group_goes_together(
        engine_factory, stow_server, tmp_path):
    web = stow_server()
    engine = engine_factory(destinations=[held_stow(web.url, late_instance="update")])
    study = generate_uid()
    first, late = study_files(tmp_path / "in", study, 2, 3)
    port = engine.listeners[0].address[1]
    store_files(port, first)
    poll(lambda: counts(engine, "web").get("delivered") == 3, timeout=STABLE_S + 15)
    store_files(port, late[:2])
    time.sleep(STABLE_S * 0.4)
    last = send_series(port, [late[2:]], 0)
    assert counts(engine, "web") == {"delivered": 3, "held": 3}
    poll(lambda: counts(engine, "web").get("delivered") == 6, timeout=STABLE_S + 15)
    assert [set(p.uids) for p in web.posts()] == [uids(first), uids(late)]
    assert web.posts()[1].at >= last + STABLE_S - 0.05


def test_a_dimse_peer_gets_the_study_after_the_quiet_period_and_nothing_before(
        engine_factory, storescp_factory, tmp_path):
    scp = storescp_factory()
    engine = engine_factory(destinations=[dimse_dest(scp.port, trigger="study_stable",
                                                     stable_after_s=STABLE_S)])
    study = generate_uid()
    series = study_files(tmp_path / "in", study, 3, 2)
    last = send_series(engine.listeners[0].address[1], series, pause=STABLE_S * 0.4)
    assert holds(lambda: scp.received_files() == [], seconds=max(0.1, last + STABLE_S - 0.3 - time.time()))
    poll(lambda: counts(engine, "pacs").get("delivered") == 6, timeout=STABLE_S + 15)
    got = scp.wait_for_files(6)
    assert uids(got) == uids([f for s in series for f in s])


def test_kill9_while_held_loses_nothing_and_keeps_the_timer(serve_factory, stow_server, tmp_path):
    stable = 8
    web = stow_server()
    serve = serve_factory(destinations=[held_stow(web.url, stable_after_s=stable)])
    study = generate_uid()
    series = study_files(tmp_path / "in", study, 2, 3)
    send_series(serve.port, series, pause=0.5)
    with serve.db() as reads:
        hold, = reads.held_studies("web")
        assert reads.delivery_counts("web") == {"web": {"held": 6}}
    serve.kill9()
    # Down for a while: a timer restarted from zero would release at restart + 8 s.
    time.sleep(3)
    serve.start()
    with serve.db() as reads:
        assert reads.held_studies("web") == [hold]            # the same release time
    poll(lambda: len(web.posts()) == 1, timeout=stable + 10)
    post, = web.posts()
    assert set(post.uids) == uids([f for s in series for f in s])
    assert hold["release_at"] - 0.05 <= post.at < hold["release_at"] + 2.5
    with serve.db() as reads:
        poll(lambda: reads.delivery_counts("web") == {"web": {"delivered": 6}}, timeout=10)


STUDY_HANDLER = '''
VERSION = "1.0.0"
LEVEL = "study"

from mfconsole.hl7.message import HL7Message, msh_segment, segment


def handle_study(study, ctx):
    uids = [obj.sop_instance_uid for obj in study]
    first = study[0].dataset
    return HL7Message([
        msh_segment(ctx.sending_application, ctx.sending_facility, ctx.receiving_application,
                    ctx.receiving_facility, ctx.now().strftime("%Y%m%d%H%M%S"), "", ["ORU", "R01"],
                    ctx.message_control_id, ctx.processing_id, "2.5.1"),
        segment("ZST", str(first.StudyInstanceUID), str(len(uids)), " ".join(uids)),
    ])
'''


def with_study_handler(folder: Path) -> None:
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    (folder / "handlers" / "study_msg.py").write_text(STUDY_HANDLER)


def zst(message: str) -> list[str]:
    line, = [s for s in message.replace("\n", "\r").split("\r") if s.startswith("ZST|")]
    return line.split("|")


@pytest.mark.parametrize("late", ["alone", "update"])
def test_a_study_level_handler_makes_one_hl7_message_per_study(engine_factory, tmp_path, late):
    peer = MllpPeer(tmp_path / "ehr").start()
    try:
        with_study_handler(tmp_path / "engine")
        engine = engine_factory(
            destinations=[ehr_dest(peer.port, trigger="study_stable", stable_after_s=STABLE_S,
                                   late_instance=late)],
            routes=[{"from": "modalities", "to": ["ehr"], "handler": "study_msg"}])
        study = generate_uid()
        first, more = study_files(tmp_path / "in", study, 2, 3)
        port = engine.listeners[0].address[1]
        send_series(port, [first, more[:2]], pause=STABLE_S * 0.4)
        poll(lambda: counts(engine, "ehr").get("delivered") == 5, timeout=STABLE_S + 15)
        got, = peer.received()
        fields = zst(got["message"])
        assert fields[1] == study and fields[2] == "5"
        assert set(fields[3].split(" ")) == uids(first + more[:2])
        rows = engine.store.reader().rows("deliveries", destination="ehr")
        # One message stands for the five deliveries: the first one's control id.
        assert got["control_id"] == f"MF{rows[0]['id']:012d}"
        assert {r["handler_version"] for r in rows} == {"1.0.0"}
        # A late instance: alone, a message of its own; update, the whole study again.
        store_files(port, more[2:])
        poll(lambda: counts(engine, "ehr").get("delivered") == 6, timeout=STABLE_S + 15)
        second = peer.received()[1]
        fields = zst(second["message"])
        if late == "alone":
            assert fields[2] == "1" and set(fields[3].split(" ")) == uids(more[2:])
        else:
            assert fields[2] == "6" and set(fields[3].split(" ")) == uids(first + more)
        assert len(peer.received()) == 2
    finally:
        peer.stop()


def test_a_reload_to_trigger_instance_releases_what_was_held(engine_factory, stow_server, tmp_path):
    from harness import write_config

    web = stow_server()
    dest = held_stow(web.url, stable_after_s=3600)           # would hold for an hour
    engine = engine_factory(destinations=[dest])
    study = generate_uid()
    series = study_files(tmp_path / "in", study, 2, 2)
    send_series(engine.listeners[0].address[1], series, pause=0)
    assert counts(engine, "web") == {"held": 4}
    assert holds(lambda: web.posts() == [], seconds=0.5)
    port = engine.config.listeners[0].port
    switched = {k: v for k, v in dest.items() if k not in ("trigger", "stable_after_s")}
    write_config(tmp_path / "engine", port=port, destinations=[switched])
    report = engine.reload(actor="test")
    assert "destination web: updated" in report
    poll(lambda: counts(engine, "web") == {"delivered": 4}, timeout=15)
    post, = web.posts()                          # released together, sent together
    assert set(post.uids) == uids([f for s in series for f in s])
    assert engine.store.reader().held_studies() == []
    released, = engine.store.reader().rows("audit", event="study_released")
    assert "no longer study-stable" in released["detail"] and study in released["detail"]


def test_removing_a_study_stable_destination_queues_what_it_held(engine_factory, stow_server, tmp_path):
    from harness import write_config

    web = stow_server()
    other = stow_server()
    engine = engine_factory(destinations=[held_stow(web.url, stable_after_s=3600),
                                          held_stow(other.url, "other", stable_after_s=3600)])
    series = study_files(tmp_path / "in", generate_uid(), 1, 3)
    send_series(engine.listeners[0].address[1], series, pause=0)
    write_config(tmp_path / "engine", port=engine.config.listeners[0].port,
                 destinations=[held_stow(other.url, "other", stable_after_s=3600)])
    report = engine.reload(actor="test")
    assert any("destination web: removed (its queue stays in the store); its 3 held deliveries "
               "were queued" in line for line in report), report
    assert counts(engine, "web") == {"pending": 3}            # its queue, as before
    assert counts(engine, "other") == {"held": 3}             # untouched


# -- a toy kind that produces "fhir": the study-level handler's dict, as the contract says

class FhirToySender:
    """Records each Outbound it is given (the contract's sender shape)."""
    max_batch = (1, 0)
    in_order = False
    received: list = []

    def __init__(self, dest):
        self.dest = dest

    def prepare(self, items):
        return None

    def send_many(self, objs):
        from mfconsole.contract import DELIVERED, Outcome

        FhirToySender.received += objs
        return [Outcome(DELIVERED, status="200", reason="stored") for _ in objs]

    def close(self):
        pass

    def close_if_idle(self, idle_s):
        pass


FHIR_HANDLER = '''
VERSION = "0.1.0"
LEVEL = "study"


def handle_study(study, ctx):
    first = study[0].dataset
    return {"resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:" + str(first.StudyInstanceUID)}],
            "numberOfInstances": len(study),
            "series": sorted({str(o.dataset.SeriesInstanceUID) for o in study})}
'''


@dataclass(frozen=True, kw_only=True)
class FhirToy(DestinationConfig):
    kind: ClassVar[str] = "fhirtoy"


@pytest.fixture
def fhir_kind():
    from mfconsole.kinds import REGISTRY

    kind = DestinationKind(FhirToy, doc="FHIR resources, recorded", produces="fhir",
                           sender=lambda d, checks: FhirToySender(d), target=lambda d: "memory")
    REGISTRY.register(kind)
    FhirToySender.received = []
    try:
        yield kind
    finally:
        REGISTRY.unregister("fhirtoy")


def test_a_study_level_handler_makes_one_fhir_resource_per_study(fhir_kind, engine_factory, tmp_path):
    (tmp_path / "engine" / "handlers").mkdir(parents=True)
    (tmp_path / "engine" / "handlers" / "imaging_study.py").write_text(FHIR_HANDLER)
    engine = engine_factory(
        destinations=[{"name": "fhir", "kind": "fhirtoy", "trigger": "study_stable",
                       "stable_after_s": STABLE_S}],
        routes=[{"from": "modalities", "to": ["fhir"], "handler": "imaging_study"}])
    study = generate_uid()
    series = study_files(tmp_path / "in", study, 3, 2)
    send_series(engine.listeners[0].address[1], series, pause=STABLE_S * 0.3)
    poll(lambda: counts(engine, "fhir").get("delivered") == 6, timeout=STABLE_S + 15)
    sent, = FhirToySender.received
    assert (sent.sop_class_uid, sent.sop_instance_uid, sent.study_uid) == ("", study, study)
    assert sent.transfer_syntax == "application/fhir+json"
    resource = json.loads(sent.data.decode("utf-8"))
    assert b": " not in sent.data and b", " not in sent.data          # compact
    assert resource["numberOfInstances"] == 6 and len(resource["series"]) == 3
    assert resource["identifier"][0]["value"] == f"urn:oid:{study}"

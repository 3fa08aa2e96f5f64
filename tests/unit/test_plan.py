"""The routing plan (mfconsole/engine/plan.py, `mfconsole reload --plan`): objects
ingested through a real in-process engine (its own ingest path: routing, commit, audit
words), then a changed config.toml replayed over them through the engine's control
service and, with the engine stopped, offline with the key file. No peer: the
destinations are paused, and nothing may be sent or created by a plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harness import CANARY_ID, CANARY_NAME, poll, run, write_config
from mfconsole.dimse.dataset_scan import scan_dataset
from mfconsole.engine import plan as plan_mod

CT = "1.2.840.10008.5.1.4.1.1.2"
SITE = "QA Phantom Site"          # a header value a rule matches: never in a plan's output
DESTS = [{"name": n, "kind": "dimse", "host": "127.0.0.1", "port": p, "ae_title": n.upper()}
         for n, p in (("pacs", 11113), ("archive", 11114), ("research", 11115))]
OLD_RULES = [{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"]}]
FALLBACK = {"fallback": ["archive"]}
KEEP_EVEN = 'VERSION = "{v}"\n\ndef handle(obj, ctx):\n    n = int(obj.dataset.get("SeriesNumber", 0))\n' \
            '    return None if n % {m} else obj.dataset\n'


def dataset(i: int, institution: str = "Hospital A") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber = "CT", i
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    ds.InstitutionName = institution
    return ds


def ingest(engine, ds: Dataset, calling: str) -> Any:
    """An object through the engine's own ingest (as a listener hands it over)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    data = fp.getvalue()
    summary = scan_dataset(data, ExplicitVRLittleEndian, wanted=engine.header_tags)
    meta = {"listener": "modalities", "calling_ae": calling, "called_ae": "MF_SCP",
            "peer": "127.0.0.1:50000", "transfer_syntax": ExplicitVRLittleEndian}
    return engine.begin_ingest(data, summary, meta).result(timeout=20)


@pytest.fixture
def setup(engine_factory, tmp_path):
    """An engine routing by OLD_RULES with every destination paused, and 20 objects:
    10 from CT1 (4 of them QA phantoms), 10 from MR1."""
    engine = engine_factory(destinations=DESTS, routes=[], rules=OLD_RULES, routing=FALLBACK)
    for name in ("pacs", "archive", "research"):
        engine.control.service.call("pause", {"destination": name})
    for i in range(10):
        ingest(engine, dataset(i, SITE if i < 4 else "Hospital A"), "CT1")
    for i in range(10):
        ingest(engine, dataset(i), "MR1")
    return engine


def rewrite(engine, **kw: Any) -> Path:
    """config.toml of the engine rewritten (same listener port, same data)."""
    args = {"destinations": DESTS, "routes": [], "rules": OLD_RULES, "routing": FALLBACK}
    args.update(kw)
    return write_config(engine.config.path.parent, port=engine.config.listeners[0].port, **args)


NEW_RULES = [{"name": "qa", "when": {"institution_name": "^QA Phantom"}, "action": "discard"},
             {"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"]},
             {"name": "mr", "when": {"calling_aet": ["MR1"]}, "to": ["pacs", "research"]}]


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def state(engine) -> tuple:
    reads = engine.store.reader()
    return (json.dumps(reads.rows("deliveries")), len(reads.rows("objects")), engine.config,
            engine.router)


def test_a_changed_rule_counts_per_destination_rule_discard_and_sends_nothing(setup):
    engine = setup
    before = state(engine)
    rewrite(engine, rules=NEW_RULES)
    plan = engine.control.service.call("plan", {"hours": 1})
    assert plan["error"] is None and plan["objects"] == 20 and plan["changed"]
    d = by_name(plan["destinations"])
    # pacs: 10 CT1 before; after, 6 CT1 (4 phantoms discarded) and 10 MR1.
    assert (d["pacs"]["added"], d["pacs"]["removed"], d["pacs"]["unchanged"]) == (10, 4, 6)
    assert (d["archive"]["added"], d["archive"]["removed"], d["archive"]["unchanged"]) == (0, 10, 0)
    assert (d["research"]["added"], d["research"]["removed"]) == (10, 0)
    assert (plan["discarded"]["before"], plan["discarded"]["after"], plan["discarded"]["added"]) == (0, 4, 4)
    assert plan["unrouted"]["added"] == plan["unrouted"]["removed"] == 0
    rules = by_name(plan["rules"])
    assert (rules["ct"]["before"], rules["ct"]["after"]) == (10, 6)
    assert (rules["qa"]["after"], rules["qa"]["new"]) == (4, True)
    assert (rules["mr"]["after"], rules["(fallback)"]["before"], rules["(fallback)"]["after"]) == (10, 10, 0)
    assert plan["changed_objects"] == 14
    text = "\n".join(plan["lines"])
    assert "pacs" in text and "+10 / -4" in text and "research" in text
    # Nothing sent, created or reloaded; one audit row, with counts and no value.
    assert state(engine) == before
    rows = poll(lambda: [a for a in engine.store.reader().rows("audit") if a["event"] == "routing_plan"],
                message="the routing_plan audit row")
    assert len(rows) == 1 and rows[0]["status"] == "changes" and rows[0]["actor"]
    assert "20 object(s)" in rows[0]["detail"]
    assert not [a for a in engine.store.reader().rows("audit") if a["event"] in ("reloaded", "delivered")]


def test_samples_are_routing_safe(setup):
    engine = setup
    rewrite(engine, rules=NEW_RULES)
    plan = engine.control.service.call("plan", {})
    text = json.dumps(plan)
    for value in (CANARY_NAME, CANARY_ID, SITE, "Hospital A"):
        assert value not in text
    samples = by_name(plan["destinations"])["pacs"]["samples"]
    assert set(samples) == {"added", "removed"} and len(samples["added"]) == plan_mod.SAMPLES
    assert set(samples["added"][0]) == {"id", "received_at", "listener", "calling_ae", "modality",
                                        "sop_class", "sop_instance_uid"}
    assert samples["added"][0]["calling_ae"] == "MR1" and samples["added"][0]["sop_class"] == "CT Image Storage"
    assert len(plan["discarded"]["samples"]["added"]) == 3
    log = (engine.data_dir / "logs" / "mfconsole.log").read_text()
    assert CANARY_NAME not in log and SITE not in log


def test_an_unchanged_config_plans_no_change(setup):
    engine = setup
    plan = engine.control.service.call("plan", {"hours": 24})
    assert plan["changed"] is False and plan_mod.exit_code(plan) == plan_mod.EXIT_SAME
    assert all(not d["added"] and not d["removed"] for d in plan["destinations"])
    assert plan["lines"][-1] == "a reload would change nothing for these objects"


def test_unrouted_objects_are_counted(setup):
    engine = setup
    rewrite(engine, routing={"fallback": []})          # MR1 objects: nowhere
    plan = engine.control.service.call("plan", {})
    assert (plan["unrouted"]["before"], plan["unrouted"]["after"], plan["unrouted"]["added"]) == (0, 10, 10)
    assert by_name(plan["destinations"])["archive"]["removed"] == 10
    assert plan_mod.exit_code(plan) == plan_mod.EXIT_CHANGED


def test_handlers_run_from_disk_count_what_they_filter_and_are_capped(setup):
    engine = setup
    folder = engine.config.path.parent / "handlers"
    folder.mkdir(exist_ok=True)
    (folder / "keep_even.py").write_text(KEEP_EVEN.format(v="1.0", m=2))
    rewrite(engine, rules=[*OLD_RULES[:0],
                           {"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"],
                            "handler": "keep_even"}])
    plan = engine.control.service.call("plan", {})
    pacs = by_name(plan["destinations"])["pacs"]
    # 10 CT1 objects, series numbers 0..9: the odd five filtered; none sent anywhere.
    assert (pacs["handler_runs"], pacs["filtered"], pacs["errors"]) == (10, 5, 0)
    assert pacs["handler_changed"] == 10 and pacs["handler_changes"] == {"none -> keep_even": 10}
    assert pacs["outcome_changed"] == 5 and len(pacs["samples"]["filtered"]) == 3
    assert by_name(plan["handlers"])["keep_even"]["on_disk"].startswith("keep_even 1.0")
    # The handler was never installed in the engine.
    assert "keep_even" not in engine.handlers.active()
    # At most handler_cap runs per destination, said.
    with engine.control.service._reading() as reads:
        capped = plan_mod.compute(engine.config.path, plan_mod.RunningBaseline(engine.config, {}), reads,
                                  plan_mod.Objects(reads, engine.store.vault, engine.store.blob_root),
                                  handler_cap=3)
    pacs = by_name(capped["destinations"])["pacs"]
    assert (pacs["handler_runs"], pacs["handler_not_run"]) == (3, 7)
    assert "run on 3 of 10 (at most 3)" in "\n".join(plan_mod.render(capped))


def test_a_handler_error_is_counted_with_a_routing_safe_reason(setup):
    engine = setup
    folder = engine.config.path.parent / "handlers"
    folder.mkdir(exist_ok=True)
    (folder / "broken.py").write_text('VERSION = "1"\n\ndef handle(obj, ctx):\n'
                                      '    raise KeyError(str(obj.dataset.PatientName))\n')
    rewrite(engine, rules=[{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"],
                            "handler": "broken"}])
    plan = engine.control.service.call("plan", {})
    pacs = by_name(plan["destinations"])["pacs"]
    assert pacs["errors"] == 10 and pacs["error_reasons"] == ["handler broken 1 raised KeyError at broken.py line 4"]
    assert CANARY_NAME not in json.dumps(plan)


def test_a_config_that_does_not_load_is_named_with_its_key_paths(setup):
    engine = setup
    rewrite(engine, rules=[{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacss"]}])
    plan = engine.control.service.call("plan", {})
    assert plan_mod.exit_code(plan) == plan_mod.EXIT_TROUBLE
    assert ["rules[0].to[0]", "names no destination ('pacss'); did you mean 'pacs'?"] in plan["error"]["problems"]
    assert "rules[0].to[0]: names no destination" in "\n".join(plan["lines"])
    row = poll(lambda: [a for a in engine.store.reader().rows("audit") if a["event"] == "routing_plan"],
               message="the routing_plan audit row")[-1]
    assert row["status"] == "invalid"
    # The command line says the same, before it asks anything of the engine, exit 2.
    res = run([sys.executable, "-m", "mfconsole", "--config", str(engine.config.path), "reload",
               "--plan", "--json"])
    assert res.returncode == 2, res.stderr
    assert ["rules[0].to[0]", "names no destination ('pacss'); did you mean 'pacs'?"] in \
        json.loads(res.stdout)["error"]["problems"]


def test_hours_are_checked_and_older_objects_left_out(setup):
    engine = setup
    with pytest.raises(Exception, match="hours must be more than 0"):
        engine.control.service.call("plan", {"hours": 0})
    with engine.control.service._reading() as reads:
        later = plan_mod.compute(engine.config.path, plan_mod.RunningBaseline(engine.config, {}), reads,
                                 plan_mod.Objects(reads, engine.store.vault, engine.store.blob_root),
                                 hours=1, now=engine.store.reader().rows("objects")[-1]["received_at"] + 7200)
        capped = plan_mod.compute(engine.config.path, plan_mod.RunningBaseline(engine.config, {}), reads,
                                  plan_mod.Objects(reads, engine.store.vault, engine.store.blob_root), cap=5)
    assert later["objects"] == 0 and later["total"] == 0
    assert (capped["objects"], capped["total"], capped["capped"]) == (5, 20, True)
    assert "only the newest 5 of 20" in "\n".join(plan_mod.render(capped))
    newest = engine.store.reader().rows("objects")[-5:]
    ids = {s["id"] for d in capped["destinations"] for found in d["samples"].values() for s in found}
    assert ids <= {o["id"] for o in newest}


def test_offline_the_plan_compares_with_what_each_object_got(setup):
    from mfconsole import ops
    from mfconsole.config import load

    engine = setup
    engine.stop()
    path = rewrite(engine, rules=NEW_RULES)
    plan = ops.routing_plan(load(path), 24, actor="tester")
    assert plan["baseline"].startswith("what each object got")
    d = by_name(plan["destinations"])
    assert (d["pacs"]["added"], d["pacs"]["removed"], d["archive"]["removed"], d["research"]["added"]) == \
        (10, 4, 10, 10)
    rules = by_name(plan["rules"])
    assert (rules["ct"]["before"], rules["ct"]["after"], rules["(fallback)"]["before"]) == (10, 6, 10)
    assert plan_mod.exit_code(plan) == plan_mod.EXIT_CHANGED
    # The command line, without an engine: the same counts, exit 1, one audit row more.
    res = run([sys.executable, "-m", "mfconsole", "--config", str(path), "reload", "--plan"])
    assert res.returncode == 1, res.stderr
    assert "+10 / -4" in res.stdout and CANARY_NAME not in res.stdout + res.stderr
    from mfconsole.repository import db_path, reading

    with reading(db_path(engine.data_dir)) as reads:
        rows = [a for a in reads.rows("audit") if a["event"] == "routing_plan"]
        assert [r["actor"] for r in rows][0] == "tester" and len(rows) == 2
        assert all(r["state"] == "pending" for r in reads.rows("deliveries"))


def test_the_words_of_a_stored_row_give_back_the_decision():
    got = {"routes": [("pacs", None)], "stored": "version=1 size=9 routes=1 (rules a, b.c)",
           "discarded": None, "unrouted": False}
    d = plan_mod.received_decision(got)
    assert d.rules == ("a", "b.c") and d.ruled and d.routes[0].destination == "pacs"
    d = plan_mod.received_decision({**got, "routes": [], "stored": "routes=0 (fallback (empty))",
                                    "unrouted": True})
    assert d.rules == () and d.ruled and not d.routes
    d = plan_mod.received_decision({**got, "stored": "version=1 size=9 routes=1"})
    assert not d.ruled
    d = plan_mod.received_decision({**got, "routes": [], "discarded": "qa"})
    assert d.discarded and d.rules == ("qa",)


def test_a_new_handler_version_on_disk_is_run_beside_the_running_one(engine_factory, tmp_path):
    folder = tmp_path / "engine" / "handlers"
    folder.mkdir(parents=True)
    (folder / "keep_even.py").write_text(KEEP_EVEN.format(v="1.0", m=2))
    rules = [{"name": "ct", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"], "handler": "keep_even"}]
    engine = engine_factory(destinations=DESTS, routes=[], rules=rules, routing=FALLBACK)
    engine.control.service.call("pause", {"destination": "pacs"})
    for i in range(10):
        ingest(engine, dataset(i), "CT1")
    (folder / "keep_even.py").write_text(KEEP_EVEN.format(v="2.0", m=3))     # config.toml unchanged
    plan = engine.control.service.call("plan", {})
    pacs = by_name(plan["destinations"])["pacs"]
    # Series 0..9: 1.0 filters the odd ones, 2.0 those not divisible by 3; 2, 3, 4, 8, 9 change.
    assert (pacs["added"], pacs["removed"], pacs["handler_changed"]) == (0, 0, 0)
    assert (pacs["handler_runs"], pacs["filtered"], pacs["outcome_changed"]) == (10, 6, 5)
    handler = by_name(plan["handlers"])["keep_even"]
    assert handler["changed"] and handler["running"].startswith("keep_even 1.0")
    assert handler["on_disk"].startswith("keep_even 2.0")
    assert plan_mod.exit_code(plan) == plan_mod.EXIT_CHANGED
    assert engine.handlers.get("keep_even").version == "1.0"          # still the running one


def test_a_rule_that_decides_nothing_yet_is_still_a_change(setup):
    engine = setup
    rewrite(engine, rules=[{"name": "us", "when": {"modality": ["US"]}, "to": ["research"]}, *OLD_RULES])
    plan = engine.control.service.call("plan", {})
    assert plan["changed_objects"] == 0 and plan_mod.exit_code(plan) == plan_mod.EXIT_CHANGED
    assert by_name(plan["rules"])["us"] == {"name": "us", "before": 0, "after": 0, "new": True, "gone": False}
    assert plan["lines"][-1] == "a reload would change rules or handlers, not what these objects get"


def test_a_changed_coercion_is_counted_per_destination(setup):
    engine = setup
    archive = {**DESTS[1], "coerce": [{"issuer_of_patient_id": "HOSP_A"}]}
    rewrite(engine, destinations=[DESTS[0], archive, DESTS[2]],
            rules=[{**OLD_RULES[0], "coerce": [{"prefix": "PatientID", "value": "A-"}]}])
    plan = engine.control.service.call("plan", {})
    d = by_name(plan["destinations"])
    assert (d["pacs"]["added"], d["pacs"]["removed"], d["pacs"]["coercion_changed"]) == (0, 0, 10)
    assert (d["archive"]["unchanged"], d["archive"]["coercion_changed"]) == (10, 10)
    assert plan["changed_objects"] == 0 and plan_mod.exit_code(plan) == plan_mod.EXIT_CHANGED
    assert "coercion changes 10" in "\n".join(plan["lines"])
    assert "HOSP_A" not in json.dumps(plan) and "A-" not in "\n".join(plan["lines"])

"""The object browser's engine side: every stored object with each destination's
state, filters and sorting, the per-object timeline, the audit trail, and the search by
accession number / patient ID on keyed hashes (never stored in clear, audited with the
actor), through the CLI (against a running engine and offline) and the control socket."""

from __future__ import annotations

import json
import time

import pytest
from dicomgen import make_sr, save
from harness import mfconsole, poll, store_files

from mfconsole.control import RO_SOCKET_NAME, SOCKET_NAME, ControlError, request
from mfconsole.repository import db_path, reading


def _cli(config, *args: str) -> object:
    result = mfconsole(*args, "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def stored(engine, tmp_path):
    """Three SRs: two of accession AB-1 / patient PAT-7, one of CD-2 / PAT-8."""
    files = []
    for i, (accession, patient) in enumerate((("AB-1", "PAT-7"), ("AB-1", "PAT-7"), ("CD-2", "PAT-8"))):
        ds = make_sr(patient_id=patient)
        ds.AccessionNumber = accession
        files.append(save(ds, tmp_path / "in" / f"{i}.dcm"))
    uids = store_files(engine.listeners[0].address[1], files)
    return engine, uids


def test_objects_list_newest_first_with_each_destinations_state(stored):
    engine, uids = stored
    listed = _cli(engine.config.path, "objects", "list")
    assert listed["total"] == 3
    assert [r["sop_instance_uid"] for r in listed["rows"]] == uids[::-1]
    assert all(r["deliveries"].startswith("pacs=") for r in listed["rows"])
    assert {r["calling_ae"] for r in listed["rows"]} == {"MODALITY"}

    ascending = _cli(engine.config.path, "objects", "list", "--sort", "sop_instance_uid", "--ascending")
    assert [r["sop_instance_uid"] for r in ascending["rows"]] == sorted(uids)
    page = _cli(engine.config.path, "objects", "list", "--limit", "1", "--offset", "1")
    assert [r["sop_instance_uid"] for r in page["rows"]] == [uids[1]] and page["total"] == 3
    assert _cli(engine.config.path, "objects", "list", "--calling-ae", "OTHER")["total"] == 0
    assert _cli(engine.config.path, "objects", "list", "--since", "1h", "--destination", "pacs")["total"] == 3
    assert _cli(engine.config.path, "objects", "list", "--until", "1h")["total"] == 0
    bad = mfconsole("objects", "list", "--since", "yesterday-ish", "--config", str(engine.config.path))
    assert bad.returncode != 0 and "is not a time" in bad.stderr


def test_search_by_accession_and_patient_id_on_keyed_hashes_is_audited(stored):
    engine, uids = stored
    found = _cli(engine.config.path, "objects", "list", "--accession", " ab-1 ")
    assert sorted(r["sop_instance_uid"] for r in found["rows"]) == sorted(uids[:2])
    found = _cli(engine.config.path, "objects", "list", "--patient-id", "PAT-8")
    assert [r["sop_instance_uid"] for r in found["rows"]] == [uids[2]]
    assert _cli(engine.config.path, "objects", "list", "--accession", "AB-2")["total"] == 0

    def searches():
        return engine.store.reader().rows("audit", event="identifier_search")
    rows = poll(lambda: len(searches()) == 3 and searches(), message="three audited searches")
    assert all(r["actor"] and "uid " in r["actor"] and "control socket" in r["actor"] for r in rows)
    assert ["2 found", "1 found", "0 found"] == [r["detail"].rsplit(": ", 1)[1] for r in rows]
    # The identifiers are nowhere in clear: not in the audit, not in the database file.
    db = db_path(engine.data_dir)
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    for value in (b"AB-1", b"CD-2", b"PAT-7", b"PAT-8"):
        assert value not in raw
    assert not any("AB-1" in (r["detail"] or "") or "PAT" in (r["detail"] or "") for r in rows)


def test_the_timeline_shows_reception_storage_and_each_delivery(stored):
    engine, uids = stored
    obj = engine.store.reader().rows("objects", sop_instance_uid=uids[0])[0]
    poll(lambda: engine.store.reader().rows("audit", event="retry_scheduled", object_id=obj["id"]),
         message="a first delivery attempt (the destination does not answer)")
    timeline = _cli(engine.config.path, "objects", "show", str(obj["id"]))
    assert timeline["object"]["sop_instance_uid"] == uids[0]
    assert [d["destination"] for d in timeline["deliveries"]] == ["pacs"]
    events = [e["event"] for e in timeline["events"]]
    assert events[0] == "stored" and "retry_scheduled" in events
    text = mfconsole("objects", "show", str(obj["id"]), "--config", str(engine.config.path))
    assert text.returncode == 0 and uids[0] in text.stdout and "delivery" in text.stdout
    missing = mfconsole("objects", "show", "999999", "--config", str(engine.config.path))
    assert missing.returncode != 0 and "no object with id 999999" in missing.stderr


def test_audit_lists_newest_first_with_filters(stored):
    engine, _ = stored
    rows = _cli(engine.config.path, "audit", "--event", "stored")
    assert len(rows) == 3 and rows[0]["id"] > rows[-1]["id"]
    assert _cli(engine.config.path, "audit", "--event", "stored", "--since", "1d", "--limit", "2").__len__() == 2
    assert _cli(engine.config.path, "audit", "--text", "version=1", "--event", "stored").__len__() == 3


def test_a_read_only_connection_browses_but_cannot_search_by_patient_identifiers(stored):
    engine, uids = stored
    ro = engine.data_dir / RO_SOCKET_NAME
    assert request(ro, "objects", {"limit": 2})["total"] == 3
    assert request(ro, "audit", {"filters": {"event": "stored"}})
    with pytest.raises(ControlError, match="read-only"):
        request(ro, "find_objects", {"accession": "AB-1"})
    result = request(engine.data_dir / SOCKET_NAME, "find_objects", {"accession": "AB-1"})
    assert result["total"] == 2
    with pytest.raises(ControlError, match="unknown object filter"):
        request(ro, "objects", {"filters": {"patient_name": "x"}})


def test_search_offline_uses_the_store_key_and_writes_its_audit(stored):
    engine, uids = stored
    config = engine.config.path
    engine.stop()
    found = _cli(config, "objects", "list", "--accession", "CD-2")
    assert [r["sop_instance_uid"] for r in found["rows"]] == [uids[2]]
    with reading(db_path(engine.data_dir)) as reads:
        row, = reads.rows("audit", event="identifier_search")
    assert row["actor"] and "CLI" in row["actor"] and "1 found" in row["detail"]
    assert time.time() - row["ts"] < 60

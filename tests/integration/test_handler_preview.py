"""Preview a handler on a stored object (by object id, as the object browser does):
first what it changes, tag by tag, with no value; the values only when asked, as an
audited reveal; never on a read-only connection."""

from __future__ import annotations

import json

import pytest
from dicomgen import make_sr, save
from harness import CANARY_ID, CANARY_NAME, poll, store_files

from mfconsole.control import RO_SOCKET_NAME, SOCKET_NAME, ControlError, request

COERCE = '''VERSION = "1.0"


def handle(obj, ctx):
    ds = obj.dataset
    ds.InstitutionName = "MFCONSOLE TEST SITE"
    del ds.PatientBirthDate
    return ds
'''


@pytest.fixture
def stored(engine_factory, tmp_path):
    (tmp_path / "engine" / "handlers").mkdir(parents=True)
    (tmp_path / "engine" / "handlers" / "coerce.py").write_text(COERCE)
    engine = engine_factory(routes=[{"from": "modalities", "to": ["pacs"], "handler": "coerce"}])
    store_files(engine.listeners[0].address[1], [save(make_sr(), tmp_path / "in" / "sr.dcm")])
    object_id = engine.store.reader().rows("objects")[0]["id"]
    return engine, object_id


def test_the_structure_first_then_the_values_as_an_audited_reveal(stored):
    engine, object_id = stored
    sock = engine.data_dir / SOCKET_NAME
    result = request(sock, "preview_handler", {"name": "coerce", "object_id": object_id})
    assert result["kind"] == "dicom" and result["object_id"] == object_id
    changes = {(c["tag"], c["keyword"], c["change"]) for c in result["changes"]}
    assert changes == {("(0008,0080)", "InstitutionName", "added"),
                       ("(0010,0030)", "PatientBirthDate", "removed")}
    shown = json.dumps(result)
    for value in ("MFCONSOLE TEST SITE", "19700101", CANARY_NAME, CANARY_ID):
        assert value not in shown
    assert not engine.store.reader().rows("audit", event="phi_revealed")

    revealed = request(sock, "preview_handler", {"name": "coerce", "object_id": object_id, "reveal": True})
    assert "MFCONSOLE TEST SITE" in revealed["text"] and "19700101" in revealed["text"]
    audit, = poll(lambda: engine.store.reader().rows("audit", event="phi_revealed"),
                  message="the reveal's audit row")
    assert audit["object_id"] == object_id and "uid " in audit["actor"]


def test_a_read_only_connection_cannot_preview(stored):
    engine, object_id = stored
    with pytest.raises(ControlError, match="read-only"):
        request(engine.data_dir / RO_SOCKET_NAME, "preview_handler", {"name": "coerce", "object_id": object_id})


def test_an_object_not_routed_through_the_handler_is_named(stored):
    engine, _ = stored
    with pytest.raises(ControlError, match="routed with object 999"):
        request(engine.data_dir / SOCKET_NAME, "preview_handler", {"name": "coerce", "object_id": 999})

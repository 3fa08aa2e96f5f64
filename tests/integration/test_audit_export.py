"""[audit_export] against a real syslog receiver: rsyslogd with its gtls driver on
127.0.0.1 (tests/syslog_arr.py), RFC 5425 over TLS verified against the test CA.

Every exported audit row arrives as a DICOM audit message the PS3.15 schema accepts;
with the ARR stopped, rows written meanwhile wait and arrive when it is back — none
lost, none twice (each message matched to its audit row by time and event); canary
PHI never reaches it unless patient IDs are asked for, and then only as the keyed hash.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from lxml import etree

import dicomgen
from harness import CANARY_ID, CANARY_NAME, poll, store_files
from mfconsole.auditlog import events, message
from mfconsole import ops
from mfconsole.audit_export import EXPORT_NAME
from mfconsole.repository import db_path, reading
from syslog_arr import Rsyslog
from tlsgen import make_pki

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).resolve().parents[1] / "golden"
                                       / "dicom-audit-message.rng")))


@pytest.fixture
def arr(tmp_path):
    pki = make_pki(tmp_path / "pki")
    started = Rsyslog(tmp_path / "arr", pki).start()
    started.pki = pki
    yield started
    started.stop()


def exporting(engine_factory, arr, **export):
    table = {"enabled": True, "host": "127.0.0.1", "port": arr.port,
             "tls": {"ca_file": str(arr.pki["ca.crt"])}, "interval_s": 0.1, "retry_max_s": 0.5,
             "timeout_s": 5, **export}
    return engine_factory(destinations=[], egress={"allowed_tcp": [f"127.0.0.1:{arr.port}"]},
                          tables={"audit_export": table})


def images(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [dicomgen.save(dicomgen.make_image(pixel_bytes=64), folder / f"img{i}.dcm")
            for i in range(start, start + n)]


def key(doc) -> tuple[str, str, str]:
    ident = doc.find("EventIdentification")
    return ident.get("EventDateTime"), ident.find("EventID").get("csd-code"), ident.get("EventActionCode")


def expected(engine) -> Counter:
    """What the ARR must have received: one message per exported audit row (read from
    the database, so it works after the engine stopped)."""
    with reading(db_path(engine.data_dir)) as reads:
        rows = reads.audit_to_export(0, 100_000)
    return Counter(key(etree.fromstring(message.to_xml(events.record_of(r, events.Context("x", "h", "1")))))
                   for r in rows if r["event"] in events.EXPORTED)


def stored_messages(arr) -> list:
    return [d for d in arr.messages() if key(d)[1:] == ("110104", "C")]


def test_the_audit_trail_reaches_the_arr_and_survives_its_outage(engine_factory, arr, tmp_path):
    engine = exporting(engine_factory, arr)
    port = engine.config.listeners[0].port
    store_files(port, images(tmp_path / "in", 3))
    poll(lambda: len(stored_messages(arr)) >= 3, timeout=20, message="3 stored messages at the ARR")
    assert any(key(d)[1] == "110100" for d in arr.messages())           # engine_started

    arr.stop()                                                          # the ARR goes down
    received_before = len(arr.lines())
    store_files(port, images(tmp_path / "in", 3, start=3))
    reads = engine.store.reader()
    poll(lambda: reads.audit_export(EXPORT_NAME)["last_error"], timeout=20,
         message="a failed export attempt recorded")
    cursor = reads.audit_export(EXPORT_NAME)["last_id"]
    assert cursor < reads.last_audit_id()                              # the backlog waits
    assert "audit_export" in [p.key for p in ops.health(engine.config, engine)]   # health says so
    assert len(arr.lines()) == received_before

    arr.start()                                                         # back: the backlog goes
    poll(lambda: len(stored_messages(arr)) >= 6, timeout=30, message="6 stored messages at the ARR")
    poll(lambda: reads.audit_export(EXPORT_NAME)["last_id"] == reads.last_audit_id(), timeout=20)
    assert reads.audit_export(EXPORT_NAME)["last_error"] is None
    assert "audit_export" not in [p.key for p in ops.health(engine.config, engine)]

    engine.stop()                    # engine_stopped is flushed on the way out
    docs = arr.messages()
    assert any(key(d)[1:] == ("110100", "E") and
               d.find("EventIdentification/EventTypeCode").get("csd-code") == "110121" for d in docs)
    for doc in docs:
        assert SCHEMA.validate(doc), SCHEMA.error_log
    got = Counter(key(d) for d in docs)
    want = expected(engine)
    # None lost, none made up. Syslog has no acknowledgement: a batch whose confirmation
    # (the ARR's close) did not arrive in time is sent again, so a slow machine may show
    # one twice (at least once, by design); the batch is never shortened.
    assert set(got) == set(want), (set(want) - set(got), set(got) - set(want))
    text = arr.out.read_text(encoding="utf-8")
    assert CANARY_ID not in text and CANARY_NAME.split("^")[0] not in text
    assert "ParticipantObjectTypeCode=\"1\"" not in text                # no patient participant


def test_patient_ids_go_only_as_the_keyed_hash(engine_factory, arr, tmp_path):
    from mfconsole.engine.vault import Vault, load_key

    engine = exporting(engine_factory, arr, include_patient_ids=True)
    # The identifier is read from the header of the stored object: a small one held in
    # the database, and a 3 MiB implicit-VR one sealed into a blob file as it arrived.
    large = dicomgen.save(dicomgen.make_image(pixel_bytes=3 * 1024 * 1024),
                          tmp_path / "in" / "large.dcm", implicit=True)
    store_files(engine.config.listeners[0].port, images(tmp_path / "in", 1) + [large])
    poll(lambda: len(stored_messages(arr)) == 2, timeout=20)
    pseudonym = Vault([load_key(engine.config.store.key_file)]).audit_pseudonym(CANARY_ID)
    for doc in stored_messages(arr):
        assert SCHEMA.validate(doc), SCHEMA.error_log
        (patient,) = [o for o in doc.findall("ParticipantObjectIdentification")
                      if o.get("ParticipantObjectTypeCode") == "1"]
        assert patient.get("ParticipantObjectID") == pseudonym
    text = arr.out.read_text(encoding="utf-8")
    assert CANARY_ID not in text and CANARY_NAME.split("^")[0] not in text


def test_an_arr_that_fails_verification_gets_nothing_and_the_cursor_stays(engine_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    rogue = dict(pki, **{"server.crt": pki["rogue-server.crt"], "server.key": pki["rogue-server.key"]})
    impostor = Rsyslog(tmp_path / "rogue", rogue).start()
    impostor.pki = pki            # mfconsole trusts the real CA only
    try:
        engine = exporting(engine_factory, impostor)
        reads = engine.store.reader()
        why = poll(lambda: reads.audit_export(EXPORT_NAME)["last_error"], timeout=20)
        assert "TLS" in why and "certificate" in why, why
        assert reads.audit_export(EXPORT_NAME)["last_id"] == 0
        assert impostor.lines() == []
    finally:
        impostor.stop()


def test_enabled_by_reload_the_export_sends_the_trail_from_the_start(engine_factory, arr, tmp_path):
    from harness import write_config

    engine = engine_factory(destinations=[], egress={"allowed_tcp": [f"127.0.0.1:{arr.port}"]})
    port = engine.config.listeners[0].port
    store_files(port, images(tmp_path / "in", 2))
    assert engine.audit_exporter is None
    write_config(engine.config.path.parent, port=port, destinations=[],
                 egress={"allowed_tcp": [f"127.0.0.1:{arr.port}"]},
                 tables={"audit_export": {"enabled": True, "host": "127.0.0.1", "port": arr.port,
                                          "tls": {"ca_file": str(arr.pki["ca.crt"])},
                                          "interval_s": 0.1}})
    assert "audit_export: restarted" in engine.reload()
    poll(lambda: len(stored_messages(arr)) == 2, timeout=20)     # rows from before the reload
    poll(lambda: any(key(d)[1] == "110113" for d in arr.messages()), timeout=20)   # the reload itself

"""The fhir destination kind's Sender and echo, built through the kind as the engine
builds them, against tests/fhir_server.py (conditional update, R4 validation of every
resource): each row of the fhir outcome table, idempotent resends, Retry-After,
credentials, redirects refused, TLS, and no PHI in logs or reasons.

The study-level path through the engine (a stable study → handle_study → one
Outbound) is the engine's (branch `study`); here the Outbound is made as the shared
contract says the engine makes it."""

from __future__ import annotations

import email.utils
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

import dicomgen
from fhir_server import answer, drop, outcome, unavailable
from harness import CANARY_ID, CANARY_NAME, REPO, write_config
from mfconsole import egress, ops
from mfconsole.config import load
from mfconsole.contract import Outbound
from mfconsole.handlers.api import Context, DicomObject
from mfconsole.kinds import kind_of
from peers import free_port
from tlsgen import make_pki, server_context

TOKEN = "TOKEN-CANARY-77aa"
FAST = {"connect_timeout_s": 2, "response_timeout_s": 5}


def destination(folder: Path, url: str, allowed: list[str] | None = None, **keys):
    """A loaded fhir destination (route with the shipped handler) and its config."""
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "handlers" / "study_to_imagingstudy.py", folder / "handlers")
    path = write_config(folder, destinations=[{"name": "ehr", "kind": "fhir", "url": url, **FAST, **keys}],
                        routes=[{"from": "modalities", "to": ["ehr"], "handler": "study_to_imagingstudy"}],
                        egress={"allowed_tcp": [], "allowed_http": allowed or [url]})
    config = load(path)
    return config, config.destinations[0]


def sender_for(config, dest):
    """As the engine makes it: the kind's sender with the configuration's egress checks."""
    return kind_of(dest).sender(dest, egress.Checks(ops.egress(config), ops.egress_http(config)))


def study_outbound(study_uid: str | None = None, series: int = 2) -> Outbound:
    """The handler's ImagingStudy for a generated study carrying the canary PHI,
    serialised as the contract says the engine does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("s2is", REPO / "handlers" / "study_to_imagingstudy.py")
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    study_uid = study_uid or generate_uid()
    objs = []
    for _ in range(series):
        ds = dicomgen.make_image(study_uid, pixel_bytes=16)
        ds.StudyTime, ds.TimezoneOffsetFromUTC = "101500", "+0200"
        ds.StudyDescription = f"for {CANARY_NAME}"
        objs.append(DicomObject(ds))
    resource = handler.handle_study(objs, Context("r", "ehr", "fhir"))
    return outbound(resource, study_uid)


def outbound(resource: dict, study_uid: str) -> Outbound:
    data = json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Outbound("", study_uid, "application/fhir+json", data, study_uid=study_uid)


def test_create_then_resend_updates_the_one_resource(fhir_server, tmp_path):
    server = fhir_server()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config, dest = destination(tmp_path, server.url, bearer_token_file=str(token))
    sender = sender_for(config, dest)
    obj = study_outbound()
    try:
        assert sender.prepare([]) is None
        first = sender.send_many([obj])
        again = sender.send_many([obj])
    finally:
        sender.close()
    assert [o.label for o in first + again] == ["delivered/message"] * 2
    assert [o.status for o in first + again] == ["HTTP 201", "HTTP 200"]
    assert len(server.resources) == 1                  # the resend updated it
    ((kind, _), stored), = server.resources.items()
    assert kind == "ImagingStudy" and stored["numberOfSeries"] == 2
    put = server.puts()[0]
    assert put.path == "/fhir/ImagingStudy"
    assert put.query == {"identifier": [f"urn:dicom:uid|urn:oid:{obj.study_uid}"]}
    assert put.headers["Content-Type"].startswith("application/fhir+json")
    assert put.headers["Authorization"] == f"Bearer {TOKEN}"
    assert json.loads(put.body)["subject"]["identifier"]["value"] == CANARY_ID


def test_several_matches_is_a_dead_letter(fhir_server, tmp_path):
    server = fhir_server()
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    obj = study_outbound()
    try:
        assert sender.send_many([obj])[0].is_success
        server.duplicates = True
        (result,) = sender.send_many([obj])
    finally:
        sender.close()
    assert result.label == "permanent/message" and result.status == "HTTP 412"
    assert "several resources with this study's identifier" in result.reason


def test_an_invalid_resource_is_a_dead_letter_naming_codes_only(fhir_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = fhir_server()
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    study = generate_uid()
    bad = {"resourceType": "ImagingStudy", "status": "available", "description": CANARY_NAME,
           "subject": {"type": "Patient", "identifier": {"value": CANARY_ID}},
           "series": [{"uid": generate_uid(), "description": CANARY_ID}]}   # no modality
    try:
        (result,) = sender.send_many([outbound(bad, study)])
    finally:
        sender.close()
    assert server.puts()[0].status == 422 and not server.resources
    assert CANARY_ID in server.requests[0].body.decode()     # the server's diagnostics may quote it…
    assert result.label == "permanent/message"
    assert result.reason == ("the FHIR server refused the resource (HTTP 422; OperationOutcome "
                             "issues (severity/code): error/invalid)")
    text = caplog.text + result.reason + result.status   # …we never do
    assert CANARY_ID not in text and CANARY_NAME not in text and "ZZCANARY" not in text


@pytest.mark.parametrize("status, label, words", [
    (401, "permanent/destination", "credentials"),
    (403, "permanent/destination", "permissions"),
    (404, "permanent/destination", "no such FHIR endpoint"),
    (405, "permanent/destination", "conditional update"),
    (400, "permanent/message", "error/invalid"),
    (500, "transient/destination", "internal error"),
])
def test_status_table_against_the_server(fhir_server, tmp_path, status, label, words):
    server = fhir_server()
    body = outcome("error", "invalid", f"about {CANARY_ID}") if status == 400 else b""
    server.script(answer(status, body, "application/fhir+json"))
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    try:
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert result.label == label and words in result.reason and CANARY_ID not in result.reason


def test_unavailable_honours_retry_after(fhir_server, tmp_path):
    server = fhir_server()
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    server.script(unavailable("30"), answer(429, retry_after=date))
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    obj = study_outbound()
    try:
        first, second, third = (sender.send_many([obj])[0] for _ in range(3))
    finally:
        sender.close()
    assert first.label == second.label == "transient/destination"
    assert first.retry_after_s == 30 and 110 <= second.retry_after_s <= 120
    assert third.status == "HTTP 201" and len(server.resources) == 1


def test_redirect_is_refused_and_not_followed(fhir_server, tmp_path):
    server, elsewhere = fhir_server(), fhir_server()
    server.script(answer(307, location=f"{elsewhere.url}/ImagingStudy"))
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    try:
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert result.label == "permanent/destination" and "redirects are never followed" in result.reason
    assert f"(Location: http://127.0.0.1:{elsewhere.url.split(':')[2].split('/')[0]})" in result.reason
    assert elsewhere.requests == []


def test_nothing_listening_is_transient(tmp_path):
    config, dest = destination(tmp_path, f"http://127.0.0.1:{free_port()}/fhir")
    sender = sender_for(config, dest)
    try:
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert result.label == "transient/destination" and result.status == "transport"


def test_not_fhir_output_is_a_dead_letter(fhir_server, tmp_path):
    server = fhir_server()
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    try:
        results = sender.send_many([Outbound("", "1.2.3", "application/fhir+json", b"{}", study_uid="1.2.3"),
                                    Outbound("", "1.2.3", "application/fhir+json", b"x", study_uid="1.2.3")])
    finally:
        sender.close()
    assert [r.label for r in results] == ["permanent/message"] * 2 and server.requests == []


def test_tls_and_echo(fhir_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = fhir_server(tls=server_context(pki))
    config, dest = destination(tmp_path / "site", server.url, tls={"ca_file": str(pki["ca.crt"])})
    result = ops.echo(config, "ehr")
    assert result.ok and "CapabilityStatement" in result.detail
    assert server.requests[-1].method == "GET" and server.requests[-1].path == "/fhir/metadata"
    sender = sender_for(config, dest)
    try:
        assert sender.send_many([study_outbound()])[0].status == "HTTP 201"
    finally:
        sender.close()
    # The system trust store does not know the test CA: not trusted → pause.
    config, dest = destination(tmp_path / "site2", server.url, tls={})
    sender = sender_for(config, dest)
    try:
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert result.label == "permanent/destination" and result.status == "TLS"


def test_echo_of_a_wrong_path(fhir_server, tmp_path):
    server = fhir_server()
    config, _ = destination(tmp_path, server.url.replace("/fhir", "/nofhir"))
    result = ops.echo(config, "ehr")
    assert not result.ok and "no such FHIR endpoint" in result.detail and "HTTP 404" in result.detail


def test_cli_echo(fhir_server, tmp_path):
    import subprocess
    import sys

    server = fhir_server()
    destination(tmp_path, server.url)
    res = subprocess.run([sys.executable, "-m", "mfconsole", "echo", "ehr", "--config",
                          str(tmp_path / "config.toml")], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"ehr (FHIR {server.url}/metadata): OK in ")
    assert "CapabilityStatement" in res.stdout


def test_basic_auth_and_a_missing_secret(fhir_server, tmp_path):
    import base64

    server = fhir_server()
    password = tmp_path / "password"
    password.write_text("PASSWORD-CANARY-1")
    password.chmod(0o600)
    config, dest = destination(tmp_path, server.url, username="mf", password_file=str(password))
    sender = sender_for(config, dest)
    try:
        assert sender.send_many([study_outbound()])[0].is_success
        expected = "Basic " + base64.b64encode(b"mf:PASSWORD-CANARY-1").decode()
        assert server.puts()[0].headers["Authorization"] == expected
        password.unlink()                   # read at every request: now it is gone
        refused = sender.prepare([])
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert refused.label == result.label == "permanent/destination"
    assert result.status == "configuration" and "password_file" in result.reason
    assert "CANARY" not in result.reason and len(server.puts()) == 1


def test_egress_refusal_sends_nothing(fhir_server, tmp_path):
    """An allowlist narrowed since load (a reload): checked before every request."""
    server = fhir_server()
    config, dest = destination(tmp_path, server.url)
    narrowed = egress.Checks(ops.egress(config),
                             lambda url, **kw: egress.check_http([], config.egress_pins, url, **kw))
    sender = kind_of(dest).sender(dest, narrowed)
    try:
        refused = sender.prepare([])
        (result,) = sender.send_many([study_outbound()])
    finally:
        sender.close()
    assert refused.label == result.label == "permanent/destination" and result.status == "egress"
    assert "allowed_http" in result.reason and server.requests == []


def test_a_dropped_answer_is_sent_again(fhir_server, tmp_path):
    server = fhir_server()
    server.script(drop())
    config, dest = destination(tmp_path, server.url)
    sender = sender_for(config, dest)
    obj = study_outbound()
    try:
        (first,) = sender.send_many([obj])
        (second,) = sender.send_many([obj])
    finally:
        sender.close()
    assert first.label == "transient/destination" and first.status == "no response" and first.ambiguous
    assert second.status == "HTTP 201" and len(server.resources) == 1

"""Reading STOW-RS answers: DICOM JSON and XML bodies, the HTTP table, Retry-After."""

from __future__ import annotations

import email.utils

import pytest

from mfconsole.contract import BOUNDED, DELIVERED, DESTINATION, MESSAGE, PERMANENT, TRANSIENT, WARNING
from mfconsole.httpdest import session
from mfconsole.stow import response
from mfconsole.stow.status import stow_http, stow_instance
from stow_server import Request, dicom_json, dicom_xml

UIDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]


def request(uids=UIDS) -> Request:
    return Request(0.0, "/studies", {}, [], list(uids), [])


@pytest.mark.parametrize("xml", [False, True], ids=["json", "xml"])
def test_body_gives_each_instance_its_reason(xml):
    build = dicom_xml if xml else dicom_json
    body = build(request(), failed={UIDS[0]: 0xC000, UIDS[1]: 0xA701}, warnings={UIDS[2]: 0xB007})
    answer = response.parse("application/dicom+xml" if xml else "application/dicom+json", body)
    assert answer is not None
    assert answer.failed == {UIDS[0]: 0xC000, UIDS[1]: 0xA701}
    assert answer.stored == {UIDS[2]: 0xB007, UIDS[3]: None}
    got = response.per_instance(202, answer, UIDS)
    assert [(o.persistence, o.scope) for o in got] == [
        (PERMANENT, MESSAGE), (TRANSIENT, MESSAGE), (WARNING, MESSAGE), (DELIVERED, MESSAGE)]
    assert [o.status for o in got[:3]] == ["0xC000", "0xA701", "0xB007"]
    assert "FailureReason" in got[0].reason and "WarningReason" in got[2].reason


def test_orthanc_style_json_with_empty_failed_sequence():
    body = (b'{"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": [{"00081155": '
            b'{"vr": "UI", "Value": ["1.2.3.1"]}}]}}')
    answer = response.parse("application/dicom+json", body)
    assert answer is not None and answer.failed == {} and answer.stored == {"1.2.3.1": None}
    assert response.per_instance(200, answer, ["1.2.3.1"])[0].persistence == DELIVERED


def test_absent_failed_sequence_means_nothing_failed():
    answer = response.parse("application/dicom+json", b'{"00081199": {"vr": "SQ"}}')
    got = response.per_instance(200, answer, UIDS)
    assert all(o.persistence == DELIVERED for o in got)


def test_400_names_the_failed_one_and_the_others_are_stored():
    """Orthanc answers 400 when any instance failed, listing the stored ones too."""
    body = dicom_json(request(UIDS[:2]), failed={UIDS[1]: 0xC000})
    answer = response.parse("application/dicom+json", body)
    got = response.per_instance(400, answer, UIDS[:2])
    assert got[0].persistence == DELIVERED and got[1].persistence == PERMANENT
    assert response.explains(answer, UIDS[:2])


@pytest.mark.parametrize("code,expected", [
    (0xA700, (TRANSIENT, MESSAGE)), (0xA7FF, (TRANSIENT, MESSAGE)),
    (0xA900, (PERMANENT, MESSAGE)), (0xC000, (PERMANENT, MESSAGE)), (0xC122, (PERMANENT, MESSAGE)),
    (0x0122, (PERMANENT, MESSAGE)), (0x0110, (BOUNDED, MESSAGE)), (0x0124, (PERMANENT, DESTINATION)),
    (0x0000, (BOUNDED, MESSAGE)), (0x1234, (BOUNDED, MESSAGE)),
])
def test_failure_reasons_follow_the_cstore_table(code, expected):
    got = stow_instance(code, 409, stored=False)
    assert (got.persistence, got.scope) == expected


@pytest.mark.parametrize("code", [0xB000, 0xB006, 0xB007, 0xB123])
def test_any_warning_reason_is_delivered(code):
    got = stow_instance(code, 202, stored=True)
    assert got.is_success and got.persistence == WARNING and got.status == f"0x{code:04X}"


@pytest.mark.parametrize("status,expected", [
    (200, (DELIVERED, MESSAGE)), (202, (WARNING, MESSAGE)), (204, (DELIVERED, MESSAGE)),
    (301, (PERMANENT, DESTINATION)), (302, (PERMANENT, DESTINATION)), (307, (PERMANENT, DESTINATION)),
    (400, (PERMANENT, MESSAGE)), (409, (PERMANENT, MESSAGE)), (413, (PERMANENT, MESSAGE)),
    (401, (PERMANENT, DESTINATION)), (403, (PERMANENT, DESTINATION)), (404, (PERMANENT, DESTINATION)),
    (405, (PERMANENT, DESTINATION)), (415, (PERMANENT, DESTINATION)),
    (408, (TRANSIENT, DESTINATION)), (429, (TRANSIENT, DESTINATION)), (500, (TRANSIENT, DESTINATION)),
    (502, (TRANSIENT, DESTINATION)), (503, (TRANSIENT, DESTINATION)), (504, (TRANSIENT, DESTINATION)),
    (507, (TRANSIENT, DESTINATION)), (422, (PERMANENT, MESSAGE)), (100, (BOUNDED, MESSAGE)),
])
def test_http_status_table(status, expected):
    got = stow_http(status)
    assert (got.persistence, got.scope) == expected
    assert got.status == f"HTTP {status}"


def test_transient_answer_carries_retry_after():
    assert stow_http(429, 7.0).retry_after_s == 7.0
    got = response.per_instance(503, None, UIDS[:2], retry_after_s=3.0)
    assert [o.retry_after_s for o in got] == [3.0, 3.0]


@pytest.mark.parametrize("content_type,body", [
    ("text/html", b"<html><body>Bad gateway</body></html>"),
    ("application/dicom+json", b"{not json"),
    ("application/dicom+json", b"[]"),
    ("application/json", b'{"HttpError": "Unsupported Media Type"}'),
    ("application/dicom+xml", b"<NativeDicomModel><DicomAttribute"),
    ("", b""),
])
def test_bodies_without_per_instance_results(content_type, body):
    assert response.parse(content_type, body) is None


def test_xml_with_entities_is_not_parsed():
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            b'<NativeDicomModel><DicomAttribute tag="00081198" vr="SQ">&b;</DicomAttribute></NativeDicomModel>')
    assert response.parse("application/dicom+xml", bomb) is None


def test_content_type_missing_is_sniffed():
    body = dicom_json(request(UIDS[:1]), failed={UIDS[0]: 0xA900})
    assert response.parse("", body).failed == {UIDS[0]: 0xA900}
    body = dicom_xml(request(UIDS[:1]), failed={UIDS[0]: 0xA900})
    assert response.parse("text/xml; charset=utf-8", body).failed == {UIDS[0]: 0xA900}


@pytest.mark.parametrize("value,code", [(49152, 0xC000), ("49152", 0xC000), ("C000", 0xC000),
                                        ("0xA700", 0xA700), ("0110", 0x0110), (-1, None),
                                        (True, None), ("nope", None), (70000, None)])
def test_reason_codes_as_archives_send_them(value, code):
    assert response._code(value) == code


def test_retry_after_seconds_and_dates():
    now = 1_800_000_000.0
    assert session.retry_after("2", now) == 2.0
    assert session.retry_after(" 120 ", now) == 120.0
    assert session.retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert session.retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert session.retry_after("999999", now) == session.RETRY_AFTER_MAX_S
    assert session.retry_after("soon", now) is None
    assert session.retry_after("-5", now) is None
    assert session.retry_after(None, now) is None

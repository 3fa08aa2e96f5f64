"""mfconsole/fhir/status.py: what each FHIR answer to a conditional update means."""

from __future__ import annotations

import json

import pytest

from mfconsole.fhir.status import fhir_http, issue_codes


@pytest.mark.parametrize("status, label, words", [
    (201, "delivered/message", "created"),
    (200, "delivered/message", "updated"),
    (204, "delivered/message", "accepted"),
    (412, "permanent/message", "several resources with this study's identifier"),
    (400, "permanent/message", "no OperationOutcome"),
    (422, "permanent/message", "no OperationOutcome"),
    (401, "permanent/destination", "credentials"),
    (403, "permanent/destination", "permissions"),
    (404, "permanent/destination", "no such FHIR endpoint"),
    (405, "permanent/destination", "conditional update"),
    (429, "transient/destination", "too many requests"),
    (503, "transient/destination", "service unavailable"),
    (500, "transient/destination", "internal error"),
    (599, "transient/destination", "server error"),
    (301, "permanent/destination", "redirects are never followed"),
    (307, "permanent/destination", "redirects are never followed"),
    (409, "bounded/message", "conflict"),
    (418, "permanent/message", "HTTP 418"),
    (102, "bounded/message", "unexpected"),
])
def test_table(status, label, words):
    outcome = fhir_http(status, 7.0)
    assert outcome.label == label and words in outcome.reason
    assert outcome.status == f"HTTP {status}"
    if label.startswith("transient"):
        assert outcome.retry_after_s == 7.0


def test_operation_outcome_names_codes_never_text():
    body = json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "required", "diagnostics": "PATIENT ZZCANARY^PHI",
         "expression": ["ImagingStudy.subject"]},
        {"severity": "warning", "code": "CANARY-0001 is odd", "details": {"text": "CANARY"}},
    ]}).encode()
    issues = issue_codes(body)
    assert issues == [("error", "required"), ("warning", "?")]
    outcome = fhir_http(422, None, issues)
    assert outcome.label == "permanent/message"
    assert outcome.reason == ("the FHIR server refused the resource (HTTP 422; OperationOutcome "
                              "issues (severity/code): error/required, warning/?)")
    assert "CANARY" not in outcome.reason and "subject" not in outcome.reason
    many = [("error", "invalid")] * 7
    assert "and 2 more" in fhir_http(400, None, many).reason


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"resourceType": "Patient"}'])
def test_not_an_operation_outcome(body):
    assert issue_codes(body) is None

"""What a FHIR server's answer to a conditional update means for a delivery (FHIR R4
http.html#cond-update): the fhir table of docs/outcomes.md as code.

An OperationOutcome in the body is read for its issues' severity and code only (both
from fixed value sets); their diagnostics, details and expression may quote the
resource's values (patient data) and never reach a reason.
"""

from __future__ import annotations

import json
from typing import Any

from mfconsole.contract import BOUNDED, DELIVERED, MESSAGE, PERMANENT, Outcome
from mfconsole.httpdest.status import destination_answer

MAX_ISSUES = 5   # issues named in a reason; the rest counted

_DESTINATION = {
    401: "the FHIR server refused our credentials (HTTP 401); check bearer_token_file or "
         "username/password_file",
    403: "the FHIR server forbids us to write (HTTP 403); check the account's permissions",
    404: "no such FHIR endpoint or resource type at this url (HTTP 404); check url (the FHIR "
         "base, e.g. https://host/fhir)",
    405: "the url does not accept a conditional update (HTTP 405); check url and that the "
         "server supports conditional update",
    415: "the FHIR server does not accept application/fhir+json (HTTP 415)",
}


def issue_codes(body: bytes, content_type: str = "") -> list[tuple[str, str]] | None:
    """(severity, code) of each issue of an OperationOutcome body; None when the body
    is not one. Only values of FHIR's fixed value sets are kept (a server could put
    anything there): anything else reads as "?"."""
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("resourceType") != "OperationOutcome":
        return None
    issues = doc.get("issue")
    out = []
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict):
            out.append((_token(issue.get("severity")), _token(issue.get("code"))))
    return out


def _token(value: Any) -> str:
    """A code of the issue-severity / issue-type value sets: lower-case letters and '-'."""
    if isinstance(value, str) and 0 < len(value) <= 32 and all(c.islower() or c == "-" for c in value):
        return value
    return "?"


def _issues_text(issues: list[tuple[str, str]]) -> str:
    if not issues:
        return "an OperationOutcome without issues"
    named = ", ".join(f"{sev}/{code}" for sev, code in issues[:MAX_ISSUES])
    more = f" and {len(issues) - MAX_ISSUES} more" if len(issues) > MAX_ISSUES else ""
    return f"OperationOutcome issues (severity/code): {named}{more}"


def fhir_http(status: int, retry_after_s: float | None = None,
              issues: list[tuple[str, str]] | None = None) -> Outcome:
    """The outcome of one conditional update from its HTTP status (and, for a
    refusal, the OperationOutcome's issue codes)."""
    code = f"HTTP {status}"
    if status in (200, 201):
        return Outcome(DELIVERED, status=code, reason="created" if status == 201 else "updated")
    if 200 <= status < 300:
        return Outcome(DELIVERED, status=code, reason=f"accepted (HTTP {status})")
    whole = destination_answer(status, "the FHIR server", _DESTINATION, retry_after_s)
    if whole is not None:
        return whole
    if status == 412:
        return Outcome(PERMANENT, MESSAGE, code, "the FHIR server holds several resources with "
                       "this study's identifier (HTTP 412 Precondition Failed): the conditional "
                       "update cannot choose one; merge or delete the duplicates, then replay")
    if status in (400, 422):
        what = _issues_text(issues) if issues is not None else "no OperationOutcome"
        return Outcome(PERMANENT, MESSAGE, code,
                       f"the FHIR server refused the resource (HTTP {status}; {what})")
    if status == 409:
        return Outcome(BOUNDED, MESSAGE, code, "the FHIR server reports a conflict (HTTP 409: a "
                       "concurrent update of the same resource)")
    if status == 413:
        return Outcome(PERMANENT, MESSAGE, code, "the FHIR server refuses the resource as too "
                       "large (HTTP 413)")
    if 400 <= status < 500:
        what = f"; {_issues_text(issues)}" if issues is not None else ""
        return Outcome(PERMANENT, MESSAGE, code, f"the FHIR server refused the request (HTTP {status}{what})")
    return Outcome(BOUNDED, MESSAGE, code, f"unexpected HTTP status {status}")

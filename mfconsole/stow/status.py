"""What a STOW-RS answer means for a delivery (PS3.18 10.5.3, Annex I): the HTTP
status and per-instance tables of docs/outcomes.md as code. A FailureReason or
WarningReason is read with the C-STORE table (mfconsole/dimse/status.py).
"""

from __future__ import annotations

from mfconsole.contract import BOUNDED, DELIVERED, MESSAGE, PERMANENT, TRANSIENT, WARNING, Outcome
from mfconsole.dimse.status import cstore_status
from mfconsole.httpdest.status import destination_answer

_HTTP_DESTINATION = {
    401: "the archive refused our credentials (HTTP 401); check bearer_token_file or "
         "username/password_file",
    403: "the archive forbids us to store (HTTP 403); check the account's permissions",
    404: "no STOW-RS service at this url (HTTP 404); check url (it ends before /studies)",
    405: "the url does not accept POST (HTTP 405); check url (it ends before /studies)",
    415: "the archive does not accept multipart/related application/dicom (HTTP 415)",
}


def stow_http(status: int, retry_after_s: float | None = None) -> Outcome:
    """A STOW-RS response status for the request as a whole. Per-instance results in
    the body, when there are any, take precedence (see stow_instance)."""
    code = f"HTTP {status}"
    if status == 202:
        # "Stored some, with warnings or failures for others": an instance the body does
        # not name was not listed as failed, so it is stored; the 202 is recorded.
        return Outcome(WARNING, MESSAGE, code, "the archive accepted the request with warnings or "
                       "failures (HTTP 202) and named no result for this instance")
    if 200 <= status < 300:
        return Outcome(DELIVERED, status=code, reason="stored")
    whole = destination_answer(status, "the archive", _HTTP_DESTINATION, retry_after_s)
    if whole is not None:
        return whole
    if status == 413:
        return Outcome(PERMANENT, MESSAGE, code, "the archive refuses this object as too large (HTTP 413)")
    if status == 409:
        return Outcome(PERMANENT, MESSAGE, code, "the archive reports a conflict (HTTP 409)")
    if 400 <= status < 500:
        return Outcome(PERMANENT, MESSAGE, code, f"the archive refused the request (HTTP {status})")
    return Outcome(BOUNDED, MESSAGE, code, f"unexpected HTTP status {status}")


def stow_instance(reason_code: int | None, http_status: int, *, stored: bool) -> Outcome:
    """One instance in a STOW-RS response body: in ReferencedSOPSequence (``stored``),
    with an optional WarningReason, or in FailedSOPSequence with its FailureReason;
    codes read with the C-STORE status table. A transient reason concerns that instance
    only: the archive answered the request, so it is up, and the other instances of the
    batch must not wait on this one."""
    where = f"(HTTP {http_status}, {'WarningReason' if stored else 'FailureReason'})"
    if stored and not reason_code:
        return Outcome(DELIVERED, status=f"HTTP {http_status}", reason="stored")
    if reason_code is None:
        return Outcome(BOUNDED, MESSAGE, f"HTTP {http_status}", f"listed as failed without a reason {where}")
    base = cstore_status(reason_code)
    if stored:
        why = base.reason if base.persistence == WARNING else f"warning 0x{reason_code:04X}"
        return Outcome(WARNING, MESSAGE, base.status, f"{why} {where}")
    if base.is_success:    # "failed" with a success code: not stored, reason unknown
        return Outcome(BOUNDED, MESSAGE, base.status, f"listed as failed with a success code {where}")
    scope = MESSAGE if base.persistence == TRANSIENT else base.scope
    return Outcome(base.persistence, scope, base.status, f"{base.reason} {where}")

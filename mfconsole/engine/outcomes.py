"""What a destination does with an answer: the classification tables of
../shared/reference/status-classes.md as code, shared by every kind of destination.

Two axes. Persistence: delivered, warning (delivered, warning recorded), transient
(retry with backoff), permanent (dead letter), bounded (a few retries, then dead
letter). Scope: message (this delivery only) or destination (pause it, keep the queue).
Reasons are routing-safe by construction: status codes, SOP class names, AE titles;
never data set values.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

DELIVERED, WARNING, TRANSIENT, PERMANENT, BOUNDED = "delivered", "warning", "transient", "permanent", "bounded"
FILTERED = "filtered"     # a handler returned None: nothing to send, nothing wrong
MESSAGE, DESTINATION = "message", "destination"


@dataclass(frozen=True)
class Outcome:
    persistence: str          # delivered | warning | transient | permanent | bounded
    scope: str = MESSAGE      # message | destination
    status: str = ""          # "0xA700", "A-ASSOCIATE-RJ 1/1/7", "connection refused"...
    reason: str = ""          # for humans; routing-safe
    retry_after_s: float | None = None
    # The transfer of this object was cut short (abort, dropped connection, no answer):
    # the peer or the object may be at fault. outbox.record attributes it from what
    # else got through (``others_delivered``: this connection had delivered other
    # objects before this one).
    ambiguous: bool = False
    others_delivered: bool = False

    @property
    def is_success(self) -> bool:
        return self.persistence in (DELIVERED, WARNING)

    @property
    def is_done(self) -> bool:
        """Settled without a fault: delivered, or filtered by a handler."""
        return self.is_success or self.persistence == FILTERED

    @property
    def label(self) -> str:
        return f"{self.persistence}/{self.scope}"


def cstore_status(status: int) -> Outcome:
    """A C-STORE response status (PS3.4 B.2.3, PS3.7 Annex C)."""
    code = f"0x{status:04X}"
    if status == 0x0000:
        return Outcome(DELIVERED, status=code, reason="success")
    if status in (0xB000, 0xB006, 0xB007):
        meaning = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
                   0xB007: "data set does not match SOP class"}[status]
        return Outcome(WARNING, status=code, reason=f"warning: {meaning}")
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:
        return Outcome(TRANSIENT, DESTINATION, code, "peer is out of resources")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome(PERMANENT, MESSAGE, code, "peer says the data set does not match the SOP class")
    if 0xC000 <= status <= 0xCFFF:
        return Outcome(PERMANENT, MESSAGE, code, "peer cannot understand the object")
    if status == 0x0110:
        return Outcome(BOUNDED, MESSAGE, code, "peer reports a processing failure")
    if status == 0x0122:
        return Outcome(PERMANENT, MESSAGE, code, "peer does not support this SOP class")
    if status == 0x0124:
        return Outcome(PERMANENT, DESTINATION, code, "peer says we are not authorized")
    if status == 0x0117:
        return Outcome(PERMANENT, MESSAGE, code, "peer says the SOP instance is invalid")
    if status in (0x0210, 0x0211, 0x0212):
        return Outcome(PERMANENT, MESSAGE, code, "peer rejected our request encoding")
    return Outcome(BOUNDED, MESSAGE, code, "unknown status from peer")


def no_response(what: str, *, others_delivered: bool = False) -> Outcome:
    """No response, DIMSE timeout, abort mid-operation: the outcome is unknown and a
    re-store is idempotent, so try again. Ambiguous: the peer may be down, or this
    object may be what makes it abort (outbox.record decides which, and a poison
    object ends as a dead letter after ``bounded_attempts``)."""
    return Outcome(TRANSIENT, DESTINATION, "no response", what, ambiguous=True,
                   others_delivered=others_delivered)


def internal_error(exc: BaseException, step: str) -> Outcome:
    """An exception while preparing or sending one object is that object's outcome:
    a dead letter naming the exception class and where it was raised (never its text,
    which may quote data set values)."""
    return Outcome(PERMANENT, MESSAGE, "internal error",
                   f"{exc.__class__.__name__} while {step}{raised_at(exc)}; the object is kept: "
                   "fix the cause, then replay")


def raised_at(exc: BaseException) -> str:
    """" in module.function line N" of the innermost frame of ``exc``'s traceback."""
    from mfconsole.hardening import raised_at as site

    where = site(exc.__traceback__)
    return f" in {where}" if where else ""


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
_RJ_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized", (1, 7): "called AE title not recognized",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def association_rejected(result: int, source: int, reason: int) -> Outcome:
    status = f"A-ASSOCIATE-RJ {result}/{source}/{reason}"
    words = _RJ_REASONS.get((source, reason), "reason code unknown")
    if result == 2 and (source, reason) == (2, 1):
        # pynetdicom's answer to failed user identity negotiation: bounded, then pause.
        return Outcome(BOUNDED, DESTINATION, status, f"association rejected: {words} "
                       "(pynetdicom uses this for failed user identity)")
    if result == 2:
        return Outcome(TRANSIENT, DESTINATION, status, f"association rejected (transient): {words}")
    return Outcome(PERMANENT, DESTINATION, status, f"association rejected (permanent): {words}; "
                   "check the destination's AE titles and the peer's configuration")


def transport_failure(what: str) -> Outcome:
    """Connection refused, DNS failure, connect timeout, A-ABORT, reset."""
    return Outcome(TRANSIENT, DESTINATION, "transport", what)


def tls_failure(exc: BaseException, where: str) -> Outcome:
    """A TLS handshake that failed. A certificate we cannot verify (chain, validity,
    name) is the destination's configuration: pause it, never retry blindly. Anything
    else on the way (a reset, a timeout, the peer's alert) is transient."""
    from mfconsole.tls import failure_reason

    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome(PERMANENT, DESTINATION, "TLS", f"the certificate of {where} is not trusted "
                       f"({failure_reason(exc)}); check tls.ca_file and tls.server_name")
    return Outcome(TRANSIENT, DESTINATION, "TLS",
                   f"TLS handshake with {where} failed ({failure_reason(exc)})")


def egress_refused(target: str, allowlist: str = "allowed_tcp", resolved: tuple[str, ...] = (),
                   why: str | None = None) -> Outcome:
    """Nothing may go to ``target``: the destination pauses with the reason. With the
    addresses its host resolved to (``resolved``) and ``why`` none of them may be
    dialled (mfconsole.egress.Refusal carries both)."""
    where = f"{target} (resolved to {', '.join(resolved)})" if resolved else target
    why = why or f"is not in [egress].{allowlist}"
    return Outcome(PERMANENT, DESTINATION, "egress", f"{where} {why}; nothing was sent")


def context_refused(reason: str) -> Outcome:
    """No presentation context for this SOP class/transfer syntax: message scope."""
    return Outcome(PERMANENT, MESSAGE, "no presentation context", reason)


# -- STOW-RS (PS3.18 10.5.3, Annex I) ------------------------------------------------

_HTTP_DESTINATION = {
    401: "the archive refused our credentials (HTTP 401); check bearer_token_file or "
         "username/password_file",
    403: "the archive forbids us to store (HTTP 403); check the account's permissions",
    404: "no STOW-RS service at this url (HTTP 404); check url (it ends before /studies)",
    405: "the url does not accept POST (HTTP 405); check url (it ends before /studies)",
    415: "the archive does not accept multipart/related application/dicom (HTTP 415)",
}
_HTTP_TRANSIENT = {408: "request timeout", 429: "too many requests", 500: "internal error",
                   502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}


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
    if 300 <= status < 400:
        # Following a redirect would send PHI (and credentials) somewhere the egress
        # allowlist never approved.
        return Outcome(PERMANENT, DESTINATION, code, f"the archive redirects (HTTP {status}); "
                       "redirects are never followed: set url to the final address")
    if status in _HTTP_DESTINATION:
        return Outcome(PERMANENT, DESTINATION, code, _HTTP_DESTINATION[status])
    if status in _HTTP_TRANSIENT or 500 <= status < 600:
        words = _HTTP_TRANSIENT.get(status, "server error")
        return Outcome(TRANSIENT, DESTINATION, code, f"the archive answered {words} (HTTP {status})",
                       retry_after_s)
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


# HL7 v2 ACK, MSA-1 (HL7 Table 0008)
_ACK_WORDS = {"AA": "application accept", "CA": "commit accept", "AE": "application error",
              "AR": "application reject", "CE": "commit error", "CR": "commit reject"}


def hl7_ack(code: str) -> Outcome:
    status = f"MSA-1 {code}"
    words = _ACK_WORDS.get(code, "unknown acknowledgment code")
    if code in ("AA", "CA"):
        return Outcome(DELIVERED, status=status, reason=words)
    if code == "AE":
        return Outcome(PERMANENT, MESSAGE, status, f"receiver answered {words}")
    if code in ("AR", "CE"):
        # Vendors use these for both "fix the message" and "try later": a few tries
        # (bounded_attempts), then a dead letter.
        return Outcome(BOUNDED, MESSAGE, status, f"receiver answered {words}")
    if code == "CR":
        return Outcome(PERMANENT, DESTINATION, status, f"receiver answered {words}: it refuses "
                       "messages from us; check the interface configuration on both sides")
    return Outcome(TRANSIENT, DESTINATION, status, words)

"""The contract between the engine and the protocols it sends with: what a sender is
given (``Outbound``), what it answers (``Outcome``), and the shape of a sender
(``Sender``). The engine drives senders through it; the protocol packages (dimse,
stow, mllp) implement it. It imports neither side.

An Outcome says what a destination's answer means for a delivery (docs/outcomes.md),
on two axes. Persistence: delivered, warning (delivered, warning recorded), transient
(retry with backoff), permanent (dead letter), bounded (a few retries, then dead
letter). Scope: message (this delivery only) or destination (pause it, keep the queue).
Reasons are routing-safe by construction: status codes, SOP class names, AE titles;
never data set values.

The answers every protocol shares live here (a transport failure, no response, a TLS
handshake that failed, egress refused, an internal error); each protocol keeps its
own status table beside its sender (dimse/status.py, stow/status.py, mllp/status.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Protocol, Sequence

DELIVERED, WARNING, TRANSIENT, PERMANENT, BOUNDED = "delivered", "warning", "transient", "permanent", "bounded"
FILTERED = "filtered"     # a handler returned None: nothing to send, nothing wrong
MESSAGE, DESTINATION = "message", "destination"


@dataclass(frozen=True)
class Outbound:
    """One object to send: routing-safe UIDs and the plaintext data set bytes."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    study_uid: str = ""
    # The calling AE title the object arrived with (a destination may present it).
    calling_ae: str = ""


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


class Queued(Protocol):
    """What a sender may read of the objects it is about to be given (a claimed
    delivery, before its bytes are read): enough to negotiate a connection."""

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def transfer_syntax(self) -> str: ...


class Sender(Protocol):
    # (objects, bytes) per request; (1, 0) sends one object at a time. A sender whose
    # requests are one object each may also say ``min_group``: the worker then cuts its
    # groups to the peer's pace, down to that many (engine/delivery.py GROUP_S).
    max_batch: tuple[int, int]
    # In arrival order (HL7): nothing overtakes a message that failed or waits to retry.
    in_order: bool

    def prepare(self, items: Sequence[Queued]) -> Outcome | None:
        """Get a connection ready for these items (not yet claimed); an Outcome when
        the peer will not have us. Extra workers call it before they claim anything."""
        ...

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        """One outcome per object, in order; shorter than ``objs`` when a
        destination-scope failure stopped the batch (that failure is the last one)."""
        ...

    def close(self) -> None: ...
    def close_if_idle(self, idle_s: float) -> None: ...


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

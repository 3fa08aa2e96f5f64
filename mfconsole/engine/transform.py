"""Run a route's handler on one delivery, at send time, and turn what it returns into
what the destination sends.

``None`` → the delivery is filtered (counted and audited as such); an HL7 message →
its bytes, for an MLLP destination; a DICOM data set → for a DIMSE or STOW destination,
its header written in the object's own transfer syntax followed by the original
pixel data bytes (handlers see headers only and never decode pixels); a dict (one FHIR
R4 resource) → compact UTF-8 JSON, for a kind that produces "fhir".

A study-level handler (LEVEL = "study", ``handle_study(study, ctx)``) runs once over
the objects of one study for one destination (``Transformer.study``): its one result
stands for all of that study's deliveries (the contract: docs/destinations.md, Study-
stable delivery). Run on a single object (a dry run, a preview) it gets a study of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from mfconsole import dicomheader
from mfconsole.contract import FILTERED, MESSAGE, PERMANENT, Outbound, Outcome
from mfconsole.engine.handlers import Handlers, HandlerError, LoadedHandler
from mfconsole.kinds import kind_of

HL7_ENCODING = "utf-8"
FHIR_JSON = "application/fhir+json"    # Outbound.transfer_syntax of a FHIR resource


@dataclass(frozen=True)
class Origin:
    """Where a delivery's object came from, as a handler's Context says it."""
    listener: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""                        # the sender's address, no port
    received_at: datetime | None = None   # timezone-aware (UTC)

    @classmethod
    def of(cls, row: Any) -> "Origin":
        """From a claimed delivery (outbox.Claimed) or a delivery row with its object's
        fields (listener, calling_ae, called_ae, peer "address:port", received_at)."""
        get = row.get if isinstance(row, dict) else (lambda key: getattr(row, key, None))
        peer = get("peer") or ""
        # The listener writes "address:port", an IPv6 address unbracketed: the port is
        # what follows the last colon.
        address = peer.rpartition(":")[0] if ":" in peer else peer
        at = get("received_at")
        return cls(listener=get("listener") or "", calling_ae=(get("calling_ae") or "").strip(),
                   called_ae=(get("called_ae") or "").strip(), peer=address.strip("[]"),
                   received_at=datetime.fromtimestamp(at, timezone.utc) if at else None)


@dataclass(frozen=True)
class Stamp:
    """Which handler version a delivery ran (recorded on the delivery row)."""
    name: str
    version: str
    digest: str


def control_id(delivery_id: int) -> str:
    """MSH-10 for a delivery: the same on every retry, so a receiver can de-duplicate."""
    return f"MF{delivery_id:012d}"


class Transformer:
    """The handler step of one destination."""

    def __init__(self, handlers: Handlers, destination: Any,
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.handlers = handlers
        self.destination = destination
        self.now = now

    def context(self, handler: LoadedHandler, route: str, delivery_id: int,
                origin: Origin | None = None) -> Any:
        from mfconsole.handlers.api import Context

        d = self.destination
        o = origin or Origin()
        return Context(route=route, destination=d.name, destination_kind=d.kind,
                       sending_application=getattr(d, "sending_application", "MFCONSOLE") or "",
                       sending_facility=getattr(d, "sending_facility", "") or "",
                       receiving_application=getattr(d, "receiving_application", "") or "",
                       receiving_facility=getattr(d, "receiving_facility", "") or "",
                       message_control_id=control_id(delivery_id), handler_name=handler.name,
                       handler_version=handler.version, now=self.now, calling_ae=o.calling_ae,
                       called_ae=o.called_ae, peer=o.peer, listener=o.listener,
                       received_at=o.received_at)

    def __call__(self, handler_name: str, route: str, delivery_id: int, obj: Outbound,
                 origin: Origin | None = None) -> tuple[Outbound | Outcome, Stamp | None]:
        """The object to send, or the Outcome that settles the delivery here. A
        study-level handler sees a study of this one object."""
        from mfconsole.handlers.api import DicomObject

        def make(handler: LoadedHandler, ctx: Any) -> Outbound | Outcome:
            source = DicomObject.from_bytes(obj.data, obj.transfer_syntax,
                                            sop_class_uid=obj.sop_class_uid,
                                            sop_instance_uid=obj.sop_instance_uid)
            if handler.level == "study":
                return self._study_outbound(handler, obj.study_uid, handler.run([source], ctx))
            return self._outbound(handler, obj, result=handler.run(source, ctx))

        return self._run(handler_name, route, delivery_id, origin, make)

    def is_study(self, handler_name: str | None) -> bool:
        """Whether the handler (as active now) is a study-level one."""
        if not handler_name:
            return False
        try:
            return self.handlers.get(handler_name).level == "study"
        except HandlerError:
            return False

    def study(self, handler_name: str, route: str, delivery_id: int, objs: list[Outbound],
              origin: Origin | None = None) -> tuple[Outbound | Outcome, Stamp | None]:
        """Run a study-level handler once over ``objs`` (one study, arrival order): the
        one Outbound for all of them, or the Outcome that settles them all here.
        ``delivery_id`` (the study's first delivery) names the message control id."""
        from mfconsole.handlers.api import DicomObject

        def make(handler: LoadedHandler, ctx: Any) -> Outbound | Outcome:
            study = [DicomObject.from_bytes(o.data, o.transfer_syntax, sop_class_uid=o.sop_class_uid,
                                            sop_instance_uid=o.sop_instance_uid) for o in objs]
            return self._study_outbound(handler, objs[0].study_uid, handler.run(study, ctx))

        return self._run(handler_name, route, delivery_id, origin, make)

    def _run(self, handler_name: str, route: str, delivery_id: int, origin: Origin | None,
             make: Callable[[LoadedHandler, Any], Outbound | Outcome]
             ) -> tuple[Outbound | Outcome, Stamp | None]:
        """``make(handler, ctx)`` with the active version of the handler; its errors
        (and input that does not parse) as the Outcome that settles the delivery."""
        try:
            handler = self.handlers.get(handler_name)
        except HandlerError as exc:
            return Outcome(PERMANENT, MESSAGE, "handler error", str(exc)), None
        stamp = Stamp(handler.name, handler.version, handler.digest)
        try:
            return make(handler, self.context(handler, route, delivery_id, origin)), stamp
        except HandlerError as exc:
            return Outcome(PERMANENT, MESSAGE, "handler error", str(exc)), stamp
        except ValueError as exc:    # DicomParseError: the stored bytes do not parse
            return Outcome(PERMANENT, MESSAGE, "handler input",
                           f"handler {handler.name} {handler.version} not run: {exc}"), stamp

    def _study_outbound(self, handler: LoadedHandler, study_uid: str, result: Any) -> Outbound | Outcome:
        """A study-level result as one Outbound: named by the study (its SOP Instance
        UID is the Study Instance UID, no SOP class), never a DICOM data set."""
        if isinstance(result, Dataset):
            raise HandlerError(f"handler {handler.name} {handler.version} (study level) returned a "
                               "DICOM data set; a study-level handler returns None, an HL7 message "
                               "or a FHIR resource (dict)")
        obj = Outbound("", study_uid, "", b"", study_uid)
        return self._outbound(handler, obj, result)

    def _outbound(self, handler: LoadedHandler, obj: Outbound, result: Any) -> Outbound | Outcome:
        kind = self.destination.kind
        # What the destination's kind takes: DICOM data sets, or HL7 messages (mllp).
        produces = kind_of(self.destination).produces
        takes_hl7 = produces == "hl7"
        if result is None:
            return Outcome(FILTERED, MESSAGE, "filtered", f"handler {handler.name} {handler.version} "
                           "returned None")
        if isinstance(result, Dataset):
            if produces != "dicom":
                raise HandlerError(f"handler {handler.name} {handler.version} returned a DICOM "
                                   f"data set for an {kind.upper()} destination")
            try:
                return replace(obj, data=with_original_pixels(result, obj.data, obj.transfer_syntax))
            except Exception as exc:   # values pydicom cannot write in this syntax
                raise HandlerError(f"handler {handler.name} {handler.version} returned a data set "
                                   f"that cannot be encoded ({exc.__class__.__name__})") from None
        if hasattr(result, "encode") and hasattr(result, "control_id"):
            if not takes_hl7:
                raise HandlerError(f"handler {handler.name} {handler.version} returned an HL7 "
                                   f"message for a {kind} destination")
            return replace(obj, data=result.encode().encode(HL7_ENCODING))
        if isinstance(result, dict):
            if produces != "fhir":
                raise HandlerError(f"handler {handler.name} {handler.version} returned a dict (a FHIR "
                                   f"resource) for a {kind} destination")
            try:
                data = json.dumps(result, separators=(",", ":"), ensure_ascii=False,
                                  allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise HandlerError(f"handler {handler.name} {handler.version} returned a resource "
                                   f"that is not JSON ({exc.__class__.__name__})") from None
            # The study's resource (contract): named by the Study Instance UID.
            return replace(obj, sop_class_uid="", sop_instance_uid=obj.study_uid,
                           transfer_syntax=FHIR_JSON, data=data)
        raise HandlerError(f"handler {handler.name} {handler.version} returned "
                           f"{type(result).__name__}; expected None, a DICOM data set, an HL7 "
                           "message or (for a FHIR destination) a dict")


def with_original_pixels(header: Dataset, original: bytes, transfer_syntax: str) -> bytes:
    """``header`` (its elements before (7FE0,0008)) in ``transfer_syntax``, then the
    original bytes from the first top-level element at or after (7FE0,0008) on,
    untouched (mfconsole/dicomheader.py finds it, as for coercion). A deflated object
    is inflated, and the result deflated again."""
    parsed = dicomheader.parse(original, transfer_syntax)
    syntax = parsed.syntax
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = syntax.little, syntax.implicit
    write_dataset(out, Dataset({t: e for t, e in header.items() if t < dicomheader.PIXELS_FROM}))
    data = out.getvalue() + parsed.data[parsed.end:]
    return dicomheader.deflate(data) if syntax.deflated else data

"""The mllp destination kind: HL7 v2 messages to an EHR interface engine, in order
over one connection (its keys, sender, target). A route to it needs a handler: only a
handler makes HL7 messages.

Listed in mfconsole/kinds.py. Loading it loads no sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mfconsole.config import (DestinationConfig, DestinationKind, Found, check_tcp_peer,
                              host_problem, port_problem, positive, setting)
from mfconsole.egress import Checks


def _hl7_identity(value: str) -> str | None:
    if len(value) > 227 or any(c in value for c in "|^~\\&\r\n"):
        return "must be plain text (no HL7 delimiters | ^ ~ \\ & or line breaks)"
    return None


def _one(value: int) -> str | None:
    return None if value == 1 else ("must be 1: HL7 messages are delivered in order, over one "
                                    "connection")


@dataclass(frozen=True, kw_only=True)
class MllpDestination(DestinationConfig):
    kind: ClassVar[str] = "mllp"
    max_associations: int = setting(1, doc="Always 1: messages go in order, over one connection.",
                                    check=_one)
    host: str = setting(doc="The EHR interface's host name or address.", check=host_problem,
                        label="host")
    port: int = setting(doc="Its MLLP port.", check=port_problem, label="port")
    ack_timeout_s: float = setting(30.0, doc="Seconds to wait for the ACK of each message.",
                                   check=positive)
    idle_timeout_s: float = setting(30.0, doc="An idle connection is closed after this.",
                                    check=positive)
    # MSH-3..6 of the messages handlers build.
    sending_application: str = setting("MFCONSOLE", doc="MSH-3 of the messages handlers build.",
                                       check=_hl7_identity)
    sending_facility: str = setting("", doc="MSH-4.", check=_hl7_identity)
    receiving_application: str = setting("", doc="MSH-5.", check=_hl7_identity)
    receiving_facility: str = setting("", doc="MSH-6.", check=_hl7_identity)


def _check(found: Found) -> None:
    if "coerce" in found.raw:
        found.fail("coerce", "does not apply to an mllp destination: it takes HL7 messages, "
                   "which a handler makes from the object as stored (coercion changes the "
                   "DICOM header a DICOM destination gets)")
    check_tcp_peer(found)


def _sender(d: Any, checks: Checks) -> Any:
    from mfconsole.mllp.sender import MllpSender

    return MllpSender(d, checks.tcp)


KIND = DestinationKind(MllpDestination, doc="HL7 v2 over MLLP to an EHR", sender=_sender,
                       target=lambda d: f"{d.host}:{d.port}", produces="hl7", check=_check)

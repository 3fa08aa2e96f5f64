"""What a DICOM peer's answer means for a delivery: the C-STORE response status and
A-ASSOCIATE-RJ tables of docs/outcomes.md as code (the Outcome and the answers every
protocol shares are in mfconsole/contract.py). stow/status.py reads a STOW-RS
FailureReason or WarningReason with the same C-STORE table.
"""

from __future__ import annotations

from mfconsole.contract import (BOUNDED, DELIVERED, DESTINATION, MESSAGE, PERMANENT, TRANSIENT,
                                WARNING, Outcome)


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


def context_refused(reason: str) -> Outcome:
    """No presentation context for this SOP class/transfer syntax: message scope."""
    return Outcome(PERMANENT, MESSAGE, "no presentation context", reason)

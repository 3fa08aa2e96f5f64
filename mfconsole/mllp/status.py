"""What an HL7 v2 receiver's ACK means for a delivery: the MSA-1 table of
docs/outcomes.md as code (the Outcome and the answers every protocol shares are in
mfconsole/contract.py).
"""

from __future__ import annotations

from mfconsole.contract import BOUNDED, DELIVERED, DESTINATION, MESSAGE, PERMANENT, TRANSIENT, Outcome

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

"""What every HTTP destination reads alike in an answer that is not a success: a
redirect, a refusal of the destination as configured, the server's transient trouble
(docs/outcomes.md). What the rest of the statuses mean is the protocol's (stow/status.py,
fhir/status.py).
"""

from __future__ import annotations

from mfconsole.contract import DESTINATION, PERMANENT, TRANSIENT, Outcome

TRANSIENT_WORDS = {408: "request timeout", 429: "too many requests", 500: "internal error",
                   502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}


def destination_answer(status: int, server: str, refusals: dict[int, str],
                       retry_after_s: float | None = None) -> Outcome | None:
    """The outcome of ``status`` when it concerns the destination as a whole (the
    ``server``, e.g. "the archive", is named in the reason; ``refusals`` maps a status
    to why the destination as configured is refused), else None."""
    code = f"HTTP {status}"
    if 300 <= status < 400:
        # Following a redirect would send PHI (and credentials) somewhere the egress
        # allowlist never approved.
        return Outcome(PERMANENT, DESTINATION, code, f"{server} redirects (HTTP {status}); "
                       "redirects are never followed: set url to the final address")
    if status in refusals:
        return Outcome(PERMANENT, DESTINATION, code, refusals[status])
    if status in TRANSIENT_WORDS or 500 <= status < 600:
        words = TRANSIENT_WORDS.get(status, "server error")
        return Outcome(TRANSIENT, DESTINATION, code, f"{server} answered {words} (HTTP {status})",
                       retry_after_s)
    return None

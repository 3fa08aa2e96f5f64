"""The dimse destination kind: C-STORE to a PACS (its keys, sender, echo, target).

Listed in mfconsole/kinds.py. Loading it loads no sender: sender.py is imported when
a sender or an echo is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mfconsole.config import (PRIORITIES, DestinationConfig, DestinationKind, Found,
                              ae_title_problem, check_tcp_peer, host_problem, is_loopback,
                              in_range, not_empty, port_problem, positive, secret_file_problem, setting)
from mfconsole.egress import Checks


# The upper layer of a destination that names none, and of an ``AET@host:port`` echo.
UPPER_LAYER = "mfconsole"


def _priority(value: str) -> str | None:
    return None if value in PRIORITIES else "must be low, medium or high"


SEND_AS = ("configured", "calling_ae")


def _send_as(value: str) -> str | None:
    return None if value in SEND_AS else 'must be "calling_ae" or "configured"'


@dataclass(frozen=True, kw_only=True)
class DimseDestination(DestinationConfig):
    kind: ClassVar[str] = "dimse"
    host: str = setting(doc="The PACS's host name or address.", check=host_problem, label="host")
    port: int = setting(doc="Its DICOM port.", check=port_problem, label="port")
    ae_title: str = setting(doc="Called AE title of the PACS.", check=ae_title_problem,
                            label="called AE title")
    calling_ae_title: str = setting("MFCONSOLE", doc="The calling AE title we present.",
                                    check=ae_title_problem, label="calling AE title")
    acse_timeout_s: float = setting(30.0, doc="Association set-up (A-ASSOCIATE-AC/RJ) timeout.",
                                    check=positive)
    dimse_timeout_s: float = setting(30.0, doc="Timeout of one C-STORE response.", check=positive)
    idle_timeout_s: float = setting(30.0, doc="An idle association is released after this.",
                                    check=positive)
    priority: str = setting("medium", doc="DIMSE priority of our C-STORE requests: low, medium "
                            "or high.", check=_priority)
    username: str | None = setting(None, doc="User identity sent with the association request.",
                                   check=not_empty)
    passcode_file: Path | None = setting(
        None, doc="Its passcode, in a file only this user may read (never sent in clear to "
        "another host).", check=secret_file_problem)
    send_as: str = setting(
        "configured", doc='"calling_ae": present the calling AE title each object arrived with '
        '(objects of different senders go on different associations); "configured": '
        "calling_ae_title.", check=_send_as)
    storage_commitment: bool = setting(
        False, doc="Ask the PACS to confirm custody (Storage Commitment Push Model) of what "
        "it took: deliveries end committed, not just delivered.")
    commitment_timeout_s: float = setting(
        300.0, doc="Wait this long for the PACS's N-EVENT-REPORT before asking again.",
        check=positive)
    commitment_retries: int = setting(
        2, doc="Further commitment requests after a timeout, and re-sends of an object the "
        "PACS reports failed (retryable reason); then a dead letter.", check=in_range(0, 10))


def _check(found: Found) -> None:
    v = found.values
    if "passcode_file" in found.raw and v["username"] is None:
        found.fail("passcode_file", "needs username (user identity is username + passcode)")
    if not check_tcp_peer(found):
        return
    host = v["host"]
    if v["passcode_file"] is not None and host is not None and v["tls"] is None \
            and not is_loopback(host):
        found.fail("passcode_file", f"the passcode would travel in clear to '{host}' "
                   "(allow_cleartext does not cover credentials); give this destination "
                   "tls, or drop passcode_file")


def _sender(d: Any, checks: Checks) -> Any:
    from mfconsole.dimse.sender import Peer
    from mfconsole.ul.sender import UlSender

    return UlSender(Peer.from_destination(d), checks.tcp)


def echo(peer: Any, check: Any) -> Any:
    """C-ECHO ``peer`` (a sender.Peer): an EchoResult."""
    from mfconsole.dimse.sender import run_echo
    from mfconsole.ul.echo import echo_exchange

    return run_echo(peer, check, echo_exchange)


def probe_contexts(peer: Any, pairs: Any, check: Any) -> Any:
    """Which (SOP class, transfer syntax) pairs ``peer`` accepts: (failure Outcome or
    None, [(SOP class, transfer syntax, accepted)])."""
    from mfconsole.dimse.sender import run_probe
    from mfconsole.ul.echo import probe_exchange

    return run_probe(peer, pairs, check, probe_exchange)


def _echo(d: Any, checks: Checks) -> Any:
    from mfconsole.dimse.sender import Peer

    return echo(Peer.from_destination(d), checks.tcp)


def _commitment(d: Any, checks: Checks) -> Any:
    from mfconsole.dimse.sender import Peer
    from mfconsole.ul.commitment import CommitmentSCU

    return CommitmentSCU(Peer.from_destination(d), checks.tcp)


KIND = DestinationKind(DimseDestination, doc="C-STORE to a PACS", sender=_sender,
                       target=lambda d: f"{d.ae_title}@{d.host}:{d.port}", check=_check,
                       echo=_echo, commitment=_commitment)

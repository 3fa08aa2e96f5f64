"""The dimse destination kind: C-STORE to a PACS (its keys, sender, echo, target).

Listed in mfconsole/kinds.py. Loading it loads no sender: sender.py is imported when
a sender or an echo is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mfconsole.config import (PRIORITIES, UPPER_LAYERS, DestinationConfig, DestinationKind, Found,
                              ae_title_problem, check_tcp_peer, host_problem, is_loopback,
                              not_empty, port_problem, positive, secret_file_problem, setting)
from mfconsole.egress import Checks


# The upper layer of a destination that names none, and of an ``AET@host:port`` echo.
UPPER_LAYER = "mfconsole"


def _priority(value: str) -> str | None:
    return None if value in PRIORITIES else "must be low, medium or high"


def _upper_layer(value: str) -> str | None:
    return None if value in UPPER_LAYERS else f"must be one of {', '.join(map(repr, UPPER_LAYERS))}"


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
    upper_layer: str = setting(
        UPPER_LAYER, doc='Who speaks DICOM for us: "pynetdicom", or "mfconsole" (its own upper '
        "layer: one blocking socket, requests pipelined within the peer's asynchronous "
        "operations window). Deliveries, echo and test all go through it.", check=_upper_layer)


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
    from mfconsole.dimse.sender import DimseSender, Peer

    if d.upper_layer == "mfconsole":
        from mfconsole.ul.sender import UlSender

        return UlSender(Peer.from_destination(d), checks.tcp)
    return DimseSender(Peer.from_destination(d), checks.tcp)


def _layer(peer: Any) -> Any:
    """The module holding ``peer``'s upper layer's echo_exchange and probe_exchange."""
    if peer.upper_layer == "mfconsole":
        from mfconsole.ul import echo as ours

        return ours
    from mfconsole.dimse import sender

    return sender


def echo(peer: Any, check: Any) -> Any:
    """C-ECHO ``peer`` (a sender.Peer) through its upper layer: an EchoResult."""
    from mfconsole.dimse.sender import run_echo

    return run_echo(peer, check, _layer(peer).echo_exchange)


def probe_contexts(peer: Any, pairs: Any, check: Any) -> Any:
    """Which (SOP class, transfer syntax) pairs ``peer`` accepts, asked through its
    upper layer: (failure Outcome or None, [(SOP class, transfer syntax, accepted)])."""
    from mfconsole.dimse.sender import run_probe

    return run_probe(peer, pairs, check, _layer(peer).probe_exchange)


def _echo(d: Any, checks: Checks) -> Any:
    from mfconsole.dimse.sender import Peer

    return echo(Peer.from_destination(d), checks.tcp)


KIND = DestinationKind(DimseDestination, doc="C-STORE to a PACS", sender=_sender,
                       target=lambda d: f"{d.ae_title}@{d.host}:{d.port}", check=_check,
                       echo=_echo)

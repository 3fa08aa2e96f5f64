"""The stow destination kind: DICOMweb STOW-RS to an archive (its keys, sender, echo,
target).

https:// is TLS (the tls table is optional: without ca_file the system trust store
decides). Over http, a non-loopback archive needs allow_cleartext (as a listener
does), and credentials never go there at all.

Listed in mfconsole/kinds.py. Loading it loads no sender: client.py (httpx) is
imported when a sender or an echo is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mfconsole.config import (DestinationKind, check_http_peer, http_prefix_problem, https_url,
                              in_range, positive, setting)
from mfconsole.egress import Checks
from mfconsole.httpdest.keys import HttpDestination


@dataclass(frozen=True, kw_only=True)
class StowDestination(HttpDestination):
    kind: ClassVar[str] = "stow"
    url: str = setting(doc="The DICOMweb base URL (without /studies), under an "
                       "[egress].allowed_http prefix.", check=http_prefix_problem, label="url")
    batch_max_objects: int = setting(10, doc="Instances per request.", check=in_range(1, 1000))
    batch_max_mb: int = setting(16, doc="MiB per request (a larger object travels alone).",
                                check=in_range(1, 4096))
    response_timeout_s: float = setting(60.0, doc="The archive's answer after the request is "
                                        "sent.", check=positive)
    idle_timeout_s: float = setting(30.0, doc="An idle connection is closed after this.",
                                    check=positive)


def _sender(d: Any, checks: Checks) -> Any:
    from mfconsole.stow.client import StowSender, Target

    return StowSender(Target.from_destination(d), checks.http)


def _echo(d: Any, checks: Checks) -> Any:
    from mfconsole.stow.client import Target, echo

    return echo(Target.from_destination(d), checks.http)


KIND = DestinationKind(StowDestination, doc="DICOMweb STOW-RS to an archive", sender=_sender,
                       target=lambda d: str(d.url), check=check_http_peer, echo=_echo,
                       encrypted=https_url)

"""The fhir destination kind: FHIR R4 resources (made by a study-level handler, e.g.
handlers/study_to_imagingstudy.py) to a FHIR server, as conditional updates.

The same url and credential keys as stow (httpdest/keys.py), and the same rules for them,
TLS and egress (config.check_http_peer).
Listed in mfconsole/kinds.py. Loading it loads no sender: client.py (httpx) is
imported when a sender or an echo is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mfconsole.config import (TRIGGERS, DestinationKind, check_http_peer, http_prefix_problem,
                              https_url, one_of, positive, setting)
from mfconsole.egress import Checks
from mfconsole.httpdest.keys import HttpDestination


@dataclass(frozen=True, kw_only=True)
class FhirDestination(HttpDestination):
    kind: ClassVar[str] = "fhir"
    url: str = setting(doc="The FHIR server's base URL (resources go to {url}/ImagingStudy…), "
                       "under an [egress].allowed_http prefix.", check=http_prefix_problem,
                       label="url")
    response_timeout_s: float = setting(60.0, doc="The server's answer after the request is "
                                        "sent.", check=positive)
    idle_timeout_s: float = setting(30.0, doc="An idle connection is closed after this.",
                                    check=positive)
    # A resource describes a whole study: by default it is built once the study is quiet.
    trigger: str = setting(
        "study_stable", doc='"study_stable" (default here): one resource per study once none of '
        'its objects has arrived for stable_after_s; "instance" only with an instance-level handler.',
        check=one_of(TRIGGERS))


def _sender(d: Any, checks: Checks) -> Any:
    from mfconsole.fhir.client import FhirSender, Target

    return FhirSender(Target.from_destination(d), checks.http)


def _echo(d: Any, checks: Checks) -> Any:
    from mfconsole.fhir.client import Target, echo

    return echo(Target.from_destination(d), checks.http)


KIND = DestinationKind(FhirDestination, doc="FHIR R4 resources to a FHIR server", sender=_sender,
                       target=lambda d: str(d.url), produces="fhir", check=check_http_peer,
                       echo=_echo, encrypted=https_url)

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
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from mfconsole.config import (DestinationConfig, DestinationKind, Found, http_prefix_problem,
                              in_range, is_loopback, not_empty, positive, readable_secret_problem,
                              setting)
from mfconsole.egress import Checks


@dataclass(frozen=True, kw_only=True)
class StowDestination(DestinationConfig):
    kind: ClassVar[str] = "stow"
    url: str = setting(doc="The DICOMweb base URL (without /studies), under an "
                       "[egress].allowed_http prefix.", check=http_prefix_problem, label="url")
    bearer_token_file: Path | None = setting(
        None, doc="Bearer token (the whole file), read at every request; chmod 600.",
        check=readable_secret_problem)
    username: str | None = setting(None, doc="Basic authentication: the user name (with "
                                   "password_file).", check=not_empty)
    password_file: Path | None = setting(None, doc="Basic authentication: the password, in a "
                                         "file read at every request; chmod 600.",
                                         check=readable_secret_problem)
    batch_max_objects: int = setting(10, doc="Instances per request.", check=in_range(1, 1000))
    batch_max_mb: int = setting(16, doc="MiB per request (a larger object travels alone).",
                                check=in_range(1, 4096))
    response_timeout_s: float = setting(60.0, doc="The archive's answer after the request is "
                                        "sent.", check=positive)
    idle_timeout_s: float = setting(30.0, doc="An idle connection is closed after this.",
                                    check=positive)


def _https(found: Found) -> bool:
    url = found.raw.get("url")
    try:
        return isinstance(url, str) and urlsplit(url).scheme.lower() == "https"
    except ValueError:
        return False


def _check(found: Found) -> None:
    v, url = found.values, found.values["url"]
    if url is not None:
        why = found.http_problem(url)
        if why:
            found.fail("url", why)
            return
    if v["bearer_token_file"] is not None and (v["username"] or v["password_file"]):
        found.fail("bearer_token_file", "use either bearer_token_file or username + "
                   "password_file (basic authentication), not both")
    elif v["password_file"] is not None and v["username"] is None:
        found.fail("password_file", "needs username (basic authentication is username + password)")
    elif v["username"] is not None and v["password_file"] is None:
        found.fail("username", "needs password_file (basic authentication is username + password)")
    if url is not None and urlsplit(url).scheme.lower() == "http":
        if "tls" in found.raw:
            found.fail("tls", "is only used with an https:// url")
        host = urlsplit(url).hostname or ""
        if not is_loopback(host):
            if v["allow_cleartext"] is False:
                found.fail("url", f"'{host}' is not a loopback address and the url is http://; "
                           "PHI would cross the network in cleartext. Use https://, or set "
                           f"{found.path}.allow_cleartext = true to accept that risk")
            for key in ("bearer_token_file", "password_file"):
                if v[key] is not None:
                    found.fail(key, "credentials are never sent in cleartext to a non-loopback "
                               "host; use an https:// url")


def _sender(d: Any, checks: Checks) -> Any:
    from mfconsole.stow.client import StowSender, Target

    return StowSender(Target.from_destination(d), checks.http)


def _echo(d: Any, checks: Checks) -> Any:
    from mfconsole.stow.client import Target, echo

    return echo(Target.from_destination(d), checks.http)


KIND = DestinationKind(StowDestination, doc="DICOMweb STOW-RS to an archive", sender=_sender,
                       target=lambda d: str(d.url), check=_check, echo=_echo, encrypted=_https)

"""Where and how an HTTP destination is reached: its url, TLS, credentials and
timeouts (Target), what a reason may name of it (origin), and the credentials and
TLS context, read when a request is made so a rotation needs no restart.

Credentials are never logged or put in a reason; a file that cannot be used raises
ConfigurationProblem, whose message names the key.
"""

from __future__ import annotations

import base64
import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mfconsole import tls
from mfconsole.secret_file import SecretFileError, read_secret
from mfconsole.contract import DESTINATION, PERMANENT, Outcome


@dataclass(frozen=True)
class Target:
    """Where and how to send. A protocol's subclass adds its own keys (each field is a
    destination key of the same name)."""
    url: str
    # A config.TLSConfig or None, as tls.client_context takes it (config stands above
    # this package: it loads the kinds, which load their clients).
    tls: Any = None
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    connect_timeout_s: float = 10.0
    response_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    allow_cleartext: bool = False

    @classmethod
    def from_destination(cls, d: Any) -> Any:
        """Built from a destination's config: every field from the key of its name."""
        return cls(**{f.name: getattr(d, f.name) for f in dataclasses.fields(cls)})

    @property
    def https(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "https"

    @property
    def loopback_only(self) -> bool:
        """http:// without allow_cleartext: only a loopback address will do."""
        return urlsplit(self.url).scheme.lower() == "http" and not self.allow_cleartext

    @property
    def extensions(self) -> dict[str, Any]:
        """httpx request extensions: tls.server_name is the name the server's
        certificate must carry (and the SNI sent) instead of the url's host."""
        return {"sni_hostname": self.tls.server_name} if self.tls and self.tls.server_name else {}

    @property
    def origin(self) -> str:
        return origin(self.url)


def origin(url: str) -> str:
    """scheme://host:port of a URL: what a reason may name (never a path or query)."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
        host = parts.hostname or "?"
    except ValueError:
        return "(unparsable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}:{port}"


# -- credentials and TLS -------------------------------------------------------------

class ConfigurationProblem(Exception):
    """A credential or certificate file cannot be used; the message names the key."""


def configuration_failure(problem: ConfigurationProblem) -> Outcome:
    """Nothing can go until the operator fixes the file: the destination stops."""
    return Outcome(PERMANENT, DESTINATION, "configuration", str(problem))


def _secret(path: Path, key: str) -> str:
    try:
        return read_secret(path, key)
    except SecretFileError as exc:
        raise ConfigurationProblem(str(exc)) from None


def authorization(target: Target) -> str | None:
    """The Authorization header value, read from the files now (rotation-safe)."""
    if target.bearer_token_file is not None:
        return "Bearer " + _secret(target.bearer_token_file, "bearer_token_file")
    if target.username is not None and target.password_file is not None:
        password = _secret(target.password_file, "password_file")
        pair = f"{target.username}:{password}".encode("utf-8")
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


def tls_context(target: Target) -> ssl.SSLContext:
    """mfconsole's client policy (tls.py): verification always on; tls.ca_file
    replaces the system trust store when set."""
    try:
        return tls.client_context(target.tls)
    except tls.TLSSetupError as exc:
        raise ConfigurationProblem(str(exc)) from None

"""[alerts], [alerts.email] and [alerts.webhook]: when and where alerts go.

Read with config.py's reader (problems with their key paths), in the same pass as
the rest of the file. Both channels obey [egress] like every destination: the SMTP
server's host:port must be in allowed_tcp, the webhook url under an allowed_http
prefix; the sender checks again before every connection (a reload may narrow it).
Cleartext follows the project's rule: only to a loopback address, unless
allow_cleartext says the risk is accepted, and credentials never in cleartext off
loopback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from mfconsole.egress import is_loopback
from mfconsole.value_checks import not_negative as _not_negative, port as _port, positive as _positive

ALERTS_KEYS = frozenset({"enabled", "hold_s", "interval_s", "email", "webhook"})
EMAIL_KEYS = frozenset({"host", "port", "starttls", "allow_cleartext", "username",
                        "password_file", "from", "to", "ca_file", "timeout_s"})
WEBHOOK_KEYS = frozenset({"url", "bearer_token_file", "ca_file", "allow_cleartext", "timeout_s"})


@dataclass(frozen=True)
class ClientTLS:
    """What mfconsole/tls.py's client policy reads: whom to trust (None: the system
    store). No client certificate: SMTP and webhooks authenticate by credentials."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class EmailConfig:
    host: str
    sender: str                      # the `from` key
    to: tuple[str, ...]
    port: int = 587
    starttls: bool = True
    allow_cleartext: bool = False
    username: str | None = None
    password_file: Path | None = None   # read at each send (rotation needs no restart)
    tls: ClientTLS = ClientTLS()
    timeout_s: float = 30.0

    @property
    def loopback_only(self) -> bool:
        """Without STARTTLS and without consent, only a loopback address will do."""
        return not self.starttls and not self.allow_cleartext


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    bearer_token_file: Path | None = None
    tls: ClientTLS = ClientTLS()
    allow_cleartext: bool = False
    timeout_s: float = 30.0

    @property
    def loopback_only(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "http" and not self.allow_cleartext


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts]: a condition (a mfconsole/health.py problem key) must last ``hold_s``
    before it is announced, and be gone ``hold_s`` before its clearing is; evaluated
    every ``interval_s``."""
    enabled: bool = True
    hold_s: float = 60.0
    interval_s: float = 10.0
    email: EmailConfig | None = None
    webhook: WebhookConfig | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(name for name, c in (("email", self.email), ("webhook", self.webhook))
                     if c is not None)


def _text(value: str) -> str | None:
    if not value.strip() or any(ord(ch) < 0x20 for ch in value):
        return "must be one non-empty line"
    return None


def _address(value: str) -> str | None:
    """A mail address as it goes into a header and an SMTP command: one line, an @."""
    if _text(value) or "@" not in value or any(ch in value for ch in " <>,;"):
        return "must be a mail address (name@domain)"
    return None


@dataclass(frozen=True)
class Checks:
    """What config.py judges for these settings, handed in (config.py imports this
    module, so it cannot import config.py): each returns None when fine, else why."""
    secret: Callable[[Path], str | None]          # a credential file
    tcp: Callable[[str, int], str | None]         # host:port against [egress].allowed_tcp
    http: Callable[[str], str | None]             # a url against [egress].allowed_http
    http_url: Callable[[str], str | None]         # the shape of an http(s) url


def read(r: Any, raw: Any, resolve: Callable[[str], Path], checks: Checks) -> AlertsConfig | None:
    """[alerts] with config.py's reader ``r``; None when the table is absent (or
    wrong: the problem is recorded)."""
    if raw is None:
        return None
    t = r.table(raw, "alerts", ALERTS_KEYS)
    if not isinstance(raw, dict):
        return None
    start = len(r.problems)
    enabled = r.get(t, "alerts", "enabled", bool, True)
    hold_s = r.get(t, "alerts", "hold_s", float, 60.0, _not_negative)
    interval_s = r.get(t, "alerts", "interval_s", float, 10.0, _positive)
    email = _email(r, t["email"], resolve, checks) if "email" in t else None
    webhook = _webhook(r, t["webhook"], resolve, checks) if "webhook" in t else None
    if enabled and "email" not in t and "webhook" not in t:
        r.fail("alerts", "names no channel: add [alerts.email] or [alerts.webhook] "
               "(or set enabled = false)")
    if len(r.problems) > start:
        return None
    return AlertsConfig(enabled=enabled, hold_s=hold_s, interval_s=interval_s, email=email,
                        webhook=webhook)


def _secret(r: Any, t: dict[str, Any], p: str, key: str, resolve: Callable[[str], Path],
            checks: Checks) -> Path | None:
    value = r.get(t, p, key, str, None, _text)
    if value is None:
        return None
    path = resolve(value)
    why = checks.secret(path)
    if why:
        r.fail(f"{p}.{key}", why)
    return path


def _ca(r: Any, t: dict[str, Any], p: str, resolve: Callable[[str], Path]) -> ClientTLS:
    from mfconsole.tls import TLSSetupError, client_context

    value = r.get(t, p, "ca_file", str, None, _text)
    if value is None:
        return ClientTLS()
    tls = ClientTLS(ca_file=resolve(value))
    try:
        client_context(tls)       # a bundle that cannot be used is reported now, by its key
    except TLSSetupError as exc:
        r.fail(f"{p}.ca_file", exc.why)
    return tls


def _email(r: Any, raw: Any, resolve: Callable[[str], Path], checks: Checks) -> EmailConfig | None:
    p = "alerts.email"
    t = r.table(raw, p, EMAIL_KEYS)
    if not isinstance(raw, dict):
        return None
    start = len(r.problems)
    host = r.get(t, p, "host", str, ..., _text)
    port = r.get(t, p, "port", int, 587, _port)
    starttls = r.get(t, p, "starttls", bool, True)
    cleartext = r.get(t, p, "allow_cleartext", bool, False)
    username = r.get(t, p, "username", str, None, _text)
    password_file = _secret(r, t, p, "password_file", resolve, checks)
    sender = r.get(t, p, "from", str, ..., _address)
    to = r.string_list(t, p, "to", ..., _address)
    if to == () and "to" in t:
        r.fail(f"{p}.to", "must name at least one address")
    tls = _ca(r, t, p, resolve)
    timeout_s = r.get(t, p, "timeout_s", float, 30.0, _positive)
    if "password_file" in t and "username" not in t:
        r.fail(f"{p}.password_file", "needs username (SMTP AUTH is username + password)")
    elif "username" in t and "password_file" not in t:
        r.fail(f"{p}.username", "needs password_file (SMTP AUTH is username + password)")
    if host is not None and port is not None:
        why = checks.tcp(host, port)
        if why:
            r.fail(f"{p}.host", why.replace("this destination", "this mail server"))
        elif starttls is False and not is_loopback(host):
            if not cleartext:
                r.fail(f"{p}.starttls", f"'{host}' is not a loopback address and starttls is off; "
                       "alerts would cross the network in cleartext. Keep starttls = true, or "
                       f"set {p}.allow_cleartext = true to accept that risk")
            if "password_file" in t:
                r.fail(f"{p}.password_file", "credentials are never sent in cleartext to a "
                       "non-loopback host; keep starttls = true")
    if cleartext and starttls:
        r.fail(f"{p}.allow_cleartext", "does not apply: starttls is on")
    if len(r.problems) > start:
        return None
    return EmailConfig(host=host, sender=sender, to=to, port=port, starttls=starttls,
                       allow_cleartext=cleartext, username=username, password_file=password_file,
                       tls=tls, timeout_s=timeout_s)


def _webhook(r: Any, raw: Any, resolve: Callable[[str], Path], checks: Checks
             ) -> WebhookConfig | None:
    p = "alerts.webhook"
    t = r.table(raw, p, WEBHOOK_KEYS)
    if not isinstance(raw, dict):
        return None
    start = len(r.problems)
    url = r.get(t, p, "url", str, ..., checks.http_url)
    token = _secret(r, t, p, "bearer_token_file", resolve, checks)
    tls = _ca(r, t, p, resolve)
    cleartext = r.get(t, p, "allow_cleartext", bool, False)
    timeout_s = r.get(t, p, "timeout_s", float, 30.0, _positive)
    if url is not None:
        why = checks.http(url)
        if why:
            r.fail(f"{p}.url", why.replace("this destination", "this webhook"))
        elif urlsplit(url).scheme.lower() == "http":
            host = urlsplit(url).hostname or ""
            if "ca_file" in t:
                r.fail(f"{p}.ca_file", "is only used with an https:// url")
            if not is_loopback(host):
                if not cleartext:
                    r.fail(f"{p}.url", f"'{host}' is not a loopback address and the url is "
                           f"http://; use https://, or set {p}.allow_cleartext = true to accept "
                           "that risk")
                if "bearer_token_file" in t:
                    r.fail(f"{p}.bearer_token_file", "credentials are never sent in cleartext "
                           "to a non-loopback host; use an https:// url")
        elif cleartext:
            r.fail(f"{p}.allow_cleartext", "does not apply: the url is https://")
    if len(r.problems) > start:
        return None
    return WebhookConfig(url=url, bearer_token_file=token, tls=tls, allow_cleartext=cleartext,
                         timeout_s=timeout_s)

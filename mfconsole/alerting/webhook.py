"""Alert webhook: one JSON POST per message to the configured url, under
[egress].allowed_http (checked before every request; the connection goes to exactly
the address checked, through the same pinned transport as STOW-RS and FHIR), no
redirect followed, no proxy or certificates from the environment, the bearer token
read from its file at each request. A 2xx answer is success; anything else raises
SendError naming the origin and the status, never the body.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx

from mfconsole import __version__, egress, tls
from mfconsole.alerting import SendError
from mfconsole.alerting.message import Message
from mfconsole.alerting.settings import WebhookConfig
from mfconsole.secret_file import SecretFileError, read_secret


def payload(message: Message) -> dict[str, Any]:
    """What the receiver gets: ``id`` is stable across a resend (deduplicate on it)."""
    return {"source": "mfconsole", "host": socket.gethostname(), "id": message.id,
            "key": message.key, "event": message.kind, "subject": message.subject,
            "text": message.text, "at": message.created_at}


def _token(cfg: WebhookConfig) -> str | None:
    if cfg.bearer_token_file is None:
        return None
    try:
        return read_secret(cfg.bearer_token_file, "alerts.webhook.bearer_token_file")
    except SecretFileError as exc:
        raise SendError(str(exc)) from None


def send(cfg: WebhookConfig, message: Message, check_http: egress.HttpCheck) -> str:
    """POST ``message``; what was done, for the audit trail."""
    # The destinations' HTTP plumbing; its package also holds their config keys (which
    # import config.py, which imports this package's settings): imported when used.
    from mfconsole.httpdest.target import origin
    from mfconsole.httpdest.transport import PinnedTransport

    where = origin(cfg.url)
    try:
        verdict = check_http(cfg.url, loopback_only=cfg.loopback_only)
    except OSError as exc:
        raise SendError(f"cannot connect to {where}: {exc}") from None
    if isinstance(verdict, egress.Refusal):
        raise SendError(f"egress refused: {verdict.reason}")
    headers = {"User-Agent": f"mfconsole/{__version__}", "Content-Type": "application/json"}
    token = _token(cfg)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        context = tls.client_context(cfg.tls) if cfg.url.lower().startswith("https:") else None
    except tls.TLSSetupError as exc:
        raise SendError(f"alerts.webhook.{exc}") from None
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    body = json.dumps(payload(message)).encode("utf-8")
    try:
        with httpx.Client(transport=PinnedTransport(verdict, context, limits), trust_env=False,
                          follow_redirects=False, timeout=cfg.timeout_s) as client:
            status = client.post(cfg.url, content=body, headers=headers).status_code
    except httpx.HTTPError as exc:
        raise SendError(f"no answer from {where} ({exc.__class__.__name__})") from None
    if not 200 <= status < 300:
        raise SendError(f"{where} answered HTTP {status}")
    return f"webhook to {where}: HTTP {status}"

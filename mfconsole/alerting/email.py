"""Alert mail over SMTP: STARTTLS under mfconsole's client TLS policy (tls.py:
chain and name verified, against ca_file or the system store), AUTH with the
password read from its file at each send, to the address [egress].allowed_tcp
allows for the server's name (checked before every connection: the socket goes to
exactly that address, while STARTTLS still verifies the configured name).

Failures raise SendError with the server's name, the SMTP code or the exception's
class: never the server's words nor a credential.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formatdate

from mfconsole import egress, tls
from mfconsole.alerting import SendError
from mfconsole.alerting.message import Message
from mfconsole.alerting.settings import EmailConfig
from mfconsole.secret_file import SecretFileError, read_secret


def _password(cfg: EmailConfig) -> str:
    assert cfg.password_file is not None
    try:
        return read_secret(cfg.password_file, "alerts.email.password_file")
    except SecretFileError as exc:
        raise SendError(str(exc)) from None


class _PinnedSMTP(smtplib.SMTP):
    """smtplib's client, connecting to the address egress checked instead of resolving
    the server's name again; STARTTLS verifies (and sends as SNI) the configured name
    (smtplib takes it from ``_host``, set by its constructor, which here connects to
    nothing)."""

    def __init__(self, dial: egress.Dial, timeout: float):
        super().__init__(local_hostname=socket.gethostname() or "localhost", timeout=timeout)
        self._dial = dial
        self._host = dial.host

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((self._dial.address, self._dial.port), timeout)


def mail(cfg: EmailConfig, message: Message) -> EmailMessage:
    m = EmailMessage()
    m["Subject"] = message.subject
    m["From"] = cfg.sender
    m["To"] = ", ".join(cfg.to)
    m["Date"] = formatdate(message.created_at, localtime=True)
    # The same message sent twice (a lost answer to the final dot) carries the same id.
    m["Message-ID"] = f"<mfconsole-alert-{message.id}-{int(message.created_at)}@{_domain(cfg.sender)}>"
    m["X-Mfconsole-Alert"] = f"{message.kind} {message.key}"
    m.set_content(message.text + "\n")
    return m


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


def send(cfg: EmailConfig, message: Message, check_tcp: egress.TcpCheck) -> str:
    """Hand ``message`` to the SMTP server; what was done, for the audit trail."""
    where = f"{cfg.host}:{cfg.port}"
    try:
        verdict = check_tcp(cfg.host, cfg.port, loopback_only=cfg.loopback_only)
    except OSError as exc:
        raise SendError(f"cannot connect to {where}: {exc}") from None
    if isinstance(verdict, egress.Refusal):
        raise SendError(f"egress refused: {verdict.reason}")
    try:
        context = tls.client_context(cfg.tls) if cfg.starttls else None
    except tls.TLSSetupError as exc:
        raise SendError(f"alerts.email.{exc}") from None
    try:
        with _PinnedSMTP(verdict, cfg.timeout_s) as smtp:
            smtp.connect(cfg.host, cfg.port)
            smtp.ehlo()
            if context is not None:
                smtp.starttls(context=context)
                smtp.ehlo()
            if cfg.username is not None:
                smtp.login(cfg.username, _password(cfg))
            refused = smtp.send_message(mail(cfg, message), from_addr=cfg.sender,
                                        to_addrs=list(cfg.to))
    except SendError:
        raise
    except smtplib.SMTPNotSupportedError:
        raise SendError(f"{where} does not offer STARTTLS (or AUTH)") from None
    except smtplib.SMTPAuthenticationError as exc:
        raise SendError(f"{where} refused the login (SMTP {exc.smtp_code})") from None
    except smtplib.SMTPRecipientsRefused as exc:
        raise SendError(f"{where} refused every recipient ({len(exc.recipients)})") from None
    except smtplib.SMTPResponseException as exc:
        raise SendError(f"{where} answered SMTP {exc.smtp_code}") from None
    except ssl.SSLError as exc:
        raise SendError(f"STARTTLS with {where} failed: {tls.failure_reason(exc)}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise SendError(f"cannot send through {where}: {exc.__class__.__name__}") from None
    accepted = len(cfg.to) - len(refused)
    return f"mail to {accepted} of {len(cfg.to)} recipient(s) through {where}"

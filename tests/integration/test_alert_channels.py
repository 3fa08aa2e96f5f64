"""The two alert channels against real receivers, called directly: mail through
aiosmtpd with STARTTLS verified against the configured CA (a server certificate of
another CA refused, nothing sent), a wrong password refused by the server (the
reason names the code, never the password), the egress check before connecting;
the webhook over HTTPS verified the same way, a non-2xx answer a failure."""

from __future__ import annotations

import pytest

from alert_sinks import SmtpSink, WebhookSink
from mfconsole import egress
from mfconsole.alerting import SendError, email, webhook
from mfconsole.alerting.message import Message
from mfconsole.alerting.settings import ClientTLS, EmailConfig, WebhookConfig
from tlsgen import make_pki, server_context

MESSAGE = Message(id=7, key="destination_down:pacs", kind="started",
                  subject="[mfconsole] pacs down", text="destination pacs: down (refused)",
                  created_at=1_700_000_000.0)


def tcp_check(allowed):
    return lambda host, port, **kw: egress.check_tcp(allowed, egress.pin(allowed), host, port, **kw)


def http_check(allowed):
    return lambda url, **kw: egress.check_http(allowed, egress.pin((), allowed), url, **kw)


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def mail_config(tmp_path, smtp, pki, password="s3cret-pw", **extra) -> EmailConfig:
    pw = tmp_path / "pw"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    return EmailConfig(host="127.0.0.1", port=smtp.port, sender="mf@example.org",
                       to=("a@example.org",), username="mf", password_file=pw,
                       tls=ClientTLS(ca_file=pki["ca.crt"]), timeout_s=10, **extra)


def test_mail_over_verified_starttls(tmp_path, pki):
    smtp = SmtpSink(pki, "mf", "s3cret-pw").start()
    try:
        done = email.send(mail_config(tmp_path, smtp, pki), MESSAGE, tcp_check([f"127.0.0.1:{smtp.port}"]))
        assert "1 of 1 recipient" in done
        assert smtp.subjects() == ["[mfconsole] pacs down"]
        assert smtp.mails[0]["Message-ID"].startswith("<mfconsole-alert-7-")
    finally:
        smtp.stop()


def test_mail_refused_before_anything_is_sent(tmp_path, pki):
    smtp = SmtpSink(pki, "mf", "s3cret-pw").start()
    try:
        cfg = mail_config(tmp_path, smtp, pki)
        # Another CA: STARTTLS fails verification, no login is tried.
        rogue = EmailConfig(**{**cfg.__dict__, "tls": ClientTLS(ca_file=pki["rogue-ca.crt"])})
        with pytest.raises(SendError, match="STARTTLS with 127.0.0.1:.* failed"):
            email.send(rogue, MESSAGE, tcp_check([f"127.0.0.1:{smtp.port}"]))
        # Not in allowed_tcp: no connection at all.
        with pytest.raises(SendError, match="egress refused"):
            email.send(cfg, MESSAGE, tcp_check(["127.0.0.1:1"]))
        # A wrong password: the server's code, never the password.
        with pytest.raises(SendError, match="refused the login") as info:
            email.send(mail_config(tmp_path, smtp, pki, password="wrong"), MESSAGE,
                       tcp_check([f"127.0.0.1:{smtp.port}"]))
        assert "wrong" not in str(info.value)
        assert smtp.mails == [] and smtp.logins and all(l == ("mf", False) for l in smtp.logins)
    finally:
        smtp.stop()


def test_webhook_over_verified_https(tmp_path, pki):
    hook = WebhookSink(tls_context=server_context(pki)).start()
    token = tmp_path / "token"
    token.write_text("tok\n")
    token.chmod(0o600)
    try:
        cfg = WebhookConfig(url=hook.url, bearer_token_file=token, tls=ClientTLS(ca_file=pki["ca.crt"]))
        assert webhook.send(cfg, MESSAGE, http_check([hook.url])).endswith("HTTP 204")
        assert hook.posts[0]["json"]["id"] == 7 and hook.posts[0]["authorization"] == "Bearer tok"
        rogue = WebhookConfig(url=hook.url, tls=ClientTLS(ca_file=pki["rogue-ca.crt"]))
        with pytest.raises(SendError, match="no answer"):
            webhook.send(rogue, MESSAGE, http_check([hook.url]))
        with pytest.raises(SendError, match="egress refused"):
            webhook.send(cfg, MESSAGE, http_check([f"https://127.0.0.1:{hook.port}/other"]))
        assert len(hook.posts) == 1
    finally:
        hook.stop()


def test_webhook_non_2xx_is_a_failure():
    hook = WebhookSink(status=503).start()
    try:
        with pytest.raises(SendError, match="answered HTTP 503"):
            webhook.send(WebhookConfig(url=hook.url), MESSAGE, http_check([hook.url]))
    finally:
        hook.stop()

"""Alerts end to end: `mfconsole serve` forwarding to a real PACS (DCMTK storescp),
mail to a real SMTP server (aiosmtpd, STARTTLS and AUTH required, a tlsgen
certificate verified against its CA) and a webhook receiver. The PACS stopped →
exactly one "pacs down" mail and one webhook POST; the engine killed (SIGKILL) and
started again while it is down → nothing new; the PACS back → exactly one "pacs
recovered" of each; nothing more after. Texts carry names and times, never PHI.
A webhook url off [egress].allowed_http fails `mfconsole check`, naming the key."""

from __future__ import annotations

import pytest

import dicomgen
from alert_sinks import SmtpSink, WebhookSink
from harness import CANARY_ID, CANARY_NAME, holds, mfconsole, poll, store_files, write_config
from mfconsole.repository import AuditFilter
from mfconsole.repository import alerts as repo
from test_forward_dimse import dimse_dest
from tlsgen import make_pki

DOWN, RECOVERED = "[mfconsole] pacs down", "[mfconsole] pacs recovered"


def secret_file(path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def sinks(tmp_path):
    pki = make_pki(tmp_path / "pki")
    smtp = SmtpSink(pki, "mfconsole", "s3cret-pw").start()
    hook = WebhookSink().start()
    yield pki, smtp, hook
    smtp.stop()
    hook.stop()


def sent(serve) -> int:
    """Messages of the alert outbox recorded as sent, every channel."""
    with serve.db() as reads:
        return sum(r["sent_at"] is not None for r in repo.outbox(reads))


def alerts_table(tmp_path, pki, smtp, hook) -> dict:
    return {"hold_s": 1, "interval_s": 0.2,
            "email": {"host": "127.0.0.1", "port": smtp.port, "ca_file": str(pki["ca.crt"]),
                      "username": "mfconsole",
                      "password_file": secret_file(tmp_path / "smtp.password", "s3cret-pw"),
                      "from": "mfconsole@example.org", "to": ["pacs-admins@example.org"]},
            "webhook": {"url": hook.url,
                        "bearer_token_file": secret_file(tmp_path / "hook.token", "tok-123")}}


def test_pacs_down_and_recovered_once_each_across_an_engine_kill(serve_factory, storescp_factory,
                                                                 sinks, tmp_path):
    pki, smtp, hook = sinks
    scp = storescp_factory()
    serve = serve_factory(
        destinations=[dimse_dest(scp.port, retry_initial_s=0.2, retry_max_s=0.5, down_after=2)],
        egress={"allowed_tcp": [f"127.0.0.1:{scp.port}", f"127.0.0.1:{smtp.port}"],
                "allowed_http": [hook.url]},
        tables={"alerts": alerts_table(tmp_path, pki, smtp, hook)})
    files = [dicomgen.save(dicomgen.make_image(pixel_bytes=64), tmp_path / f"in{i}.dcm")
             for i in range(4)]
    store_files(serve.port, files[:1])
    scp.wait_for_files(1)
    assert holds(lambda: not smtp.mails and not hook.posts, seconds=2.0)

    scp.stop()
    store_files(serve.port, files[1:3])
    poll(lambda: smtp.subjects() == [DOWN] and hook.subjects() == [DOWN], timeout=30,
         message="one 'pacs down' mail and webhook")
    assert smtp.logins == [("mfconsole", True)]
    mail = smtp.mails[0]
    assert mail["From"] == "mfconsole@example.org" and mail["To"] == "pacs-admins@example.org"
    assert "destination pacs: down" in mail.get_content()
    post = hook.posts[0]
    assert post["authorization"] == "Bearer tok-123" and post["path"] == "/hooks/mfconsole"
    assert post["json"]["event"] == "started" and post["json"]["key"] == "destination_down:pacs"

    # The engine dies and comes back while the PACS is still down: nothing new. Killed
    # once both sends are committed: a kill between a server's acceptance and that
    # commit sends the message again, with the same id (at least once, as documented),
    # which is not what this step is about.
    poll(lambda: sent(serve) == 2, timeout=10, message="both sends recorded as sent")
    serve.kill9()
    serve.start()
    store_files(serve.port, files[3:])
    assert holds(lambda: smtp.subjects() == [DOWN] and hook.subjects() == [DOWN], seconds=4.0)

    scp.start()
    scp.wait_for_files(4, timeout=30)
    poll(lambda: smtp.subjects() == [DOWN, RECOVERED] and hook.subjects() == [DOWN, RECOVERED],
         timeout=30, message="one 'pacs recovered' mail and webhook")
    assert hook.posts[1]["json"]["event"] == "cleared"
    assert holds(lambda: len(smtp.mails) == 2 and len(hook.posts) == 2, seconds=3.0)

    texts = [m.get_content() for m in smtp.mails] + [p["json"]["text"] for p in hook.posts]
    assert not any(CANARY_NAME in t or CANARY_ID in t for t in texts)
    with serve.db() as reads:
        outbox = repo.outbox(reads)
        audited = [(r["status"], r["detail"])
                   for r in reads.audit_page(AuditFilter(event="alert_sent"), None, 100)]
    assert len(outbox) == 4 and all(r["sent_at"] is not None for r in outbox)
    assert sorted((r[0], r[1].split(":")[0]) for r in audited) == [
        ("cleared", "email"), ("cleared", "webhook"), ("started", "email"), ("started", "webhook")]


def test_mail_queued_while_the_smtp_server_is_down_goes_out_when_it_returns(
        serve_factory, storescp_factory, sinks, tmp_path):
    pki, smtp, hook = sinks
    port = smtp.port
    smtp.stop()
    scp = storescp_factory()
    scp.stop()
    table = alerts_table(tmp_path, pki, smtp, hook)
    del table["webhook"]
    serve = serve_factory(
        destinations=[dimse_dest(scp.port, retry_initial_s=0.2, retry_max_s=0.5, down_after=2)],
        egress={"allowed_tcp": [f"127.0.0.1:{scp.port}", f"127.0.0.1:{port}"]},
        tables={"alerts": table})
    store_files(serve.port, [dicomgen.save(dicomgen.make_image(pixel_bytes=64), tmp_path / "a.dcm")])

    def failed_attempts() -> int:
        with serve.db() as reads:
            rows = repo.outbox(reads)
        return rows[0]["attempts"] if rows and rows[0]["sent_at"] is None else 0

    poll(lambda: failed_attempts() >= 1, timeout=30, message="a failed attempt to mail")
    smtp.port = port
    smtp.start()
    poll(lambda: smtp.subjects() == [DOWN], timeout=30, message="the queued mail")
    assert holds(lambda: smtp.subjects() == [DOWN], seconds=2.0)


def test_webhook_off_the_allowlist_fails_check(tmp_path):
    path = write_config(tmp_path, tables={"alerts": {"webhook": {"url": "http://127.0.0.1:9/hook"}}})
    result = mfconsole("--config", str(path), "check")
    assert result.returncode == 2, result
    assert "alerts.webhook.url" in result.stdout + result.stderr


def test_check_says_where_alerts_go(tmp_path):
    path = write_config(tmp_path, egress={"allowed_tcp": ["127.0.0.1:1"],
                                          "allowed_http": ["http://127.0.0.1:9/hooks"]},
                        tables={"alerts": {"webhook": {"url": "http://127.0.0.1:9/hooks/mf"}}})
    result = mfconsole("--config", str(path), "check")
    assert result.returncode == 0, result
    assert "alerts by webhook" in result.stdout

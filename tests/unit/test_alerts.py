"""Alerts (mfconsole/engine/alerts.py) on a real database with a fake clock and fake
channels: flap suppression both ways, nothing new across a restart, a condition
cleared while the engine was down cleared once, a failing channel retried with
backoff in order and each message sent (and audited) exactly once; the subjects; and
[alerts] validation naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import write_config
from mfconsole.alerting import SendError
from mfconsole.alerting.message import subject
from mfconsole.alerting.settings import AlertsConfig
from mfconsole.config import ConfigError, load
from mfconsole.engine.alerts import AlertWorker, backoff
from mfconsole.health import DEGRADED, DOWN, Problem
from mfconsole.repository import AuditFilter, Reads, connect, migrate, transaction
from mfconsole.repository import alerts as repo

DOWN_PACS = Problem(DEGRADED, "destination_down:pacs", "destination pacs: down (refused)")
DEAD = Problem(DEGRADED, "dead_letters:pacs", "destination pacs: 12 dead letter(s) in the last 1 h")


class FakeStore:
    """The engine store's two entries the worker uses, over one connection."""

    def __init__(self, path: Path):
        self.conn = connect(path)
        migrate(self.conn)

    def call(self, fn, *args):
        with transaction(self.conn) as tx:
            return fn(tx, *args)

    def reader(self) -> Reads:
        return Reads(self.conn)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Channel:
    """Records what it was given; fails while ``down``."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []   # (kind, subject)
        self.tries = 0
        self.down = False

    def __call__(self, cfg, message) -> str:
        self.tries += 1
        if self.down:
            raise SendError("cannot connect to smtp.example.org:587: ConnectionRefusedError")
        self.sent.append((message.kind, message.subject))
        return "handed over"


class Rig:
    def __init__(self, tmp_path: Path, hold_s: float = 60, interval_s: float = 10,
                 clock: Clock | None = None):
        self.path = tmp_path / "alerts.db"
        self.clock = clock or Clock()
        self.problems: list[Problem] = []
        self.mail, self.hook = Channel(), Channel()
        self.cfg = AlertsConfig(hold_s=hold_s, interval_s=interval_s, email=object(), webhook=object())
        self.restart()

    def restart(self) -> None:
        """A new engine on the same database (what a kill or a stop leaves)."""
        self.store = FakeStore(self.path)
        self.worker = AlertWorker(self.store, lambda: self.cfg, lambda: list(self.problems),
                                  {"email": self.mail, "webhook": self.hook}, clock=self.clock)

    def run(self, until: float, step: float = 1.0) -> None:
        """Rounds every ``step`` seconds of the fake clock up to ``until`` (absolute offset)."""
        end = 1_000_000.0 + until
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + step)
            self.worker.tick(self.cfg)

    def audited(self) -> list[str]:
        rows = self.store.reader().audit_page(AuditFilter(event="alert_sent"), None, 100)
        return [r["detail"] for r in reversed(rows)]


def test_a_condition_shorter_than_hold_s_sends_nothing(tmp_path):
    rig = Rig(tmp_path)
    rig.problems = [DOWN_PACS]
    rig.run(50)
    rig.problems = []
    rig.run(300)
    # Flapping: present 30 s, gone 10 s, again and again: never 60 s in a row.
    for _ in range(10):
        rig.problems = [DOWN_PACS]
        rig.run(rig.clock.now - 1_000_000 + 30)
        rig.problems = []
        rig.run(rig.clock.now - 1_000_000 + 10)
    assert rig.mail.sent == [] and rig.hook.sent == []
    assert repo.outbox(rig.store.reader()) == []


def test_started_after_hold_s_and_cleared_after_hold_s_gone(tmp_path):
    rig = Rig(tmp_path)
    rig.problems = [DOWN_PACS]
    rig.run(59)
    assert rig.mail.sent == []
    rig.run(200)
    assert rig.mail.sent == [("started", "[mfconsole] pacs down")]
    assert rig.hook.sent == [("started", "[mfconsole] pacs down")]
    # A brief recovery (shorter than hold_s) clears nothing.
    rig.problems = []
    rig.run(240)
    rig.problems = [DOWN_PACS]
    rig.run(300)
    rig.problems = []
    rig.run(355)
    assert len(rig.mail.sent) == 1
    rig.run(420)
    assert rig.mail.sent == [("started", "[mfconsole] pacs down"),
                             ("cleared", "[mfconsole] pacs recovered")]
    assert rig.hook.sent == rig.mail.sent
    rig.run(1000)
    assert len(rig.mail.sent) == 2 and repo.conditions(rig.store.reader()) == {}
    assert rig.audited() == [
        "email: [mfconsole] pacs down (handed over)", "webhook: [mfconsole] pacs down (handed over)",
        "email: [mfconsole] pacs recovered (handed over)",
        "webhook: [mfconsole] pacs recovered (handed over)"]


def test_a_restart_announces_nothing_again(tmp_path):
    rig = Rig(tmp_path)
    rig.problems = [DOWN_PACS, DEAD]
    rig.run(100)
    assert sorted(rig.mail.sent) == [("started", "[mfconsole] pacs dead letters started"),
                                     ("started", "[mfconsole] pacs down")]
    rig.restart()                 # the condition goes on across it
    rig.clock.now += 500          # the engine was down a while
    rig.run(1000)
    assert len(rig.mail.sent) == 2 and len(rig.hook.sent) == 2


def test_cleared_while_the_engine_was_down_is_cleared_once(tmp_path):
    rig = Rig(tmp_path)
    rig.problems = [DOWN_PACS]
    rig.run(100)
    rig.restart()
    rig.problems = []
    rig.clock.now += 3600
    rig.worker.tick(rig.cfg)      # the first round after the restart: gone, not yet hold_s
    assert len(rig.mail.sent) == 1
    rig.run(3700 + 100)
    assert rig.mail.sent[1:] == [("cleared", "[mfconsole] pacs recovered")]
    rig.restart()
    rig.run(3700 + 1000)
    assert len(rig.mail.sent) == 2 and len(rig.hook.sent) == 2


def test_started_not_announced_before_a_restart_is_announced_once_after(tmp_path):
    rig = Rig(tmp_path)
    rig.problems = [DOWN_PACS]
    rig.run(30)
    rig.restart()
    rig.run(200)
    assert rig.mail.sent == [("started", "[mfconsole] pacs down")]


def test_a_channel_down_queues_in_order_and_sends_each_once_when_back(tmp_path):
    rig = Rig(tmp_path, hold_s=0)
    rig.mail.down = True
    rig.problems = [DOWN_PACS]
    rig.run(20)
    rig.problems = []
    rig.run(40)
    assert rig.hook.sent == [("started", "[mfconsole] pacs down"),
                             ("cleared", "[mfconsole] pacs recovered")]
    assert rig.mail.sent == []
    # Backoff: tries at 1, 6, 16, 36 s ... (5 s doubling), not every round.
    assert rig.mail.tries <= 5
    rows = [r for r in repo.outbox(rig.store.reader()) if r["channel"] == "email"]
    assert [r["sent_at"] for r in rows] == [None, None]
    assert rows[0]["attempts"] >= 2 and "ConnectionRefusedError" in rows[0]["last_error"]
    assert rows[1]["attempts"] == 0       # the head of the channel blocks the rest
    rig.restart()                         # queued in the database: survives it
    rig.mail.down = False
    rig.run(400)
    assert rig.mail.sent == [("started", "[mfconsole] pacs down"),
                             ("cleared", "[mfconsole] pacs recovered")]
    rig.run(2000)
    assert len(rig.mail.sent) == 2 and len(rig.hook.sent) == 2
    assert len(rig.audited()) == 4


def test_backoff_doubles_to_five_minutes():
    assert [backoff(n) for n in (1, 2, 3, 4, 10)] == [5, 10, 20, 40, 300]


@pytest.mark.parametrize("key, kind, words", [
    ("destination_down:pacs", "started", "[mfconsole] pacs down"),
    ("destination_down:pacs", "cleared", "[mfconsole] pacs recovered"),
    ("listener_down:modalities", "started", "[mfconsole] modalities down"),
    ("oldest_pending:pacs", "started", "[mfconsole] pacs oldest pending started"),
    ("store_space", "cleared", "[mfconsole] store space cleared"),
    ("reload_refused", "started", "[mfconsole] reload refused started"),
    ("engine_down", "cleared", "[mfconsole] engine recovered"),
])
def test_subjects(key, kind, words):
    assert subject(key, kind) == words


def test_message_text_is_the_problem_text_and_times(tmp_path):
    rig = Rig(tmp_path, hold_s=0)
    rig.problems = [Problem(DOWN, "store_space", "store: 0.5% free on the data directory's "
                            "file system (under 10%)")]
    rig.run(5)
    row = repo.outbox(rig.store.reader())[0]
    assert row["text"].startswith("store: 0.5% free") and "since " in row["text"]


# -- [alerts] validation --------------------------------------------------------------

def secret(tmp_path: Path, name: str = "smtp.password") -> str:
    path = tmp_path / name
    path.write_text("s3cret\n")
    path.chmod(0o600)
    return str(path)


def config(tmp_path: Path, alerts: dict, egress: dict | None = None) -> Path:
    return write_config(tmp_path, tables={"alerts": alerts},
                        egress=egress or {"allowed_tcp": ["127.0.0.1:1", "127.0.0.1:2525"],
                                          "allowed_http": ["http://127.0.0.1:8080/hooks"]})


def problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def test_alerts_read(tmp_path):
    cfg = load(config(tmp_path, {
        "hold_s": 5, "interval_s": 1,
        "email": {"host": "127.0.0.1", "port": 2525, "starttls": False, "from": "mf@example.org",
                  "to": ["a@example.org", "b@example.org"], "username": "mf",
                  "password_file": secret(tmp_path)},
        "webhook": {"url": "http://127.0.0.1:8080/hooks/mf"}})).alerts
    assert (cfg.hold_s, cfg.interval_s, cfg.channels) == (5, 1, ("email", "webhook"))
    assert cfg.email.to == ("a@example.org", "b@example.org") and cfg.email.loopback_only
    assert load(write_config(tmp_path / "none")).alerts is None


@pytest.mark.parametrize("alerts, key, why", [
    ({}, "alerts", "names no channel"),
    ({"hold_s": -1, "webhook": {"url": "http://127.0.0.1:8080/hooks"}}, "alerts.hold_s", "0 or more"),
    ({"webhook": {"url": "http://127.0.0.1:9999/elsewhere"}}, "alerts.webhook.url",
     "egress.allowed_http"),
    ({"webhook": {"url": "http://127.0.0.1:8080/hooks", "secret": 1}}, "alerts.webhook.secret",
     "unknown key"),
    ({"email": {"host": "127.0.0.1", "port": 25, "from": "mf@example.org", "to": ["a@example.org"]}},
     "alerts.email.host", "allowed_tcp"),
    ({"email": {"host": "127.0.0.1", "port": 2525, "from": "mf", "to": ["a@example.org"]}},
     "alerts.email.from", "mail address"),
    ({"email": {"host": "127.0.0.1", "port": 2525, "from": "mf@example.org", "to": []}},
     "alerts.email.to", "at least one"),
    ({"email": {"host": "127.0.0.1", "port": 2525, "from": "mf@example.org", "to": ["a@example.org"],
                "username": "mf"}}, "alerts.email.username", "needs password_file"),
])
def test_alerts_problems_name_the_key(tmp_path, alerts, key, why):
    found = problems(config(tmp_path, alerts))
    assert any(k == key and why in w for k, w in found), found


def test_smtp_without_starttls_off_loopback_is_refused(tmp_path):
    found = problems(config(tmp_path, {"email": {
        "host": "192.0.2.7", "port": 25, "starttls": False, "from": "mf@example.org",
        "to": ["a@example.org"]}}, egress={"allowed_tcp": ["127.0.0.1:1", "192.0.2.7:25"]}))
    assert [k for k, _ in found] == ["alerts.email.starttls"], found


def test_sent_messages_are_forgotten_after_the_retention(tmp_path):
    rig = Rig(tmp_path, hold_s=0)
    rig.problems = [DOWN_PACS]
    rig.run(5)
    assert len(repo.outbox(rig.store.reader())) == 2
    sent_at = repo.outbox(rig.store.reader())[0]["sent_at"]
    assert rig.store.call(repo.forget_sent, sent_at) == 0
    assert rig.store.call(repo.forget_sent, sent_at + 1) == 2
    assert repo.outbox(rig.store.reader()) == [] and len(rig.audited()) == 2

"""Alerts: when a condition (a mfconsole/health.py problem key) counts as started or
cleared, and the durable outbox that carries the messages to their channels.

Every ``interval_s`` the problems are computed and compared, in one transaction,
with the conditions stored:

* a key not stored is recorded (``since`` now); a stored key still present is
  refreshed. A condition present for ``hold_s`` (``now - since``) is announced: one
  "started" message per channel is queued, in the transaction that marks it so;
* a stored key gone: never announced, it is forgotten (it started and ended within
  hold_s: flap suppression sends nothing); announced, it is first marked gone
  (``absent_since``) and, still gone ``hold_s`` later, forgotten with one "cleared"
  message per channel. Seen again in between, it simply goes on.

All of this is in the database, so a restart changes nothing: a condition announced
before it and present after it is refreshed, not announced again; one that ended
while the engine was down is cleared once, hold_s after the engine sees it gone.

Each channel sends its messages in order (a "cleared" never overtakes its
"started"); a failure leaves the message at the head of its channel with a backoff
(5 s doubling to 5 min), so a mail server down queues, and what queued goes out
when it returns. A message is marked sent in the transaction that audits it
(``alert_sent``): once per channel, unless the process dies between the server's
acceptance and that commit (then it is sent again, with the same Message-ID / id).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from mfconsole import egress
from mfconsole.alerting import SendError
from mfconsole.alerting.message import CLEARED, STARTED, Message, body, subject
from mfconsole.repository import alerts as repo
from mfconsole.repository import Tx

log = logging.getLogger("mfconsole.alerts")

BACKOFF_INITIAL_S = 5.0
BACKOFF_MAX_S = 300.0
IDLE_WAIT_S = 5.0     # re-reading the settings while alerts are off (a reload may add them)
DRAIN_POLL_S = 1.0    # how soon a message queued or due again is taken


def evaluate(tx: Tx, problems: list[Any], now: float, hold_s: float,
             channels: tuple[str, ...]) -> int:
    """Compare ``problems`` with the stored conditions at ``now``; the messages queued."""
    stored = repo.conditions(tx)
    current = {p.key: p for p in problems}
    queued = 0
    for key, p in current.items():
        row = stored.get(key)
        if row is None:
            repo.add_condition(tx, key, p.severity, p.text, now)
            since, announced = now, False
        else:
            repo.seen(tx, key, p.severity, p.text, now)
            since, announced = row["since"], bool(row["notified_started"])
        if not announced and now - since >= hold_s:
            repo.announced(tx, key)
            queued += _queue(tx, key, STARTED, body(STARTED, p.text, since, now), now, channels)
    for key, row in stored.items():
        if key in current:
            continue
        if not row["notified_started"]:
            repo.forget(tx, key)        # over before it was announced: nothing to say
            continue
        gone = row["absent_since"] if row["absent_since"] is not None else now
        if row["absent_since"] is None:
            repo.absent(tx, key, now)
        if now - gone >= hold_s:
            repo.forget(tx, key)
            queued += _queue(tx, key, CLEARED, body(CLEARED, row["text"], row["since"], gone),
                             now, channels)
    return queued


def _queue(tx: Tx, key: str, kind: str, text: str, now: float, channels: tuple[str, ...]) -> int:
    for channel in channels:
        repo.enqueue(tx, key, kind, channel, subject(key, kind), text, now)
    return len(channels)


def record_sent(tx: Tx, message: Message, channel: str, what: str, now: float) -> None:
    """Sent: marked and audited together (routing-safe: the subject and the channel)."""
    if repo.mark_sent(tx, message.id, now):
        tx.audit("alert_sent", ts=now, status=message.kind,
                 detail=f"{channel}: {message.subject} ({what})")


def backoff(attempts: int) -> float:
    """The wait after the ``attempts``-th failure (1: the first)."""
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** max(0, attempts - 1))


def channel_senders(checks: egress.Checks) -> dict[str, Callable[[Any, Message], str]]:
    """The real channels: (the [alerts] settings, a message) → what was done."""
    from mfconsole.alerting import email, webhook

    return {"email": lambda cfg, m: email.send(cfg.email, m, checks.tcp),
            "webhook": lambda cfg, m: webhook.send(cfg.webhook, m, checks.http)}


class AlertWorker:
    """The alerts thread of an engine. ``settings()``: the [alerts] settings now (None:
    no alerts; read each round, so a reload applies); ``problems()``: the health
    problems now; ``store``: what has ``call(fn, *args)`` (the writer) and
    ``reader()``; ``senders``: channel → send function; ``clock``: wall time."""

    def __init__(self, store: Any, settings: Callable[[], Any], problems: Callable[[], list[Any]],
                 senders: dict[str, Callable[[Any, Message], str]],
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings
        self.problems = problems
        self.senders = senders
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_evaluation = 0.0   # on self.clock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            cfg = self.settings()
            try:
                self.tick(cfg)
            except Exception as exc:     # the store closing, a bug: never kill the thread
                log.error("alerts: round failed (%s)", exc.__class__.__name__)
            active = cfg is not None and cfg.enabled
            self._stop.wait(min(cfg.interval_s, DRAIN_POLL_S) if active else IDLE_WAIT_S)

    def tick(self, cfg: Any) -> None:
        """One round: evaluate when due, then send what is due."""
        if cfg is None or not cfg.enabled:
            return
        now = self.clock()
        # (A wall clock set back must not hold the evaluation off.)
        if now >= self._next_evaluation or now < self._next_evaluation - cfg.interval_s:
            self._next_evaluation = now + cfg.interval_s
            queued = self.store.call(evaluate, self.problems(), now, cfg.hold_s, cfg.channels)
            if queued:
                log.info("alerts: %d message(s) queued", queued)
        for channel in cfg.channels:
            self._drain(cfg, channel)

    def _drain(self, cfg: Any, channel: str) -> None:
        """The channel's due messages, in order, until one fails."""
        while not self._stop.is_set():
            row = repo.next_unsent(self.store.reader(), channel)
            if row is None or row["next_attempt_at"] > self.clock():
                return
            message = Message.of(row)
            try:
                what = self.senders[channel](cfg, message)
            except Exception as exc:    # SendError: routing-safe words; else a bug
                why = str(exc) if isinstance(exc, SendError) else f"failed: {exc.__class__.__name__}"
                wait = backoff(row["attempts"] + 1)
                self.store.call(repo.mark_failed, message.id, self.clock() + wait, why)
                log.warning("alert %r by %s not sent (attempt %d): %s; next try in %.0f s",
                            message.subject, channel, row["attempts"] + 1, why, wait)
                return
            self.store.call(record_sent, message, channel, what, self.clock())
            log.info("alert %r sent by %s", message.subject, channel)

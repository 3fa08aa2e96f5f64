"""The metrics export of a running engine ([metrics]): what is measured, written to a
text file for node_exporter's textfile collector, and served on a loopback HTTP
endpoint.

Part of the operations layer (with ops.py and control.py): the engine is handed
``serve_metrics`` when it is made (``Engine(config, metrics=serve_metrics)``), starts it
after its control sockets and stops it first, without importing this module.

Every interval_s one thread collects the families (status.collect, health.problems,
the audit and objects tables tailed by id, the engine's latency histograms), renders
them once (mfconsole/metrics.py), replaces the text file atomically and keeps the
text for the endpoint: a scrape never touches the database. Counters are lifetime
totals of the data directory (the audit trail is never purged), so they survive a
restart; the histograms start empty with each engine.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mfconsole import __version__, health, ops
from mfconsole.engine import status as status_mod
from mfconsole.metrics import (CONTENT_TYPE, COUNTER, GAUGE, HISTOGRAM, Family, MetricsConfig,
                               render)
from mfconsole.repository import db_path, reading
from mfconsole.repository.states import (DEAD, DELIVERED, DISCARDED, FILTERED, HELD, IN_FLIGHT,
                                         PENDING, REPLAYED, COMMITTED)

log = logging.getLogger("mfconsole.metrics")

# Every delivery state, so that a destination's series exist (at 0) before its first.
QUEUE_STATES = (HELD, PENDING, IN_FLIGHT, DELIVERED, COMMITTED, FILTERED, DEAD, REPLAYED, DISCARDED)
# engine/status.destination_state's words.
DESTINATION_STATES = ("up", "retrying", "down", "paused", "outside_window")
# Audit events counted: event -> (family, whose column names it).
LISTENER_EVENTS = {"association_accepted": "associations", "stored": "objects",
                   "duplicate": "duplicates"}
REJECT_EVENTS = ("association_rejected", "refused")
DESTINATION_EVENTS = {"delivered": "delivered", "delivered_with_warning": "delivered",
                      "filtered": "filtered", "retry_scheduled": "retries",
                      "dead_lettered": "dead_letters"}
TALLIED = (*LISTENER_EVENTS, *REJECT_EVENTS, *DESTINATION_EVENTS)


class Tally:
    """Lifetime counts from the audit and objects tables, tailed by id: the first
    round counts the whole history once, each later one only the rows added since."""

    def __init__(self) -> None:
        self.audit_id = 0
        self.object_id = 0
        # (event, listener, destination, status) -> rows
        self.events: dict[tuple[str, str, str, str], int] = {}
        self.received_bytes: dict[str, int] = {}     # listener -> bytes of objects stored

    def update(self, reads: Any) -> None:
        for row in reads.audit_tally(TALLIED, self.audit_id):
            key = (row["event"], row["listener"] or "", row["destination"] or "", row["status"] or "")
            self.events[key] = self.events.get(key, 0) + row["n"]
            self.audit_id = max(self.audit_id, row["last"])
        for row in reads.object_sizes_since(self.object_id):
            name = row["listener"] or ""
            self.received_bytes[name] = self.received_bytes.get(name, 0) + row["bytes"]
            self.object_id = max(self.object_id, row["last"])

    def by(self, column: int, events: dict[str, str]) -> dict[tuple[str, str], int]:
        """(name in ``column`` — 1 listener, 2 destination —, counter) -> total."""
        out: dict[tuple[str, str], int] = {}
        for key, n in self.events.items():
            what = events.get(key[0])
            if what is not None and key[column]:
                out[(key[column], what)] = out.get((key[column], what), 0) + n
        return out

    def rejects(self) -> dict[tuple[str, str], int]:
        """(listener, reason) -> total; a refused object's reason carries its status
        ("refused 0xA700", "refused TLS", "refused abort")."""
        out: dict[tuple[str, str], int] = {}
        for (event, listener, _dest, status), n in self.events.items():
            if event in REJECT_EVENTS and listener:
                reason = f"{event} {status}" if event == "refused" and status else event
                out[(listener, reason)] = out.get((listener, reason), 0) + n
        return out


def collect(config: Any, engine: Any, tally: Tally, now: float | None = None) -> list[Family]:
    """Every family, from the store as it is now and, with ``engine``, what only the
    running engine knows (listeners listening, latency histograms)."""
    started = time.monotonic()
    now = time.time() if now is None else now
    status = status_mod.collect(config, engine)
    stored = (0, 0)
    path = db_path(config.engine.data_dir)
    if path.exists():
        with reading(path) as reads:
            tally.update(reads)
            problems = health.problems(config, status, reads, now)
            stored = reads.stored_totals()
    else:
        problems = health.problems(config, status, None, now)
    out = [*_engine(engine, problems), *_listeners(config, status, tally),
           *_destinations(config, status, tally, engine, now), *_store(config, engine, stored),
           *_tls(config)]
    out.append(Family("mfconsole_metrics_collect_seconds", GAUGE,
                      "How long collecting these metrics took.").add(time.monotonic() - started))
    return out


def _engine(engine: Any, problems: list[Any]) -> list[Family]:
    severity = health.severity(problems)
    counts = {word: sum(1 for p in problems if p.word == word) for word in ("degraded", "down")}
    out = [Family("mfconsole_up", GAUGE, "1 while the engine runs (0 written when it stops).").add(1),
           Family("mfconsole_build_info", GAUGE, "The running version (always 1).")
           .add(1, version=__version__),
           Family("mfconsole_health", GAUGE,
                  "What `mfconsole health` would exit with: 0 ok, 1 degraded, 2 down.").add(severity),
           Family("mfconsole_problems", GAUGE,
                  "Problems `mfconsole health` lists now, by severity.")]
    for word, n in counts.items():
        out[-1].add(n, severity=word)
    if engine is not None and engine.started_at:
        out.append(Family("mfconsole_start_time_seconds", GAUGE,
                          "When the engine started (Unix time).").add(engine.started_at))
    return out


def _listeners(config: Any, status: dict[str, Any], tally: Tally) -> list[Family]:
    counted = tally.by(1, LISTENER_EVENTS)
    names = sorted({lc.name for lc in config.listeners} | {k[0] for k in counted}
                   | {k for k in tally.received_bytes if k})
    up = Family("mfconsole_listener_up", GAUGE, "1 while the listener accepts associations.")
    for entry in status["listeners"]:
        up.add(1 if entry.get("state") == "listening" else 0, listener=entry["name"])
    out = [up, *_counters("listener", names, counted, (
        ("associations", "Associations accepted."),
        ("objects", "Objects stored (new versions included, duplicates not)."),
        ("duplicates", "Objects received again with the same bytes.")))]
    f = Family("mfconsole_listener_received_bytes_total", COUNTER,
               "Bytes of the objects stored, as received (duplicates not counted).")
    for name in names:
        f.add(tally.received_bytes.get(name, 0), listener=name)
    out.append(f)
    f = Family("mfconsole_listener_rejects_total", COUNTER,
               "Associations rejected, and objects or connections refused (reason: "
               "association_rejected, or refused with its status).")
    rejects = tally.rejects()
    for name in names:
        f.add(rejects.get((name, "association_rejected"), 0), listener=name,
              reason="association_rejected")
    for (name, reason), n in sorted(rejects.items()):
        if reason != "association_rejected":
            f.add(n, listener=name, reason=reason)
    out.append(f)
    return out


def _destinations(config: Any, status: dict[str, Any], tally: Tally, engine: Any,
                  now: float) -> list[Family]:
    queue = Family("mfconsole_destination_queue", GAUGE, "Deliveries by state.")
    commitment = Family("mfconsole_destination_commitment_pending", GAUGE,
                        "Delivered, custody not yet confirmed by Storage Commitment "
                        "(part of state delivered).")
    oldest = Family("mfconsole_destination_oldest_pending_seconds", GAUGE,
                    "Age of the oldest pending delivery (0: none pending).")
    state = Family("mfconsole_destination_state", GAUGE,
                   "1 for the destination's state now, 0 for the others.")
    failures = Family("mfconsole_destination_consecutive_failures", GAUGE,
                      "Transient failures in a row (0 once a delivery goes through).")
    held = Family("mfconsole_destination_held_studies", GAUGE,
                  "Studies held until quiet (trigger = \"study_stable\").")
    for d in status["destinations"]:
        name, counts = d["name"], d["counts"]
        for word in (*QUEUE_STATES, *sorted(set(counts) - set(QUEUE_STATES) - _COMMITMENT)):
            queue.add(counts.get(word, 0), destination=name, state=word)
        commitment.add(sum(counts.get(k, 0) for k in _COMMITMENT), destination=name)
        pending_at = d.get("oldest_pending_at")
        oldest.add(max(0.0, now - pending_at) if pending_at else 0, destination=name)
        for word in DESTINATION_STATES:
            state.add(1 if d["state"] == word else 0, destination=name, state=word)
        failures.add(d.get("failures") or 0, destination=name)
        held.add(d.get("held_study_count") or 0, destination=name)
    out = [queue, commitment, oldest, state, failures, held]
    counted = tally.by(2, DESTINATION_EVENTS)
    names = sorted({d.name for d in config.destinations} | {k[0] for k in counted})
    out += _counters("destination", names, counted, (
        ("delivered", "Deliveries the peer accepted (warnings included)."),
        ("filtered", "Deliveries a handler chose not to send."),
        ("retries", "Failed attempts scheduled for a retry."),
        ("dead_letters", "Deliveries dead-lettered.")))
    if engine is not None:
        f = Family("mfconsole_destination_send_seconds", HISTOGRAM,
                   "Seconds to send one object delivered (a request of several: its time "
                   "shared among them), since the engine started.")
        for name, view in engine.send_latency.views().items():
            f.histogram(view, destination=name)
        out.append(f)
    return out


_COMMITMENT = frozenset({"awaiting_commitment", "commitment_requested"})


def _counters(label: str, names: list[str], counted: dict[tuple[str, str], int],
              specs: tuple[tuple[str, str], ...]) -> list[Family]:
    """``mfconsole_{label}_{what}_total`` for each (what, help) of ``specs``: every
    name in ``names``, 0 when nothing was counted for it yet."""
    out = []
    for what, help_text in specs:
        f = Family(f"mfconsole_{label}_{what}_total", COUNTER, help_text)
        for name in names:
            f.add(counted.get((name, what), 0), **{label: name})
        out.append(f)
    return out


def _store(config: Any, engine: Any, stored: tuple[int, int]) -> list[Family]:
    objects, size = stored
    out = [Family("mfconsole_store_objects", GAUGE, "Objects stored (not purged).").add(objects),
           Family("mfconsole_store_bytes", GAUGE,
                  "Bytes of the objects stored (not purged), as received.").add(size)]
    keys = Family("mfconsole_store_key_objects", GAUGE,
                  "Objects (not purged) sealed with each key, by key id and its role in "
                  "[store] (current, previous, or unknown: no configured file has it).")
    for row in ops.key_report(config):
        if row["key_id"]:
            keys.add(row["objects"], key_id=row["key_id"], role=row["role"])
    out.append(keys)
    free = health.free_percent(config.engine.data_dir)
    if free is not None:
        out.append(Family("mfconsole_store_filesystem_free_ratio", GAUGE,
                          "Free share of the data directory's file system.").add(round(free / 100, 6)))
    store = getattr(engine, "store", None)
    if store is not None:
        out.append(Family("mfconsole_store_commit_seconds", HISTOGRAM,
                          "Seconds per group commit of the store (objects, deliveries and "
                          "audit rows), since the engine started.")
                   .histogram(store.commit_latency.view()))
    return out


def _tls(config: Any) -> list[Family]:
    f = Family("mfconsole_tls_certificate_expiry_seconds", GAUGE,
               "When the first certificate in each configured TLS file expires (Unix time).")
    for path, not_after in sorted(health.certificate_expiry(config).items()):
        f.add(not_after, file=path)
    return [f]


# -- writing and serving --------------------------------------------------------------

def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a reader sees the old file or the new one, never
    a part (a temporary file beside it, fsynced, then renamed over it). Mode 0644:
    the text holds no patient data, and node_exporter runs as another user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


STOPPED_TEXT = render([Family("mfconsole_up", GAUGE,
                              "1 while the engine runs (0 written when it stops).").add(0)])


class Exporter:
    """One thread: collect, render, write the file, keep the text for the endpoint."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.tally = Tally()
        self.text = ""
        self.rounds = 0     # collections done (written or not)
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: http.server.ThreadingHTTPServer | None = None
        self._said: str | None = None       # the last failure logged (not repeated)

    @property
    def config(self) -> MetricsConfig:
        return self.engine.config.metrics    # follows reloads (listen: at a restart)

    def start(self) -> None:
        cfg = self.config
        self.refresh()      # once at start, before the first interval
        if cfg.listen is not None:
            try:
                self._http = serve_http(cfg.listen, lambda: self.text)
            except OSError as exc:
                log.error("metrics: cannot listen on %s:%d: %s", *cfg.listen, exc.strerror or exc)
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.refresh()

    def refresh(self) -> None:
        cfg = self.config
        if not cfg.enabled:
            return
        try:
            self.text = render(collect(self.engine.config, self.engine, self.tally))
        except Exception as exc:     # the next round tries again; routing goes on
            self._fail(f"collecting failed ({exc.__class__.__name__})")
            return
        finally:
            self.rounds += 1
        self._write(cfg, self.text)

    def _write(self, cfg: MetricsConfig, text: str) -> None:
        if cfg.textfile is None:
            return
        try:
            write_atomically(cfg.textfile, text)
        except OSError as exc:
            self._fail(f"cannot write {cfg.textfile}: {exc.strerror or exc}")
            return
        self.writes += 1
        if self._said is not None:
            log.info("metrics: written again to %s", cfg.textfile)
            self._said = None

    def _fail(self, why: str) -> None:
        if why != self._said:
            log.error("metrics: %s", why)
            self._said = why

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        # A clean stop says so; after a crash the file stays as last written (alert on
        # node_textfile_mtime_seconds, see docs/monitoring.md).
        if self.config.enabled:
            self.text = STOPPED_TEXT
            self._write(self.config, STOPPED_TEXT)


def serve_http(where: tuple[str, int], text: Any) -> http.server.ThreadingHTTPServer:
    """GET /metrics on ``where`` (loopback: config.py refuses any other address):
    ``text()``, the last text rendered; 404 elsewhere. In daemon threads."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:   # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = text().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:   # noqa: A002
            log.debug("metrics endpoint: " + format, *args)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET

    server = Server(where, Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def serve_metrics(engine: Any) -> Exporter:
    """The metrics export of an engine: what ``Engine(metrics=...)`` takes."""
    return Exporter(engine)

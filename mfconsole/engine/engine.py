"""The engine: owns the store, the listeners, the delivery workers and housekeeping.

Start order matters: lock the data directory, open the store (which recovers from a
crash) and only then open listener sockets, so nothing is accepted before the store
can commit it. Stop order is the reverse: stop accepting, let associations finish,
then drain the writer.
"""

from __future__ import annotations

from concurrent.futures import Future

import logging
import os
import resource
import threading
import time
from typing import Any, Callable

from pydicom import config as pydicom_config

from mfconsole import __version__, egress
from mfconsole.config import Config
from mfconsole.dimse.dataset_scan import HeaderSummary
from mfconsole.dimse.listener import AssociationBoard
from mfconsole.ul.acceptor import InflightBudget, Listener
from mfconsole.engine import holds, latency, logs, outbox
from mfconsole.engine.alerts import AlertWorker, channel_senders
from mfconsole.engine.audit_export import AuditExporter
from mfconsole.engine.commitment import CommitmentWorker, apply_report
from mfconsole.engine.delivery import DestinationWorkers
from mfconsole.engine.engine_lock import DataDirLock, EngineError
from mfconsole.engine.handlers import HandlerError, Handlers
from mfconsole.engine.coercion import Coercer
from mfconsole.engine.transform import Origin, Transformer
from mfconsole.engine.router import Router, RuleCounts
from mfconsole.engine.sessions import Watched
from mfconsole.engine.keys import KeyCustodyError, open_vault
from mfconsole.engine.store import IngestRequest, Store, StoreRefused
from mfconsole.engine.vault import VaultError
from mfconsole.kinds import kind_of
from mfconsole.repository import Tx
from mfconsole.repository import alerts as alert_rows

log = logging.getLogger("mfconsole.engine")

PURGE_INTERVAL_S = 3600.0
SWEEP_INTERVAL_S = 5.0   # stranded in-flight deliveries go back to pending this often
DRY_RUN_OBJECTS = 5    # recent objects a new handler version must handle before it goes live


def raise_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit raised to its hard limit, logged; (soft, hard) after.
    Every connection and every blob being sealed costs a descriptor, and the
    pre-association bounds of mfconsole/ul are a share of the soft limit: distributions
    default it to 1024 while allowing far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be a soft one on Linux (fs.nr_open caps it).
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("RLIMIT_NOFILE: soft limit %d kept, could not raise it to %d: %s",
                        soft, target, exc)
            return soft, hard
        log.info("RLIMIT_NOFILE: soft limit raised from %d to %d (the hard limit)", soft, target)
        return target, hard
    log.info("RLIMIT_NOFILE: soft limit %s, hard limit %s", soft, hard)
    return soft, hard


# glibc's malloc serves an allocation over 128 KiB with a fresh mmap (raising that bar
# as such blocks are freed) and gives free heap over 128 KiB back to the system: the
# bytes of an object of a few hundred KiB, read and decrypted for sending, are then
# page-faulted in anew for every object (512 KiB CTs in groups of 8: ~140 faults and
# ~0.25 ms each; bench/forward.py CT: 0.6 -> 0.35 ms of CPU per object with these).
# Objects up to MALLOC_HEAP_BELOW come from the heap, and up to MALLOC_KEEP_FREE of
# it stays for the next ones; larger objects still get (and return) their own mapping.
MALLOC_HEAP_BELOW = 4 * 1024 * 1024
MALLOC_KEEP_FREE = 16 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


def tune_malloc() -> bool:
    """Set the two glibc malloc thresholds above, logged; False where there is no glibc
    mallopt, or when the environment already sets them (MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_: the operator's choice stands)."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        log.info("malloc: thresholds as set in the environment")
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    if mallopt(_M_MMAP_THRESHOLD, MALLOC_HEAP_BELOW) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_FREE) != 1:
        return False   # not glibc's (musl's mallopt does nothing and says so)
    log.info("malloc: blocks under %d MiB from the heap, up to %d MiB of free heap kept",
             MALLOC_HEAP_BELOW >> 20, MALLOC_KEEP_FREE >> 20)
    return True


class Engine:
    def __init__(self, config: Config, *, log_to_stderr: bool = True, accept_empty_store: bool = False,
                 control: Callable[[Engine], Any] | None = None,
                 metrics: Callable[[Engine], Any] | None = None):
        """``control(engine)`` makes the operators' way in (mfconsole.control.serve_control:
        the control sockets), started last and stopped first; the operations layer
        above the engine provides it, so the engine never imports that layer.
        ``metrics(engine)`` likewise makes the metrics export
        (mfconsole.metrics_export.serve_metrics: [metrics]), started after it."""
        self.config = config
        self._control_factory = control
        self._metrics_factory = metrics
        self.accept_empty_store = accept_empty_store
        self.data_dir = config.engine.data_dir
        self.log_to_stderr = log_to_stderr
        self.board = AssociationBoard()
        self.inflight = InflightBudget(config.store.inflight_mb * 1024 * 1024)
        self.listeners: list[Listener] = []
        self.store: Store | None = None
        self.started_at: float | None = None
        self._lock = DataDirLock(self.data_dir)
        self.router = Router(config)
        # The rules by name: a delivery's coercion is its rule's, as configured now.
        self.rules_by_name = {rule.name: rule for rule in config.rules}
        self.rule_counts = RuleCounts()    # what the rules decided since the start
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self.deliveries: dict[str, DestinationWorkers] = {}
        # Storage Commitment threads of the destinations that ask for it.
        self.commitments: dict[str, CommitmentWorker] = {}
        # [audit_export]: the audit trail to an ARR (None: not enabled).
        self.audit_exporter: AuditExporter | None = None
        self.held = outbox.Held()     # in-flight deliveries live workers are working on
        self.handlers: Handlers | None = None
        self._reload_lock = threading.Lock()
        self.control: Any = None
        self.metrics: Any = None
        # Each destination's seconds per object delivered, kept across reloads.
        self.send_latency = latency.PerName(latency.SEND_BUCKETS)
        self.alerts: AlertWorker | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock.acquire()
        try:
            logs.setup(self.data_dir / "logs", cfg.engine.log_level, stderr=self.log_to_stderr)
            raise_nofile()   # before any listener sizes its bounds on it
            tune_malloc()
            try:
                vault = open_vault(cfg.store, self.data_dir)
            except KeyCustodyError as exc:
                raise EngineError(str(exc)) from None
            if cfg.store.key_file.resolve().is_relative_to(self.data_dir.resolve()):
                log.warning("store.key_file lies inside data_dir: a copy of the data directory "
                            "carries its own key; keep the key elsewhere (see README)")
            # Objects are opaque bytes; what routing needs, dataset_scan validates itself.
            # pydicom's value validation (a regex per UID) would only cost GIL time where
            # a header is re-encoded or read (handlers, coercion, the console).
            pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
            self.store = Store(self.data_dir, vault, accept_empty_store=self.accept_empty_store)
            try:
                recovered = self.store.open()
            except StoreRefused as exc:
                self.store = None
                raise EngineError(str(exc)) from None
            self.store.call(Tx.set_meta, "sealing_key_id", vault.key_id)
            if any(recovered.values()):
                log.warning("recovered after an unclean stop: %d in-flight deliveries requeued, "
                            "%d blobs without a row quarantined", recovered["requeued"],
                            recovered["orphan_blobs"])
            try:
                self.handlers = Handlers(cfg.handlers_dir, handler_names(cfg))
            except HandlerError as exc:
                raise EngineError(str(exc)) from None
            self._start_deliveries()
            max_bytes = cfg.store.max_object_mb * 1024 * 1024
            for lc in cfg.listeners:
                listener = Listener(lc, self, self.board, max_bytes, inflight=self.inflight)
                try:
                    listener.start()
                except OSError as exc:
                    raise EngineError(f"listener {lc.name}: cannot listen on {lc.host}:{lc.port}: "
                                      f"{exc.strerror or exc}") from None
                self.listeners.append(listener)
            self.started_at = time.time()
            self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping",
                                                 daemon=True)
            self._housekeeper.start()
            self._start_alerts()
            self._start_control()
            self._start_metrics()
            self._start_audit_export()
            self.store.audit("engine_started", detail=f"version={__version__} pid={os.getpid()}")
            log.info("engine started (data_dir %s, %d listener(s))", self.data_dir, len(self.listeners))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._stop.set()
        if self.control is not None:      # no console action may start while stopping
            self.control.stop()
            self.control = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.alerts is not None:       # first: listeners stopping are no condition
            # A send under way may take its timeout; what it sent is marked by its own
            # commit, so the store must outlive it.
            self.alerts.stop(self.config.engine.shutdown_timeout_s)
            self.alerts = None
        timeout = self.config.engine.shutdown_timeout_s
        for listener in self.listeners:
            listener.stop(timeout)
        self.listeners.clear()
        for workers in self.deliveries.values():
            workers.stop(timeout)
        self.deliveries.clear()
        for committer in self.commitments.values():
            committer.stop(timeout)
        self.commitments.clear()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=5)
            self._housekeeper = None
        exporter, self.audit_exporter = self.audit_exporter, None
        if exporter is not None:
            exporter.stop(timeout)
        if self.store is not None:
            self.store.audit("engine_stopped")
            if exporter is not None:   # the last rows, engine_stopped too: one try, else next start
                exporter.flush()
            self.store.close()
            self.store = None
            log.info("engine stopped")
        self._lock.release()

    def _start_control(self) -> None:
        """The console's way in (data_dir/control.sock, and control-ro.sock for a
        read-only console). Routing does not need it: if the sockets cannot be made, the
        engine runs on and says why."""
        if self._control_factory is None:
            return
        server = self._control_factory(self)
        try:
            server.start()
        except OSError as exc:
            log.warning("control socket unavailable (%s): the console cannot attach to this "
                        "engine", exc.strerror or exc)
            return
        self.control = server

    def _start_metrics(self) -> None:
        """The metrics export ([metrics]): written once now, then every interval_s.
        Like the control sockets, routing does not need it: a failure is logged."""
        if self._metrics_factory is None:
            return
        try:
            exporter = self._metrics_factory(self)
            exporter.start()
        except OSError as exc:
            log.error("metrics export unavailable: %s", exc.strerror or exc)
            return
        self.metrics = exporter

    def _start_audit_export(self) -> None:
        cfg = self.config.audit_export
        if not cfg.enabled or self.store is None:
            return
        self.audit_exporter = AuditExporter(cfg, self.store, self.config, self.egress_tcp_dial)
        self.audit_exporter.start()
    def _start_alerts(self) -> None:
        """The alerts thread (engine/alerts.py): always there, idle without [alerts],
        so a reload can add them. Problems as `mfconsole health` lists them."""
        from mfconsole import health
        from mfconsole.engine.status import collect

        def problems() -> list[Any]:
            assert self.store is not None
            return health.problems(self.config, collect(self.config, self), self.store.reader())

        assert self.store is not None
        checks = egress.Checks(self.egress_tcp_dial, self.egress_http_dial)
        self.alerts = AlertWorker(self.store, lambda: self.config.alerts, problems,
                                  channel_senders(checks))
        self.alerts.start()

    def _start_deliveries(self) -> None:
        for dest in self.config.destinations:
            self._start_destination(dest)

    def _start_destination(self, dest: Any) -> None:
        assert self.store is not None
        # The kind makes the sender; the checks are the engine's, so they follow a reload.
        checks = egress.Checks(self.egress_tcp_dial, self.egress_http_dial)
        kind = kind_of(dest)

        def make_sender() -> Any:
            # Its connections show on the associations board, beside the inbound ones.
            return Watched(kind.sender(dest, checks), self.board, dest.name, kind.target(dest),
                           getattr(dest, "calling_ae_title", ""), getattr(dest, "ae_title", "") or "")
        assert self.handlers is not None
        workers = DestinationWorkers(dest, self.store, make_sender, Transformer(self.handlers, dest),
                                     self.held, Coercer(dest, lambda: self.rules_by_name),
                                     latency=self.send_latency.of(dest.name))
        workers.start()
        self.deliveries[dest.name] = workers
        if getattr(dest, "storage_commitment", False) and kind.commitment is not None:
            committer = CommitmentWorker(dest, self.store, kind.commitment(dest, checks),
                                         self.commitment_report, workers.wake.set)
            committer.start()
            self.commitments[dest.name] = committer

    # -- reload (SIGHUP, `mfconsole reload`, the console) ------------------------

    def reload(self, actor: str | None = None) -> list[str]:
        """Re-read config.toml and the handlers and apply them without dropping live
        associations. A config that does not load, or a change only a restart can
        make, leaves everything as it runs. Returns the report, also audited (with
        ``actor`` when someone asked: a console, the CLI; SIGHUP names none)."""
        with self._reload_lock:
            report = self._reload()
        applied = not report or not report[0].startswith("refused")
        clean = applied and not any("new version refused" in line for line in report)
        for line in report:
            (log.info if clean else log.error)("reload: %s", line)
        said = "; ".join(report) or "no change"
        self.audit("reloaded" if applied else "reload_refused", status="ok" if clean else "errors",
                   detail=f"by {actor}: {said}" if actor else said, actor=actor)
        return report

    def reload_handler(self, name: str) -> list[Any]:
        """Reload one handler (same checks and dry run as ``reload``); the others keep
        their running version. Returns that handler's ReloadResults."""
        assert self.handlers is not None
        with self._reload_lock:
            results = self.handlers.reload(self.config.handlers_dir, handler_names(self.config),
                                           self._dry_run, only=[name])
        return [r for r in results if r.name == name]

    def _reload(self) -> list[str]:
        from mfconsole.config import ConfigError, load

        old = self.config
        try:
            new = load(old.path)
        except ConfigError as exc:
            return [f"refused: {old.path.name} has {len(exc.problems)} problem(s): "
                    + "; ".join(f"{k}: {why}" for k, why in exc.problems)]
        except OSError as exc:
            return [f"refused: cannot read {old.path}: {exc.strerror}"]
        fixed = [k for k in ("data_dir", "log_level") if getattr(new.engine, k) != getattr(old.engine, k)]
        fixed += ["store." + k for k in ("key_file", "previous_key_files", "max_object_mb")
                  if getattr(new.store, k) != getattr(old.store, k)]
        if fixed or [lc.name for lc in new.listeners] != [lc.name for lc in old.listeners]:
            what = ", ".join(fixed) if fixed else "the set of listeners"
            return [f"refused: {what} changed; that needs a restart (systemctl restart mfconsole)"]
        report: list[str] = []
        if new.store.inflight_mb != old.store.inflight_mb:   # taken by the next fragment
            self.inflight.limit = new.store.inflight_mb * 1024 * 1024
            report.append(f"store.inflight_mb: {old.store.inflight_mb} -> {new.store.inflight_mb}")
        assert self.handlers is not None
        results = self.handlers.reload(new.handlers_dir, handler_names(new), self._dry_run)
        report += [str(r) for r in results if r.outcome != "unchanged"]
        self.config = new
        self.router = Router(new)          # the next object is routed by it
        self.rules_by_name = {rule.name: rule for rule in new.rules}   # the next delivery sent
        if (new.rules, new.routing) != (old.rules, old.routing):
            report.append(f"rules: {len(new.rules)} rule(s), match = {new.routing.match}"
                          + ("" if new.routing.fallback is None else
                             f", fallback = [{', '.join(new.routing.fallback)}]"))
        for i, listener in enumerate(self.listeners):
            lc = new.listener(listener.cfg.name)
            if lc == listener.cfg:
                continue
            if listener.reconfigure(lc):
                report.append(f"listener {lc.name}: updated (associations in progress kept)")
            else:
                listener.stop(new.engine.shutdown_timeout_s)
                listener.cfg = lc
                listener.start()
                report.append(f"listener {lc.name}: restarted on {lc.host}:{lc.port}")
        if new.audit_export != old.audit_export or (
                new.audit_export.enabled and (new.listeners, new.destinations)
                != (old.listeners, old.destinations)):
            if self.audit_exporter is not None:   # its cursor is in the store: nothing lost
                self.audit_exporter.stop(new.engine.shutdown_timeout_s)
                self.audit_exporter = None
            self._start_audit_export()
            report.append("audit_export: " + ("restarted" if new.audit_export.enabled else "off"))
        old_dests = {d.name: d for d in old.destinations}
        new_dests = {d.name: d for d in new.destinations}
        for name, dest in old_dests.items():
            if new_dests.get(name) != dest and name in self.deliveries:
                self.deliveries.pop(name).stop(new.engine.shutdown_timeout_s)
                if name in self.commitments:
                    self.commitments.pop(name).stop(new.engine.shutdown_timeout_s)
                if name not in new_dests:
                    report.append(f"destination {name}: removed (its queue stays in the store)"
                                  + self._release_all_held(name))
        for name, dest in new_dests.items():
            if old_dests.get(name) != dest:
                self._start_destination(dest)
                report.append(f"destination {name}: {'updated' if name in old_dests else 'added'}")
        return report

    def _release_all_held(self, name: str) -> str:
        """A destination removed: what it held is queued at once, as its pending
        deliveries stay (engine/holds.py). Words for the reload's report."""
        assert self.store is not None
        if self.store.reader().next_release(name) is None:
            return ""
        held = self.store.reader().delivery_counts(name).get(name, {}).get("held", 0)
        self.store.call(holds.release, name, True)
        return f"; its {held} held deliveries were queued"

    def _dry_run(self, new: Any, old: Any) -> str | None:
        """Run a new handler version on a few recent objects of its routes, sending
        nothing; refuse it if it raises where the running version did not."""
        from mfconsole.contract import Outbound, Outcome

        assert self.store is not None
        rows = self.store.reader().recent_for_handler(new.name, DRY_RUN_OBJECTS)
        config_dests = {d.name: d for d in self.config.destinations}
        for row in rows:
            dest = config_dests.get(row["destination"])
            if dest is None:
                continue
            try:
                data = self.store.read_object(row["object_id"])
            except (KeyError, VaultError, OSError):
                continue
            obj = Outbound(row["sop_class_uid"], row["sop_instance_uid"], row["transfer_syntax"],
                           data, row["study_uid"] or "")
            route = f"{row['listener']}->{dest.name}"
            results = []
            for version in (new, old):
                if version is None:
                    results.append(None)
                    continue
                single = Handlers.single(version)
                out, _ = Transformer(single, dest)(version.name, route, row["id"], obj,
                                                   Origin.of(row))
                failed = isinstance(out, Outcome) and out.status == "handler error"
                results.append(out.reason if failed else None)
            new_error, old_error = results
            if new_error and not old_error:
                return f"dry run on delivery {row['id']}: {new_error}"
        return None

    def egress_tcp_dial(self, host: str, port: int, *, loopback_only: bool = False) -> egress.Result:
        """Before every connect (the config may have been reloaded): the address ``host``
        resolves to now that [egress].allowed_tcp allows, with names pinned to what they
        resolved to at load — the sender connects to exactly it — or a Refusal.
        Raises egress.Unresolved (an OSError) when the host does not resolve."""
        cfg = self.config
        return egress.check_tcp(cfg.egress.allowed_tcp, cfg.egress_pins, host, port,
                                loopback_only=loopback_only)

    def egress_http_dial(self, url: str, *, loopback_only: bool = False) -> egress.Result:
        """Before every HTTP request: as egress_tcp_dial, under [egress].allowed_http."""
        cfg = self.config
        return egress.check_http(cfg.egress.allowed_http, cfg.egress_pins, url,
                                 loopback_only=loopback_only)

    def _housekeeping(self) -> None:
        """The retention purge (in bounded batches, see Store.purge_expired) and the
        sweep of in-flight deliveries nobody holds, while the engine runs."""
        next_purge = time.monotonic()
        while not self._stop.is_set():
            self._sweep()
            if time.monotonic() >= next_purge:
                self._purge()
                next_purge = time.monotonic() + PURGE_INTERVAL_S
            self._stop.wait(SWEEP_INTERVAL_S)

    def _sweep(self) -> None:
        try:
            if self.store is not None:
                n = self.store.call(outbox.sweep, self.held)
                if n:
                    log.warning("%d in-flight deliveries had no outcome written; queued again", n)
                    for workers in self.deliveries.values():
                        workers.wake.set()
        except Exception as exc:
            log.error("sweep of in-flight deliveries failed: %s", exc.__class__.__name__)

    def _purge(self) -> None:
        try:
            if self.store is not None:
                n = self.store.purge_expired(self.config.store.retention_days, stop=self._stop)
                # Hold rows of studies released before the retention: forgotten.
                self.store.call(Tx.forget_released_holds,
                                time.time() - self.config.store.retention_days * 86400)
                # Alert messages sent before the retention: forgotten (audited when sent).
                self.store.call(alert_rows.forget_sent,
                                time.time() - self.config.store.retention_days * 86400)
                if n:
                    log.info("retention: purged %d object(s)", n)
        except Exception as exc:
            log.error("retention purge failed: %s", exc.__class__.__name__)

    # -- IngestSink (called from association threads) ------------------------------

    def open_blob(self) -> Any:
        assert self.store is not None
        return self.store.open_blob()

    @property
    def header_tags(self) -> frozenset[int]:
        """Top-level attributes the rules match on, read by the listeners' scan."""
        return self.router.header_tags

    def begin_ingest(self, data: Any, summary: HeaderSummary, meta: dict[str, Any]) -> Future:
        """Route, seal and queue the commit of a received object: the Future of its
        outcome ("stored", "duplicate", ...), set once the object and its deliveries
        are committed (the listener answers Success then, not before)."""
        assert self.store is not None
        vault = self.store.vault
        # Decided before the commit, which then holds the object and its deliveries.
        decision = self.router.decide(summary, meta)
        request = IngestRequest(
            sop_instance_uid=summary.sop_instance_uid, sop_class_uid=summary.sop_class_uid,
            study_uid=summary.study_instance_uid, series_uid=summary.series_instance_uid,
            modality=summary.modality, transfer_syntax=meta["transfer_syntax"],
            listener=meta["listener"], calling_ae=meta["calling_ae"], peer=meta["peer"],
            called_ae=meta.get("called_ae", ""),
            routes=decision.routes, routed_by=decision.words, nowhere=decision.nowhere(),
            association_id=meta.get("association", ""),
            # Keyed hashes only: the identifiers themselves stay in the sealed blob.
            accession_token=(vault.search_token("accession", summary.accession_number)
                             if summary.accession_number else None),
            patient_token=(vault.search_token("patient_id", summary.patient_id)
                           if summary.patient_id else None))
        committed = self.store.begin_ingest(data, request)
        outcome: Future = Future()

        def done(future: Future) -> None:     # on the writer thread, after the commit
            try:
                result = future.result()
            except BaseException as exc:
                outcome.set_exception(exc)
                return
            if result.outcome != "duplicate":
                self.rule_counts.add(decision)
            if result.deliveries:
                for route in request.routes:
                    workers = self.deliveries.get(route.destination)
                    if workers is None:
                        continue
                    if route.destination in result.held:
                        # Nothing to send yet: no wake, only its release clock (holds.py).
                        workers.hold_until(time.time() + route.hold_s)
                    else:
                        workers.new_work(urgent=bool(route.priority))
            outcome.set_result(result.outcome)

        committed.add_done_callback(done)
        return outcome

    def commitment_peer(self, calling_ae: str, host: str) -> str | None:
        """The dimse destination with storage_commitment a peer calling as
        ``calling_ae`` from ``host`` is (its AE title and host, or an address its host
        name was pinned to at load): the only peers whose N-EVENT-REPORTs we take."""
        for d in self.config.destinations:
            if not getattr(d, "storage_commitment", False) or d.ae_title.strip() != calling_ae.strip():
                continue
            if d.host == host or host in (self.config.egress_pins.of(d.host) or ()):
                return d.name
        return None

    def commitment_report(self, report: Any, via: str, expected: str | None = None) -> int:
        """Record an N-EVENT-REPORT of Storage Commitment (``via``: "same association",
        or the listener's words); the status to answer: Success once committed, or
        0x0110 (processing failure) when it was not for this peer or not recorded."""
        if self.store is None:
            return 0x0110
        retries = {d.name: getattr(d, "commitment_retries", 0) for d in self.config.destinations}
        applied = self.store.call(apply_report, report, via, lambda name: retries.get(name, 0), expected)
        if applied.destination is None:
            return 0x0110 if expected is not None else 0x0000
        committer = self.commitments.get(applied.destination)
        if committer is not None:
            committer.reported(report.transaction_uid)
        if applied.resent and applied.destination in self.deliveries:
            self.deliveries[applied.destination].wake.set()
        return 0x0000

    def audit(self, event: str, **fields: Any) -> None:
        if self.store is not None:
            self.store.audit(event, **fields)

    # -- observation -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        from mfconsole.engine.status import collect

        return collect(self.config, self)


def handler_names(config: Config) -> set[str]:
    return {r.handler for r in (*config.routes, *config.rules) if r.handler}

"""The exporter of [audit_export]: the audit trail, row by row in id order, to an
audit record repository as DICOM audit messages over syslog/TLS (mfconsole/auditlog).

Never lost: the cursor (the last audit row exported, table audit_exports) moves only
after the receiver has read the batch (auditlog/syslog.py: the batch's connection is
closed by both sides). While the ARR is down, or refuses the handshake, the cursor
stays and the batch is tried again, the wait doubling up to retry_max_s; the
backlog follows when it is back. A batch the receiver read but whose confirmation was
lost is sent again: an ARR may see a message twice, never miss one.

Audit rows are never purged (the retention purge removes object blobs only), so the
backlog of a long outage is still there to send.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from mfconsole import egress, tls
from mfconsole.audit_export import EXPORT_NAME, AuditExportConfig
from mfconsole.auditlog import events, message, syslog
from mfconsole.engine.plan import Objects
from mfconsole.repository import Tx
from mfconsole.rules import SPECIFIC_CHARACTER_SET, decode

log = logging.getLogger("mfconsole.audit_export")

FIRST_RETRY_S = 1.0
PATIENT_ID = 0x00100020
_PATIENT_ID_WANTED = frozenset({PATIENT_ID})
_PATIENT_CACHE = 256         # object id -> patient identifier, for the rows of one object


class AuditExporter:
    def __init__(self, cfg: AuditExportConfig, store: Any, config: Any,
                 dial: Callable[..., egress.Result]):
        """``config``: the running Config (listener AE titles, destinations' peers);
        ``dial(host, port, loopback_only=)``: the engine's [egress] check."""
        self.cfg, self.store, self.config, self.dial = cfg, store, config, dial
        self._tls = tls.Reloading(tls.client_context, cfg.tls) if cfg.tls is not None else None
        self._loopback_only = cfg.tls is None and not cfg.allow_cleartext
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._patients: dict[int, str | None] = {}
        self.failing: str | None = None      # why the last attempt failed (None: fine)
        self.context = self._context()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=min(timeout, self.cfg.timeout_s + 1))
            self._thread = None

    def flush(self) -> None:
        """At a stop (the thread stopped): send what is left, within timeout_s; what
        cannot go now stays for the next start."""
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            self.store.call(_committed)   # the rows queued before this are written
            while time.monotonic() < deadline and self.export_once() == self.cfg.batch:
                pass
        except Exception as exc:
            log.warning("audit export: the last rows wait for the next start (%s)", exc)

    def wake(self) -> None:
        """Look for new rows now (tests, and a stop that wants the last rows out)."""
        self._wake.set()

    def _run(self) -> None:
        retry = FIRST_RETRY_S
        while not self._stop.is_set():
            try:
                done = self.export_once()
            except (syslog.SendError, tls.TLSSetupError, egress.Unresolved, _Refused) as exc:
                self._failed(str(exc))
                self._sleep(retry)
                retry = min(retry * 2, self.cfg.retry_max_s)
                continue
            except Exception as exc:   # a bug must not end the thread: say so, try again
                log.error("audit export: %s", exc.__class__.__name__)
                self._sleep(self.cfg.retry_max_s)
                continue
            retry = FIRST_RETRY_S
            if done < self.cfg.batch:     # caught up: wait for new rows
                self._sleep(self.cfg.interval_s)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    # -- one batch ---------------------------------------------------------------

    def export_once(self) -> int:
        """Send the next batch of audit rows; the rows it covered (0: none new)."""
        reads = self.store.reader()
        after = reads.audit_export(EXPORT_NAME)["last_id"]
        rows = reads.audit_to_export(after, self.cfg.batch)
        if not rows:
            return 0
        messages = []
        for row in rows:
            record = events.record_of(row, self.context)
            if record is None:
                continue
            failed = record.outcome != message.SUCCESS
            messages.append(syslog.format_message(
                message.to_xml(record), ts=float(row["ts"]), hostname=self.context.hostname,
                app_name=self.cfg.app_name, procid=self.context.process_id,
                severity=syslog.WARNING if failed else syslog.NOTICE))
        if messages:
            syslog.send_batch(self._target(), messages, timeout_s=self.cfg.timeout_s)
        self.store.call(Tx.audit_exported, EXPORT_NAME, rows[-1]["id"], len(messages), time.time())
        if self.failing is not None:
            log.info("audit export: %s:%d reachable again; sending the backlog",
                     self.cfg.host, self.cfg.port)
            self.failing = None
        return len(rows)

    def _target(self) -> syslog.Target:
        dial = self.dial(self.cfg.host, self.cfg.port, loopback_only=self._loopback_only)
        if isinstance(dial, egress.Refusal):
            raise _Refused(f"audit_export: {dial.reason}")
        ctx = self._tls.get() if self._tls is not None else None
        return syslog.Target(host=self.cfg.host, address=dial.address, port=dial.port, context=ctx,
                             server_hostname=tls.server_hostname(self.cfg.tls, self.cfg.host))

    def _failed(self, why: str) -> None:
        if why != self.failing:     # once per distinct reason, not at every retry
            log.warning("audit export: %s; the audit trail waits and is sent when it can be", why)
        self.failing = why
        try:
            self.store.call(Tx.audit_export_failed, EXPORT_NAME, why, time.time())
        except Exception as exc:
            log.error("audit export: cannot record the failure (%s)", exc.__class__.__name__)

    # -- what the rows do not say ------------------------------------------------

    def _context(self) -> events.Context:
        config = self.config
        listeners = {lc.name: lc.ae_title for lc in config.listeners}
        peers = {d.name: ((getattr(d, "ae_title", "") or d.name), _host_of(d)) for d in config.destinations}
        return events.Context(
            source_id=self.cfg.app_name, hostname=socket.gethostname(), process_id=str(os.getpid()),
            site_id=self.cfg.enterprise_site_id, listener_ae=listeners.get,
            destination_peer=peers.get,
            patient=self._patient if self.cfg.include_patient_ids else None,
            patient_hashed=self.cfg.patient_id_hash)

    def _patient(self, row: dict[str, Any]) -> str | None:
        """The patient identifier of a row's object, hashed unless configured raw; None
        when the object can no longer be read (purged) or has none."""
        object_id = int(row["object_id"])
        if object_id in self._patients:
            return self._patients[object_id]
        value = None
        try:
            # The header only, scanned as the blob is decrypted chunk by chunk: a large
            # object is never whole in memory for one identifier.
            objects = Objects(self.store.reader(), self.store.vault, self.store.blob_root)
            values, _ = objects.header({"id": object_id, "transfer_syntax": row.get("transfer_syntax")
                                        or "1.2.840.10008.1.2.1"}, _PATIENT_ID_WANTED)
            raw = values.get(PATIENT_ID)
            pid = decode(raw, values.get(SPECIFIC_CHARACTER_SET)).strip(" \x00") if raw else ""
            if pid:
                value = self.store.vault.audit_pseudonym(pid) if self.cfg.patient_id_hash else pid
        except Exception as exc:   # purged (KeyError), unreadable, or not parsed: left out
            log.debug("audit export: object %d not readable (%s)", object_id, exc.__class__.__name__)
        if len(self._patients) >= _PATIENT_CACHE:
            self._patients.clear()
        self._patients[object_id] = value
        return value


def _committed(tx: Tx) -> None:
    """Nothing: a call through the writer returns once every earlier write is committed."""


class _Refused(OSError):
    """[egress] does not allow the ARR's address now."""


def _host_of(destination: Any) -> str | None:
    host = getattr(destination, "host", None)
    if host:
        return host
    url = getattr(destination, "url", None)
    if url:
        from urllib.parse import urlsplit

        return urlsplit(url).hostname
    return None

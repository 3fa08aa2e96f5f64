"""[audit_export]: the audit trail sent to an audit record repository (ARR) as DICOM
audit messages over syslog/TLS (mfconsole/auditlog; the exporter thread is
engine/audit_export.py; docs/operations.md, "Audit export").

Read here with config.py's reader; the ``tls`` table is a destination's (same keys,
same checks: config.py hands its reader in), and host:port must be allowed by
[egress].allowed_tcp like any destination's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from mfconsole.egress import is_loopback
from mfconsole.value_checks import port as port_problem, positive

EXPORT_NAME = "arr"          # the row of audit_exports the export keeps its cursor in
AUDIT_EXPORT_KEYS = frozenset({
    "enabled", "host", "port", "tls", "allow_cleartext", "app_name", "enterprise_site_id",
    "include_patient_ids", "patient_id_hash", "batch", "interval_s", "retry_max_s",
    "timeout_s"})
_APP_NAME = re.compile(r"^[!-~]{1,48}$")     # RFC 5424 APP-NAME: PRINTUSASCII, 1-48


@dataclass(frozen=True)
class AuditExportConfig:
    enabled: bool = False
    host: str = ""
    port: int = 6514                     # syslog over TLS (RFC 5425)
    tls: Any = None                      # config.TLSConfig; None: cleartext TCP
    allow_cleartext: bool = False        # cleartext off loopback (audit data on the network)
    app_name: str = "mfconsole"          # syslog APP-NAME and AuditSourceID
    enterprise_site_id: str | None = None
    include_patient_ids: bool = False
    patient_id_hash: bool = True         # with include_patient_ids: a keyed hash, not the ID
    batch: int = 100                     # audit rows read (and messages sent) at a time
    interval_s: float = 2.0              # how often new audit rows are looked for
    retry_max_s: float = 60.0            # the longest wait between attempts while the ARR is down
    timeout_s: float = 10.0              # connect, handshake, send and confirmation of a batch


def read(r: Any, raw: Any, *, read_tls: Callable[[dict[str, Any], str], Any],
         egress_problem: Callable[[str, int], str | None]) -> AuditExportConfig:
    """[audit_export] with config.py's reader ``r``; ``read_tls(table, path)`` reads a
    destination's tls table; ``egress_problem(host, port)`` says why [egress] does not
    allow host:port (None: it does)."""
    p = "audit_export"
    t = r.table(raw, p, AUDIT_EXPORT_KEYS)
    d = AuditExportConfig()
    before = len(r.problems)

    enabled = r.get(t, p, "enabled", bool, False)
    host = r.get(t, p, "host", str, "", lambda v: None if v.strip() and not any(c.isspace() for c in v)
                 else "must be a host name or IP address")
    port = r.get(t, p, "port", int, d.port, port_problem)
    tls = read_tls(t, p)
    cleartext = r.get(t, p, "allow_cleartext", bool, False)
    app_name = r.get(t, p, "app_name", str, d.app_name,
                     lambda v: None if _APP_NAME.match(v) else
                     "must be 1 to 48 printable ASCII characters without spaces (RFC 5424 APP-NAME)")
    site = r.get(t, p, "enterprise_site_id", str, None,
                 lambda v: None if v.strip() else "must not be empty")
    include = r.get(t, p, "include_patient_ids", bool, False)
    hashed = r.get(t, p, "patient_id_hash", bool, True)
    batch = r.get(t, p, "batch", int, d.batch,
                  lambda v: None if 1 <= v <= 10000 else "must be between 1 and 10000")
    interval = r.get(t, p, "interval_s", float, d.interval_s, positive)
    retry_max = r.get(t, p, "retry_max_s", float, d.retry_max_s, positive)
    timeout = r.get(t, p, "timeout_s", float, d.timeout_s, positive)
    if cleartext and "tls" in t:
        r.fail(f"{p}.allow_cleartext", "does not apply: this connection uses TLS")
    if "patient_id_hash" in t and not include:
        r.fail(f"{p}.patient_id_hash", "is only used with include_patient_ids = true")
    if enabled:
        if not host:
            r.fail(f"{p}.host", "is required with enabled = true: the audit record repository's "
                   "syslog receiver")
        elif len(r.problems) == before:
            if "tls" not in t and not cleartext and not is_loopback(host):
                r.fail(f"{p}.host", f"'{host}' is not a loopback address and audit_export has no "
                       "TLS; the audit trail would cross the network in cleartext. Give it TLS "
                       "(tls = { ca_file = \"…\" }, or tls = {} to trust the system store), or set "
                       f"{p}.allow_cleartext = true to accept that risk")
            why = egress_problem(host, port)
            if why:
                r.fail(f"{p}.host", why)
    if len(r.problems) > before:
        return d
    return AuditExportConfig(enabled=enabled, host=host, port=port, tls=tls,
                             allow_cleartext=cleartext, app_name=app_name,
                             enterprise_site_id=site, include_patient_ids=include,
                             patient_id_hash=hashed, batch=batch, interval_s=interval,
                             retry_max_s=retry_max, timeout_s=timeout)

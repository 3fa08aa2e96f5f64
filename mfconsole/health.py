"""What is wrong right now, in routing-safe words: the one list of conditions that
`mfconsole health` prints (exit 0 ok, 1 degraded, 2 down), the metrics export and the
alerts start and clear on.

Each Problem has a stable ``key`` (what the condition is about, e.g.
``destination_down:pacs``): an alert starts when a key appears and clears when it is
gone. Texts name configured names, states and numbers only — never a UID or a DICOM
value — so they may go to a pager, a mail or a load balancer's log.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mfconsole.value_checks import positive

OK, DEGRADED, DOWN = 0, 1, 2
HEALTH_KEYS = frozenset({"oldest_pending_s", "dead_letters", "dead_letters_window_s",
                         "cert_expiry_days", "store_min_free_percent"})


@dataclass(frozen=True)
class HealthConfig:
    """[health]: when a condition counts as a problem."""
    oldest_pending_s: float = 900.0          # a pending delivery older than this
    dead_letters: int = 10                   # this many new dead letters ...
    dead_letters_window_s: float = 3600.0    # ... within this window
    cert_expiry_days: float = 14.0           # a certificate expiring this soon
    store_min_free_percent: float = 10.0     # free space left on data_dir's file system


@dataclass(frozen=True, order=True)
class Problem:
    severity: int      # DEGRADED or DOWN
    key: str           # stable identity of the condition: what alerts pair on
    text: str          # one routing-safe line

    @property
    def word(self) -> str:
        return "down" if self.severity == DOWN else "degraded"


def read(r: Any, raw: Any) -> HealthConfig:
    """[health] with config.py's reader ``r`` (problems with key paths)."""
    t = r.table(raw, "health", HEALTH_KEYS)
    d = HealthConfig()

    def percent(value: float) -> str | None:
        return None if 0 <= value < 100 else "must be a percentage from 0 to 99"

    return HealthConfig(
        oldest_pending_s=r.get(t, "health", "oldest_pending_s", float, d.oldest_pending_s, positive)
        or d.oldest_pending_s,
        dead_letters=r.get(t, "health", "dead_letters", int, d.dead_letters, positive) or d.dead_letters,
        dead_letters_window_s=r.get(t, "health", "dead_letters_window_s", float,
                                    d.dead_letters_window_s, positive) or d.dead_letters_window_s,
        cert_expiry_days=r.get(t, "health", "cert_expiry_days", float, d.cert_expiry_days, positive)
        or d.cert_expiry_days,
        store_min_free_percent=r.get(t, "health", "store_min_free_percent", float,
                                     d.store_min_free_percent, percent) or d.store_min_free_percent)


def severity(problems: list[Problem]) -> int:
    return max((p.severity for p in problems), default=OK)


def problems(config: Any, status: dict[str, Any], reads: Any = None,
             now: float | None = None) -> list[Problem]:
    """Every problem, most severe first. ``status``: engine/status.collect's dict;
    ``reads``: a Reads of the store (None: no database yet)."""
    now = time.time() if now is None else now
    h: HealthConfig = getattr(config, "health", None) or HealthConfig()
    out: list[Problem] = []
    if not status["engine"]["running"]:
        out.append(Problem(DOWN, "engine_down", "engine: not running"))
    else:
        for lc in status["listeners"]:
            if lc.get("state") != "listening":
                out.append(Problem(DOWN, f"listener_down:{lc['name']}",
                                   f"listener {lc['name']}: {lc.get('state', 'stopped')}"))
    for d in status["destinations"]:
        name = d["name"]
        if d["state"] == "down":
            out.append(Problem(DEGRADED, f"destination_down:{name}",
                               f"destination {name}: down ({d.get('last_error') or 'no answer'})"))
        oldest = d.get("oldest_pending_at")
        if oldest and d["state"] != "paused" and now - oldest > h.oldest_pending_s:
            out.append(Problem(DEGRADED, f"oldest_pending:{name}",
                               f"destination {name}: oldest pending delivery waiting "
                               f"{_duration(now - oldest)} (over {_duration(h.oldest_pending_s)})"))
    if reads is not None:
        dead = reads.events_since(("dead_lettered",), now - h.dead_letters_window_s)
        for name, n in sorted(dead.items()):
            if n >= h.dead_letters:
                out.append(Problem(DEGRADED, f"dead_letters:{name}",
                                   f"destination {name}: {n} dead letter(s) in the last "
                                   f"{_duration(h.dead_letters_window_s)}"))
        export = getattr(config, "audit_export", None)
        if export is not None and export.enabled:
            from mfconsole.audit_export import EXPORT_NAME

            state = reads.audit_export(EXPORT_NAME)
            if state["last_error"]:      # cleared by the next batch the ARR reads
                out.append(Problem(DEGRADED, "audit_export",
                                   f"audit export: the last attempt failed ({state['last_error']}); "
                                   f"audit rows after {state['last_id']} wait for the ARR"))
        last_reload = reads.last_event(("reloaded", "reload_refused"))
        if last_reload is not None and last_reload["status"] == "errors":
            out.append(Problem(DEGRADED, "reload_refused",
                               "reload: a configuration or handler version was refused "
                               "(mfconsole audit --event reloaded)"))
    for path, not_after in certificate_expiry(config).items():
        left = not_after - now
        if left < h.cert_expiry_days * 86400:
            word = "expired" if left <= 0 else f"expires in {_duration(left)}"
            out.append(Problem(DOWN if left <= 0 else DEGRADED, f"certificate:{path}",
                               f"certificate {path}: {word}"))
    free = free_percent(config.engine.data_dir)
    if free is not None and free < h.store_min_free_percent:
        out.append(Problem(DOWN if free < 1 else DEGRADED, "store_space",
                           f"store: {free:.1f}% free on the data directory's file system "
                           f"(under {h.store_min_free_percent:g}%)"))
    return sorted(out, key=lambda p: (-p.severity, p.key))


def tls_files(config: Any) -> Iterator[Path]:
    """Every certificate file the configuration names (ours and the CAs we trust)."""
    seen: set[Path] = set()
    for item in (*config.listeners, *config.destinations):
        t = getattr(item, "tls", None)
        for path in (t.cert_file, t.ca_file) if t is not None else ():
            if path is not None and path not in seen:
                seen.add(path)
                yield path


def certificate_expiry(config: Any) -> dict[str, float]:
    """File → the earliest notAfter (epoch seconds) among its certificates; a file
    that cannot be read is left out (check and the TLS setup report it)."""
    from cryptography import x509

    out: dict[str, float] = {}
    for path in tls_files(config):
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue
        if certs:
            out[str(path)] = min(c.not_valid_after_utc.timestamp() for c in certs)
    return out


def free_percent(path: Path) -> float | None:
    """Free space on the file system holding ``path`` (its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            usage = shutil.disk_usage(candidate)
            return 100.0 * usage.free / usage.total if usage.total else None
    return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"

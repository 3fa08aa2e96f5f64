"""config.toml → frozen, typed configuration.

Every problem is reported with the key path it concerns (``listeners[0].port``) and
why, all at once, so an administrator fixes a file in one pass. Unknown keys are errors:
a typo such as ``calling_aet`` must never silently fall back to a default.

Destinations are read from their kind's declaration (DestinationKind, at the end of
this module): each kind lives in its protocol package's kind.py and is listed in
mfconsole/kinds.py, which this module imports only inside functions (the kinds import
this module for the vocabulary they are declared with).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar
from urllib.parse import urlsplit

from mfconsole import audit_export as audit_export_mod
from mfconsole import coerce as coerce_mod
from mfconsole.alerting import settings as alerts_mod
from mfconsole import egress as egress_mod
from mfconsole import health as health_mod
from mfconsole import metrics as metrics_mod
from mfconsole import rules as rules_mod
from mfconsole import value_checks
from mfconsole import windows as windows_mod
from mfconsole.names import ae_title_problem, name_problem as _name  # noqa: F401  (kinds import them from here)
from mfconsole.egress import http_prefix_allows, is_loopback, tcp_allows  # noqa: F401 (re-exported)
from mfconsole.egress import path_problem as _path_problem
from mfconsole.tls import TLSSetupError, client_context, server_context

if TYPE_CHECKING:
    from mfconsole.contract import Sender

DEFAULT_CONFIG = "config.toml"
_HANDLER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Every key each table accepts; anything else is reported as an unknown key. The
# shipped config.toml documents each of them (tests/unit/test_config.py checks).
TOP_KEYS = frozenset({"engine", "store", "egress", "listeners", "destinations", "routes",
                      "rules", "routing", "health", "metrics", "audit_export", "alerts"})
ENGINE_KEYS = frozenset({"data_dir", "log_level", "shutdown_timeout_s"})
STORE_KEYS = frozenset({"key_file", "previous_key_files", "max_object_mb", "retention_days",
                        "inflight_mb"})
EGRESS_KEYS = frozenset({"allowed_tcp", "allowed_http"})
LISTENER_KEYS = frozenset({
    "name", "ae_title", "host", "port", "calling_aets", "max_associations", "tls",
    "allow_cleartext", "accept_deflate", "max_pdu_kb", "acse_timeout_s",
    "max_pending_connections", "max_pending_per_address",
    "dimse_timeout_s", "network_timeout_s"})
# One `tls` table everywhere; a key of the other side is an error, not ignored.
LISTENER_TLS_KEYS = frozenset({"cert_file", "key_file", "ca_file", "require_client_cert",
                               "client_cert_aets"})
DESTINATION_TLS_KEYS = frozenset({"cert_file", "key_file", "ca_file", "server_name"})
ROUTE_KEYS = frozenset({"from", "to", "handler"})


def accepted_keys() -> dict[str, frozenset[str]]:
    """Every key each table accepts (section → keys). Destinations accept the keys of
    every registered kind (each kind accepts only its own: see DestinationKind.keys)."""
    from mfconsole.kinds import REGISTRY

    return {
        "": TOP_KEYS,
        "engine": ENGINE_KEYS,
        "store": STORE_KEYS,
        "egress": EGRESS_KEYS,
        "listeners": LISTENER_KEYS,
        "destinations": frozenset().union(*(k.keys() for k in REGISTRY.kinds())),
        "routes": ROUTE_KEYS,
        "rules": rules_mod.RULE_KEYS,
        "rules.when": rules_mod.WHEN_KEYS,
        "rules.coerce": coerce_mod.ALL_KEYS,
        "routing": rules_mod.ROUTING_KEYS,
        "health": health_mod.HEALTH_KEYS,
        "metrics": metrics_mod.METRICS_KEYS,
        "audit_export": audit_export_mod.AUDIT_EXPORT_KEYS,
        "audit_export.tls": DESTINATION_TLS_KEYS,
        # [alerts.email] and [alerts.webhook] are tables of their own, listed below.
        "alerts": alerts_mod.ALERTS_KEYS - {"email", "webhook"},
        "alerts.email": alerts_mod.EMAIL_KEYS,
        "alerts.webhook": alerts_mod.WEBHOOK_KEYS,
        "listeners.tls": LISTENER_TLS_KEYS,
        "destinations.tls": DESTINATION_TLS_KEYS,
    }


_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConfigError(Exception):
    """Raised with every problem found; ``problems`` holds (key path, why) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {key}: {why}" for key, why in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class EngineConfig:
    data_dir: Path
    log_level: str = "INFO"
    shutdown_timeout_s: float = 30.0


@dataclass(frozen=True)
class StoreConfig:
    key_file: Path
    max_object_mb: int = 1024
    retention_days: int = 30
    # Data set bytes all associations of mfconsole's upper layer may hold at once.
    inflight_mb: int = 512
    # Keys of a rotation: read-only, for objects sealed before key_file took over.
    previous_key_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class EgressConfig:
    allowed_tcp: tuple[str, ...] = ()
    allowed_http: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """A ``tls`` table: the same shape on listeners and destinations (tls.py)."""
    cert_file: Path | None = None          # our certificate (a listener's; a client's for mTLS)
    key_file: Path | None = None           # its key, unless cert_file holds it
    ca_file: Path | None = None            # whom we trust (destinations: else the system store)
    require_client_cert: bool = False      # listeners: mTLS
    server_name: str | None = None         # destinations: the name the peer's certificate carries
    # Listeners: certificate name (subject CN or subjectAltName, lower-case) → the
    # calling AE titles a peer presenting it may use; empty: no binding.
    client_cert_aets: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def aets_for(self, names: set[str]) -> frozenset[str]:
        """The calling AE titles a certificate carrying ``names`` may use."""
        return frozenset(ae for name, aets in self.client_cert_aets if name in names for ae in aets)


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    ae_title: str
    host: str
    port: int
    calling_aets: tuple[str, ...] = ("*",)
    max_associations: int = 16
    tls: TLSConfig | None = None
    allow_cleartext: bool = False
    accept_deflate: bool = False
    max_pdu_kb: int = 256
    # A connection has this long to finish its TLS handshake and send its whole
    # A-ASSOCIATE-RQ (and a peer to close after our release or rejection).
    acse_timeout_s: float = 10.0
    # Connections not yet associated (handshaking, or not yet through their request),
    # in all and per peer address; over either, the newest is closed at once. 0: half
    # the open-files limit (at most 8192), and half of that per address.
    max_pending_connections: int = 0
    max_pending_per_address: int = 0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0

    @property
    def any_calling_aet(self) -> bool:
        return "*" in self.calling_aets


@dataclass(frozen=True)
class RouteConfig:
    from_listener: str
    to: tuple[str, ...]
    handler: str | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    engine: EngineConfig
    store: StoreConfig
    egress: EgressConfig
    listeners: tuple[ListenerConfig, ...]
    destinations: tuple[DestinationConfig, ...]
    routes: tuple[RouteConfig, ...]
    handlers_dir: Path = field(default=Path("handlers"))
    # What each name in [egress] resolved to when this configuration was loaded: a
    # connection may only go to one of those addresses (mfconsole/egress.py).
    egress_pins: egress_mod.Pins = field(default_factory=egress_mod.Pins)
    # [[rules]] and [routing] (mfconsole/rules.py): none, and the fallback absent, is
    # routing by [[routes]] alone.
    rules: tuple[rules_mod.Rule, ...] = ()
    routing: rules_mod.Routing = field(default_factory=rules_mod.Routing)
    # [health] (mfconsole/health.py): when a condition is a problem (health, alerts).
    health: health_mod.HealthConfig = field(default_factory=health_mod.HealthConfig)
    # [metrics] (mfconsole/metrics.py): the Prometheus text file and endpoint.
    metrics: metrics_mod.MetricsConfig = field(default_factory=metrics_mod.MetricsConfig)
    # [audit_export] (mfconsole/audit_export.py): the audit trail to an ARR over syslog.
    audit_export: audit_export_mod.AuditExportConfig = field(
        default_factory=audit_export_mod.AuditExportConfig)
    # [alerts] (mfconsole/alerting/settings.py): None when absent (no alerts).
    alerts: alerts_mod.AlertsConfig | None = None

    def destination(self, name: str) -> DestinationConfig:
        return next(d for d in self.destinations if d.name == name)

    def listener(self, name: str) -> ListenerConfig:
        return next(item for item in self.listeners if item.name == name)


# ---------------------------------------------------------------------------
# Validation helpers: each returns None when fine, else the reason.


# is_loopback, http_prefix_allows and tcp_allows live in mfconsole/egress.py (imported
# above): a host is judged by the addresses it resolves to, not by its spelling.


# ---------------------------------------------------------------------------


# Keys an earlier version took and this one does not: why, instead of "unknown key".
RETIRED_KEYS = {
    "upper_layer": "no longer a setting: mfconsole speaks DICOM itself (the pynetdicom "
                   "upper layer was removed); delete this key",
}


class _Reader:
    """Walks a TOML table, recording problems with their key paths."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, key: str, why: str) -> None:
        self.problems.append((key, why))

    def table(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(path, "must be a table")
            return {}
        for key in raw:
            if key in RETIRED_KEYS and key not in allowed:
                self.fail(f"{path}.{key}" if path else key, RETIRED_KEYS[key])
            elif key not in allowed:
                hint = _closest(key, allowed)
                self.fail(f"{path}.{key}" if path else key,
                          "unknown key" + (f" (did you mean '{hint}'?)" if hint else ""))
        return raw

    def get(self, raw: dict[str, Any], path: str, key: str, kind: type | tuple[type, ...],
            default: Any = ..., check: Callable[[Any], str | None] | None = None) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in raw:
            if default is ...:
                self.fail(where, "is required")
                return None
            return default
        value = raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are ints in Python; never accept true as a port number.
        if isinstance(value, bool) and bool not in kinds:
            self.fail(where, f"must be {_kind_name(kinds)}, not a boolean")
            return None
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.fail(where, f"must be {_kind_name(kinds)}")
            return None
        if check is not None:
            why = check(value)
            if why:
                self.fail(where, why)
                return None
        return value

    def string_list(self, raw: dict[str, Any], path: str, key: str,
                    default: Any = ..., check: Callable[[str], str | None] | None = None
                    ) -> tuple[str, ...] | None:
        where = f"{path}.{key}" if path else key
        value = self.get(raw, path, key, list, default)
        if value is None:
            return None
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{where}[{i}]", "must be a string")
                continue
            why = check(item) if check else None
            if why:
                self.fail(f"{where}[{i}]", why)
                continue
            out.append(item)
        return tuple(out)


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


_port, _positive = value_checks.port, value_checks.positive


PRIORITIES = {"low": 2, "medium": 0, "high": 1}   # DIMSE priority codes (PS3.7 9.1.1.1)


def _range(lo: int, hi: int) -> Callable[[int], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _host_port(value: str) -> str | None:
    """An [egress].allowed_tcp entry: a name, an address or a CIDR range, and a port
    (or * for any); see mfconsole/egress.py."""
    return egress_mod.entry_problem(value)


def _http_prefix(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return "must be an http:// or https:// URL with a valid port"
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return "must be an http:// or https:// URL prefix"
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return "must not carry a query, fragment or credentials"
    return _path_problem(parts.path)


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _host(value: str) -> str | None:
    if not value.strip() or any(ch.isspace() for ch in value):
        return "must be a host name or IP address"
    return None


def _log_level(value: str) -> str | None:
    return None if value.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else (
        "must be DEBUG, INFO, WARNING or ERROR")


def load(path: str | Path = DEFAULT_CONFIG) -> Config:
    """Read and validate ``path``; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [("(file)", "no such file; pass --config PATH "
                                                f"(the default is ./{DEFAULT_CONFIG})")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("(file)", f"cannot be read: {exc.__class__.__name__}")]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("(syntax)", str(exc))]) from None
    return parse(raw, path)


def parse(raw: dict[str, Any], path: Path) -> Config:
    base = path.resolve().parent
    r = _Reader()
    r.table(raw, "", TOP_KEYS)

    def resolve(value: str | None, fallback: str) -> Path:
        p = Path(value if value else fallback).expanduser()
        return p if p.is_absolute() else base / p

    eng = r.table(raw.get("engine", {}), "engine", ENGINE_KEYS)
    engine = EngineConfig(
        data_dir=resolve(r.get(eng, "engine", "data_dir", str, "var", _not_empty), "var"),
        log_level=(r.get(eng, "engine", "log_level", str, "INFO", _log_level) or "INFO").upper(),
        shutdown_timeout_s=r.get(eng, "engine", "shutdown_timeout_s", float, 30.0, _positive) or 30.0,
    )

    st = r.table(raw.get("store", {}), "store", STORE_KEYS)
    store = StoreConfig(
        # Outside data_dir by default: a copy of data_dir must not carry its own key.
        key_file=resolve(r.get(st, "store", "key_file", str, None, _not_empty), "keys/store.key"),
        previous_key_files=tuple(resolve(p, p) for p in
                                 r.string_list(st, "store", "previous_key_files", [], None) or ()),
        max_object_mb=r.get(st, "store", "max_object_mb", int, 1024, _range(1, 65536)) or 1024,
        retention_days=r.get(st, "store", "retention_days", int, 30, _range(1, 36500)) or 30,
        inflight_mb=r.get(st, "store", "inflight_mb", int, 512, _range(1, 1048576)) or 512,
    )

    eg = r.table(raw.get("egress", {}), "egress", EGRESS_KEYS)
    egress = EgressConfig(
        allowed_tcp=r.string_list(eg, "egress", "allowed_tcp", [], _host_port) or (),
        allowed_http=r.string_list(eg, "egress", "allowed_http", [], _http_prefix) or (),
    )
    # Names are pinned: what they resolve to now is what they allow until the next load.
    pins = egress_mod.pin(egress.allowed_tcp, egress.allowed_http)

    listeners, listener_names = _listeners(r, raw.get("listeners", []), lambda v: resolve(v, v))
    destinations, dest_names = _destinations(r, raw.get("destinations", []), egress, pins,
                                             lambda v: resolve(v, v))
    handlers_dir = base / "handlers"
    # Routes are checked against every declared name, so a listener with a bad port
    # does not also produce a misleading "names no listener" for its routes.
    hl7 = _hl7_destinations(destinations)
    instant = {d.name for d in destinations if d.trigger != "study_stable"}
    routes = _routes(r, raw.get("routes", []), listener_names, dest_names, handlers_dir, hl7, instant)
    # Rules: checked against every declared name too; [routing].fallback replaces the
    # [[routes]] (as many as are written, valid or not).
    written_routes = len(raw["routes"]) if isinstance(raw.get("routes"), list) else 0
    rules, routing = rules_mod.read(
        r, raw.get("rules", []), raw.get("routing", {}), listeners=listener_names,
        destinations=dest_names, hl7=set(hl7), routes=written_routes,
        handler_problem=lambda p, handler, to: _handler_problem(r, p, handler, to, handlers_dir, hl7,
                                                                instant),
        read_coercion=lambda p, value: coerce_mod.read(r, value, p, lambda v: resolve(v, v)))
    health = health_mod.read(r, raw.get("health", {}))
    metrics = metrics_mod.read(r, raw.get("metrics", {}), lambda v: resolve(v, v),
                               engine.data_dir, is_loopback)
    audit_export = audit_export_mod.read(
        r, raw.get("audit_export", {}),
        read_tls=lambda t, p: _tls(r, t, p, "destination", lambda v: resolve(v, v)),
        egress_problem=lambda host, port: _egress_tcp_problem(egress, pins, host, port))
    alerts = alerts_mod.read(r, raw.get("alerts"), lambda v: resolve(v, v), alerts_mod.Checks(
        secret=readable_secret_problem, http_url=_http_prefix,
        tcp=lambda host, port: _egress_tcp_problem(egress, pins, host, port),
        http=lambda url: _egress_http_problem(egress, pins, url)))

    if r.problems:
        raise ConfigError(str(path), r.problems)
    return Config(path=path.resolve(), engine=engine, store=store, egress=egress,
                  listeners=tuple(listeners), destinations=tuple(destinations),
                  routes=tuple(routes), handlers_dir=handlers_dir, egress_pins=pins,
                  rules=rules, routing=routing, health=health, metrics=metrics,
                  audit_export=audit_export, alerts=alerts)


def _array(r: _Reader, raw: Any, key: str) -> list[Any]:
    if not isinstance(raw, list):
        r.fail(key, "must be an array of tables ([[%s]])" % key)
        return []
    return raw


def _listeners(r: _Reader, raw: Any, resolve: Callable[[str], Path]
               ) -> tuple[list[ListenerConfig], set[str]]:
    """Valid listeners, and every name declared (valid or not) for route checks."""
    out: list[ListenerConfig] = []
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for i, item in enumerate(_array(r, raw, "listeners")):
        p = f"listeners[{i}]"
        t = r.table(item, p, LISTENER_KEYS)
        if not isinstance(item, dict):
            continue
        # Read every key before deciding, so all problems are reported in one pass.
        name = r.get(t, p, "name", str, check=_name)
        ae = r.get(t, p, "ae_title", str, check=ae_title_problem)
        host = r.get(t, p, "host", str, "127.0.0.1", _host)
        port = r.get(t, p, "port", int, check=_port)
        calling = r.string_list(t, p, "calling_aets", ["*"],
                                lambda v: None if v == "*" else ae_title_problem(v))
        if calling == () and isinstance(t.get("calling_aets"), list) and not t["calling_aets"]:
            r.fail(f"{p}.calling_aets", 'must name at least one AE title, or ["*"] for any')
            calling = None
        before = len(r.problems)
        tls = _tls(r, t, p, "listener", resolve)
        tls_ok = len(r.problems) == before
        cleartext = _allow_cleartext(r, t, p, encrypted="tls" in t)
        optional = dict(
            max_associations=r.get(t, p, "max_associations", int, 16, _range(1, 1000)),
            accept_deflate=r.get(t, p, "accept_deflate", bool, False),
            max_pdu_kb=r.get(t, p, "max_pdu_kb", int, 256, _range(4, 16384)),
            acse_timeout_s=r.get(t, p, "acse_timeout_s", float, 10.0, _positive),
            max_pending_connections=r.get(t, p, "max_pending_connections", int, 0, _range(0, 1 << 20)),
            max_pending_per_address=r.get(t, p, "max_pending_per_address", int, 0, _range(0, 1 << 20)),
            dimse_timeout_s=r.get(t, p, "dimse_timeout_s", float, 60.0, _positive),
            network_timeout_s=r.get(t, p, "network_timeout_s", float, 60.0, _positive),
        )
        if name is not None:
            if name in seen_names:
                r.fail(f"{p}.name", f"'{name}' is already used by listeners[{seen_names[name]}]")
            else:
                seen_names[name] = i
        if port is not None:
            if port in seen_ports:
                r.fail(f"{p}.port", f"port {port} is already used by listeners[{seen_ports[port]}]")
            else:
                seen_ports[port] = i
        if host is not None and tls_ok and tls is None and cleartext is False and not is_loopback(host):
            r.fail(f"{p}.host", f"'{host}' is not a loopback address and this listener has no "
                   "TLS; PHI would cross the network in cleartext. Give it TLS (tls = { cert_file "
                   '= "…", key_file = "…" }), bind it to 127.0.0.1, or set '
                   f"{p}.allow_cleartext = true to accept that risk")
        if None in (name, ae, host, port, calling, cleartext) or None in optional.values() \
                or not tls_ok:
            continue
        out.append(ListenerConfig(name=name, ae_title=ae, host=host, port=port, calling_aets=calling,
                                  tls=tls, allow_cleartext=cleartext, **optional))
    return out, set(seen_names)


def _egress_tcp_problem(egress: EgressConfig, pins: egress_mod.Pins, host: str, port: int
                        ) -> str | None:
    """Why ``host:port`` may not be a destination, judged on what ``host`` resolves to
    now (the check every connect repeats). A host that does not resolve now is judged
    as written: listed by name (each connect then decides), or refused."""
    entry = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    add = f'add "{entry}" (or its address) there to allow this destination'
    try:
        verdict = egress_mod.check_tcp(egress.allowed_tcp, pins, host, port)
    except egress_mod.Unresolved as exc:
        if tcp_allows(egress.allowed_tcp, host, port):
            return None
        return f"{entry} is not in egress.allowed_tcp and {exc.host} does not resolve now ({exc.why}); {add}"
    if isinstance(verdict, egress_mod.Dial):
        return None
    return f"{verdict.reason.replace('[egress].', 'egress.')}; {add}"


def _egress_http_problem(egress: EgressConfig, pins: egress_mod.Pins, url: str) -> str | None:
    """Why ``url`` may not be a STOW-RS destination: it must lie under an allowed_http
    prefix (scheme, port, whole path segments) whose host allows the address it
    resolves to now; a host that does not resolve now is judged as written."""
    add = ("add its base URL there to allow this destination (prefixes match on scheme, "
           "host, port and whole path segments)")
    try:
        verdict = egress_mod.check_http(egress.allowed_http, pins, url)
    except egress_mod.Unresolved as exc:
        if any(http_prefix_allows(a, url) for a in egress.allowed_http):
            return None
        return (f"is not under any egress.allowed_http prefix and {exc.host} does not resolve "
                f"now ({exc.why}); {add}")
    if isinstance(verdict, egress_mod.Dial):
        return None
    if not verdict.resolved:
        return f"is not under any egress.allowed_http prefix; {add}"
    return f"{verdict.reason.replace('[egress].', 'egress.')}; {add}"


def _tls(r: _Reader, t: dict[str, Any], p: str, side: str, resolve: Callable[[str], Path]
         ) -> TLSConfig | None:
    """``{p}.tls`` of a listener or a destination; None when absent (or wrong: the
    problem is recorded). The files are loaded into a context here, so a key that does
    not match its certificate is reported at load, by its key path."""
    if "tls" not in t:
        return None
    path, raw = f"{p}.tls", t["tls"]
    if not isinstance(raw, dict):
        r.fail(path, 'must be a table, e.g. tls = { cert_file = "…", key_file = "…" }')
        return None
    listener = side == "listener"
    ours, theirs = ((LISTENER_TLS_KEYS, DESTINATION_TLS_KEYS) if listener
                    else (DESTINATION_TLS_KEYS, LISTENER_TLS_KEYS))
    before = len(r.problems)
    for key in raw:
        if key in theirs - ours:
            r.fail(f"{path}.{key}", f"does not apply to a {side} (it is a "
                   f"{'destination' if listener else 'listener'} setting)")
    r.table({k: v for k, v in raw.items() if k not in theirs}, path, set(ours))
    files: dict[str, Path | None] = {}
    for key in ("cert_file", "key_file", "ca_file"):
        value = r.get(raw, path, key, str, None, _not_empty)
        files[key] = resolve(value) if value is not None else None
        if files[key] is not None and not files[key].is_file():
            r.fail(f"{path}.{key}", f"{files[key]} is not a readable file")
    key_holder = "key_file" if files["key_file"] else "cert_file"
    if files[key_holder] is not None and files[key_holder].is_file() \
            and files[key_holder].stat().st_mode & 0o004:
        r.fail(f"{path}.{key_holder}", f"{files[key_holder]} holds a private key and is readable "
               "by every user; chmod 600 it")
    if files["key_file"] is not None and "cert_file" not in raw:
        r.fail(f"{path}.key_file", "needs cert_file (the certificate this key belongs to)")
    require = r.get(raw, path, "require_client_cert", bool, False) if listener else False
    server_name = None if listener else r.get(raw, path, "server_name", str, None, _host)
    aets = _client_cert_aets(r, raw, path) if listener and "client_cert_aets" in raw else ()
    if listener:
        if "cert_file" not in raw:
            r.fail(f"{path}.cert_file", "is required: the listener's certificate (PEM), with "
                   "key_file unless the key is in the same file")
        if require and "ca_file" not in raw:
            r.fail(f"{path}.ca_file", "is required with require_client_cert = true: the CA "
                   "bundle client certificates are verified against")
        if "ca_file" in raw and not require:
            r.fail(f"{path}.ca_file", "is only used with require_client_cert = true")
        if "client_cert_aets" in raw and not require:
            r.fail(f"{path}.client_cert_aets", "needs require_client_cert = true")
    if len(r.problems) > before:
        return None
    cfg = TLSConfig(cert_file=files["cert_file"], key_file=files["key_file"],
                    ca_file=files["ca_file"], require_client_cert=require,
                    server_name=server_name, client_cert_aets=aets)
    try:
        (server_context if listener else client_context)(cfg)
    except TLSSetupError as exc:
        r.fail(f"{path}.{exc.key}", exc.why)
        return None
    return cfg


def _client_cert_aets(r: _Reader, raw: dict[str, Any], path: str
                      ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """client_cert_aets = { "ct1.example.org" = ["CT1"], … }: certificate name → the
    calling AE titles it may use (names compare without case)."""
    where = f"{path}.client_cert_aets"
    table = r.get(raw, path, "client_cert_aets", dict)
    if table is None:
        return ()
    if not table:
        r.fail(where, 'must map at least one certificate name to calling AE titles, e.g. '
               '{ "ct1.example.org" = ["CT1"] }')
    out: dict[str, tuple[str, ...]] = {}
    for name, aets in table.items():
        key = f'{where}."{name}"'
        if not name.strip() or name.strip().lower() in out:
            r.fail(key, "must be a certificate name (subject CN or subjectAltName), each once")
            continue
        if not isinstance(aets, list) or not aets or not all(isinstance(a, str) for a in aets):
            r.fail(key, 'must be a list of calling AE titles, e.g. ["CT1"]')
            continue
        for i, ae in enumerate(aets):
            why = ae_title_problem(ae)
            if why:
                r.fail(f"{key}[{i}]", why)
        out[name.strip().lower()] = tuple(a.strip() for a in aets)
    return tuple(out.items())


def _allow_cleartext(r: _Reader, t: dict[str, Any], p: str, *, encrypted: bool) -> bool | None:
    value = r.get(t, p, "allow_cleartext", bool, False)
    if value and encrypted:
        r.fail(f"{p}.allow_cleartext", "does not apply: this connection uses TLS")
        return None
    return value


def _secret_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold a credential (a DIMSE passcode), or None: it must be an
    existing regular file that neither the group nor other users can read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & 0o044:
        who = "every user" if st.st_mode & 0o004 else "its group"
        return (f"{path} is readable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                "it holds a passcode: chmod 600 it")
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    return None


def _hl7_destinations(destinations: list[DestinationConfig]) -> dict[str, str]:
    """Destinations whose kind takes what only a handler makes (HL7 messages, FHIR
    resources): name → kind."""
    from mfconsole.kinds import REGISTRY

    return {d.name: d.kind for d in destinations if REGISTRY[d.kind].produces != "dicom"}


def _product_of(kind: str) -> str:
    from mfconsole.kinds import REGISTRY

    return REGISTRY[kind].produces


def _routes(r: _Reader, raw: Any, listener_names: set[str], dest_names: set[str],
            handlers_dir: Path, hl7_destinations: dict[str, str],
            instant: set[str] = frozenset()) -> list[RouteConfig]:
    out: list[RouteConfig] = []
    for i, item in enumerate(_array(r, raw, "routes")):
        p = f"routes[{i}]"
        t = r.table(item, p, ROUTE_KEYS)
        if not isinstance(item, dict):
            continue
        source = r.get(t, p, "from", str)
        to = r.string_list(t, p, "to")
        handler = r.get(t, p, "handler", str, None)
        ok = source is not None and to is not None
        if source is not None and source not in listener_names:
            r.fail(f"{p}.from", f"names no listener ('{source}')")
            ok = False
        seen: set[str] = set()
        for j, dest in enumerate(to or ()):
            if dest in seen:
                r.fail(f"{p}.to[{j}]", f"names destination '{dest}' twice")
                ok = False
            elif dest not in dest_names:
                r.fail(f"{p}.to[{j}]", f"names no destination ('{dest}')")
                ok = False
            seen.add(dest)
        if isinstance(t.get("to"), list) and not t["to"]:
            r.fail(f"{p}.to", "must name at least one destination")
            ok = False
        if _handler_problem(r, p, handler, to or (), handlers_dir, hl7_destinations, instant):
            ok = False
        if ok:
            out.append(RouteConfig(from_listener=source, to=to, handler=handler))
    return out


def _handler_problem(r: _Reader, p: str, handler: str | None, to: tuple[str, ...],
                     handlers_dir: Path, hl7_destinations: dict[str, str],
                     instant: set[str] = frozenset()) -> bool:
    """Record what is wrong with the handler of a route or rule (at ``p``) sending to
    ``to``: a handler that does not exist, none for a destination taking HL7, or a
    study-level one for destinations that send each object as it arrives (``instant``:
    the handler would see studies of one object — a FHIR ImagingStudy rewritten with
    each instance). True if anything was."""
    if handler is not None:
        if not _HANDLER_NAME.match(handler):
            r.fail(f"{p}.handler", "must be a Python module name (letters, digits, '_')")
            return True
        path = handlers_dir / f"{handler}.py"
        if not path.is_file():
            r.fail(f"{p}.handler", f"names no handler: {path} does not exist")
            return True
        per_object = [d for d in to if d in instant]
        if per_object and _declared_level(path) == "study":
            which = (f"destination {per_object[0]} sends" if len(per_object) == 1
                     else f"destinations {', '.join(per_object)} send")
            r.fail(f"{p}.handler", f"{handler} is study-level (LEVEL = \"study\") but {which} "
                   "each object as it arrives: set trigger = \"study_stable\" there (else it "
                   "sees studies of one object)")
            return True
        return False
    if any(d in hl7_destinations for d in to):
        names = ", ".join(d for d in to if d in hl7_destinations)
        kinds = ", ".join(sorted({hl7_destinations[d] for d in to if d in hl7_destinations}))
        fhir = {"fhir"} == {_product_of(k) for k in kinds.split(", ")}
        made, example = ("FHIR resources", "study_to_imagingstudy") if fhir else ("HL7 messages", "sr_to_oru")
        r.fail(f"{p}.handler", f"is required: {names} ({kinds}) takes {made}, which a "
               f"handler makes (e.g. handler = \"{example}\")")
        return True
    return False


def _declared_level(path: Path) -> str | None:
    """A handler's ``LEVEL = "..."`` read from its source without running it (the
    engine imports handlers; check does not)."""
    import ast

    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return None      # the engine's import reports it
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "LEVEL" for t in node.targets)):
            return node.value.value if isinstance(node.value.value, str) else None
    return None


# ---------------------------------------------------------------------------
# Destinations: a common part, and one kind per protocol.
#
# Each key is declared once, as a field of a frozen dataclass (``setting``): its name,
# its type (the annotation), its default (none: required), one line of documentation
# and its check. The parser below, the accepted keys, the console's editable fields
# (engine/config_edit.py) and docs/destinations.md all read that one declaration.
# DestinationConfig holds the keys of every kind; each kind subclasses it with its own
# keys (mfconsole/dimse/kind.py, stow/kind.py, mllp/kind.py) and is listed once in
# mfconsole/kinds.py, the registry.

# The checks kinds declare their keys with: None when fine, else why.
port_problem, host_problem, positive, not_empty, in_range = _port, _host, _positive, _not_empty, _range
http_prefix_problem = _http_prefix

# A ``tuple[str, ...]`` setting is a TOML list of strings, each checked by its check.
_TOML_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path,
                                "tuple[str,...]": tuple}


def setting(default: Any = MISSING, *, doc: str, check: Callable[[Any], str | None] | None = None,
            label: str | None = None, read: Callable[..., Any] | None = None) -> Any:
    """One destination key, as a dataclass field. ``doc``: one line for the docs;
    ``check``: why a value is wrong (a Path key: checked once resolved against the
    config's folder); ``label``: the console may edit it, under this label; ``read``:
    a reader of its own, ``read(reader, table, path, resolve)`` (the tls table)."""
    return field(default=default, metadata={"doc": doc, "check": check, "label": label,
                                            "read": read})


def value_type(f: dataclasses.Field) -> type:
    """The TOML-facing type of a setting, from its annotation (``X`` or ``X | None``)."""
    names = [n for n in str(f.type).replace(" ", "").split("|") if n != "None"]
    if len(names) != 1 or names[0] not in _TOML_TYPES:
        if f.metadata.get("read") is not None:
            return object
        raise TypeError(f"setting {f.name}: annotate it as one of {sorted(_TOML_TYPES)} "
                        "(or X | None), or give it a read function")
    return _TOML_TYPES[names[0]]


def _read_tls(r: _Reader, t: dict[str, Any], p: str, resolve: Callable[[str], Path]) -> Any:
    return _tls(r, t, p, "destination", resolve)


TRIGGERS = ("instance", "study_stable")
LATE_INSTANCE = ("alone", "update")


def one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else "must be " + _choices([f'"{c}"' for c in choices])


def _window_problem(value: str) -> str | None:
    return windows_mod.parse(value)[1]


def _read_coerce(r: _Reader, t: dict[str, Any], p: str, resolve: Callable[[str], Path]) -> Any:
    return coerce_mod.read(r, t["coerce"], f"{p}.coerce", resolve) if "coerce" in t else ()


@dataclass(frozen=True, kw_only=True)
class DestinationConfig:
    """The keys every destination has; a kind's subclass adds its own. ``kind`` is the
    class's (the value of the table's ``kind`` key), not a field."""
    kind: ClassVar[str] = ""
    name: str = setting(doc="Used in routes, logs and the console.", check=_name)
    max_associations: int = setting(
        2, doc="Concurrent connections (associations, requests) to it, one worker thread each.",
        check=_range(1, 64))
    # Delivery policy: exponential backoff with jitter between these, "down" (probed at
    # the backoff interval) after down_after transient failures in a row, and bounded
    # outcomes dead-lettered after bounded_attempts tries.
    retry_initial_s: float = setting(5.0, doc="First wait after a transient failure (seconds).",
                                     check=_positive)
    retry_max_s: float = setting(600.0, doc="Longest wait: the backoff doubles up to it.",
                                 check=_positive)
    down_after: int = setting(5, doc="Transient failures in a row that mark it down.",
                              check=_range(1, 1000))
    bounded_attempts: int = setting(3, doc="Tries of a 'bounded' outcome before it is dead-lettered.",
                                    check=_range(1, 100))
    connect_timeout_s: float = setting(10.0, doc="TCP (and TLS) connect timeout (seconds).",
                                       check=_positive)
    network_timeout_s: float = setting(60.0, doc="Socket silence while sending (seconds).",
                                       check=_positive)
    # TLS (every kind), or cleartext off loopback by consent.
    tls: TLSConfig | None = setting(
        None, doc="TLS table: ca_file, server_name, cert_file + key_file (mTLS); {} trusts the "
        "system store.", read=_read_tls)
    allow_cleartext: bool = setting(
        False, doc="Accept cleartext to a host that is not a loopback address (PHI on the network).")
    # Header changes to every copy sent here (mfconsole/coerce.py), after a rule's.
    coerce: tuple[Any, ...] = setting(
        (), doc="Coercion of every copy sent there, after the rule's: a list of operations, as on "
        "a rule (DICOM destinations only).", read=_read_coerce)
    # Pacing (mfconsole/windows.py, engine/pacing.py): when the workers may send, and
    # how fast, whatever the queue holds.
    windows: tuple[str, ...] = setting(
        (), doc='Send only inside these local-time ranges, e.g. ["Mon-Fri 18:00-07:00"] '
        "(none: always).", check=_window_problem)
    blackout: tuple[str, ...] = setting(
        (), doc='Never send inside these ranges, e.g. ["Sun 01:00-03:00"] (over windows).',
        check=_window_problem)
    urgent_ignores_window: bool = setting(
        False, doc="Urgent deliveries (a rule's priority) go out outside windows and in "
        "blackouts too (not on an in-order destination).")
    max_objects_per_s: float | None = setting(
        None, doc="Rate cap: objects per second, all its connections together (none: no cap).",
        check=_positive)
    max_mb_per_s: float | None = setting(
        None, doc="Rate cap: MiB per second of objects as stored, all its connections together.",
        check=_positive)

    # When objects go out (engine/holds.py): each as it is stored, or a study at a time
    # once no instance of it has arrived for stable_after_s.
    trigger: str = setting(
        "instance", doc='"instance": each object as soon as it is stored; "study_stable": a '
        "study's objects held until none has arrived for stable_after_s, then sent together.",
        check=one_of(TRIGGERS))
    stable_after_s: float = setting(
        30.0, doc="With trigger = \"study_stable\": the quiet period (seconds, 1-86400) after a "
        "study's last instance before it is released.", check=_range(1, 86400))
    late_instance: str = setting(
        "alone", doc='With trigger = "study_stable", an instance of a study already released: '
        '"alone" sends it by itself; "update" holds it again and, when quiet, sends the late '
        "group together (a study-level handler runs again on every object of the study).",
        check=one_of(LATE_INSTANCE))

    @property
    def study_stable(self) -> bool:
        return self.trigger == "study_stable"

    def schedule(self) -> windows_mod.Schedule:
        """Its windows and blackout (empty: always open)."""
        return windows_mod.schedule(self.windows, self.blackout)


def _tls_table_given(found: "Found") -> bool:
    return "tls" in found.raw


# What a handler makes for a kind: DICOM data sets (also what arrives: no handler
# needed), HL7 v2 messages, FHIR R4 resources (a dict; the engine serialises it).
PRODUCTS = ("dicom", "hl7", "fhir")


@dataclass(frozen=True)
class DestinationKind:
    """What a destination kind provides: its keys (``config``, a DestinationConfig
    subclass), the Sender that delivers to it, the words for where it sends, what a
    handler must make for it, and, optionally, an echo and rules across its keys.

    The callables are called with a built destination (``config``) and the egress
    checks (egress.Checks); they may import their protocol's code lazily, so loading
    a configuration loads no sender."""
    config: type[DestinationConfig]
    doc: str                                         # one line: what it delivers to
    sender: Callable[[Any, egress_mod.Checks], "Sender"]
    target: Callable[[Any], str]                     # e.g. "AE@host:port", a URL
    produces: str = "dicom"                          # a handler's result: "dicom", "hl7" or "fhir"
    check: Callable[["Found"], None] | None = None   # rules across keys (egress, credentials)
    echo: Callable[[Any, egress_mod.Checks], Any] | None = None   # .ok, .rtt_ms, .detail
    # Whether the connection is encrypted as configured (allow_cleartext then does not
    # apply): by default, a tls table is given.
    encrypted: Callable[["Found"], bool] = _tls_table_given
    # The Storage Commitment SCU of a destination that asks for it (None: the kind has
    # no custody confirmation); same arguments as ``sender``.
    commitment: Callable[[Any, egress_mod.Checks], Any] | None = None

    def __post_init__(self) -> None:
        if not self.config.kind or not _HANDLER_NAME.match(self.config.kind):
            raise TypeError(f"{self.config.__name__}.kind must name the kind (letters, digits, '_')")
        if self.produces not in PRODUCTS:
            raise TypeError(f"kind {self.config.kind}: produces is one of {', '.join(PRODUCTS)}")
        for f in self.settings():
            value_type(f)          # fails at declaration, not at the first load

    @property
    def name(self) -> str:
        return self.config.kind

    def settings(self) -> tuple[dataclasses.Field, ...]:
        """Its keys, common ones first, in declaration order."""
        return dataclasses.fields(self.config)

    def keys(self) -> frozenset[str]:
        return frozenset({"kind"} | {f.name for f in self.settings()})

    def editable(self) -> tuple[tuple[str, str, str], ...]:
        """(key, label, type) of the keys the console may change."""
        return tuple((f.name, f.metadata["label"], value_type(f).__name__)
                     for f in self.settings() if f.metadata.get("label"))


@dataclass
class Found:
    """One [[destinations]] table as read, handed to its kind's ``check``: ``values``
    holds every key (None where absent without default, or wrong: the problem is
    recorded already)."""
    path: str
    raw: dict[str, Any]
    values: dict[str, Any]
    reader: _Reader
    start: int                           # problems recorded before this destination
    egress: EgressConfig
    pins: egress_mod.Pins

    def fail(self, key: str, why: str) -> None:
        self.reader.fail(f"{self.path}.{key}", why)

    def bad(self, *keys: str) -> bool:
        """Whether a problem is recorded on one of ``keys`` (or inside it: tls.ca_file)."""
        wheres = tuple(f"{self.path}.{k}" for k in keys)
        return any(where in wheres or where.startswith(tuple(w + "." for w in wheres))
                   for where, _ in self.reader.problems[self.start:])

    @property
    def failed(self) -> bool:
        return len(self.reader.problems) > self.start

    def tcp_problem(self, host: str, port: int) -> str | None:
        return _egress_tcp_problem(self.egress, self.pins, host, port)

    def http_problem(self, url: str) -> str | None:
        return _egress_http_problem(self.egress, self.pins, url)


def check_tcp_peer(found: Found) -> bool:
    """The rules of a kind that connects to ``host`` and ``port``: [egress].allowed_tcp
    allows it, and off loopback without TLS only with allow_cleartext. False when a
    problem is recorded (or the keys they need are wrong already)."""
    v = found.values
    host, port = v["host"], v["port"]
    if found.bad("tls", "allow_cleartext"):
        return False
    why = found.tcp_problem(host, port) if None not in (host, port) else None
    if why:
        found.fail("host", why)
        return False
    if host is not None and v["tls"] is None and not v["allow_cleartext"] and not is_loopback(host):
        found.fail("host", f"'{host}' is not a loopback address and this destination has "
                   "no TLS; PHI would cross the network in cleartext. Give it TLS (tls = { "
                   'ca_file = "…" }, or tls = {} to trust the system store), or set '
                   f"{found.path}.allow_cleartext = true to accept that risk")
        return False
    return True


def https_url(found: Found) -> bool:
    """Whether the destination's url is https:// (the kind's ``encrypted``)."""
    url = found.raw.get("url")
    try:
        return isinstance(url, str) and urlsplit(url).scheme.lower() == "https"
    except ValueError:
        return False


def check_http_peer(found: Found) -> None:
    """The rules of a kind that sends to ``url`` over HTTP(S) with optional credentials
    (stow, fhir): [egress].allowed_http allows the url; bearer_token_file or username +
    password_file, not both; http:// only to a loopback address unless
    allow_cleartext, and never with credentials off loopback; no tls table on http://."""
    v, url = found.values, found.values["url"]
    if url is not None:
        why = found.http_problem(url)
        if why:
            found.fail("url", why)
            return
    if v["bearer_token_file"] is not None and (v["username"] or v["password_file"]):
        found.fail("bearer_token_file", "use either bearer_token_file or username + "
                   "password_file (basic authentication), not both")
    elif v["password_file"] is not None and v["username"] is None:
        found.fail("password_file", "needs username (basic authentication is username + password)")
    elif v["username"] is not None and v["password_file"] is None:
        found.fail("username", "needs password_file (basic authentication is username + password)")
    if url is not None and urlsplit(url).scheme.lower() == "http":
        if "tls" in found.raw:
            found.fail("tls", "is only used with an https:// url")
        host = urlsplit(url).hostname or ""
        if not is_loopback(host):
            if v["allow_cleartext"] is False:
                found.fail("url", f"'{host}' is not a loopback address and the url is http://; "
                           "PHI would cross the network in cleartext. Use https://, or set "
                           f"{found.path}.allow_cleartext = true to accept that risk")
            for key in ("bearer_token_file", "password_file"):
                if v[key] is not None:
                    found.fail(key, "credentials are never sent in cleartext to a non-loopback "
                               "host; use an https:// url")


def readable_secret_problem(path: Path) -> str | None:
    """A credential file read at every request: it must exist, not world-readable."""
    if not path.is_file():
        return f"{path} is not a readable file"
    if path.stat().st_mode & 0o004:
        return f"{path} is readable by every user; chmod 600 it"
    return None


secret_file_problem = _secret_file_problem


def _read_setting(r: _Reader, t: dict[str, Any], p: str, f: dataclasses.Field,
                  resolve: Callable[[str], Path]) -> Any:
    meta = f.metadata
    if meta.get("read") is not None:
        return meta["read"](r, t, p, resolve)
    default = ... if f.default is MISSING else f.default
    kind, check = value_type(f), meta.get("check")
    if kind is tuple:    # a list of strings, each checked
        return r.string_list(t, p, f.name, list(default) if default is not ... else ..., check)
    if kind is Path:     # a file named relative to the config's folder
        value = r.get(t, p, f.name, str, default, _not_empty)
        if value is None or f.name not in t:
            return value
        path = resolve(value)
        why = check(path) if check else None
        if why:
            r.fail(f"{p}.{f.name}", why)
        return path
    return r.get(t, p, f.name, kind, default, check)


def _choices(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _destinations(r: _Reader, raw: Any, egress: EgressConfig, pins: egress_mod.Pins,
                  resolve: Callable[[str], Path]) -> tuple[list[DestinationConfig], set[str]]:
    """Valid destinations, and every name declared (valid or not) for route checks."""
    from mfconsole.kinds import REGISTRY      # its kinds import this module

    out: list[DestinationConfig] = []
    seen: dict[str, int] = {}
    choices = _choices(REGISTRY.names())
    for i, item in enumerate(_array(r, raw, "destinations")):
        p = f"destinations[{i}]"
        if not isinstance(item, dict):
            r.fail(p, "must be a table")
            continue
        kind = REGISTRY.get(item.get("kind"))
        if kind is None:
            r.fail(f"{p}.kind", f"is required ({choices})" if item.get("kind") is None else
                   f"{item['kind']!r} is not a destination kind ({choices})")
            # Still record the name, so routes to it are not reported twice.
            if isinstance(item.get("name"), str) and item["name"] not in seen:
                seen[item["name"]] = i
            continue
        start = len(r.problems)
        t = r.table(item, p, kind.keys())
        values = {f.name: _read_setting(r, t, p, f, resolve) for f in kind.settings()}
        name = values["name"]
        if name is not None:
            if name in seen:
                r.fail(f"{p}.name", f"'{name}' is already used by destinations[{seen[name]}]")
            else:
                seen[name] = i
        found = Found(p, t, values, r, start, egress, pins)
        if values["retry_initial_s"] and values["retry_max_s"] \
                and values["retry_max_s"] < values["retry_initial_s"]:
            r.fail(f"{p}.retry_max_s", "must not be less than retry_initial_s")
        if values["allow_cleartext"] and kind.encrypted(found):
            r.fail(f"{p}.allow_cleartext", "does not apply: this connection uses TLS")
        if values["urgent_ignores_window"] and not t.get("windows") and not t.get("blackout"):
            r.fail(f"{p}.urgent_ignores_window", "does not apply: this destination has no "
                   "windows or blackout")
        if values["trigger"] != "study_stable":
            for key in ("stable_after_s", "late_instance"):
                if key in t:
                    r.fail(f"{p}.{key}", 'does not apply: trigger is not "study_stable"')
        if kind.check is not None:
            kind.check(found)
        if not found.failed:
            out.append(kind.config(**values))
    return out, set(seen)

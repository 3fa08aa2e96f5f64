"""Egress: where mfconsole may connect, judged on the address it actually dials.

``[egress].allowed_tcp`` (DIMSE, MLLP) holds ``host:port`` entries of three kinds:

* a name, ``pacs.example.org:104``: **pinned**. The addresses the name resolves to
  when the configuration is loaded (start, reload, ``mfconsole check``) are what the
  entry allows; at each connect the name is resolved again and an address is allowed
  only if it is among the pinned ones *and* the name still resolves to it. A DNS or
  /etc/hosts change that moves the name elsewhere sends nothing there: the
  destination pauses with the reason until a reload pins the new address. A name
  that did not resolve at load allows nothing until a reload.
* an address, ``10.1.2.3:104`` or ``[::1]:104`` (IPv6 in brackets);
* a range, ``10.1.0.0/16:104`` or ``[fd00:1::/64]:104`` (CIDR, host bits zero).

Any of them may end in ``:*`` instead of a port: every port of that host or range.

``[egress].allowed_http`` (STOW-RS) holds URL prefixes: the url must lie under one
(same scheme and port, whole path segments), and the address dialled must be allowed
by that prefix's host, as above (a name pinned, an address literally).

``check_tcp``/``check_http`` resolve the destination's host once (getaddrinfo, TCP)
and answer with the first address, in the resolver's order, that the allowlist
allows: a ``Dial``, which the sender connects to (TLS still verifies, and HTTP still
sends as Host, the configured name), or a ``Refusal`` naming what was resolved and
why. A host that does not resolve now raises ``Unresolved`` (an OSError: a transport
failure, retried like a refused connection).

``localhost`` is nothing special: it is a name, judged by what it resolves to. The
same goes for the loopback decision behind ``allow_cleartext`` (``is_loopback``).

No engine imports: the protocol packages and config.py import this module.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union
from urllib.parse import urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = "*"
ENTRY_FORMAT = ("must be host:port, address:port or CIDR:port (e.g. pacs.example.org:104, "
                "10.1.2.3:104, [::1]:104, 10.1.0.0/16:104; :* for any port)")


# -- allowlist entries -----------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One parsed ``allowed_tcp`` entry (or the host and port of an ``allowed_http``
    prefix): a name, or an address/range, and a port (None: any port)."""
    text: str
    port: int | None
    name: str | None = None              # lower-case, without a trailing dot
    network: IPNetwork | None = None     # an address is a /32 or /128

    def allows_port(self, port: int) -> bool:
        return self.port is None or self.port == port


@functools.lru_cache(maxsize=1024)
def parse_entry(text: str) -> Entry:
    """``host:port`` → Entry; ValueError with a routing-safe reason when it is not one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or any(ch.isspace() for ch in text):
        raise ValueError(ENTRY_FORMAT)
    if port_text == ANY_PORT:
        port = None
    elif port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise ValueError(f"{port_text!r} is not a TCP port (1-65535, or * for any); " + ENTRY_FORMAT)
    if host.startswith("[") or host.endswith("]"):
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
        if ":" not in inner:
            raise ValueError("brackets hold an IPv6 address or range, e.g. [::1]:104")
        return Entry(text, port, network=_network(inner))
    if ":" in host:
        raise ValueError("an IPv6 address needs brackets, e.g. [::1]:104")
    if "/" in host or _looks_numeric(host):
        return Entry(text, port, network=_network(host))
    return Entry(text, port, name=normal_name(host))


def entry_problem(text: str) -> str | None:
    try:
        parse_entry(text)
    except ValueError as exc:
        return str(exc)
    return None


def _looks_numeric(host: str) -> bool:
    return all(ch.isdigit() or ch == "." for ch in host)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        what = "CIDR range" if "/" in text else "IP address"
        raise ValueError(f"{text} is not a valid {what} ({exc})") from None


def normal_name(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def host_entry(host: str, port: int | None, text: str = "") -> Entry:
    """The Entry for a host as a URL or a destination writes it (a name or an address)."""
    bare = host.strip("[]")
    try:
        network: IPNetwork | None = ipaddress.ip_network(bare.split("%", 1)[0])
    except ValueError:
        return Entry(text or host, port, name=normal_name(bare))
    return Entry(text or host, port, network=network)


def _entries(allowed: Iterable[str]) -> list[Entry]:
    out = []
    for text in allowed:
        try:
            out.append(parse_entry(text))
        except ValueError:
            continue   # config.py reports it; an unparsable entry allows nothing
    return out


def tcp_allows(allowed: Iterable[str], host: str, port: int) -> bool:
    """Whether ``host:port`` is listed as written, without resolving anything: a name
    entry naming ``host`` (without case), or an address/range entry holding ``host``
    when it is an address. Only for a host that does not resolve at load (see
    config.py); a connection is always judged by ``check_tcp``."""
    target = host_entry(host, port)
    for entry in _entries(allowed):
        if not entry.allows_port(port):
            continue
        if entry.name is not None and entry.name == target.name:
            return True
        if (entry.network is not None and target.network is not None
                and target.network.num_addresses == 1
                and target.network.network_address in entry.network):
            return True
    return False


# -- URL prefixes (allowed_http) ------------------------------------------------------------

@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str       # lower-case, without brackets
    port: int
    path: str


def url_origin(url: str) -> Origin | None:
    """(scheme, host, port, path) of an http(s) URL, or None when it is not one a
    destination may use (credentials, query, fragment, bad port, dot segments)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return None
    if path_problem(parts.path):
        return None
    return Origin(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme], parts.path)


def path_problem(path: str) -> str | None:
    """Dot segments, encoded slashes or dots and backslashes could step outside an
    allowed prefix once a client or server normalizes the path."""
    lowered = path.lower()
    if "\\" in path or "%2f" in lowered or "%5c" in lowered or "%2e" in lowered:
        return "must not contain backslashes or encoded '/', '\\' or '.'"
    if any(seg in (".", "..") for seg in path.split("/")):
        return "must not contain '.' or '..' path segments"
    return None


def _under(prefix: Origin, url: Origin) -> bool:
    base = prefix.path.rstrip("/")
    return not base or url.path == base or url.path.startswith(base + "/")


def http_prefix_allows(prefix: str, url: str) -> bool:
    """True when ``url`` lies under ``prefix`` as written: same scheme, host and port,
    and the path continues the prefix on a segment boundary (``/dicom-web.evil`` is
    not under ``/dicom-web``). Resolves nothing; see ``check_http``."""
    p, u = url_origin(prefix), url_origin(url)
    if p is None or u is None or (p.scheme, p.host, p.port) != (u.scheme, u.host, u.port):
        return False
    return _under(p, u)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- resolution --------------------------------------------------------------------------------

class Unresolved(OSError):
    """The host does not resolve now (routing-safe message): a transport failure."""

    def __init__(self, host: str, why: str):
        super().__init__(f"{host} does not resolve ({why})")
        self.host = host
        self.why = why


@dataclass(frozen=True)
class Address:
    ip: IPAddress
    family: int
    sockaddr: tuple[Any, ...]

    @property
    def text(self) -> str:
        """The address to connect to; link-local IPv6 keeps its scope (``fe80::1%2``)."""
        scope = self.sockaddr[3] if self.family == socket.AF_INET6 and len(self.sockaddr) > 3 else 0
        return f"{self.ip}%{scope}" if scope else str(self.ip)


def resolve(host: str, port: int | None = None) -> list[Address]:
    """Every address ``host`` resolves to for TCP, in the resolver's order, each once;
    Unresolved when there is none."""
    bare = host.strip("[]")
    if not bare:
        raise Unresolved(host or "''", "empty host")
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError, ValueError) as exc:
        raise Unresolved(bare, getattr(exc, "strerror", None) or exc.__class__.__name__) from None
    out: list[Address] = []
    seen: set[str] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        except ValueError:
            continue
        addr = Address(ip, family, tuple(sockaddr))
        if addr.text not in seen:
            seen.add(addr.text)
            out.append(addr)
    if not out:
        raise Unresolved(bare, "no IPv4 or IPv6 address")
    return out


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address, or a name every address of which is
    one (``localhost`` is judged by what it resolves to, like any other name)."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0]).is_loopback
    except ValueError:
        pass
    try:
        return all(a.ip.is_loopback for a in resolve(bare))
    except Unresolved:
        return False


# -- pins: what each allowlisted name resolved to at load --------------------------------------

@dataclass(frozen=True)
class Pins:
    """Name → the addresses it resolved to when the configuration was loaded (empty:
    it did not resolve then). A name absent from here was never pinned: it allows
    nothing."""
    names: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def of(self, name: str) -> tuple[str, ...] | None:
        return dict(self.names).get(normal_name(name))


def allowlist_names(allowed_tcp: Iterable[str], allowed_http: Iterable[str] = ()) -> list[str]:
    names = [e.name for e in _entries(allowed_tcp) if e.name is not None]
    for prefix in allowed_http:
        origin = url_origin(prefix)
        if origin is not None:
            entry = host_entry(origin.host, origin.port)
            if entry.name is not None:
                names.append(entry.name)
    return list(dict.fromkeys(names))


def pin(allowed_tcp: Iterable[str], allowed_http: Iterable[str] = ()) -> Pins:
    """Resolve every name of the allowlists now (at load)."""
    out = []
    for name in allowlist_names(allowed_tcp, allowed_http):
        try:
            out.append((name, tuple(str(a.ip) for a in resolve(name))))
        except Unresolved:
            out.append((name, ()))
    return Pins(tuple(out))


# -- the check ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dial:
    """Where to connect: ``address`` (checked), for ``host`` as configured (the name
    TLS verifies and HTTP sends as Host)."""
    host: str
    port: int
    address: str
    family: int
    sockaddr: tuple[Any, ...]


@dataclass(frozen=True)
class Refusal:
    """Nothing may be sent: routing-safe (host, addresses, port and why)."""
    target: str                  # host:port, or the URL's origin and path
    allowlist: str               # "allowed_tcp" or "allowed_http"
    resolved: tuple[str, ...]    # what the host resolved to (empty: not resolved)
    why: str                     # "is not in [egress].allowed_tcp (…)" or the like

    @property
    def reason(self) -> str:
        where = f"{self.target} (resolved to {', '.join(self.resolved)})" if self.resolved else self.target
        return f"{where} {self.why}"


Result = Union[Dial, Refusal]
TcpCheck = Callable[..., Result]     # (host, port, *, loopback_only=False)
HttpCheck = Callable[..., Result]    # (url, *, loopback_only=False)


@dataclass(frozen=True)
class Checks:
    """Both allowlists as a destination kind's sender and echo get them: each call
    checks anew (the engine's follow a reload)."""
    tcp: TcpCheck
    http: HttpCheck


def check_tcp(allowed: Iterable[str], pins: Pins, host: str, port: int, *,
              loopback_only: bool = False) -> Result:
    """The address to dial for ``host:port`` under ``[egress].allowed_tcp``, or why not.
    ``loopback_only``: a cleartext connection without allow_cleartext (only a loopback
    address will do). Raises Unresolved when ``host`` does not resolve now."""
    target = f"{_bracketed(host.strip('[]'))}:{port}"
    entries = [e for e in _entries(allowed) if e.allows_port(port)]
    return _check(entries, pins, host, port, loopback_only, "allowed_tcp", target)


def check_http(allowed: Iterable[str], pins: Pins, url: str, *, loopback_only: bool = False) -> Result:
    """The address to dial for ``url`` under ``[egress].allowed_http``, or why not.
    Raises Unresolved when the url's host does not resolve now."""
    u = url_origin(url)
    if u is None:
        return Refusal("(the destination's url)", "allowed_http", (),
                       "is not an http(s) URL a destination may use")
    target = f"{u.scheme}://{_bracketed(u.host)}:{u.port}{u.path}"
    entries = []
    for prefix in allowed:
        p = url_origin(prefix)
        if p is not None and (p.scheme, p.port) == (u.scheme, u.port) and _under(p, u):
            entries.append(host_entry(p.host, p.port, prefix))
    if not entries:
        return Refusal(target, "allowed_http", (), "is not in [egress].allowed_http")
    return _check(entries, pins, u.host, u.port, loopback_only, "allowed_http", target)


def _check(entries: list[Entry], pins: Pins, host: str, port: int, loopback_only: bool,
           allowlist: str, target: str) -> Result:
    name = normal_name(host)
    addresses = resolve(name, port)                  # once; raises Unresolved
    now: dict[str, set[IPAddress]] = {name: {a.ip for a in addresses}}

    def resolves_now(entry_name: str) -> set[IPAddress]:
        if entry_name not in now:                    # another name: once per check too
            try:
                now[entry_name] = {a.ip for a in resolve(entry_name, port)}
            except Unresolved:
                now[entry_name] = set()
        return now[entry_name]

    def allowed(ip: IPAddress) -> bool:
        for e in entries:
            if e.network is not None and ip in e.network:
                return True
            if e.name is not None and ip in resolves_now(e.name) \
                    and str(ip) in (pins.of(e.name) or ()):
                return True
        return False

    permitted = [a for a in addresses if allowed(a.ip)]
    for a in permitted:
        if not loopback_only or a.ip.is_loopback:
            return Dial(host, port, a.text, a.family, a.sockaddr)
    resolved = tuple(a.text for a in addresses)
    if permitted:
        return Refusal(target, allowlist, resolved,
                       "is not a loopback address and this connection is cleartext (no TLS, "
                       "allow_cleartext = false): PHI would cross the network unencrypted")
    return Refusal(target, allowlist, resolved,
                   f"is not in [egress].{allowlist}" + _pin_notes(entries, pins, name, now))


def _pin_notes(entries: list[Entry], pins: Pins, name: str, now: dict[str, set[IPAddress]]) -> str:
    """Why a name entry that concerns this host (the same name, or a name that now
    resolves to one of its addresses) did not allow it."""
    notes = []
    for e in entries:
        if e.name is None or not (e.name == name or now[name] & now.get(e.name, set())):
            continue
        pinned = pins.of(e.name)
        if pinned is None:
            notes.append(f"{e.text} was not pinned: it was not in [egress] when the "
                         "configuration was loaded")
        elif not pinned:
            notes.append(f"{e.text} did not resolve when the configuration was loaded, so it "
                         "allows no address until a reload")
        else:
            notes.append(f"{e.text} is pinned to {', '.join(pinned)}, what it resolved to when the "
                         "configuration was loaded; a reload accepts a new address")
    return f" ({'; '.join(notes)})" if notes else ""


def unchecked(host: str, port: int, **_: Any) -> Dial:
    """The first address ``host`` resolves to, with no allowlist: for tools that have no
    configuration (benchmarks). Raises Unresolved."""
    a = resolve(host, port)[0]
    return Dial(host, port, a.text, a.family, a.sockaddr)

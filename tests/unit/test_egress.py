"""mfconsole.egress: allowlist entries (names, addresses, CIDR ranges, :*), the check on
the address actually dialled (names pinned at load), the loopback decision on resolved
addresses, and how config.py uses them. The resolver is tests/fake_dns.py's."""

from __future__ import annotations

import socket

import pytest

from fake_dns import FakeDNS
from harness import write_config
from mfconsole import contract, egress
from mfconsole.config import ConfigError, load
from mfconsole.egress import Dial, Refusal, Unresolved, check_http, check_tcp, parse_entry, pin


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    return FakeDNS(monkeypatch, {"pacs.test": ["127.0.0.1"]})


def problems_of(path) -> list[tuple[str, str]]:
    try:
        load(path)
    except ConfigError as exc:
        return exc.problems
    return []


# -- entries --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,name,network,port", [
    ("pacs.example.org:104", "pacs.example.org", None, 104),
    ("PACS.Example.org.:104", "pacs.example.org", None, 104),
    ("localhost:2575", "localhost", None, 2575),
    ("10.1.2.3:104", None, "10.1.2.3/32", 104),
    ("[::1]:104", None, "::1/128", 104),
    ("10.1.0.0/16:104", None, "10.1.0.0/16", 104),
    ("[fd00:1::/64]:2575", None, "fd00:1::/64", 2575),
    ("10.1.0.0/16:*", None, "10.1.0.0/16", None),
    ("pacs.example.org:*", "pacs.example.org", None, None),
])
def test_entries_parse(text, name, network, port):
    e = parse_entry(text)
    assert (e.name, str(e.network) if e.network else None, e.port) == (name, network, port)


@pytest.mark.parametrize("text,words", [
    ("10.1.0.0/33:104", "not a valid CIDR range"),
    ("10.1.2.3/16:104", "host bits set"),
    ("10.1.2/16:104", "not a valid CIDR range"),
    ("999.1.1.1:104", "not a valid IP address"),
    ("[10.0.0.1]:104", "IPv6"),
    ("::1:104", "brackets"),
    ("[::1/200]:104", "not a valid CIDR range"),
    ("pacs:0", "not a TCP port"),
    ("pacs:**", "not a TCP port"),
    ("pacs", "host:port"),
])
def test_bad_entries_say_why(text, words):
    with pytest.raises(ValueError, match=words):
        parse_entry(text)


@pytest.mark.parametrize("entry,words", [("10.1.0.0/33:104", "CIDR"), ("10.1.2.3/16:104", "host bits"),
                                         ("10.1.0.0/16:0", "port")])
def test_bad_cidr_is_a_config_error_naming_the_key(tmp_path, entry, words):
    path = write_config(tmp_path, destinations=[], egress={"allowed_tcp": ["127.0.0.1:1", entry]})
    problems = dict(problems_of(path))
    assert "egress.allowed_tcp[1]" in problems and words in problems["egress.allowed_tcp[1]"]


# -- the check on the dialled address -----------------------------------------------------

def test_a_name_is_pinned_to_what_it_resolved_to_at_load(dns):
    pins = pin(["pacs.test:104"])
    assert pins.of("PACS.test") == ("127.0.0.1",)
    dial = check_tcp(["pacs.test:104"], pins, "pacs.test", 104)
    assert dial == Dial("pacs.test", 104, "127.0.0.1", socket.AF_INET, ("127.0.0.1", 104))
    dns.set("pacs.test", "127.0.0.2")           # DNS moved the name after the load
    refusal = check_tcp(["pacs.test:104"], pins, "pacs.test", 104)
    assert isinstance(refusal, Refusal) and refusal.resolved == ("127.0.0.2",)
    assert "pinned to 127.0.0.1" in refusal.why and "reload" in refusal.why
    assert refusal.reason.startswith("pacs.test:104 (resolved to 127.0.0.2) is not in [egress].allowed_tcp")
    # A reload pins the new address.
    assert isinstance(check_tcp(["pacs.test:104"], pin(["pacs.test:104"]), "pacs.test", 104), Dial)


def test_the_entry_name_must_still_resolve_to_the_address(dns):
    """Pinned and resolved now: both must agree (a name taken back from an address
    allows it no more, even though the host itself still resolves there)."""
    dns.set("alias.test", "127.0.0.1")
    pins = pin(["pacs.test:104"])
    assert isinstance(check_tcp(["pacs.test:104"], pins, "alias.test", 104), Dial)
    dns.set("pacs.test", "127.0.0.9")
    assert isinstance(check_tcp(["pacs.test:104"], pins, "alias.test", 104), Refusal)


def test_a_name_never_pinned_allows_nothing(dns):
    """An allowlist whose pins were not made with it (never at load) allows no name."""
    refusal = check_tcp(["pacs.test:104"], pin([]), "pacs.test", 104)
    assert isinstance(refusal, Refusal) and "was not pinned" in refusal.why


def test_a_name_that_did_not_resolve_at_load_allows_nothing(dns):
    dns.set("late.test")
    pins = pin(["late.test:104"])
    assert pins.of("late.test") == ()
    dns.set("late.test", "127.0.0.1")
    refusal = check_tcp(["late.test:104"], pins, "late.test", 104)
    assert isinstance(refusal, Refusal) and "did not resolve when the configuration was loaded" in refusal.why


def test_address_entries_judge_what_a_name_resolves_to(dns):
    assert check_tcp(["127.0.0.1:104"], pin([]), "pacs.test", 104).address == "127.0.0.1"
    dns.set("pacs.test", "127.0.0.2")
    refusal = check_tcp(["127.0.0.1:104"], pin([]), "pacs.test", 104)
    assert isinstance(refusal, Refusal) and refusal.resolved == ("127.0.0.2",)
    assert isinstance(check_tcp(["127.0.0.1:104"], pin([]), "127.0.0.1", 105), Refusal)


def test_cidr_entries_and_the_port_wildcard(dns):
    dns.set("pacs.test", "10.1.2.3")
    assert check_tcp(["10.1.0.0/16:104"], pin([]), "pacs.test", 104).address == "10.1.2.3"
    assert isinstance(check_tcp(["10.1.0.0/16:104"], pin([]), "pacs.test", 105), Refusal)
    assert check_tcp(["10.1.0.0/16:*"], pin([]), "pacs.test", 105).address == "10.1.2.3"
    dns.set("pacs.test", "10.2.0.1")
    assert isinstance(check_tcp(["10.1.0.0/16:*"], pin([]), "pacs.test", 104), Refusal)
    dns.set("pacs.test", "fd00:1::5")
    assert check_tcp(["[fd00:1::/64]:104"], pin([]), "pacs.test", 104).address == "fd00:1::5"
    assert check_tcp(["[::1]:104"], pin([]), "::1", 104).address == "::1"


def test_the_first_resolved_address_the_allowlist_permits_is_dialled(dns):
    dns.set("pacs.test", "10.9.9.9", "127.0.0.3", "127.0.0.1")
    dial = check_tcp(["127.0.0.0/8:104"], pin([]), "pacs.test", 104)
    assert dial.address == "127.0.0.3"
    refusal = check_tcp(["192.168.0.0/16:104"], pin([]), "pacs.test", 104)
    assert refusal.resolved == ("10.9.9.9", "127.0.0.3", "127.0.0.1")


def test_a_host_that_does_not_resolve_raises_unresolved(dns):
    dns.set("gone.test")
    with pytest.raises(Unresolved, match="gone.test does not resolve") as info:
        check_tcp(["gone.test:104"], pin(["gone.test:104"]), "gone.test", 104)
    assert isinstance(info.value, OSError)


def test_localhost_is_judged_by_what_it_resolves_to(dns):
    assert check_tcp(["127.0.0.1:2575"], pin([]), "localhost", 2575).address == "127.0.0.1"
    assert egress.is_loopback("localhost")
    dns.set("localhost", "10.0.0.9")            # an /etc/hosts that says otherwise
    assert not egress.is_loopback("localhost")
    assert isinstance(check_tcp(["127.0.0.1:2575"], pin([]), "localhost", 2575), Refusal)
    assert isinstance(check_tcp(["localhost:2575"], pin(["localhost:2575"]), "localhost", 2575), Dial)


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                     ("10.0.0.1", False), ("0.0.0.0", False), ("", False),
                                     ("pacs.test", True), ("mixed.test", False), ("gone.test", False)])
def test_is_loopback_on_resolved_addresses(dns, host, ok):
    dns.set("mixed.test", "127.0.0.1", "10.0.0.1")
    dns.set("gone.test")
    assert egress.is_loopback(host) is ok


def test_cleartext_only_to_a_loopback_address(dns):
    dns.set("pacs.test", "10.1.2.3", "127.0.0.1")
    allowed = ["10.0.0.0/8:104", "127.0.0.1:104"]
    assert check_tcp(allowed, pin([]), "pacs.test", 104).address == "10.1.2.3"
    assert check_tcp(allowed, pin([]), "pacs.test", 104, loopback_only=True).address == "127.0.0.1"
    dns.set("pacs.test", "10.1.2.3")
    refusal = check_tcp(allowed, pin([]), "pacs.test", 104, loopback_only=True)
    assert isinstance(refusal, Refusal) and "not a loopback address" in refusal.why


# -- allowed_http -----------------------------------------------------------------------------

def test_http_prefixes_pin_their_host_too(dns):
    prefixes = ["http://pacs.test:8042/dicom-web"]
    pins = pin([], prefixes)
    dial = check_http(prefixes, pins, "http://pacs.test:8042/dicom-web/studies")
    assert (dial.host, dial.port, dial.address) == ("pacs.test", 8042, "127.0.0.1")
    refusal = check_http(prefixes, pins, "http://pacs.test:8042/dicom-web.evil/studies")
    assert isinstance(refusal, Refusal) and refusal.resolved == () and "allowed_http" in refusal.why
    dns.set("pacs.test", "127.0.0.2")
    refusal = check_http(prefixes, pins, "http://pacs.test:8042/dicom-web/studies")
    assert refusal.resolved == ("127.0.0.2",) and "pinned to 127.0.0.1" in refusal.why
    assert refusal.target == "http://pacs.test:8042/dicom-web/studies"


def test_an_address_prefix_allows_a_name_resolving_to_it(dns):
    prefixes = ["http://127.0.0.1:8042/dicom-web"]
    assert check_http(prefixes, pin([], prefixes), "http://localhost:8042/dicom-web/studies").address == "127.0.0.1"
    assert isinstance(check_http(prefixes, pin([], prefixes), "http://127.0.0.2:8042/dicom-web/studies"), Refusal)
    assert isinstance(check_http(prefixes, pin([], prefixes), "https://localhost:8042/dicom-web/studies"), Refusal)


# -- the outcome and config.py ---------------------------------------------------------------

def test_the_refusal_outcome_names_the_resolved_address(dns):
    dns.set("pacs.test", "127.0.0.2")
    r = check_tcp(["127.0.0.1:104"], pin(["127.0.0.1:104"]), "pacs.test", 104)
    out = contract.egress_refused(r.target, r.allowlist, r.resolved, r.why)
    assert (out.status, out.scope, out.persistence) == ("egress", contract.DESTINATION, contract.PERMANENT)
    assert out.reason == ("pacs.test:104 (resolved to 127.0.0.2) is not in [egress].allowed_tcp; "
                          "nothing was sent")
    assert contract.egress_refused("h:1").reason == "h:1 is not in [egress].allowed_tcp; nothing was sent"


def mllp(host: str, port: int = 2575, **extra) -> dict:
    return {"name": "ehr", "kind": "mllp", "host": host, "port": port, **extra}


def test_config_judges_destinations_on_resolved_addresses(dns, tmp_path):
    # localhost listed by its address: allowed (it resolves there), and loopback.
    cfg = load(write_config(tmp_path / "a", destinations=[mllp("localhost")], routes=[],
                            egress={"allowed_tcp": ["127.0.0.1:2575"]}))
    assert cfg.destination("ehr").host == "localhost"
    # A name listed by name, resolving to loopback: pinned, no TLS needed.
    cfg = load(write_config(tmp_path / "b", destinations=[mllp("pacs.test")], routes=[],
                            egress={"allowed_tcp": ["pacs.test:2575"]}))
    assert cfg.egress_pins.of("pacs.test") == ("127.0.0.1",)
    # The same name resolving off loopback: cleartext needs TLS or allow_cleartext.
    dns.set("pacs.test", "10.1.2.3")
    problems = dict(problems_of(write_config(tmp_path / "c", destinations=[mllp("pacs.test")], routes=[],
                                             egress={"allowed_tcp": ["pacs.test:2575"]})))
    assert "not a loopback address" in problems["destinations[0].host"]
    # localhost resolving off loopback is no loopback either.
    dns.set("localhost", "10.0.0.9")
    problems = dict(problems_of(write_config(tmp_path / "d", destinations=[mllp("localhost")], routes=[],
                                             egress={"allowed_tcp": ["10.0.0.0/8:*"]})))
    assert "not a loopback address" in problems["destinations[0].host"]
    # An address the allowlist does not hold: refused with what it resolved to.
    problems = dict(problems_of(write_config(tmp_path / "e", destinations=[mllp("localhost")], routes=[],
                                             egress={"allowed_tcp": ["127.0.0.1:2575"]})))
    assert "resolved to 10.0.0.9" in problems["destinations[0].host"]
    assert "egress.allowed_tcp" in problems["destinations[0].host"]


def test_config_with_a_host_that_does_not_resolve_at_load(dns, tmp_path):
    dns.set("gone.test")
    # Listed by name: it loads (each connect decides; the name allows nothing until it
    # resolves at a load).
    cfg = load(write_config(tmp_path / "a", destinations=[mllp("gone.test", allow_cleartext=True)],
                            routes=[], egress={"allowed_tcp": ["gone.test:2575"]}))
    assert cfg.egress_pins.of("gone.test") == ()
    # Listed by address only: it cannot be judged, so it is refused.
    problems = dict(problems_of(write_config(
        tmp_path / "b", destinations=[mllp("gone.test", allow_cleartext=True)], routes=[],
        egress={"allowed_tcp": ["10.0.0.0/8:2575"]})))
    assert "does not resolve" in problems["destinations[0].host"]


def test_config_stow_url_judged_on_resolved_addresses(dns, tmp_path):
    web = {"name": "web", "kind": "stow", "url": "http://localhost:8042/dicom-web"}
    cfg = load(write_config(tmp_path / "a", destinations=[web], routes=[],
                            egress={"allowed_tcp": [], "allowed_http": ["http://127.0.0.1:8042/dicom-web"]}))
    assert cfg.destination("web").url.startswith("http://localhost")
    dns.set("localhost", "127.0.0.5")
    problems = dict(problems_of(write_config(
        tmp_path / "b", destinations=[web], routes=[],
        egress={"allowed_tcp": [], "allowed_http": ["http://127.0.0.1:8042/dicom-web"]})))
    assert "resolved to 127.0.0.5" in problems["destinations[0].url"]

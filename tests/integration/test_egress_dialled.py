"""Egress is checked on the address actually dialled (mfconsole/egress.py), against real
peers on 127.0.0.1 and a trap listener on 127.0.0.2 at the same port.

The resolver is the test's (tests/fake_dns.py, in-process: the engine runs here):
``pacs.test`` resolves to 127.0.0.1 when the configuration is loaded (the name is
pinned there), delivery works; then it resolves to 127.0.0.2 — a DNS or /etc/hosts
change — and nothing may leave: the destination pauses naming the address, the
deliveries stay pending, the trap receives no connection and no byte. TLS keeps
verifying the configured name while the socket goes to the checked address.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import dicomgen
from fake_dns import FakeDNS, Trap
from fault_scp import FaultSCP
from harness import holds, poll
from mfconsole import ops
from mfconsole.engine import outbox
from mllp_peer import MllpPeer
from peers import require_tool
from stow_server import StowServer, server_tls
from test_forward_dimse import dimse_dest, storescu
from test_forward_mllp import ehr_dest, srs, with_handlers
from test_forward_stow import stow_dest
from tlsgen import make_pki

SR_TO_ORU = "sr_to_oru"


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    return FakeDNS(monkeypatch, {"pacs.test": ["127.0.0.1"]})


@pytest.fixture
def fault_scp(tmp_path):
    started: list[FaultSCP] = []

    def make(name: str = "scp") -> FaultSCP:
        started.append(FaultSCP(None, record_dir=tmp_path / name, ae_title="PACS").start())
        return started[-1]

    yield make
    for scp in started:
        scp.stop()


def states(engine, destination: str) -> dict[str, int]:
    return engine.store.reader().delivery_counts(destination).get(destination, {})


def paused(engine, destination: str) -> outbox.DestinationState | None:
    st = outbox.state(engine.store.reader(), destination)
    return st if st.paused else None


def ingest(engine, files: list[Path]) -> None:
    res = storescu(engine.listeners[0].address[1], files)
    assert res.returncode == 0, res.stderr[-2000:]


def released(scp: FaultSCP, count: int) -> bool:
    return sum(a["event"] in ("released", "aborted") for a in scp.associations()) >= count


def test_dimse_dials_the_pinned_address_and_never_the_new_one(engine_factory, dns, fault_scp, tmp_path):
    scp = fault_scp()
    with Trap(scp.port) as trap:
        engine = engine_factory(
            destinations=[dimse_dest(scp.port, host="pacs.test", idle_timeout_s=0.3)],
            egress={"allowed_tcp": [f"pacs.test:{scp.port}"], "allowed_http": []})
        assert engine.config.egress_pins.of("pacs.test") == ("127.0.0.1",)
        ingest(engine, dicomgen.write_corpus(tmp_path / "a", 2))
        poll(lambda: states(engine, "pacs").get("delivered") == 2, timeout=30)
        assert len(scp.received()) == 2
        # The idle association ends; the next one is checked again before it connects.
        poll(lambda: released(scp, 1), timeout=15, message="the association released")
        dns.set("pacs.test", "127.0.0.2")
        ingest(engine, dicomgen.write_corpus(tmp_path / "b", 3))
        st = poll(lambda: paused(engine, "pacs"), timeout=30, message="pacs paused")
        assert f"pacs.test:{scp.port} (resolved to 127.0.0.2) is not in [egress].allowed_tcp" \
            in st.pause_reason, st.pause_reason
        assert "pinned to 127.0.0.1" in st.pause_reason and "nothing was sent" in st.pause_reason
        assert states(engine, "pacs") == {"delivered": 2, "pending": 3}
        # The operator tools dial the same way: refused, naming the address.
        echo = ops.echo(engine.config, "pacs")
        assert not echo.ok and "127.0.0.2" in echo.detail
        report = ops.test(engine.config, "pacs")
        assert report.failure and "127.0.0.2" in report.failure
        assert holds(lambda: trap.silent and len(scp.received()) == 2, 1.0)
        # The name back where it was pinned: resumed, the rest goes to the real peer.
        dns.set("pacs.test", "127.0.0.1")
        engine.store.call(outbox.resume, "pacs")
        poll(lambda: states(engine, "pacs").get("delivered") == 5, timeout=30)
        assert len(scp.received()) == 5 and trap.silent


def test_localhost_is_judged_by_what_it_resolves_to(engine_factory, dns, fault_scp, tmp_path):
    """localhost, allowlisted by address: it goes where localhost resolves, and only
    while that is an allowed address (an /etc/hosts change is no exception)."""
    scp = fault_scp()
    with Trap(scp.port) as trap:
        engine = engine_factory(
            destinations=[dimse_dest(scp.port, host="localhost", idle_timeout_s=0.3)],
            egress={"allowed_tcp": [f"127.0.0.1:{scp.port}"], "allowed_http": []})
        ingest(engine, dicomgen.write_corpus(tmp_path / "a", 1))
        poll(lambda: states(engine, "pacs").get("delivered") == 1, timeout=30)
        poll(lambda: released(scp, 1), timeout=15, message="the association released")
        dns.set("localhost", "127.0.0.2")
        ingest(engine, dicomgen.write_corpus(tmp_path / "b", 2))
        st = poll(lambda: paused(engine, "pacs"), timeout=30, message="pacs paused")
        assert f"localhost:{scp.port} (resolved to 127.0.0.2) is not in [egress].allowed_tcp" \
            in st.pause_reason, st.pause_reason
        assert states(engine, "pacs") == {"delivered": 1, "pending": 2}
        assert holds(lambda: trap.silent and len(scp.received()) == 1, 1.0)


def test_mllp_dials_an_address_in_the_allowed_range_only(engine_factory, dns, tmp_path):
    """A CIDR entry with any port (127.0.0.0/31:* holds 127.0.0.1, not 127.0.0.2)."""
    peer = MllpPeer(tmp_path / "ehr").start()
    try:
        with Trap(peer.port) as trap:
            with_handlers(tmp_path / "engine")
            engine = engine_factory(
                destinations=[ehr_dest(peer.port, host="pacs.test")],
                routes=[{"from": "modalities", "to": ["ehr"], "handler": SR_TO_ORU}],
                egress={"allowed_tcp": ["127.0.0.0/31:*"], "allowed_http": []})
            files = srs(tmp_path, 3)
            ingest(engine, files[:1])
            poll(lambda: len(peer.received()) == 1, timeout=30)
            poll(lambda: states(engine, "ehr").get("delivered") == 1, timeout=30)
            dns.set("pacs.test", "127.0.0.2")
            peer.stop()        # the connection ends: the next message needs a new one
            ingest(engine, files[1:])
            st = poll(lambda: paused(engine, "ehr"), timeout=30, message="ehr paused")
            assert f"pacs.test:{peer.port} (resolved to 127.0.0.2) is not in [egress].allowed_tcp" \
                in st.pause_reason, st.pause_reason
            assert states(engine, "ehr") == {"delivered": 1, "pending": 2}
            assert holds(lambda: trap.silent, 1.0)
    finally:
        peer.stop()


def test_stow_dials_the_pinned_address_and_keeps_the_name(engine_factory, dns, tmp_path):
    server = StowServer().start()
    try:
        with Trap(server.port) as trap:
            url = f"http://pacs.test:{server.port}/dicom-web"
            engine = engine_factory(destinations=[stow_dest(url)],
                                    egress={"allowed_tcp": [], "allowed_http": [url]})
            ingest(engine, dicomgen.write_corpus(tmp_path / "a", 1))
            poll(lambda: states(engine, "web").get("delivered") == 1, timeout=30)
            headers = {k.lower(): v for k, v in server.posts()[0].headers.items()}
            assert headers["host"] == f"pacs.test:{server.port}"     # the name, not the address
            # Checked before every request, kept-alive connection or not.
            dns.set("pacs.test", "127.0.0.2")
            ingest(engine, dicomgen.write_corpus(tmp_path / "b", 2))
            st = poll(lambda: paused(engine, "web"), timeout=30, message="web paused")
            assert f"{url}/studies (resolved to 127.0.0.2) is not in [egress].allowed_http" \
                in st.pause_reason, st.pause_reason
            assert "pinned to 127.0.0.1" in st.pause_reason
            assert states(engine, "web") == {"delivered": 1, "pending": 2}
            assert holds(lambda: trap.silent and len(server.posts()) == 1, 1.0)
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["dimse", "mllp", "stow"])
def test_the_connection_goes_to_exactly_the_checked_address(engine_factory, dns, fault_scp, kind,
                                                            tmp_path):
    """The name resolves once per connection (request, for STOW), and the socket goes to
    that address: the name moves to 127.0.0.2 right after the check's lookup, and any
    second resolution (socket.create_connection's, httpcore's) would
    lead to the trap."""
    stop = []
    if kind == "dimse":
        scp = fault_scp()
        port, received = scp.port, lambda: len(scp.received())
        dest = dimse_dest(port, host="pacs.test", max_associations=1)
        egress = {"allowed_tcp": [f"pacs.test:{port}"], "allowed_http": []}
        routes = None
    elif kind == "mllp":
        peer = MllpPeer(tmp_path / "ehr").start()
        stop.append(peer.stop)
        port, received = peer.port, lambda: len(peer.received())
        dest = ehr_dest(port, host="pacs.test")
        egress = {"allowed_tcp": [f"pacs.test:{port}"], "allowed_http": []}
        routes = [{"from": "modalities", "to": ["ehr"], "handler": SR_TO_ORU}]
        with_handlers(tmp_path / "engine")
    else:
        server = StowServer().start()
        stop.append(server.stop)
        port, received = server.port, lambda: len(server.stored)
        dest = stow_dest(f"http://pacs.test:{port}/dicom-web")
        egress = {"allowed_tcp": [], "allowed_http": [dest["url"]]}
        routes = None
    try:
        with Trap(port) as trap:
            engine = engine_factory(destinations=[dest], routes=routes, egress=egress)
            dns.set_then("pacs.test", ["127.0.0.1"], ["127.0.0.2"])
            before = dns.count("pacs.test")
            ingest(engine, srs(tmp_path, 1))
            poll(lambda: states(engine, dest["name"]).get("delivered") == 1, timeout=30)
            assert received() == 1
            assert dns.count("pacs.test") - before == 1
            assert holds(lambda: trap.silent, 0.5)
    finally:
        for fn in stop:
            fn()


# -- TLS: the socket goes to the checked address, the certificate is checked on the name ----

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_verifies_the_configured_name_not_the_dialled_address(engine_factory, dns, storescp_factory,
                                                                   pki, tmp_path):
    """Every destination is ``pacs.test`` (resolving to 127.0.0.1). A peer whose certificate
    names only pacs.test is trusted; one whose certificate names 127.0.0.1 (the address
    dialled) but not pacs.test is not."""
    usage = subprocess.run([require_tool("storescu"), "--help"], capture_output=True, text=True).stdout
    if "+tls" not in usage:
        pytest.skip("this DCMTK is built without OpenSSL")

    def scp(name: str, cert: str):
        return storescp_factory("+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"]),
                                "+cf", str(pki["ca.crt"]), "-vc", name=name)

    ca = {"ca_file": str(pki["ca.crt"])}
    fast = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "down_after": 50, "bounded_attempts": 50,
            "connect_timeout_s": 2}
    named_scp, address_scp = scp("named", "named-server"), scp("by-address", "server")
    web = {"named": StowServer(tls=server_tls(pki, stem="named-server")).start(),
           "by-address": StowServer(tls=server_tls(pki)).start()}
    ehr = MllpPeer(tmp_path / "ehr", tls={"cert": pki["named-server.crt"],
                                          "key": pki["named-server.key"]}).start()
    try:
        urls = {k: f"https://pacs.test:{s.port}/dicom-web" for k, s in web.items()}
        dests = [{"name": "pacs-named", "kind": "dimse", "host": "pacs.test", "port": named_scp.port,
                  "ae_title": "PACS", "tls": ca, **fast},
                 {"name": "pacs-by-address", "kind": "dimse", "host": "pacs.test",
                  "port": address_scp.port, "ae_title": "PACS", "tls": ca, **fast},
                 {"name": "web-named", "kind": "stow", "url": urls["named"], "tls": ca, **fast},
                 {"name": "web-by-address", "kind": "stow", "url": urls["by-address"], "tls": ca, **fast},
                 ehr_dest(ehr.port, host="pacs.test", tls=ca)]
        with_handlers(tmp_path / "engine")
        engine = engine_factory(
            destinations=dests,
            routes=[{"from": "modalities", "to": [d["name"] for d in dests[:4]]},
                    {"from": "modalities", "to": ["ehr"], "handler": SR_TO_ORU}],
            egress={"allowed_tcp": ["pacs.test:*"], "allowed_http": list(urls.values())})
        ingest(engine, srs(tmp_path, 2))
        for name in ("pacs-named", "web-named", "ehr"):
            poll(lambda: states(engine, name).get("delivered") == 2, timeout=30,
                 message=f"{name} delivered")
        for name in ("pacs-by-address", "web-by-address"):
            st = poll(lambda: paused(engine, name), timeout=30, message=f"{name} paused")
            assert "not trusted" in st.pause_reason, st.pause_reason
            assert states(engine, name) == {"pending": 2}
        assert len(named_scp.received_files()) == 2 and not address_scp.received_files()
        assert len(web["named"].stored) == 2 and not web["by-address"].posts()
        assert len(ehr.received()) == 2
        assert {k.lower(): v for k, v in web["named"].posts()[0].headers.items()}["host"] == \
            f"pacs.test:{web['named'].port}"
    finally:
        for s in web.values():
            s.stop()
        ehr.stop()

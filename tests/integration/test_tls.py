"""TLS on every connection (issue 6), against real peers: DCMTK's TLS tools both ways,
openssl s_client, an https STOW-RS server and an MLLP-over-TLS peer (hl7apy). Every
test asserts on what was stored, received or audited, not only on exit codes.

Certificates come from tests/tlsgen.py: a CA, server, client, expired and wrong-CA
("rogue") certificates, made once for the module.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

import dicomgen
from harness import mfconsole, poll, write_config
from mllp_peer import MllpPeer
from peers import free_port, require_tool
from stow_server import StowServer, server_tls
from test_forward_dimse import storescu
from test_forward_mllp import srs, with_handlers
from tlsgen import make_pki

from mfconsole.engine import outbox
from mfconsole.repository import db_path

FAST = {"retry_initial_s": 0.2, "retry_max_s": 1.0, "down_after": 50, "bounded_attempts": 50,
        "connect_timeout_s": 2}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", autouse=True)
def tls_tools() -> None:
    require_tool("openssl")
    usage = subprocess.run([require_tool("storescu"), "--help"], capture_output=True, text=True).stdout
    assert "+tls" in usage, "this DCMTK is built without OpenSSL: install Debian's dcmtk package"


def listener_tls(pki, cert: str = "server", **extra) -> dict:
    return {"tls": {"cert_file": str(pki[f"{cert}.crt"]), "key_file": str(pki[f"{cert}.key"]), **extra}}


def mtls(pki, **extra) -> dict:
    return listener_tls(pki, require_client_cert=True, ca_file=str(pki["ca.crt"]), **extra)


def dcmtk(tool: str, engine, pki, files=(), *, cert: str | None = None, aet: str = "MODALITY",
          ca: str = "ca.crt", timeout: float = 30) -> subprocess.CompletedProcess:
    """storescu/echoscu over TLS into ``engine``'s listener: anonymous (+tla) without
    ``cert``, else with that client certificate; trusting ``ca``."""
    args = ["+tla"] if cert is None else ["+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"])]
    if ca:
        args += ["+cf", str(pki[ca])]
    return subprocess.run([require_tool(tool), *args, "-aet", aet, "-aec", "MF_SCP", "-to", "5",
                           "127.0.0.1", str(engine.listeners[0].address[1]), *map(str, files)],
                          capture_output=True, text=True, timeout=timeout)


def stored(engine) -> int:
    return engine.store.reader().object_count()


def audit(engine, event: str = "refused") -> list[dict]:
    return [{k: r[k] for k in ("event", "calling_ae", "peer", "status", "detail")}
            for r in engine.store.reader().rows("audit", event=event)]


def tls_refusals(engine) -> list[dict]:
    return [a for a in audit(engine) if a["status"] == "TLS"]


def state(engine, destination: str) -> outbox.DestinationState:
    return outbox.state(engine.store.reader(), destination)


def delivered(engine, destination: str) -> int:
    return len(engine.store.reader().rows("deliveries", destination=destination, state="delivered"))


# -- listeners ---------------------------------------------------------------------------


def test_dcmtk_stores_over_tls_and_refuses_a_listener_it_does_not_trust(engine_factory, pki, tmp_path):
    engine = engine_factory(listener=listener_tls(pki))
    files = dicomgen.write_corpus(tmp_path / "sr", 3)
    echo = dcmtk("echoscu", engine, pki)
    assert echo.returncode == 0, echo.stderr
    res = dcmtk("storescu", engine, pki, files[:2])                    # no client certificate
    assert res.returncode == 0, res.stderr
    res = dcmtk("storescu", engine, pki, files[2:], cert="client")     # one it is not asked for
    assert res.returncode == 0, res.stderr
    assert stored(engine) == 3
    def inbound() -> list[dict]:   # (the engine's deliveries to its default destination are "out")
        return [a for a in engine.board.snapshot()["recent"] if a["direction"] == "in"]

    recent = poll(lambda: len(inbound()) >= 3 and inbound())
    assert all(a["tls"].startswith("TLSv1.3 ") for a in recent), recent
    # A sender that does not trust our CA, and one that speaks cleartext: nothing stored.
    more = dicomgen.write_corpus(tmp_path / "more", 1)
    assert dcmtk("storescu", engine, pki, more, ca="rogue-ca.crt").returncode != 0
    assert storescu(engine.listeners[0].address[1], more).returncode != 0   # cleartext
    refusals = poll(lambda: len(tls_refusals(engine)) >= 2 and tls_refusals(engine))
    assert any("cleartext association request" in r["detail"] for r in refusals), refusals
    assert all(r["peer"].startswith("127.0.0.1:") for r in refusals)
    # An expired listener certificate is refused by DCMTK too.
    expired = engine_factory("expired", listener=listener_tls(pki, "expired-server"))
    assert dcmtk("storescu", expired, pki, more).returncode != 0
    assert stored(engine) == 3 and stored(expired) == 0


def test_mtls_listener_takes_only_trusted_valid_certificates_bound_to_their_aets(engine_factory, pki, tmp_path):
    engine = engine_factory(listener=mtls(pki, client_cert_aets={
        "mfconsole": ["MODALITY"], "CT1.Modality.Test": ["CT1"]}))
    f = dicomgen.write_corpus(tmp_path / "sr", 6)
    assert dcmtk("storescu", engine, pki, f[:1], cert="client").returncode == 0
    assert dcmtk("storescu", engine, pki, f[1:2], cert="modality", aet="CT1").returncode == 0
    assert stored(engine) == 2
    # Refused at the handshake: no certificate, another CA's, an expired one.
    for cert in (None, "rogue-client", "expired-client"):
        assert dcmtk("storescu", engine, pki, f[2:3], cert=cert).returncode != 0, cert
    # A valid certificate cannot speak as another AE title, nor an unlisted one.
    res = dcmtk("storescu", engine, pki, f[3:4], cert="modality", aet="MODALITY")
    assert res.returncode != 0 and "Rejected" in res.stdout + res.stderr
    assert dcmtk("storescu", engine, pki, f[4:5], cert="client", aet="CT1").returncode != 0
    assert stored(engine) == 2
    refusals = poll(lambda: len(tls_refusals(engine)) >= 3 and tls_refusals(engine))
    details = " | ".join(r["detail"] for r in refusals)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in details or "certificate required" in details, details
    assert "certificate has expired" in details and "unable to get local issuer" in details, details
    rejected = poll(lambda: len(audit(engine, "association_rejected")) >= 2
                    and audit(engine, "association_rejected"))
    assert {r["calling_ae"] for r in rejected} == {"MODALITY", "CT1"}
    assert all("client certificate" in r["detail"] for r in rejected), rejected


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


def test_old_protocols_and_non_aead_suites_are_refused(engine_factory, pki):
    engine = engine_factory(listener=listener_tls(pki))
    port = engine.listeners[0].address[1]
    ok13 = s_client(port, "-tls1_3")
    assert ok13.returncode == 0 and "TLSv1.3" in ok13.stderr, ok13.stderr
    ok12 = s_client(port, "-tls1_2")
    assert ok12.returncode == 0 and "ECDHE-RSA-AES256-GCM-SHA384" in ok12.stderr, ok12.stderr
    # SECLEVEL=0 lets this openssl offer what it would refuse to by default: the
    # refusal below is our listener's (each one is in its audit trail).
    refused = [("-tls1", "-cipher", "DEFAULT@SECLEVEL=0"), ("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"),
               ("-tls1_2", "-cipher", "AES128-SHA"), ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"),
               ("-tls1_2", "-cipher", "AES256-GCM-SHA384")]    # AEAD, but no forward secrecy
    for args in refused:
        res = s_client(port, *args)
        assert res.returncode != 0 and "alert" in res.stderr, (args, res.stderr)
    refusals = poll(lambda: len(tls_refusals(engine)) >= len(refused) and tls_refusals(engine))
    reasons = [r["detail"] for r in refusals]
    assert sum("UNSUPPORTED_PROTOCOL" in r for r in reasons) == 2, reasons
    assert sum("NO_SHARED_CIPHER" in r for r in reasons) == 3, reasons


def test_silent_tls_clients_delay_nobody_and_are_closed_at_the_deadline(engine_factory, pki):
    engine = engine_factory(listener={**listener_tls(pki), "acse_timeout_s": 2})
    port = engine.listeners[0].address[1]
    opened = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(bytes.fromhex("16030100f4010000f00303") + b"\x00" * 16)   # half a ClientHello
    silent.append(half)
    t0 = time.monotonic()
    echo = dcmtk("echoscu", engine, pki)
    took = time.monotonic() - t0
    assert echo.returncode == 0 and took < 2.0, (took, echo.stderr)
    closed_after = []
    for s in silent:
        s.settimeout(10)
        assert s.recv(1024) == b""                          # closed by the listener
        closed_after.append(time.monotonic() - opened)
        s.close()
    assert all(1.8 < t < 3.5 for t in closed_after), closed_after
    refusals = poll(lambda: len(tls_refusals(engine)) >= 5 and tls_refusals(engine))
    assert all("not completed within acse_timeout_s=2" in r["detail"] for r in refusals), refusals


def own_address() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))        # no packet is sent
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("host", ["0.0.0.0", "own"])
def test_cleartext_listener_off_loopback_refuses_to_start(tmp_path, host):
    host = own_address() if host == "own" else host
    if host is None:
        pytest.skip("no non-loopback address")
    port = free_port()
    config = write_config(tmp_path, port=port, listener={"host": host})
    res = mfconsole("--config", str(config), "serve", timeout=60)
    assert res.returncode != 0
    message = res.stdout + res.stderr
    assert "listeners[0].host" in message and "allow_cleartext = true" in message and "tls" in message
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()
    assert not db_path(tmp_path / "var").exists()


def test_cleartext_override_starts_with_one_warning(engine_factory, tmp_path):
    engine = engine_factory(listener={"host": "0.0.0.0", "allow_cleartext": True})
    echo = subprocess.run([require_tool("echoscu"), "-aec", "MF_SCP", "127.0.0.1",
                           str(engine.listeners[0].address[1])], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    log = (tmp_path / "engine" / "var" / "logs" / "mfconsole.log").read_text()
    warnings = [line for line in log.splitlines() if "cleartext on 0.0.0.0" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings


# -- destinations ----------------------------------------------------------------------------


def test_dimse_destination_into_storescp_over_tls(engine_factory, storescp_factory, pki, tmp_path):
    def scp(name: str, cert: str = "server", peer_cert: str = "-vc"):
        return storescp_factory("+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"]),
                                "+cf", str(pki["ca.crt"]), peer_cert, name=name)

    ca = {"ca_file": str(pki["ca.crt"])}
    client = {**ca, "cert_file": str(pki["client.crt"]), "key_file": str(pki["client.key"])}
    # One storescp per destination: it serves one association at a time.
    peers = {"tls": scp("tls"), "mtls": scp("mtls", peer_cert="-rc"),
             "anonymous": scp("anonymous", peer_cert="-rc"), "expired-client": scp("expired-client", peer_cert="-rc"),
             "rogue-client": scp("rogue-client", peer_cert="-rc"), "expired": scp("expired", "expired-server"),
             "rogue": scp("rogue", "rogue-server"), "named": scp("named", "named-server"),
             "misnamed": scp("misnamed", "named-server")}
    tls = {"tls": ca, "mtls": client, "anonymous": ca, "expired": ca, "rogue": ca,
           "named": {**ca, "server_name": "pacs.test"}, "misnamed": ca,
           **{f"{bad}-client": {**ca, "cert_file": str(pki[f"{bad}-client.crt"]),
                                "key_file": str(pki[f"{bad}-client.key"])} for bad in ("expired", "rogue")}}
    engine = engine_factory(destinations=[
        {"name": name, "kind": "dimse", "host": "127.0.0.1", "port": peers[name].port, "ae_title": "PACS",
         "tls": tls[name], **FAST} for name in peers])
    files = dicomgen.write_corpus(tmp_path / "sr", 2)
    res = storescu(engine.listeners[0].address[1], files)
    assert res.returncode == 0, res.stderr
    for name in ("tls", "mtls", "named"):
        poll(lambda: delivered(engine, name) == 2, timeout=30, message=f"{name} delivered")
    # Trust failures pause the destination; nothing was sent, the items stay queued.
    why = {"expired": "certificate has expired", "rogue": "unable to get local issuer certificate",
           "misnamed": "mismatch"}
    for name, words in why.items():
        st = poll(lambda: state(engine, name).paused and state(engine, name), timeout=30,
                  message=f"{name} paused")
        assert "not trusted" in st.pause_reason and words in st.pause_reason, st.pause_reason
        assert delivered(engine, name) == 0
    # Without a client certificate, or with one it does not take, the mTLS peer hangs
    # up: retried, never delivered.
    for name in ("anonymous", "expired-client", "rogue-client"):
        poll(lambda: state(engine, name).failures >= 2, timeout=30, message=f"{name} retried")
        assert not state(engine, name).paused and delivered(engine, name) == 0
    assert {name: len(peer.received_files()) for name, peer in peers.items()} == {
        "tls": 2, "mtls": 2, "named": 2, "anonymous": 0, "expired-client": 0, "rogue-client": 0,
        "expired": 0, "rogue": 0, "misnamed": 0}


def test_stow_over_https_with_and_without_client_certificates(engine_factory, pki, tmp_path):
    servers = {"open": StowServer(tls=server_tls(pki)), "mtls": StowServer(tls=server_tls(pki, True)),
               "named": StowServer(tls=server_tls(pki, stem="named-server")),
               "rogue": StowServer(tls=server_tls(pki, stem="rogue-server"))}
    for s in servers.values():
        s.start()
    try:
        ca = {"ca_file": str(pki["ca.crt"])}
        client = {**ca, "cert_file": str(pki["client.crt"]), "key_file": str(pki["client.key"])}
        dests = {"web": ("open", ca), "web-mtls": ("mtls", client), "web-anonymous": ("mtls", ca),
                 "web-named": ("named", {**ca, "server_name": "pacs.test"}), "web-rogue": ("rogue", ca)}
        engine = engine_factory(destinations=[
            {"name": n, "kind": "stow", "url": servers[s].url, "tls": t, "response_timeout_s": 5, **FAST}
            for n, (s, t) in dests.items()])
        files = dicomgen.write_corpus(tmp_path / "sr", 2)
        res = storescu(engine.listeners[0].address[1], files)
        assert res.returncode == 0, res.stderr
        for name in ("web", "web-mtls", "web-named"):
            poll(lambda: delivered(engine, name) == 2, timeout=30, message=f"{name} delivered")
        assert {c["subject"][0][0][1] for c in servers["mtls"].client_certs} == {"mfconsole"}
        st = poll(lambda: state(engine, "web-rogue").paused and state(engine, "web-rogue"), timeout=30)
        assert "not trusted" in st.pause_reason
        poll(lambda: state(engine, "web-anonymous").failures >= 2, timeout=30)
        assert delivered(engine, "web-anonymous") == 0
        assert len(servers["mtls"].stored) == 2 and not servers["rogue"].posts()
    finally:
        for s in servers.values():
            s.stop()


def test_mllp_over_tls_with_and_without_client_certificates(engine_factory, pki, tmp_path):
    open_peer = MllpPeer(tmp_path / "open", tls={"cert": pki["server.crt"], "key": pki["server.key"]}).start()
    mtls_peer = MllpPeer(tmp_path / "mtls", tls={"cert": pki["server.crt"], "key": pki["server.key"],
                                                 "ca": pki["ca.crt"]}).start()
    try:
        ca = {"ca_file": str(pki["ca.crt"])}
        client = {**ca, "cert_file": str(pki["client.crt"]), "key_file": str(pki["client.key"])}
        dests = {"ehr": (open_peer, ca), "ehr-mtls": (mtls_peer, client), "ehr-anonymous": (mtls_peer, ca)}
        with_handlers(tmp_path / "engine")
        engine = engine_factory(destinations=[
            {"name": n, "kind": "mllp", "host": "127.0.0.1", "port": p.port, "tls": t, "ack_timeout_s": 2,
             **FAST} for n, (p, t) in dests.items()],
            routes=[{"from": "modalities", "to": list(dests), "handler": "sr_to_oru"}])
        res = storescu(engine.listeners[0].address[1], srs(tmp_path, 2))
        assert res.returncode == 0, res.stderr
        for name in ("ehr", "ehr-mtls"):
            poll(lambda: delivered(engine, name) == 2, timeout=30, message=f"{name} delivered")
        poll(lambda: state(engine, "ehr-anonymous").failures >= 2, timeout=30)
        assert delivered(engine, "ehr-anonymous") == 0
        # Two messages each (a slow ACK under load may make one arrive twice: same MSH-10).
        assert {m["client_cn"] for m in open_peer.received()} == {None}
        assert len({m["control_id"] for m in open_peer.received()}) == 2
        assert {m["client_cn"] for m in mtls_peer.received()} == {"mfconsole"}
        assert len({m["control_id"] for m in mtls_peer.received()}) == 2
    finally:
        open_peer.stop()
        mtls_peer.stop()


def test_a_renewed_listener_certificate_is_used_without_a_restart(engine_factory, pki, tmp_path):
    import shutil

    cert, key = tmp_path / "scp.crt", tmp_path / "scp.key"
    shutil.copy(pki["expired-server.crt"], cert)
    shutil.copy(pki["expired-server.key"], key)
    engine = engine_factory(listener={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    files = dicomgen.write_corpus(tmp_path / "sr", 2)
    assert dcmtk("storescu", engine, pki, files[:1]).returncode != 0     # expired: refused
    shutil.copy(pki["server.crt"], cert)
    shutil.copy(pki["server.key"], key)
    res = dcmtk("storescu", engine, pki, files[1:])
    assert res.returncode == 0, res.stderr
    assert stored(engine) == 1


def test_a_handshake_cut_short_is_retried_not_paused(engine_factory, pki, tmp_path):
    """status-classes: "TLS I/O error mid-handshake" is transient (DIMSE and MLLP)."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    cuts: list[int] = []

    def cut() -> None:   # reads part of the ClientHello, then drops the connection
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(64)
            conn.close()
            cuts.append(1)

    threading.Thread(target=cut, daemon=True).start()
    try:
        ca = {"ca_file": str(pki["ca.crt"])}
        port = server.getsockname()[1]
        with_handlers(tmp_path / "engine")
        engine = engine_factory(
            destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": port,
                           "ae_title": "PACS", "tls": ca, **FAST},
                          {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": port, "tls": ca,
                           **FAST}],
            routes=[{"from": "modalities", "to": ["pacs"]},
                    {"from": "modalities", "to": ["ehr"], "handler": "sr_to_oru"}])
        res = storescu(engine.listeners[0].address[1], srs(tmp_path, 1))
        assert res.returncode == 0, res.stderr
        for name in ("pacs", "ehr"):
            poll(lambda: state(engine, name).failures >= 3, timeout=30, message=f"{name} retried")
            assert not state(engine, name).paused and delivered(engine, name) == 0
            row = engine.store.reader().rows("deliveries", destination=name)[0]
            assert row["last_class"] == "transient/destination", dict(row)
            assert "TLS handshake with 127.0.0.1" in row["last_reason"], dict(row)
        # (counted after the close the engine reacted to: polled for)
        poll(lambda: len(cuts) >= 6, timeout=5, message="six handshakes cut")
    finally:
        server.close()


def test_cert_binding_fails_closed_when_the_listener_could_not_bind(engine_factory, pki, tmp_path,
                                                                     monkeypatch):
    """If reading the client certificate's names fails (the listener's own fault), the
    association is refused: bound AE titles are never silently unbound."""
    from mfconsole import tls as tls_mod

    engine = engine_factory(listener=mtls(pki, client_cert_aets={"mfconsole": ["MODALITY"]}))

    def broken(_cert):
        raise ValueError("cannot read the certificate's names")
    monkeypatch.setattr(tls_mod, "identities", broken)
    f = dicomgen.write_corpus(tmp_path / "sr", 1)
    res = dcmtk("storescu", engine, pki, f, cert="client")
    assert res.returncode != 0 and "Rejected" in res.stdout + res.stderr
    assert stored(engine) == 0


def test_handshaking_connections_count_before_association_and_stop_closes_them(engine_factory, pki):
    """A connection in its handshake is one without an association: the per-address
    limit closes the newest at once, and a stop closes those still handshaking."""
    engine = engine_factory(listener={**listener_tls(pki), "acse_timeout_s": 20, "max_pending_per_address": 3})
    listener = engine.listeners[0]
    port = listener.address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    poll(lambda: listener.pending == 3, message="3 handshaking connections")
    newest = socket.create_connection(("127.0.0.1", port))
    newest.settimeout(2)
    t0 = time.monotonic()
    assert newest.recv(1024) == b"" and time.monotonic() - t0 < 1.0
    newest.close()
    t0 = time.monotonic()
    listener.stop(1)
    assert time.monotonic() - t0 < 5
    for s in idle:
        s.settimeout(5)
        assert s.recv(1024) == b""          # closed by the stop, not at the deadline
        s.close()
    assert listener.pending == 0

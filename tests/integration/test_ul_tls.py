"""TLS on mfconsole's own upper layer (``upper_layer = "mfconsole"``): the listener
scenarios of test_tls.py, with the same certificates, peers and assertions (what was
stored, what was audited), against the event-loop acceptor. The policy is one:
mfconsole.tls builds the context for both upper layers.
"""

from __future__ import annotations

import shutil
import socket
import time

import dicomgen
from harness import poll
from test_forward_dimse import storescu
from test_tls import (audit, dcmtk, listener_tls, mtls, pki, s_client, stored,  # noqa: F401
                      tls_refusals, tls_tools)

UL = {"upper_layer": "mfconsole"}


def ul_tls(pki, cert: str = "server", **extra) -> dict:
    return {**UL, **listener_tls(pki, cert, **extra)}


def ul_mtls(pki, **extra) -> dict:
    return {**UL, **mtls(pki, **extra)}


def test_dcmtk_stores_over_tls_and_refusals_are_audited(engine_factory, pki, tmp_path):
    engine = engine_factory(listener=ul_tls(pki))
    assert type(engine.listeners[0]).__name__ == "UpperLayerListener"
    files = dicomgen.write_corpus(tmp_path / "sr", 3)
    echo = dcmtk("echoscu", engine, pki)
    assert echo.returncode == 0, echo.stderr
    res = dcmtk("storescu", engine, pki, files[:2])                    # no client certificate
    assert res.returncode == 0, res.stderr
    res = dcmtk("storescu", engine, pki, files[2:], cert="client")     # one it is not asked for
    assert res.returncode == 0, res.stderr
    assert stored(engine) == 3
    recent = poll(lambda: len(engine.board.snapshot()["recent"]) >= 3 and engine.board.snapshot()["recent"])
    assert all(a["tls"].startswith("TLSv1.3 ") for a in recent), recent
    # A sender that does not trust our CA, and one that speaks cleartext: nothing stored.
    more = dicomgen.write_corpus(tmp_path / "more", 1)
    assert dcmtk("storescu", engine, pki, more, ca="rogue-ca.crt").returncode != 0
    assert storescu(engine.listeners[0].address[1], more).returncode != 0   # cleartext
    refusals = poll(lambda: len(tls_refusals(engine)) >= 2 and tls_refusals(engine))
    assert any("cleartext association request" in r["detail"] for r in refusals), refusals
    assert all(r["peer"].startswith("127.0.0.1:") for r in refusals)
    # An expired listener certificate is refused by DCMTK too.
    expired = engine_factory("expired", listener=ul_tls(pki, "expired-server"))
    assert dcmtk("storescu", expired, pki, more).returncode != 0
    assert stored(engine) == 3 and stored(expired) == 0


def test_mtls_takes_only_trusted_valid_certificates_bound_to_their_aets(engine_factory, pki, tmp_path):
    engine = engine_factory(listener=ul_mtls(pki, client_cert_aets={
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
    assert any("ct1.modality.test" in r["detail"] for r in rejected), rejected


def test_old_protocols_and_non_aead_suites_are_refused(engine_factory, pki):
    engine = engine_factory(listener=ul_tls(pki))
    port = engine.listeners[0].address[1]
    ok13 = s_client(port, "-tls1_3")
    assert ok13.returncode == 0 and "TLSv1.3" in ok13.stderr, ok13.stderr
    ok12 = s_client(port, "-tls1_2")
    assert ok12.returncode == 0 and "ECDHE-RSA-AES256-GCM-SHA384" in ok12.stderr, ok12.stderr
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
    engine = engine_factory(listener={**ul_tls(pki), "acse_timeout_s": 2})
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


def test_a_renewed_listener_certificate_is_used_without_a_restart(engine_factory, pki, tmp_path):
    cert, key = tmp_path / "scp.crt", tmp_path / "scp.key"
    shutil.copy(pki["expired-server.crt"], cert)
    shutil.copy(pki["expired-server.key"], key)
    engine = engine_factory(listener={**UL, "tls": {"cert_file": str(cert), "key_file": str(key)}})
    files = dicomgen.write_corpus(tmp_path / "sr", 2)
    assert dcmtk("storescu", engine, pki, files[:1]).returncode != 0     # expired: refused
    shutil.copy(pki["server.crt"], cert)
    shutil.copy(pki["server.key"], key)
    res = dcmtk("storescu", engine, pki, files[1:])
    assert res.returncode == 0, res.stderr
    assert stored(engine) == 1


def test_cert_binding_fails_closed_when_the_listener_could_not_bind(engine_factory, pki, tmp_path,
                                                                     monkeypatch):
    """Names that cannot be read bind no AE title: refused 1/1/3, never unbound."""
    from mfconsole import tls as tls_mod

    engine = engine_factory(listener=ul_mtls(pki, client_cert_aets={"mfconsole": ["MODALITY"]}))

    def broken(_cert):
        raise ValueError("cannot read the certificate's names")
    monkeypatch.setattr(tls_mod, "identities", broken)
    f = dicomgen.write_corpus(tmp_path / "sr", 1)
    res = dcmtk("storescu", engine, pki, f, cert="client")
    assert res.returncode != 0 and "Rejected" in res.stdout + res.stderr
    assert stored(engine) == 0
    rejected = poll(lambda: audit(engine, "association_rejected"))
    assert "names unreadable" in rejected[0]["detail"], rejected


def test_handshaking_connections_count_before_association_and_stop_closes_them(engine_factory, pki):
    """A connection in its handshake is one without an association: the per-address
    limit closes the newest at once, and a stop closes those still handshaking."""
    engine = engine_factory(listener={**ul_tls(pki), "acse_timeout_s": 20})
    listener = engine.listeners[0]
    listener.pending_per_peer = 3
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

"""tls.client_cert_aets binds a client certificate by its subjectAltName when it has
one, and by its subject CN only when it has none (RFC 6125 6.4.4): a certificate
issued for "other.example" does not speak for "ct1" because its CN says so.

The certificates are tests/tlsgen.py's; each is presented in a real TLS handshake to
mfconsole's listener context, and the binding is computed from ``getpeercert()`` the
way the listener does it (``tls.aets_for(tls.identities(...))``, dimse/listener.py).
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from harness import write_config
from mfconsole import tls
from mfconsole.config import load
from tlsgen import make_pki

BINDING = {"ct1.modality.test": ["CT1"], "OTHER.example": ["OTHER"], "mfconsole": ["MODALITY"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def listener_tls(pki, tmp_path_factory):
    cfg = load(write_config(tmp_path_factory.mktemp("cfg"), listener={"tls": {
        "cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]),
        "require_client_cert": True, "ca_file": str(pki["ca.crt"]), "client_cert_aets": BINDING}}))
    return cfg.listeners[0].tls


def peer_cert(pki, listener_tls, stem: str) -> dict:
    """What the listener's side of a handshake sees of a client presenting ``stem``."""
    server_ctx = tls.server_context(listener_tls)
    client_ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
    client_ctx.load_cert_chain(str(pki[f"{stem}.crt"]), str(pki[f"{stem}.key"]))
    a, b = socket.socketpair()
    seen: dict = {}

    def serve() -> None:
        conn = tls.accept(server_ctx, a, 10)
        seen["cert"] = conn.getpeercert()
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as c:
            c.settimeout(10)
            try:
                c.recv(1)          # until the server closes (TLS 1.3: after its checks)
            except (ssl.SSLError, OSError):
                pass
    finally:
        t.join(10)
    return seen["cert"]


def bound(pki, listener_tls, stem: str) -> tuple[set[str], frozenset[str]]:
    names = tls.identities(peer_cert(pki, listener_tls, stem))
    return names, listener_tls.aets_for(names)


def test_cn_beside_another_san_is_not_bound(pki, listener_tls):
    # CN "ct1.modality.test", SAN DNS "Other.Example": it is other.example, not ct1.
    names, aets = bound(pki, listener_tls, "modality-other")
    assert names == {"other.example"}
    assert "CT1" not in aets
    assert aets == {"OTHER"}          # the SAN binds, without case on either side


def test_san_equal_to_cn_binds(pki, listener_tls):
    assert bound(pki, listener_tls, "modality") == ({"ct1.modality.test"}, {"CT1"})


def test_cn_binds_only_when_there_is_no_san(pki, listener_tls):
    assert bound(pki, listener_tls, "client") == ({"mfconsole"}, {"MODALITY"})


@pytest.mark.parametrize("cert,names", [
    # DNS, IP and URI entries are identities; a CN beside them is not.
    ({"subject": ((("commonName", "ct1.modality.test"),),),
      "subjectAltName": (("DNS", "CT1-Alt.Example"), ("IP Address", "10.0.0.7"), ("URI", "urn:x"))},
     {"ct1-alt.example", "10.0.0.7", "urn:x"}),
    # A SAN with no name of those kinds binds nothing (not the CN either): fail closed.
    ({"subject": ((("commonName", "ct1.modality.test"),),),
      "subjectAltName": (("email", "ct1@example.org"),)}, set()),
    ({"subject": ((("commonName", " CT1.Modality.Test "),),)}, {"ct1.modality.test"}),
    ({"subject": ((("commonName", "ct1.modality.test"),),), "subjectAltName": ()},
     {"ct1.modality.test"}),
    ({}, set()),
    (None, set()),
])
def test_identities(cert, names):
    assert tls.identities(cert) == names

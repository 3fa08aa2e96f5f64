"""The one `tls` table (listeners and every destination kind), the TLS policy of
mfconsole.tls, cleartext off loopback, and how a failed handshake is classified."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from harness import write_config
from mfconsole import contract, tls
from mfconsole.config import load
from test_stow_config import problems
from tlsgen import make_pki

DIMSE = {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS"}
MLLP = {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": 2575}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server(pki, **extra) -> dict:
    return {"cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]), **extra}


def test_listener_tls_loads(tmp_path, pki):
    cfg = load(write_config(tmp_path, listener={"host": "0.0.0.0", "tls": server(
        pki, require_client_cert=True, ca_file=str(pki["ca.crt"]),
        client_cert_aets={"CT1.Modality.Test": ["CT1", "CT1_QC"], "mr1": ["MR1"]})}))
    t = cfg.listeners[0].tls
    assert t.cert_file == pki["server.crt"] and t.require_client_cert and not cfg.listeners[0].allow_cleartext
    assert t.client_cert_aets == (("ct1.modality.test", ("CT1", "CT1_QC")), ("mr1", ("MR1",)))
    assert t.aets_for({"ct1.modality.test", "other"}) == {"CT1", "CT1_QC"}
    assert t.aets_for({"unlisted"}) == frozenset()


def test_destination_tls_loads_for_every_kind(tmp_path, pki):
    ca = {"ca_file": str(pki["ca.crt"])}
    mtls = {**ca, "cert_file": str(pki["client.crt"]), "key_file": str(pki["client.key"]),
            "server_name": "pacs.test"}
    cfg = load(write_config(tmp_path, destinations=[
        dict(DIMSE, host="10.1.2.3", tls=mtls), dict(MLLP, host="ehr.example", tls={}),
        {"name": "web", "kind": "stow", "url": "https://archive.example/dicom-web", "tls": ca}],
        routes=[]))
    pacs, ehr, web = cfg.destinations
    assert pacs.tls.server_name == "pacs.test" and pacs.tls.key_file == pki["client.key"]
    assert ehr.tls is not None and ehr.tls.ca_file is None      # system trust store
    assert web.tls.ca_file == pki["ca.crt"]


@pytest.mark.parametrize("where,table,key,why", [
    ("listener", {"server_name": "x"}, "server_name", "does not apply to a listener"),
    ("listener", {"ca_file": "@ca"}, "ca_file", "only used with require_client_cert"),
    ("listener", {"require_client_cert": True}, "ca_file", "required with require_client_cert"),
    ("listener", {"client_cert_aets": {"ct1": ["CT1"]}}, "client_cert_aets", "needs require_client_cert"),
    ("listener", {"require_client_cert": True, "ca_file": "@ca", "client_cert_aets": {"ct1": ["C\\T"]}},
     'client_cert_aets."ct1"[0]', "backslash"),
    ("listener", {"require_client_cert": True, "ca_file": "@ca", "client_cert_aets": {"ct1": "CT1"}},
     'client_cert_aets."ct1"', "list of calling AE titles"),
    ("listener", {"require_client_cert": "yes"}, "require_client_cert", "true or false"),
    ("listener", {"cert_fle": "x"}, "cert_fle", "did you mean 'cert_file'"),
    ("listener", {"key_file": "@rogue_key"}, "cert_file", "matching private key"),
    ("listener", {"key_file": "@world_key"}, "key_file", "chmod 600"),
    ("listener", {"ca_file": "@not_pem", "require_client_cert": True}, "ca_file", "not a usable PEM"),
    ("destination", {"require_client_cert": True}, "require_client_cert", "does not apply to a destination"),
    ("destination", {"client_cert_aets": {}}, "client_cert_aets", "does not apply to a destination"),
    ("destination", {"key_file": "@key"}, "key_file", "needs cert_file"),
    ("destination", {"ca_file": "missing.pem"}, "ca_file", "not a readable file"),
    ("destination", {"server_name": "two words"}, "server_name", "host name"),
])
def test_tls_problems_are_named(tmp_path, pki, where, table, key, why):
    world = tmp_path / "world.key"
    world.write_bytes(pki["server.key"].read_bytes())
    world.chmod(0o644)
    (tmp_path / "not.pem").write_text("not a certificate\n")
    files = {"@ca": str(pki["ca.crt"]), "@key": str(pki["client.key"]), "@world_key": str(world),
             "@rogue_key": str(pki["rogue-server.key"]), "@not_pem": str(tmp_path / "not.pem")}
    table = {k: files.get(v, v) if isinstance(v, str) else v for k, v in table.items()}
    if where == "listener":
        found = problems(write_config(tmp_path, listener={"tls": {**server(pki), **table}}))
        assert why in found.get(f"listeners[0].tls.{key}", ""), found
    else:
        found = problems(write_config(tmp_path, destinations=[dict(DIMSE, tls=table)]))
        assert why in found.get(f"destinations[0].tls.{key}", ""), found


def test_listener_tls_needs_a_certificate(tmp_path):
    found = problems(write_config(tmp_path, listener={"tls": {}}))
    assert "is required" in found["listeners[0].tls.cert_file"]


def test_tls_must_be_a_table(tmp_path):
    found = problems(write_config(tmp_path, listener={"tls": True}))
    assert "must be a table" in found["listeners[0].tls"]


@pytest.mark.parametrize("kind", ["listener", "dimse", "mllp"])
def test_cleartext_off_loopback_needs_tls_or_the_opt_in(tmp_path, pki, kind):
    if kind == "listener":
        path = lambda **extra: write_config(tmp_path, listener={"host": "0.0.0.0", **extra})
        key, fix = "listeners[0]", {"tls": server(pki)}
    else:
        base = DIMSE if kind == "dimse" else MLLP
        path = lambda **extra: write_config(tmp_path, destinations=[dict(base, host="10.1.2.3", **extra)],
                                            routes=[])
        key, fix = "destinations[0]", {"tls": {"ca_file": str(pki["ca.crt"])}}
    why = problems(path())[f"{key}.host"]
    assert "cleartext" in why and "tls" in why and f"{key}.allow_cleartext = true" in why
    load(path(**fix))
    load(path(allow_cleartext=True))
    both = problems(path(allow_cleartext=True, **fix))
    assert "does not apply" in both[f"{key}.allow_cleartext"]


def test_stow_tls_only_with_https(tmp_path, pki):
    url = "http://127.0.0.1:8042/dicom-web"
    found = problems(write_config(tmp_path, destinations=[
        {"name": "web", "kind": "stow", "url": url, "tls": {"ca_file": str(pki["ca.crt"])}}]))
    assert "https://" in found["destinations[0].tls"]
    https = "https://127.0.0.1:8043/dicom-web"
    found = problems(write_config(tmp_path, destinations=[
        {"name": "web", "kind": "stow", "url": https, "allow_cleartext": True}]))
    assert "does not apply" in found["destinations[0].allow_cleartext"]


# -- the policy ---------------------------------------------------------------------------


def test_policy_is_tls12_plus_with_aead_suites_only(pki):
    from types import SimpleNamespace

    listener = SimpleNamespace(cert_file=pki["server.crt"], key_file=pki["server.key"],
                               ca_file=pki["ca.crt"], require_client_cert=True)
    for ctx in (tls.server_context(listener), tls.client_context(None)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        suites = ctx.get_ciphers()
        assert suites and all(c["aead"] for c in suites), [c["name"] for c in suites if not c["aead"]]
        assert all(c["kea"] in ("kx-ecdhe", "kx-dhe", "kx-any") for c in suites)
    assert tls.server_context(listener).verify_mode == ssl.CERT_REQUIRED
    client = tls.client_context(None)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_identities_are_san_else_cn_lower_case():
    # With a subjectAltName the CN is not an identity (RFC 6125); see test_cert_binding.py.
    cert = {"subject": ((("commonName", "CT1.Example"),),),
            "subjectAltName": (("DNS", "CT1-alt.example"), ("IP Address", "10.0.0.7"), ("email", "x@y"))}
    assert tls.identities(cert) == {"ct1-alt.example", "10.0.0.7"}
    assert tls.identities({"subject": cert["subject"]}) == {"ct1.example"}
    assert tls.identities(None) == set()


@pytest.mark.parametrize("exc,persistence", [
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), contract.PERMANENT),
    (ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION]"), contract.TRANSIENT),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), contract.TRANSIENT),
    (ConnectionResetError(104, "reset"), contract.TRANSIENT),
    (TimeoutError("timed out"), contract.TRANSIENT),
])
def test_handshake_failures_are_classified(exc, persistence):
    outcome = contract.tls_failure(exc, "127.0.0.1:11113")
    assert outcome.persistence == persistence and outcome.scope == contract.DESTINATION
    assert "127.0.0.1:11113" in outcome.reason


def test_renewed_files_are_taken_at_the_next_connection(tmp_path, pki, caplog):
    import shutil
    from types import SimpleNamespace

    cert, key = tmp_path / "scp.crt", tmp_path / "scp.key"
    shutil.copy(pki["server.crt"], cert)
    shutil.copy(pki["server.key"], key)
    ctx = tls.Reloading(tls.server_context, SimpleNamespace(
        cert_file=cert, key_file=key, ca_file=None, require_client_cert=False))
    first = ctx.get()
    assert ctx.get() is first                            # unchanged files: the same context
    shutil.copy(pki["client.key"], key)                  # half renewed: key without its cert
    assert ctx.get() is first and "previous certificate files stay in use" in caplog.text
    shutil.copy(pki["client.crt"], cert)                 # renewal complete
    assert ctx.get() is not first

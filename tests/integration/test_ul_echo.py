"""C-ECHO and the context probe (``mfconsole echo`` / ``test``) through mfconsole's own
requestor, against real peers: DCMTK storescp (cleartext and TLS) and FaultSCP
(pynetdicom: called AE check, user identity); result fields and words asserted."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from harness import write_config
from peers import free_port
from test_ul_sender import fault_scp  # noqa: F401  (FaultSCP processes, stopped at teardown)
from tlsgen import make_pki

from mfconsole import egress, ops
from mfconsole.config import TLSConfig, load
from mfconsole.dimse import kind as dimse_kind
from mfconsole.dimse.sender import EXPLICIT_LE, IMPLICIT_LE, Peer
from mfconsole.ul import negotiation, pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FAST = {"connect_timeout_s": 2.0, "acse_timeout_s": 5.0, "dimse_timeout_s": 5.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def peer(port: int, **extra) -> Peer:
    return Peer("127.0.0.1", port, extra.pop("called_ae", "PACS"), **{**FAST, **extra})


def echo(p: Peer, check=None):
    return dimse_kind.echo(p, check)


def probe(p: Peer, pairs, check=None):
    return dimse_kind.probe_contexts(p, pairs, check)


def test_echo_and_probe_storescp(storescp_factory):
    scp = storescp_factory("+xi")   # implicit VR little endian only
    result = echo(peer(scp.port))
    assert result.ok and result.detail == "C-ECHO success"
    assert 0 < result.rtt_ms < 5000
    failure, rows = probe(peer(scp.port),
                          [(CT, EXPLICIT_LE), (CT, IMPLICIT_LE), (CT, JPEG_BASELINE), (CT, IMPLICIT_LE)])
    assert failure is None
    assert rows == [(CT, EXPLICIT_LE, False), (CT, IMPLICIT_LE, True), (CT, JPEG_BASELINE, False)]
    # No pairs at all: Verification alone is proposed, and the answer is empty.
    assert probe(peer(scp.port), []) == (None, [])


def test_nothing_listening():
    port = free_port()
    result = echo(peer(port))
    assert not result.ok and result.rtt_ms < 2000
    assert result.detail == (f"cannot connect to 127.0.0.1:{port}: connection refused (nothing "
                             "listens on that port, or a firewall rejects it)")
    failure, rows = probe(peer(port), [(CT, EXPLICIT_LE)])
    assert rows == [] and failure.reason == result.detail and failure.scope == "destination"


def test_called_ae_rejected(fault_scp):
    scp = fault_scp()
    assert echo(peer(scp.port)).ok
    result = echo(peer(scp.port, called_ae="WRONG"))
    assert not result.ok
    assert result.detail == ("association rejected (permanent): called AE title not recognized; "
                             "check the destination's AE titles and the peer's configuration")
    failure, rows = probe(peer(scp.port, called_ae="WRONG"), [(CT, EXPLICIT_LE)])
    assert rows == [] and failure.status == "A-ASSOCIATE-RJ 1/1/7" and failure.reason == result.detail
    assert [(a["called_ae"], a["result"], a["source"], a["reason"])
            for a in scp.associations() if a["event"] == "rejected"] == [("WRONG", 1, 1, 7)] * 2


def test_user_identity_and_passcode(fault_scp, tmp_path):
    scp = fault_scp("--require-user", "alice:s3cret")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("wrong\n")
    assert echo(peer(scp.port, username="alice", passcode_file=good)).ok
    result = echo(peer(scp.port, username="alice", passcode_file=bad))
    assert not result.ok and result.detail == ("association rejected: no reason given (pynetdicom "
                                               "uses this for failed user identity)")
    result = echo(peer(scp.port, username="alice", passcode_file=tmp_path / "gone"))
    assert result == type(result)(False, 0.0, "cannot read passcode_file: No such file or directory")
    checked = [(a["username"], a["user_id_type"], a["verified"])
               for a in scp.associations() if a["event"] == "user_id"]
    assert checked == [("alice", 2, True), ("alice", 2, False)]


def test_outside_egress_nothing_is_dialled():
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen(1)
        port = trap.getsockname()[1]
        check = lambda host, port, **kw: egress.check_tcp(["127.0.0.1:1"], egress.Pins(), host, port, **kw)
        result = echo(peer(port), check)
        assert result.ok is False and result.rtt_ms == 0.0
        assert result.detail.startswith(f"127.0.0.1:{port} ") and "not in [egress].allowed_tcp" in result.detail
        failure, rows = probe(peer(port), [(CT, EXPLICIT_LE)], check)
        assert rows == [] and failure.reason == result.detail
        trap.settimeout(0.3)
        with pytest.raises(socket.timeout):
            trap.accept()


class SilentPeer:
    """Takes the connection, reads the A-ASSOCIATE-RQ, and never answers (or, with
    ``hang_up``, closes the connection)."""

    def __init__(self, hang_up: bool = False):
        self.hang_up = hang_up
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[pdu.AssociateRQ] = []
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(conn)
            head = conn.recv(6, socket.MSG_WAITALL)
            body = conn.recv(int.from_bytes(head[2:6], "big"), socket.MSG_WAITALL)
            self.requests.append(pdu.decode_associate_rq(body))
            if self.hang_up:
                conn.close()

    def close(self) -> None:
        for s in (self.sock, *self._held):
            s.close()


def test_silent_peer_and_our_implementation_uid():
    silent = SilentPeer()
    try:
        result = echo(peer(silent.port, acse_timeout_s=0.5))
        assert not result.ok and 400 < result.rtt_ms < 3000
        assert result.detail == (f"127.0.0.1:{silent.port} did not answer the association "
                                 "request within acse_timeout_s=0.5")
        rq, = silent.requests
        assert (rq.called_ae, rq.calling_ae) == ("PACS", "MFCONSOLE")
        assert [c.abstract_syntax for c in rq.contexts] == ["1.2.840.10008.1.1"]
        # Our own upper layer presents its own implementation class UID.
        assert rq.implementation_class_uid == negotiation.IMPLEMENTATION_UID
    finally:
        silent.close()


def test_tls(storescp_factory, pki):
    def scp(cert: str):
        return storescp_factory("+tls", str(pki[f"{cert}.key"]), str(pki[f"{cert}.crt"]),
                                "+cf", str(pki["ca.crt"]), "-vc", name=cert)

    trusted = TLSConfig(ca_file=pki["ca.crt"])
    good, expired = scp("server"), scp("expired-server")
    result = echo(peer(good.port, tls=trusted))
    assert result.ok and result.detail == "C-ECHO success"
    failure, rows = probe(peer(good.port, tls=trusted), [(CT, EXPLICIT_LE)])
    assert failure is None and rows == [(CT, EXPLICIT_LE, True)]
    result = echo(peer(expired.port, tls=trusted))
    assert not result.ok and result.detail.startswith(f"the certificate of 127.0.0.1:{expired.port} "
                                                      "is not trusted (")
    assert "certificate has expired" in result.detail
    assert result.detail.endswith("check tls.ca_file and tls.server_name")
    # A CA file that cannot be read: said before anything is dialled.
    result = echo(peer(good.port, tls=replace(trusted, ca_file=pki["ca.crt"].parent / "nope")))
    assert result == type(result)(False, 0.0, "tls.ca_file: is not a usable PEM CA bundle "
                                  "(No such file or directory)")


def test_operator_commands_use_our_requestor(tmp_path):
    """ops.echo and ops.test (the CLI's, the console's) go through mfconsole's requestor,
    for a destination and for an AET@host:port target alike."""
    silent = SilentPeer(hang_up=True)
    try:
        config = load(write_config(tmp_path, destinations=[
            {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": silent.port,
             "ae_title": "PACS"}]))
        result = ops.echo(config, "pacs")
        assert result.detail == (f"127.0.0.1:{silent.port} closed the connection without answering "
                                 "the association request")
        report = ops.test(config, "pacs")
        assert report.rows == [] and report.failure == result.detail
        assert ops.echo(config, f"OTHER@127.0.0.1:{silent.port}").detail == result.detail
        ours = [rq.implementation_class_uid == negotiation.IMPLEMENTATION_UID for rq in silent.requests]
        assert ours == [True] * 3
    finally:
        silent.close()

"""mfconsole/ul's requestor side, checked against pynetdicom's PDU codec (an independent
implementation): the A-ASSOCIATE-RQ we write, the AC/RJ/ABORT we read, responses
matched by Message ID Being Responded To, and fragmentation within the peer's
maximum PDU length (over a socketpair)."""

from __future__ import annotations

import socket
import struct

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, AsynchronousOperationsWindowNegotiation,
                                       ImplementationClassUIDNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext

from mfconsole.dimse import cstore
from mfconsole.ul import dimse, pdu, requestor

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def test_rq_pynetdicom_reads():
    raw = pdu.encode_associate_rq(
        "PACS", "MFCONSOLE", [(1, CT, [EXPLICIT_LE]), (3, SR, [EXPLICIT_LE, IMPLICIT_LE])],
        max_length=16382, implementation_class_uid="1.2.3.4", implementation_version="MF_1",
        async_ops=(8, 1), user_identity=pdu.UserIdentity(2, False, b"alice", b"secret"))
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    prim = rq.to_primitive()
    assert (prim.called_ae_title, prim.calling_ae_title) == ("PACS", "MFCONSOLE")
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntax)
            for c in prim.presentation_context_definition_list] == [
        (1, CT, [EXPLICIT_LE]), (3, SR, [EXPLICIT_LE, IMPLICIT_LE])]
    items = {type(i).__name__: i for i in prim.user_information}
    assert items["MaximumLengthNotification"].maximum_length_received == 16382
    assert items["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4"
    win = items["AsynchronousOperationsWindowNegotiation"]
    assert (win.maximum_number_operations_invoked, win.maximum_number_operations_performed) == (8, 1)
    ident = items["UserIdentityNegotiation"]
    assert (ident.user_identity_type, ident.primary_field, ident.secondary_field) == (2, b"alice", b"secret")
    # ... and our own acceptor-side decoder agrees.
    ours = pdu.decode_associate_rq(raw[6:])
    assert ours.async_ops == (8, 1) and ours.user_identity == pdu.UserIdentity(2, False, b"alice", b"secret")


def pynetdicom_ac(results: list[tuple[int, int, str]], max_length: int, window: tuple[int, int] | None) -> bytes:
    p = A_ASSOCIATE()
    p.application_context_name = pdu.APPLICATION_CONTEXT
    p.calling_ae_title, p.called_ae_title = "MFCONSOLE", "PACS"
    p.result = 0
    contexts = []
    for cx_id, result, ts in results:
        c = PresentationContext()
        c.context_id, c.result = cx_id, result
        c.transfer_syntax = [ts]
        contexts.append(c)
    p.presentation_context_definition_results_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_length
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4"
    p.user_information = [ml, ic]
    if window is not None:
        w = AsynchronousOperationsWindowNegotiation()
        w.maximum_number_operations_invoked, w.maximum_number_operations_performed = window
        p.user_information.append(w)
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(p)
    return ac.encode()


def associated(max_length: int, window: tuple[int, int] | None, results=None):
    """An Association over a socketpair: (association, the peer's end)."""
    ours, theirs = socket.socketpair()
    raw = pynetdicom_ac(results or [(1, 0, EXPLICIT_LE), (3, 3, EXPLICIT_LE), (5, 0, IMPLICIT_LE)], max_length, window)
    theirs.sendall(raw)
    proposal = requestor.Proposal("PACS", "MFCONSOLE", [(CT, [EXPLICIT_LE]), (SR, [EXPLICIT_LE]),
                                                        (SR, [IMPLICIT_LE])], async_invoked=8)
    assoc = requestor.associate(ours, proposal, 5)
    return assoc, theirs


def read_pdus(sock: socket.socket, n: int) -> list[tuple[int, bytes]]:
    out, buf = [], b""
    sock.settimeout(5)
    while len(out) < n:
        while len(buf) < 6 or len(buf) < 6 + struct.unpack(">I", buf[2:6])[0]:
            buf += sock.recv(65536)
        length = struct.unpack(">I", buf[2:6])[0]
        out.append((buf[0], buf[6:6 + length]))
        buf = buf[6 + length:]
    return out


def test_ac_accepted_contexts_window_and_max_length():
    assoc, theirs = associated(4096, (4, 1))
    assert assoc.accepted == {(CT, EXPLICIT_LE): 1, (SR, IMPLICIT_LE): 5}
    assert (assoc.window, assoc.max_send) == (4, 4096)
    rq_type, _ = read_pdus(theirs, 1)[0]
    assert rq_type == pdu.ASSOCIATE_RQ
    assoc.close()
    theirs.close()


def test_no_window_answer_is_one_and_zero_is_ours():
    for window, expected in ((None, 1), ((0, 0), 8), ((1, 1), 1), ((64, 1), 8)):
        assoc, theirs = associated(16384, window)
        assert assoc.window == expected, window
        assoc.close()
        theirs.close()


def test_fragments_keep_to_the_peer_maximum_and_reassemble():
    assoc, theirs = associated(4096, None)
    read_pdus(theirs, 1)   # the RQ
    command = cstore.command_set(7, 0, CT, "1.2.3")
    data = bytes(range(256)) * 100     # 25600 bytes
    assoc.write_message(1, command, data, 5)
    # 1 command PDU, then ceil(25600 / 4090) data PDUs
    pdus = read_pdus(theirs, 1 + 7)
    assert all(t == pdu.P_DATA_TF and len(body) <= 4096 for t, body in pdus)
    pdvs = [p for _, body in pdus for p in pdu.decode_pdata(memoryview(body))]
    assert bytes(b"".join(bytes(f) for _, c, f in pdvs if c & 1)) == command
    assert bytes(b"".join(bytes(f) for _, c, f in pdvs if not c & 1)) == data
    assert [c for _, c, _ in pdvs] == [3] + [0] * 6 + [2]
    assoc.close()
    theirs.close()


def test_responses_are_read_by_message_id_even_two_in_one_pdu():
    assoc, theirs = associated(16384, (2, 1))
    read_pdus(theirs, 1)
    a = cstore.response_set(cstore.C_STORE_RSP, 2, CT, 0xB000, "1.2.3")
    b = cstore.response_set(cstore.C_STORE_RSP, 1, CT, 0x0000, "1.2.4")
    theirs.sendall(pdu.encode_pdata([(1, 3, a), (1, 3, b)]))
    first, second = assoc.read_response(5), assoc.read_response(5)
    assert (first.message_id, first.status, second.message_id, second.status) == (2, 0xB000, 1, 0)
    assert isinstance(first, dimse.Command)
    theirs.sendall(pdu.encode_abort(pdu.ABORT_PROVIDER))
    try:
        assoc.read_response(5)
        raise AssertionError("no Aborted")
    except requestor.Aborted:
        pass
    assoc.close()
    theirs.close()


def test_rejection_is_raised_with_its_triple():
    ours, theirs = socket.socketpair()
    theirs.sendall(pdu.encode_associate_rj(1, 1, 7))
    try:
        requestor.associate(ours, requestor.Proposal("PACS", "MF", [(CT, [EXPLICIT_LE])]), 5)
        raise AssertionError("no Rejected")
    except requestor.Rejected as rj:
        assert (rj.result, rj.source, rj.reason) == (1, 1, 7)
    theirs.close()


def test_release_collision_is_answered():
    assoc, theirs = associated(16384, None)
    read_pdus(theirs, 1)
    theirs.sendall(pdu.encode_release_rq() + pdu.encode_release_rp())   # crossing ours
    assoc.release(5)
    kinds = [t for t, _ in read_pdus(theirs, 2)]
    assert kinds == [pdu.RELEASE_RQ, pdu.RELEASE_RP]
    assert assoc.ended
    theirs.close()


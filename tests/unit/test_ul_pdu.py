"""mfconsole/ul's PDU codec and negotiation, checked against pynetdicom's own PDU
codec (an independent implementation): what pynetdicom encodes we decode, what we
encode pynetdicom decodes, and the listener's negotiation rules."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (A_ASSOCIATE, AsynchronousOperationsWindowNegotiation,
                                       ImplementationClassUIDNotification,
                                       MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation,
                                       SOPClassExtendedNegotiation, UserIdentityNegotiation)
from pynetdicom.presentation import PresentationContext

from mfconsole.config import ListenerConfig
from mfconsole.dimse import cstore
from mfconsole.ul import dimse, negotiation, pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PRIVATE = "1.3.12.2.1107.5.9.1"
EXPLICIT_LE, IMPLICIT_LE, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
JPEG2000 = "1.2.840.10008.1.2.4.91"


def cx(cx_id: int, abstract: str, *syntaxes: str) -> PresentationContext:
    c = PresentationContext()
    c.context_id = cx_id
    c.abstract_syntax = abstract
    c.transfer_syntax = list(syntaxes)
    return c


def pynetdicom_rq(contexts: list[PresentationContext], *, called: str = "MF_SCP",
                  calling: str = "CALLER", extra: list = ()) -> bytes:
    p = A_ASSOCIATE()
    p.application_context_name = pdu.APPLICATION_CONTEXT
    p.calling_ae_title, p.called_ae_title = calling, called
    p.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 4096
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4"
    p.user_information = [ml, ic, *extra]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(p)
    return rq.encode()


def listener(**kw) -> ListenerConfig:
    return ListenerConfig(name="l", ae_title="MF_SCP", host="127.0.0.1", port=1, **kw)


def test_decode_what_pynetdicom_encodes():
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CT, True, True
    ident = UserIdentityNegotiation()
    ident.user_identity_type, ident.primary_field, ident.secondary_field = 2, b"user", b"secret"
    ident.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    ext = SOPClassExtendedNegotiation()
    ext.sop_class_uid, ext.service_class_application_information = CT, b"\x01\x00"
    raw = pynetdicom_rq([cx(1, CT, EXPLICIT_LE, IMPLICIT_LE), cx(3, PRIVATE, EXPLICIT_LE)],
                        extra=[role, ident, window, ext])
    assert raw[0] == pdu.ASSOCIATE_RQ and struct.unpack(">I", raw[2:6])[0] == len(raw) - 6
    rq = pdu.decode_associate_rq(raw[6:])
    assert (rq.called_ae, rq.calling_ae, rq.application_context) == ("MF_SCP", "CALLER", pdu.APPLICATION_CONTEXT)
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, CT, [EXPLICIT_LE, IMPLICIT_LE]), (3, PRIVATE, [EXPLICIT_LE])]
    assert (rq.max_length, rq.implementation_class_uid) == (4096, "1.2.3.4")
    assert rq.roles == {CT: (1, 1)}
    assert rq.user_identity == pdu.UserIdentity(2, True, b"user", b"secret")
    assert rq.async_ops == (5, 5)
    assert [t for t, _ in rq.other_items] == [0x56]   # passed through, not answered


@pytest.mark.parametrize("cut", [10, 70, 80, -3])
def test_truncated_or_inconsistent_rq_is_a_pdu_error(cut):
    raw = pynetdicom_rq([cx(1, CT, EXPLICIT_LE)])
    with pytest.raises(pdu.PDUError):
        pdu.decode_associate_rq(raw[6:cut])


def test_negotiation_and_an_ac_pynetdicom_reads():
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CT, True, True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    contexts = [cx(1, CT, JPEG2000, EXPLICIT_LE), cx(3, PRIVATE, DEFLATED, IMPLICIT_LE),
                cx(5, FIND, EXPLICIT_LE), cx(7, CT, "1.2.3.999"),
                cx(9, negotiation.VERIFICATION, JPEG2000, IMPLICIT_LE)]
    rq = pdu.decode_associate_rq(pynetdicom_rq(contexts, extra=[role, window])[6:])
    decision = negotiation.negotiate(rq, listener(max_pdu_kb=64), associated=0)
    assert decision.reject is None
    # The requestor's order decides; Deflate only with accept_deflate.
    assert decision.accepted == {1: JPEG2000, 3: IMPLICIT_LE, 9: IMPLICIT_LE}
    ac = A_ASSOCIATE_AC()
    ac.decode(decision.ac)
    prim = ac.to_primitive()
    results = {c.context_id: (c.result, c.transfer_syntax[0] if c.transfer_syntax else None)
               for c in prim.presentation_context_definition_results_list}
    assert {k: v[0] for k, v in results.items()} == {1: 0, 3: 0, 5: 3, 7: 4, 9: 0}
    assert results[1][1] == JPEG2000
    assert prim.maximum_length_received == 64 * 1024
    assert prim.implementation_class_uid == negotiation.IMPLEMENTATION_UID
    items = {type(i).__name__: i for i in prim.user_information}
    version = items["ImplementationVersionNameNotification"].implementation_version_name
    assert version == negotiation.IMPLEMENTATION_VERSION
    roles = items["SCP_SCU_RoleSelectionNegotiation"]
    assert (roles.sop_class_uid, roles.scu_role, roles.scp_role) == (CT, True, False)
    win = items["AsynchronousOperationsWindowNegotiation"]
    assert (win.maximum_number_operations_invoked, win.maximum_number_operations_performed) == (1, 1)
    assert "SOPClassExtendedNegotiation" not in items

    with_deflate = negotiation.negotiate(rq, listener(accept_deflate=True), associated=0)
    assert with_deflate.accepted[3] == DEFLATED


@pytest.mark.parametrize("calling,called,associated,expected", [
    ("CALLER", "NOT_US", 0, (1, 1, 7)),
    ("STRANGER", "MF_SCP", 0, (1, 1, 3)),
    ("STRANGER", "NOT_US", 0, (1, 1, 7)),       # pynetdicom's precedence: the called title
    ("CALLER", "MF_SCP", 2, (2, 3, 2)),
    ("STRANGER", "NOT_US", 2, (2, 3, 2)),
])
def test_rejections_and_their_precedence(calling, called, associated, expected):
    rq = pdu.decode_associate_rq(pynetdicom_rq([cx(1, CT, EXPLICIT_LE)], calling=calling, called=called)[6:])
    decision = negotiation.negotiate(rq, listener(calling_aets=("CALLER",), max_associations=2),
                                     associated=associated)
    assert decision.reject == expected
    assert decision.reason == negotiation.RJ_REASONS[expected]
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdu.encode_associate_rj(*expected))
    assert (rj.result, rj.source, rj.reason_diagnostic) == expected


def test_user_identity_hook():
    ident = UserIdentityNegotiation()
    ident.user_identity_type, ident.primary_field = 1, b"alice"
    ident.positive_response_requested = True
    rq = pdu.decode_associate_rq(pynetdicom_rq([cx(1, CT, EXPLICIT_LE)], extra=[ident])[6:])
    assert negotiation.negotiate(rq, listener(), 0).reject is None   # no hook: ignored
    seen = []

    def hook(identity, calling):
        seen.append((identity.primary, calling))
        return identity.primary == b"alice", b"welcome"
    decision = negotiation.negotiate(rq, listener(), 0, hook)
    assert seen == [(b"alice", "CALLER")] and decision.reject is None
    prim = A_ASSOCIATE_AC()
    prim.decode(decision.ac)
    [rsp] = [i for i in prim.to_primitive().user_information
             if type(i).__name__ == "UserIdentityNegotiation"]
    assert rsp.server_response == b"welcome"
    refused = negotiation.negotiate(rq, listener(), 0, lambda i, c: (False, None))
    assert refused.reject == (2, 2, 1)


def test_pdata_abort_and_command_sets_against_pynetdicom():
    # A C-STORE-RQ command set as pynetdicom encodes it.
    prim = C_STORE()
    prim.MessageID, prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID = 7, CT, "1.2.3.4.5"
    prim.Priority = 2
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdata = list(msg.encode_msg(1, 16384))[0]
    raw = P_DATA_TF()
    raw.from_primitive(pdata)
    encoded = raw.encode()
    [(cx_id, control, fragment)] = pdu.decode_pdata(memoryview(encoded[6:]))
    assert (cx_id, control) == (1, 0x03)
    command = dimse.decode_command(bytes(fragment))
    assert (command.command_field, command.message_id, command.sop_class_uid,
            command.sop_instance_uid, command.priority) == (dimse.C_STORE_RQ, 7, CT, "1.2.3.4.5", 2)
    assert command.has_data_set is False   # no data set attached to this primitive

    # Our response, read back by pynetdicom's P-DATA decoder.
    rsp = cstore.response_set(cstore.C_STORE_RSP, 7, CT, 0xA900, "1.2.3.4.5")
    back = P_DATA_TF()
    back.decode(pdu.encode_pdata([(1, 0x03, rsp)]))
    [(cx_back, value)] = back.to_primitive().presentation_data_value_list
    assert cx_back == 1 and value == b"\x03" + rsp
    fields = dimse.decode_command(rsp)
    assert (fields.command_field, fields.has_data_set) == (cstore.C_STORE_RSP, False)

    abort = A_ABORT_RQ()
    abort.decode(pdu.encode_abort(pdu.ABORT_PROVIDER, pdu.UNEXPECTED_PDU))
    assert (abort.source, abort.reason_diagnostic) == (2, 2)


@pytest.mark.parametrize("raw", [b"\x00\x00\x00\x05\x01", b"\x00\x00\x00\x01\x01\x03",
                                 b"\x00\x00\x00\x09\x01\x03abc"])
def test_malformed_pdvs(raw):
    with pytest.raises(pdu.PDUError):
        pdu.decode_pdata(memoryview(raw))


@pytest.mark.parametrize("raw", [b"\x00\x00\x00\x01\x02\x00\x00\x00\x01",   # wrong group
                                 b"\x00\x00\x00\x01\x02\x00",               # truncated
                                 b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00"])   # no Message ID
def test_malformed_command_sets(raw):
    with pytest.raises(dimse.CommandError):
        dimse.decode_command(raw)


def test_the_retired_upper_layer_key_says_why(tmp_path):
    """``upper_layer`` chose pynetdicom in earlier versions: on a listener or a dimse
    destination it is refused with what to do, not as an unknown key."""
    from harness import write_config

    from mfconsole.config import ConfigError, load

    with pytest.raises(ConfigError) as bad:
        load(write_config(tmp_path / "a", listener={"upper_layer": "pynetdicom"}, destinations=[
            {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS",
             "upper_layer": "mfconsole"}]))
    why = dict(bad.value.problems)
    for key in ("listeners[0].upper_layer", "destinations[0].upper_layer"):
        assert "delete this key" in why[key] and "pynetdicom upper layer was removed" in why[key], why


def test_calling_ae_bound_to_the_client_certificate_comes_first():
    """tls.client_cert_aets: a title the certificate is not bound to is 1/1/3 before
    anything else; an empty set binds nothing."""
    rq = pdu.decode_associate_rq(pynetdicom_rq([cx(1, CT, EXPLICIT_LE)], calling="CALLER",
                                               called="NOT_US")[6:])
    cfg = listener(max_associations=1)
    bound = negotiation.negotiate(rq, cfg, 5, None, frozenset({"OTHER"}), "ct1.test")
    assert bound.reject == (1, 1, 3) and "ct1.test" in bound.reason and "client_cert_aets" in bound.reason
    assert negotiation.negotiate(rq, cfg, 5, None, frozenset(), "names unreadable").reject == (1, 1, 3)
    assert negotiation.negotiate(rq, cfg, 5, None, frozenset({"CALLER"})).reject == (2, 3, 2)
    assert negotiation.negotiate(rq, cfg, 5).reject == (2, 3, 2)   # not bound: as before

"""The PDUs of an association acceptor (PS3.8 9.3), read and written by hand.

Decoding is strict: every length is checked against the bytes that hold it, and a
PDU that does not add up raises PDUError (the acceptor answers A-ABORT). Items we
do not act on (SOP Class (Common) Extended Negotiation, unknown user information
sub-items) are kept as raw bytes and never answered: omitting a reply is how an
acceptor declines them. Lengths of whole PDUs are bounded by the reader
(acceptor.py) before a body is read, never here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset(range(1, 8))
PDU_NAMES = {ASSOCIATE_RQ: "A-ASSOCIATE-RQ", ASSOCIATE_AC: "A-ASSOCIATE-AC", ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
             P_DATA_TF: "P-DATA-TF", RELEASE_RQ: "A-RELEASE-RQ", RELEASE_RP: "A-RELEASE-RP",
             ABORT: "A-ABORT"}

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE, USER_REJECTION, NO_REASON = 0, 1, 2
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 3, 4

# A-ABORT source and reasons (PS3.8 9.3.8): source 0 = service user, 2 = provider.
ABORT_USER, ABORT_PROVIDER = 0, 2
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU = 0, 1, 2
UNRECOGNIZED_PARAMETER, UNEXPECTED_PARAMETER, INVALID_PARAMETER = 4, 5, 6

HEADER = struct.Struct(">BBI")


class PDUError(ValueError):
    """A PDU that is not well formed; ``reason`` is the A-ABORT reason to send."""

    def __init__(self, message: str, reason: int = INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclass
class PresentationContextRQ:
    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class UserIdentity:
    type: int                      # 1 username, 2 username+passcode, 3 Kerberos, 4 SAML, 5 JWT
    positive_response_requested: bool
    primary: bytes
    secondary: bytes


@dataclass
class AssociateRQ:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[PresentationContextRQ] = field(default_factory=list)
    max_length: int = 0                       # the requestor's: what we may send (0: no limit)
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_ops: tuple[int, int] | None = None  # (invoked, performed)
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)   # SOP class -> (SCU, SCP)
    user_identity: UserIdentity | None = None
    # Extended negotiation and unknown sub-items, as (item type, raw value): declined
    # by not answering them.
    other_items: list[tuple[int, bytes]] = field(default_factory=list)


def _text(raw: bytes) -> str:
    # AE titles and UIDs: ASCII, padded with spaces (AE) or a trailing NUL (UID).
    return raw.decode("ascii", "replace").strip("\0 ")


def _items(body: bytes | memoryview, start: int, end: int, long_length: bool = False):
    """(item type, value) for each item in body[start:end]: 1 type byte, 1 reserved,
    then a 2-byte length (4 for PDVs, ``long_length``)."""
    pos = start
    hdr = 6 if long_length else 4
    while pos < end:
        if pos + hdr > end:
            raise PDUError(f"item header truncated at offset {pos}")
        item_type = body[pos]
        length = (struct.unpack_from(">I", body, pos + 2)[0] if long_length
                  else struct.unpack_from(">H", body, pos + 2)[0])
        value_start = pos + hdr
        if value_start + length > end:
            raise PDUError(f"item 0x{item_type:02X} declares {length} bytes, {end - value_start} left")
        yield item_type, bytes(body[value_start:value_start + length])
        pos = value_start + length


def decode_associate_rq(body: bytes) -> AssociateRQ:
    """The body of an A-ASSOCIATE-RQ (everything after its 6-byte header)."""
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = struct.unpack_from(">H", body, 0)[0]
    rq = AssociateRQ(protocol_version=version, called_ae=_text(body[4:20]),
                     calling_ae=_text(body[20:36]))
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x10:
            rq.application_context = _text(value)
        elif item_type == 0x20:
            rq.contexts.append(_presentation_context(value))
        elif item_type == 0x50:
            _user_information(rq, value)
        else:
            raise PDUError(f"unknown item 0x{item_type:02X} in A-ASSOCIATE-RQ", UNRECOGNIZED_PARAMETER)
    if not rq.application_context:
        raise PDUError("A-ASSOCIATE-RQ without an application context item")
    return rq


def _presentation_context(value: bytes) -> PresentationContextRQ:
    if len(value) < 4:
        raise PDUError("presentation context item truncated")
    cx = PresentationContextRQ(id=value[0], abstract_syntax="", transfer_syntaxes=[])
    for sub_type, sub in _items(value, 4, len(value)):
        if sub_type == 0x30:
            cx.abstract_syntax = _text(sub)
        elif sub_type == 0x40:
            cx.transfer_syntaxes.append(_text(sub))
        else:
            raise PDUError(f"unknown sub-item 0x{sub_type:02X} in a presentation context",
                           UNRECOGNIZED_PARAMETER)
    return cx


def _user_information(rq: AssociateRQ, value: bytes) -> None:
    for sub_type, sub in _items(value, 0, len(value)):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise PDUError("maximum length sub-item is not 4 bytes")
            rq.max_length = struct.unpack(">I", sub)[0]
        elif sub_type == 0x52:
            rq.implementation_class_uid = _text(sub)
        elif sub_type == 0x55:
            rq.implementation_version = _text(sub)
        elif sub_type == 0x53:
            if len(sub) != 4:
                raise PDUError("asynchronous operations window sub-item is not 4 bytes")
            rq.async_ops = struct.unpack(">HH", sub)
        elif sub_type == 0x54:
            if len(sub) < 4:
                raise PDUError("role selection sub-item truncated")
            n = struct.unpack_from(">H", sub, 0)[0]
            if 2 + n + 2 != len(sub):
                raise PDUError("role selection sub-item length does not add up")
            rq.roles[_text(sub[2:2 + n])] = (sub[2 + n], sub[3 + n])
        elif sub_type == 0x58:
            rq.user_identity = _user_identity(sub)
        else:
            rq.other_items.append((sub_type, sub))


def _user_identity(sub: bytes) -> UserIdentity:
    try:
        kind, positive = sub[0], sub[1]
        n = struct.unpack_from(">H", sub, 2)[0]
        primary = sub[4:4 + n]
        m = struct.unpack_from(">H", sub, 4 + n)[0]
        secondary = sub[6 + n:6 + n + m]
    except (IndexError, struct.error):
        raise PDUError("user identity sub-item truncated") from None
    if 6 + n + m != len(sub) or len(primary) != n:
        raise PDUError("user identity sub-item length does not add up")
    return UserIdentity(kind, bool(positive), bytes(primary), bytes(secondary))


# -- encoding ---------------------------------------------------------------------

def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return HEADER.pack(pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def encode_associate_ac(rq: AssociateRQ, results: list[tuple[int, int, str]], *, max_length: int,
                        implementation_class_uid: str, implementation_version: str,
                        roles: dict[str, tuple[int, int]] | None = None,
                        async_ops: tuple[int, int] | None = None,
                        user_identity_response: bytes | None = None) -> bytes:
    """``results``: (context id, result, transfer syntax) for each proposed context.
    Called and calling AE titles are echoed from the request (PS3.8 9.3.3: "shall
    be the same as ... in the A-ASSOCIATE-RQ", not tested by the requestor)."""
    fixed = (struct.pack(">HH", 1, 0) + _ae(rq.called_ae) + _ae(rq.calling_ae) + b"\0" * 32)
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cx_id, result, ts in results:
        # A rejected context still carries a transfer syntax sub-item; its value is
        # not significant (PS3.8 9.3.3.2), an empty one is what DCMTK sends too.
        ts_item = _item(0x40, ts.encode() if result == ACCEPTANCE else b"")
        items.append(_item(0x21, bytes((cx_id, 0, result, 0)) + ts_item))
    user = [_item(0x51, struct.pack(">I", max_length)),
            _item(0x52, implementation_class_uid.encode())]
    if async_ops is not None:
        user.append(_item(0x53, struct.pack(">HH", *async_ops)))
    for uid, (scu, scp) in (roles or {}).items():
        raw = uid.encode()
        user.append(_item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp))))
    if implementation_version:
        user.append(_item(0x55, implementation_version.encode()[:16]))
    if user_identity_response is not None:
        user.append(_item(0x59, struct.pack(">H", len(user_identity_response))
                          + user_identity_response))
    items.append(_item(0x50, b"".join(user)))
    return _pdu(ASSOCIATE_AC, fixed + b"".join(items))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


def encode_release_rq() -> bytes:
    return _pdu(RELEASE_RQ, b"\0" * 4)


def encode_release_rp() -> bytes:
    return _pdu(RELEASE_RP, b"\0" * 4)


def encode_abort(source: int = ABORT_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return _pdu(ABORT, bytes((0, 0, source, reason)))


def encode_pdata(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """One P-DATA-TF of (context id, message control header, fragment) PDVs."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cx_id, control) + data
                    for cx_id, control, data in pdvs)
    return _pdu(P_DATA_TF, body)


def decode_pdata(body: memoryview) -> list[tuple[int, int, memoryview]]:
    """The PDVs of a P-DATA-TF body: (context id, control header, fragment view)."""
    out = []
    pos, end = 0, len(body)
    while pos < end:
        if pos + 6 > end:
            raise PDUError("PDV header truncated")
        length = struct.unpack_from(">I", body, pos)[0]
        if length < 2 or pos + 4 + length > end:
            raise PDUError(f"PDV declares {length} bytes, {end - pos - 4} left")
        out.append((body[pos + 4], body[pos + 5], body[pos + 6:pos + 4 + length]))
        pos += 4 + length
    if not out:
        raise PDUError("P-DATA-TF without a PDV")
    return out


# -- requestor side (mfconsole/ul/requestor.py) ----------------------------------

def encode_associate_rq(called_ae: str, calling_ae: str,
                        contexts: list[tuple[int, str, list[str]]], *, max_length: int,
                        implementation_class_uid: str, implementation_version: str,
                        async_ops: tuple[int, int] | None = None,
                        user_identity: UserIdentity | None = None,
                        roles: dict[str, tuple[int, int]] | None = None) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts``: (context id, abstract syntax,
    transfer syntaxes); ``roles``: SCP/SCU role selection items, SOP class -> (SCU
    role, SCP role) of the requestor (PS3.7 D.3.3.4)."""
    fixed = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + b"\0" * 32
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cx_id, abstract, syntaxes in contexts:
        subs = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items.append(_item(0x20, bytes((cx_id, 0, 0, 0)) + subs))
    user = [_item(0x51, struct.pack(">I", max_length)),
            _item(0x52, implementation_class_uid.encode())]
    if async_ops is not None:
        user.append(_item(0x53, struct.pack(">HH", *async_ops)))
    for uid, (scu, scp) in (roles or {}).items():
        raw = uid.encode()
        user.append(_item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp))))
    if implementation_version:
        user.append(_item(0x55, implementation_version.encode()[:16]))
    if user_identity is not None:
        u = user_identity
        user.append(_item(0x58, bytes((u.type, int(u.positive_response_requested)))
                          + struct.pack(">H", len(u.primary)) + u.primary
                          + struct.pack(">H", len(u.secondary)) + u.secondary))
    items.append(_item(0x50, b"".join(user)))
    return _pdu(ASSOCIATE_RQ, fixed + b"".join(items))


@dataclass
class AssociateAC:
    # context id -> (result, transfer syntax); the syntax is significant only when accepted
    results: dict[int, tuple[int, str]] = field(default_factory=dict)
    max_length: int = 0                       # the acceptor's: what we may send (0: no limit)
    implementation_class_uid: str = ""
    async_ops: tuple[int, int] | None = None  # None: the acceptor did not answer the item
    user_identity_response: bytes | None = None


def decode_associate_ac(body: bytes) -> AssociateAC:
    """The body of an A-ASSOCIATE-AC. Items we do not act on (role selection,
    extended negotiation) are skipped: we proposed none of them."""
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE-AC shorter than its fixed fields")
    ac = AssociateAC()
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x21:
            if len(value) < 4:
                raise PDUError("presentation context item truncated")
            ts = ""
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x40:
                    ts = _text(sub)
            ac.results[value[0]] = (value[2], ts)
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub) == 4:
                    ac.max_length = struct.unpack(">I", sub)[0]
                elif sub_type == 0x52:
                    ac.implementation_class_uid = _text(sub)
                elif sub_type == 0x53 and len(sub) == 4:
                    ac.async_ops = struct.unpack(">HH", sub)
                elif sub_type == 0x59 and len(sub) >= 2:
                    ac.user_identity_response = bytes(sub[2:])
    return ac


def decode_associate_rj(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ."""
    if len(body) < 4:
        raise PDUError("A-ASSOCIATE-RJ truncated")
    return body[1], body[2], body[3]


def decode_abort(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT."""
    if len(body) < 4:
        raise PDUError("A-ABORT truncated")
    return body[2], body[3]


def pdata_header(length: int) -> bytes:
    """The 6-byte header of a P-DATA-TF whose body is ``length`` bytes (the requestor
    writes PDV bytes after it without joining them into one PDU first)."""
    return HEADER.pack(P_DATA_TF, 0, length)

"""DIMSE command sets encoded by hand: C-STORE-RQ, C-ECHO-RQ and the responses.

A command set is a handful of fixed elements (PS3.7 9.3.1.1), always implicit VR
little endian (PS3.7 6.3.1): writing them directly costs microseconds, where building
a pydicom Dataset and encoding it twice (once to learn the group length) cost a third
of a sender's CPU for small objects. The data set travels as the bytes we hold.
"""

from __future__ import annotations

import struct

C_STORE_RQ = 0x0001
DATA_SET_PRESENT = 0x0001      # CommandDataSetType as pynetdicom sends it (anything but 0x0101)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def command_set(message_id: int, priority: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),                # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", C_STORE_RQ)),      # Command Field
        _element(0x0110, struct.pack("<H", message_id)),      # Message ID
        _element(0x0700, struct.pack("<H", priority)),        # Priority
        _element(0x0800, struct.pack("<H", DATA_SET_PRESENT)),
        _element(0x1000, _uid(sop_instance_uid)),             # Affected SOP Instance UID
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body   # Command Group Length


# A C-ECHO-RQ (PS3.7 9.3.5.1): mfconsole's own requestor (mfconsole/ul/echo.py) sends it.
C_ECHO_RQ = 0x0030
VERIFICATION_CLASS = "1.2.840.10008.1.1"


def echo_set(message_id: int) -> bytes:
    body = b"".join((
        _element(0x0002, _uid(VERIFICATION_CLASS)),                 # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", C_ECHO_RQ)),       # Command Field
        _element(0x0110, struct.pack("<H", message_id)),      # Message ID
        _element(0x0800, struct.pack("<H", 0x0101)),          # no data set
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


# Responses (PS3.7 9.3.1.2, 9.3.5.2): no data set; the acceptor of mfconsole's own
# upper layer (mfconsole/ul) writes them with these bytes.
C_STORE_RSP, C_ECHO_RSP = 0x8001, 0x8030
NO_DATA_SET = 0x0101


def response_set(command_field: int, message_id: int, sop_class_uid: str, status: int,
                 sop_instance_uid: str | None = None) -> bytes:
    """The command set of a response to ``message_id``: Affected SOP Class UID,
    Command Field, Message ID Being Responded To, no data set, Status, and the
    Affected SOP Instance UID when given (C-STORE-RSP)."""
    parts = [
        _element(0x0002, _uid(sop_class_uid)),
        _element(0x0100, struct.pack("<H", command_field)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid is not None:
        parts.append(_element(0x1000, _uid(sop_instance_uid)))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body

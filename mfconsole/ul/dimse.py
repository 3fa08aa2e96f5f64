"""DIMSE command sets, read by hand: always implicit VR little endian, group 0000
only (PS3.7 6.3.1, E.1). An SCP of Storage and Verification needs six fields of a
request; everything else in the set is skipped. The requestor (requestor.py)
reads C-STORE responses with the same function (Status, Message ID Being Responded To). Responses are written by
mfconsole/dimse/cstore.py (``response_set``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
N_EVENT_REPORT_RQ, N_ACTION_RQ = 0x0100, 0x0130
NO_DATA_SET = 0x0101
# A command set is a few hundred bytes; anything much larger is not one.
MAX_COMMAND_SET = 64 * 1024
_ELEMENT = struct.Struct("<HHI")


class CommandError(ValueError):
    """Not a command set we can read (the association is aborted)."""


@dataclass
class Command:
    command_field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    priority: int = 0
    status: int | None = None      # (0000,0900) of a response; None in a request
    # DIMSE-N (Storage Commitment, mfconsole/dimse/commitment.py): Event Type ID of an
    # N-EVENT-REPORT, Action Type ID of an N-ACTION; Requested SOP Class/Instance UID.
    event_type: int | None = None
    action_type: int | None = None
    requested_sop_class_uid: str = ""
    requested_sop_instance_uid: str = ""


def _uid(value: bytes) -> str:
    return value.decode("ascii", "replace").strip("\0 ")


def _us(value: bytes, name: str) -> int:
    if len(value) != 2:
        raise CommandError(f"{name} is {len(value)} bytes, not 2")
    return struct.unpack("<H", value)[0]


def decode_command(raw: bytes | bytearray) -> Command:
    found: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 8 > end:
            raise CommandError("command element header truncated")
        group, element, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside group 0000")
        if length > end - pos:
            raise CommandError(f"command element (0000,{element:04X}) declares {length} bytes")
        found[element] = bytes(raw[pos:pos + length])
        pos += length
    if 0x0100 not in found:
        raise CommandError("no Command Field")
    field = _us(found[0x0100], "Command Field")
    # Requests carry a Message ID; C-CANCEL and responses the one they refer to.
    which = 0x0110 if 0x0110 in found else 0x0120
    if which not in found:
        raise CommandError("no Message ID")
    message_id = _us(found[which], "Message ID")
    data_type = _us(found[0x0800], "Command Data Set Type") if 0x0800 in found else NO_DATA_SET
    return Command(
        command_field=field, message_id=message_id, has_data_set=data_type != NO_DATA_SET,
        sop_class_uid=_uid(found.get(0x0002, b"")),
        sop_instance_uid=_uid(found.get(0x1000, b"")),
        priority=_us(found[0x0700], "Priority") if 0x0700 in found else 0,
        status=_us(found[0x0900], "Status") if 0x0900 in found else None,
        event_type=_us(found[0x1002], "Event Type ID") if 0x1002 in found else None,
        action_type=_us(found[0x1008], "Action Type ID") if 0x1008 in found else None,
        requested_sop_class_uid=_uid(found.get(0x0003, b"")),
        requested_sop_instance_uid=_uid(found.get(0x1001, b"")))

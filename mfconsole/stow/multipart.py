"""The STOW-RS request body: ``multipart/related; type="application/dicom"``, one part
per instance, each a DICOM Part 10 file (PS3.10 7.1) around the data set bytes we
stored, unchanged.

The body is a list of chunks: the stored bytes are not copied into one big buffer
(a 1 GiB object must not cost 2 GiB).
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from mfconsole import IMPLEMENTATION_CLASS_UID, __version__
from mfconsole.contract import Outbound

PART_TYPE = "application/dicom"
IMPLEMENTATION_VERSION = f"MFCONSOLE_{__version__}"[:16]


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (file meta is always that encoding)."""
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _sh(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def part10_header(obj: Outbound) -> bytes:
    """Preamble, "DICM" and the group 0002 file meta information of ``obj``: its SOP
    class and instance, and the transfer syntax its data set bytes are in."""
    meta = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _ui(obj.sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _ui(obj.sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _ui(obj.transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _sh(IMPLEMENTATION_VERSION)),
    ))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta)))
    return b"\0" * 128 + b"DICM" + group_length + meta


@dataclass(frozen=True)
class Body:
    chunks: list[bytes]
    content_type: str

    @property
    def length(self) -> int:
        return sum(len(c) for c in self.chunks)


def fresh_boundary(parts: list[bytes]) -> str:
    """A random boundary that occurs in none of ``parts`` (RFC 2046 5.1.1: the
    boundary must not appear inside an encapsulated part)."""
    while True:
        boundary = f"mfconsole-{secrets.token_hex(16)}"
        marker = boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary


def build(objs: list[Outbound]) -> Body:
    headers = [part10_header(obj) for obj in objs]
    boundary = fresh_boundary(headers + [obj.data for obj in objs])
    delimiter = f"--{boundary}\r\nContent-Type: {PART_TYPE}\r\n\r\n".encode("ascii")
    chunks: list[bytes] = []
    for header, obj in zip(headers, objs):
        chunks += [delimiter, header, obj.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return Body(chunks, f'multipart/related; type="{PART_TYPE}"; boundary={boundary}')

"""Odd-length data sets on the way out.

DICOM requires every value, and so every data set, to have an even length (PS3.5
7.1.1). Some modalities still write an odd-length last element (typically 8-bit
Pixel Data of odd size, or a text value without its padding space). mfconsole stores
such an object as received; a strict peer (DCMTK: "Odd Fragment Length") aborts the
association when it arrives. So before a C-STORE an odd-length data set is padded the
way the standard prescribes: one byte appended to its last element (a space for text
VRs, NUL otherwise) and that element's length raised by one; a deflated data set gets
one trailing NUL after its stream. The stored object is
unchanged. A data set whose odd length is not in a defined-length last element (an
odd fragment inside encapsulated pixel data) cannot be padded safely; the caller
dead-letters it with that reason rather than let it abort the association again and
again.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.filereader import data_element_generator
from pydicom.uid import UID

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UR", "UT"})
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                              "UT", "UV"})
_UNDEFINED = 0xFFFFFFFF


def even_length(data: bytes, transfer_syntax: str) -> tuple[bytes | None, int]:
    """(bytes to send, 0) for an even-length data set; (padded bytes, original length)
    when the last element could be padded; (None, original length) when it cannot."""
    if len(data) % 2 == 0:
        return data, 0
    try:
        ts = UID(transfer_syntax)
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except (AttributeError, ValueError):   # a private syntax: we cannot tell the encoding
        return None, len(data)
    if ts.is_deflated:
        # A deflated data set is a zlib stream, not elements: PS3.5 A.5 pads an odd
        # stream with one trailing NUL, which inflating ignores.
        return data + b"\0", len(data)
    last = None
    try:
        for element in data_element_generator(BytesIO(data), implicit, little, defer_size=64):
            last = element
    except Exception:   # malformed past what the listener checked: leave it to the caller
        return None, len(data)
    if last is None or last.length == _UNDEFINED or last.value_tell + last.length != len(data):
        return None, len(data)
    vr = last.VR
    if vr is None or implicit:
        try:
            vr = dictionary_VR(last.tag)
        except KeyError:
            vr = "UN"
    vr = vr.split(" or ")[0]
    endian = "<" if little else ">"
    if implicit or vr in _LONG_LENGTH_VRS:
        at, fmt = last.value_tell - 4, endian + "L"
    else:
        at, fmt = last.value_tell - 2, endian + "H"
        if last.length + 1 > 0xFFFF:
            return None, len(data)
    pad = b" " if vr in _TEXT_VRS else b"\x00"
    out = bytearray(data)
    struct.pack_into(fmt, out, at, last.length + 1)
    out += pad
    return bytes(out), len(data)


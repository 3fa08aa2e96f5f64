"""The top-level elements of an encoded data set as byte spans, and the same data set
with some of them replaced, added or removed and every other byte as it was.

What changes an outgoing copy's header (a handler's data set, coercion) goes through
here: the header is everything before the first top-level element at or after
(7FE0,0008) (Float Pixel Data, Double Float Pixel Data, Pixel Data and whatever
follows them, trailing padding included), and that tail is appended untouched, so
pixel bytes are never decoded, re-encoded or even copied element by element.

Only the standard library: values are never decoded here (the callers do, with
pydicom, for the few elements they change). Errors name offsets and tags, never a
value: any byte may be patient data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
PIXELS_FROM = 0x7FE00008
UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 64                          # nested sequences walked over
MAX_INFLATED = 1 << 30                  # a deflated object inflated to at most this
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
SHORT_VRS = frozenset({"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN",
                       "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"})


class HeaderError(ValueError):
    """The bytes are not a data set this module can walk (the message names offsets
    and tags only)."""


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Syntax:
    """How a transfer syntax encodes the data set: implicit or explicit VR, byte order,
    deflated. A syntax this module does not know is explicit VR little endian, as every
    known one but three is (the compressed ones included)."""
    implicit: bool = False
    little: bool = True
    deflated: bool = False

    @classmethod
    def of(cls, transfer_syntax: str) -> "Syntax":
        ts = str(transfer_syntax).rstrip("\x00 ")
        return cls(implicit=ts == IMPLICIT_LE, little=ts != EXPLICIT_BE, deflated=ts == DEFLATED)

    @property
    def endian(self) -> str:
        return "<" if self.little else ">"


@dataclass(frozen=True)
class Element:
    tag: int
    vr: str | None        # as written (explicit VR), None in implicit VR
    start: int            # offset of its tag
    value: int            # offset of its value
    length: int           # its value length, UNDEFINED when undefined
    end: int              # offset after it (after its delimiter when undefined)


@dataclass(frozen=True)
class Header:
    """The top-level elements before the tail (``data[end:]``) of a data set: ``data``
    is the data set as walked (inflated when its syntax is deflated)."""
    data: bytes
    syntax: Syntax
    elements: tuple[Element, ...]
    end: int

    def find(self, tag: int) -> Element | None:
        for element in self.elements:
            if element.tag == tag:
                return element
        return None

    def value(self, element: Element) -> bytes:
        if element.length == UNDEFINED:
            raise HeaderError(f"{tag_text(element.tag)} has an undefined length")
        return self.data[element.value:element.value + element.length]


def parse(data: bytes | bytearray | memoryview, transfer_syntax: str) -> Header:
    """Walk the top-level elements of a data set (no preamble, no file meta)."""
    syntax = Syntax.of(transfer_syntax)
    raw = bytes(data)
    if syntax.deflated:
        raw = inflate(raw)
    elements: list[Element] = []
    pos, n = 0, len(raw)
    while pos < n:
        tag, vr, value, length = _element_at(raw, pos, syntax.implicit, syntax.little)
        if tag >= PIXELS_FROM:
            break
        if length == UNDEFINED:
            if syntax.implicit or vr in ("SQ", "UN", "OB", "OW"):
                # The contents of a UN of undefined length are implicit VR little endian
                # (PS3.5 6.2.2), whatever the transfer syntax.
                un = vr == "UN"
                end = _after_undefined(raw, value, syntax.implicit or un, syntax.little or un, 1)
            else:
                raise HeaderError(f"{tag_text(tag)} at offset {pos} has an undefined length "
                                  f"with VR {vr}")
        else:
            end = value + length
            if end > n:
                raise HeaderError(f"{tag_text(tag)} at offset {pos} is longer than the data set")
        elements.append(Element(tag, vr, pos, value, length, end))
        pos = end
    return Header(raw, syntax, tuple(elements), min(pos, n))


def header_end(data: bytes | bytearray | memoryview, transfer_syntax: str) -> int:
    """Where the tail (pixel data and what follows) starts, for a syntax that is not
    deflated (the offset is then one in ``data``)."""
    if Syntax.of(transfer_syntax).deflated:
        raise HeaderError("a deflated data set has no tail in its own bytes: parse() it")
    return parse(data, transfer_syntax).end


def rebuild(header: Header, changes: dict[int, bytes | None]) -> bytes:
    """The data set with ``changes`` made: tag → its whole encoded element (tag, VR,
    length, value) to put in place of the one there or, absent, at its place in tag
    order; None to remove it. Every other byte is as it was, the tail included. A group
    length element (gggg,0000) of a group whose length changed is updated. Deflated
    syntaxes are deflated again."""
    pieces: list[tuple[int, bytes | memoryview]] = []
    view = memoryview(header.data)
    present = {element.tag for element in header.elements}
    new = sorted(t for t, encoded in changes.items() if t not in present and encoded is not None)
    for element in header.elements:
        while new and new[0] < element.tag:      # before the first one with a greater tag
            tag = new.pop(0)
            pieces.append((tag, changes[tag]))   # type: ignore[arg-type]
        if element.tag not in changes:
            pieces.append((element.tag, view[element.start:element.end]))
        elif changes[element.tag] is not None:
            pieces.append((element.tag, changes[element.tag]))  # type: ignore[arg-type]
    pieces += [(tag, changes[tag]) for tag in new]               # type: ignore[misc]
    pieces = _group_lengths(header, pieces, {tag >> 16 for tag in changes})
    out = b"".join(bytes(p) for _, p in pieces) + bytes(view[header.end:])
    return deflate(out) if header.syntax.deflated else out


def _group_lengths(header: Header, pieces: list[tuple[int, bytes | memoryview]],
                   groups: set[int]) -> list[tuple[int, bytes | memoryview]]:
    """Group length elements of ``groups`` set to the bytes their groups now hold
    (retired since 2008, still written by some; a wrong one misleads a reader)."""
    fmt = header.syntax.endian + "I"
    out = []
    for tag, piece in pieces:
        if tag & 0xFFFF == 0 and tag >> 16 in groups and len(piece) >= 4:
            size = sum(len(p) for t, p in pieces if t >> 16 == tag >> 16 and t & 0xFFFF)
            piece = bytes(piece[:-4]) + struct.pack(fmt, size)
        out.append((tag, piece))
    return out


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """A deflated data set's bytes (RFC 1951, no zlib header), at most ``limit``."""
    engine = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = engine.decompress(data, limit)
    except zlib.error:
        raise HeaderError("the deflated data set does not inflate") from None
    if engine.unconsumed_tail:
        raise HeaderError(f"the deflated data set inflates to more than {limit} bytes")
    return out


def deflate(data: bytes) -> bytes:
    engine = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return engine.compress(data) + engine.flush()


# -- the walk ---------------------------------------------------------------------------

def _element_at(data: bytes, pos: int, implicit: bool, little: bool
                ) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, offset of the value, length) of the element at ``pos``."""
    e = "<" if little else ">"
    if pos + 8 > len(data):
        raise HeaderError(f"the data set ends inside an element header at offset {pos}")
    group, elem = struct.unpack_from(e + "HH", data, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:        # items and delimiters never carry a VR
        return tag, None, pos + 8, struct.unpack_from(e + "I", data, pos + 4)[0]
    vr = data[pos + 4:pos + 6].decode("latin-1")
    if vr in LONG_VRS:
        if pos + 12 > len(data):
            raise HeaderError(f"the data set ends inside the header of {tag_text(tag)} at offset {pos}")
        return tag, vr, pos + 12, struct.unpack_from(e + "I", data, pos + 8)[0]
    if vr in SHORT_VRS:
        return tag, vr, pos + 8, struct.unpack_from(e + "H", data, pos + 6)[0]
    if tag >= PIXELS_FROM:
        return tag, vr, pos + 8, 0          # the tail: never walked
    raise HeaderError(f"{tag_text(tag)} at offset {pos} has no valid VR (explicit VR expected)")


def _after_undefined(data: bytes, pos: int, implicit: bool, little: bool, depth: int) -> int:
    """The offset after a value of undefined length starting at ``pos``: items (each of
    a defined length, or a data set up to its item delimiter) up to the sequence
    delimiter."""
    if depth > MAX_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_DEPTH} at offset {pos}")
    while True:
        tag, _, value, length = _element_at(data, pos, True, little)
        if tag == SEQUENCE_END:
            return value
        if tag != ITEM:
            raise HeaderError(f"{tag_text(tag)} at offset {pos} where an item was expected")
        if length != UNDEFINED:
            pos = value + length
            if pos > len(data):
                raise HeaderError(f"an item at offset {value - 8} is longer than the data set")
            continue
        pos = value
        while True:                      # the item's data set, up to its delimiter
            tag, vr, value, length = _element_at(data, pos, implicit, little)
            if tag == ITEM_END:
                pos = value
                break
            if length == UNDEFINED:
                un = vr == "UN"
                pos = _after_undefined(data, value, implicit or un, little or un, depth + 1)
            else:
                pos = value + length
                if pos > len(data):
                    raise HeaderError(f"{tag_text(tag)} at offset {value} is longer than the data set")

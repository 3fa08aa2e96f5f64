"""Cheap structural scan of an encoded DICOM dataset received over DIMSE.

A C-STORE hands us the dataset bytes (no file meta, already in the negotiated
transfer syntax).  Decoding that with pydicom on every object is too slow for
the receive path, and pydicom is deliberately forgiving: it silently truncates
over-long values and stops at junk, so "pydicom read it" does not mean "the
bytes are whole".  Instead we walk the raw element structure once:

* every declared length is checked against the bytes of its enclosing
  container (dataset, item, sequence, or the whole buffer), so truncated or
  length-corrupted objects are refused before we store them;
* values are never decoded or copied -- we jump over them by their length, so
  a 200 MiB pixel data element costs the same as a 2-byte one;
* only the handful of top-level header values routing needs are extracted, plus
  the raw values of the top-level attributes a caller asks for (``wanted``: the
  attributes the configured rules match on, never logged).

Reject reasons are logged and may be shown to remote peers, so they contain
only tag numbers, lengths and offsets -- never element values, VR bytes or
anything else read from the payload, because any byte may be patient data.

Only the standard library is used: this module sits on the hot receive path
and must stay importable without the rest of the engine.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

__all__ = ["DatasetRejected", "DatasetStream", "HeaderSummary", "can_stream", "scan_dataset",
           "is_valid_uid", "inflate"]

# DIMSE statuses we answer with.  0xC000 is "Error: cannot understand" (the
# bytes are not a well-formed dataset); 0xA900 is "Error: data set does not
# match SOP class" (well formed, but missing or bad identifying attributes).
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_MISMATCH = 0xA900

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

_UNDEFINED = 0xFFFFFFFF
_ITEM_GROUP = 0xFFFE
_ITEM = 0xE000
_ITEM_DELIM = 0xE00D
_SEQ_DELIM = 0xE0DD
_PIXEL_DATA = 0x7FE00010

# Top-level attributes routing needs.
_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_MODALITY = 0x00080060
_TAG_STUDY = 0x0020000D
_TAG_SERIES = 0x0020000E
_WANTED = frozenset(
    (_TAG_SOP_CLASS, _TAG_SOP_INSTANCE, _TAG_MODALITY, _TAG_STUDY, _TAG_SERIES)
)
# Patient identifiers read only to make search tokens (keyed hashes) at ingest: never
# logged, never stored in clear, never part of a summary's repr.
_TAG_ACCESSION = 0x00080050
_TAG_PATIENT_ID = 0x00100020
_IDENTIFIERS = frozenset((_TAG_ACCESSION, _TAG_PATIENT_ID))
_MAX_ID_RAW = 64
# The groups of the tags above: a top-level element of another group is skipped
# without a second look (unless a caller wants more, see _Walk).
_GROUPS = frozenset(tag >> 16 for tag in _WANTED | _IDENTIFIERS)
# Specific Character Set: read with any wanted attribute, to decode its text.
TAG_SPECIFIC_CHARACTER_SET = 0x00080005
# A wanted attribute's value is read up to this many bytes (a longer one is left out
# of the summary): one walk step must fit the streamed scan's join (_MAX_STEP).
MAX_WANTED_RAW = 256
_TAG_NAMES = {
    _TAG_SOP_CLASS: "SOP Class UID",
    _TAG_SOP_INSTANCE: "SOP Instance UID",
    _TAG_STUDY: "Study Instance UID",
    _TAG_SERIES: "Series Instance UID",
    _TAG_MODALITY: "Modality",
}
# Marker recorded instead of a value position when a wanted tag turned up as
# a sequence: it has no usable text value, so the UID check calls it invalid.
_NOT_A_VALUE: tuple[int, bytes | None] = (0, None)
# A UID is at most 64 characters; allow generous padding before we refuse to
# even look at the bytes (so a 100 MiB "UID" is never copied).
_MAX_UID_RAW = 256
_MAX_CS_RAW = 64

_LONG_VRS = (
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV",
    b"UC", b"UN", b"UR", b"UT", b"UV",
)
_SHORT_VRS = (
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
    b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
    b"US",
)

# The 8-byte header of every element/item starts with group, element and a
# 32-bit word.  For implicit VR and item tags that word is the length; for
# explicit VR it is VR (2 chars) + 16-bit length.  Reading it as one unsigned
# int and splitting with shifts costs a single unpack per element and avoids
# allocating a 2-byte ``bytes`` for the VR.
_HDR_LE = struct.Struct("<HHI").unpack_from
_HDR_BE = struct.Struct(">HHI").unpack_from
_U32_LE = struct.Struct("<I").unpack_from
_U32_BE = struct.Struct(">I").unpack_from


def _vr_codes(vrs: tuple[bytes, ...], big_endian: bool) -> frozenset[int]:
    # The VR occupies the low 16 bits of the little-endian word and the high
    # 16 bits of the big-endian one; normalise both to "as read" integers.
    fmt = ">H" if big_endian else "<H"
    return frozenset(struct.unpack(fmt, vr)[0] for vr in vrs)


_LONG_LE = _vr_codes(_LONG_VRS, False)
_SHORT_LE = _vr_codes(_SHORT_VRS, False)
_LONG_BE = _vr_codes(_LONG_VRS, True)
_SHORT_BE = _vr_codes(_SHORT_VRS, True)
_SQ_LE, _UN_LE, _OB_LE, _OW_LE = (struct.unpack("<H", v)[0] for v in (b"SQ", b"UN", b"OB", b"OW"))
_SQ_BE, _UN_BE, _OB_BE, _OW_BE = (struct.unpack(">H", v)[0] for v in (b"SQ", b"UN", b"OB", b"OW"))

# Encoding "modes" carried on the container stack.  A UN element of undefined
# length switches its contents to implicit VR little endian (PS3.5 6.2.2)
# whatever the outer transfer syntax, so the mode is per container, not global.
# Fields: (implicit, big_endian, header unpack, u32 unpack, long VRs,
#          short VRs, SQ code, UN code, OB code, OW code)
_Mode = tuple
_MODE_IMPLICIT: _Mode = (True, False, _HDR_LE, _U32_LE, _LONG_LE, _SHORT_LE, _SQ_LE, _UN_LE, _OB_LE, _OW_LE)
_MODE_EXPLICIT_LE: _Mode = (False, False, _HDR_LE, _U32_LE, _LONG_LE, _SHORT_LE, _SQ_LE, _UN_LE, _OB_LE, _OW_LE)
_MODE_EXPLICIT_BE: _Mode = (False, True, _HDR_BE, _U32_BE, _LONG_BE, _SHORT_BE, _SQ_BE, _UN_BE, _OB_BE, _OW_BE)

# Container kinds on the walk stack.
_DATASET = 0
_SEQUENCE = 1
_FRAGMENTS = 2   # encapsulated pixel data


class DatasetRejected(Exception):
    """The received dataset must be refused with ``status``.

    ``reason`` is safe to log and route: it names tags, lengths and offsets
    only, never element values.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"0x{status:04X}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class HeaderSummary:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str | None
    modality: str | None
    element_count: int  # data elements walked at all levels (not items/delimiters/fragments)
    max_depth: int  # deepest sequence item nesting seen (0 = no sequence items)
    # Raw values (padding removed) for search tokens only: patient data, kept out of repr.
    accession_number: bytes | None = field(default=None, repr=False, compare=False)
    patient_id: bytes | None = field(default=None, repr=False, compare=False)
    # tag -> raw value as received (padding kept) of each wanted top-level attribute
    # present (at most MAX_WANTED_RAW bytes, not a sequence; the first if repeated),
    # and the Specific Character Set with them. May be patient data: out of repr.
    wanted: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _bad(reason: str) -> DatasetRejected:
    return DatasetRejected(STATUS_CANNOT_UNDERSTAND, reason)


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Digits and dots only, no empty component (so no leading, trailing or
    doubled dot), at most 64 characters.  Leading zeros inside a component
    are technically illegal but common in real vendor data, so tolerated --
    what matters to us is that a UID can never carry path or shell syntax.
    """
    if not isinstance(value, str) or not value or len(value) > 64:
        return False
    # isascii() first: str.isdigit() also accepts non-ASCII digits like '²'.
    if not value.isascii():
        return False
    for component in value.split("."):
        if not component.isdigit():  # also False for the empty component
            return False
    return True


# Inflate in slices: input slices keep zlib's ``unconsumed_tail`` copies
# small (feeding the whole buffer would copy the remaining input on every
# call), output slices keep the transient memory near the bound instead of
# CPython's block buffer doubling it when it joins a large single result.
_INFLATE_IN_CHUNK = 64 * 1024
_INFLATE_OUT_CHUNK = 256 * 1024
# After the deflate stream we accept at most 9 bytes: an optional matching
# 8-byte gzip-style trailer and NUL padding.  Anything longer is refused
# without being copied.
_MAX_DEFLATE_TRAILER = 9


def inflate(data: memoryview, limit: int) -> bytearray:
    """Inflate a Deflated Explicit VR LE dataset, refusing more than ``limit`` bytes.

    The dataset is raw deflate (no zlib header), hence wbits=-15.  Every
    decompress call is capped with max_length so a bomb is refused as soon
    as it produces limit + 1 bytes: the output never grows past the bound
    (plus bytearray over-allocation and one output slice). Raises DatasetRejected
    (0xC000) for a bomb, a broken stream or trailing data; handlers/api.py inflates a
    stored deflated data set with it too.
    """
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    size = len(data)
    pos = 0
    pending: bytes | memoryview = b""
    try:
        while not inflater.eof:
            if not pending:
                if pos >= size:
                    raise _bad(f"deflated dataset stream truncated after {len(out)} inflated bytes")
                pending = data[pos:pos + _INFLATE_IN_CHUNK]  # zero-copy slice
                pos += len(pending)
            # Ask for one byte more than the bound allows, so overflow shows.
            want = min(_INFLATE_OUT_CHUNK, limit + 1 - len(out))
            out += inflater.decompress(pending, want)
            pending = inflater.unconsumed_tail
            if len(out) > limit:
                raise _bad(f"deflated dataset inflates beyond {limit} bytes")
    except zlib.error:
        raise _bad("deflated dataset is not a valid deflate stream") from None

    # Writers may pad the stream to an even length with a NUL.  Some (e.g.
    # dctool, as in pydicom's image_dfl.dcm) append a gzip-style trailer:
    # CRC-32 and size of the inflated data; accept it only if it matches.
    # Any other trailing data is something we would silently ignore.
    rest_len = len(inflater.unused_data) + size - pos
    if rest_len:
        if rest_len > _MAX_DEFLATE_TRAILER:
            raise _bad(f"{rest_len} bytes of trailing data after deflate stream")
        rest = inflater.unused_data + bytes(data[pos:])
        if len(rest) >= 8 and rest[:8] == struct.pack("<II", zlib.crc32(out), len(out) & 0xFFFFFFFF):
            rest = rest[8:]
        if rest.strip(b"\x00"):
            raise _bad(f"{rest_len} bytes of trailing data after deflate stream")
    return out


def scan_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax_uid: str,
    *,
    max_depth: int = 16,
    allow_deflate: bool = False,
    max_inflated_bytes: int = 256 * 1024 * 1024,
    wanted: frozenset[int] = frozenset(),
) -> HeaderSummary:
    """Validate the element structure of ``data`` and extract routing headers, and
    the raw values of the top-level attributes in ``wanted`` (HeaderSummary.wanted).

    Raises :class:`DatasetRejected` (0xC000 for malformed structure, 0xA900
    for missing/invalid identifying UIDs).  No other exception escapes for
    any input bytes.
    """
    ts = transfer_syntax_uid.rstrip("\x00 ")
    view = memoryview(data)
    if not view.c_contiguous:
        # A strided view cannot be walked by offset; copying is the only
        # correct option and never happens for buffers from the network.
        contiguous = memoryview(view.tobytes())
        view.release()
        view = contiguous
    if view.format != "B" or view.ndim != 1:
        # struct and len() must work in bytes, not items: normalise formats.
        cast = view.cast("B")
        view.release()
        view = cast
    try:
        if ts == DEFLATED_EXPLICIT_VR_LE:
            if not allow_deflate:
                raise _bad("deflated transfer syntax not accepted")
            inflated = memoryview(inflate(view, max_inflated_bytes))
            try:
                return _Walk(_MODE_EXPLICIT_LE, max_depth, len(inflated), wanted).whole(inflated)
            finally:
                inflated.release()
        return _Walk(_mode(ts), max_depth, len(view), wanted).whole(view)
    finally:
        # Release our view so a caller's bytearray/mmap can be resized or
        # closed afterwards (the caller's own view, if any, is unaffected).
        view.release()


def _mode(ts: str) -> _Mode:
    if ts == IMPLICIT_VR_LE:
        return _MODE_IMPLICIT
    if ts == EXPLICIT_VR_BE:
        return _MODE_EXPLICIT_BE
    # Explicit VR LE and every compressed syntax (JPEG family, JPEG-LS,
    # JPEG 2000, RLE, HTJ2K, MPEG...) share the explicit LE encoding; only
    # pixel data differs, and encapsulated pixel data is walked as fragments.
    return _MODE_EXPLICIT_LE


def can_stream(transfer_syntax_uid: str) -> bool:
    """Whether a data set in this syntax can be scanned as it arrives (DatasetStream):
    every syntax but deflate, whose elements exist only once the whole stream inflates."""
    return transfer_syntax_uid.rstrip("\x00 ") != DEFLATED_EXPLICIT_VR_LE


class DatasetStream:
    """The same scan as :func:`scan_dataset`, fed the data set piece by piece as its
    P-DATA fragments arrive, so a large object is checked and its routing headers read
    without ever being whole in memory. What it keeps between pieces is bounded: the
    container stack, the few header values routing needs (at most 256 bytes each) and
    at most one element header or such value cut by a piece boundary.

    ``feed`` may raise DatasetRejected as soon as the structure is wrong; ``finish``
    (once the last piece is fed) raises it or returns the summary. Not for deflate
    (see can_stream)."""

    def __init__(self, transfer_syntax_uid: str, *, max_depth: int = 16,
                 wanted: frozenset[int] = frozenset()):
        self._walk = _Walk(_mode(transfer_syntax_uid.rstrip("\x00 ")), max_depth, None, wanted)
        self._fed = 0
        self._tail = b""     # bytes from the walk's position to the end of what was fed

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as raw, raw.cast("B") as view:
            start = self._fed
            self._fed += len(view)
            if self._tail:
                # Join the cut header to the start of this piece: a walk step never
                # needs more than _MAX_STEP bytes, so _JOIN of them are always enough.
                tail, self._tail = self._tail, b""
                head = tail + bytes(view[:_JOIN])
                self._consume(memoryview(head), start - len(tail))
                if len(view) <= _JOIN:
                    return
                self._tail = b""
            self._consume(view, start)

    def _consume(self, view: memoryview, base: int) -> None:
        walk = self._walk
        stop = base + len(view)
        if base <= walk.pos < stop:
            walk.run(view, base, stop)
        if base <= walk.pos < stop:
            self._tail = bytes(view[walk.pos - base:])

    def finish(self) -> HeaderSummary:
        """The summary once every byte has been fed (DatasetRejected if the data set
        ends inside an element, item or sequence)."""
        total = self._fed
        walk = self._walk
        walk.close(total)
        tail = memoryview(self._tail)
        self._tail = b""
        return walk.whole(tail, total - len(tail))


# A walk step reads at most an explicit VR long header (12 bytes) and a value routing
# needs (at most _MAX_UID_RAW = MAX_WANTED_RAW bytes) at once; a piece's first _JOIN bytes are joined to
# a step cut by the previous piece's end.
_MAX_STEP = 12 + 256
_JOIN = 2 * _MAX_STEP
# The limit of the top-level data set while its size is not known yet (streaming).
_OPEN = 1 << 62


class _Walk:
    """The element walk, resumable: its state lives in attributes between runs, and a
    run stops (returns False) when the next step needs bytes not yet available."""

    def __init__(self, mode: _Mode, max_depth: int, size: int | None,
                 wanted: frozenset[int] = frozenset()):
        self.mode = mode
        # What a top-level element is looked at for: its group first (one set lookup
        # for most elements), then its tag. Without wanted tags: the routing fields'.
        if wanted:
            wanted = wanted | {TAG_SPECIFIC_CHARACTER_SET}
            self.groups = _GROUPS | {tag >> 16 for tag in wanted}
            self.read = _WANTED | _IDENTIFIERS | wanted
        else:
            self.groups, self.read = _GROUPS, _WANTED | _IDENTIFIERS
        self.wanted = wanted
        self.wanted_values: dict[int, bytes] = {}
        self.max_depth = max_depth
        self.pos = 0
        # ``end`` is the hard limit of the current container: its own end for defined
        # lengths, the parent's limit for undefined lengths, which must then be closed
        # by a delimiter before that limit.
        self.kind = _DATASET
        self.end = _OPEN if size is None else size
        self.undefined = False   # container closed by a delimiter rather than its length
        self.depth = 0           # nesting level of the dataset (or of the items' parent dataset)
        self.stack: list[tuple] = []
        self.found: dict[int, tuple[int, bytes | None]] = {}
        self.identifiers: dict[int, bytes] = {}
        self.duplicates: set[int] = set()
        self.element_count = 0
        self.deepest = 0

    def whole(self, view: memoryview, base: int = 0) -> HeaderSummary:
        """Walk the rest of the data set, all of which is in ``view``; the summary."""
        if not self.run(view, base, base + len(view)):
            raise _bad(f"data set ends inside an element at offset {self.pos}")
        return self.summary()

    def close(self, total: int) -> None:
        """The data set turned out to be ``total`` bytes: bound the containers that were
        open-ended by it, and refuse any element or container declared past it."""
        if self.pos > total:
            raise _bad(f"an element declared length runs {self.pos - total} bytes past "
                       f"the end of the data ({total} bytes)")
        limits = [self.end] + [frame[1] for frame in self.stack]
        for limit in limits:
            if limit != _OPEN and limit > total:
                raise _bad(f"a sequence or item declared length runs {limit - total} bytes "
                           f"past the end of the data ({total} bytes)")
        self.end = total if self.end == _OPEN else self.end
        self.stack = [(k, total if e == _OPEN else e, u, d, m) for (k, e, u, d, m) in self.stack]

    def run(self, buf: memoryview, base: int, avail: int) -> bool:
        """Walk from ``pos`` while the bytes are in ``buf`` (holding offsets ``base`` up
        to ``avail``); True once the top-level data set is walked, False when the next
        step needs bytes beyond ``avail``. Every read is checked first against its
        container's limit (a malformed data set is refused whatever has arrived) and
        only then against ``avail`` (wait for more)."""
        # The walk is iterative with an explicit stack so hostile nesting can never hit
        # Python's recursion limit, whatever max_depth the caller sets. Current
        # container state lives in locals for speed; a push saves it as a tuple.
        stack, found, identifiers = self.stack, self.found, self.identifiers
        groups, read, wanted, wanted_values = self.groups, self.read, self.wanted, self.wanted_values
        pos, kind, end, undefined, depth, mode = (self.pos, self.kind, self.end, self.undefined,
                                                  self.depth, self.mode)
        element_count, deepest, max_depth = self.element_count, self.deepest, self.max_depth
        (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
         vr_sq, vr_un, vr_ob, vr_ow) = mode
        done = False

        while True:
            if kind == _DATASET:
                if pos == end:
                    if undefined:
                        raise _bad(f"item without item delimiter: data ends at offset {pos}")
                    if not stack:
                        done = True
                        break  # end of top-level dataset
                    (kind, end, undefined, depth, mode) = stack.pop()
                    (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
                     vr_sq, vr_un, vr_ob, vr_ow) = mode
                    continue
                if end - pos < 8:
                    raise _bad(
                        f"element header at offset {pos} truncated: {end - pos} bytes "
                        f"left of 8 needed"
                    )
                if avail - pos < 8:
                    break
                group, elem, word = hdr(buf, pos - base)
                if group == _ITEM_GROUP:
                    if elem == _ITEM_DELIM and undefined:
                        # Item delimiter closes an undefined-length item.  Its
                        # length should be 0; like pydicom and dcmtk we tolerate
                        # junk there rather than try to skip by it.
                        pos += 8
                        (kind, end, undefined, depth, mode) = stack.pop()
                        (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
                         vr_sq, vr_un, vr_ob, vr_ow) = mode
                        continue
                    raise _bad(f"unexpected {_tag(group << 16 | elem)} at offset {pos} inside dataset")

                if implicit:
                    vr = 0
                    length = word
                    value_pos = pos + 8
                else:
                    if big_endian:
                        vr = word >> 16
                        length = word & 0xFFFF
                    else:
                        vr = word & 0xFFFF
                        length = word >> 16
                    if vr in short_vrs:
                        value_pos = pos + 8
                    elif vr in long_vrs:
                        if end - pos < 12:
                            raise _bad(
                                f"element header {_tag(group << 16 | elem)} at offset {pos} "
                                f"truncated: {end - pos} bytes left of 12 needed"
                            )
                        if avail - pos < 12:
                            break
                        length = u32(buf, pos + 8 - base)[0]
                        value_pos = pos + 12
                    else:
                        # Deliberately no VR bytes in the reason: if we lost sync
                        # they are payload bytes.
                        raise _bad(f"unknown VR for {_tag(group << 16 | elem)} at offset {pos}")

                if length == _UNDEFINED:
                    element_count += 1
                    tag = group << 16 | elem
                    if depth == 0 and tag in _WANTED:
                        if tag in found:
                            self.duplicates.add(tag)
                        found[tag] = _NOT_A_VALUE
                    if tag == _PIXEL_DATA and (implicit or vr == vr_ob or vr == vr_ow):
                        # Encapsulated pixel data: a flat list of fragments, walked
                        # as a container of its own, skipping each fragment by
                        # length.  (In implicit VR this cannot be a sequence, so
                        # treat it as pydicom does: encapsulated.)
                        stack.append((kind, end, undefined, depth, mode))
                        kind = _FRAGMENTS
                        pos = value_pos
                        continue
                    if implicit or vr == vr_sq:
                        new_mode = mode
                    elif vr == vr_un:
                        # PS3.5 6.2.2: UN of undefined length is a sequence whose
                        # contents are implicit VR little endian.
                        new_mode = _MODE_IMPLICIT
                    else:
                        raise _bad(
                            f"undefined length not allowed for {_tag(tag)} at offset {pos}"
                        )
                    stack.append((kind, end, undefined, depth, mode))
                    kind = _SEQUENCE
                    undefined = True
                    pos = value_pos
                    # end stays the parent's limit: the delimiter must come first.
                    if new_mode is not mode:
                        mode = new_mode
                        (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
                         vr_sq, vr_un, vr_ob, vr_ow) = mode
                    continue

                if length > end - value_pos:
                    raise _bad(
                        f"{_tag(group << 16 | elem)} declared length {length} at offset {pos} "
                        f"exceeds the {end - value_pos} bytes remaining in its container"
                    )
                if depth == 0 and group in groups:
                    tag = group << 16 | elem
                    if tag in read:
                        # Read the value now (the bytes may not be kept): it must
                        # have arrived whole first.
                        if length <= _MAX_UID_RAW and avail - value_pos < length:
                            break
                        sequence = vr == vr_sq and not implicit
                        if tag in _WANTED:
                            if tag in found:
                                self.duplicates.add(tag)
                            found[tag] = _NOT_A_VALUE if sequence else (
                                length, bytes(buf[value_pos - base:value_pos - base + length])
                                if length <= _MAX_UID_RAW else None)
                        elif tag in _IDENTIFIERS and length <= _MAX_ID_RAW and not sequence \
                                and tag not in identifiers:
                            identifiers[tag] = bytes(buf[value_pos - base:value_pos - base + length])
                        if tag in wanted and length <= MAX_WANTED_RAW and not sequence \
                                and tag not in wanted_values:
                            wanted_values[tag] = bytes(buf[value_pos - base:value_pos - base + length])
                element_count += 1
                if vr == vr_sq and not implicit:
                    # Defined-length sequence: walk its items, bounded by length.
                    # (Implicit VR defined-length sequences are indistinguishable
                    # from opaque values without a dictionary and are skipped.)
                    stack.append((kind, end, undefined, depth, mode))
                    kind = _SEQUENCE
                    undefined = False
                    end = value_pos + length
                    pos = value_pos
                    continue
                pos = value_pos + length  # skip the value: O(1) whatever its size
                continue

            if kind == _FRAGMENTS:
                if end - pos < 8:
                    raise _bad(
                        f"pixel data fragment header at offset {pos} truncated: "
                        f"{end - pos} bytes left of 8 needed"
                    )
                if avail - pos < 8:
                    break
                group, elem, length = hdr(buf, pos - base)
                if group == _ITEM_GROUP and elem == _ITEM:
                    pos += 8
                    if length > end - pos or length == _UNDEFINED:
                        raise _bad(
                            f"pixel data fragment declared length {length} at offset {pos - 8} "
                            f"exceeds the {end - pos} bytes remaining"
                        )
                    pos += length
                elif group == _ITEM_GROUP and elem == _SEQ_DELIM:
                    pos += 8
                    (kind, end, undefined, depth, mode) = stack.pop()
                else:
                    raise _bad(
                        f"expected pixel data fragment, found {_tag(group << 16 | elem)} at offset {pos}"
                    )
                continue

            # kind == _SEQUENCE: expect items until the length or a delimiter ends it.
            if pos == end:
                if undefined:
                    raise _bad(f"sequence without sequence delimiter: data ends at offset {pos}")
                (kind, end, undefined, depth, mode) = stack.pop()
                (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
                 vr_sq, vr_un, vr_ob, vr_ow) = mode
                continue
            if end - pos < 8:
                raise _bad(
                    f"item header at offset {pos} truncated: {end - pos} bytes left of 8 needed"
                )
            if avail - pos < 8:
                break
            group, elem, length = hdr(buf, pos - base)
            if group == _ITEM_GROUP and elem == _ITEM:
                if depth + 1 > max_depth:
                    raise _bad(f"sequence nesting at offset {pos} deeper than {max_depth}")
                stack.append((kind, end, undefined, depth, mode))
                kind = _DATASET
                depth += 1
                if depth > deepest:
                    deepest = depth
                pos += 8
                if length == _UNDEFINED:
                    undefined = True  # end stays the sequence's limit
                else:
                    if length > end - pos:
                        raise _bad(
                            f"item declared length {length} at offset {pos - 8} exceeds "
                            f"the {end - pos} bytes remaining in its sequence"
                        )
                    undefined = False
                    end = pos + length
                continue
            if group == _ITEM_GROUP and elem == _SEQ_DELIM and undefined:
                pos += 8
                (kind, end, undefined, depth, mode) = stack.pop()
                (implicit, big_endian, hdr, u32, long_vrs, short_vrs,
                 vr_sq, vr_un, vr_ob, vr_ow) = mode
                continue
            raise _bad(f"expected item tag, found {_tag(group << 16 | elem)} at offset {pos}")

        self.pos, self.kind, self.end, self.undefined, self.depth, self.mode = (
            pos, kind, end, undefined, depth, mode)
        self.element_count, self.deepest = element_count, deepest
        return done

    def summary(self) -> HeaderSummary:
        if self.duplicates:
            # Readers disagree on which copy wins (pydicom keeps the last), so
            # routing could act on a different identity than downstream systems.
            tag = min(self.duplicates)
            raise DatasetRejected(
                STATUS_DATASET_MISMATCH, f"{_tag(tag)} {_TAG_NAMES[tag]} present more than once"
            )
        found = self.found
        sop_class = _required_uid(found, _TAG_SOP_CLASS)
        sop_instance = _required_uid(found, _TAG_SOP_INSTANCE)
        study = _required_uid(found, _TAG_STUDY)
        # Series Instance UID may be absent, but if present it must be valid.
        series = _uid(found[_TAG_SERIES], _TAG_SERIES) if _TAG_SERIES in found else None
        modality: str | None = None
        value = found.get(_TAG_MODALITY)
        if value is not None:
            # Modality only steers routing; an unreadable one is treated as absent
            # rather than refusing an otherwise good object.
            modality = _text(value, _MAX_CS_RAW)
            if modality is not None:
                modality = modality.strip() or None
        return HeaderSummary(
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            study_instance_uid=study,
            series_instance_uid=series,
            modality=modality,
            element_count=self.element_count,
            max_depth=self.deepest,
            accession_number=_identifier(self.identifiers.get(_TAG_ACCESSION)),
            patient_id=_identifier(self.identifiers.get(_TAG_PATIENT_ID)),
            wanted=self.wanted_values,
        )


def _text(value: tuple[int, bytes | None], cap: int) -> str | None:
    """ASCII text of a value with trailing NUL/space padding removed.

    None when it cannot be a sensible value (not ASCII, absurdly long, or a
    sequence) -- the caller decides whether that is fatal.
    """
    length, raw = value
    if raw is None or length > cap:
        return None
    try:
        return raw.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None


def _required_uid(found: dict[int, tuple[int, bytes | None]], tag: int) -> str:
    if tag not in found:
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{_tag(tag)} {_TAG_NAMES[tag]} missing")
    return _uid(found[tag], tag)


def _uid(value: tuple[int, bytes | None], tag: int) -> str:
    """The validated UID; DatasetRejected(0xA900) if it is bad."""
    name = f"{_tag(tag)} {_TAG_NAMES[tag]}"
    if value[0] > _MAX_UID_RAW:
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{name} longer than 64 (length {value[0]})")
    text = _text(value, _MAX_UID_RAW)
    if text is None:
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{name} invalid")
    if not text:
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{name} empty")
    if len(text) > 64:
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{name} longer than 64 (length {len(text)})")
    if not is_valid_uid(text):
        raise DatasetRejected(STATUS_DATASET_MISMATCH, f"{name} invalid")
    return text


def _identifier(raw: bytes | None) -> bytes | None:
    """An identifier's bytes without padding (any character set: they are only hashed)."""
    if raw is None:
        return None
    value = raw.strip(b"\x00 ")
    return value or None

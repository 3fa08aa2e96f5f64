"""The content tree of a DICOM Structured Report (PS3.3 C.17.3), for handlers.

``SRDocument.from_dataset(ds)`` reads the SR Document Content Module once into
immutable ``ContentItem``s::

    for item in doc.walk():                      # pre-order, root first
        item.position        # "1.2.3": as DICOM numbers items (by-reference uses it too)
        item.value_type      # CONTAINER TEXT NUM CODE DATE TIME DATETIME PNAME UIDREF
                             # COMPOSITE IMAGE WAVEFORM SCOORD SCOORD3D TCOORD,
                             # BY-REFERENCE, or UNKNOWN (a value type this module does not know)
        item.relationship    # CONTAINS, HAS PROPERTIES, ... ("" for the root)
        item.concept         # Code(value, scheme, meaning) or None
        item.value           # typed: see below
        item.text            # the value as DICOM wrote it (dates keep their precision)
        item.children

Typed values: TEXT, PNAME (DICOM PN text), UIDREF → str; NUM → ``Measurement``
(Decimal or None, unit Code (UCUM), qualifier Code); CODE → Code; DATE/TIME/DATETIME
→ date/time/datetime (None when unreadable); IMAGE/COMPOSITE/WAVEFORM →
``Reference``; SCOORD/SCOORD3D → ``Coordinates``; TCOORD → ``TemporalCoordinates``;
BY-REFERENCE → the target's position (``doc.resolve(item)`` gives the item);
CONTAINER and UNKNOWN → None.

Vendor data is odd but mostly legal: no concept name (allowed below the root), an
empty Measured Value Sequence, unknown value types, by-reference relationships,
broken references. None of it raises. Depth and item count are bounded
(``MAX_DEPTH``, ``MAX_ITEMS``); a tree cut at a bound says so in ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterator

from mfconsole.dicomvalues import (Code, code_from, first_item, parse_da, parse_dt, parse_tm,
                                   text_of, value_of)

__all__ = ["SRDocument", "ContentItem", "Measurement", "Reference", "Coordinates",
           "TemporalCoordinates", "Code", "BY_REFERENCE", "UNKNOWN", "VALUE_TYPES",
           "MAX_DEPTH", "MAX_ITEMS", "is_sr_sop_class"]

_CONTENT_SEQUENCE = 0x0040A730
BY_REFERENCE = "BY-REFERENCE"
UNKNOWN = "UNKNOWN"
VALUE_TYPES = frozenset({"CONTAINER", "TEXT", "NUM", "CODE", "DATE", "TIME", "DATETIME",
                         "PNAME", "UIDREF", "COMPOSITE", "IMAGE", "WAVEFORM", "SCOORD",
                         "SCOORD3D", "TCOORD"})
# Real reports nest a handful of levels (TID 1500 about 6); the ingest scan refuses
# sequences nested past 16. The bounds keep a hostile tree from costing more than a
# big honest one (a Key Object Selection of a whole study can list thousands).
MAX_DEPTH = 64
MAX_ITEMS = 100_000

# SR Storage SOP classes are 1.2.840.10008.5.1.4.1.1.88.x (Basic Text, Enhanced,
# Comprehensive, Comprehensive 3D, Extensible, Key Object Selection, the CAD and dose
# reports, ...); a few SR-based IODs live elsewhere.
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SR_OTHERS = frozenset({
    "1.2.840.10008.5.1.4.1.1.79.1",    # Macular Grid Thickness and Volume Report
    "1.2.840.10008.5.1.4.1.1.78.6",    # Spectacle Prescription Report
})


def is_sr_sop_class(uid: str) -> bool:
    return uid.startswith(_SR_PREFIX) or uid in _SR_OTHERS


@dataclass(frozen=True, slots=True)
class Measurement:
    """A NUM value: ``value`` is None when the Measured Value Sequence is empty (then
    ``qualifier`` often says why, e.g. "Value unknown")."""

    value: Decimal | None
    unit: Code | None
    qualifier: Code | None = None


@dataclass(frozen=True, slots=True)
class Reference:
    """An IMAGE, COMPOSITE or WAVEFORM reference."""

    sop_class_uid: str
    sop_instance_uid: str
    frames: tuple[int, ...] = ()
    presentation: "Reference | None" = None    # e.g. a presentation state for an image


@dataclass(frozen=True, slots=True)
class Coordinates:
    """SCOORD (image coordinates) or SCOORD3D (with its frame of reference)."""

    graphic_type: str
    data: tuple[float, ...]
    frame_of_reference_uid: str = ""


@dataclass(frozen=True, slots=True)
class TemporalCoordinates:
    range_type: str
    sample_positions: tuple[int, ...] = ()
    time_offsets: tuple[float, ...] = ()
    datetimes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False, repr=False)
class ContentItem:
    position: str
    value_type: str
    relationship: str
    concept: Code | None
    value: Any
    text: str
    children: tuple["ContentItem", ...] = ()
    observed_at: str = ""       # Observation DateTime, as written (DT)
    template: str = ""          # "DCMR 1500" when the item names its template

    @property
    def depth(self) -> int:
        """0 for the root."""
        return self.position.count(".")

    @property
    def name(self) -> str:
        """The concept name's meaning, or "" when the item has none."""
        return self.concept.meaning if self.concept else ""

    def walk(self) -> Iterator["ContentItem"]:
        """This item and everything below it, pre-order."""
        stack = [self]
        while stack:
            item = stack.pop()
            yield item
            stack.extend(reversed(item.children))

    def __repr__(self) -> str:
        # Never the value: reprs end up in tracebacks and logs.
        return f"<ContentItem {self.position} {self.value_type}>"


class SRDocument:
    """The content tree of one SR document."""

    def __init__(self, root: ContentItem, truncated: bool = False):
        self.root = root
        self.truncated = truncated
        self._by_position = {item.position: item for item in root.walk()}

    @classmethod
    def from_dataset(cls, ds: Any, *, max_depth: int = MAX_DEPTH,
                     max_items: int = MAX_ITEMS) -> "SRDocument":
        reader = _Reader(max_depth, max_items)
        root = reader.item(ds, "1", root=True)
        return cls(root, reader.truncated)

    @property
    def title(self) -> Code | None:
        """The document title (the root's concept name)."""
        return self.root.concept

    @property
    def template(self) -> str:
        """The root template, e.g. "DCMR 2000" (Basic Diagnostic Imaging Report)."""
        return self.root.template

    def walk(self) -> Iterator[ContentItem]:
        return self.root.walk()

    def __len__(self) -> int:
        return len(self._by_position)

    def find(self, position: str) -> ContentItem | None:
        return self._by_position.get(position)

    def resolve(self, item: ContentItem) -> ContentItem | None:
        """The target of a by-reference item (None if it points nowhere)."""
        return self.find(item.value) if item.value_type == BY_REFERENCE else None

    def __repr__(self) -> str:
        return f"<SRDocument {len(self)} items{' (truncated)' if self.truncated else ''}>"


class _Reader:
    def __init__(self, max_depth: int, max_items: int):
        self.max_depth = max_depth
        self.items_left = max_items
        self.truncated = False

    def item(self, ds: Any, position: str, root: bool = False) -> ContentItem:
        self.items_left -= 1
        value_type = text_of(ds, "ValueType").upper()
        refs = _ints(ds, "ReferencedContentItemIdentifier")
        if not value_type and refs:
            value_type, value, text = BY_REFERENCE, ".".join(map(str, refs)), ""
        else:
            if value_type not in VALUE_TYPES:
                value_type = UNKNOWN if (value_type or not root) else "CONTAINER"
            value, text = _value(ds, value_type)
        template = ""
        tpl = first_item(ds, "ContentTemplateSequence")
        if tpl is not None:
            template = " ".join(filter(None, (text_of(tpl, "MappingResource"),
                                              text_of(tpl, "TemplateIdentifier"))))
        return ContentItem(
            position=position,
            value_type=value_type,
            relationship="" if root else text_of(ds, "RelationshipType").upper(),
            concept=code_from(first_item(ds, "ConceptNameCodeSequence")),
            value=value,
            text=text,
            children=self.children(ds, position),
            observed_at=text_of(ds, "ObservationDateTime"),
            template=template,
        )

    def children(self, ds: Any, position: str) -> tuple[ContentItem, ...]:
        seq = value_of(ds, "ContentSequence")
        if not seq:
            if seq is None and ds.get_item(_CONTENT_SEQUENCE) is not None:
                self.truncated = True      # present but unreadable: the tree stops here
            return ()
        if position.count(".") + 1 >= self.max_depth:
            self.truncated = True
            return ()
        out = []
        for index, child in enumerate(seq, start=1):
            if self.items_left <= 0:
                self.truncated = True
                break
            out.append(self.item(child, f"{position}.{index}"))
        return tuple(out)


def _seq(ds: Any, keyword: str) -> list[Any]:
    value = value_of(ds, keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _numbers(ds: Any, keyword: str, kind: type) -> tuple:
    """All values of a numeric element as ``kind``; () when any is unreadable."""
    try:
        return tuple(kind(v) for v in _seq(ds, keyword))
    except (TypeError, ValueError, OverflowError):
        return ()


def _ints(ds: Any, keyword: str) -> tuple[int, ...]:
    return _numbers(ds, keyword, int)


def _floats(ds: Any, keyword: str) -> tuple[float, ...]:
    return _numbers(ds, keyword, float)


def _decimal(text: str) -> Decimal | None:
    try:
        number = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _reference(ds: Any) -> Reference | None:
    ref = first_item(ds, "ReferencedSOPSequence")
    if ref is None:
        return None
    nested = first_item(ref, "ReferencedSOPSequence")
    return Reference(
        sop_class_uid=text_of(ref, "ReferencedSOPClassUID"),
        sop_instance_uid=text_of(ref, "ReferencedSOPInstanceUID"),
        frames=_ints(ref, "ReferencedFrameNumber"),
        presentation=None if nested is None else Reference(
            text_of(nested, "ReferencedSOPClassUID"), text_of(nested, "ReferencedSOPInstanceUID")),
    )


def _text_value(ds: Any) -> str:
    # UT keeps its leading spaces (they may lay out the text); trailing padding goes.
    value = value_of(ds, "TextValue")
    return "" if value is None else str(value).rstrip("\x00 ")


def _value(ds: Any, value_type: str) -> tuple[Any, str]:
    """(typed value, text as written) of one content item."""
    if value_type == "TEXT":
        text = _text_value(ds)
        return text, text
    if value_type == "NUM":
        mv = first_item(ds, "MeasuredValueSequence")
        qualifier = code_from(first_item(ds, "NumericValueQualifierCodeSequence"))
        if mv is None:
            return Measurement(None, None, qualifier), ""
        text = text_of(mv, "NumericValue")
        number = _decimal(text)
        if number is None:
            floats = _floats(mv, "FloatingPointValue")
            number = _decimal(repr(floats[0])) if floats else None
        unit = code_from(first_item(mv, "MeasurementUnitsCodeSequence"))
        return Measurement(number, unit, qualifier), text
    if value_type == "CODE":
        code = code_from(first_item(ds, "ConceptCodeSequence"))
        return code, code.value if code else ""
    if value_type == "DATE":
        text = text_of(ds, "Date")
        return parse_da(text)[1], text
    if value_type == "TIME":
        text = text_of(ds, "Time")
        return parse_tm(text)[1], text
    if value_type == "DATETIME":
        text = text_of(ds, "DateTime")
        return parse_dt(text)[1], text
    if value_type == "PNAME":
        text = text_of(ds, "PersonName")
        return text, text
    if value_type == "UIDREF":
        text = text_of(ds, "UID")
        return text, text
    if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        ref = _reference(ds)
        return ref, ref.sop_instance_uid if ref else ""
    if value_type in ("SCOORD", "SCOORD3D"):
        coords = Coordinates(text_of(ds, "GraphicType"), _floats(ds, "GraphicData"),
                             text_of(ds, "ReferencedFrameOfReferenceUID"))
        return coords, coords.graphic_type
    if value_type == "TCOORD":
        tc = TemporalCoordinates(text_of(ds, "TemporalRangeType"),
                                 _ints(ds, "ReferencedSamplePositions"),
                                 _floats(ds, "ReferencedTimeOffsets"),
                                 tuple(str(v) for v in _seq(ds, "ReferencedDateTime")))
        return tc, tc.range_type
    return None, ""

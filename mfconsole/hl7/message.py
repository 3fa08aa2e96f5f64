"""An immutable HL7 v2 message: segments of fields, built from plain Python values and
encoded with the standard encoding characters (``|^~\\&``, segments joined by CR).

Why a small builder and not a library: production only has to *write* messages, and
writing is the easy half of HL7 — nest, escape, join. The libraries that also parse
and validate (hl7apy, python-hl7) are used by the tests to check what this produces,
which is worth more than building with them: an independent parser and validator
catch what a shared library would hide. This module is ~200 lines with no dependency,
and every value goes through one escape function, so nothing can be forgotten.

Building a segment (every string is *raw* text; escaping happens at encode time)::

    segment("PID", "1", None, ("12345", "", "", ("HOSP", "1.2.3", "ISO")), None,
            ("Doe", "John"), None, "19700101", "M")

* a field is ``None``/``""`` (empty), a ``str``, a tuple/list of components, or
  ``Repeat(...)`` of such values (repetitions);
* a component is a ``str`` or a tuple/list of subcomponent strings;
* ``Escaped(s)`` is text that is already HL7-escaped (e.g. FT formatting commands);
* ``NULL`` (``'""'``) is HL7's explicit null ("no value, and the receiver should know").

Internally every field is normalised to repetitions → components → subcomponents
(tuples of str, trailing empties dropped), so ``HL7Message.parse(m.encode()) == m``
for any message built without ``Escaped`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

from mfconsole.hl7.escape import (COMPONENT, ENCODING_CHARACTERS, ESCAPE, FIELD, REPETITION,
                                  SUBCOMPONENT, escape, unescape)

__all__ = ["HL7Error", "Escaped", "Repeat", "NULL", "Segment", "HL7Message", "segment",
           "msh_segment", "is_empty"]

SEGMENT_TERMINATOR = "\r"
NULL = '""'

Component = tuple[str, ...]             # subcomponents
Repetition = tuple[Component, ...]      # components
Field = tuple[Repetition, ...]          # repetitions


class HL7Error(ValueError):
    """A message that cannot be built or parsed. Messages name segments and fields,
    never values (they may be patient data)."""


class Escaped(str):
    """Text already escaped for HL7: encoded as is."""

    __slots__ = ()


class Repeat(tuple):
    """The repetitions of one field: ``Repeat(value, value, ...)``."""

    def __new__(cls, *values: object) -> "Repeat":
        return super().__new__(cls, values)


FieldValue = Union[None, str, Sequence[Union[str, Sequence[str], None]], Repeat]


def _component(value: object) -> Component:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    subs = [s if isinstance(s, str) else ("" if s is None else _bad_type(s)) for s in _items(value)]
    while subs and not subs[-1]:
        subs.pop()
    return tuple(subs)


def _repetition(value: object) -> Repetition:
    if value is None:
        return ()
    if isinstance(value, str):
        return ((value,),) if value else ()
    comps = [_component(c) for c in _items(value)]
    while comps and not comps[-1]:
        comps.pop()
    return tuple(comps)


def _field(value: object) -> Field:
    reps = tuple(_repetition(v) for v in value) if isinstance(value, Repeat) else (_repetition(value),)
    # Empty repetitions inside a field are kept (a blank line of a TX field is a
    # repetition); a field whose repetitions are all empty is an empty field.
    return reps if any(reps) else ()


def _items(value: object) -> Sequence[object]:
    if isinstance(value, (tuple, list)):
        return value
    return (_bad_type(value),)


def is_empty(value: FieldValue) -> bool:
    """True when a field value would encode as an empty field."""
    return not _field(value)


def _bad_type(value: object) -> str:
    # Numbers and dates must be formatted by the caller (HL7 NM, DT, DTM... have
    # their own formats; str() of a float or Decimal may not be one of them).
    raise HL7Error(f"HL7 values must be str, tuple or list, not {type(value).__name__}")


@dataclass(frozen=True)
class Segment:
    """One segment. ``fields[0]`` is field 1 (for MSH: MSH-1, the field separator)."""

    name: str
    fields: tuple[Field, ...]

    def field(self, number: int) -> Field:
        """Field ``number`` (1-based, as in HL7), ``()`` when absent."""
        return self.fields[number - 1] if 0 < number <= len(self.fields) else ()

    def value(self, number: int, component: int = 1, subcomponent: int = 1,
              repetition: int = 1) -> str:
        """One leaf value (unescaped), ``""`` when absent."""
        reps = self.field(number)
        try:
            return reps[repetition - 1][component - 1][subcomponent - 1]
        except IndexError:
            return ""

    def repetitions(self, number: int) -> list[str]:
        """The first component of each repetition of a field (e.g. the lines of TX)."""
        return [rep[0][0] if rep and rep[0] else "" for rep in self.field(number)]

    def encode(self) -> str:
        if self.name == "MSH":
            return "MSH" + FIELD + ENCODING_CHARACTERS + FIELD + FIELD.join(
                _encode_field(f) for f in self.fields[2:])
        return FIELD.join([self.name, *(_encode_field(f) for f in self.fields)])


def _encode_leaf(text: str) -> str:
    return text if isinstance(text, Escaped) else escape(text)


def _encode_field(field: Field) -> str:
    return REPETITION.join(
        COMPONENT.join(SUBCOMPONENT.join(_encode_leaf(s) for s in comp) for comp in rep)
        for rep in field)


def segment(name: str, *fields: FieldValue) -> Segment:
    """A segment from field values 1..n (MSH: use ``msh_segment``)."""
    if len(name) != 3 or not name.isalnum() or not name.isupper() or name == "MSH":
        raise HL7Error("segment name must be three upper-case letters or digits (not MSH)")
    normalised = [_field(f) for f in fields]
    while normalised and not normalised[-1]:
        normalised.pop()
    return Segment(name, tuple(normalised))


def msh_segment(*fields: FieldValue) -> Segment:
    """MSH from MSH-3 on; MSH-1 and MSH-2 are the standard encoding characters."""
    normalised = [(((Escaped(FIELD),),),), (((Escaped(ENCODING_CHARACTERS),),),),
                  *(_field(f) for f in fields)]
    while len(normalised) > 2 and not normalised[-1]:
        normalised.pop()
    return Segment("MSH", tuple(normalised))


@dataclass(frozen=True)
class HL7Message:
    """An HL7 v2 message. ``encode()`` gives the ER7 text (segments joined by CR, no
    trailing CR: MLLP framing adds the final one); ``to_bytes()`` the UTF-8 bytes that
    match MSH-18 ``UNICODE UTF-8``."""

    segments: tuple[Segment, ...]

    def __init__(self, segments: Iterable[Segment]):
        segs = tuple(segments)
        if not segs or segs[0].name != "MSH":
            raise HL7Error("a message starts with MSH")
        object.__setattr__(self, "segments", segs)

    def encode(self) -> str:
        return SEGMENT_TERMINATOR.join(s.encode() for s in self.segments)

    def to_bytes(self) -> bytes:
        return self.encode().encode("utf-8")

    def __str__(self) -> str:
        """Readable (one segment per line) — for previews; contains patient data."""
        return "\n".join(s.encode() for s in self.segments)

    def __repr__(self) -> str:
        # Never the content: a repr ends up in tracebacks and logs.
        return f"<HL7Message {self.message_type} {self.control_id} {len(self.segments)} segments>"

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        """MSH-10, the message control id."""
        return self.msh.value(10)

    @property
    def message_type(self) -> str:
        """MSH-9 as written, e.g. ``ORU^R01^ORU_R01``."""
        return COMPONENT.join(c[0] if c else "" for c in (self.msh.field(9) or ((),))[0])

    def named(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    @classmethod
    def parse(cls, text: str) -> "HL7Message":
        """Parse ER7 text (CR, LF or CRLF between segments; the delimiters are read from
        MSH). For tests and previews: this is not a tolerant production parser."""
        if not text.startswith("MSH") or len(text) < 8:
            raise HL7Error("not an HL7 v2 message (no MSH)")
        field_sep, enc = text[3], text[4:8]
        component, repetition, esc, sub = enc
        delimiters = field_sep + enc
        segments = []
        for line in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
            if not line:
                continue
            parts = line.split(field_sep)
            name, raw_fields = parts[0], parts[1:]
            if name == "MSH":
                raw_fields = raw_fields[1:]    # MSH-2 is not a value
            fields = [
                tuple(
                    tuple(tuple(unescape(s, delimiters) for s in c.split(sub)) for c in r.split(component))
                    for r in f.split(repetition))
                for f in raw_fields]
            normalised = [_field(Repeat(*r)) for r in fields]
            if name == "MSH":
                normalised = [(((Escaped(FIELD),),),), (((Escaped(ENCODING_CHARACTERS),),),), *normalised]
            floor = 2 if name == "MSH" else 0
            while len(normalised) > floor and not normalised[-1]:
                normalised.pop()
            segments.append(Segment(name, tuple(normalised)))
        return cls(segments)

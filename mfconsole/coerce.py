"""Coercion of the outgoing copy: header changes an administrator configures, on a rule
(the deliveries it makes) or on a DICOM destination (every delivery to it), applied at
send time to the copy that leaves. The stored object is never changed, nor are pixel
data and what follows it (mfconsole/dicomheader.py appends them untouched).

```toml
[[rules]]
name = "ct1"
when = { calling_aet = ["CT1"] }
to = ["pacs"]
coerce = [
  { prefix = "PatientID", value = "CT1-" },
  { issuer_of_patient_id = "HOSP_A" },              # only where none is given
  { set = "InstitutionName", value = "General Hospital" },
  { remove = "(0009,1001)" },
  { suffix = "StudyDescription", value = " (CT1)" },
  { copy = "StudyID", to = "AccessionNumber" },
  { map = "InstitutionName", table = "institutions.csv", missing = "fail" },
]
```

One key names the operation and the attribute, by keyword or "(gggg,eeee)"; top-level
attributes only. Operations run in order, each on the result of the one before; a
rule's run before its destination's. What they do with an attribute the object does
not carry: ``set`` adds it, ``prefix``/``suffix``/``remove`` leave it absent,
``copy`` from an absent attribute changes nothing, ``map`` looks up the empty value
(then ``default`` or ``missing``), ``issuer_of_patient_id`` sets (0010,0021) when it is
absent or empty (``override = true``: always). ``prefix``/``suffix`` change each value
of a multi-valued attribute; ``map`` looks up the whole value.

Values are text: the attribute's VR must be a text one (a private attribute names its
own: ``vr = "LO"``), checked at load against the VR's length and characters, and again
at send time with what the object holds (a prefix can make a value too long). Text is
decoded and encoded with the object's Specific Character Set (0008,0005); a value it
cannot encode, or a non-ASCII value in an object without one, fails that delivery. So
does a value a ``map`` with ``missing = "fail"`` does not list: a failed coercion
dead-letters the delivery (permanent, this object only) with a reason naming the
attribute and operation, never a value. Never coerced: command and file meta groups,
group lengths, items, pixel data and what follows, Specific Character Set, SOP Class
and SOP Instance UID (the C-STORE names them).

This module reads the configuration (``read``, called by config.py and rules.py with
config.py's reader) and applies it to a data set's bytes (``apply``, at send time and
in ``mfconsole routes explain``). It imports nothing of mfconsole at load time but
dicomheader (standard library only); pydicom is imported when a tag is looked up or a
value encoded.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mfconsole import dicomheader
from mfconsole.dicomheader import PIXELS_FROM, tag_text
from mfconsole.names import attribute_named

OPERATIONS = ("set", "remove", "prefix", "suffix", "copy", "map", "issuer_of_patient_id")
# The keys each operation's table takes (the first names it).
KEYS = {
    "set": frozenset({"set", "value", "vr"}),
    "remove": frozenset({"remove"}),
    "prefix": frozenset({"prefix", "value", "vr"}),
    "suffix": frozenset({"suffix", "value", "vr"}),
    "copy": frozenset({"copy", "to", "vr"}),
    "map": frozenset({"map", "table", "default", "missing", "vr"}),
    "issuer_of_patient_id": frozenset({"issuer_of_patient_id", "override"}),
}
ALL_KEYS = frozenset().union(*KEYS.values())
MISSING = ("keep", "fail")

ISSUER_OF_PATIENT_ID = 0x00100021
SPECIFIC_CHARACTER_SET = 0x00080005
PROTECTED = {
    SPECIFIC_CHARACTER_SET: "every other text value is encoded with it",
    0x00080016: "the C-STORE request names the SOP Class UID the object has",
    0x00080018: "the C-STORE request names the SOP Instance UID the object has",
}

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT"})
# Characters per value (PN: per component group), PS3.5 table 6.2-1; UC, UR, UT: none.
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
             "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
# One value whatever it holds: a backslash is text there, not a separator.
SINGLE_VALUED = frozenset({"LT", "ST", "UT", "UR"})
# Texts (not just codes and numbers): decoded with the Specific Character Set.
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
# VRs whose leading spaces are padding too (PS3.5 6.2).
LEADING_PADDING = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})
_CHARACTERS = {
    "AE": (re.compile(r"^[\x20-\x5B\x5D-\x7E]*$"), "the default repertoire, no backslash"),
    "AS": (re.compile(r"^(\d{3}[DWMY])?$"), "nnnD, nnnW, nnnM or nnnY"),
    "CS": (re.compile(r"^[A-Z0-9 _]*$"), "upper-case letters, digits, space and underscore"),
    "DA": (re.compile(r"^(\d{8})?$"), "YYYYMMDD"),
    "DS": (re.compile(r"^[0-9+\-Ee. ]*$"), "digits, + - E e . and space"),
    "DT": (re.compile(r"^[0-9+\-. ]*$"), "digits, + - . and space"),
    "IS": (re.compile(r"^[0-9+\- ]*$"), "digits, + - and space"),
    "TM": (re.compile(r"^[0-9. ]*$"), "digits, . and space"),
    "UI": (re.compile(r"^[0-9.]*$"), "digits and ."),
    "UR": (re.compile(r"^[\x21-\x7E]*( *)$"), "a URI without spaces"),
}
_CONTROL = re.compile(r"[\x00-\x1F\x7F]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0B\x0E-\x1F\x7F]")    # LT/ST/UT: TAB LF FF CR allowed


# -- what the configuration holds --------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """A lookup table of a ``map``: a two-column CSV file (from,to) beside config.toml,
    read at load (and at every reload)."""
    path: Path
    rows: tuple[tuple[str, str], ...]
    lookup: dict[str, str] = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        self.lookup.update(self.rows)


@dataclass(frozen=True)
class Operation:
    op: str                 # one of OPERATIONS
    tag: int                # the attribute it changes (copy: the one copied to)
    vr: str                 # that attribute's VR ("" for a private one removed)
    name: str               # its keyword, or (gggg,eeee): what records and messages say
    value: str = ""         # set, prefix, suffix; the issuer of issuer_of_patient_id
    source: int = 0         # copy: the attribute copied
    source_vr: str = ""
    source_name: str = ""
    table: Table | None = None
    default: str | None = None
    fail_missing: bool = False
    override: bool = False

    @property
    def record(self) -> str:
        """What a delivery records when it changed something: attribute and operation."""
        return f"{self.name} {'set' if self.op == 'issuer_of_patient_id' else self.op}"

    def describe(self) -> str:
        """The operation in words, without its values (for explain and status)."""
        if self.op == "copy":
            return f"{self.name} copy from {self.source_name}"
        if self.op == "map":
            return f"{self.name} map through {self.table.path.name if self.table else '?'}"
        if self.op == "issuer_of_patient_id":
            return f"{self.name} set" + ("" if self.override else " when absent")
        return self.record


Coercion = tuple[Operation, ...]


def describe(ops: Coercion) -> str:
    return ", ".join(op.describe() for op in ops)


# -- reading config.toml -----------------------------------------------------------------

def read(r: Any, raw: Any, p: str, resolve: Callable[[str], Path]) -> Coercion:
    """``coerce = [...]`` at key path ``p``, with config.py's reader ``r`` (problems
    with key paths); ``resolve`` makes a table's file name a path beside config.toml.
    Valid operations only (the problems of the others are recorded)."""
    if not isinstance(raw, list):
        r.fail(p, 'must be a list of operations, e.g. coerce = [{ prefix = "PatientID", '
                  'value = "CT1-" }]')
        return ()
    out: list[Operation] = []
    for i, item in enumerate(raw):
        where = f"{p}[{i}]"
        if not isinstance(item, dict):
            r.fail(where, 'must be an inline table, e.g. { set = "InstitutionName", value = "…" }')
            continue
        named = [k for k in OPERATIONS if k in item]
        if len(named) != 1:
            r.fail(where, (f"names {len(named)} operations ({', '.join(named)}): one per table"
                           if named else f"names no operation (one of {', '.join(OPERATIONS)})"))
            if not named:
                r.table(item, where, ALL_KEYS)     # a misspelt operation: did you mean
            continue
        before = len(r.problems)
        r.table(item, where, KEYS[named[0]])
        op = _operation(r, item, where, named[0], resolve)
        if op is not None and len(r.problems) == before:
            out.append(op)
    return tuple(out)


def _operation(r: Any, t: dict[str, Any], p: str, kind: str,
               resolve: Callable[[str], Path]) -> Operation | None:
    if kind == "issuer_of_patient_id":      # its key holds the issuer, not an attribute
        value = _value(r, f"{p}.issuer_of_patient_id", t.get(kind), "LO", empty=False)
        override = r.get(t, p, "override", bool, False)
        if value is None or override is None:
            return None
        return Operation(kind, ISSUER_OF_PATIENT_ID, "LO", "IssuerOfPatientID", value=value,
                         override=override)
    vr_given = t.get("vr")
    if vr_given is not None and (not isinstance(vr_given, str) or vr_given not in TEXT_VRS):
        r.fail(f"{p}.vr", f"must be a text VR ({', '.join(sorted(TEXT_VRS))})")
        return None
    target = _attribute(r, f"{p}.{kind if kind != 'copy' else 'to'}",
                        t.get(kind if kind != "copy" else "to"), kind, vr_given,
                        present=kind != "copy" or "to" in t)
    if kind == "copy":
        source = _attribute(r, f"{p}.copy", t.get("copy"), "read", None)
        if target is None or source is None:
            return None
        return Operation("copy", target[0], target[1], target[2], source=source[0],
                         source_vr=source[1], source_name=source[2])
    if target is None:
        return None
    tag, vr, name = target
    if kind == "remove":
        return Operation("remove", tag, vr, name)
    if kind in ("set", "prefix", "suffix"):
        if "value" not in t:
            r.fail(f"{p}.value", "is required: the text to " + (
                "set" if kind == "set" else f"put {'before' if kind == 'prefix' else 'after'} the value"))
            return None
        value = _value(r, f"{p}.value", t["value"], vr, empty=kind == "set")
        return None if value is None else Operation(kind, tag, vr, name, value=value)
    # map
    missing = r.get(t, p, "missing", str, "keep",
                    lambda v: None if v in MISSING else 'must be "keep" or "fail"')
    default = _value(r, f"{p}.default", t["default"], vr, empty=True) if "default" in t else None
    if "default" in t and missing == "fail":
        r.fail(f"{p}.missing", 'cannot be "fail" with a default (unmapped values get the default)')
        return None
    if "table" not in t:
        r.fail(f"{p}.table", 'is required: a CSV file beside config.toml (from,to), e.g. '
                             'table = "institutions.csv"')
        return None
    table = read_table(r, f"{p}.table", t["table"], vr, resolve)
    if table is None or missing is None or ("default" in t and default is None):
        return None
    return Operation("map", tag, vr, name, table=table, default=default,
                     fail_missing=missing == "fail")


def _attribute(r: Any, where: str, raw: Any, kind: str, vr_given: str | None,
               present: bool = True) -> tuple[int, str, str] | None:
    """(tag, VR, name) of the attribute an operation names at ``where``; ``kind``
    "read" for the one a copy reads."""
    if not present or raw is None:
        r.fail(where, "is required: the attribute copied to (keyword or (gggg,eeee))")
        return None
    if not isinstance(raw, str):
        r.fail(where, "must be a DICOM keyword or (gggg,eeee)")
        return None
    tag, why = attribute_tag(raw)
    if why:
        r.fail(where, why)
        return None
    if kind != "read" and tag in PROTECTED:
        r.fail(where, f"cannot be coerced: {PROTECTED[tag]}")
        return None
    name, vr = _dictionary(tag)
    if vr_given is not None:
        if vr and vr != vr_given:
            r.fail(where.rsplit(".", 1)[0] + ".vr", f"applies to private attributes only: "
                   f"{name} has VR {vr}")
            return None
        vr = vr_given
    if kind == "remove":
        return tag, vr, name
    if not vr:
        r.fail(where, "is a private (or unknown) attribute: give its VR, e.g. vr = \"LO\""
               if kind != "read" else "is a private (or unknown) attribute: copy reads "
               "attributes of the DICOM dictionary only")
        return None
    if vr not in TEXT_VRS:
        r.fail(where, f"has VR {vr}: coercion reads and writes text values only"
               + (" (it can remove it)" if kind != "read" else ""))
        return None
    return tag, vr, name


def attribute_tag(text: str) -> tuple[int, str | None]:
    """(tag, None) for a keyword or "(gggg,eeee)" that coercion may touch, else (0, why)."""
    tag, why = attribute_named(text)
    if why:
        return 0, why
    group = tag >> 16
    if group in (0x0000, 0x0002, 0xFFFE) or tag & 0xFFFF == 0 or tag >= PIXELS_FROM:
        return 0, ("cannot be coerced: command, file meta, item, group length, pixel data and "
                   "what follows are never changed")
    if group & 1 and tag & 0xFFFF < 0x0010:
        return 0, "is not an attribute (private groups start at element 0010)"
    return tag, None


def _dictionary(tag: int) -> tuple[str, str]:
    """(keyword or (gggg,eeee), VR or "" when the dictionary does not know it or gives
    several)."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return tag_text(tag), ""
    return keyword_for_tag(tag) or tag_text(tag), vr


def _value(r: Any, where: str, raw: Any, vr: str, *, empty: bool) -> str | None:
    if not isinstance(raw, str):
        r.fail(where, "must be a string")
        return None
    if not raw and not empty:
        r.fail(where, "must not be empty")
        return None
    why = vr_problem(vr, raw)
    if why:
        r.fail(where, why)
        return None
    return raw


def vr_problem(vr: str, text: str) -> str | None:
    """Why ``text`` cannot be the value of an attribute of VR ``vr`` (several values
    separated by backslashes where the VR takes several), None if it can. Says lengths
    and rules, never the text."""
    values = [text] if vr in SINGLE_VALUED else text.split("\\")
    control = _TEXT_CONTROL if vr in SINGLE_VALUED else _CONTROL
    limit = MAX_CHARS.get(vr)
    characters = _CHARACTERS.get(vr)
    for i, value in enumerate(values):
        which = f"value {i + 1} " if len(values) > 1 else ""
        if control.search(value):
            return f"{which}holds a control character"
        if limit is not None:
            for part in (value.split("=") if vr == "PN" else [value]):
                if len(part) > limit:
                    what = "a component group" if vr == "PN" else "a value"
                    return (f"{which}is {len(part)} characters; {what} of VR {vr} holds at "
                            f"most {limit}")
        if characters is not None and not characters[0].match(value):
            return f"{which}holds what VR {vr} does not allow ({characters[1]})"
    return None


def read_table(r: Any, where: str, raw: Any, vr: str,
               resolve: Callable[[str], Path]) -> Table | None:
    """A map's CSV file: rows ``from,to`` (a first row "from,to" is a header; blank
    rows are skipped), UTF-8; every ``to`` a valid value of ``vr``, every ``from`` once.
    Problems name the row, never a value."""
    if not isinstance(raw, str) or not raw.strip():
        r.fail(where, 'must name a CSV file beside config.toml, e.g. "institutions.csv"')
        return None
    path = resolve(raw)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        r.fail(where, f"{path} does not exist")
        return None
    except OSError as exc:
        r.fail(where, f"{path} cannot be read ({exc.strerror or exc.__class__.__name__})")
        return None
    except UnicodeDecodeError as exc:
        r.fail(where, f"{path.name}: not UTF-8 (byte {exc.start})")
        return None
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    ok, first = True, True
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            header, first = first and [c.strip().lower() for c in cells] == ["from", "to"], False
            if header:
                continue
            if len(cells) != 2:
                r.fail(where, f"{path.name} row {line}: has {len(cells)} column(s); each row "
                              "is from,to")
                ok = False
                continue
            source, target = cells[0].strip(), cells[1].strip()
            if source in seen:
                r.fail(where, f"{path.name} row {line}: the same `from` as row {seen[source]}")
                ok = False
                continue
            why = vr_problem(vr, target)
            if why:
                r.fail(where, f"{path.name} row {line}: `to` {why}")
                ok = False
                continue
            seen[source] = line
            rows.append((source, target))
    except csv.Error as exc:
        r.fail(where, f"{path.name} row {reader.line_num}: not CSV ({exc.__class__.__name__})")
        return None
    return Table(path, tuple(rows)) if ok else None


# -- applying it to a data set -----------------------------------------------------------

class CoercionError(Exception):
    """A coercion that cannot be made on this object; the message names attributes and
    operations, never a value."""


@dataclass
class Result:
    data: bytes                            # the data set to send
    changes: list[str]                     # "PatientID prefix", in the order made
    # (attribute, before, after) of each change: patient data, kept only when asked
    # (``mfconsole routes explain --reveal``), never logged or stored.
    values: list[tuple[str, str | None, str | None]] = field(default_factory=list, repr=False)

    @property
    def words(self) -> str:
        """What a delivery records: "PatientID prefix, IssuerOfPatientID set" ("" when
        nothing changed)."""
        return ", ".join(self.changes)


def apply(ops: Coercion, data: bytes, transfer_syntax: str, *, keep_values: bool = False) -> Result:
    """``data`` with ``ops`` applied to its header (the tail, from (7FE0,0008) on, as it
    was); the same bytes when nothing changed. CoercionError when an operation cannot
    be made."""
    try:
        header = dicomheader.parse(data, transfer_syntax)
    except dicomheader.HeaderError as exc:
        raise CoercionError(f"the header cannot be read ({exc})") from None
    state = _State(header)
    changes: list[str] = []
    values: list[tuple[str, str | None, str | None]] = []
    made: dict[int, Operation] = {}          # tag -> the last operation that changed it
    for op in ops:
        before = state.text(op.tag, op.vr, op.name)
        after = _after(op, before, state)
        if after == before:
            continue
        state.check_literal(op, after if op.op == "map" else op.value)
        state.values[op.tag] = after
        made[op.tag] = op
        changes.append(op.record)
        if keep_values:
            values.append((op.name, before, after))
    if not made:
        return Result(data, [], values)
    encoded = {tag: (state.encode(op, state.values[tag]) if state.values[tag] is not None else None)
               for tag, op in made.items()}
    # An attribute removed that the object never had (set, then removed): nothing to do.
    encoded = {t: e for t, e in encoded.items() if e is not None or header.find(t) is not None}
    return Result(dicomheader.rebuild(header, encoded), changes, values)


def _after(op: Operation, before: str | None, state: "_State") -> str | None:
    """The attribute's text once ``op`` is made (None: absent)."""
    if op.op == "set":
        return op.value
    if op.op == "remove":
        return None
    if op.op in ("prefix", "suffix"):
        if not before:
            return before
        parts = [before] if op.vr in SINGLE_VALUED else before.split("\\")
        parts = [op.value + v if op.op == "prefix" else v + op.value for v in parts]
        return "\\".join(parts)
    if op.op == "copy":
        source = state.text(op.source, op.source_vr, op.source_name)
        return before if source is None else source
    if op.op == "issuer_of_patient_id":
        return before if before and not op.override else op.value
    # map
    assert op.table is not None
    key = before or ""
    if key in op.table.lookup:
        return op.table.lookup[key]
    if op.default is not None:
        return op.default
    if op.fail_missing:
        raise CoercionError(f"{op.name} map: the value is not in {op.table.path.name} "
                            '(missing = "fail")')
    return before


class _State:
    """The header being coerced: each attribute's text as the operations so far left it."""

    def __init__(self, header: dicomheader.Header):
        self.header = header
        self.values: dict[int, str | None] = {}
        element = header.find(SPECIFIC_CHARACTER_SET)
        self.charset = (header.value(element).decode("latin-1").strip(" \x00")
                        if element is not None and element.length != dicomheader.UNDEFINED else "")
        self._encodings: list[str] | None = None

    @property
    def encodings(self) -> list[str]:
        """Python codecs of the object's Specific Character Set (pydicom's reading of it;
        without one, pydicom's default, so bytes the object already holds read back)."""
        if self._encodings is None:
            from pydicom.charset import convert_encodings, default_encoding

            terms = [t.strip() for t in self.charset.split("\\")] if self.charset else []
            self._encodings = (convert_encodings([t or "ISO_IR 6" for t in terms]) if any(terms)
                               else convert_encodings([default_encoding]))
        return self._encodings

    def text(self, tag: int, vr: str, name: str) -> str | None:
        if tag in self.values:
            return self.values[tag]
        element = self.header.find(tag)
        if element is None:
            return None
        if element.length == dicomheader.UNDEFINED or element.vr == "SQ":
            raise CoercionError(f"{name} is a sequence in this object, not a text value")
        return self.decode(self.header.value(element), vr)

    def decode(self, raw: bytes, vr: str) -> str:
        if vr in CHARSET_VRS:
            from pydicom.charset import decode_bytes

            delimiters = {0x5C, 0x5E, 0x3D} if vr == "PN" else {0x5C}
            try:
                text = decode_bytes(raw, self.encodings, delimiters)
            except Exception:       # an unknown or broken character set
                text = raw.decode("latin-1")
        else:
            text = raw.decode("latin-1")
        text = text.rstrip(" \x00")
        return text.lstrip(" ") if vr in LEADING_PADDING else text

    def check_literal(self, op: Operation, literal: str | None) -> None:
        """Text the configuration brings in (not what the object holds already) must be
        ASCII in an object without a Specific Character Set."""
        if op.op in ("copy", "remove") or literal is None:
            return
        if not self.charset and not literal.isascii():
            raise CoercionError(f"{op.name} {op.record.split()[-1]}: the new value is not ASCII "
                                "and the object has no Specific Character Set (0008,0005)")

    def encode(self, op: Operation, text: str) -> bytes:
        """The whole element (tag, VR, length, value) in the object's syntax."""
        from pydicom import config
        from pydicom.dataelem import DataElement
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_data_element

        verb = op.record.split()[-1]
        why = vr_problem(op.vr, text)
        if why:
            raise CoercionError(f"{op.name} {verb}: the new value {why}")
        syntax = self.header.syntax
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = syntax.little, syntax.implicit
        element = DataElement(op.tag, op.vr, text, validation_mode=config.IGNORE)
        try:
            write_data_element(fp, element, self.encodings)
        except Exception as exc:     # never its text: it may quote the value
            raise CoercionError(f"{op.name} {verb}: the new value cannot be encoded "
                                f"({exc.__class__.__name__})") from None
        out = fp.getvalue()
        head = 8 if syntax.implicit or op.vr not in dicomheader.LONG_VRS else 12
        expected = text.rstrip(" \x00")
        if self.decode(out[head:], op.vr) != (expected.lstrip(" ") if op.vr in LEADING_PADDING
                                              else expected):
            raise CoercionError(f"{op.name} {verb}: the new value cannot be encoded in the "
                                "object's Specific Character Set (0008,0005)")
        return out

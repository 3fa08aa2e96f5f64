"""DICOM values as handlers and the HL7 mapping need them: codes, person names, dates
and times. Used by mfconsole/handlers (the SR tree, the handler contract) and
mfconsole/hl7 (data types from DICOM values); it imports neither.

Tolerant by design: vendor data carries empty, partial, legacy (``1999.12.31``,
``12:30:00``) and plain wrong values. Every function here returns an empty/None result
for what it cannot read, and never raises on a value (nor quotes one anywhere).
"""

from __future__ import annotations

from pydicom.uid import UID

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.datadict import tag_for_keyword
from pydicom.tag import BaseTag

__all__ = ["Code", "code_from", "person_name_parts", "parse_da", "parse_tm", "parse_dt",
           "value_of", "text_of", "first_item"]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept (DICOM code sequence item): code value, coding scheme
    designator, code meaning, and the scheme version when one is given."""

    value: str
    scheme: str
    meaning: str
    scheme_version: str = ""

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme}, \"{self.meaning}\")"

    def matches(self, value: str, scheme: str) -> bool:
        return self.value == value and self.scheme == scheme


_TAGS: dict[str, BaseTag] = {}


def _tag(keyword: str) -> BaseTag:
    tag = _TAGS.get(keyword)
    if tag is None:
        number = tag_for_keyword(keyword)
        if number is None:
            raise KeyError(f"no DICOM keyword {keyword}")
        tag = _TAGS[keyword] = BaseTag(number)
    return tag


def value_of(ds: Any, keyword: str) -> Any:
    """An element's value; None when absent or unreadable (a value pydicom cannot
    convert: bad bytes, a wrong VR). By tag, and absent elements cost no exception:
    an SR walk asks for many elements most items do not have."""
    tag = _tag(keyword)
    try:
        elem = ds.get_item(tag)
        if elem is None:
            return None
        if isinstance(elem, DataElement):    # converted already
            return elem.value
        return ds[tag].value                 # converts (charset, VR) and keeps the result
    except Exception:
        return None


def text_of(ds: Any, keyword: str) -> str:
    """A single-valued element as text ("" when absent, empty or unreadable).
    Multi-valued elements give their first value."""
    value = value_of(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip("\x00 ")


def first_item(ds: Any, keyword: str) -> Any | None:
    """The first item of a sequence (None when absent, empty or unreadable)."""
    seq = value_of(ds, keyword)
    try:
        return seq[0] if seq else None
    except Exception:
        return None


def code_from(item: Any) -> Code | None:
    """A Code from a code sequence item (Code Value, Long Code Value or URN Code Value);
    None when the item has no code value and no meaning."""
    if item is None:
        return None
    value = (text_of(item, "CodeValue") or text_of(item, "LongCodeValue")
             or text_of(item, "URNCodeValue"))
    meaning = text_of(item, "CodeMeaning")
    if not value and not meaning:
        return None
    return Code(value, text_of(item, "CodingSchemeDesignator"), meaning,
                text_of(item, "CodingSchemeVersion"))


def person_name_parts(pn: Any) -> tuple[str, str, str, str, str]:
    """(family, given, middle, prefix, suffix) of a DICOM PN value: the alphabetic
    group, or the first non-empty one (ideographic, phonetic) when it is empty."""
    text = "" if pn is None else str(pn)
    groups = text.split("=")
    chosen = next((g for g in groups if g.strip("^ ")), "")
    parts = [p.strip() for p in chosen.split("^")[:5]]
    parts += [""] * (5 - len(parts))
    return parts[0], parts[1], parts[2], parts[3], parts[4]


_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
                 r"([+-]\d{4})?")


def parse_da(text: str) -> tuple[str, date | None]:
    """DICOM DA → ("YYYYMMDD", date); ("", None) when not a valid date.
    Accepts the retired ``YYYY.MM.DD`` form."""
    s = (text or "").strip()
    if len(s) == 10 and s[4] == s[7] == ".":
        s = s.replace(".", "")
    m = _DA.fullmatch(s)
    if not m:
        return "", None
    try:
        return s, date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return "", None


def parse_tm(text: str) -> tuple[str, time | None]:
    """DICOM TM → ("HH[MM[SS[.F{1,6}]]]", time); ("", None) when invalid.
    Accepts the retired ``HH:MM:SS`` form. Precision is kept as written."""
    s = (text or "").strip().replace(":", "")
    m = _TM.fullmatch(s)
    if not m:
        return "", None
    hh, mm, ss, frac = int(m[1]), int(m[2] or 0), int(m[3] or 0), m[4] or ""
    if hh > 23 or mm > 59 or ss > 60:
        return "", None
    micro = int(frac.ljust(6, "0")) if frac else 0
    return s, time(hh, mm, min(ss, 59), micro)


def _offset(text: str | None) -> timezone | None:
    if not text:
        return None
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise ValueError
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if text[0] == "-" else delta)


def parse_dt(text: str) -> tuple[str, datetime | None]:
    """DICOM DT → ("YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]", datetime); ("", None) when
    invalid. Missing parts of the datetime default to their start (month 1, 00:00)."""
    s = (text or "").strip()
    m = _DT.fullmatch(s)
    if not m:
        return "", None
    try:
        y, mo, d = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        hh, mi, ss = int(m[4] or 0), int(m[5] or 0), int(m[6] or 0)
        if hh > 23 or mi > 59 or ss > 60:
            return "", None
        frac = m[7] or ""
        value = datetime(y, mo, d, hh, mi, min(ss, 59), int(frac.ljust(6, "0")) if frac else 0,
                         tzinfo=_offset(m[8]))
    except ValueError:
        return "", None
    return s, value


def ts_name(uid: str) -> str:
    """A transfer syntax's name, or its UID when the dictionary does not know it."""
    name = UID(uid).name
    return name if name != uid else f"transfer syntax {uid}"


def sop_name(uid: str) -> str:
    """A SOP class's name, or its UID when the dictionary does not know it."""
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"

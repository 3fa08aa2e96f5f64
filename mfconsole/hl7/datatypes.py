"""HL7 v2.5.1 data types from DICOM values, as field values for ``message.segment``.

Each function takes what a DICOM header or SR content item holds (strings as DICOM
writes them, ``Code`` objects, numbers) and returns an HL7 value. Nothing raises on a
bad DICOM value: an unreadable date gives an empty field, not an exception.

| DICOM | HL7 | here |
|---|---|---|
| DA ``YYYYMMDD`` | DT | ``dt`` |
| TM ``HHMMSS.FFFFFF`` | TM (4 fraction digits at most) | ``tm`` |
| DT, or DA + TM (+ Timezone Offset From UTC) | DTM / TS.1 | ``dtm``, ``dtm_of`` |
| PN ``Family^Given^Middle^Prefix^Suffix`` | XPN ``Family^Given^Middle^Suffix^Prefix`` (note the order) | ``xpn`` |
| PN + id | XCN, and CNN as subcomponents (OBR-32 is NDL) | ``xcn``, ``cnn`` |
| code sequence item | CE (OBX-3, OBR-4, OBX-6) / CWE (OBX-5) | ``ce``, ``cwe`` |
| DS / FD | NM (no exponent, no NaN) | ``nm`` |
| Patient's Sex | HL7 Table 0001 | ``sex`` |
| UT/LT/ST text | TX, one repetition per line | ``tx`` |
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from mfconsole.dicomvalues import Code, parse_da, parse_dt, parse_tm, person_name_parts
from mfconsole.hl7.escape import BR, escape, split_lines
from mfconsole.hl7.message import Escaped, Repeat

__all__ = ["dt", "tm", "dtm", "dtm_of", "ts_now", "xpn", "xcn", "cnn", "ce", "cwe", "nm",
           "sex", "tx"]

_MAX_FRACTION = 4      # HL7 DTM/TM: .S[S[S[S]]]
_MAX_EXPONENT = 100


def dt(da: str) -> str:
    """DICOM DA → HL7 DT (``YYYYMMDD``), "" when not a valid date."""
    return parse_da(da)[0]


def _cut_fraction(text: str) -> str:
    head, dot, frac = text.partition(".")
    return f"{head}.{frac[:_MAX_FRACTION]}" if dot else head


def tm(value: str) -> str:
    """DICOM TM → HL7 TM (precision kept, fraction cut to 4 digits)."""
    return _cut_fraction(parse_tm(value)[0])


def dtm(value: str) -> str:
    """DICOM DT → HL7 DTM (precision and UTC offset kept, fraction cut to 4 digits)."""
    text = parse_dt(value)[0]
    if not text:
        return ""
    offset = text[-5:] if len(text) > 5 and text[-5] in "+-" else ""
    body = text[:-5] if offset else text
    return _cut_fraction(body) + offset


def dtm_of(date: str, time: str = "", offset: str = "") -> str:
    """DICOM DA + TM (+ Timezone Offset From UTC ``+HHMM``) → HL7 DTM; the date
    alone when the time is unreadable, "" when the date is."""
    day = dt(date)
    if not day:
        return ""
    clock = tm(time)
    off = offset.strip() if len(offset.strip()) == 5 and offset.strip()[0] in "+-" \
        and offset.strip()[1:].isdigit() else ""
    return day + clock + (off if clock else "")


def ts_now(now: datetime) -> str:
    """A timezone-aware datetime → HL7 DTM to the second with its UTC offset."""
    text = now.strftime("%Y%m%d%H%M%S")
    return text + (now.strftime("%z") if now.utcoffset() is not None else "")


def xpn(pn: Any) -> tuple[str, ...]:
    """DICOM PN → XPN (family, given, middle, suffix, prefix)."""
    family, given, middle, prefix, suffix = person_name_parts(pn)
    return (family, given, middle, suffix, prefix)


def xcn(pn: Any, id_number: str = "") -> tuple[str, ...]:
    """DICOM PN (+ an id) → XCN (id, family, given, middle, suffix, prefix)."""
    return (id_number, *xpn(pn))


def cnn(pn: Any, id_number: str = "") -> tuple[tuple[str, ...]]:
    """DICOM PN (+ an id) → NDL whose first component is a CNN: the name parts are
    subcomponents there (OBR-32..35)."""
    return (xcn(pn, id_number),)


def ce(code: Code | None, fallback_text: str = "") -> tuple[str, ...]:
    """A Code → CE (identifier, text, coding system); text only when there is no code."""
    if code is None:
        return ("", fallback_text)
    return (code.value, code.meaning, code.scheme)


def cwe(code: Code | None) -> tuple[str, ...]:
    """A Code → CWE (identifier, text, coding system, ..., coding system version)."""
    if code is None:
        return ()
    return (code.value, code.meaning, code.scheme, "", "", "", code.scheme_version)


def nm(value: Any) -> str:
    """A number (Decimal, int, float or a DICOM DS string) → HL7 NM
    (``[+|-]digits[.digits]``); "" for what is not a finite number."""
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return ""
    # A finite number only, and not one whose plain notation would be absurdly long
    # ("1E999999999" fits in a DS and would expand to a billion digits).
    if not number.is_finite():
        return ""
    if number.is_zero():
        return "0"
    if not -_MAX_EXPONENT <= number.adjusted() <= _MAX_EXPONENT:
        return ""
    return format(number, "f")


_SEX = {"M": "M", "F": "F", "O": "O"}


def sex(value: str) -> str:
    """DICOM Patient's Sex (M, F, O, or empty) → HL7 Table 0001 (M, F, O, U)."""
    return _SEX.get((value or "").strip().upper(), "U")


def tx(text: str, line_breaks: Literal["repeat", "br"] = "repeat") -> Repeat | Escaped:
    """Report text → a TX field value.

    ``repeat`` (default): one repetition per line, the standard's encoding of hard
    line breaks in TX (v2.5.1 2.A.79). ``br``: one value with ``\\.br\\`` between lines,
    for receivers that ask for it. Trailing empty lines are dropped (TX: "trailing
    spaces should be removed"); everything else is kept exactly.
    """
    lines = split_lines(text or "")
    while lines and not lines[-1]:
        lines.pop()
    if line_breaks == "br":
        return Escaped(BR.join(escape(line) for line in lines))
    return Repeat(*lines)

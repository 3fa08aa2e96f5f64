"""HL7 v2 escaping (v2.5.1 chapter 2.7) for the standard encoding characters ``|^~\\&``.

``escape`` makes any text safe as one leaf value (a field, component or subcomponent):

* the delimiters become ``\\F\\`` ``\\S\\`` ``\\R\\`` ``\\T\\`` and the escape character
  itself ``\\E\\``;
* CR and LF become ``\\X0D\\`` and ``\\X0A\\`` (hexadecimal data, 2.7.5): a bare CR
  would end the segment, and the hex form keeps the exact characters;
* every other C0 control character and DEL becomes ``\\Xhh\\`` too. This matters
  beyond tidiness: 0x0B and 0x1C are the MLLP frame bytes, so a report text carrying
  them must never reach the wire as is. TAB is kept (it is display text);
* a lone surrogate (never valid Unicode, so never encodable as UTF-8) becomes U+FFFD.

Line breaks in report text (TX) are not escaped but *split*: v2.5.1 2.A.79 defines
the repetition separator of a TX field as a hard line break, so ``split_lines`` gives
the repetitions and OBX-5 carries one line per repetition. That is the standard's own
encoding for TX, it validates, and every conformant parser turns it back into lines.
``\\.br\\`` is defined only for FT (formatted text); ``BR`` is provided for receivers
that ask for it anyway (see ``mfconsole.hl7.datatypes.tx``). ``\\X0D0A\\`` is left out
for TX because its interpretation is "by site agreement" and many receivers show it raw.

``unescape`` reverses all of this (plus ``\\.br\\`` → LF and dropping ``\\H\\``/``\\N\\``
highlighting) and exists for tests and previews; production code only builds.
"""

from __future__ import annotations

import re

FIELD = "|"
COMPONENT = "^"
REPETITION = "~"
ESCAPE = "\\"
SUBCOMPONENT = "&"
ENCODING_CHARACTERS = COMPONENT + REPETITION + ESCAPE + SUBCOMPONENT    # MSH-2
BR = "\\.br\\"

_TABLE: dict[int, str] = {
    ord(ESCAPE): "\\E\\",
    ord(FIELD): "\\F\\",
    ord(COMPONENT): "\\S\\",
    ord(SUBCOMPONENT): "\\T\\",
    ord(REPETITION): "\\R\\",
}
_TABLE.update({c: f"\\X{c:02X}\\" for c in [*range(0x00, 0x20), 0x7F] if c != 0x09})
_TABLE.update({c: "\ufffd" for c in range(0xD800, 0xE000)})

# The characters that need work; most values have none, and a search is cheaper
# than a translate that rebuilds the string.
_NEEDS_ESCAPE = re.compile("[\\\\|^&~\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_LINE_BREAK = re.compile("\r\n|\r|\n")


def escape(text: str) -> str:
    """``text`` as one HL7 leaf value with the standard encoding characters."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text
    return text.translate(_TABLE)


def split_lines(text: str) -> list[str]:
    """The lines of ``text``: CRLF, CR and LF each end a line (and nothing else does:
    unlike ``str.splitlines`` this never splits at FF, VT or the MLLP frame bytes)."""
    return _LINE_BREAK.split(text)


_SEQUENCE = re.compile(r"\\([^\\]*)\\")
_NAMED = {"F": FIELD, "S": COMPONENT, "R": REPETITION, "T": SUBCOMPONENT, "E": ESCAPE,
          "H": "", "N": "", ".br": "\n"}
_HEX = re.compile(r"X((?:[0-9A-Fa-f]{2})+)")


def unescape(value: str, delimiters: str = FIELD + ENCODING_CHARACTERS) -> str:
    """Undo HL7 escape sequences in one leaf value (``delimiters`` as in MSH-1/MSH-2:
    field, component, repetition, escape, subcomponent). ``\\Xhh..\\`` is read as UTF-8
    bytes (our MSH-18); sequences this module does not know are kept as they are."""
    field, component, repetition, esc, sub = delimiters[:5]
    if esc not in value:
        return value
    named = {**_NAMED, "F": field, "S": component, "R": repetition, "T": sub, "E": esc}
    if esc == "\\":
        pattern = _SEQUENCE
    else:
        e = re.escape(esc)
        pattern = re.compile(f"{e}([^{e}]*){e}")

    def one(m: re.Match[str]) -> str:
        body = m.group(1)
        if body in named:
            return named[body]
        hexdata = _HEX.fullmatch(body)
        if hexdata:
            return bytes.fromhex(hexdata.group(1)).decode("utf-8", "replace")
        return m.group(0)

    return pattern.sub(one, value)

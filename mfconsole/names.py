"""Checks of the names a configuration gives (AE titles, listener/destination/rule
names): below config.py and rules.py alike, so neither imports the other for them."""

from __future__ import annotations

import difflib
import re
from typing import Any

_TAG_TEXT = re.compile(r"^\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def ae_title_problem(value: Any) -> str | None:
    """DICOM AE title (VR AE): 1-16 characters of the default repertoire, no
    backslash, no control characters, not only spaces."""
    if not isinstance(value, str):
        return "must be a string"
    if not value.strip():
        return "must not be empty"
    if len(value) > 16:
        return f"is {len(value)} characters; an AE title has at most 16"
    if "\\" in value:
        return "must not contain a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "must not contain control characters"
    if any(ord(ch) > 0x7E for ch in value):
        return "must be plain ASCII"
    return None


def name_problem(value: str) -> str | None:
    return None if _NAME.match(value) else (
        "must be 1-64 characters: letters, digits, '_', '-', '.', starting with a letter or digit")


def attribute_named(text: str) -> tuple[int, str | None]:
    """(tag, None) for a DICOM keyword or "(gggg,eeee)", else (0, why) with the closest
    keyword as a hint. Which tags a setting may then name is the caller's to say."""
    from pydicom.datadict import keyword_dict

    found = _TAG_TEXT.match(text.strip())
    if found:
        return int(found.group(1), 16) << 16 | int(found.group(2), 16), None
    if text in keyword_dict:
        return keyword_dict[text], None
    hint = difflib.get_close_matches(text, keyword_dict, n=1, cutoff=0.8)
    return 0, ("is neither a DICOM keyword nor (gggg,eeee)"
               + (f" (did you mean '{hint[0]}'?)" if hint else ""))

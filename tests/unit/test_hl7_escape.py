"""HL7 v2 escaping and the message builder: every delimiter, line breaks, control
characters, and round trips through our parser and an independent one (python-hl7)."""

from __future__ import annotations

import random

import hl7 as python_hl7
import pytest

from mfconsole.hl7 import datatypes
from mfconsole.hl7.escape import BR, escape, split_lines, unescape
from mfconsole.hl7.message import (NULL, Escaped, HL7Error, HL7Message, Repeat, is_empty,
                                   msh_segment, segment)

HOSTILE = [
    "", "plain", "|", "^", "~", "\\", "&", "|^~\\&", "\\E\\", "\\F\\\\S\\", "a\\", "\\a",
    "\r", "\n", "\r\n", "\n\r", "line1\rline2\nline3\r\nline4", "\x0b\x1c\x1d\x00\x7f",
    "tab\there", "Jörg Ñandú 東京 — ✓ 🩻", "\\X0D\\", "\\.br\\", "\\H\\bold\\N\\",
    "trailing space ", " leading",
]


@pytest.mark.parametrize("ch,seq", [("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"),
                                    ("\\", "\\E\\"), ("&", "\\T\\"), ("\r", "\\X0D\\"),
                                    ("\n", "\\X0A\\"), ("\x0b", "\\X0B\\"), ("\x1c", "\\X1C\\")])
def test_each_special_character_has_its_sequence(ch: str, seq: str) -> None:
    assert escape(f"a{ch}b") == f"a{seq}b"


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_is_safe_and_round_trips_exactly(text: str) -> None:
    out = escape(text)
    for forbidden in "|^~&\r\n\x0b\x1c":
        assert forbidden not in out
    assert all(c == "\\" or c == "\t" or ord(c) >= 0x20 for c in out)
    assert unescape(out) == text


def test_random_text_round_trips() -> None:
    rng = random.Random(5)
    alphabet = "ab |^~\\&\r\n\t\x00\x0b\x1c\x7féü東✓XE.br"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert unescape(escape(text)) == text


def test_lone_surrogates_become_replacement_characters() -> None:
    assert escape("a\ud800b") == "a\ufffdb"
    escape("x\udfff").encode("utf-8")      # encodable, never a UnicodeEncodeError later


def test_plain_text_is_returned_as_is() -> None:
    text = "No acute findings."
    assert escape(text) is text


def test_unescape_keeps_unknown_sequences_and_reads_formatting() -> None:
    assert unescape("a\\.br\\b") == "a\nb"
    assert unescape("\\H\\bold\\N\\") == "bold"
    assert unescape("\\Cxxyy\\") == "\\Cxxyy\\"
    assert unescape("\\XC3A9\\") == "é"          # hex data is UTF-8 bytes (MSH-18)
    assert unescape("no escapes") == "no escapes"


def test_split_lines_only_splits_at_cr_lf() -> None:
    assert split_lines("a\r\nb\rc\nd") == ["a", "b", "c", "d"]
    assert split_lines("a\x0cb\x0bc\x1cd\u2028e") == ["a\x0cb\x0bc\x1cd\u2028e"]
    assert split_lines("a\n\nb\n") == ["a", "", "b", ""]


def test_tx_lines_are_repetitions_and_br_is_available() -> None:
    assert datatypes.tx("a\r\nb|c\n\nd\n\n") == Repeat("a", "b|c", "", "d")
    br = datatypes.tx("a\r\nb|c", line_breaks="br")
    assert isinstance(br, Escaped) and br == "a" + BR + "b\\F\\c"
    assert unescape(br) == "a\nb|c"


def _message(*segments) -> HL7Message:
    return HL7Message([msh_segment("APP", "FAC", "", "", "20260101000000", None,
                                   ("ORU", "R01", "ORU_R01"), "CTRL-1", "P", "2.5.1"),
                       *segments])


@pytest.mark.parametrize("text", HOSTILE)
def test_values_round_trip_through_our_parser_and_python_hl7(text: str) -> None:
    msg = _message(segment("OBX", "1", "ST", ("x", text), "", text, ("u", "", (text, text))),
                   segment("NTE", "1", None, Repeat(text, "second", text), "end"))
    er7 = msg.encode()
    assert "\n" not in er7 and er7.count("\r") == 2
    parsed = HL7Message.parse(er7)
    assert parsed == msg
    assert parsed.encode() == er7
    obx = parsed.named("OBX")[0]
    assert obx.value(5) == text and obx.value(3, 2) == text and obx.value(6, 3, 2) == text
    # An independent parser and unescaper reads the same values.
    other = python_hl7.parse(er7)
    assert other.unescape(str(other.segment("OBX")[5])) == text
    if text:    # python-hl7 collapses empty components, so there is nothing to index
        assert other.unescape(str(other.segment("OBX")[6][0][2][1])) == text
        assert other.unescape(str(other.segment("NTE")[3][2])) == text


def test_normalisation_trailing_empties_and_equality() -> None:
    a = segment("OBX", "1", "", ("a", "", None), None, None)
    b = segment("OBX", "1", None, ("a",))
    assert a == b and a.encode() == "OBX|1||a"
    assert segment("OBX", "1", Repeat("", "")).encode() == "OBX|1"
    # Blank lines inside a TX field are repetitions and survive.
    tx = segment("OBX", "1", "TX", None, None, datatypes.tx("a\n\nb"))
    assert tx.encode() == "OBX|1|TX|||a~~b"
    assert HL7Message.parse(_message(tx).encode()).named("OBX")[0].repetitions(5) == ["a", "", "b"]


def test_null_and_escaped_values_are_written_verbatim() -> None:
    seg = segment("PID", "1", None, NULL, None, Escaped("a\\.br\\b"))
    assert seg.encode() == 'PID|1||""||a\\.br\\b'


def test_msh_and_accessors() -> None:
    msg = _message(segment("PID", "1"))
    er7 = msg.encode()
    assert er7.startswith("MSH|^~\\&|APP|FAC|||20260101000000||ORU^R01^ORU_R01|CTRL-1|P|2.5.1\rPID|1")
    assert msg.control_id == "CTRL-1"
    assert msg.message_type == "ORU^R01^ORU_R01"
    assert msg.msh.value(12) == "2.5.1"
    assert msg.to_bytes() == er7.encode("utf-8")
    assert str(msg) == er7.replace("\r", "\n")


def test_parse_reads_other_delimiters_and_line_endings() -> None:
    msg = HL7Message.parse("MSH#$*/@#APP#FAC\r\nOBX#1#ST#a$b#x/F/#y*z@w\n")
    obx = msg.named("OBX")[0]
    assert obx.value(3, 2) == "b"
    assert obx.value(4) == "x#"
    assert obx.field(5) == ((("y",),), (("z", "w"),))


def test_repr_never_shows_content() -> None:
    msg = _message(segment("PID", "1", None, "SECRET-ID", None, ("Secret", "Name")))
    assert "SECRET" not in repr(msg) and "Secret" not in repr(msg)


def test_builder_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(HL7Error):
        segment("pid", "1")
    with pytest.raises(HL7Error):
        segment("MSH", "1")
    with pytest.raises(HL7Error):
        segment("OBX", 1)                  # numbers must be formatted (NM, DTM...)
    with pytest.raises(HL7Error):
        segment("OBX", ("a", 2.5))
    with pytest.raises(HL7Error):
        HL7Message([segment("PID", "1")])
    with pytest.raises(HL7Error):
        HL7Message.parse("PID|1")


def test_is_empty() -> None:
    assert is_empty(None) and is_empty("") and is_empty(("", ("", ""))) and is_empty(Repeat("", ""))
    assert not is_empty(NULL) and not is_empty(("", "x"))


@pytest.mark.parametrize("dicom,hl7", [
    ("20260131", "20260131"), ("2026.01.31", "20260131"), ("20260230", ""), ("2026", ""),
    ("", ""), ("garbage!", ""),
])
def test_dt(dicom: str, hl7: str) -> None:
    assert datatypes.dt(dicom) == hl7


@pytest.mark.parametrize("dicom,hl7", [
    ("12", "12"), ("1230", "1230"), ("123045", "123045"), ("123045.123456", "123045.1234"),
    ("12:30:45.5", "123045.5"), ("250000", ""), ("12x", ""),
])
def test_tm(dicom: str, hl7: str) -> None:
    assert datatypes.tm(dicom) == hl7


@pytest.mark.parametrize("dicom,hl7", [
    ("2026", "2026"), ("20260131235959.123456+0100", "20260131235959.1234+0100"),
    ("20260131235959-0500", "20260131235959-0500"), ("20261331", ""), ("", ""),
])
def test_dtm(dicom: str, hl7: str) -> None:
    assert datatypes.dtm(dicom) == hl7


def test_dtm_of_date_time_and_offset() -> None:
    assert datatypes.dtm_of("20260101", "120500.123456", "+0100") == "20260101120500.1234+0100"
    assert datatypes.dtm_of("20260101", "bad") == "20260101"
    assert datatypes.dtm_of("bad", "120000") == ""
    assert datatypes.dtm_of("20260101", "1200", "junk") == "202601011200"


@pytest.mark.parametrize("value,hl7", [
    ("12.50", "12.50"), ("-3", "-3"), ("1e3", "1000"), ("1.5E-2", "0.015"), (" 7 ", "7"),
    ("NaN", ""), ("inf", ""), ("1E999999999", ""), ("abc", ""), ("-0", "0"), ("0E-200", "0"),
])
def test_nm(value: str, hl7: str) -> None:
    assert datatypes.nm(value) == hl7


def test_names_and_sex() -> None:
    assert datatypes.xpn("Family^Given^Middle^Dr^Jr") == ("Family", "Given", "Middle", "Jr", "Dr")
    assert datatypes.xpn("=山田^太郎=やまだ^たろう") == ("山田", "太郎", "", "", "")
    assert datatypes.xpn("") == ("", "", "", "", "")
    assert datatypes.cnn("A^B", "42") == (("42", "A", "B", "", "", ""),)
    assert [datatypes.sex(s) for s in ("M", "F", "O", "", "x")] == ["M", "F", "O", "U", "U"]

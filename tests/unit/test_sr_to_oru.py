"""The shipped mapping handlers/sr_to_oru.py: every SR in pydicom's test files and
generated ones (each value type, nesting, hostile text, KOS, dose SR...) gives an
ORU^R01 that hl7apy parses and validates as HL7 v2.5.1 ORU_R01 in STRICT mode, whose
report text an independent unescaper (python-hl7) reads back exactly, and whose exact
output is pinned by golden files.

Regenerate the golden files after a deliberate mapping change (then review the diff):

    MFCONSOLE_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_sr_to_oru.py -k golden
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import hl7 as python_hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

import dicomgen
import srgen
from harness import CANARY_ID, CANARY_NAME
from mfconsole.handlers.api import Context, DicomObject, DicomParseError
from mfconsole.hl7 import header
from mfconsole.hl7.escape import split_lines
from mfconsole.hl7.message import HL7Error, HL7Message

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
REGENERATE = os.environ.get("MFCONSOLE_REGEN_GOLDEN") == "1"


def _load_handler():
    spec = importlib.util.spec_from_file_location("sr_to_oru_under_test", REPO / "handlers" / "sr_to_oru.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


handler = _load_handler()
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
CTX = Context(route="modalities", destination="ehr", destination_kind="mllp",
              sending_application="MFCONSOLE", sending_facility="RADIOLOGY",
              receiving_application="EHR", receiving_facility="HOSPITAL",
              message_control_id="MF000000000042", handler_name="sr_to_oru",
              handler_version=handler.VERSION, now=lambda: NOW)


def _generated(make: Callable, ts: str = ExplicitVRLittleEndian) -> Callable[[], DicomObject]:
    # Through bytes, as the engine hands objects to handlers.
    return lambda: DicomObject.from_bytes(srgen.dataset_bytes(make(), ts), ts)


def _no_patient():
    return srgen.sr(srgen.text(srgen.FINDING, "Unidentified."), patient_id="", patient_name="",
                    number=10)


def _preliminary():
    return srgen.sr(srgen.text(srgen.FINDING, "Draft."), completion="PARTIAL",
                    verification="UNVERIFIED", verifier=None, number=11)


CORPUS: dict[str, Callable[[], DicomObject]] = {
    **{Path(p).name: (lambda p=p: DicomObject.from_file(p)) for p in srgen.bundled_sr_files()},
    "every_value_type": _generated(srgen.every_value_type),
    "every_value_type_implicit": _generated(srgen.every_value_type, ImplicitVRLittleEndian),
    "hostile": _generated(srgen.hostile),
    "deep": _generated(lambda: srgen.deep(30)),
    "key_objects": _generated(lambda: srgen.key_objects(200)),
    "dose_report": _generated(srgen.dose_report),
    "basic_text": _generated(srgen.basic_text),
    "enhanced": _generated(srgen.enhanced),
    "comprehensive_3d": _generated(srgen.comprehensive_3d),
    "no_patient": _generated(_no_patient),
    "preliminary": _generated(_preliminary),
    "root_only": _generated(lambda: srgen.sr(number=12)),
}
GOLDEN_CASES = ["test-SR.dcm", "reportsi.dcm", "reportsi_with_empty_number_tags.dcm",
                "every_value_type", "hostile", "key_objects", "dose_report", "basic_text"]

# hl7apy's tables are older than v2.5.1 in two places, and coding systems come from the
# DICOM data (DCM, SRT, SCT, LN, UCUM and local 99xxx schemes are passed through):
#  * Table 0125 lacks CWE (a v2.5 value type) and HD (IHE RAD-28 uses HD for the UIDs);
#  * Table 0396 is checked against whatever scheme the SR used.
ALLOWED_WARNINGS = re.compile(r"Value (CWE|HD) not in table HL70125 in element OBX\.OBX_2"
                              r"|Value .* not in table HL70396 in element (OBX_[356]|OBR_4)\.C[EW]+_3")

NM = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
DT = re.compile(r"\d{4}(\d{2}(\d{2})?)?")
TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,4})?)?)?([+-]\d{4})?")
DTM = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?")


def validate_strict(message: HL7Message, tmp_path: Path) -> None:
    """hl7apy: parse as v2.5.1 ORU_R01 in STRICT mode, validate, allow only the known
    table warnings, and check the group structure."""
    report = tmp_path / "hl7apy-report.txt"
    parsed = parse_message(message.encode(), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.name == "ORU_R01" and parsed.version == "2.5.1"
    Validator.validate(parsed, report_file=str(report))
    warnings = [w for w in report.read_text().splitlines() if not ALLOWED_WARNINGS.search(w)]
    assert warnings == []
    result = parsed.children.get("ORU_R01_PATIENT_RESULT")[0]
    assert [c.name for c in result.children] == ["ORU_R01_PATIENT", "ORU_R01_ORDER_OBSERVATION"]
    order = result.children.get("ORU_R01_ORDER_OBSERVATION")[0]
    observations = order.children.get("ORU_R01_OBSERVATION")
    assert len(observations) == len(message.named("OBX"))


def check_obx_values(message: HL7Message) -> None:
    """OBX-5 is 'varies' for hl7apy: check each value against the format of its OBX-2."""
    for n, obx in enumerate(message.named("OBX"), start=1):
        assert obx.value(1) == str(n)
        kind, value, status = obx.value(2), obx.value(5), obx.value(11)
        assert kind in {"HD", "TX", "NM", "CWE", "DT", "TM", "TS", "XPN", "ST", "RP"}
        assert status in {"F", "P", "X"}
        if status == "X":
            assert not obx.field(5)
            continue
        pattern = {"NM": NM, "DT": DT, "TM": TM, "TS": DTM}.get(kind)
        if pattern is not None:
            assert pattern.fullmatch(value), (kind, n)
        if kind == "RP":
            rep = obx.field(5)[0]
            assert len(rep) == 4 and rep[2][0] in ("IM", "AP") and rep[3][0] == "DICOM"
        if kind in ("TX", "ST", "HD") and obx.field(5):
            assert all(len(rep) <= 1 for rep in obx.field(5))      # no stray components
        if obx.value(14):
            assert DTM.fullmatch(obx.value(14))


def raw_field(er7: str, segment_line_index: int, field: int) -> str:
    return er7.split("\r")[segment_line_index].split("|")[field]


@pytest.mark.parametrize("name", CORPUS)
def test_every_sr_maps_to_a_valid_oru(name: str, tmp_path: Path) -> None:
    obj = CORPUS[name]()
    doc = obj.sr
    message = handler.handle(obj, CTX)
    assert isinstance(message, HL7Message)
    assert message.control_id == CTX.message_control_id
    assert message.message_type == "ORU^R01^ORU_R01"
    assert message.msh.value(12) == "2.5.1" and message.msh.value(18) == "UNICODE UTF-8"
    assert (message.msh.value(21, 1), message.msh.value(21, 2)) == ("sr_to_oru", handler.VERSION)
    assert message.msh.value(7) == "20260102030405+0100"
    assert [s.name for s in message][:5] == ["MSH", "PID", "PV1", "ORC", "OBR"]
    validate_strict(message, tmp_path)
    check_obx_values(message)
    # Our own parser gives the same message back.
    assert HL7Message.parse(message.encode()) == message or "\\.br\\" in message.encode()
    # RAD-28 linkage, then one OBX per content item with its position as OBX-4.
    obx = message.named("OBX")
    assert obx[0].value(3, 2) == "SR Instance UID" and obx[0].value(5) == obj.sop_instance_uid
    assert obx[1].value(3, 2) == "Study Instance UID"
    assert obx[1].value(5) == obj.dataset.StudyInstanceUID
    items = list(doc.walk())
    assert [o.value(4) for o in obx[2:]] == [i.position for i in items]
    assert all(o.value(3) or o.value(3, 2) for o in obx)        # OBX-3 never empty
    status = message.named("OBR")[0].value(25)
    assert status in ("F", "P") and all(o.value(11) in (status, "X") for o in obx)


@pytest.mark.parametrize("name", CORPUS)
def test_report_text_round_trips_through_an_independent_unescaper(name: str) -> None:
    obj = CORPUS[name]()
    er7 = handler.handle(obj, CTX).encode()
    lines = er7.split("\r")
    unescaper = python_hl7.parse(er7)
    by_position = {line.split("|")[4]: n for n, line in enumerate(lines) if line.startswith("OBX|")}
    for item in obj.sr.walk():
        if item.value_type != "TEXT":
            continue
        raw = raw_field(er7, by_position[item.position], 5)
        got = "\n".join(unescaper.unescape(rep) for rep in raw.split("~")) if raw else ""
        expected = split_lines(item.value)
        while expected and not expected[-1]:
            expected.pop()
        assert got == "\n".join(expected)


def test_hostile_text_survives_exactly() -> None:
    obj = CORPUS["hostile"]()
    message = handler.handle(obj, CTX)
    er7 = message.encode()
    assert "\x0b" not in er7 and "\x1c" not in er7 and "\n" not in er7
    assert er7.count("\r") == len(message.segments) - 1
    text_obx = next(o for o in message.named("OBX") if o.value(2) == "TX" and o.value(3) == "121071")
    assert "\n".join(text_obx.repetitions(5)) == "\n".join(split_lines(srgen.HOSTILE))
    pid = message.named("PID")[0]
    assert (pid.value(5, 1), pid.value(5, 2)) == ("Müller|Evil", "Jörg~&")
    code = next(o for o in message.named("OBX") if o.value(2) == "CWE")
    assert code.value(5, 1) == "T-1|^~&" and code.value(5, 2) == "Site | ^ ~ &\r\nX"
    assert message.to_bytes().decode("utf-8") == er7


def test_header_fields_of_a_full_report() -> None:
    message = handler.handle(CORPUS["every_value_type"](), CTX)
    pid = message.named("PID")[0]
    assert pid.field(3) == (((CANARY_ID,), (), (), ("HOSP",)),)
    assert pid.value(5, 1) + "^" + pid.value(5, 2) == CANARY_NAME
    assert (pid.value(7), pid.value(8)) == ("19700101", "F")
    orc = message.named("ORC")[0]
    assert (orc.value(1), orc.value(2), orc.value(3)) == ("RE", "PLC-1", "ACC0001")
    obr = message.named("OBR")[0]
    assert (obr.value(2), obr.value(3)) == ("PLC-1", "ACC0001")
    assert obr.field(4) == ((("RPID17",), ("CT Chest w/o",), ("99HOSP",)),)
    assert obr.value(7) == "20260101120500.1234"
    assert (obr.value(16, 2), obr.value(16, 3)) == ("Referrer", "Rob")
    assert (obr.value(18), obr.value(19), obr.value(22)) == ("ACC0001", "RP-1", "20260101120500.1234")
    assert (obr.value(24), obr.value(25)) == ("RAD", "F")
    assert obr.field(32) == ((("R123", "Radiologist", "Rita", "", "", "Dr"),),)


def test_value_types_map_as_documented() -> None:
    message = handler.handle(CORPUS["every_value_type"](), CTX)
    by_position = {o.value(4): o for o in message.named("OBX")}
    expect = {"1": ("TX", "Diagnostic Imaging Report"), "1.1": ("XPN", "Observer"),
              "1.3": ("TS", "20260101115959.5+0100"), "1.4": ("TX", "Findings"),
              "1.4.2": ("NM", "12.50"), "1.4.5": ("CWE", "39607008"), "1.4.6": ("DT", "20251231"),
              "1.4.7": ("TM", "235959.1234"), "1.4.8": ("RP", f"{srgen.ROOT_UID}.9.1"),
              "1.4.9": ("RP", f"{srgen.ROOT_UID}.9.2"), "1.4.11": ("ST", "POLYLINE 1.5 2 3.25 4"),
              "1.4.12": ("ST", "POINT 1 2 3"), "1.4.13": ("ST", "SEGMENT 0.5 1.5"),
              "1.4.14": ("ST", "1.4.1"), "1.2": ("ST", f"{srgen.ROOT_UID}.1.2")}
    for position, (kind, value) in expect.items():
        assert (by_position[position].value(2), by_position[position].value(5)) == (kind, value), position
    assert by_position["1.4.2"].field(6) == ((("mm",), ("millimeter",), ("UCUM",)),)
    assert by_position["1.4.3"].value(2) == "CWE" and by_position["1.4.3"].value(5) == "114006"
    assert by_position["1.4.4"].value(2) == "NM" and by_position["1.4.4"].value(11) == "X"
    assert by_position["1.4.8"].value(5, 3) == "IM" and by_position["1.4.9"].value(5, 3) == "AP"
    assert by_position["1.4.9"].value(3, 2) == "Composite Reference"      # no concept name


def test_preliminary_and_unidentified_reports() -> None:
    draft = handler.handle(CORPUS["preliminary"](), CTX)
    assert draft.named("OBR")[0].value(25) == "P"
    assert {o.value(11) for o in draft.named("OBX")} == {"P"}
    assert not draft.named("OBR")[0].field(32)
    unknown = handler.handle(CORPUS["no_patient"](), CTX)
    pid = unknown.named("PID")[0]
    assert pid.value(3) == '""' and pid.value(5) == '""' and pid.value(8) == "F"


def test_line_breaks_can_be_br_for_receivers_that_want_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(handler, "LINE_BREAKS", "br")
    message = handler.handle(CORPUS["basic_text"](), CTX)
    assert "Lungs clear.\\.br\\Heart normal size.|" in message.encode()
    validate_strict(message, tmp_path)


def test_non_sr_objects_are_filtered() -> None:
    ct = DicomObject.from_bytes(srgen.dataset_bytes(dicomgen.make_image(pixel_bytes=32 * 32 * 2)),
                                ExplicitVRLittleEndian)
    assert handler.handle(ct, CTX) is None
    assert handler.handle(DicomObject.from_file(get_testdata_file("CT_small.dcm")), CTX) is None


def test_message_is_reproducible_and_uses_the_delivery_control_id() -> None:
    first = handler.handle(CORPUS["every_value_type"](), CTX).encode()
    again = handler.handle(CORPUS["every_value_type"](), CTX).encode()
    assert first == again
    other = Context(**{**CTX.__dict__, "message_control_id": "MF000000000043"})
    assert handler.handle(CORPUS["every_value_type"](), other).control_id == "MF000000000043"


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden(name: str) -> None:
    text = str(handler.handle(CORPUS[name](), CTX)) + "\n"
    path = GOLDEN / f"sr_to_oru-{Path(name).stem}.hl7"
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    assert path.read_text(encoding="utf-8") == text, (
        f"{path.name} differs; if the change is intended: MFCONSOLE_REGEN_GOLDEN=1 pytest -k golden")


# ---- bad input: errors are routing-safe ----------------------------------------------

def _assert_no_phi(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        for secret in (CANARY_NAME, CANARY_ID, "ZZCANARY", "PHI"):
            assert secret not in text


def test_errors_on_bad_input_carry_no_phi() -> None:
    ds = srgen.sr(srgen.text(srgen.FINDING, CANARY_NAME), patient_id="")
    with pytest.raises(header.MappingError) as caught:
        header.pid(ds, require_patient_id=True)
    _assert_no_phi(caught.value)
    obj = DicomObject.from_bytes(srgen.dataset_bytes(srgen.sr()), ExplicitVRLittleEndian)
    no_id = Context(**{**CTX.__dict__, "message_control_id": ""})
    with pytest.raises(header.MappingError) as caught:
        handler.handle(obj, no_id)
    _assert_no_phi(caught.value)


def test_corrupted_objects_map_or_fail_without_phi() -> None:
    """Random byte damage to SRs full of canary PHI: each either fails to parse with a
    routing-safe DicomParseError or maps (None if the SOP class was hit) — the mapping
    itself never raises, and what it builds is still well-formed ER7. (Not necessarily
    valid v2.5.1: a length that swallowed the next elements gives values longer than
    HL7 allows, and the mapping does not cut identifiers short.)"""
    rng = random.Random(1137)
    sources = [srgen.dataset_bytes(srgen.every_value_type()), srgen.dataset_bytes(srgen.hostile()),
               srgen.dataset_bytes(srgen.dose_report())]
    mapped = 0
    for _ in range(200):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            obj = DicomObject.from_bytes(bytes(data), ExplicitVRLittleEndian)
        except DicomParseError as exc:
            _assert_no_phi(exc)
            continue
        message = handler.handle(obj, CTX)
        if message is None:
            continue
        er7 = message.encode()
        assert not set(er7) & {"\n", "\x0b", "\x1c"} and er7.count("\r") == len(message.segments) - 1
        assert HL7Message.parse(er7) == message
        python_hl7.parse(er7)
        mapped += 1
    assert mapped > 100


def test_builder_errors_name_no_values() -> None:
    with pytest.raises(HL7Error) as caught:
        header.obx(1, header.Observation("ST", ("", "x"), 12.5), "F")     # an unformatted number
    _assert_no_phi(caught.value)
    assert "12.5" not in str(caught.value)

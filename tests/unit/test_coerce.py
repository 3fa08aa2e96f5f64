"""Coercion of the outgoing copy (mfconsole/coerce.py, dicomheader.py, engine/coercion.py):
read from config.toml with key paths, applied to data sets in every uncompressed
transfer syntax, deflated ones too, with pixel data and every untouched element kept
byte for byte; `routes explain` shows it (values only on an audited --reveal)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from harness import CANARY_ID, CANARY_NAME, run, write_config
from mfconsole import coerce, dicomheader
from mfconsole.config import ConfigError, _Reader, load
from mfconsole.contract import Outbound, Outcome
from mfconsole.engine.coercion import Coercer
from mfconsole.engine.delivery import groups
from mfconsole.engine.outbox import Claimed
from mfconsole.engine.transform import Origin

IMPLICIT, EXPLICIT, BIG = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG = "1.2.840.10008.1.2.4.50"
SYNTAXES = [IMPLICIT, EXPLICIT, BIG, DEFLATED]
CT = "1.2.840.10008.5.1.4.1.1.2"
PIXELS = bytes(range(256)) * 8


def dataset(charset: str | None = None, **attrs: Any) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    ds.StudyID = "S42"
    ds.InstitutionName = "Hospital A"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-1", "SRT", CANARY_NAME
    ds.ProcedureCodeSequence = Sequence([item])
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns, ds.BitsAllocated = 32, 32, 16
    ds.PixelData = PIXELS
    return ds


def encode(ds: Dataset, ts: str) -> bytes:
    syntax = dicomheader.Syntax.of(ts)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = syntax.little, syntax.implicit
    write_dataset(fp, ds)
    data = fp.getvalue()
    return dicomheader.deflate(data) if syntax.deflated else data


def decode(data: bytes, ts: str) -> Dataset:
    syntax = dicomheader.Syntax.of(ts)
    raw = dicomheader.inflate(data) if syntax.deflated else data
    return read_dataset(DicomBytesIO(raw), syntax.implicit, syntax.little)


def ops(*items: dict[str, Any], folder: Path | None = None) -> coerce.Coercion:
    r = _Reader()
    got = coerce.read(r, list(items), "rules[0].coerce", lambda v: (folder or Path(".")) / v)
    assert not r.problems, r.problems
    return got


def spans(data: bytes, ts: str) -> dict[int, bytes]:
    header = dicomheader.parse(data, ts)
    return {e.tag: header.data[e.start:e.end] for e in header.elements}


def tail(data: bytes, ts: str) -> bytes:
    header = dicomheader.parse(data, ts)
    return header.data[header.end:]


# -- applying ------------------------------------------------------------------------------

@pytest.mark.parametrize("ts", SYNTAXES)
def test_every_operation_in_every_syntax(tmp_path, ts):
    (tmp_path / "institutions.csv").write_text("from,to\nHospital A,General Hospital\n")
    coercion = ops({"prefix": "PatientID", "value": "CT1-"}, {"issuer_of_patient_id": "HOSP_A"},
                   {"set": "StationName", "value": "CT01"}, {"remove": "(0009,1001)"},
                   {"suffix": "StudyDescription", "value": " (CT1)"},
                   {"copy": "StudyID", "to": "AccessionNumber"},
                   {"map": "InstitutionName", "table": "institutions.csv"}, folder=tmp_path)
    ds = dataset(StudyDescription="CHEST")
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "LO", "private value")
    data = encode(ds, ts)
    result = coerce.apply(coercion, data, ts)
    assert result.words == ("PatientID prefix, IssuerOfPatientID set, StationName set, (0009,1001) "
                            "remove, StudyDescription suffix, AccessionNumber copy, InstitutionName map")
    out = decode(result.data, ts)
    assert out.PatientID == "CT1-" + CANARY_ID and out.IssuerOfPatientID == "HOSP_A"
    assert out.StationName == "CT01" and 0x00091001 not in out and out[0x00090010].value == "ACME"
    assert out.StudyDescription == "CHEST (CT1)" and out.AccessionNumber == "S42"
    assert out.InstitutionName == "General Hospital"
    assert out.ProcedureCodeSequence[0].CodeMeaning == CANARY_NAME
    assert out.PixelData == PIXELS
    # Pixel data and every element not coerced: byte for byte (inflated, when deflated).
    assert tail(result.data, ts) == tail(data, ts)
    before, after = spans(data, ts), spans(result.data, ts)
    changed = {0x00100020, 0x00100021, 0x00081010, 0x00091001, 0x00081030, 0x00080050, 0x00080080}
    assert {t: s for t, s in before.items() if t not in changed} == \
           {t: s for t, s in after.items() if t not in changed}
    assert list(after) == sorted(after)          # added elements in tag order


def test_nothing_to_change_sends_the_same_bytes():
    coercion = ops({"prefix": "OtherPatientIDs", "value": "X"}, {"remove": "(0009,1001)"},
                   {"issuer_of_patient_id": "HOSP_A"}, {"copy": "AdmittingDiagnosesDescription",
                                                       "to": "AccessionNumber"})
    data = encode(dataset(IssuerOfPatientID="ALREADY"), EXPLICIT)
    result = coerce.apply(coercion, data, EXPLICIT)
    assert result.data is data and result.changes == [] and result.words == ""


def test_issuer_is_supplemented_unless_given_or_overridden():
    given = encode(dataset(IssuerOfPatientID="HOSP_B"), EXPLICIT)
    empty = encode(dataset(IssuerOfPatientID=""), EXPLICIT)
    assert coerce.apply(ops({"issuer_of_patient_id": "HOSP_A"}), given, EXPLICIT).changes == []
    assert decode(coerce.apply(ops({"issuer_of_patient_id": "HOSP_A"}), empty, EXPLICIT).data,
                  EXPLICIT).IssuerOfPatientID == "HOSP_A"
    forced = coerce.apply(ops({"issuer_of_patient_id": "HOSP_A", "override": True}), given, EXPLICIT)
    assert decode(forced.data, EXPLICIT).IssuerOfPatientID == "HOSP_A"
    assert forced.words == "IssuerOfPatientID set"


def test_operations_run_in_order_each_on_the_last_result():
    data = encode(dataset(), IMPLICIT)
    result = coerce.apply(ops({"set": "PatientID", "value": "A"}, {"prefix": "PatientID", "value": "B-"},
                              {"suffix": "PatientID", "value": "-C"}), data, IMPLICIT)
    assert decode(result.data, IMPLICIT).PatientID == "B-A-C"
    assert result.words == "PatientID set, PatientID prefix, PatientID suffix"
    gone = coerce.apply(ops({"set": "StationName", "value": "X"}, {"remove": "StationName"}), data, IMPLICIT)
    assert "StationName" not in decode(gone.data, IMPLICIT)


def test_prefix_applies_to_each_value_and_leaves_absent_ones_absent():
    data = encode(dataset(OtherPatientIDs=["A1", "B2"]), EXPLICIT)
    result = coerce.apply(ops({"prefix": "OtherPatientIDs", "value": "X-"},
                              {"prefix": "StationName", "value": "X-"}), data, EXPLICIT)
    out = decode(result.data, EXPLICIT)
    assert list(out.OtherPatientIDs) == ["X-A1", "X-B2"] and "StationName" not in out


def test_private_attributes_set_and_removed_in_implicit_and_explicit_vr():
    for ts in (IMPLICIT, EXPLICIT):
        ds = dataset()
        ds.add_new(0x00090010, "LO", "ACME")
        ds.add_new(0x00091002, "LO", "old")
        data = encode(ds, ts)
        result = coerce.apply(ops({"prefix": "(0009,1002)", "value": "new-", "vr": "LO"},
                                  {"set": "(0009,1003)", "value": "added", "vr": "SH"}), data, ts)
        out = decode(result.data, ts)
        value = out[0x00091002].value       # implicit VR: bytes (no VR to read them by)
        assert (value if isinstance(value, str) else value.decode()).rstrip() == "new-old"
        assert result.words == "(0009,1002) prefix, (0009,1003) set"
        assert spans(result.data, ts)[0x00091003].endswith(b"added ")


def test_odd_lengths_elsewhere_are_kept_and_the_coerced_element_is_even():
    ds = dataset()
    data = encode(ds, EXPLICIT)
    header = dicomheader.parse(data, EXPLICIT)
    station = b"\x08\x00\x10\x10SH\x03\x00ODD"          # (0008,1010) odd length, as some send
    at = next(e.end for e in header.elements if e.tag == 0x00080080)
    odd = data[:at] + station + data[at:]
    result = coerce.apply(ops({"suffix": "PatientID", "value": "-1"}), odd, EXPLICIT)
    assert spans(result.data, EXPLICIT)[0x00081010] == station
    assert len(spans(result.data, EXPLICIT)[0x00100020]) % 2 == 0
    assert tail(result.data, EXPLICIT) == tail(odd, EXPLICIT)


def test_group_length_elements_follow_their_group():
    data = encode(dataset(), EXPLICIT)
    header = dicomheader.parse(data, EXPLICIT)
    group = [e for e in header.elements if e.tag >> 16 == 0x0010]
    length = b"\x10\x00\x00\x00UL\x04\x00" + struct.pack("<I", sum(e.end - e.start for e in group))
    data = data[:group[0].start] + length + data[group[0].start:]       # as some still send
    result = coerce.apply(ops({"issuer_of_patient_id": "HOSP_A"}), data, EXPLICIT)
    header = dicomheader.parse(result.data, EXPLICIT)
    group = [e for e in header.elements if e.tag >> 16 == 0x0010 and e.tag & 0xFFFF]
    assert spans(result.data, EXPLICIT)[0x00100000] == (
        b"\x10\x00\x00\x00UL\x04\x00" + struct.pack("<I", sum(e.end - e.start for e in group)))
    assert len(group) == 3          # name, ID and the issuer added


def test_compressed_pixel_data_stays_encapsulated_byte_for_byte():
    ds = dataset()
    del ds.PixelData
    data = encode(ds, EXPLICIT)
    fragments = (b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
                 + b"\xfe\xff\x00\xe0\x06\x00\x00\x00\xff\xd8JPEG" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    result = coerce.apply(ops({"prefix": "PatientID", "value": "CT1-"}), data + fragments, JPEG)
    assert result.data.endswith(fragments)
    assert decode(result.data[:-len(fragments)], EXPLICIT).PatientID == "CT1-" + CANARY_ID


@pytest.mark.parametrize("charset, name, op, expected", [
    ("ISO_IR 100", "Müller^Jürgen", {"suffix": "PatientName", "value": "^^^Dr."}, "Müller^Jürgen^^^Dr."),
    ("ISO_IR 192", "Ωμέγα^Ελένη", {"prefix": "PatientName", "value": "Κ-"}, "Κ-Ωμέγα^Ελένη"),
    ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", {"prefix": "PatientName", "value": "X"},
     "XYamada^Tarou=山田^太郎=やまだ^たろう"),
])
def test_values_are_decoded_and_encoded_with_the_specific_character_set(charset, name, op, expected):
    ds = dataset(charset)
    ds.PatientName = name
    data = encode(ds, EXPLICIT)
    result = coerce.apply(ops(op, {"prefix": "PatientID", "value": "X-"}), data, EXPLICIT,
                          keep_values=True)
    out = decode(result.data, EXPLICIT)
    assert str(out.PatientName) == expected and out.PatientID == "X-" + CANARY_ID
    assert ("PatientName", name, expected) in result.values
    assert spans(result.data, EXPLICIT)[0x00080005] == spans(data, EXPLICIT)[0x00080005]


def test_a_value_the_character_set_cannot_encode_fails_naming_the_attribute_only():
    latin = encode(dataset("ISO_IR 100"), EXPLICIT)
    with pytest.raises(coerce.CoercionError) as info:
        coerce.apply(ops({"set": "InstitutionName", "value": "山田病院"}), latin, EXPLICIT)
    assert "InstitutionName set" in str(info.value) and "Specific Character Set" in str(info.value)
    plain = encode(dataset(), EXPLICIT)
    with pytest.raises(coerce.CoercionError, match="not ASCII and the object has no Specific"):
        coerce.apply(ops({"set": "InstitutionName", "value": "Hôpital"}), plain, EXPLICIT)
    # What the object itself holds in Latin-1 without a character set goes through as it was.
    ds = dataset()
    ds.InstitutionName = "Hôpital".encode("latin-1")
    kept = coerce.apply(ops({"suffix": "InstitutionName", "value": " Nord"}), encode(ds, EXPLICIT), EXPLICIT)
    assert spans(kept.data, EXPLICIT)[0x00080080].endswith("Hôpital Nord".encode("latin-1"))


def test_a_value_grown_too_long_fails_without_quoting_it():
    data = encode(dataset(PatientID="P" * 60), EXPLICIT)
    with pytest.raises(coerce.CoercionError) as info:
        coerce.apply(ops({"prefix": "PatientID", "value": "CT1-TOO-LONG-"}), data, EXPLICIT)
    assert str(info.value) == ("PatientID prefix: the new value is 73 characters; a value of VR LO "
                               "holds at most 64")
    long = encode(dataset(StudyDescription="D" * 30), EXPLICIT)
    with pytest.raises(coerce.CoercionError) as info:
        coerce.apply(ops({"copy": "StudyDescription", "to": "AccessionNumber"}), long, EXPLICIT)
    assert str(info.value) == ("AccessionNumber copy: the new value is 30 characters; a value of "
                               "VR SH holds at most 16")


def test_map_lookup_default_missing_and_absent(tmp_path):
    (tmp_path / "t.csv").write_text("Hospital A,General Hospital\n,Unknown site\n")
    data = encode(dataset(), EXPLICIT)
    other = encode(dataset(InstitutionName="Elsewhere"), EXPLICIT)
    absent = dataset()
    del absent.InstitutionName
    absent = encode(absent, EXPLICIT)
    keep = ops({"map": "InstitutionName", "table": "t.csv"}, folder=tmp_path)
    assert decode(coerce.apply(keep, data, EXPLICIT).data, EXPLICIT).InstitutionName == "General Hospital"
    assert coerce.apply(keep, other, EXPLICIT).changes == []
    assert decode(coerce.apply(keep, absent, EXPLICIT).data, EXPLICIT).InstitutionName == "Unknown site"
    default = ops({"map": "InstitutionName", "table": "t.csv", "default": "Other"}, folder=tmp_path)
    assert decode(coerce.apply(default, other, EXPLICIT).data, EXPLICIT).InstitutionName == "Other"
    fail = ops({"map": "InstitutionName", "table": "t.csv", "missing": "fail"}, folder=tmp_path)
    with pytest.raises(coerce.CoercionError) as info:
        coerce.apply(fail, other, EXPLICIT)
    assert str(info.value) == 'InstitutionName map: the value is not in t.csv (missing = "fail")'


def test_a_header_that_cannot_be_walked_fails_cleanly():
    data = encode(dataset(), EXPLICIT)
    with pytest.raises(coerce.CoercionError, match="the header cannot be read"):
        coerce.apply(ops({"set": "StationName", "value": "X"}), data[:40] + b"\x08\x00\x10\x10ZZ", EXPLICIT)


def test_with_original_pixels_keeps_the_tail_including_float_pixel_data():
    from mfconsole.engine.transform import with_original_pixels

    ds = dataset()
    ds.add_new(0x7FE00008, "OF", b"\x00\x00\x80\x3f" * 4)        # Float Pixel Data first
    for ts in SYNTAXES:
        data = encode(ds, ts)
        header = decode(data, ts)
        header.PatientID = "H"
        out = with_original_pixels(header, data, ts)
        assert tail(out, ts) == tail(data, ts) and decode(out, ts).PatientID == "H"
        assert decode(out, ts)[0x7FE00008].value == ds[0x7FE00008].value


# -- reading config.toml --------------------------------------------------------------------

DESTS = [{"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS"},
         {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": 2575}]


def problems(folder: Path, coercion: Any, *, rule: dict | None = None,
             destination: dict | None = None) -> list[tuple[str, str]]:
    dests = [dict(d) for d in DESTS]
    if destination is not None:
        dests[0].update(destination)
    rules = [{"name": "r", **(rule or {"to": ["pacs"]}),
              **({"coerce": coercion} if coercion is not None else {})}]
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    (folder / "handlers" / "h.py").write_text("VERSION = '1'\ndef handle(obj, ctx):\n    return None\n")
    path = write_config(folder, destinations=dests, routes=[], rules=rules)
    try:
        load(path)
    except ConfigError as exc:
        return exc.problems
    return []


BAD = [
    ({"prefix": "PatiendID", "value": "X"}, "rules[0].coerce[0].prefix",
     "is neither a DICOM keyword nor (gggg,eeee) (did you mean 'PatientID'?)"),
    ({"set": "PatientID", "value": "X" * 65}, "rules[0].coerce[0].value",
     "is 65 characters; a value of VR LO holds at most 64"),
    ({"set": "Modality", "value": "ct"}, "rules[0].coerce[0].value",
     "holds what VR CS does not allow (upper-case letters, digits, space and underscore)"),
    ({"set": "SOPInstanceUID", "value": "1.2"}, "rules[0].coerce[0].set",
     "cannot be coerced: the C-STORE request names the SOP Instance UID the object has"),
    ({"remove": "SpecificCharacterSet"}, "rules[0].coerce[0].remove",
     "cannot be coerced: every other text value is encoded with it"),
    ({"remove": "PixelData"}, "rules[0].coerce[0].remove",
     "cannot be coerced: command, file meta, item, group length, pixel data and what follows are "
     "never changed"),
    ({"set": "(0002,0010)", "value": "1.2"}, "rules[0].coerce[0].set", "cannot be coerced"),
    ({"set": "(0010,0000)", "value": "1"}, "rules[0].coerce[0].set", "cannot be coerced"),
    ({"set": "Rows", "value": "1"}, "rules[0].coerce[0].set",
     "has VR US: coercion reads and writes text values only (it can remove it)"),
    ({"prefix": "ProcedureCodeSequence", "value": "X"}, "rules[0].coerce[0].prefix", "has VR SQ"),
    ({"set": "(0009,1001)", "value": "X"}, "rules[0].coerce[0].set",
     'is a private (or unknown) attribute: give its VR, e.g. vr = "LO"'),
    ({"set": "PatientID", "value": "X", "vr": "SH"}, "rules[0].coerce[0].vr",
     "applies to private attributes only: PatientID has VR LO"),
    ({"set": "(0009,1001)", "value": "X", "vr": "US"}, "rules[0].coerce[0].vr", "must be a text VR"),
    ({"set": "PatientID", "prefix": "PatientID", "value": "X"}, "rules[0].coerce[0]",
     "names 2 operations (set, prefix): one per table"),
    ({"prefx": "PatientID"}, "rules[0].coerce[0].prefx", "unknown key (did you mean 'prefix'?)"),
    ({"prefix": "PatientID"}, "rules[0].coerce[0].value", "is required"),
    ({"prefix": "PatientID", "value": "X", "to": "StudyID"}, "rules[0].coerce[0].to", "unknown key"),
    ({"copy": "StudyID"}, "rules[0].coerce[0].to", "is required"),
    ({"copy": "(0009,1001)", "to": "StudyID"}, "rules[0].coerce[0].copy",
     "is a private (or unknown) attribute: copy reads attributes of the DICOM dictionary only"),
    ({"issuer_of_patient_id": ""}, "rules[0].coerce[0].issuer_of_patient_id", "must not be empty"),
    ({"issuer_of_patient_id": "A", "override": "yes"}, "rules[0].coerce[0].override",
     "must be true or false"),
    ({"map": "InstitutionName"}, "rules[0].coerce[0].table", "is required"),
    ({"map": "InstitutionName", "table": "t.csv", "missing": "drop"}, "rules[0].coerce[0].missing",
     'must be "keep" or "fail"'),
    ({"map": "InstitutionName", "table": "t.csv", "missing": "fail", "default": "X"},
     "rules[0].coerce[0].missing", 'cannot be "fail" with a default'),
    ("nope", "rules[0].coerce[0]", "must be an inline table"),
]


@pytest.mark.parametrize("item, key, why", BAD, ids=[b[1].rsplit(".", 1)[-1] + str(i)
                                                     for i, b in enumerate(BAD)])
def test_config_problems_name_their_key_path(tmp_path, item, key, why):
    (tmp_path / "t.csv").write_text("a,b\n")
    found = problems(tmp_path, [item])
    assert any(k == key and why in w for k, w in found), found


def test_coerce_must_be_a_list_and_fits_only_rules_that_send_dicom(tmp_path):
    assert problems(tmp_path / "a", {"set": "StationName"})[0][0] == "rules[0].coerce"
    found = problems(tmp_path / "b", [{"remove": "StationName"}], rule={"action": "discard"})
    assert found == [("rules[0].coerce", "only applies with `to` (a discarding rule sends nothing)")]
    found = problems(tmp_path / "c", [{"remove": "StationName"}], rule={"to": ["ehr"], "handler": "h"})
    assert any(k == "rules[0].coerce" and "applies to DICOM destinations only" in w for k, w in found)


def test_destination_coercion_and_send_as(tmp_path):
    assert problems(tmp_path / "a", None, destination={"coerce": [{"issuer_of_patient_id": "H"}],
                                                        "send_as": "calling_ae"}) == []
    found = problems(tmp_path / "b", None, destination={"coerce": [{"remove": "PatientIDD"}],
                                                        "send_as": "calling"})
    assert ("destinations[0].send_as", 'must be "calling_ae" or "configured"') in found
    assert any(k == "destinations[0].coerce[0].remove" and "did you mean 'PatientID'" in w
               for k, w in found)
    path = write_config(tmp_path / "c", destinations=[DESTS[1] | {"coerce": [{"remove": "Rows"}]}],
                        routes=[])
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems[0][0] == "destinations[0].coerce"
    assert "does not apply to an mllp destination" in info.value.problems[0][1]


def test_map_tables_are_checked_with_row_numbers_and_no_values(tmp_path):
    (tmp_path / "t.csv").write_text(
        f"from,to\n{CANARY_ID},A\n\n{CANARY_ID},B\nonly one column\n{CANARY_NAME},{'Z' * 70}\nx,y,z\n")
    found = problems(tmp_path, [{"map": "PatientID", "table": "t.csv"}])
    assert found == [
        ("rules[0].coerce[0].table", "t.csv row 4: the same `from` as row 2"),
        ("rules[0].coerce[0].table", "t.csv row 5: has 1 column(s); each row is from,to"),
        ("rules[0].coerce[0].table", "t.csv row 6: `to` is 70 characters; a value of VR LO holds at most 64"),
        ("rules[0].coerce[0].table", "t.csv row 7: has 3 column(s); each row is from,to")]
    assert CANARY_ID not in repr(found) and CANARY_NAME not in repr(found)
    missing = problems(tmp_path / "m", [{"map": "PatientID", "table": "absent.csv"}])
    assert missing[0][0] == "rules[0].coerce[0].table" and missing[0][1].endswith("does not exist")
    (tmp_path / "m" / "bin.csv").write_bytes(b"\xff\xfe,x\n")
    assert "not UTF-8" in problems(tmp_path / "m", [{"map": "PatientID", "table": "bin.csv"}])[0][1]


def test_a_loaded_configuration_holds_the_operations(tmp_path):
    (tmp_path / "i.csv").write_text("\ufefffrom,to\n\"Hospital A, North\",General\n")
    path = write_config(tmp_path, destinations=[DESTS[0] | {"coerce": [{"issuer_of_patient_id": "H"}]}],
                        routes=[], rules=[{"name": "r", "to": ["pacs"], "coerce": [
                            {"map": "InstitutionName", "table": "i.csv"}]}])
    cfg = load(path)
    assert coerce.describe(cfg.rules[0].coerce) == "InstitutionName map through i.csv"
    assert cfg.rules[0].coerce[0].table.lookup == {"Hospital A, North": "General"}
    assert coerce.describe(cfg.destinations[0].coerce) == "IssuerOfPatientID set when absent"
    assert load(path) == cfg                     # a reload with nothing changed changes nothing


# -- the engine's step ------------------------------------------------------------------------

def claimed(rule: str | None = None, calling: str = "CT1", study: str = "1.2") -> Claimed:
    return Claimed(1, 1, 0, "1.2.3", CT, EXPLICIT, study, 10, rule=rule, calling_ae=calling,
                   listener="modalities", peer="::ffff:10.0.0.7:40000", received_at=1.5e9)


def test_the_coercer_applies_the_current_rule_then_the_destination(tmp_path):
    path = write_config(tmp_path, destinations=[DESTS[0] | {"coerce": [{"suffix": "PatientID", "value": "-D"}]},
                                                DESTS[1]], routes=[],
                        rules=[{"name": "r", "to": ["pacs"], "coerce": [{"prefix": "PatientID", "value": "R-"}]}])
    cfg = load(path)
    rules = {r.name: r for r in cfg.rules}
    step = Coercer(cfg.destination("pacs"), lambda: rules)
    obj = Outbound(CT, "1.2.3", EXPLICIT, encode(dataset(), EXPLICIT))
    out, words = step(claimed("r"), obj)
    assert decode(out.data, EXPLICIT).PatientID == f"R-{CANARY_ID}-D"
    assert words == "PatientID prefix, PatientID suffix"
    out, words = step(claimed(None), obj)            # routes or fallback: the destination's only
    assert decode(out.data, EXPLICIT).PatientID == f"{CANARY_ID}-D"
    rules.clear()                                    # the rule removed by a reload
    gone, words = step(claimed("r"), obj)
    assert isinstance(gone, Outcome) and gone.persistence == "permanent" and gone.scope == "message"
    assert gone.reason.startswith("routed by rule r, which is no longer configured") and words is None
    # An HL7 destination: never coerced, its rule gone or not.
    assert Coercer(cfg.destination("ehr"), lambda: rules)(claimed("r"), obj) == (obj, None)


def test_a_failed_coercion_is_a_permanent_message_outcome_naming_tags_only(tmp_path):
    path = write_config(tmp_path, destinations=[DESTS[0] | {"coerce": [
        {"prefix": "PatientID", "value": "X" * 60}]}], routes=[])
    step = Coercer(load(path).destination("pacs"), dict)
    out, words = step(claimed(), Outbound(CT, "1.2.3", EXPLICIT, encode(dataset(), EXPLICIT)))
    assert isinstance(out, Outcome) and out.label == "permanent/message" and out.status == "coercion"
    assert out.reason.startswith("coercion not made: PatientID prefix: the new value is 71 characters")
    assert CANARY_ID not in out.reason and words is None


def test_groups_take_one_calling_ae_each_when_the_sender_presents_it():
    items = [claimed(calling=c, study=s) for c, s in (("MR1", "1"), ("CT1", "1"), ("MR1", "1"),
                                                       ("CT1", "2"))]
    assert [[i.calling_ae for i in g] for g in groups(items, 8, 0)] == [["MR1", "CT1", "MR1"], ["CT1"]]
    assert [[(i.calling_ae, i.study_uid) for i in g] for g in groups(items, 8, 0, by_calling_ae=True)] \
        == [[("CT1", "1")], [("CT1", "2")], [("MR1", "1"), ("MR1", "1")]]


def test_the_origin_of_a_delivery():
    o = Origin.of(claimed())
    assert (o.listener, o.calling_ae, o.peer) == ("modalities", "CT1", "::ffff:10.0.0.7")
    assert o.received_at is not None and o.received_at.utcoffset().total_seconds() == 0
    assert Origin.of({"peer": "10.1.2.3:104", "received_at": None}).peer == "10.1.2.3"
    assert Origin.of({}).received_at is None


def test_send_as_chooses_the_calling_ae_title():
    from mfconsole.dimse.sender import Peer

    peer = Peer("127.0.0.1", 104, "PACS", calling_ae="MF", send_as="calling_ae")
    assert peer.calling_for("CT1 ") == "CT1"
    assert peer.calling_for("") == "MF" and peer.calling_for("BAD\\AE") == "MF"
    assert peer.calling_for("X" * 17) == "MF"
    assert Peer("127.0.0.1", 104, "PACS", calling_ae="MF").calling_for("CT1") == "MF"


# -- mfconsole routes explain ----------------------------------------------------------------

def part10(path: Path, ds: Dataset) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.save_as(path, enforce_file_format=True)
    return path


def test_explain_shows_coercion_and_reveals_values_only_when_asked_and_audited(tmp_path):
    path = write_config(tmp_path, destinations=[DESTS[0] | {"coerce": [{"issuer_of_patient_id": "HOSP_A"}]}],
                        routes=[], rules=[{"name": "ct1", "when": {"calling_aet": ["CT1"]}, "to": ["pacs"],
                                           "coerce": [{"prefix": "PatientID", "value": "CT1-"}]}],
                        routing={"fallback": []})
    file = part10(tmp_path / "ct.dcm", dataset())
    cmd = [sys.executable, "-m", "mfconsole", "--config", str(path), "routes", "explain", str(file),
           "--calling", "CT1"]
    res = run(cmd)
    assert res.returncode == 0, res.stderr
    assert "coercion for pacs: PatientID prefix, IssuerOfPatientID set when absent" in res.stdout
    assert "  would change: PatientID prefix, IssuerOfPatientID set" in res.stdout
    assert CANARY_ID not in res.stdout + res.stderr
    # --reveal writes its audit row first; with no database yet, nothing is shown.
    res = run(cmd + ["--reveal"])
    assert res.returncode == 1 and "could not be audited" in res.stderr and CANARY_ID not in res.stdout
    from mfconsole.repository import db_path, reading, writing

    (tmp_path / "var").mkdir()
    with writing(db_path(tmp_path / "var")) as write:
        write(lambda tx: None)
    res = run(cmd + ["--reveal"])
    assert res.returncode == 0, res.stderr
    assert f"    PatientID: '{CANARY_ID}' -> 'CT1-{CANARY_ID}'" in res.stdout
    assert "    IssuerOfPatientID: (absent) -> 'HOSP_A'" in res.stdout
    with reading(db_path(tmp_path / "var")) as reads:
        rows = reads.rows("audit", event="phi_revealed")
    assert len(rows) == 1 and rows[0]["actor"] and "routes explain" in rows[0]["detail"]
    assert CANARY_ID not in json.dumps(rows) and "ct.dcm" not in json.dumps(rows)

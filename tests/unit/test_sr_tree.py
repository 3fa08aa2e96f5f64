"""The SR content tree (mfconsole.handlers.sr) and DicomObject (mfconsole.handlers.api):
every value type, by-reference items, odd vendor content, bounds, transfer syntaxes."""

from __future__ import annotations

import copy
import zlib
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

import dicomgen
import srgen
from harness import CANARY_ID, CANARY_NAME
from mfconsole.handlers import api
from mfconsole.handlers.api import DicomObject, DicomParseError
from mfconsole.handlers.sr import (BY_REFERENCE, UNKNOWN, Code, Coordinates, Measurement, Reference,
                                   SRDocument, TemporalCoordinates)


def test_bundled_srs_are_found() -> None:
    names = {Path(p).name for p in srgen.bundled_sr_files()}
    assert {"test-SR.dcm", "reportsi.dcm", "reportsi_with_empty_number_tags.dcm"} <= names


@pytest.mark.parametrize("path", srgen.bundled_sr_files(), ids=lambda p: Path(p).name)
def test_every_bundled_sr_reads_into_a_tree(path: str) -> None:
    obj = DicomObject.from_file(path)
    assert obj.is_sr
    doc = obj.sr
    assert doc is not None and not doc.truncated
    items = list(doc.walk())
    assert items[0] is doc.root and doc.root.position == "1" and doc.root.relationship == ""
    assert len({i.position for i in items}) == len(items) == len(doc)
    for item in items:
        assert item.value_type
        for n, child in enumerate(item.children, start=1):
            assert child.position == f"{item.position}.{n}" and child.depth == item.depth + 1


def test_comprehensive_test_sr_shapes() -> None:
    doc = DicomObject.from_file(get_testdata_file("test-SR.dcm")).sr
    kinds = {i.position: i.value_type for i in doc.walk()}
    assert kinds["1"] == "CONTAINER" and kinds["1.1"] == "UIDREF" and kinds["1.2"] == "CONTAINER"
    assert kinds["1.2.2"] == "NUM" and kinds["1.3.2"] == "SCOORD" and kinds["1.3.3"] == "TCOORD"
    assert kinds["1.5"] == "IMAGE" and kinds["1.5.2.2"] == "WAVEFORM"
    assert doc.title == Code("1111", "TEST", "Diagnosis")
    assert doc.find("1.2").concept is None                 # a container without a concept name
    num = doc.find("1.2.2").value
    assert num == Measurement(Decimal("3"), Code("cm", "99_OFFIS_DCMTK", "Length Unit", ""), None)
    byref = doc.find("1.3.3.1")
    assert byref.value_type == BY_REFERENCE and byref.value == "1.3.2"
    assert doc.resolve(byref) is doc.find("1.3.2")
    assert doc.resolve(doc.find("1.5.1.1.1")).position == "1.2.2.1"
    image = doc.find("1.5").value
    assert image.sop_instance_uid == "1.2.3.4.5.0" and image.frames == (5, 2)
    assert image.presentation.sop_instance_uid == "1.2.3.5.6.7"
    assert doc.find("1.5").observed_at == "20010213184746"
    assert doc.find("1.4.3").value == datetime(2000, 12, 6, 12, 0, 0)


def test_every_value_type_is_typed() -> None:
    doc = SRDocument.from_dataset(srgen.every_value_type())
    by_name = {}
    for item in doc.walk():
        by_name.setdefault(item.value_type, []).append(item)
    assert set(by_name) >= {"CONTAINER", "TEXT", "NUM", "CODE", "DATE", "TIME", "DATETIME", "PNAME",
                            "UIDREF", "IMAGE", "COMPOSITE", "WAVEFORM", "SCOORD", "SCOORD3D",
                            "TCOORD", BY_REFERENCE}
    text = by_name["TEXT"][0]
    assert text.value == "A 12 mm nodule in the right upper lobe.\r\nNo effusion."
    assert text.concept == Code("121071", "DCM", "Finding") and text.name == "Finding"
    length, failed, empty = by_name["NUM"]
    assert length.value == Measurement(Decimal("12.50"), Code("mm", "UCUM", "millimeter"))
    assert length.text == "12.50"
    assert failed.value == Measurement(None, None, Code("114006", "DCM", "Measurement failure"))
    assert empty.value == Measurement(None, None, None)
    assert by_name["CODE"][0].value == Code("39607008", "SCT", "Lung")
    assert by_name["DATE"][0].value == date(2025, 12, 31)
    assert by_name["TIME"][0].value == time(23, 59, 59, 123456)
    assert by_name["TIME"][0].text == "235959.123456"
    dt = by_name["DATETIME"][0]
    assert dt.value == datetime(2026, 1, 1, 11, 59, 59, 500000, tzinfo=timezone(timedelta(hours=1)))
    assert dt.relationship == "HAS OBS CONTEXT"
    assert by_name["PNAME"][0].value == "Observer^Olga"
    assert by_name["UIDREF"][0].value.endswith(".1.2")
    assert by_name["IMAGE"][0].value == Reference(srgen.CT_IMAGE, f"{srgen.ROOT_UID}.9.1", (3,))
    assert by_name["COMPOSITE"][0].concept is None
    assert by_name["SCOORD"][0].value == Coordinates("POLYLINE", (1.5, 2.0, 3.25, 4.0))
    assert by_name["SCOORD"][0].children[0].value_type == "IMAGE"
    assert by_name["SCOORD3D"][0].value == Coordinates("POINT", (1.0, 2.0, 3.0), f"{srgen.ROOT_UID}.8.1")
    assert by_name["TCOORD"][0].value == TemporalCoordinates("SEGMENT", (), (0.5, 1.5))
    ref = by_name[BY_REFERENCE][0]
    assert ref.value == "1.4.1" and doc.resolve(ref).value_type == "TEXT"


def _odd() -> DicomObject:
    no_type = Dataset()                      # neither a value type nor a reference
    no_type.RelationshipType = "CONTAINS"
    new_type = srgen.text(srgen.FINDING, "x")
    new_type.ValueType = "TABLE"             # a value type from a future DICOM
    bad_num = srgen.num(("1", "99X", "n"), "12.75")          # becomes "12,75" below
    no_units = srgen.num(("1", "99X", "n"), "2")
    del no_units.MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    no_text = srgen.text(None, "")
    del no_text.TextValue
    no_ref = srgen.reference("IMAGE", None, "", "")
    del no_ref.ReferencedSOPSequence
    empty_code = srgen.coded(None, ("", "", ""))
    bad_date = srgen.date(None, "2026-01-01")
    bad_time = srgen.time(None, "25:00")
    dangling = srgen.by_reference([1, 99, 7])
    empty_container = srgen.container(None)
    empty_container.ContentSequence = Sequence([])
    ds = srgen.sr(no_type, new_type, bad_num, no_units, no_text, no_ref, empty_code, bad_date,
                  bad_time, dangling, empty_container, title=None)
    # pydicom refuses to set an invalid DS; vendors write them anyway.
    raw = srgen.dataset_bytes(ds)
    assert raw.count(b"12.75") == 1
    return DicomObject.from_bytes(raw.replace(b"12.75", b"12,75"), ExplicitVRLittleEndian)


def test_odd_but_legal_content_never_raises() -> None:
    doc = _odd().sr
    items = {i.position: i for i in doc.walk()}
    assert doc.title is None and doc.root.value_type == "CONTAINER"
    assert items["1.1"].value_type == UNKNOWN and items["1.1"].value is None
    assert items["1.2"].value_type == UNKNOWN
    assert items["1.3"].value == Measurement(None, Code("mm", "UCUM", "mm"))
    assert items["1.3"].text == "12,75"
    assert items["1.4"].value == Measurement(Decimal("2"), None)
    assert items["1.5"].value == "" and items["1.5"].concept is None
    assert items["1.6"].value is None
    assert items["1.7"].value is None
    assert items["1.8"].value is None and items["1.8"].text == "2026-01-01"
    assert items["1.9"].value is None
    assert items["1.10"].value == "1.99.7" and doc.resolve(items["1.10"]) is None
    assert items["1.11"].children == ()


def test_root_without_value_type_is_a_container() -> None:
    ds = srgen.sr(srgen.text(srgen.FINDING, "x"))
    del ds.ValueType
    doc = SRDocument.from_dataset(ds)
    assert doc.root.value_type == "CONTAINER" and len(doc) == 2


def test_depth_is_bounded_and_says_so() -> None:
    doc = SRDocument.from_dataset(srgen.deep(40), max_depth=10)
    assert doc.truncated
    assert max(i.depth for i in doc.walk()) == 9
    full = SRDocument.from_dataset(srgen.deep(40))
    assert not full.truncated and max(i.depth for i in full.walk()) == 41


def test_depth_beyond_the_default_bound_is_cut_not_raised() -> None:
    from mfconsole.handlers.sr import MAX_DEPTH

    obj = DicomObject.from_bytes(srgen.dataset_bytes(srgen.deep(MAX_DEPTH + 20)), ExplicitVRLittleEndian)
    doc = obj.sr
    assert doc.truncated and max(i.depth for i in doc.walk()) == MAX_DEPTH - 1


def test_item_count_is_bounded() -> None:
    ds = srgen.sr(*[srgen.text(srgen.FINDING, str(n)) for n in range(50)])
    doc = SRDocument.from_dataset(ds, max_items=20)
    assert doc.truncated and len(doc) == 20


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_from_bytes_in_each_transfer_syntax(ts: str) -> None:
    ds = srgen.every_value_type()
    obj = DicomObject.from_bytes(srgen.dataset_bytes(ds, ts), ts)
    assert obj.is_sr and obj.transfer_syntax == ts
    assert obj.sop_class_uid == srgen.COMPREHENSIVE_SR and obj.sop_instance_uid == ds.SOPInstanceUID
    expected = [(i.position, i.value_type, i.concept, i.value)
                for i in SRDocument.from_dataset(ds).walk()]
    assert [(i.position, i.value_type, i.concept, i.value) for i in obj.sr.walk()] == expected
    assert obj.sr is obj.sr                  # read once


def test_from_bytes_deflated_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = srgen.dataset_bytes(srgen.every_value_type())
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packer.compress(raw) + packer.flush()
    obj = DicomObject.from_bytes(deflated, DeflatedExplicitVRLittleEndian)
    assert len(obj.sr) == len(SRDocument.from_dataset(srgen.every_value_type()))
    monkeypatch.setattr(api, "MAX_INFLATED_BYTES", 1024 * 1024)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(b"\0" * (2 * 1024 * 1024)) + packer.flush()
    with pytest.raises(DicomParseError):
        DicomObject.from_bytes(bomb, DeflatedExplicitVRLittleEndian)


def test_images_stop_before_pixel_data_and_are_not_sr() -> None:
    ds = dicomgen.make_image(pixel_bytes=64 * 64 * 2)
    obj = DicomObject.from_bytes(srgen.dataset_bytes(ds), ExplicitVRLittleEndian)
    assert not obj.is_sr and obj.sr is None
    assert "PixelData" not in obj.dataset and obj.dataset.Rows == ds.Rows


def test_large_values_are_deferred_and_still_readable() -> None:
    ds = srgen.sr(srgen.text(srgen.FINDING, "big." * 50000))
    ds.EncapsulatedDocument = b"%PDF" + b"\0" * 300000
    obj = DicomObject.from_bytes(srgen.dataset_bytes(ds), ExplicitVRLittleEndian)
    assert obj.dataset._dict[0x00420011].value is None          # not read yet
    assert len(obj.dataset.EncapsulatedDocument) == 300004
    assert obj.sr.find("1.1").value == "big." * 50000
    assert copy.deepcopy(obj.dataset).EncapsulatedDocument[:4] == b"%PDF"


def test_unknown_transfer_syntax_is_read_as_explicit_little_endian() -> None:
    raw = srgen.dataset_bytes(srgen.every_value_type())
    obj = DicomObject.from_bytes(raw, "1.2.3.4.5.6.7")
    assert len(obj.sr) > 10


def test_from_file_reads_part10_and_bare_data_sets(tmp_path: Path) -> None:
    ds = srgen.every_value_type()
    part10 = dicomgen.save(copy.deepcopy(ds), tmp_path / "sr.dcm")
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(srgen.dataset_bytes(ds, ImplicitVRLittleEndian))
    for path in (part10, bare):
        obj = DicomObject.from_file(path)
        assert obj.is_sr and len(obj.sr) == len(SRDocument.from_dataset(ds))


def test_unreadable_bytes_raise_without_phi() -> None:
    # An undefined-length sequence item that never ends, holding the canary.
    broken = (b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
              b"\x40\x00\x60\xa1UT\x00\x00\x10\x00\x00\x00" + CANARY_NAME.encode() + CANARY_ID.encode())
    with pytest.raises(DicomParseError) as caught:
        DicomObject.from_bytes(broken, ExplicitVRLittleEndian)
    exc = caught.value
    assert CANARY_NAME not in str(exc) and CANARY_ID not in str(exc)
    assert exc.__cause__ is None and exc.__suppress_context__
    # Junk that pydicom reads as something gives an object, not an error.
    junk = DicomObject.from_bytes(CANARY_ID.encode() * 3, ExplicitVRLittleEndian)
    assert not junk.is_sr and junk.sr is None


def test_reprs_never_show_values() -> None:
    obj = DicomObject.from_bytes(srgen.dataset_bytes(srgen.hostile()), ExplicitVRLittleEndian)
    shown = repr(obj) + repr(obj.sr) + "".join(repr(i) for i in obj.sr.walk())
    for secret in ("Müller", CANARY_ID, "pipe", "O'Brien"):
        assert secret not in shown

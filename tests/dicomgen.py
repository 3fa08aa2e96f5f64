"""Generate DICOM test objects (Part 10 files) with pydicom — no numpy.

Objects carry canary PHI by default so every test can grep for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.sequence import Sequence
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

from harness import CANARY_ID, CANARY_NAME

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_sr(study_uid: str | None = None, *, text: str = "No acute findings.",
            patient_name: str = CANARY_NAME, patient_id: str = CANARY_ID) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.ContentDate, ds.ContentTime = "20260101", "120500"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    finding.TextValue = text
    ds.ContentSequence = Sequence([finding])
    return ds


def make_image(study_uid: str | None = None, *, pixel_bytes: int = 512 * 512 * 2,
               patient_name: str = CANARY_NAME, patient_id: str = CANARY_ID,
               sop_class: str = CT_IMAGE) -> Dataset:
    """A CT-shaped image; pixel data is random bytes (never decoded)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = "20260101"
    side = int((pixel_bytes // 2) ** 0.5) or 1
    ds.Rows, ds.Columns = side, max(1, (pixel_bytes // 2) // side)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = os.urandom(ds.Rows * ds.Columns * 2)
    return ds


def save(ds: Dataset, path: Path, *, implicit: bool = False) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_corpus(folder: Path, count: int, kind: str = "sr", **kwargs) -> list[Path]:
    study = generate_uid()
    make = make_sr if kind == "sr" else make_image
    return [save(make(study, **kwargs), folder / f"{kind}{i:05d}.dcm") for i in range(count)]


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """The data set bytes of a Part 10 file (after the file meta) and its syntax."""
    with open(path, "rb") as f:
        ds = dcmread(f, stop_before_pixels=True, specific_tags=[(0x0002, 0x0010)])
        ts = str(ds.file_meta.TransferSyntaxUID)
    raw = Path(path).read_bytes()
    offset = _meta_end(raw)
    return raw[offset:], ts


def _meta_end(raw: bytes) -> int:
    """Offset of the first byte after the group 0002 file meta information."""
    import struct

    pos = 132 if raw[128:132] == b"DICM" else 0
    while pos + 8 <= len(raw):
        group, = struct.unpack_from("<H", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length, = struct.unpack_from("<I", raw, pos + 8)
            pos += 12 + length
        else:
            length, = struct.unpack_from("<H", raw, pos + 6)
            pos += 8 + length
    return pos

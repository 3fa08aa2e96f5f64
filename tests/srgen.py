"""Generate DICOM Structured Reports for the handler tests — no numpy.

``sr(item, ...)`` wraps content items in an SR document with canary PHI; the item
builders (``container``, ``text``, ``num``, ...) make one content item each. UIDs and
dates are fixed unless asked otherwise, so the objects are reproducible (golden files).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, UID

from harness import CANARY_ID, CANARY_NAME

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

ROOT_UID = "1.2.826.0.1.3680043.10.1137"     # a fixed prefix for reproducible objects


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


FINDING = ("121071", "DCM", "Finding")
IMPRESSION = ("121073", "DCM", "Impression")
FINDINGS = ("121070", "DCM", "Findings")
REPORT = ("18748-4", "LN", "Diagnostic Imaging Report")


def _item(value_type: str, concept: tuple[str, str, str] | None, relationship: str) -> Dataset:
    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ValueType = value_type
    if concept is not None:
        ds.ConceptNameCodeSequence = Sequence([code(*concept)])
    return ds


def container(concept, *children: Dataset, relationship: str = "CONTAINS") -> Dataset:
    ds = _item("CONTAINER", concept, relationship)
    ds.ContinuityOfContent = "SEPARATE"
    if children:
        ds.ContentSequence = Sequence(list(children))
    return ds


def text(concept, value: str, relationship: str = "CONTAINS") -> Dataset:
    ds = _item("TEXT", concept, relationship)
    ds.TextValue = value
    return ds


def num(concept, value: str | None, unit=("mm", "UCUM", "mm"), qualifier=None,
        relationship: str = "CONTAINS") -> Dataset:
    ds = _item("NUM", concept, relationship)
    if value is None:
        ds.MeasuredValueSequence = Sequence([])
    else:
        mv = Dataset()
        mv.NumericValue = value
        mv.MeasurementUnitsCodeSequence = Sequence([code(*unit)])
        ds.MeasuredValueSequence = Sequence([mv])
    if qualifier is not None:
        ds.NumericValueQualifierCodeSequence = Sequence([code(*qualifier)])
    return ds


def coded(concept, value, relationship: str = "CONTAINS") -> Dataset:
    ds = _item("CODE", concept, relationship)
    ds.ConceptCodeSequence = Sequence([code(*value)])
    return ds


def _valued(value_type: str, keyword: str, concept, value: str, relationship: str) -> Dataset:
    ds = _item(value_type, concept, relationship)
    setattr(ds, keyword, value)
    return ds


def date(concept, value: str, relationship: str = "CONTAINS") -> Dataset:
    return _valued("DATE", "Date", concept, value, relationship)


def time(concept, value: str, relationship: str = "CONTAINS") -> Dataset:
    return _valued("TIME", "Time", concept, value, relationship)


def datetime_(concept, value: str, relationship: str = "CONTAINS") -> Dataset:
    return _valued("DATETIME", "DateTime", concept, value, relationship)


def pname(concept, value: str, relationship: str = "HAS OBS CONTEXT") -> Dataset:
    return _valued("PNAME", "PersonName", concept, value, relationship)


def uidref(concept, value: str, relationship: str = "HAS OBS CONTEXT") -> Dataset:
    return _valued("UIDREF", "UID", concept, value, relationship)


def reference(value_type: str, concept, sop_class: str, sop_instance: str,
              frames: list[int] | None = None, relationship: str = "CONTAINS") -> Dataset:
    ds = _item(value_type, concept, relationship)
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_instance
    if frames:
        ref.ReferencedFrameNumber = frames
    ds.ReferencedSOPSequence = Sequence([ref])
    return ds


def scoord(concept, graphic_type: str, data: list[float], *children: Dataset,
           relationship: str = "INFERRED FROM", three_d: str = "") -> Dataset:
    ds = _item("SCOORD3D" if three_d else "SCOORD", concept, relationship)
    ds.GraphicType = graphic_type
    ds.GraphicData = data
    if three_d:
        ds.ReferencedFrameOfReferenceUID = three_d
    if children:
        ds.ContentSequence = Sequence(list(children))
    return ds


def tcoord(concept, range_type: str, offsets: list[float], relationship: str = "INFERRED FROM"
           ) -> Dataset:
    ds = _item("TCOORD", concept, relationship)
    ds.TemporalRangeType = range_type
    ds.ReferencedTimeOffsets = offsets
    return ds


def by_reference(target: list[int], relationship: str = "INFERRED FROM") -> Dataset:
    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ReferencedContentItemIdentifier = target
    return ds


def sr(*items: Dataset, sop_class: str = COMPREHENSIVE_SR, title=REPORT, number: int = 1,
       patient_name: str = CANARY_NAME, patient_id: str = CANARY_ID,
       completion: str = "COMPLETE", verification: str = "VERIFIED",
       verifier: str | None = "Radiologist^Rita^^Dr", accession: str = "ACC0001") -> Dataset:
    """An SR document whose root container holds ``items`` (fixed UIDs per ``number``)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{ROOT_UID}.3.{number}"
    ds.StudyInstanceUID = f"{ROOT_UID}.1.{number}"
    ds.SeriesInstanceUID = f"{ROOT_UID}.2.{number}"
    ds.Modality = "KO" if sop_class == KEY_OBJECT_SELECTION else "SR"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "Referrer^Rob"
    ds.StudyDescription = "CT CHEST"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.ContentDate, ds.ContentTime = "20260101", "120500.123456"
    ds.CompletionFlag, ds.VerificationFlag = completion, verification
    if verifier is not None:
        obs = Dataset()
        obs.VerifyingObserverName = verifier
        obs.VerifyingOrganization = "Radiology"
        obs.VerificationDateTime = "20260101121000"
        obs.VerifyingObserverIdentificationCodeSequence = Sequence([code("R123", "L", "Rita")])
        ds.VerifyingObserverSequence = Sequence([obs])
    request = Dataset()
    request.StudyInstanceUID = ds.StudyInstanceUID
    request.AccessionNumber = accession
    request.PlacerOrderNumberImagingServiceRequest = "PLC-1"
    request.FillerOrderNumberImagingServiceRequest = ""
    request.RequestedProcedureID = "RP-1"
    request.RequestedProcedureCodeSequence = Sequence([code("RPID17", "99HOSP", "CT Chest w/o")])
    ds.ReferencedRequestSequence = Sequence([request])
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    if title is not None:
        ds.ConceptNameCodeSequence = Sequence([code(*title)])
    if items:
        ds.ContentSequence = Sequence(list(items))
    return ds


def every_value_type(number: int = 2) -> Dataset:
    """A Comprehensive SR with one content item of each value type, nested."""
    img = f"{ROOT_UID}.9.1"
    return sr(
        pname(("121008", "DCM", "Person Observer Name"), "Observer^Olga"),
        uidref(("121018", "DCM", "Procedure Study Instance UID"), f"{ROOT_UID}.1.{number}"),
        datetime_(("111526", "DCM", "DateTime Started"), "20260101115959.5+0100",
                  relationship="HAS OBS CONTEXT"),
        container(FINDINGS,
                  text(FINDING, "A 12 mm nodule in the right upper lobe.\r\nNo effusion."),
                  num(("410668003", "SCT", "Length"), "12.50",
                      unit=("mm", "UCUM", "millimeter")),
                  num(("121206", "DCM", "Distance"), None,
                      qualifier=("114006", "DCM", "Measurement failure")),
                  num(("121207", "DCM", "Height"), None),
                  coded(("363698007", "SCT", "Finding Site"), ("39607008", "SCT", "Lung")),
                  date(("111060", "DCM", "Study Date"), "20251231"),
                  time(("111061", "DCM", "Study Time"), "235959.123456"),
                  reference("IMAGE", ("121112", "DCM", "Source of Measurement"), CT_IMAGE, img,
                            frames=[3]),
                  reference("COMPOSITE", None, "1.2.840.10008.5.1.4.1.1.11.1", f"{ROOT_UID}.9.2"),
                  reference("WAVEFORM", None, "1.2.840.10008.5.1.4.1.1.9.1.1", f"{ROOT_UID}.9.3"),
                  scoord(("111030", "DCM", "Image Region"), "POLYLINE", [1.5, 2.0, 3.25, 4.0],
                         reference("IMAGE", None, CT_IMAGE, img, relationship="SELECTED FROM"),
                         relationship="CONTAINS"),
                  scoord(("111030", "DCM", "Image Region"), "POINT", [1.0, 2.0, 3.0],
                         relationship="CONTAINS", three_d=f"{ROOT_UID}.8.1"),
                  tcoord(("111031", "DCM", "Temporal Region"), "SEGMENT", [0.5, 1.5],
                         relationship="CONTAINS"),
                  by_reference([1, 4, 1])),
        container(("121072", "DCM", "Impressions"), text(IMPRESSION, "Benign.")),
        number=number)


def deep(levels: int, number: int = 3) -> Dataset:
    """Containers nested ``levels`` deep with a TEXT at the bottom."""
    item = text(FINDING, f"at depth {levels}")
    for level in range(levels, 0, -1):
        item = container(("121070", "DCM", f"Level {level}"), item)
    return sr(item, number=number)


HOSTILE = ("pipe | caret ^ tilde ~ backslash \\ amp & \\E\\ \\F\\ literal escapes\r"
           "CR above, LF below\nCRLF next\r\nnon-ASCII: Jörg Ñandú 東京 — ✓\n"
           "\x0b\x1c frame bytes \x07 bell \t tab\n\n  leading spaces kept")


def hostile(number: int = 4) -> Dataset:
    """Report text and names full of HL7 delimiters, line breaks and non-ASCII. (A
    backslash is the DICOM value delimiter in every VR but text, so only the report
    text carries one.)"""
    return sr(
        pname(("121008", "DCM", "Person Observer Name"), "O'Brien|x^Ñandú^~&"),
        container(FINDINGS,
                  text(FINDING, HOSTILE),
                  coded(("363698007", "SCT", "Finding Site"), ("T-1|^~&", "SCT", "Site | ^ ~ &\r\nX"))),
        patient_name="Müller|Evil^Jörg~&", number=number)



def key_objects(images: int = 3, number: int = 5) -> Dataset:
    """A Key Object Selection Document ("Of Interest") flagging ``images`` CT images."""
    refs = [reference("IMAGE", None, CT_IMAGE, f"{ROOT_UID}.9.{n}") for n in range(1, images + 1)]
    ds = sr(text(("113012", "DCM", "Key Object Description"), "Nodule, see series 3."), *refs,
            sop_class=KEY_OBJECT_SELECTION, title=("113000", "DCM", "Of Interest"),
            number=number, verifier=None)
    del ds.CompletionFlag, ds.VerificationFlag
    return ds


def dose_report(number: int = 6) -> Dataset:
    """An X-Ray Radiation Dose SR shaped like TID 10011 (CT Radiation Dose)."""
    mgycm = ("mGy.cm", "UCUM", "mGy.cm")
    acquisition = container(
        ("113819", "DCM", "CT Acquisition"),
        text(("125203", "DCM", "Acquisition Protocol"), "Chest routine"),
        coded(("123014", "DCM", "Target Region"), ("T-D3000", "SRT", "Chest")),
        uidref(("113769", "DCM", "Irradiation Event UID"), f"{ROOT_UID}.7.1", relationship="CONTAINS"),
        container(("113829", "DCM", "CT Dose"),
                  num(("113830", "DCM", "Mean CTDIvol"), "7.42", unit=("mGy", "UCUM", "mGy")),
                  num(("113838", "DCM", "DLP"), "245.7", unit=mgycm)))
    return sr(
        coded(("121058", "DCM", "Procedure reported"), ("P5-08000", "SRT", "Computed Tomography X-Ray"),
              relationship="HAS CONCEPT MOD"),
        datetime_(("113809", "DCM", "Start of X-ray Irradiation"), "20260101115000",
                  relationship="HAS OBS CONTEXT"),
        container(("113811", "DCM", "CT Accumulated Dose Data"),
                  num(("113812", "DCM", "Total Number of Irradiation Events"), "1",
                      unit=("{events}", "UCUM", "events")),
                  num(("113813", "DCM", "CT Dose Length Product Total"), "245.7", unit=mgycm)),
        acquisition,
        sop_class=XRAY_DOSE_SR, title=("113701", "DCM", "X-Ray Radiation Dose Report"),
        number=number, verifier=None, completion="COMPLETE", verification="UNVERIFIED")


def basic_text(number: int = 7) -> Dataset:
    """A Basic Text SR: headings and report text, as a dictation system writes it."""
    return sr(container(("121060", "DCM", "History"), text(FINDING, "Cough for 3 weeks.")),
              container(FINDINGS, text(FINDING, "Lungs clear.\r\nHeart normal size.\r\n")),
              container(("121072", "DCM", "Impressions"), text(IMPRESSION, "Normal chest.")),
              sop_class=BASIC_TEXT_SR, number=number)


def enhanced(number: int = 8) -> Dataset:
    """An Enhanced SR: a measurement with the image region it was made on."""
    img = f"{ROOT_UID}.9.1"
    return sr(container(FINDINGS,
                        num(("410668003", "SCT", "Length"), "31", unit=("mm", "UCUM", "mm")),
                        scoord(("111030", "DCM", "Image Region"), "POLYLINE", [10, 10, 40, 30],
                               reference("IMAGE", None, CT_IMAGE, img, relationship="SELECTED FROM"))),
              sop_class=ENHANCED_SR, number=number)


def comprehensive_3d(number: int = 9) -> Dataset:
    return sr(container(FINDINGS,
                        scoord(("111030", "DCM", "Image Region"), "POLYGON",
                               [0, 0, 0, 10, 0, 0, 10, 10, 0, 0, 0, 0], relationship="CONTAINS",
                               three_d=f"{ROOT_UID}.8.2")),
              sop_class=COMPREHENSIVE_3D_SR, number=number)

def dataset_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` encoded as a C-STORE data set (no preamble, no file meta)."""
    ts = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def bundled_sr_files() -> list[str]:
    """pydicom's bundled test files that are Structured Reports (SR or KO)."""
    import warnings

    from pydicom import dcmread
    from pydicom.data import get_testdata_files

    from mfconsole.handlers.sr import is_sr_sop_class

    found = []
    for path in sorted(get_testdata_files()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SOPClassUID", "Modality"])
        except Exception:
            continue
        if is_sr_sop_class(str(ds.get("SOPClassUID", ""))) or ds.get("Modality") in ("SR", "KO"):
            found.append(path)
    return found

"""The STOW-RS request body: Part 10 files around the stored bytes, a safe boundary."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

import dicomgen
from mfconsole.contract import Outbound
from mfconsole.stow import multipart
from stow_server import split_multipart

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def outbound(implicit: bool = False, odd_uid: bool = False) -> Outbound:
    ds = dicomgen.make_sr()
    if odd_uid:
        ds.SOPInstanceUID = "1.2.3.45"       # odd length: padded with NUL in the meta
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return Outbound(ds.SOPClassUID, str(ds.SOPInstanceUID), IMPLICIT if implicit else EXPLICIT,
                    buf.getvalue(), str(ds.StudyInstanceUID))


def test_each_part_is_a_part10_file_around_the_unchanged_bytes(tmp_path):
    objs = [outbound(), outbound(implicit=True), outbound(odd_uid=True)]
    body = multipart.build(objs)
    raw = b"".join(body.chunks)
    assert len(raw) == body.length
    parts, types = split_multipart(raw, body.content_type)
    assert types == ["application/dicom"] * 3
    for obj, part in zip(objs, parts):
        assert part[:128] == b"\0" * 128 and part[128:132] == b"DICM"
        ds = dcmread(BytesIO(part))
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == obj.sop_class_uid
        assert meta.MediaStorageSOPInstanceUID == obj.sop_instance_uid
        assert meta.TransferSyntaxUID == obj.transfer_syntax
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.ImplementationClassUID == multipart.IMPLEMENTATION_CLASS_UID
        assert ds.SOPInstanceUID == obj.sop_instance_uid
        (tmp_path / "p.dcm").write_bytes(part)
        data, ts = dicomgen.dataset_bytes(tmp_path / "p.dcm")
        assert hashlib.sha256(data).digest() == hashlib.sha256(obj.data).digest()
        assert part.endswith(obj.data), "the data set bytes follow the meta unchanged"


def test_group_length_is_exact():
    header = multipart.part10_header(outbound())
    import struct
    (length,) = struct.unpack_from("<I", header, 132 + 8)
    assert 132 + 12 + length == len(header)


def test_content_type_names_type_and_boundary():
    body = multipart.build([outbound()])
    assert body.content_type.startswith('multipart/related; type="application/dicom"; boundary=mfconsole-')


def test_boundary_never_occurs_in_a_part(monkeypatch):
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(multipart.secrets, "token_hex", lambda n: next(tokens))
    obj = outbound()
    poisoned = Outbound(obj.sop_class_uid, obj.sop_instance_uid, obj.transfer_syntax,
                        obj.data + b"--mfconsole-" + b"a" * 32, obj.study_uid)
    body = multipart.build([poisoned])
    assert body.content_type.endswith("boundary=mfconsole-" + "b" * 32)


def test_boundaries_are_fresh():
    assert len({multipart.build([outbound()]).content_type for _ in range(20)}) == 20


def test_stored_bytes_are_not_copied():
    obj = outbound()
    body = multipart.build([obj])
    assert any(chunk is obj.data for chunk in body.chunks)

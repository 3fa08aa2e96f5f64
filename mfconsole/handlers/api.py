"""The handler contract: what ``handle(obj, ctx)`` receives and may return.

A handler is a module in ``handlers/`` with ``VERSION = "x.y.z"`` and::

    def handle(obj: DicomObject, ctx: Context) -> None | Dataset | HL7Message: ...

* ``None``: the delivery is filtered (counted and audited as such);
* a pydicom ``Dataset``: what a DIMSE or STOW destination sends (header only; the
  engine appends the original pixel data bytes);
* an ``HL7Message``: what an MLLP destination sends (``ctx.destination_kind == "mllp"``).

A handler that raises dead-letters that delivery under its name and version. Raise
with messages that name attributes and fields, never values (``MappingError``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime, timezone
from os import PathLike
from typing import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from mfconsole.dicomvalues import text_of
from mfconsole.dimse.dataset_scan import DatasetRejected, inflate
from mfconsole.handlers.sr import SRDocument, is_sr_sop_class
from mfconsole.hl7.header import MappingError
from mfconsole.hl7.message import HL7Message

__all__ = ["Context", "DicomObject", "HL7Message", "MappingError", "DicomParseError",
           "SRDocument"]

# The kind of a destination: "dimse", "stow", "mllp", or another registered one
# (mfconsole/kinds.py); the handler contract does not limit it.
DestinationKind = str

DEFLATED = "1.2.840.10008.1.2.1.99"
# Elements larger than this are read only when a handler touches them (the bytes are
# in memory already; this saves copying e.g. waveform data or an encapsulated PDF).
DEFER_SIZE = 64 * 1024
MAX_INFLATED_BYTES = 256 * 1024 * 1024


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Context:
    """What a handler knows about the delivery it runs for.

    ``message_control_id`` is fixed per delivery: a retry re-runs the handler with the
    same id, so an HL7 handler must put exactly it in MSH-10 (never invent one) and
    the receiver can recognise the duplicate. ``now()`` is the clock to stamp
    messages with (timezone-aware; fixed in tests, so output is reproducible).

    Where the object came from: the association's ``calling_ae`` and ``called_ae``,
    the sender's address ``peer`` (no port), the ``listener`` it arrived on and when it
    was stored, ``received_at`` (timezone-aware, UTC). Empty (None) where unknown: a
    preview on a file, an object stored before mfconsole recorded the called AE.
    """

    route: str
    destination: str
    destination_kind: DestinationKind
    sending_application: str = "MFCONSOLE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_control_id: str = ""
    handler_name: str = ""
    handler_version: str = ""
    now: Callable[[], datetime] = field(default=_utc_now, compare=False)
    processing_id: str = "P"        # MSH-11: P production, T training, D debugging
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    listener: str = ""
    received_at: datetime | None = None


class DicomParseError(ValueError):
    """The stored bytes could not be read as a data set (no values in the message)."""


class DicomObject:
    """One stored object as a handler sees it: the header (everything before Pixel
    Data, never decoded pixels) and, for an SR, its content tree.

    ``dataset`` is a pydicom Dataset; elements above ``DEFER_SIZE`` bytes are read when
    touched. Treat it as read-only and ``copy.deepcopy`` it to return a changed one.
    """

    def __init__(self, dataset: Dataset, transfer_syntax: str = "", *,
                 sop_class_uid: str = "", sop_instance_uid: str = ""):
        self.dataset = dataset
        self.transfer_syntax = str(transfer_syntax)
        self.sop_class_uid = sop_class_uid or text_of(dataset, "SOPClassUID")
        self.sop_instance_uid = sop_instance_uid or text_of(dataset, "SOPInstanceUID")

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, transfer_syntax: str, *,
                   sop_class_uid: str = "", sop_instance_uid: str = "") -> "DicomObject":
        """From a data set as stored (no preamble, no file meta) in ``transfer_syntax``."""
        ts = UID(str(transfer_syntax).rstrip("\x00 "))
        raw = bytes(data) if not isinstance(data, bytes) else data
        if ts == DEFLATED:
            raw = _inflate(raw)
            ts = UID("1.2.840.10008.1.2.1")
        try:
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        except (AttributeError, ValueError):
            # A private or unknown syntax: every known one but two is explicit LE.
            implicit, little = False, True
        fp = DicomBytesIO(raw)
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        try:
            ds = read_dataset(fp, implicit, little, stop_when=_at_pixel_data, defer_size=DEFER_SIZE)
        except Exception as exc:
            raise DicomParseError(f"the data set could not be read as {ts} "
                                  f"({exc.__class__.__name__})") from None
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ts
        # A FileDataset over the buffer, so deferred values can be read later.
        dataset = FileDataset(fp, ds, preamble=None, file_meta=meta,
                              is_implicit_VR=implicit, is_little_endian=little)
        return cls(dataset, str(transfer_syntax), sop_class_uid=sop_class_uid,
                   sop_instance_uid=sop_instance_uid)

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> "DicomObject":
        """From a DICOM file (Part 10, or a bare data set) — ``handlers run`` previews."""
        try:
            ds = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE, force=True)
        except OSError:
            raise
        except Exception as exc:
            raise DicomParseError(f"the file could not be read as DICOM "
                                  f"({exc.__class__.__name__})") from None
        ts = ""
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            ts = text_of(meta, "TransferSyntaxUID")
        return cls(ds, ts)

    @property
    def is_sr(self) -> bool:
        """A Structured Report (any SR storage class, Key Object Selection included)."""
        return is_sr_sop_class(self.sop_class_uid)

    @functools.cached_property
    def sr(self) -> SRDocument | None:
        """The SR content tree, read on first use; None for other objects."""
        return SRDocument.from_dataset(self.dataset) if self.is_sr else None

    def __repr__(self) -> str:
        return f"<DicomObject {self.sop_class_uid} {self.sop_instance_uid}>"


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    # Pixel Data, Float and Double Float Pixel Data, and whatever follows them.
    return tag >= 0x7FE00008


def _inflate(data: bytes) -> bytes:
    try:
        return bytes(inflate(memoryview(data), MAX_INFLATED_BYTES))
    except DatasetRejected as exc:
        raise DicomParseError(str(exc)) from None

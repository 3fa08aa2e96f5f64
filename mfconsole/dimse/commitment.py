"""Storage Commitment Push Model (PS3.4 Annex J) as bytes: the N-ACTION-RQ we send,
the N-EVENT-REPORT we are sent, and what each Failure Reason means for the object.

Command sets are written by hand like C-STORE's (mfconsole/dimse/cstore.py); the two
small data sets (Action Information, Event Information) go through pydicom, in the
transfer syntax of the presentation context they travel on. Protocol code: nothing
here knows of the engine or the database.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from mfconsole.dimse.cstore import _element, _uid

SOP_CLASS = "1.2.840.10008.1.20.1"          # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"     # its well-known SOP Instance
ACTION_REQUEST = 1                          # Action Type ID: Request Storage Commitment
EVENT_ALL_SUCCESS, EVENT_FAILURES = 1, 2    # Event Type IDs of the N-EVENT-REPORT

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
TRANSFER_SYNTAXES = [EXPLICIT_LE, IMPLICIT_LE]

N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
DATA_SET_PRESENT, NO_DATA_SET = 0x0001, 0x0101

# Failure Reason (0008,1197) values of PS3.4 J.3.2.1.1, by name.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}
# Worth sending the object again (and asking again): the PACS lost it or could not
# process it now. Any other reason (the class, the class/instance pair) would fail the
# same way again: the object becomes a dead letter naming it. An unknown reason is
# taken as retryable (bounded by commitment_retries, then a dead letter).
RETRYABLE_REASONS = frozenset({0x0110, 0x0112, 0x0213, 0x0131})
PERMANENT_REASONS = frozenset({0x0122, 0x0119})


def reason_words(code: int | None) -> str:
    """"0x0112 no such object instance": the code and its name, never a value."""
    if code is None:
        return "no failure reason given"
    return f"0x{code:04X} {FAILURE_REASONS.get(code, 'unknown reason')}"


def retryable(code: int | None) -> bool:
    return code not in PERMANENT_REASONS


@dataclass(frozen=True)
class Report:
    """An N-EVENT-REPORT of a storage commitment transaction."""
    transaction_uid: str
    event_type: int
    succeeded: tuple[tuple[str, str], ...] = ()                   # (SOP class, SOP instance)
    failed: tuple[tuple[str, str, int | None], ...] = field(default=())   # … + Failure Reason


class CommitmentError(ValueError):
    """An Event Information data set we cannot read (answered with a failure status)."""


def _set(body: bytes) -> bytes:
    return _element(0x0000, struct.pack("<I", len(body))) + body   # Command Group Length


def action_set(message_id: int) -> bytes:
    """The N-ACTION-RQ command set (PS3.7 10.3.4.1): Request Storage Commitment of the
    well-known instance; the data set (``action_information``) follows."""
    return _set(b"".join((
        _element(0x0003, _uid(SOP_CLASS)),                       # Requested SOP Class UID
        _element(0x0100, struct.pack("<H", N_ACTION_RQ)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", DATA_SET_PRESENT)),
        _element(0x1001, _uid(SOP_INSTANCE)),                    # Requested SOP Instance UID
        _element(0x1008, struct.pack("<H", ACTION_REQUEST)),     # Action Type ID
    )))


def event_report_response(message_id: int, event_type: int | None, status: int) -> bytes:
    """The N-EVENT-REPORT-RSP command set (PS3.7 10.3.1.2)."""
    parts = [
        _element(0x0002, _uid(SOP_CLASS)),                       # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", N_EVENT_REPORT_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
        _element(0x1000, _uid(SOP_INSTANCE)),                    # Affected SOP Instance UID
    ]
    if event_type is not None:
        parts.append(_element(0x1002, struct.pack("<H", event_type)))
    return _set(b"".join(parts))


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(buf, ds)
    return buf.getvalue()


def action_information(transaction_uid: str, refs: list[tuple[str, str]],
                       transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """Transaction UID and Referenced SOP Sequence (class and instance of each)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return _encode(ds, transfer_syntax)


def event_information(report: Report, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """An N-EVENT-REPORT's data set (what an SCP sends; the tests' peer uses it)."""
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.succeeded:
        ds.ReferencedSOPSequence = [_ref(c, i) for c, i in report.succeeded]
    if report.failed:
        seq = []
        for c, i, reason in report.failed:
            item = _ref(c, i)
            if reason is not None:
                item.FailureReason = reason
            seq.append(item)
        ds.FailedSOPSequence = seq
    return _encode(ds, transfer_syntax)


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def read_report(data: bytes | bytearray | memoryview, transfer_syntax: str,
                event_type: int | None) -> Report:
    """The Event Information of an N-EVENT-REPORT-RQ (PS3.4 J.3.3.1), read at once
    (no deferred values: the bytes are not kept)."""
    if event_type not in (EVENT_ALL_SUCCESS, EVENT_FAILURES):
        raise CommitmentError(f"event type {event_type} is not a storage commitment result")
    try:
        ds = read_dataset(DicomBytesIO(bytes(data)), transfer_syntax == IMPLICIT_LE, True)
        txn = str(ds.get("TransactionUID", "") or "").strip()
        ok = tuple((str(i.get("ReferencedSOPClassUID", "")), str(i.get("ReferencedSOPInstanceUID", "")))
                   for i in ds.get("ReferencedSOPSequence", None) or [])
        failed = []
        for i in ds.get("FailedSOPSequence", None) or []:
            reason = i.get("FailureReason", None)
            failed.append((str(i.get("ReferencedSOPClassUID", "")),
                           str(i.get("ReferencedSOPInstanceUID", "")),
                           int(reason) if reason is not None and reason != "" else None))
    except CommitmentError:
        raise
    except Exception as exc:   # never its text: it may quote the bytes
        raise CommitmentError(f"unreadable event information ({exc.__class__.__name__})") from None
    if not txn:
        raise CommitmentError("event information without a Transaction UID")
    return Report(txn, event_type, ok, tuple(failed))


def read_action(data: bytes, transfer_syntax: str) -> tuple[str, list[tuple[str, str]]]:
    """(Transaction UID, references) of an N-ACTION's Action Information (tests, and
    symmetry with ``action_information``)."""
    ds = read_dataset(DicomBytesIO(bytes(data)), transfer_syntax == IMPLICIT_LE, True)
    return str(ds.TransactionUID), [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                                    for i in ds.ReferencedSOPSequence]


def action_status_words(status: int) -> str:
    return {0x0112: "no such SOP instance (the well-known instance)",
            0x0118: "no such SOP class", 0x0119: "class / instance conflict",
            0x0123: "no such action", 0x0210: "duplicate invocation",
            0x0211: "unrecognized operation", 0x0213: "resource limitation",
            0x0110: "processing failure", 0x0122: "SOP class not supported",
            0x0124: "not authorized"}.get(status, "failure")

"""The Storage Commitment SCU of a dimse destination (PS3.4 Annex J, Push Model): one
association per request, proposing the Storage Commitment Push Model context (with
an SCP/SCU role selection item: we are its SCU), one N-ACTION-RQ, its N-ACTION-RSP,
and then, while the association stays open, the N-EVENT-REPORT-RQ if the PACS sends
it here (answered Success once the engine has recorded it). A PACS may instead open a
new association to our listener for the report (mfconsole/ul/acceptor.py): this side
stops waiting as soon as ``reported()`` says the report came in that way.

Protocol code: the engine hands in the transaction and a callback for the report.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable

from mfconsole import egress, tls
from mfconsole.contract import Outcome
from mfconsole.dimse import commitment as sc
from mfconsole.dimse.sender import Peer, client_context, preflight
from mfconsole.ul import pdu, requestor
from mfconsole.ul.sender import associate

# How often a wait on the association looks at whether the report came another way.
POLL_S = 0.25
STATUS_SUCCESS, STATUS_PROCESSING_FAILURE = 0x0000, 0x0110


@dataclass
class Result:
    accepted: bool            # the PACS answered N-ACTION-RSP Success
    reason: str = ""          # why not (routing-safe words)
    report: sc.Report | None = None    # a report that came on this association


class CommitmentSCU:
    """Requests of one destination, one at a time (its commitment thread)."""

    def __init__(self, peer: Peer, egress_dial: egress.TcpCheck):
        self.peer = peer
        self.egress_dial = egress_dial
        self._tls = tls.Reloading(client_context, peer.tls) if peer.tls is not None else None
        self._msg_id = 0

    def request(self, transaction_uid: str, refs: list[tuple[str, str]], *, wait_s: float,
                on_report: Callable[[sc.Report], int], reported: Callable[[], bool]) -> Result:
        """Ask for the commitment of ``refs`` under ``transaction_uid``; then wait up to
        ``wait_s`` on the association for the report (``on_report`` records it and
        gives the status to answer), unless ``reported()`` turns true first."""
        p = self.peer
        ready = preflight(p, self.egress_dial, self._tls, loopback_only=p.loopback_only)
        if isinstance(ready, Outcome):
            return Result(False, ready.reason)
        assoc = associate(p, ready, [(sc.SOP_CLASS, list(sc.TRANSFER_SYNTAXES))], 1,
                          roles={sc.SOP_CLASS: (1, 0)})
        if isinstance(assoc, Outcome):
            return Result(False, assoc.reason)
        try:
            return self._exchange(assoc, transaction_uid, refs, wait_s, on_report, reported)
        finally:
            if not assoc.ended:
                assoc.release(p.acse_timeout_s)

    def _exchange(self, assoc: requestor.Association, txn: str, refs: list[tuple[str, str]],
                  wait_s: float, on_report: Callable[[sc.Report], int],
                  reported: Callable[[], bool]) -> Result:
        p = self.peer
        found = assoc.context_of(sc.SOP_CLASS)
        if found is None:   # associate() refuses an association with no accepted context
            assoc.abort()
            return Result(False, f"{p.address} did not accept the Storage Commitment Push Model")
        cx, ts = found
        self._msg_id = self._msg_id % 65535 + 1
        sent_id = self._msg_id
        result = Result(False, "")
        acknowledged = False
        try:
            assoc.write_message(cx, sc.action_set(sent_id), sc.action_information(txn, refs, ts),
                                p.network_timeout_s)
            deadline = time.monotonic() + p.dimse_timeout_s
            while not acknowledged or (result.report is None and not reported()):
                now = time.monotonic()
                if not acknowledged and now >= deadline:
                    return Result(False, f"no N-ACTION response within "
                                         f"dimse_timeout_s={p.dimse_timeout_s:g}")
                if acknowledged and now >= deadline:
                    break
                try:
                    rx_cx, msg, data = assoc.read_message(min(POLL_S, max(0.0, deadline - now)))
                except (socket.timeout, TimeoutError):
                    continue
                if msg.command_field == sc.N_ACTION_RSP and msg.message_id == sent_id:
                    if msg.status != STATUS_SUCCESS:
                        status = msg.status if msg.status is not None else -1
                        return Result(False, f"N-ACTION-RSP 0x{status & 0xFFFF:04X} "
                                             f"({sc.action_status_words(status)})")
                    acknowledged = True
                    result.accepted = True
                    deadline = time.monotonic() + wait_s   # now the wait for a report here
                elif msg.command_field == sc.N_EVENT_REPORT_RQ and data is not None:
                    rx_ts = next((t for (a, t), c in assoc.accepted.items() if c == rx_cx), ts)
                    try:
                        report = sc.read_report(data, rx_ts, msg.event_type)
                        status = on_report(report)
                    except sc.CommitmentError:
                        report, status = None, STATUS_PROCESSING_FAILURE
                    assoc.write_message(rx_cx, sc.event_report_response(
                        msg.message_id, msg.event_type, status), b"", p.network_timeout_s)
                    if report is not None and status == STATUS_SUCCESS:
                        result.report = report
                else:
                    return Result(acknowledged, f"{p.address} sent an unexpected DIMSE message "
                                                f"(command 0x{msg.command_field:04X})")
        except (requestor.Aborted, requestor.Closed, requestor.PeerReleased, OSError) as exc:
            if acknowledged:   # the request stands: the report may come on a new association
                return result
            return Result(False, f"association with {p.address} ended before the N-ACTION "
                                 f"response ({exc.__class__.__name__})")
        except (pdu.PDUError, ValueError) as exc:
            assoc.abort()
            return Result(acknowledged, f"unreadable answer from {p.address} "
                                        f"({exc.__class__.__name__})")
        return result

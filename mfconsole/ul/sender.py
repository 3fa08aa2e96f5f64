"""The C-STORE SCU of a dimse destination, over mfconsole/ul/requestor.py. What is not
about the wire (the address dialled, TLS context, passcode, contexts proposed,
re-encoding, the words of failures) is mfconsole/dimse/sender.py's.

Requests are pipelined within the asynchronous operations window the peer granted;
with a window of 1 (most peers: DCMTK and pynetdicom do not grant more) the next
request is written the moment the previous response is read.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any, Iterable

from mfconsole import contract, egress, tls
from mfconsole.config import PRIORITIES
from mfconsole.contract import Outbound, Outcome
from mfconsole.dimse import cstore
from mfconsole.dimse.odd_length import even_length
from mfconsole.dimse.sender import (UNCOMPRESSED, Peer, Preflight, client_context,
                                    connect_failure, not_answered, preflight, proposed, reencode,
                                    refused, remember, ts_name)
from mfconsole.dimse.status import association_rejected, context_refused, cstore_status
from mfconsole.ul import negotiation, pdu, requestor

# Outstanding C-STOREs we propose (PS3.7 D.3.3.3 maximum number operations invoked).
ASYNC_INVOKED = 8


def _user_identity(peer: Peer, passcode: bytes | None) -> pdu.UserIdentity | None:
    if not peer.username:
        return None
    return pdu.UserIdentity(2 if passcode is not None else 1, False, peer.username.encode(),
                            passcode or b"")


def associate(peer: Peer, ready: Preflight, contexts: list[tuple[str, list[str]]],
              async_invoked: int = 1, calling_ae: str | None = None,
              roles: dict[str, tuple[int, int]] | None = None
              ) -> requestor.Association | Outcome:
    """An association proposing ``contexts`` (abstract syntax, transfer syntaxes) to the
    address ``ready`` checked, as ``calling_ae`` (default: the peer's configured one),
    or the Outcome saying why there is none."""
    try:   # exactly the checked address: nothing is resolved again
        sock = requestor.connect(ready.dial.family, ready.dial.sockaddr, peer.connect_timeout_s)
    except OSError as exc:
        return contract.transport_failure(f"cannot connect to {peer.address}: "
                                          + connect_failure(exc, peer.connect_timeout_s))
    if ready.tls is not None:
        try:   # within connect_timeout_s; verifies the configured name, not the address
            sock = ready.tls.wrap_socket(sock, server_hostname=tls.server_hostname(peer.tls, peer.host))
        except OSError as exc:
            sock.close()
            return contract.tls_failure(exc, peer.address)
    proposal = requestor.Proposal(
        peer.called_ae, calling_ae or peer.calling_ae, contexts, async_invoked=async_invoked,
        user_identity=_user_identity(peer, ready.passcode),
        implementation_class_uid=negotiation.IMPLEMENTATION_UID,
        implementation_version=negotiation.IMPLEMENTATION_VERSION, roles=roles)
    try:
        assoc = requestor.associate(sock, proposal, peer.acse_timeout_s)
    except requestor.Rejected as rj:
        return association_rejected(rj.result, rj.source, rj.reason)
    except (socket.timeout, TimeoutError):
        return not_answered(peer, timed_out=True)
    except (requestor.Closed, OSError):
        return not_answered(peer)
    except (requestor.Aborted, pdu.PDUError):
        return contract.transport_failure(f"{peer.address} aborted the association request")
    if not assoc.accepted:
        assoc.abort()
        return context_refused(f"{peer.address} accepted none of the presentation "
                               "contexts we proposed")
    assoc.stall_s = peer.network_timeout_s
    return assoc


class UlSender:
    """An association to one peer, opened on demand, reused, released when idle.
    Not thread-safe: one sender per delivery worker thread.

    With send_as = "calling_ae" an association presents the calling AE title its
    objects arrived with: objects of another one are sent on another association (the
    current one is released first); the delivery workers group them so (``groups``)."""

    # Objects of one study handed over together (each still its own C-STORE with its
    # own outcome), pipelined within the window the peer grants. Between two groups the
    # worker does its bookkeeping while the peer waits, so for a fast peer a group spans
    # several windows (most peers answer one C-STORE at a time, and groups of 8 small
    # objects spent a tenth of the forwarding time there); for a slow one the worker
    # cuts groups down to min_group (an urgent delivery waits for the group in flight).
    # The bytes bound what a worker holds read and decrypted at once (this group and
    # the next, read ahead).
    max_batch = (32, 8 * 1024 * 1024)
    min_group = ASYNC_INVOKED
    in_order = False

    def __init__(self, peer: Peer, egress_dial: egress.TcpCheck, async_invoked: int = ASYNC_INVOKED):
        self.peer = peer
        self.egress_dial = egress_dial
        self.async_invoked = async_invoked
        self.assoc: requestor.Association | None = None
        self.presented = peer.calling_ae     # the calling AE title of the association
        self.pairs: dict[tuple[str, str], None] = {}
        self.last_used = 0.0
        self._msg_id = 0
        self._stored = 0     # objects this association has taken (Outcome.others_delivered)
        self._tls = tls.Reloading(client_context, peer.tls) if peer.tls is not None else None

    # -- association -------------------------------------------------------------

    def usable(self) -> bool:
        return self.assoc is not None and not self.assoc.peer_ended()

    @property
    def by_calling_ae(self) -> bool:
        """Objects of one calling AE title per association (see the class)."""
        return self.peer.presents_origin

    def open(self, pairs: Iterable[tuple[str, str]], calling: str | None = None) -> Outcome | None:
        pairs = list(dict.fromkeys(pairs))
        calling = calling or self.peer.calling_ae
        if self.usable() and calling == self.presented and not any(p not in self.pairs for p in pairs):
            return None
        self.close()
        remember(self.pairs, pairs)
        p = self.peer
        ready = preflight(p, self.egress_dial, self._tls, loopback_only=p.loopback_only)
        if isinstance(ready, Outcome):   # checked before every connect
            return ready
        assoc = associate(p, ready, proposed(self.pairs), self.async_invoked, calling)
        if isinstance(assoc, Outcome):
            return assoc
        self.assoc, self._stored, self.last_used = assoc, 0, time.monotonic()
        self.presented = calling
        return None

    def close(self) -> None:
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            assoc.release(self.peer.acse_timeout_s)

    def drop(self) -> None:
        """Abort at once (no release handshake with a peer that stopped answering)."""
        assoc, self.assoc = self.assoc, None
        if assoc is not None:
            assoc.abort()

    def close_if_idle(self, idle_s: float) -> None:
        if self.assoc is None:
            return
        idle = time.monotonic() - self.last_used
        if idle > self.peer.network_timeout_s:
            # An association silent for network_timeout_s is aborted, not released
            # (as DCMTK and pynetdicom requestors do).
            self.drop()
        elif idle > idle_s or not self.usable():
            self.close()

    # -- C-STORE -----------------------------------------------------------------

    def prepare(self, items: Iterable[Any]) -> Outcome | None:
        items = list(items)
        # The calling AE the first group will need (delivery.groups takes them in order).
        calling = (self.peer.calling_for(min((getattr(i, "calling_ae", "") for i in items),
                                             default="")) if self.by_calling_ae else None)
        return self.open(((i.sop_class_uid, i.transfer_syntax) for i in items), calling)

    def _choose(self, obj: Outbound) -> tuple[bytes, str, int | None]:
        """(data, transfer syntax, context id): the object's own syntax if accepted,
        else (uncompressed) another accepted uncompressed one, else no context."""
        accepted = self.assoc.accepted   # type: ignore[union-attr]
        own = accepted.get((obj.sop_class_uid, obj.transfer_syntax))
        if own is not None:
            return obj.data, obj.transfer_syntax, own
        if obj.transfer_syntax in UNCOMPRESSED:
            for ts in UNCOMPRESSED:
                cx = accepted.get((obj.sop_class_uid, ts))
                if cx is not None:
                    return reencode(obj.data, obj.transfer_syntax, ts), ts, cx
        return obj.data, obj.transfer_syntax, None

    def _ready(self, obj: Outbound) -> tuple[int, bytes, bool] | Outcome:
        """(context id, bytes to send, padded), or the object's own outcome when
        nothing is to be sent (no context, a re-encode or odd length it cannot take)."""
        try:
            data, ts, cx = self._choose(obj)
        except Exception as exc:   # e.g. a value pydicom cannot write back (3-byte US)
            return contract.internal_error(
                exc, f"re-encoding {ts_name(obj.transfer_syntax)} for the peer "
                     "(it does not accept the object's own transfer syntax)")
        if cx is None:
            return refused(obj)
        data, padded = even_length(data, ts)
        if data is None:
            return Outcome(
                contract.PERMANENT, contract.MESSAGE, "odd length",
                f"the data set has an odd length ({padded} bytes) that mfconsole cannot pad: "
                "DICOM requires even lengths and the peer would abort the association")
        return cx, data, bool(padded)

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        if not objs:
            return []
        if self.by_calling_ae:
            callings = [self.peer.calling_for(o.calling_ae) for o in objs]
            if len(set(callings)) > 1:    # one association per calling AE, in turn
                out: list[Outcome] = []
                start = 0
                for end in range(1, len(objs) + 1):
                    if end == len(objs) or callings[end] != callings[start]:
                        done = self._send_as(objs[start:end], callings[start])
                        out += done
                        if len(done) < end - start or (done and not done[-1].is_success
                                                        and done[-1].scope == contract.DESTINATION):
                            break
                        start = end
                return out
            return self._send_as(objs, callings[0])
        return self._send_as(objs, None)

    def _send_as(self, objs: list[Outbound], calling: str | None) -> list[Outcome]:
        failed = self.open([(o.sop_class_uid, o.transfer_syntax) for o in objs], calling)
        if failed is not None:
            # A destination-scope failure ends the batch; a message-scope one (no
            # context accepted) is every object's answer.
            return [failed] if failed.scope == contract.DESTINATION else [failed] * len(objs)
        assoc = self.assoc
        assert assoc is not None
        p = self.peer
        priority = PRIORITIES.get(p.priority, 0)
        done: list[Outcome | None] = [None] * len(objs)
        padded: list[bool] = [False] * len(objs)
        waiting: dict[int, int] = {}   # message id → index in objs, in the order written
        nxt = 0
        stop = False                   # a destination-scope answer: write nothing more
        while True:
            while not stop and nxt < len(objs) and len(waiting) < assoc.window:
                i, nxt = nxt, nxt + 1
                ready = self._ready(objs[i])
                if isinstance(ready, Outcome):
                    done[i] = ready
                    continue
                cx, data, padded[i] = ready
                self._msg_id = self._msg_id % 65535 + 1
                command = cstore.command_set(self._msg_id, priority, objs[i].sop_class_uid,
                                             objs[i].sop_instance_uid)
                self.last_used = time.monotonic()
                try:
                    waiting[self._msg_id] = i
                    assoc.write_message(cx, command, data, p.network_timeout_s)
                except OSError as exc:
                    return self._cut(objs, done, padded, waiting,
                                     f"connection to {p.address} lost during the C-STORE "
                                     f"({exc.__class__.__name__})")
            if not waiting:
                break
            try:
                rsp = assoc.read_response(p.dimse_timeout_s)
            except (socket.timeout, TimeoutError):
                return self._cut(objs, done, padded, waiting,
                                 f"connection to {p.address} silent mid-PDU beyond "
                                 f"network_timeout_s={p.network_timeout_s:g}" if assoc.stalled else
                                 f"no C-STORE response within dimse_timeout_s={p.dimse_timeout_s:g}")
            except requestor.Aborted:
                return self._cut(objs, done, padded, waiting,
                                 "peer aborted the association during the C-STORE")
            except (requestor.Closed, requestor.PeerReleased, OSError):
                return self._cut(objs, done, padded, waiting,
                                 f"connection to {p.address} closed during the C-STORE")
            except (pdu.PDUError, ValueError) as exc:   # not a response we can read
                return self._cut(objs, done, padded, waiting,
                                 f"unreadable answer from {p.address} during the C-STORE "
                                 f"({exc.__class__.__name__})")
            i = waiting.pop(rsp.message_id, -1)
            if i < 0:
                return self._cut(objs, done, padded, waiting,
                                 f"{p.address} answered a C-STORE we did not send "
                                 f"(message id {rsp.message_id})")
            self.last_used = time.monotonic()
            outcome = (cstore_status(rsp.status) if rsp.status is not None else
                       Outcome(contract.BOUNDED, contract.MESSAGE, "invalid response",
                               "C-STORE response without a status"))
            done[i] = outcome
            if outcome.is_success:
                self._stored += 1
            elif outcome.scope == contract.DESTINATION:
                stop = True
        return self._in_order(done, padded)

    def _cut(self, objs: list[Outbound], done: list[Outcome | None], padded: list[bool],
             waiting: dict[int, int], why: str) -> list[Outcome]:
        """The association is gone mid-batch: the first object written and not
        answered gets the ambiguous no-response outcome (a re-store is idempotent),
        and the batch ends there; ``others_delivered`` says whether this association
        had delivered others (outbox.record attributes a poison object from it)."""
        self.drop()
        first = min(waiting.values())
        done[first] = contract.no_response(why, others_delivered=self._stored > 0)
        return self._in_order(done, padded)

    @staticmethod
    def _in_order(done: list[Outcome | None], padded: list[bool]) -> list[Outcome]:
        """Outcomes in order, up to the first destination-scope failure (objects after
        it that were written are left out: the engine queues them again)."""
        out: list[Outcome] = []
        for outcome, pad in zip(done, padded):
            if outcome is None:
                break
            if pad and outcome.is_success:
                outcome = dataclasses.replace(outcome, reason=f"{outcome.reason} (odd-length last "
                                              "element padded by one byte, as DICOM requires)")
            out.append(outcome)
            if not outcome.is_success and outcome.scope == contract.DESTINATION:
                break
        return out

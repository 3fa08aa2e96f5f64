"""The association requestor: one blocking socket, no threads, no polling.

The caller (a delivery worker thread, sender.py) writes and reads
on its own thread: a response is read the moment it arrives, and the next request is
written right after (pynetdicom's requestor, which mfconsole used before, handed every
PDU through its DUL and reactor threads and a polling loop: ~2 ms of waiting per object). Requests may
be pipelined within the asynchronous operations window the acceptor granted
(PS3.7 D.3.3.3); responses are matched by Message ID Being Responded To.

Protocol code: no Outcome here (sender.py maps the exceptions below to them).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from mfconsole.dimse import sockets
from mfconsole.ul import dimse, pdu

# A C-STORE-RSP is a few hundred bytes; an AC a few KiB. A peer announcing more in one
# PDU is not one we will buffer.
MAX_INCOMING_PDU = 4 * 1024 * 1024
# What we announce as our maximum PDU length (pynetdicom's default): responses and
# ACs are small.
OUR_MAX_PDU = 16382
# Data set fragments when the acceptor sets no limit (0): bounded so one PDU is not a
# copy of a whole large object.
UNLIMITED_FRAGMENT = 1024 * 1024
# Bytes gathered before one sendall: several small PDUs leave in one write (with
# TCP_NODELAY, one write per PDU would be one segment each).
WRITE_BATCH = 256 * 1024

COMMAND, LAST = 0x01, 0x02    # message control header bits (PS3.8 E.2)
_PDV = struct.Struct(">IBB")


class Rejected(Exception):
    def __init__(self, result: int, source: int, reason: int):
        super().__init__(f"A-ASSOCIATE-RJ {result}/{source}/{reason}")
        self.result, self.source, self.reason = result, source, reason


class Aborted(Exception):
    """The peer sent A-ABORT."""


class Closed(Exception):
    """The connection closed (EOF) before the PDU we waited for."""


class PeerReleased(Exception):
    """The acceptor asked to release with requests outstanding (answered, closed)."""


def connect(family: int, sockaddr: tuple[Any, ...], timeout: float) -> socket.socket:
    """A TCP connection to exactly ``sockaddr`` (the address egress checked: nothing
    is resolved here), with TCP_NODELAY and TCP_QUICKACK re-armed at each read."""
    sock = sockets.adopt(socket.socket(family, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Proposal:
    called_ae: str
    calling_ae: str
    contexts: list[tuple[str, list[str]]]          # (abstract syntax, transfer syntaxes)
    async_invoked: int = 8
    user_identity: pdu.UserIdentity | None = None
    implementation_class_uid: str = ""
    implementation_version: str = ""
    roles: dict[str, tuple[int, int]] | None = None   # SCP/SCU role selection items


class Association:
    """One established association over ``sock``. Not thread-safe."""

    def __init__(self, sock: socket.socket, ac: pdu.AssociateAC,
                 proposed: dict[int, tuple[str, list[str]]], async_invoked: int):
        self.sock = sock
        self.ac = ac
        self.max_send = ac.max_length
        # (abstract syntax, transfer syntax) → context id, for accepted contexts only.
        self.accepted: dict[tuple[str, str], int] = {}
        for cx_id, (result, ts) in ac.results.items():
            if result == pdu.ACCEPTANCE and cx_id in proposed:
                self.accepted.setdefault((proposed[cx_id][0], ts), cx_id)
        self._accepted_ids = {cx_id for cx_id, (result, _) in ac.results.items()
                              if result == pdu.ACCEPTANCE and cx_id in proposed}
        # Operations we may have outstanding: what the acceptor answered (0 means
        # unlimited: we keep to what we proposed); no answer means one at a time.
        if ac.async_ops is None:
            self.window = 1
        else:
            granted = ac.async_ops[0]
            self.window = async_invoked if granted == 0 else max(1, min(granted, async_invoked))
        self._buf = bytearray()
        self._command = bytearray()               # command fragments of the next response
        self._responses: deque[dimse.Command] = deque()
        self.ended = False                        # released, aborted or closed
        self.stall_s: float | None = None         # longest silence within a PDU
        self.stalled = False                      # the last timeout was such a silence

    # -- reading -------------------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            # A PDU begun and not finished: each silence is bounded by stall_s (the
            # network timeout) too, so a peer stopping mid-PDU is told apart.
            partial = bool(self._buf) and self.stall_s is not None and self.stall_s < left
            self.sock.settimeout(self.stall_s if partial else left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self._buf)))
            except socket.timeout:
                self.stalled = partial
                raise
            if not chunk:
                self.ended = True
                raise Closed()
            self._buf += chunk

    def read_pdu(self, timeout: float) -> tuple[int, bytes]:
        """The next PDU (type, body) within ``timeout`` seconds (socket.timeout)."""
        deadline = time.monotonic() + timeout
        self._fill(6, deadline)
        pdu_type, _, length = pdu.HEADER.unpack_from(self._buf, 0)
        if pdu_type not in pdu.PDU_TYPES:
            raise pdu.PDUError(f"unknown PDU type 0x{pdu_type:02X}", pdu.UNRECOGNIZED_PDU)
        if length > MAX_INCOMING_PDU:
            raise pdu.PDUError(f"PDU of {length} bytes announced")
        self._fill(6 + length, deadline)
        body = bytes(self._buf[6:6 + length])
        del self._buf[:6 + length]
        return pdu_type, body

    def read_response(self, timeout: float) -> dimse.Command:
        """The next complete DIMSE response command set."""
        deadline = time.monotonic() + timeout
        while not self._responses:
            pdu_type, body = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if pdu_type == pdu.P_DATA_TF:
                for cx, control, fragment in pdu.decode_pdata(memoryview(body)):
                    if cx not in self._accepted_ids:   # as the acceptor: not a response we can take
                        raise pdu.PDUError(f"PDV for presentation context {cx}, not accepted")
                    if not control & COMMAND:
                        continue   # a data set with a response: none of ours carries one
                    self._command += fragment
                    if len(self._command) > dimse.MAX_COMMAND_SET:
                        raise pdu.PDUError("command set too large")
                    if control & LAST:
                        self._responses.append(dimse.decode_command(bytes(self._command)))
                        self._command.clear()
            elif pdu_type == pdu.ABORT:
                self.ended = True
                raise Aborted()
            elif pdu_type == pdu.RELEASE_RQ:
                self._answer_release()
                raise PeerReleased()
            else:
                raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.UNEXPECTED_PDU)
        return self._responses.popleft()

    def read_message(self, timeout: float, max_data: int = MAX_INCOMING_PDU
                     ) -> tuple[int, dimse.Command, bytes | None]:
        """The next whole DIMSE message (context id, command, data set or None): a
        response, or a request the peer sends us on this association (an
        N-EVENT-REPORT of Storage Commitment). Not to be mixed with read_response on
        one association."""
        deadline = time.monotonic() + timeout
        command = bytearray()
        message: dimse.Command | None = None
        data = bytearray()
        while True:
            pdu_type, body = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if pdu_type == pdu.ABORT:
                self.ended = True
                raise Aborted()
            if pdu_type == pdu.RELEASE_RQ:
                self._answer_release()
                raise PeerReleased()
            if pdu_type != pdu.P_DATA_TF:
                raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.UNEXPECTED_PDU)
            for cx, control, fragment in pdu.decode_pdata(memoryview(body)):
                if cx not in self._accepted_ids:
                    raise pdu.PDUError(f"PDV for presentation context {cx}, not accepted")
                if control & COMMAND:
                    if message is not None:
                        raise pdu.PDUError("command fragment out of order")
                    command += fragment
                    if len(command) > dimse.MAX_COMMAND_SET:
                        raise pdu.PDUError("command set too large")
                    if control & LAST:
                        message = dimse.decode_command(bytes(command))
                        if not message.has_data_set:
                            return cx, message, None
                    continue
                if message is None:
                    raise pdu.PDUError("data set fragment without its command")
                data += fragment
                if len(data) > max_data:
                    raise pdu.PDUError("data set too large")
                if control & LAST:
                    return cx, message, bytes(data)

    def context_of(self, abstract_syntax: str) -> tuple[int, str] | None:
        """(context id, transfer syntax) of an accepted context for ``abstract_syntax``."""
        for (abstract, ts), cx in self.accepted.items():
            if abstract == abstract_syntax:
                return cx, ts
        return None

    # -- writing -------------------------------------------------------------------

    def write_message(self, cx_id: int, command: bytes, data: bytes | memoryview,
                      timeout: float) -> None:
        """One DIMSE message: command then data set PDVs, each P-DATA-TF within the
        acceptor's maximum length, written in a few large writes."""
        size = self.max_send - 6 if self.max_send > 6 else UNLIMITED_FRAGMENT
        size = min(size, UNLIMITED_FRAGMENT)
        out: list[bytes | memoryview] = []
        pending = 0
        self.sock.settimeout(timeout)
        for payload, kind in ((memoryview(command), COMMAND), (memoryview(data), 0)):
            total = len(payload)
            for start in range(0, total, size):
                fragment = payload[start:start + size]
                control = kind | (LAST if start + size >= total else 0)
                out.append(pdu.pdata_header(len(fragment) + 6)
                           + _PDV.pack(len(fragment) + 2, cx_id, control))
                out.append(fragment)
                pending += len(fragment) + 12
                if pending >= WRITE_BATCH:
                    self.sock.sendall(b"".join(out))
                    out.clear()
                    pending = 0
        if out:
            self.sock.sendall(b"".join(out))

    # -- ending --------------------------------------------------------------------

    def _answer_release(self) -> None:
        try:
            self.sock.sendall(pdu.encode_release_rp())
        except OSError:
            pass
        self.close()

    def peer_ended(self) -> bool:
        """Whether the peer closed, aborted or asked to release while we were idle
        (checked without blocking; a release request is answered)."""
        if self.ended:
            return True
        try:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            # (bytes already read: a PDU that came in with the previous one, the AC's say)
            readable = self._buf or pending or select.select([self.sock], [], [], 0)[0]
        except (OSError, ValueError):
            self.ended = True
            return True
        if not readable:
            return False
        try:
            pdu_type, _ = self.read_pdu(0.2)
        except socket.timeout:
            # Readable without a PDU: TLS records of its own (session tickets, key
            # updates), or a PDU still arriving. Nothing ended.
            return False
        except Exception:
            self.close()
            return True
        if pdu_type == pdu.RELEASE_RQ:
            self._answer_release()
        elif pdu_type == pdu.ABORT:   # never answered (PS3.8 9.2.3, AA-3): we close
            self.close()
        else:   # anything else unsolicited while idle ends it (a stray PDU)
            self.abort()
        return True

    def release(self, timeout: float) -> None:
        """A-RELEASE-RQ, then wait for the RP. A release collision (the acceptor's
        RQ crossing ours) is answered as the requestor does (PS3.8 7.2: it sends its
        RP, then waits for the acceptor's)."""
        if self.ended:
            self.close()
            return
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(pdu.encode_release_rq())
            deadline = time.monotonic() + timeout
            while True:
                pdu_type, _ = self.read_pdu(max(0.0, deadline - time.monotonic()))
                if pdu_type == pdu.RELEASE_RP:
                    break
                if pdu_type == pdu.RELEASE_RQ:
                    self.sock.sendall(pdu.encode_release_rp())
                elif pdu_type == pdu.ABORT:
                    break
                # P-DATA still in flight (a late response): ignored while releasing.
        except Exception:   # no RP in time, or gone: nothing more to say to it
            self.abort()
            return
        self.close()

    def abort(self) -> None:
        if not self.ended:
            try:
                self.sock.settimeout(0.5)
                self.sock.sendall(pdu.encode_abort(pdu.ABORT_USER))
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        self.ended = True
        try:
            self.sock.close()
        except OSError:
            pass


def associate(sock: socket.socket, proposal: Proposal, timeout: float) -> Association:
    """Send the A-ASSOCIATE-RQ and read the answer within ``timeout``: the established
    Association, or Rejected / Aborted / Closed / socket.timeout / pdu.PDUError (the
    socket is closed then)."""
    contexts = {2 * i + 1: cx for i, cx in enumerate(proposal.contexts)}
    rq = pdu.encode_associate_rq(
        proposal.called_ae, proposal.calling_ae,
        [(cx_id, abstract, syntaxes) for cx_id, (abstract, syntaxes) in contexts.items()],
        max_length=OUR_MAX_PDU, implementation_class_uid=proposal.implementation_class_uid,
        implementation_version=proposal.implementation_version,
        async_ops=(proposal.async_invoked, 1) if proposal.async_invoked != 1 else None,
        user_identity=proposal.user_identity, roles=proposal.roles)
    probe = Association(sock, pdu.AssociateAC(), {}, 1)
    try:
        sock.settimeout(timeout)
        sock.sendall(rq)
        pdu_type, body = probe.read_pdu(timeout)
        if pdu_type == pdu.ASSOCIATE_RJ:
            raise Rejected(*pdu.decode_associate_rj(body))
        if pdu_type == pdu.ABORT:
            raise Aborted()
        if pdu_type != pdu.ASSOCIATE_AC:
            raise pdu.PDUError(f"unexpected PDU type 0x{pdu_type:02X}", pdu.UNEXPECTED_PDU)
        ac = pdu.decode_associate_ac(body)
    except pdu.PDUError:
        probe.abort()
        raise
    except BaseException:
        probe.close()
        raise
    assoc = Association(sock, ac, contexts, proposal.async_invoked)
    assoc._buf = probe._buf   # anything the peer sent right after its AC
    return assoc

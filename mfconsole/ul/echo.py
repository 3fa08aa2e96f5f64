"""C-ECHO and the context probe (``mfconsole echo`` / ``test``): the operator checks
the peer through the same layer that delivers to it. The egress check, TLS,
credentials and the words of the result are dimse/sender.py's run_echo / run_probe:
only the exchange on the wire is here.
"""

from __future__ import annotations

import socket

from mfconsole.contract import Outcome
from mfconsole.dimse import cstore
from mfconsole.dimse.sender import VERIFICATION, Peer, Preflight
from mfconsole.ul import dimse, pdu, requestor
from mfconsole.ul.sender import associate

MESSAGE_ID = 1


def echo_exchange(peer: Peer, ready: Preflight) -> int | None | Outcome:
    assoc = associate(peer, ready, [VERIFICATION])
    if isinstance(assoc, Outcome):
        return assoc
    # Whichever syntax the peer took: the command set is implicit LE in all of them.
    cx = next(iter(assoc.accepted.values()))
    try:
        assoc.write_message(cx, cstore.echo_set(MESSAGE_ID), b"", peer.network_timeout_s)
        rsp = assoc.read_response(peer.dimse_timeout_s)
    except (socket.timeout, TimeoutError, requestor.Aborted, requestor.Closed,
            requestor.PeerReleased, pdu.PDUError, dimse.CommandError, OSError):
        # No answer we can read: abort, and run_echo says so.
        assoc.abort()
        return None
    assoc.release(peer.acse_timeout_s)
    if rsp.command_field != cstore.C_ECHO_RSP or rsp.message_id != MESSAGE_ID:
        return None
    return rsp.status


def probe_exchange(peer: Peer, ready: Preflight, contexts: list[tuple[str, list[str]]]
                   ) -> set[tuple[str, str]] | Outcome:
    assoc = associate(peer, ready, contexts)
    if isinstance(assoc, Outcome):
        return assoc
    accepted = set(assoc.accepted)
    assoc.release(peer.acse_timeout_s)
    return accepted

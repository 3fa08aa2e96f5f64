"""What the acceptor answers to an A-ASSOCIATE-RQ, as a pure function.

* A calling AE title not bound to the client certificate (tls.client_cert_aets) is
  refused 1/1/3 before anything else.
* Rejections, with pynetdicom's precedence (it checks in this order and the last
  failing check decides; peers and tests written against pynetdicom SCPs see the
  same reasons): calling AE title not in calling_aets 1/1/3, called AE
  title not ours 1/1/7, user identity refused by the hook 2/2/1, more than
  max_associations 2/3/2.
* Contexts: Verification with the three uncompressed syntaxes; every storage SOP
  class pynetdicom knows, and every private or unknown abstract syntax (stored, not
  refused: storage_like), with the listener's storage syntaxes
  (listener.transfer_syntaxes: Deflate only with accept_deflate). The requestor's
  order of transfer syntaxes decides, as in pynetdicom.
* SCP/SCU role selection: the requestor may be SCU, never SCP (we send nothing) —
  except for Storage Commitment Push Model, accepted only from a peer that is a
  dimse destination with storage_commitment (``commitment``): there the requestor
  (the PACS) sends us its N-EVENT-REPORT, so it may be SCP (answered SCU 0, SCP 1).
  From any other peer that context is refused (user rejection).
* Asynchronous operations window: answered 1/1 (one operation at a time).
* Other extended negotiation items: not answered (declined).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

from mfconsole import IMPLEMENTATION_CLASS_UID, __version__
from mfconsole.config import ListenerConfig
from mfconsole.dimse.listener import (EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, REJECT_REASONS,
                                      transfer_syntaxes)
from mfconsole.ul import pdu

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"   # Push Model SOP Class (PS3.4 Annex J)
VERIFICATION_TS = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
STORAGE = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
IMPLEMENTATION_UID = IMPLEMENTATION_CLASS_UID
IMPLEMENTATION_VERSION = ("MFCONSOLE_" + __version__.replace(".", ""))[:16]

RJ_REASONS = {
    **REJECT_REASONS,
    (1, 1, 2): "application context name not supported",
    (1, 2, 2): "protocol version not supported",
    (2, 2, 1): "user identity not accepted",
}

# The user identity hook: (identity, calling AE) -> (accepted, server response or
# None). Without a hook the item is ignored, as pynetdicom does with no EVT_USER_ID
# handler: the association goes on and no response item is sent.
UserIdentityHook = Callable[[pdu.UserIdentity, str], "tuple[bool, bytes | None]"]


def storage_like(uid: UID) -> bool:
    """A proposed abstract syntax we take as storage: private, or unknown to pynetdicom's
    SOP class dictionary (a retired or newer SOP class). Modalities send private SOP
    classes (vendor raw data, private SRs); they must be stored, not refused."""
    from pynetdicom import sop_class

    return uid.is_private or not hasattr(sop_class, uid.keyword or "_none_")


@functools.lru_cache(maxsize=4096)
def is_storage(uid: str) -> bool:
    if uid in STORAGE:
        return True
    try:
        return storage_like(UID(uid))
    except (TypeError, ValueError):
        return False


@dataclass
class Decision:
    reject: tuple[int, int, int] | None = None
    reason: str = ""
    accepted: dict[int, str] = field(default_factory=dict)   # context id -> transfer syntax
    commitment: set[int] = field(default_factory=set)   # accepted Storage Commitment contexts
    ac: bytes = b""


def negotiate(rq: pdu.AssociateRQ, cfg: ListenerConfig, associated: int,
              user_identity: UserIdentityHook | None = None,
              cert_aets: frozenset[str] | None = None, cert_names: str = "",
              commitment: bool = False) -> Decision:
    """``associated``: associations already established on this listener;
    ``cert_aets``: the calling AE titles the client certificate (``cert_names``) is
    bound to, None when the listener binds none; ``commitment``: the requestor may
    send us Storage Commitment reports."""
    if cert_aets is not None and rq.calling_ae not in cert_aets:
        return Decision(reject=(1, 1, 3), reason=f"calling AE title not bound to the client "
                        f"certificate ({cert_names or 'no name'}) in tls.client_cert_aets")
    reject = None
    if not cfg.any_calling_aet and rq.calling_ae not in cfg.calling_aets:
        reject = (1, 1, 3)
    if rq.called_ae != cfg.ae_title.strip():
        reject = (1, 1, 7)
    id_response = None
    if rq.user_identity is not None and user_identity is not None:
        ok, id_response = user_identity(rq.user_identity, rq.calling_ae)
        if not ok:
            reject = (2, 2, 1)
    if associated >= cfg.max_associations:
        reject = (2, 3, 2)
    if reject is None and not rq.protocol_version & 1:
        reject = (1, 2, 2)
    if reject is None and rq.application_context != pdu.APPLICATION_CONTEXT:
        reject = (1, 1, 2)
    if reject is not None:
        return Decision(reject=reject, reason=RJ_REASONS[reject])

    storage_ts = transfer_syntaxes(cfg.accept_deflate)
    results: list[tuple[int, int, str]] = []
    roles: dict[str, tuple[int, int]] = {}
    accepted: dict[int, str] = {}
    reports: set[int] = set()
    for cx in rq.contexts:
        if cx.abstract_syntax == STORAGE_COMMITMENT:
            role = rq.roles.get(cx.abstract_syntax)
            ts = next((t for t in cx.transfer_syntaxes if t in VERIFICATION_TS), None)
            if not commitment or (role is not None and not role[1]):
                results.append((cx.id, pdu.USER_REJECTION, ""))
            elif ts is None:
                results.append((cx.id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
            else:
                if role is not None:
                    roles[cx.abstract_syntax] = (0, 1)
                results.append((cx.id, pdu.ACCEPTANCE, ts))
                accepted[cx.id] = ts
                reports.add(cx.id)
            continue
        if cx.abstract_syntax == VERIFICATION:
            ours: tuple[str, ...] | list[str] = VERIFICATION_TS
        elif is_storage(cx.abstract_syntax):
            ours = storage_ts
        else:
            results.append((cx.id, pdu.ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
            continue
        ts = next((t for t in cx.transfer_syntaxes if t in ours), None)
        if ts is None:
            results.append((cx.id, pdu.TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
            continue
        role = rq.roles.get(cx.abstract_syntax)
        if role is not None:
            if not role[0]:   # the requestor would only be SCP: we are no SCU
                results.append((cx.id, pdu.USER_REJECTION, ""))
                continue
            roles[cx.abstract_syntax] = (1, 0)
        results.append((cx.id, pdu.ACCEPTANCE, ts))
        accepted[cx.id] = ts
    ident = id_response if rq.user_identity is not None and rq.user_identity.positive_response_requested else None
    ac = pdu.encode_associate_ac(
        rq, results, max_length=cfg.max_pdu_kb * 1024,
        implementation_class_uid=IMPLEMENTATION_UID, implementation_version=IMPLEMENTATION_VERSION,
        roles=roles, async_ops=(1, 1) if rq.async_ops is not None else None,
        user_identity_response=ident)
    return Decision(accepted=accepted, ac=ac, commitment=reports)

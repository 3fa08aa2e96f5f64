"""What a C-STORE SCU decides before and around its associations, apart from the bytes
on the wire (those are mfconsole/ul: requestor.py, sender.py, echo.py).

* ``Peer``: where and how to associate, from a destination or an ``AET@host:port``.
* ``preflight``: settled before every connection, the same for deliveries, echo and
  test: the egress check (the address dialled is the one checked), the TLS context
  and the passcode.
* ``proposed`` / ``remember``: the presentation contexts a sender proposes. Objects
  are sent as the bytes we received (never re-encoded) whenever the peer accepts
  their transfer syntax; an uncompressed object the peer refuses in its own syntax
  goes in another uncompressed syntax it accepts (``reencode``: the header only, no
  pixel decoding); a compressed one it refuses is a message-scope failure (``refused``),
  since mfconsole does not transcode.
* The words of every failure before a C-STORE (``connect_failure``, ``not_answered``)
  and of ``echo`` / ``test`` (``run_echo``, ``run_probe``).

Knows nothing of SQLite: it gets bytes and UIDs, and answers with an Outcome.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.sop_class import Verification

from mfconsole import contract, egress, tls
from mfconsole.config import TLSConfig
from mfconsole.names import ae_title_problem
from mfconsole.contract import Outbound, Outcome
from mfconsole.dimse import sockets
from mfconsole.dicomvalues import sop_name, ts_name
from mfconsole.dimse.status import context_refused

IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE)
MAX_CONTEXTS = 128      # PS3.8: presentation context ids are odd numbers 1..255
# The Verification context we propose (what pynetdicom's build_context(Verification)
# offers: implicit, explicit, deflated, big endian).
VERIFICATION_SYNTAXES = (IMPLICIT_LE, EXPLICIT_LE, "1.2.840.10008.1.2.1.99", EXPLICIT_BE)
VERIFICATION = (str(Verification), list(VERIFICATION_SYNTAXES))

@dataclass(frozen=True)
class Peer:
    """Where and how to associate. Built from a destination's config (or an
    ``AET@host:port`` target on the command line)."""
    host: str
    port: int
    called_ae: str
    calling_ae: str = "MFCONSOLE"
    connect_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    priority: str = "medium"
    username: str | None = None
    passcode_file: Path | None = None
    tls: TLSConfig | None = None
    allow_cleartext: bool = False
    # "calling_ae": associate as the calling AE title each object arrived with.
    send_as: str = "configured"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def from_destination(cls, d: Any) -> "Peer":
        return cls(host=d.host, port=d.port, called_ae=d.ae_title, calling_ae=d.calling_ae_title,
                   connect_timeout_s=d.connect_timeout_s, acse_timeout_s=d.acse_timeout_s,
                   dimse_timeout_s=d.dimse_timeout_s, network_timeout_s=d.network_timeout_s,
                   priority=d.priority, username=d.username, passcode_file=d.passcode_file,
                   tls=d.tls, allow_cleartext=d.allow_cleartext, send_as=d.send_as)

    @property
    def presents_origin(self) -> bool:
        return self.send_as == "calling_ae"

    def calling_for(self, origin: str) -> str:
        """The calling AE title to present for an object that arrived with ``origin``:
        it, with send_as = "calling_ae" and when it is a valid AE title; else ours."""
        if self.presents_origin and origin and ae_title_problem(origin) is None:
            return origin.strip()
        return self.calling_ae

    @property
    def loopback_only(self) -> bool:
        """Cleartext without allow_cleartext: only a loopback address will do."""
        return self.tls is None and not self.allow_cleartext


def _dial(check: egress.TcpCheck | None, peer: Peer, loopback_only: bool = False
          ) -> egress.Dial | Outcome:
    """The checked address to associate with (``check`` is [egress].allowed_tcp's, from
    the engine; None: no allowlist), or the Outcome that stops us: a refusal (permanent,
    nothing sent) or a host that does not resolve now (transient)."""
    try:
        verdict = (check(peer.host, peer.port, loopback_only=loopback_only) if check is not None
                   else egress.unchecked(peer.host, peer.port))
    except OSError as exc:   # the host name does not resolve now
        return contract.transport_failure(f"cannot connect to {peer.address}: {exc}")
    if isinstance(verdict, egress.Refusal):
        return contract.egress_refused(verdict.target, verdict.allowlist, verdict.resolved, verdict.why)
    return verdict


def client_context(cfg: TLSConfig) -> ssl.SSLContext:
    """mfconsole.tls's client policy with our socket class (TCP_QUICKACK)."""
    return sockets.dicom_context(tls.client_context(cfg))


def tls_context(peer: Peer) -> ssl.SSLContext | None:
    """A one-off context for ``peer``, or None without TLS (tls.TLSSetupError when a
    file cannot be used)."""
    return client_context(peer.tls) if peer.tls is not None else None


@dataclass(frozen=True)
class Preflight:
    """What is settled before each connection, the same for deliveries, echo and test."""
    dial: egress.Dial                 # the checked address: nothing resolves it again
    tls: ssl.SSLContext | None
    passcode: bytes | None            # read now, so a rotated passcode needs no restart


def preflight(peer: Peer, check: egress.TcpCheck | None, reloading: tls.Reloading | None = None,
              *, loopback_only: bool = False) -> Preflight | Outcome:
    """The egress check, the TLS context (a sender's ``reloading`` one, renewed when its
    files change, else a one-off) and the passcode; or the Outcome that stops us before
    any byte is sent."""
    dial = _dial(check, peer, loopback_only)
    if isinstance(dial, Outcome):
        return dial
    try:
        ctx = reloading.get() if reloading is not None else tls_context(peer)
    except tls.TLSSetupError as exc:
        # A certificate file changed since the config was loaded: fix it, then resume.
        return Outcome(contract.PERMANENT, contract.DESTINATION, "configuration", str(exc))
    try:
        passcode = (peer.passcode_file.read_bytes().strip()
                    if peer.username and peer.passcode_file is not None else None)
    except OSError as exc:   # e.g. the passcode file vanished
        return Outcome(contract.PERMANENT, contract.DESTINATION, "configuration",
                       f"cannot read passcode_file: {exc.strerror}")
    return Preflight(dial, ctx, passcode)


def proposed(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """The presentation contexts for ``pairs`` (SOP class, TS), as (abstract syntax,
    transfer syntaxes): one per pair, plus, per SOP class with an uncompressed object,
    one offering every uncompressed syntax (the fallback)."""
    contexts: list[tuple[str, list[str]]] = []
    fallback: list[str] = []
    for sop_class, ts in pairs:
        contexts.append((sop_class, [ts]))
        if ts in UNCOMPRESSED and sop_class not in fallback:
            fallback.append(sop_class)
    contexts += [(c, list(UNCOMPRESSED)) for c in fallback]
    # Verification keeps the association up when the peer takes none of the others,
    # so each object gets its own "not accepted" answer (a message-scope failure).
    return contexts[:MAX_CONTEXTS - 1] + [VERIFICATION]


def remember(known: dict[tuple[str, str], None], pairs: list[tuple[str, str]]) -> None:
    """Add ``pairs`` to what a sender proposes (``known``, in order), dropping the
    oldest others when they would not all fit in one association."""
    for pair in pairs:
        known[pair] = None
    while len(proposed(known)) >= MAX_CONTEXTS and len(known) > len(pairs):
        del known[next(iter(known))]


def refused(obj: Outbound) -> Outcome:
    """No accepted context for ``obj``, in its own syntax or (uncompressed) any other."""
    klass = sop_name(obj.sop_class_uid)
    if obj.transfer_syntax in UNCOMPRESSED:
        return context_refused(f"peer does not accept {klass} in any uncompressed "
                               "transfer syntax")
    return context_refused(
        f"peer does not accept {ts_name(obj.transfer_syntax)} for {klass}; "
        "mfconsole does not transcode")


def connect_failure(exc: OSError | None, timeout_s: float) -> str:
    """Why a TCP connect failed, in the words that send an administrator to the right
    place: nothing listening (or a firewall that rejects), a host or network that cannot
    be reached, or silence (a host that is down or a firewall that drops)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port, or a firewall rejects it)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within connect_timeout_s={timeout_s:g} (host down, or a firewall drops)"
    if exc is not None and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return f"unreachable ({errno.errorcode.get(exc.errno, exc.errno)}: no route to that address)"
    if exc is not None and exc.errno:
        return f"connect failed ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"refused, unreachable or no answer within connect_timeout_s={timeout_s:g}"


def not_answered(peer: Peer, timed_out: bool = False) -> Outcome:
    """No answer to our A-ASSOCIATE-RQ: silence, or the connection closed (or reset)."""
    if timed_out:
        return contract.transport_failure(
            f"{peer.address} did not answer the association request within "
            f"acse_timeout_s={peer.acse_timeout_s:g}")
    return contract.transport_failure(
        f"{peer.address} closed the connection without answering the association request")


def reencode(data: bytes, source_ts: str, target_ts: str) -> bytes:
    """Re-encode an uncompressed data set in another uncompressed transfer syntax."""
    src = UID(source_ts)
    ds = read_dataset(DicomBytesIO(data), src.is_implicit_VR, src.is_little_endian)
    dst = UID(target_ts)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = dst.is_little_endian, dst.is_implicit_VR
    write_dataset(out, Dataset(ds))
    return out.getvalue()


# -- operator tools ---------------------------------------------------------------

@dataclass(frozen=True)
class EchoResult:
    ok: bool
    rtt_ms: float
    detail: str


# An echo or probe exchange (mfconsole/ul/echo.py): given what preflight settled (and
# the contexts, for a probe), it associates, asks, releases, and answers (see run_echo,
# run_probe) or gives the Outcome that stopped it. Passed in, so this module stays
# below the upper layer that speaks.
EchoExchange = Callable[[Peer, Preflight], "int | None | Outcome"]
ProbeExchange = Callable[[Peer, Preflight, list[tuple[str, list[str]]]],
                         "set[tuple[str, str]] | Outcome"]


def run_echo(peer: Peer, egress_dial: egress.TcpCheck | None, exchange: EchoExchange) -> EchoResult:
    """C-ECHO with the round-trip time of the whole exchange (connect to release), to
    the address ``egress_dial`` checked (None: the first ``peer.host`` resolves to).
    ``exchange`` answers the C-ECHO status, or None when no response came."""
    ready = preflight(peer, egress_dial)
    if isinstance(ready, Outcome):
        return EchoResult(False, 0.0, ready.reason)
    t0 = time.perf_counter()
    status = exchange(peer, ready)
    rtt = (time.perf_counter() - t0) * 1000
    if isinstance(status, Outcome):
        return EchoResult(False, rtt, status.reason)
    if status is None:
        return EchoResult(False, rtt, "no C-ECHO response (association aborted or timed out)")
    if status != 0:
        return EchoResult(False, rtt, f"C-ECHO status 0x{status:04X}")
    return EchoResult(True, rtt, "C-ECHO success")


def run_probe(peer: Peer, pairs: Iterable[tuple[str, str]], egress_dial: egress.TcpCheck | None,
              exchange: ProbeExchange) -> tuple[Outcome | None, list[tuple[str, str, bool]]]:
    """Propose each (SOP class, transfer syntax) as its own context; report which the
    peer accepts. Sends no object. Dials what ``egress_dial`` checked, as ``run_echo``."""
    ready = preflight(peer, egress_dial)
    if isinstance(ready, Outcome):
        return ready, []
    pairs = list(dict.fromkeys(pairs))[:MAX_CONTEXTS]
    contexts = [(c, [t]) for c, t in pairs] or [VERIFICATION]
    accepted = exchange(peer, ready, contexts)
    if isinstance(accepted, Outcome):
        return accepted, []
    return None, [(c, t, (c, t) in accepted) for c, t in pairs]

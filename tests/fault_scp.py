#!/usr/bin/env python3
"""A fault-injecting C-STORE SCP: a *real network peer* for integration tests.

Run as a subprocess::

    python tests/fault_scp.py --port N [options]

or drive it from a test through :class:`FaultSCP` (below), which starts the
script with ``sys.executable`` and stops it again by PID.  Importing this
module starts nothing.  Dependencies: stdlib + pynetdicom + pydicom.

Behaviour (see ``--help``):

* listens on 127.0.0.1:PORT (``--port 0``: an ephemeral port, reported in the
  ready line), AE title ``--ae-title`` (default FAULTSCP), called AE title must
  match (``require_called_aet``; mismatch -> A-ASSOCIATE-RJ 1,1,7);
* accepts every storage SOP class of pynetdicom's
  ``AllStoragePresentationContexts`` with :data:`DEFAULT_TRANSFER_SYNTAXES`
  (restrict with ``--transfer-syntaxes``; drop SOP classes with
  ``--reject-sop-class``) plus Verification (always with pynetdicom's default
  transfer syntaxes: implicit LE, explicit LE, deflated, explicit BE);
* TCP_NODELAY on every accepted socket;
* fault modes: ``--status``, ``--status-for``, ``--status-sequence``,
  ``--reject``, ``--no-response``, ``--abort-on-store``, ``--abort-for UID``, ``--delay-s``,
  ``--require-user``;
* ``--record DIR``: ``DIR/received.jsonl`` (one line per C-STORE, whatever
  the outcome), ``DIR/<sha256>.dcm-raw`` (data set bytes exactly as received,
  for success/warning statuses only) and ``DIR/associations.jsonl``;
* prints ``fault_scp: listening on 127.0.0.1:PORT`` (flushed) once it accepts
  connections; exits 0 on SIGTERM/SIGINT.

Status precedence for a C-STORE: ``--status-for`` (by Affected SOP Instance
UID) > ``--status-sequence`` (by overall C-STORE number, counting *every*
C-STORE received, last entry repeats) > ``--status`` (default 0x0000).

Record formats
--------------
``received.jsonl``: ``{"n", "sop_instance_uid", "sop_class_uid",
"transfer_syntax", "priority", "sha256", "size", "calling_ae", "called_ae",
"status", "status_hex", "action", "recorded"}`` where ``action`` is
``"answered"``, ``"abort"`` (``--abort-on-store``) or ``"no-response"``;
``priority`` is the C-STORE-RQ Priority field as the SCU sent it (PS3.7 9.1.1.1:
0 MEDIUM, 1 HIGH, 2 LOW); ``status`` is the integer status sent (``null`` when
nothing was answered); ``recorded`` is true when the raw bytes were written.
The line (and raw file) is written *before* the response/abort goes out, so an
SCU that got its answer can read it.

``associations.jsonl``: ``{"event", "calling_ae", "called_ae", "username"}``
plus event-specific fields.  Events: ``"user_id"`` (``user_id_type``,
``verified``), ``"accepted"`` (``tcp_nodelay``: the option as read back from
the accepted socket), ``"rejected"`` (``result``, ``source``, ``reason``),
``"aborted"``, ``"released"``.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

LOOPBACK = "127.0.0.1"
READY_PREFIX = "fault_scp: listening on "
DEFAULT_AE_TITLE = "FAULTSCP"

#: Transfer syntaxes accepted for storage SOP classes unless
#: ``--transfer-syntaxes`` restricts them.
DEFAULT_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Valid A-ASSOCIATE-RJ (source -> diagnostics), as enforced by
#: ``pynetdicom.acse.ACSE.send_reject`` (PS3.8 9.3.4).
VALID_REJECT_DIAGNOSTICS = {1: (1, 2, 3, 7), 2: (1, 2), 3: (1, 2)}

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


# ==========================================================================
# test-side helpers (no pynetdicom import needed)
# ==========================================================================


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago (racy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` (execs the program: PID unchanged), so
    the SCP dies with the process that started it even without atexit."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.uname().sysname != "Linux":
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


_LIVE: "set[FaultSCP]" = set()


def _stop_all_live() -> None:
    for scp in list(_LIVE):
        try:
            scp.stop()
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_stop_all_live)


def _read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():  # skip a half-written tail
            out.append(json.loads(line))
    return out


class FaultSCP:
    """Run ``tests/fault_scp.py`` as a child process::

        scp = FaultSCP(None, "--status", "0xA700", record_dir=tmp_path / "scp").start()
        ...
        scp.received()      # list of dicts from received.jsonl
        scp.stop()

    *port* ``None`` lets the SCP bind an ephemeral port (``--port 0``); the
    real port is read from its ready line and kept, so a later ``start()``
    after ``stop()`` reuses the same port.  For convenience a first
    positional argument that starts with ``-`` is taken as a CLI option, not
    as the port (``FaultSCP("--no-response", record_dir=d)``).  *args* are
    extra CLI options; ``--port``, ``--ae-title`` and ``--record`` are
    supplied by this class.  Output (stdout+stderr) goes to
    ``record_dir/fault_scp.log``.
    """

    def __init__(
        self,
        port: int | str | None = None,
        *args: str,
        record_dir: str | os.PathLike,
        ae_title: str = DEFAULT_AE_TITLE,
        start_timeout: float = 15.0,
        pdeathsig: bool = True,
    ) -> None:
        if isinstance(port, str) and port.startswith("-"):
            args = (port, *args)
            port = None
        self.port: int | None = int(port) if port is not None else None
        self.args: tuple[str, ...] = tuple(str(a) for a in args)
        self.record_dir = Path(record_dir)
        self.ae_title = ae_title
        self.start_timeout = start_timeout
        self.pdeathsig = pdeathsig
        self.log_path = self.record_dir / "fault_scp.log"
        self.returncode: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_fh = None

    # -- process control ---------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            str(self.port if self.port is not None else 0),
            "--ae-title",
            self.ae_title,
            "--record",
            str(self.record_dir),
            *self.args,
        ]

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> "FaultSCP":
        if self.running:
            raise RuntimeError(f"fault_scp already running (pid {self.pid})")
        self.record_dir.mkdir(parents=True, exist_ok=True)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = (_pdeathsig_prefix() if self.pdeathsig else []) + self.command()
        self._log_fh = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            close_fds=True,
            env=env,
        )
        self.returncode = None
        _LIVE.add(self)

        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            text = self._new_output(log_offset)
            m = re.search(re.escape(READY_PREFIX) + r"127\.0\.0\.1:(\d+)\n", text)
            if m:
                self.port = int(m.group(1))
                return self
            rc = self._proc.poll()
            if rc is not None:
                self._cleanup()
                raise RuntimeError(
                    f"fault_scp exited with {rc} before listening\n"
                    f"command: {cmd}\n--- output ---\n{self._new_output(log_offset)}"
                )
            if time.monotonic() >= deadline:
                self.stop()
                raise TimeoutError(
                    f"fault_scp not listening after {self.start_timeout}s\n"
                    f"command: {cmd}\n--- output ---\n{self._new_output(log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _new_output(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, wait *timeout* s, then SIGKILL.  Returns the exit
        code (0 after a clean SIGTERM shutdown)."""
        proc = self._proc
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.returncode = proc.returncode
        self._cleanup()
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL by PID (simulates a crashed peer)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        if proc is not None:
            self.returncode = proc.returncode
        self._cleanup()
        return self.returncode

    def _cleanup(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self._proc = None
        _LIVE.discard(self)

    def __enter__(self) -> "FaultSCP":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- records -----------------------------------------------------------

    def received(self) -> list[dict]:
        """One dict per C-STORE received (see module docstring)."""
        return _read_jsonl(self.record_dir / "received.jsonl")

    def associations(self) -> list[dict]:
        """One dict per association event (see module docstring)."""
        return _read_jsonl(self.record_dir / "associations.jsonl")

    def raw(self, sha256: str) -> bytes:
        """The data set bytes recorded under *sha256*, exactly as received."""
        return (self.record_dir / f"{sha256}.dcm-raw").read_bytes()

    def wait_received(self, count: int, timeout: float = 10.0) -> list[dict]:
        """Poll until at least *count* C-STOREs are recorded."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.received()
            if len(rows) >= count:
                return rows
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(rows)} of {count} C-STOREs after {timeout}s")
            time.sleep(0.02)


# ==========================================================================
# the SCP itself
# ==========================================================================


def _parse_status(text: str) -> int:
    """``0xA700`` / ``A700`` / ``0`` -> int (always hexadecimal)."""
    t = text.strip()
    if t.lower().startswith("0x"):
        t = t[2:]
    try:
        value = int(t, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex status: {text!r}") from None
    if not 0 <= value <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"status out of range: {text!r}")
    return value


def _parse_status_list(text: str) -> list[int]:
    items = [s for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty status sequence")
    return [_parse_status(s) for s in items]


def _parse_status_for(text: str) -> tuple[str, int]:
    uid, sep, status = text.rpartition("=")
    uid = uid.strip()
    if not sep or not _UID_RE.match(uid):
        raise argparse.ArgumentTypeError(f"expected UID=HEX, got {text!r}")
    return uid, _parse_status(status)


def _parse_uid(text: str) -> str:
    uid = text.strip()
    if not _UID_RE.match(uid) or len(uid) > 64:
        raise argparse.ArgumentTypeError(f"not a UID: {text!r}")
    return uid


def _parse_uid_list(text: str) -> list[str]:
    uids = [_parse_uid(s) for s in text.split(",") if s.strip()]
    if not uids:
        raise argparse.ArgumentTypeError("empty transfer syntax list")
    return uids


def _parse_reject(text: str) -> tuple[int, int, int]:
    try:
        result, source, reason = (int(p, 0) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected RESULT,SOURCE,REASON (e.g. 1,1,7), got {text!r}"
        ) from None
    if result not in (1, 2):
        raise argparse.ArgumentTypeError("RESULT must be 1 (permanent) or 2 (transient)")
    if reason not in VALID_REJECT_DIAGNOSTICS.get(source, ()):
        raise argparse.ArgumentTypeError(
            f"invalid SOURCE,REASON {source},{reason}; valid: {VALID_REJECT_DIAGNOSTICS}"
        )
    return result, source, reason


def _parse_user(text: str) -> tuple[str, str | None]:
    user, sep, passcode = text.partition(":")
    if not user:
        raise argparse.ArgumentTypeError("empty user name")
    return user, (passcode if sep else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fault_scp.py",
        description="Fault-injecting C-STORE SCP on 127.0.0.1 for integration tests.",
    )
    p.add_argument("--port", type=int, required=True, help="TCP port (0 = ephemeral)")
    p.add_argument("--ae-title", default=DEFAULT_AE_TITLE, help="own AE title (default %(default)s)")
    p.add_argument(
        "--transfer-syntaxes",
        type=_parse_uid_list,
        metavar="UID,UID,...",
        help="accept only these transfer syntaxes for storage SOP classes",
    )
    p.add_argument(
        "--reject-sop-class",
        type=_parse_uid,
        action="append",
        default=[],
        metavar="UID",
        help="do not support this SOP class (repeatable)",
    )
    p.add_argument("--status", type=_parse_status, default=0x0000, metavar="HEX")
    p.add_argument(
        "--status-for",
        type=_parse_status_for,
        action="append",
        default=[],
        metavar="UID=HEX",
        help="status for one SOP Instance UID (repeatable)",
    )
    p.add_argument(
        "--status-sequence",
        type=_parse_status_list,
        metavar="HEX,HEX,...",
        help="n-th C-STORE overall gets n-th status; the last one repeats",
    )
    p.add_argument(
        "--reject",
        type=_parse_reject,
        metavar="RESULT,SOURCE,REASON",
        help="reject every A-ASSOCIATE-RQ with this A-ASSOCIATE-RJ",
    )
    p.add_argument(
        "--no-response",
        action="store_true",
        help="receive C-STOREs but never answer (until the peer goes away, 3600 s max)",
    )
    p.add_argument("--abort-on-store", action="store_true", help="A-ABORT on each C-STORE")
    p.add_argument(
        "--abort-for",
        type=_parse_uid,
        action="append",
        default=[],
        metavar="UID",
        help="A-ABORT on the C-STORE of this SOP Instance UID only (repeatable): a poison object",
    )
    p.add_argument("--delay-s", type=float, default=0.0, metavar="SECONDS")
    p.add_argument(
        "--require-user",
        type=_parse_user,
        metavar="USER[:PASSCODE]",
        help="require this user identity (else A-ASSOCIATE-RJ 2,2,1)",
    )
    p.add_argument("--record", type=Path, metavar="DIR", help="record what was received")
    # Diagnostics only (used by the self-check to show why TCP_NODELAY matters).
    p.add_argument("--no-tcp-nodelay", action="store_true", help=argparse.SUPPRESS)
    return p


class _Recorder:
    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, row: dict) -> None:
        if self.dir is None:
            return
        line = json.dumps(row, sort_keys=True) + "\n"
        with self._lock, open(self.dir / name, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    def store(self, row: dict) -> None:
        self._append("received.jsonl", row)

    def association(self, row: dict) -> None:
        self._append("associations.jsonl", row)

    def raw(self, sha256: str, data: bytes) -> bool:
        if self.dir is None:
            return False
        final = self.dir / f"{sha256}.dcm-raw"
        tmp = self.dir / f".{sha256}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, final)  # atomic: readers never see a partial file
        return True


def _is_success_or_warning(status: int) -> bool:
    return status == 0x0000 or 0xB000 <= status <= 0xBFFF


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
    from pynetdicom.transport import ThreadedAssociationServer

    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="fault_scp %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    _config.LOG_HANDLER_LEVEL = "none"  # no per-PDU debug handlers

    stop = threading.Event()
    recorder = _Recorder(args.record)
    counter_lock = threading.Lock()
    counter = [0]
    status_for = dict(args.status_for)
    nodelay = not args.no_tcp_nodelay

    # -- association bookkeeping -------------------------------------------

    def _assoc_info(assoc) -> dict:
        rq = assoc.requestor.primitive
        calling = getattr(rq, "calling_ae_title", None)
        called = getattr(rq, "called_ae_title", None)
        username = None
        try:
            ui = assoc.requestor.user_identity
        except Exception:
            ui = None
        if ui is not None and ui.user_identity_type in (1, 2):
            username = bytes(ui.primary_field or b"").decode("utf-8", "replace")
        return {
            "calling_ae": str(calling).strip() if calling is not None else None,
            "called_ae": str(called).strip() if called is not None else None,
            "username": username,
        }

    def on_requested(event) -> None:
        if args.reject is None:
            return
        # pynetdicom supports sending the A-ASSOCIATE-RJ from an EVT_REQUESTED
        # handler (Association.run_reactor skips negotiation when
        # is_rejected).  Mirror ACSE._negotiate_as_acceptor's own reject
        # path: send_reject -> EVT_REJECTED -> kill (which waits until the RJ
        # went out and the DUL is idle before the socket is closed).
        assoc = event.assoc
        assoc.acse.send_reject(*args.reject)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_user_id(event) -> tuple[bool, None]:
        want_user, want_pass = args.require_user
        user = bytes(event.primary_field or b"").decode("utf-8", "replace")
        secondary = bytes(event.secondary_field or b"").decode("utf-8", "replace")
        if event.user_id_type == 1:
            ok = user == want_user and want_pass is None
        elif event.user_id_type == 2:
            ok = user == want_user and (want_pass is None or secondary == want_pass)
        else:
            ok = False
        recorder.association(
            {
                "event": "user_id",
                **_assoc_info(event.assoc),
                "username": user if event.user_id_type in (1, 2) else None,
                "user_id_type": event.user_id_type,
                "verified": ok,
            }
        )
        # (False, None) -> pynetdicom rejects with A-ASSOCIATE-RJ 2,2,1
        return ok, None

    def on_requested_require_user(event) -> None:
        # pynetdicom only consults EVT_USER_ID when the request *has* a user
        # identity item; a request without one must not get in either.
        if args.reject is not None or event.assoc.is_rejected:
            return
        if event.assoc.requestor.user_identity is None:
            recorder.association(
                {"event": "user_id", **_assoc_info(event.assoc), "user_id_type": None, "verified": False}
            )
            event.assoc.acse.send_reject(2, 2, 1)  # same triple pynetdicom uses
            evt.trigger(event.assoc, evt.EVT_REJECTED, {})
            event.assoc.kill()

    def on_accepted(event) -> None:
        try:  # the accepted socket's real option state (pynetdicom internals)
            sock = event.assoc.dul.socket.socket
            tcp_nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except Exception:
            tcp_nodelay = None
        recorder.association({"event": "accepted", **_assoc_info(event.assoc), "tcp_nodelay": tcp_nodelay})

    def on_rejected(event) -> None:
        prim = event.assoc.acceptor.primitive
        recorder.association(
            {
                "event": "rejected",
                **_assoc_info(event.assoc),
                "result": getattr(prim, "result", None),
                "source": getattr(prim, "result_source", None),
                "reason": getattr(prim, "diagnostic", None),
            }
        )

    def on_aborted(event) -> None:
        recorder.association({"event": "aborted", **_assoc_info(event.assoc)})

    def on_released(event) -> None:
        recorder.association({"event": "released", **_assoc_info(event.assoc)})

    # -- C-STORE -----------------------------------------------------------

    def _peer_gone(assoc) -> bool:
        # The reactor thread is busy running this handler, so is_aborted is
        # not updated; look at the DUL instead (internals, best effort).
        try:
            if assoc.acse.is_aborted():
                return True
            return assoc.dul.state_machine.current_state == "Sta1"
        except Exception:
            return False

    def on_c_store(event):
        req = event.request
        with counter_lock:
            counter[0] += 1
            n = counter[0]
        uid = str(req.AffectedSOPInstanceUID or "")
        if uid in status_for:
            status = status_for[uid]
        elif args.status_sequence:
            status = args.status_sequence[min(n, len(args.status_sequence)) - 1]
        else:
            status = args.status

        data = req.DataSet.getvalue() if req.DataSet is not None else b""
        sha = hashlib.sha256(data).hexdigest()
        info = _assoc_info(event.assoc)
        row = {
            "n": n,
            "sop_instance_uid": uid,
            "sop_class_uid": str(req.AffectedSOPClassUID or ""),
            "transfer_syntax": str(event.context.transfer_syntax),
            "priority": int(req.Priority) if req.Priority is not None else None,
            "sha256": sha,
            "size": len(data),
            "calling_ae": info["calling_ae"],
            "called_ae": info["called_ae"],
        }

        if args.abort_on_store or uid in args.abort_for:
            recorder.store({**row, "status": None, "status_hex": None, "action": "abort", "recorded": False})
            event.assoc.abort()  # non-blocking inside a handler
            return 0xA700  # ignored: pynetdicom sends nothing once aborted

        if args.no_response:
            recorder.store(
                {**row, "status": None, "status_hex": None, "action": "no-response", "recorded": False}
            )
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline and not stop.is_set():
                if _peer_gone(event.assoc):
                    break
                stop.wait(0.1)
            if not _peer_gone(event.assoc):
                event.assoc.abort()  # never answer
            return 0xA700

        if args.delay_s > 0:
            stop.wait(args.delay_s)

        recorded = False
        if _is_success_or_warning(status):
            recorded = recorder.raw(sha, data)
        recorder.store(
            {**row, "status": status, "status_hex": f"0x{status:04X}", "action": "answered", "recorded": recorded}
        )
        return status

    # -- presentation contexts -----------------------------------------------

    ae = AE(ae_title=args.ae_title)
    ae.require_called_aet = True
    ts = list(args.transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
    rejected = set(args.reject_sop_class)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax not in rejected:
            ae.add_supported_context(cx.abstract_syntax, ts)
    if Verification not in rejected:
        ae.add_supported_context(Verification)  # pynetdicom default TSs

    handlers = [
        (evt.EVT_C_STORE, on_c_store),
        (evt.EVT_ACCEPTED, on_accepted),
        (evt.EVT_REJECTED, on_rejected),
        (evt.EVT_ABORTED, on_aborted),
        (evt.EVT_RELEASED, on_released),
    ]
    if args.reject is not None:
        handlers.append((evt.EVT_REQUESTED, on_requested))
    if args.require_user is not None:
        handlers.append((evt.EVT_USER_ID, on_user_id))
        handlers.append((evt.EVT_REQUESTED, on_requested_require_user))

    class NoDelayServer(ThreadedAssociationServer):
        def get_request(self):
            client, address = super().get_request()
            if nodelay:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return client, address

    def _on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    try:
        server = ae.make_server(
            (LOOPBACK, args.port),
            evt_handlers=handlers,
            server_class=NoDelayServer,
        )
    except OSError as exc:
        print(f"fault_scp: cannot listen on {LOOPBACK}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 2
    ae._servers.append(server)  # as start_server() does; server.shutdown() removes it
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    port = server.server_address[1]
    print(f"{READY_PREFIX}{LOOPBACK}:{port}", flush=True)

    while not stop.wait(1.0):
        pass

    # Clean shutdown; a watchdog makes sure we exit even if something hangs.
    def _watchdog() -> None:
        time.sleep(4.0)
        sys.stderr.write("fault_scp: shutdown took too long, exiting\n")
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=_watchdog, daemon=True).start()
    try:
        server.shutdown()
    except Exception as exc:  # pragma: no cover
        print(f"fault_scp: server shutdown: {exc!r}", file=sys.stderr, flush=True)
    for assoc in ae.active_associations:
        try:
            assoc.abort()
        except Exception:  # pragma: no cover
            pass
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()

"""Real DICOM peers on loopback for integration tests.

Everything here starts external programs (DCMTK ``storescp``, Debian's
``Orthanc``) as child processes and stops them again *by PID* -- never by
name.  Nothing is left behind:

* every started peer is registered in a module-level registry that an
  ``atexit`` hook drains (covers normal interpreter exit and Ctrl-C);
* fixtures stop peers in their teardown (runs even when the test fails);
* on Linux the child is started through ``setpriv --pdeathsig SIGKILL``
  (util-linux; ``setpriv`` *execs* the real program, so the PID we hold is
  the peer's PID), which makes the kernel SIGKILL the peer if the process
  that started it dies without running atexit (e.g. pytest itself is
  SIGKILLed).  Caveat: the death signal fires when the *thread* that forked
  exits, so start peers from a long-lived thread (the pytest main thread
  always is).  Pass ``pdeathsig=False`` to opt out.

Loopback binding:

* ``storescp`` (DCMTK 3.6.7) has no bind-address option; it listens on all
  interfaces on its (random, free) port.  Clients here always connect to
  127.0.0.1.
* ``Orthanc`` 1.10 has no bind-address option either (neither for HTTP nor
  DICOM); both ports listen on all interfaces.  ``RemoteAccessAllowed:
  false`` makes the HTTP server refuse non-loopback clients; the DICOM port
  is open on all interfaces (random port, test data only).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import httpx
import pytest

LOOPBACK = "127.0.0.1"

# tool / file -> Debian package providing it
DEBIAN_PACKAGES = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dcmsend": "dcmtk",
    "findscu": "dcmtk",
    "movescu": "dcmtk",
    "dcmdump": "dcmtk",
    "Orthanc": "orthanc",
    "libOrthancDicomWeb.so": "orthanc-dicomweb",
    "promtool": "prometheus",
}

# Where Debian's orthanc-dicomweb installs the plugin (the first is a symlink
# to /usr/lib/orthanc/libOrthancDicomWeb.so.<version>).
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)

# Orthanc lives in /usr/sbin, which is not on every user's PATH.
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


# Ports handed out below the kernel's ephemeral range, a block per pytest-xdist worker:
# a port free a moment ago can then be taken neither by another worker's free_port()
# nor by any outgoing connection's local port (those come from the ephemeral range).
_PORT_BLOCK = 3000
_PORT_BASE = 20000
_next_port = itertools.count()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago: from this worker's
    block below the ephemeral range when the machine leaves room for it, else any.

    (A process outside the tests may still grab it before the peer binds it; peers'
    ``start()`` fails loudly in that case.)
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base = _PORT_BASE + (index % 4) * _PORT_BLOCK
    if base + _PORT_BLOCK <= _ephemeral_low():
        for _ in range(_PORT_BLOCK):
            port = base + next(_next_port) % _PORT_BLOCK
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Poll until something accepts TCP connections on host:port.

    Raises ``TimeoutError`` after *timeout* seconds.  If *proc* is given and
    exits meanwhile, raises ``RuntimeError`` at once (with the tail of *log*).
    Note: a probe is a bare TCP connect+close; storescp logs it as an
    "Association Received" that never completes -- harmless.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.pid} exited with {proc.returncode} before "
                f"listening on {host}:{port}{_log_tail(log)}"
            )
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"nothing listening on {host}:{port} after {timeout}s{_log_tail(log)}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll *predicate* until it returns a truthy value (returned) or time out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(what: str, package: str):
    msg = f"{what} not installed (apt-get install {package})"
    if _ci():
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def require_tool(name: str) -> str:
    """Absolute path of executable *name*; skip (or fail when CI=true) if absent."""
    path = shutil.which(name) or shutil.which(name, path=_SBIN_PATH)
    if path is None:
        _missing(name, DEBIAN_PACKAGES.get(name, "<unknown package>"))
    return path


def require_dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin; skip (or fail when CI=true) if absent."""
    env = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    for cand in ([env] if env else []) + list(DICOMWEB_PLUGIN_CANDIDATES):
        if cand and os.path.isfile(cand):
            return cand
    _missing("Orthanc DICOMweb plugin (libOrthancDicomWeb.so)", "orthanc-dicomweb")


def _log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None:
        return ""
    try:
        text = Path(log).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- last lines of {log} ---\n" + "\n".join(text)


# --------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------

_LIVE: "set[_Peer]" = set()


def _stop_all_live() -> None:
    for peer in list(_LIVE):
        try:
            peer.stop(timeout=5)
        except Exception:  # pragma: no cover - best effort at exit
            pass


atexit.register(_stop_all_live)


def _pdeathsig_prefix() -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None or not os.uname().sysname == "Linux":
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


class _Peer:
    """Common start/stop-by-PID machinery."""

    name = "peer"

    def __init__(self, *, pdeathsig: bool = True, stop_timeout: float = 10.0):
        self._proc: subprocess.Popen | None = None
        self._log_fh = None
        self.pdeathsig = pdeathsig
        self.stop_timeout = stop_timeout
        self.log_path: Path | None = None

    # subclasses provide these
    def _command(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _wait_ready(self, timeout: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, cwd: Path | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} already running (pid {self.pid})")
        cmd = (_pdeathsig_prefix() if self.pdeathsig else []) + self._command()
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n===== {time.strftime('%H:%M:%S')} start: {cmd}\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            close_fds=True,
        )
        _LIVE.add(self)

    def start(self, timeout: float = 30.0):
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the peer's PID, SIGKILL after *timeout*; reap it. Idempotent.

        Returns the exit code (None if it was not started).
        """
        timeout = self.stop_timeout if timeout is None else timeout
        proc, self._proc = self._proc, None
        rc = None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)
                rc = proc.returncode
            finally:
                _LIVE.discard(self)
        else:
            _LIVE.discard(self)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return rc

    def kill(self) -> None:
        """SIGKILL immediately (simulate a crash); reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        _LIVE.discard(self)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def log_text(self) -> str:
        if self._log_fh is not None:
            self._log_fh.flush()
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):  # last resort; normally stop() already ran
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(timeout=5)
        except Exception:
            pass


# --------------------------------------------------------------------------
# DCMTK storescp
# --------------------------------------------------------------------------


class StoreSCP(_Peer):
    """DCMTK ``storescp`` on a free port, storing every received object.

    Command line: ``storescp -v -dhl +xa +uf -aet AE -od OUT_DIR [extra] PORT``

    * ``+xa`` (--accept-all): accept all supported transfer syntaxes,
      including compressed ones.
    * ``+uf`` (--unique-filenames): never overwrite -- sending the same SOP
      instance twice yields two files (``-uf`` is the default *UID-based*
      naming, which would overwrite).  Names look like ``CT.X.<uid>``.
    * ``-dhl``: no reverse DNS lookups (avoids delays).
    * Log (stdout+stderr, ``-v``) goes to ``OUT_DIR.parent/storescp-<port>.log``.

    Fault-injection options supported by DCMTK 3.6.7's storescp (pass via
    *extra_args*; verified behaviour noted):

    * ``--refuse``        refuse *every* association (A-ASSOCIATE-RJ,
                          rejected-permanent, service-user, no reason).
    * ``--reject``        reject association only if the requestor sent *no*
                          Implementation Class UID -- every normal toolkit
                          (DCMTK, pynetdicom) sends one, so this is usually a
                          no-op; use ``--refuse`` for "always reject".
    * ``--ignore``        receive C-STORE but don't write a file (still
                          answers success).
    * ``--abort-after``   A-ABORT after receiving the C-STORE-RQ, before the
                          response; nothing stored.
    * ``--abort-during``  A-ABORT while receiving the C-STORE-RQ data; nothing
                          stored.
    * ``--sleep-after S`` sleep S seconds after storing; DCMTK 3.6.7 answers first, so it
      does not delay the response (measured).
    * ``--sleep-during S`` sleep S seconds during the store.
    * ``-aet AE``         our AE title (set via *ae_title*).  NB: storescp does
                          *not* check the called AE title; any called AE is
                          accepted.
    * ``-pm``             promiscuous: accept unknown SOP classes.
    * ``-ts/-ta/-td S``   socket / ACSE / DIMSE timeouts; ``-pdu N`` max PDU.
    * ``+xi`` etc.        restrict/prefer transfer syntaxes (e.g. ``+xi`` =
                          implicit VR LE only) -- replaces ``+xa`` semantics
                          (DCMTK uses the last one given).
    * ``--fork``          one child process per association.  Avoid: children
                          are not tracked by PID here.

    After ``--abort-*`` storescp keeps running and serves the next
    association.  There is no bind-address option: it listens on all
    interfaces on its random port.
    """

    name = "storescp"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        ae_title: str = "PACS",
        extra_args: Sequence[str] = (),
        port: int | None = None,
        *,
        executable: str | None = None,
        pdeathsig: bool = True,
    ):
        super().__init__(pdeathsig=pdeathsig)
        self.executable = executable or require_tool("storescp")
        self.output_dir = Path(output_dir)
        self.ae_title = ae_title
        self.extra_args = list(extra_args)
        self.host = LOOPBACK
        self.port = port or free_port()
        self.log_path = self.output_dir.parent / f"storescp-{self.port}.log"

    def _command(self) -> list[str]:
        return [
            self.executable, "-v", "-dhl", "+xa", "+uf",
            "-aet", self.ae_title,
            "-od", str(self.output_dir),
            *self.extra_args,
            str(self.port),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> "StoreSCP":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def _wait_ready(self, timeout: float) -> None:
        wait_for_port(self.host, self.port, timeout, proc=self._proc, log=self.log_path)

    def received_files(self) -> list[Path]:
        """Files written so far (sorted by name; hidden/temp files excluded)."""
        if not self.output_dir.is_dir():
            return []
        return sorted(
            p for p in self.output_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
        )

    def wait_for_files(self, count: int, timeout: float = 10.0) -> list[Path]:
        """Poll until at least *count* files were received; return them."""
        def enough():
            files = self.received_files()
            return files if len(files) >= count else None

        return wait_until(enough, timeout, what=f"{count} file(s) in {self.output_dir}")

    @property
    def address(self) -> tuple[str, int, str]:
        """(host, port, ae_title) -- handy for configuring a sender."""
        return (self.host, self.port, self.ae_title)

    def __repr__(self) -> str:
        return f"<StoreSCP {self.ae_title}@{self.host}:{self.port} pid={self.pid} out={self.output_dir}>"


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


class Orthanc(_Peer):
    """Debian's ``Orthanc`` with a private JSON config and the DICOMweb plugin.

    Only our generated config file is passed on the command line, so nothing
    in ``/etc/orthanc`` (Debian's default plugin dir, credentials, ...) is
    read.  Storage + SQLite index live in *workdir*; ports are fixed at
    construction, so ``stop()`` then ``start()`` restarts on the same ports
    with the same data (outage tests).  ``kill()`` simulates a crash.

    *extra_config* is merged into the top level of the config (e.g.
    ``{"DicomCheckCalledAet": True}`` or
    ``{"DicomModalities": {"mf": ["MF", "127.0.0.1", 11112]}}``).

    No bind-address option exists in Orthanc 1.10: HTTP and DICOM listen on
    all interfaces; ``RemoteAccessAllowed: false`` restricts HTTP to loopback.
    """

    name = "Orthanc"

    def __init__(
        self,
        workdir: str | os.PathLike | None = None,
        ae_title: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        check_called_aet: bool = False,
        extra_config: dict | None = None,
        *,
        executable: str | None = None,
        verbose: bool = False,
        pdeathsig: bool = True,
    ):
        super().__init__(pdeathsig=pdeathsig, stop_timeout=20.0)
        self.executable = executable or require_tool("Orthanc")
        self.plugin = require_dicomweb_plugin()
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.ae_title = ae_title
        self.host = LOOPBACK
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.check_called_aet = check_called_aet
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.startup_seconds: float | None = None
        self._client: httpx.Client | None = None

    # -- config / process ---------------------------------------------------

    def config(self) -> dict:
        storage = str(self.workdir / "storage")
        cfg = {
            "Name": f"test-{self.ae_title}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "Plugins": [self.plugin],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomModalities": {},
            "OrthancPeers": {},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "LuaScripts": [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        }
        cfg.update(self.extra_config)
        return cfg

    def _command(self) -> list[str]:
        cmd = [self.executable, "--no-jobs"]
        if self.verbose:
            cmd.append("--verbose")
        cmd.append(str(self.config_path))
        return cmd

    def start(self, timeout: float = 30.0) -> "Orthanc":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        t0 = time.monotonic()
        self._spawn(cwd=self.workdir)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        with httpx.Client(trust_env=False, timeout=2.0) as c:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    rc = None if self._proc is None else self._proc.returncode
                    raise RuntimeError(f"Orthanc exited with {rc} during startup{_log_tail(self.log_path)}")
                try:
                    r = c.get(f"{self.base_url}/system")
                    if r.status_code == 200:
                        break
                    last_err = RuntimeError(f"/system -> {r.status_code}")
                except httpx.HTTPError as e:
                    last_err = e
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"Orthanc HTTP not ready after {timeout}s ({last_err!r}){_log_tail(self.log_path)}"
                    )
                time.sleep(0.05)
        wait_for_port(self.host, self.dicom_port, max(0.5, deadline - time.monotonic()),
                      proc=self._proc, log=self.log_path)  # fmt: skip

    def stop(self, timeout: float | None = None) -> int | None:
        if self._client is not None:
            self._client.close()
            self._client = None
        return super().stop(timeout)

    def kill(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        super().kill()

    def restart(self, timeout: float = 30.0) -> "Orthanc":
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop, and delete workdir if we created it ourselves."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc):
        self.cleanup()

    # -- HTTP helpers -------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def address(self) -> tuple[str, int, str]:
        """(host, dicom_port, ae_title)."""
        return (self.host, self.dicom_port, self.ae_title)

    @property
    def http(self) -> httpx.Client:
        """A (lazily created) httpx client with base_url set; trust_env=False."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, trust_env=False, timeout=30.0)
        return self._client

    def instances(self) -> list[str]:
        r = self.http.get("/instances")
        r.raise_for_status()
        return r.json()

    def count(self) -> int:
        return len(self.instances())

    def instance_file(self, orthanc_id: str) -> bytes:
        r = self.http.get(f"/instances/{orthanc_id}/file")
        r.raise_for_status()
        return r.content

    def instance_tags(self, orthanc_id: str) -> dict:
        r = self.http.get(f"/instances/{orthanc_id}/simplified-tags")
        r.raise_for_status()
        return r.json()

    def sop_instance_uids(self) -> list[str]:
        r = self.http.get("/instances", params={"expand": ""})
        r.raise_for_status()
        return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in r.json())

    def wait_for_count(self, count: int, timeout: float = 10.0) -> list[str]:
        """Poll until at least *count* instances are stored; return their ids."""
        def enough():
            ids = self.instances()
            return ids if len(ids) >= count else None

        return wait_until(enough, timeout, what=f"{count} instance(s) in Orthanc")

    def clear(self) -> None:
        """Delete all stored patients (for sharing a module-scoped Orthanc)."""
        for pid in self.http.get("/patients").json():
            self.http.delete(f"/patients/{pid}").raise_for_status()

    def stow(self, datasets: Iterable[bytes], boundary: str | None = None) -> httpx.Response:
        """POST raw DICOM files to ``{dicomweb_url}/studies`` (STOW-RS)."""
        body, ctype = multipart_related(datasets, boundary)
        return self.http.post(
            f"{self.dicomweb_url}/studies",
            content=body,
            headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
        )

    def __repr__(self) -> str:
        return (
            f"<Orthanc {self.ae_title} dicom={self.dicom_port} http={self.http_port} "
            f"pid={self.pid} dir={self.workdir}>"
        )


def multipart_related(parts: Iterable[bytes], boundary: str | None = None,
                      part_type: str = "application/dicom") -> tuple[bytes, str]:  # fmt: skip
    """Build a STOW-RS ``multipart/related`` body by hand.

    Returns ``(body, content_type_header)``.
    """
    boundary = boundary or f"mfc-{uuid.uuid4().hex}"
    out = bytearray()
    for data in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return bytes(out), ctype

"""PHI at the edges, against `mfconsole serve` subprocesses:

- core dumps are off in the engine's process (/proc/PID/limits), and what the tests
  and the console read of it still works (control socket, SO_PEERCRED, status);
- every file in logs/ is 0600 under umask 022, rotations included;
- an exception that escapes a thread is logged as its class and site only;
- the console's configuration editor works under the systemd unit's file-system
  layout (deploy/mfconsole.service), as far as a test can emulate it: see that test;
- a client certificate is bound to calling AE titles by its subjectAltName (storescu
  +tls against the listener).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import dicomgen
from harness import CANARY_NAME, REPO, mfconsole, poll, write_config
from mfconsole.control import SOCKET_NAME, ControlError, request
from mfconsole.repository import db_path, reading
from peers import free_port, require_tool, wait_for_port
from tlsgen import make_pki

# `mfconsole serve` through cli.main, with a smaller log rotation and, on demand, a
# thread that raises with the canary in its message once the engine's logging is up.
WRAPPER = '''
import logging, sys, threading, time
from mfconsole.engine import logs

config, max_bytes, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "crash"
if max_bytes:
    logs.MAX_BYTES = max_bytes


def crash_in_a_thread():
    while not any(getattr(h, "_mfconsole", False) for h in logging.getLogger().handlers):
        time.sleep(0.05)
    raise ValueError("%s")


if crash:
    threading.Thread(target=crash_in_a_thread, name="canary", daemon=True).start()
from mfconsole.cli import main
sys.exit(main(["--config", config, "serve"]))
''' % CANARY_NAME


@pytest.fixture
def spawn():
    """Popen `mfconsole serve` variants; each is stopped (SIGTERM, then KILL) at teardown."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], *, port: int, stderr: Path, **kw) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        with open(stderr, "ab") as err:
            proc = subprocess.Popen([sys.executable, *argv], stdout=err, stderr=err, env=env, **kw)
        procs.append(proc)
        try:
            wait_for_port("127.0.0.1", port, timeout=20)
        except Exception:
            raise AssertionError(f"serve did not listen: {stderr.read_text(errors='replace')}")
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def core_limit(pid: int) -> list[str]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if ln.startswith("Max core file size"))
    return line.split()[4:6]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# -- core dumps -----------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_serve_runs_without_core_dumps_and_stays_reachable(serve_factory):
    serve = serve_factory()
    assert core_limit(serve.proc.pid) == ["0", "0"]
    # Not dumpable: the console, `status` and the tests still reach it.
    sock = serve.data_dir / SOCKET_NAME
    poll(sock.exists, timeout=20, message="the control socket")     # opened last
    fields = request(sock, "config_fields")
    assert any(f["key"] == "listeners[0].ae_title" for f in fields)
    status = mfconsole("--config", str(serve.config), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["engine"]["pid"] == serve.proc.pid


# -- log files --------------------------------------------------------------------------------


def test_every_log_file_is_0600_under_umask_022_through_rotations(tmp_path, spawn):
    port = free_port()
    config = write_config(tmp_path / "serve", port=port)
    err = tmp_path / "serve.stderr"
    spawn(["-c", WRAPPER, str(config), "600", "-"], port=port, stderr=err,
          cwd=config.parent, umask=0o022)
    logs = config.parent / "var" / "logs"

    def rotated_twice() -> bool:
        # A connection closed before association is one INFO line.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return (logs / "mfconsole.log.2").exists()

    poll(rotated_twice, timeout=30, interval=0.3, message="two rotations")
    files = {p.name: mode(p) for p in logs.iterdir()}
    assert {"mfconsole.log", "mfconsole.log.1", "mfconsole.log.2"} <= set(files), files
    assert set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}


# -- uncaught exceptions ------------------------------------------------------------------------


def test_exception_escaping_a_thread_is_logged_as_class_and_site_only(tmp_path, spawn):
    port = free_port()
    config = write_config(tmp_path / "serve", port=port)
    err = tmp_path / "serve.stderr"
    proc = spawn(["-c", WRAPPER, str(config), "0", "crash"], port=port, stderr=err, cwd=config.parent)
    log = config.parent / "var" / "logs" / "mfconsole.log"
    expected = "uncaught exception in thread canary: ValueError at __main__.crash_in_a_thread line"
    poll(lambda: expected in log.read_text(), timeout=20, message="the crash logged")
    poll(lambda: expected in err.read_text(), timeout=5, message="the crash on stderr")
    for text in (log.read_text(), err.read_text()):
        assert "ZZCANARY" not in text and "Traceback" not in text, text
    assert proc.poll() is None       # the engine goes on


# -- the systemd unit's layout and the console's configuration editor ------------------------------


def unit_service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = None
    for line in (REPO / "deploy" / "mfconsole.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _drop_all_capabilities() -> None:
    """preexec_fn: empty the capability bounding set, so the exec'd engine keeps uid 0
    but no capability (CAP_DAC_OVERRIDE above all): file modes bind it as they bind an
    ordinary user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if libc.prctl(24, cap, 0, 0, 0) != 0:          # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def unprivileged() -> dict:
    """Popen arguments that run the engine without root's power over file modes (the
    unit's User= is not root): as ourselves when we are not root; as root without any
    capability when we are (another user could not reach this interpreter, e.g. under
    /root/.pyenv)."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "import os; os.mkdir('/proc/x')"],
                           preexec_fn=_drop_all_capabilities, capture_output=True, text=True)
    if "PR_CAPBSET_DROP" in probe.stderr:
        pytest.skip("running as root without the right to drop capabilities")
    return {"preexec_fn": _drop_all_capabilities}


def test_console_config_edit_works_in_the_units_file_system_layout(spawn, tmp_path):
    """The unit's layout rebuilt under a temporary root: the install (WorkingDirectory),
    the config's folder, data_dir, the handlers, with exactly the unit's ReadWritePaths
    writable by the engine's user (directory modes stand in for ProtectSystem=strict's
    read-only mounts, which a test cannot make) and ReadOnlyPaths not. The engine runs
    as the unit starts it, as far as a test can: without root's power over file modes
    (see unprivileged), UMask 0077, that working directory and --config. Then the console's edit goes through the
    control socket (the attached console's path: control.py → config_edit.apply).

    A negative control first: with the config's folder read-only, as it was under the
    previous unit, the same edit fails and config.toml is unchanged."""
    s = unit_service_settings()
    argv = shlex.split(s["ExecStart"][0])
    config_path = Path(argv[argv.index("--config") + 1])
    install = Path(s["WorkingDirectory"][0])
    writable = [Path(p.lstrip("-")) for v in s["ReadWritePaths"] for p in v.split()]
    read_only = [Path(p.lstrip("-")) for v in s.get("ReadOnlyPaths", []) for p in v.split()]
    umask = int(s["UMask"][0], 8)
    popen = unprivileged()
    # A short root: the unit's paths nest deep under it, and a control socket's path
    # must fit sun_path (108 bytes) wherever pytest puts tmp_path (xdist adds a level).
    root = Path(tempfile.mkdtemp(prefix="mfunit-"))
    try:
        at = lambda p: root / p.relative_to("/")    # noqa: E731
        for path in [install, *writable, *read_only, config_path.parent]:
            at(path).mkdir(parents=True, exist_ok=True)
        data_dir = next(w for w in writable if w != config_path.parent)
        port = free_port()
        config = write_config(at(config_path.parent), port=port)
        text = config.read_text()
        text = text.replace('data_dir = "var"', f'data_dir = "{at(data_dir)}"')
        text = text.replace('key_file = "var/keys/store.key"', 'key_file = "keys/store.key"')
        config.write_text(text)
        config.chmod(0o600)
        writable_dirs = {at(w) for w in writable}
        for d in [root, *sorted({p for p in root.rglob("*") if p.is_dir()})]:
            d.chmod(0o700 if d in writable_dirs else 0o555)   # 0555: read-only to the engine
        proc = spawn(["-m", "mfconsole", "--config", str(config), "serve"], port=port,
                     stderr=tmp_path / "serve.stderr",
                     cwd=at(install), umask=umask, **popen)
        assert core_limit(proc.pid) == ["0", "0"]
        sock = at(data_dir) / SOCKET_NAME
        poll(sock.exists, timeout=20, message="the control socket")
        change = {"listeners[0].calling_aets": ["CT1", "MR1_QC"]}
        before = config.read_bytes()

        as_the_unit_has_it = mode(at(config_path.parent))
        at(config_path.parent).chmod(0o500)     # negative control: the folder read-only
        with pytest.raises(ControlError, match="PermissionError"):
            request(sock, "edit_config", {"changes": change})
        assert config.read_bytes() == before
        at(config_path.parent).chmod(as_the_unit_has_it)

        reply = request(sock, "edit_config", {"changes": change})
        assert reply["ok"], reply
        assert 'calling_aets = ["CT1", "MR1_QC"]' in config.read_text()
        assert mode(config) == 0o600 and config.stat().st_uid == os.geteuid()
        leftovers = [p.name for p in at(config_path.parent).iterdir() if p.name.endswith(".edit")]
        assert not leftovers
        # SO_PEERCRED still names who edited (the engine is not dumpable).
        db = db_path(at(data_dir))

        def edited() -> list[str]:
            with reading(db) as reads:
                return [r["detail"] for r in reads.rows("audit", event="config_edited")]

        details = poll(edited, timeout=10, message="the config_edited audit row")
        assert f"(uid {os.geteuid()}" in details[-1] and "via control socket" in details[-1], details
    finally:
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            d.chmod(0o755)                      # so that it can be removed
        shutil.rmtree(root, ignore_errors=True)


# -- certificate-to-AE binding over a real TLS association ----------------------------------------


def test_storescu_certificate_is_bound_by_its_san_not_its_cn(engine_factory, tmp_path):
    storescu = require_tool("storescu")
    pki = make_pki(tmp_path / "pki")
    engine = engine_factory(listener={"tls": {
        "cert_file": str(pki["server.crt"]), "key_file": str(pki["server.key"]),
        "require_client_cert": True, "ca_file": str(pki["ca.crt"]),
        "client_cert_aets": {"ct1.modality.test": ["CT1"], "other.example": ["OTHER"]}}})
    files = dicomgen.write_corpus(tmp_path / "objects", 2)

    def send(aet: str, path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [storescu, "+tls", str(pki["modality-other.key"]), str(pki["modality-other.crt"]),
             "+cf", str(pki["ca.crt"]), "-aet", aet, "-aec", "MF_SCP", "-to", "5",
             "127.0.0.1", str(engine.listeners[0].address[1]), str(path)],
            capture_output=True, text=True, timeout=30)

    # CN "ct1.modality.test", SAN "Other.Example": it may not speak as CT1…
    res = send("CT1", files[0])
    assert res.returncode != 0 and "Rejected" in res.stdout + res.stderr, res
    # …only as what its SAN is bound to.
    assert send("OTHER", files[1]).returncode == 0
    reader = engine.store.reader()
    assert reader.object_count() == 1
    rejected = poll(lambda: [(r["calling_ae"], r["detail"])
                             for r in reader.rows("audit", event="association_rejected")])
    assert [r[0] for r in rejected] == ["CT1"]
    assert "(other.example)" in rejected[0][1], rejected

"""mfconsole.hardening (no core dumps, uncaught exceptions reduced to class and site),
log files 0600 whatever the umask (engine/logs.py), and the systemd unit's settings.

Whatever changes process-wide state (rlimits, dumpability, excepthooks, the root
logger, the umask) runs in a fresh interpreter, so this pytest process is untouched.
`mfconsole serve` itself is checked in tests/integration/test_phi_edges.py.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import CANARY_NAME, REPO
from mfconsole import hardening

LINUX = sys.platform.startswith("linux")


def python(code: str, *, cwd: Path | None = None, umask: int | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, cwd=cwd, umask=-1 if umask is None else umask)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- core dumps ---------------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="RLIMIT_CORE and PR_SET_DUMPABLE are Linux settings")
def test_harden_turns_core_dumps_off_and_keeps_own_proc_and_peercred():
    res = python("""
        import os, resource, socket, struct
        from mfconsole import hardening
        print("before", resource.getrlimit(resource.RLIMIT_CORE) != (0, 0), hardening.is_dumpable())
        hardening.harden()
        hardening.harden()                      # twice is harmless
        print("after", resource.getrlimit(resource.RLIMIT_CORE), hardening.is_dumpable())
        # What a non-dumpable process still reads about itself, and SO_PEERCRED.
        print("fds", len(os.listdir("/proc/self/fd")) > 0, "status",
              "VmRSS" in open("/proc/self/status").read(), "limits",
              "Max core file size" in open(f"/proc/{os.getpid()}/limits").read())
        a, b = socket.socketpair()
        pid, uid, gid = struct.unpack("3i", a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        print("peercred", pid == os.getpid() and uid == os.getuid())
    """)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1] == "after (0, 0) False", res.stdout
    assert lines[2] == "fds True status True limits True", res.stdout
    assert lines[3] == "peercred True", res.stdout


def test_is_dumpable_of_this_process_is_left_alone():
    # The tests never harden the pytest process itself.
    assert hardening.is_dumpable() in (True, None)


# -- uncaught exceptions ------------------------------------------------------------------


def test_describe_names_class_and_innermost_frame_only():
    def inner():
        raise ValueError(CANARY_NAME)

    def outer():
        inner()

    try:
        outer()
    except ValueError as exc:
        text = hardening.describe(type(exc), exc.__traceback__)
    line = inner.__code__.co_firstlineno + 1
    assert text == f"ValueError at {__name__}.inner line {line}", text
    assert CANARY_NAME not in text
    assert hardening.describe(KeyError, None) == "KeyError"


def test_uncaught_exceptions_are_logged_as_class_and_site_never_the_message(tmp_path):
    """Main thread, another thread and an 'exception ignored' in __del__, with the
    engine's logging (file + stderr): the class and the site, not a byte of the text."""
    code = f"""
        import threading
        from pathlib import Path
        from mfconsole import hardening
        from mfconsole.engine import logs

        logs.setup(Path({str(tmp_path / 'logs')!r}), "DEBUG", stderr=True)
        hardening.harden()

        def thread_target():
            raise ValueError({CANARY_NAME!r})

        class Holder:
            def __del__(self):
                raise KeyError({CANARY_NAME!r})

        t = threading.Thread(target=thread_target, name="worker-1")
        t.start(); t.join()
        Holder()

        def main_boom():
            raise UnicodeDecodeError("utf-8", b"\\xffZZCANARY^PHI", 0, 1, "invalid start byte")
        main_boom()
    """
    res = python(code)
    assert res.returncode == 1, res
    log = (tmp_path / "logs" / "mfconsole.log").read_text()
    for where in (log, res.stderr):
        assert "uncaught exception in thread worker-1: ValueError at __main__.thread_target line" in where
        assert "exception ignored" in where and "KeyError at __main__.__del__ line" in where
        assert "uncaught exception, the process ends: UnicodeDecodeError at __main__.main_boom line" in where
        assert "ZZCANARY" not in where and "Traceback" not in where, where
    assert "ZZCANARY" not in res.stdout


def test_before_logging_is_set_up_stderr_still_gets_only_class_and_site():
    res = python(f"""
        from mfconsole import hardening
        hardening.harden()
        raise ValueError({CANARY_NAME!r})
    """)
    assert res.returncode == 1
    assert "ValueError at __main__.<module> line 4" in res.stderr, res.stderr
    assert "ZZCANARY" not in res.stderr and "Traceback" not in res.stderr


# -- log files ------------------------------------------------------------------------------


def test_log_files_are_0600_under_umask_022_through_rotations(tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    # Left by an older version: a 0644 log and a 0644 rotated one are narrowed at setup.
    for name in ("mfconsole.log", "mfconsole.log.3"):
        (logs_dir / name).write_text("old\n")
        (logs_dir / name).chmod(0o644)
    res = python(f"""
        import logging, os
        from pathlib import Path
        from mfconsole.engine import logs
        assert os.umask(0o022) == 0o022
        logs.MAX_BYTES, logs.BACKUP_COUNT = 300, 4
        handler = logs.setup(Path({str(logs_dir)!r}), "INFO", stderr=False)
        for i in range(60):
            logging.getLogger("mfconsole.test").info("line %d of the rotation test", i)
        handler.flush()
        print(handler.__class__.__name__)
    """, umask=0o022)
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in logs_dir.iterdir())
    assert files == ["mfconsole.log"] + [f"mfconsole.log.{i}" for i in range(1, 5)], files
    assert {p.name: mode(p) for p in logs_dir.iterdir()} == {name: 0o600 for name in files}
    assert "line 59 of the rotation test" in (logs_dir / "mfconsole.log").read_text()


def test_handler_creates_0600_files_in_process_whatever_the_umask(tmp_path):
    """The handler alone (not the root logger): new file, rotation, and re-open after
    the file was moved away (a logrotate-style rename) are all 0600."""
    import logging

    from mfconsole.engine.logs import PrivateRotatingFileHandler

    old = os.umask(0o000)
    try:
        handler = PrivateRotatingFileHandler(tmp_path / "x.log", maxBytes=100, backupCount=2,
                                             encoding="utf-8")
        logger = logging.getLogger("mfconsole.test.private_handler")
        logger.propagate = False
        logger.addHandler(handler)
        try:
            for i in range(20):
                logger.warning("record number %d, long enough to rotate", i)
        finally:
            logger.removeHandler(handler)
            handler.close()
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["x.log", "x.log.1", "x.log.2"], names
    assert all(mode(tmp_path / n) == 0o600 for n in names), {n: oct(mode(tmp_path / n)) for n in names}


# -- the systemd unit -----------------------------------------------------------------------


UNIT = REPO / "deploy" / "mfconsole.service"


def unit_settings() -> tuple[dict[str, list[str]], list[str]]:
    """[Service] settings (repeatable: every value kept) and the comment lines at the top."""
    settings: dict[str, list[str]] = {}
    comments: list[str] = []
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if section is None:
                comments.append(line.lstrip("# "))
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "Service":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings, comments


def config_path_of(command: str) -> Path:
    argv = shlex.split(command)
    return Path(argv[argv.index("--config") + 1])


def test_unit_makes_the_config_folder_writable_and_no_core_dumps():
    """What the unit must say for the console's configuration editor to work under it
    (config_edit writes a temporary file in the config's folder, then renames it) and
    for the hardening: this reads the file; it does not run systemd."""
    s, comments = unit_settings()
    config = config_path_of(s["ExecStart"][0])
    assert s["ExecStart"][0].split()[-1] == "serve"
    writable = [Path(p.lstrip("-")) for v in s["ReadWritePaths"] for p in v.split()]
    read_only = [Path(p.lstrip("-")) for v in s.get("ReadOnlyPaths", []) for p in v.split()]
    assert s["ProtectSystem"] == ["strict"]
    assert config.parent in writable, (config, writable)
    assert config.parent not in read_only
    # The code is not writable: neither WorkingDirectory (the install) nor anything above.
    install = Path(s["WorkingDirectory"][0])
    assert not any(install == w or install.is_relative_to(w) for w in writable), writable
    assert not any(w == Path("/") or w == Path("/etc") for w in writable)
    assert s["LimitCORE"] == ["0"]
    assert s["UMask"] == ["0077"]
    # The install comments name the same config as ExecStart, and create every writable
    # path (ProtectSystem refuses to start a unit whose ReadWritePaths do not exist).
    text = "\n".join(comments)
    consoles = [c for c in comments if "--config" in c]
    assert consoles and all(config_path_of(c[c.index("/"):]) == config for c in consoles), consoles
    for path in writable:
        assert any(c.startswith("install -d") and str(path) in c.split() for c in comments), path
    assert f"{config}" in text and "data_dir" in text

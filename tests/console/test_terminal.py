"""A real terminal: `mfconsole` in tmux (its own tmux server, so nobody's sessions are
touched), keys sent with send-keys, the screen read with capture-pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness import poll, write_config

from mfconsole.engine.engine_lock import holder_pid
from mfconsole.repository import db_path, reading


class Tmux:
    def __init__(self, folder: Path):
        self.socket = f"mfconsole-test-{uuid.uuid4().hex[:8]}"
        self.folder = folder

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=20).stdout

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        # COLUMNS/LINES (pytest-xdist workers have them) would size the app, not the pane.
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TMUX", "COLUMNS", "LINES")}
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-s", "console",
                        "-x", str(width), "-y", str(height), command], check=True, env=env,
                       cwd=self.folder, timeout=20)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "console")

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "console", *keys)

    def wait(self, *texts: str, timeout: float = 20) -> str:
        """The screen once every one of ``texts`` is on it (a screen fills in parts)."""
        def shown() -> str:
            screen = self.screen()
            return screen if all(t in screen for t in texts) else ""
        return poll(shown, timeout=timeout, interval=0.1,
                    message=f"{', '.join(map(repr, texts))} on the terminal")

    def kill(self) -> None:
        self("kill-server")


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("tmux is missing (./dev test installs it when run as root)")
        pytest.skip("tmux is not installed: the real-terminal smoke test needs it "
                    "(apt-get install tmux; ./dev test installs it when run as root)")
    t = Tmux(tmp_path)
    yield t
    t.kill()


def console_command(config: Path) -> str:
    # The exit status stays on the pane after the console is gone.
    return (f"{shlex.quote(sys.executable)} -m mfconsole --config {shlex.quote(str(config))}; "
            "echo EXIT=$?; sleep 60")


def test_the_console_in_a_real_terminal(tmux, tmp_path):
    config = write_config(tmp_path / "site")
    tmux.start(console_command(config))
    tmux.wait("1 Dashboard")
    screen = tmux.wait("modalities")
    assert "✓ listening" in screen and "pacs" in screen
    for key, title in (("2", "2 Associations"), ("3", "3 Destinations"), ("4", "4 Dead letters"),
                       ("5", "5 Logs"), ("6", "6 Configuration"), ("7", "7 Handlers"),
                       ("1", "1 Dashboard")):
        tmux.keys(key)
        tmux.wait(title)
    tmux.keys("5")
    tmux.wait("engine started")            # the redacted log, live
    tmux.keys("?")
    tmux.wait("Keys — Logs")
    tmux.keys("Escape")
    poll(lambda: "Keys —" not in tmux.screen(), timeout=10, message="the help closed")
    tmux.keys("q")
    tmux.wait("quitting stops routing")    # it hosts the engine: asks first
    tmux.keys("y")
    screen = tmux.wait("EXIT=")
    assert "EXIT=0" in screen and "engine stopped" in screen
    assert holder_pid(tmp_path / "site" / "var") is None


def test_a_hang_up_stops_the_hosted_engine_cleanly(tmux, tmp_path):
    config = write_config(tmp_path / "site")
    data_dir = tmp_path / "site" / "var"
    tmux.start(console_command(config))
    tmux.wait("✓ listening")
    pid = holder_pid(data_dir)
    assert pid and pid > 0
    tmux.kill()                            # the SSH session drops: SIGHUP to the pane
    poll(lambda: holder_pid(data_dir) is None, timeout=20, message="the engine lock released")
    poll(lambda: not Path(f"/proc/{pid}").exists(), timeout=20, message="the console process gone")
    with reading(db_path(data_dir)) as reads:
        last = reads.rows("audit", order_by="id DESC")[0]["event"]
    assert last == "engine_stopped"
    assert not (data_dir / "control.sock").exists()

"""The operator console: a Textual app over one engine client.

Screens are Textual modes switched with the number keys. The app polls the engine's
snapshot on a timer (about once a second, from a thread worker: the UI loop never
waits on the engine) and hands it to the visible screen. Operator actions run in
thread workers too; their results come back as messages.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from typing import Any, Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from mfconsole.client import Client, ClientError
from mfconsole.console.associations import AssociationsScreen
from mfconsole.console.audit import AuditScreen
from mfconsole.console.commands import ConsoleCommands
from mfconsole.console.configuration import ConfigurationScreen
from mfconsole.console.dashboard import DashboardScreen
from mfconsole.console.dead_letters import DeadLettersScreen
from mfconsole.console.destinations import DestinationsScreen
from mfconsole.console.dialogs import (MIN_HEIGHT, MIN_WIDTH, ConfirmScreen, HelpScreen,
                                       TooSmallScreen, TypeToConfirmScreen)
from mfconsole.console.handlers import HandlersScreen
from mfconsole.console.logs import LogsScreen
from mfconsole.console.objects import ObjectsScreen
from mfconsole.console.widgets import ConsoleScreen, FilterBar, StatusBar

HANG_UP_GRACE_S = 5.0
SCREENS = (("dashboard", DashboardScreen), ("associations", AssociationsScreen),
           ("destinations", DestinationsScreen), ("dead_letters", DeadLettersScreen),
           ("logs", LogsScreen), ("configuration", ConfigurationScreen), ("handlers", HandlersScreen),
           ("objects", ObjectsScreen), ("audit", AuditScreen))


class SnapshotArrived(Message):
    def __init__(self, snap: dict[str, Any]):
        super().__init__()
        self.snap = snap


class EngineLost(Message):
    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


class Done(Message):
    """An operator action finished (in a thread worker): its result or its error."""

    def __init__(self, done: Callable[[Any], None] | None, failed: Callable[[str], None] | None,
                 *, label: str = "", refresh: bool = True):
        super().__init__()
        self.done, self.failed, self.label, self.refresh = done, failed, label, refresh
        self.result: Any = None
        self.error: str | None = None


class ConsoleApp(App[None]):
    TITLE = "mfconsole"
    CSS_PATH = "console.tcss"
    MODES = {name: screen for name, screen in SCREENS}
    DEFAULT_MODE = "dashboard"
    COMMANDS = App.COMMANDS | {ConsoleCommands}
    BINDINGS = [
        *(Binding(str(n), f"goto('{name}')", screen.TITLE_TEXT, show=False, id=f"app.goto_{name}")
          for n, (name, screen) in enumerate(SCREENS, start=1)),
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("f1", "help", "Help", show=False, id="app.help_f1"),
        # A binding of our own to the palette replaces Textual's ctrl+p: name it again
        # (with priority, as Textual does: it works from inside a filter line too).
        Binding("ctrl+p", "command_palette", "Commands", show=False, priority=True, id="app.palette_ctrl_p"),
        Binding("colon", "command_palette", "Commands", show=False, id="app.palette"),
        Binding("p", "toggle_refresh", "Pause refresh", show=False, id="app.pause_refresh"),
        Binding("q", "quit_console", "Quit", id="app.quit"),
    ]

    def __init__(self, client: Client, *, refresh_s: float = 1.0, mouse: bool = True):
        super().__init__()
        self.client = client
        self.read_only = client.read_only
        self.refresh_s = refresh_s
        self.mouse = mouse
        self.snap: dict[str, Any] | None = None
        self.lost = ""                         # why the engine does not answer, if it does not
        self.lost_since: float | None = None   # since when (what is shown is from before)
        self.refresh_paused = False
        self.checks: dict[str, dict[str, Any]] = {}   # destination → last echo result
        self.hung_up = False
        self.last_reload: tuple[str, list[str]] | None = None
        self._polling = False

    # -- lifecycle ------------------------------------------------------------------

    def _fatal_error(self) -> None:
        """Textual's crash report prints the traceback with local variables, which may
        hold patient fields: say only the exception class and where, and log that."""
        import logging
        import sys

        from rich.text import Text

        from mfconsole.hardening import describe

        exc_type, _, tb = sys.exc_info()
        what = describe(exc_type, tb)
        logging.getLogger("mfconsole.console").error("the console stopped: %s", what)
        self.bell()
        self._exit_renderables.append(Text(f"mfconsole console stopped on an internal error: {what} "
                                           "(details are not shown: they may hold patient data)"))
        self._close_messages_no_wait()

    def on_mount(self) -> None:
        if self.refresh_s > 0:
            self.set_interval(self.refresh_s, self.poll_snapshot, name="snapshot")
        self.poll_snapshot()
        try:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(sig, self.hang_up)
        except (NotImplementedError, RuntimeError, ValueError):
            pass    # not the main thread (tests): nothing to catch

    def hang_up(self) -> None:
        """SSH dropped (SIGHUP) or SIGTERM: leave now, without asking. The engine is
        stopped first, on its own thread: Textual's shutdown writes to a terminal that
        may be gone, and must not be what decides whether routing stops cleanly."""
        if self.hung_up:
            return
        self.hung_up = True
        threading.Thread(target=self._stop_after_hang_up, name="hang-up", daemon=True).start()
        self.exit()

    def _stop_after_hang_up(self) -> None:
        self.client.close()
        time.sleep(HANG_UP_GRACE_S)
        # Still here: the UI could not finish against the dead terminal. Everything
        # that mattered is closed and committed; never leave a process behind.
        os._exit(0)

    def on_resize(self, event: Any) -> None:
        small = event.size.width < MIN_WIDTH or event.size.height < MIN_HEIGHT
        showing = isinstance(self.screen, TooSmallScreen)
        if small and not showing:
            self.push_screen(TooSmallScreen())
        elif showing and not small:
            self.pop_screen()

    # -- the snapshot ----------------------------------------------------------------------

    def poll_snapshot(self) -> None:
        if self.refresh_paused or self._polling:
            return
        self._polling = True
        self._fetch_snapshot()

    @work(thread=True, group="snapshot", exit_on_error=False)
    def _fetch_snapshot(self) -> None:
        try:
            self.post_message(SnapshotArrived(self.client.snapshot()))
        except ClientError as exc:
            self.post_message(EngineLost(str(exc)))
        except Exception as exc:
            self.post_message(EngineLost(exc.__class__.__name__))

    def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        self._polling = False
        first = self.snap is None
        self.snap, self.lost, self.lost_since = message.snap, "", None
        self._show()
        if first:
            # Textual's many long-lived objects would otherwise be rescanned by every
            # full garbage collection in a process that also ingests (measured: ~0.1 ms
            # per object stored). Freeze what exists once the console is up.
            gc.freeze()

    def on_engine_lost(self, message: EngineLost) -> None:
        self._polling = False
        self.lost = message.reason
        if self.lost_since is None:
            self.lost_since = time.time()
        self._show()

    def _show(self) -> None:
        """Give the snapshot to the screen the operator sees (under any dialog)."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ConsoleScreen):
                # Values from a lost engine stay on screen, greyed: they say what was, not what is.
                screen.set_class(bool(self.lost), "-stale")
                if screen.is_mounted:
                    screen.query_one(StatusBar).update_from(self)
                    if self.snap is not None:
                        screen.show_snapshot(self.snap)
                break

    def refresh_now(self) -> None:
        """After an action: show its effect without waiting for the timer."""
        self._polling = False
        self.poll_snapshot()

    # -- actions shared by screens and the command palette -------------------------------

    def perform(self, label: str, fn: Callable[..., Any], *args: Any,
                done: Callable[[Any], None] | None = None,
                failed: Callable[[str], None] | None = None, refresh: bool = True) -> None:
        """Run ``fn(*args)`` (a client call) in a thread worker, then on the UI thread
        ``done(result)``, or ``failed(reason)`` (without one, a toast says why).
        Nothing is ever raised into the UI."""
        self._action_worker(Done(done, failed, label=label, refresh=refresh), fn, args)

    @work(thread=True, exit_on_error=False)
    def _action_worker(self, message: "Done", fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            message.result = fn(*args)
        except ClientError as exc:
            message.error = str(exc)
        except Exception as exc:
            message.error = exc.__class__.__name__
        self.post_message(message)

    def on_done(self, message: "Done") -> None:
        if message.refresh:
            self.refresh_now()
        if message.error is None:
            if message.done is not None:
                message.done(message.result)
        elif message.failed is not None:
            message.failed(message.error)
        else:
            self.notify(f"{message.label}: {message.error}", severity="error", timeout=8)

    def confirm(self, question: str, then: Callable[[], None], *, count: int = 1, verb: str = "",
                yes: str = "Yes") -> None:
        """Confirmation scales with the count: y/n for one, type-to-confirm for more."""
        def answered(ok: bool | None) -> None:
            if ok:
                then()
        if count > 1:
            self.push_screen(TypeToConfirmScreen(question, f"{verb.upper()} {count}"), answered)
        else:
            self.push_screen(ConfirmScreen(question, yes), answered)

    def echo(self, destination: str) -> None:
        """C-ECHO (an empty STOW request for STOW-RS); the result stays on the
        destination's row."""
        self.checks[destination] = {"running": True}
        self._show()

        def done(result: dict[str, Any]) -> None:
            self.checks[destination] = {**result, "at": time.time()}
            self.notify(f"echo {destination}: " + (f"✓ OK {result['rtt_ms']:.0f} ms" if result["ok"]
                                                   else f"✗ {result['detail']}"),
                        severity="information" if result["ok"] else "error")
            self._show()
        self.perform(f"echo {destination}", self.client.echo, destination, done=done,
                     failed=lambda why: done({"ok": False, "rtt_ms": 0, "detail": why}), refresh=False)

    def set_paused(self, destination: str, paused: bool) -> None:
        if self.read_only:
            return
        fn = self.client.pause if paused else self.client.resume
        word = "paused" if paused else "resumed"
        self.perform(f"{'pause' if paused else 'resume'} {destination}", fn, destination,
                     done=lambda _: self.notify(f"{destination}: {word}"))

    def reload(self) -> None:
        if self.read_only:
            return
        self.perform("reload", self.client.reload, done=self.show_reload)

    def show_reload(self, result: dict[str, Any]) -> None:
        lines = result.get("report") or ["no change"]
        word = "refused" if result.get("refused") else "done with errors" if result.get("errors") else "done"
        self.last_reload = (word, lines)
        self.notify(f"reload {word}: " + "; ".join(lines), severity="error" if result.get("errors")
                    else "information", timeout=10)
        screen = self.screen
        if hasattr(screen, "reloaded"):
            screen.reloaded(result)

    # -- keys --------------------------------------------------------------------------------

    def action_goto(self, mode: str) -> None:
        if isinstance(self.screen, TooSmallScreen):
            return
        while len(self.screen_stack) > 1 and not isinstance(self.screen, ConsoleScreen):
            self.pop_screen()       # leave a dialog or detail before switching
        self.switch_mode(mode)

    def action_help(self) -> None:
        """The keys of this screen and the app's; widget navigation keys in one line."""
        screen = self.screen
        keys: list[tuple[str, str]] = []
        seen = set()
        for key, active in screen.active_bindings.items():
            b = active.binding
            if (not active.enabled or b.system or b.action in seen
                    or not isinstance(active.node, (App, Screen, FilterBar))):
                continue
            seen.add(b.action)
            keys.append((self.get_key_display(b), b.description or b.action))
        keys.append(("↑ ↓ pgup pgdn home end", "move in a table or the log"))
        keys.append(("tab", "next pane"))
        keys.append(("ctrl+p or :", "command palette: echo, replay, pause, reload, go to…"))
        title = getattr(screen, "TITLE_TEXT", "") or "console"
        self.push_screen(HelpScreen(title, keys))

    def action_toggle_refresh(self) -> None:
        self.refresh_paused = not self.refresh_paused
        self._show()
        if not self.refresh_paused:
            self.poll_snapshot()

    def action_quit_console(self) -> None:
        if not self.client.hosts_engine:
            self.exit()
            return
        self.push_screen(ConfirmScreen(
            "Quit? This console hosts the engine: quitting stops routing (listeners close, "
            "deliveries wait until an engine runs again).", yes="Quit and stop the engine"),
            lambda ok: self.exit() if ok else None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("goto", "help") and isinstance(self.screen, TooSmallScreen):
            return False
        return True


def run(client: Client, *, mouse: bool = True) -> bool:
    """Run the console until the operator quits; True when it ended by a hang-up."""
    app = ConsoleApp(client, mouse=mouse)
    app.run(mouse=mouse)
    return app.hung_up

"""The command palette (ctrl+p, also ``:``): every action by name — ``echo pacs``,
``replay 42``, ``reload handlers``, ``pause pacs``, ``go to dead letters``."""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Iterator

from textual.command import DiscoveryHit, Hit, Hits, Provider

_BY_ID = re.compile(r"^\s*(replay|discard)\s+(\d+)\s*$", re.IGNORECASE)


class ConsoleCommands(Provider):
    def commands(self) -> Iterator[tuple[str, Callable[[], Any], str]]:
        app: Any = self.app     # the console app: its screens and actions, not imported (it imports us)
        writable = not app.read_only
        for n, (mode, screen) in enumerate(app.MODES.items(), start=1):
            yield (f"go to {screen.TITLE_TEXT.lower()}", partial(app.action_goto, mode), f"key {n}")
        snap = app.snap or {}
        for d in snap.get("destinations", []):
            name = d["name"]
            yield f"echo {name}", partial(app.echo, name), "C-ECHO (STOW-RS: an empty request)"
            if writable:
                yield f"pause {name}", partial(app.set_paused, name, True), "stop delivering; items stay queued"
                yield f"resume {name}", partial(app.set_paused, name, False), "deliver again now"
        screen = self.screen        # the screen the palette was opened on (not the palette)
        if writable and getattr(screen, "NUMBER", None) == 4:       # the dead letters screen
            yield "replay this group", screen.action_replay_group, "key g: the group of the row or the one open"
            yield "replay all matching the filter", screen.action_replay_filter, "asks first, with the count"
            yield "discard all matching the filter", screen.action_discard_filter, "asks first, with the count"
        if writable:
            yield "reload", app.reload, "re-read config.toml and the handlers"
            yield "reload handlers", app.reload, "re-read config.toml and the handlers"
            for name in snap.get("handlers", []):
                yield (f"reload handler {name}",
                       partial(app.perform, f"reload {name}", app.client.reload_handler, name,
                               done=app.show_reload), "only this handler")
        yield ("pause refresh" if not app.refresh_paused else "resume refresh",
               app.action_toggle_refresh, "key p")
        yield "quit", app.action_quit_console, "key q"

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, callback, help_text in self.commands():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), callback, text=text, help=help_text)
        m = _BY_ID.match(query)
        if m and not self.app.read_only:     # type: ignore[attr-defined]
            verb, delivery = m.group(1).lower(), int(m.group(2))
            yield Hit(1.0, f"{verb} dead letter {delivery}", partial(self._by_id, verb, delivery),
                      text=f"{verb} {delivery}", help="asks first")

    async def discover(self) -> Hits:
        for text, callback, help_text in self.commands():
            yield DiscoveryHit(text, callback, text=text, help=help_text)

    def _by_id(self, verb: str, delivery: int) -> None:
        app: Any = self.app
        fn = app.client.replay if verb == "replay" else app.client.discard

        def done(result: dict[str, Any]) -> None:
            n = result.get("queued", result.get("discarded", 0))
            app.notify(f"{verb} {delivery}: " + ("done" if n else "no such dead letter"),
                       severity="information" if n else "error")
        app.confirm(f"{verb.capitalize()} dead letter {delivery}?",
                    lambda: app.perform(f"{verb} {delivery}", fn, [delivery], done=done),
                    yes=verb.capitalize())

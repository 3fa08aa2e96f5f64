"""Routing decided at ingest: listener → destinations (with their handler)."""

from __future__ import annotations

from mfconsole.config import Config
from mfconsole.engine.store import Route


def routes_by_listener(config: Config) -> dict[str, tuple[Route, ...]]:
    """Every destination a listener's objects go to. A destination named by two routes
    of the same listener gets one delivery per distinct handler, never two identical."""
    table: dict[str, list[Route]] = {item.name: [] for item in config.listeners}
    for route in config.routes:
        for dest in route.to:
            r = Route(destination=dest, handler=route.handler)
            if r not in table[route.from_listener]:
                table[route.from_listener].append(r)
    return {name: tuple(rs) for name, rs in table.items()}

"""Routing-safe status: what `mfconsole status` prints and the console shows.

Reads the database read-only, so it works whether or not an engine is running; when
called with a live engine it adds listener and association state.
"""

from __future__ import annotations

import time
from typing import Any

from mfconsole.config import Config
from mfconsole.engine.engine_lock import holder_pid
from mfconsole.engine.store import connect

RECENT_ERRORS = 10


def collect(config: Config, engine: Any = None) -> dict[str, Any]:
    data_dir = config.engine.data_dir
    pid = holder_pid(data_dir)
    out: dict[str, Any] = {
        "generated_at": time.time(),
        "data_dir": str(data_dir),
        "engine": {"running": pid is not None, "pid": pid if pid and pid > 0 else None},
        "listeners": [],
        "destinations": [],
        "dead_letters": 0,
        "objects": 0,
        "recent_errors": [],
    }
    live = {item.cfg.name: item for item in engine.listeners} if engine is not None else {}
    for lc in config.listeners:
        entry: dict[str, Any] = {"name": lc.name, "ae_title": lc.ae_title, "host": lc.host,
                                 "port": lc.port, "tls": False}
        if lc.name in live:
            entry["state"] = "listening"
            entry["port"] = live[lc.name].address[1]
        else:
            entry["state"] = "listening" if pid else "stopped"
        out["listeners"].append(entry)
    counts: dict[str, dict[str, int]] = {d.name: {} for d in config.destinations}
    db_path = data_dir / "mfconsole.db"
    if db_path.exists():
        conn = connect(db_path, readonly=True)
        try:
            for row in conn.execute("SELECT destination, state, COUNT(*) AS n FROM deliveries "
                                    "GROUP BY destination, state"):
                counts.setdefault(row["destination"], {})[row["state"]] = row["n"]
            out["dead_letters"] = conn.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'").fetchone()[0]
            out["objects"] = conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
            out["recent_errors"] = [dict(r) for r in conn.execute(
                "SELECT ts, event, listener, destination, calling_ae, peer, status, detail "
                "FROM audit WHERE event IN ('refused', 'association_rejected', 'dead_lettered', "
                "'store_failed') ORDER BY id DESC LIMIT ?", (RECENT_ERRORS,))]
        finally:
            conn.close()
    for d in config.destinations:
        out["destinations"].append({"name": d.name, "kind": d.kind, "counts": counts.get(d.name, {})})
    if engine is not None:
        out["associations"] = engine.board.snapshot()
        out["engine"]["uptime_s"] = time.time() - (engine.started_at or time.time())
    return out

"""What the console asks of an engine: one interface, two implementations.

- ``InProcessClient``: the console hosts the engine (none serves this data directory);
  quitting it stops routing.
- ``AttachedClient``: an engine already serves the data directory (`mfconsole serve`,
  e.g. under systemd); requests go over its control socket and closing the console
  leaves routing running.

A read-only console attaches through ``control-ro.sock``, whose connections the
engine serves as read-only whatever they send; a hosted one is read-only for the
console's lifetime. Both end in ``mfconsole.control.ControlService`` and both hand back plain JSON values
(the in-process one round-trips them through JSON too), so screens cannot tell them
apart. Every method blocks: the console calls them from thread workers.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from mfconsole.config import Config
from mfconsole.repository.reads import OBJECT_SORTS  # noqa: F401 (the browser's sort columns, for the console)
from mfconsole.control import RO_SOCKET_NAME, SOCKET_NAME, ControlError, request, serve_control


# Seconds an operation may take before the console gives up on its answer: a routing
# plan replays up to 100 000 objects.
SLOW_OPS = {"plan": 1800.0}


class ClientError(Exception):
    """An operation the engine refused or could not do; the message is for the operator."""


class Client:
    hosts_engine = False           # quitting the console stops routing
    read_only = False
    description = ""               # for the status bar: "in-process", "attached to pid 42"

    def call(self, op: str, **args: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the engine (an in-process one is stopped)."""

    # -- observation
    def snapshot(self) -> dict[str, Any]:
        return self.call("snapshot")

    def destination(self, name: str) -> dict[str, Any]:
        return self.call("destination", name=name)

    def log_tail(self, cursor: dict[str, int] | None = None) -> dict[str, Any]:
        return self.call("log_tail", cursor=cursor)

    # -- dead letters
    def dead_letter_groups(self, text: str | None = None) -> list[dict[str, Any]]:
        return self.call("dead_letter_groups", text=text)

    def dead_letters(self, text: str | None = None, group: dict[str, Any] | None = None,
                     before_id: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self.call("dead_letters", text=text, group=group, before_id=before_id, limit=limit)

    def dead_letter_count(self, text: str | None = None, group: dict[str, Any] | None = None) -> int:
        return self.call("dead_letter_count", text=text, group=group)

    def dead_letter(self, id: int) -> dict[str, Any]:
        return self.call("dead_letter", id=id)

    def reveal(self, id: int) -> dict[str, Any]:
        return self.call("reveal", id=id)

    def replay(self, ids: list[int] | None = None, group: dict[str, Any] | None = None,
               text: str | None = None, to: str | None = None) -> dict[str, Any]:
        return self.call("replay", ids=ids, group=group, text=text, to=to)

    def discard(self, ids: list[int] | None = None, group: dict[str, Any] | None = None,
                text: str | None = None) -> dict[str, Any]:
        return self.call("discard", ids=ids, group=group, text=text)

    # -- objects and the audit trail
    def objects(self, filters: dict[str, Any] | None = None, sort: str = "id", descending: bool = True,
                offset: int = 0, limit: int = 200) -> dict[str, Any]:
        return self.call("objects", filters=filters, sort=sort, descending=descending, offset=offset,
                         limit=limit)

    def object(self, id: int) -> dict[str, Any]:
        return self.call("object", id=id)

    def find_objects(self, accession: str | None = None, patient_id: str | None = None,
                     filters: dict[str, Any] | None = None, sort: str = "id", descending: bool = True,
                     offset: int = 0, limit: int = 200) -> dict[str, Any]:
        return self.call("find_objects", accession=accession, patient_id=patient_id, filters=filters,
                         sort=sort, descending=descending, offset=offset, limit=limit)

    def audit(self, filters: dict[str, Any] | None = None, before_id: int | None = None,
              limit: int = 200) -> list[dict[str, Any]]:
        return self.call("audit", filters=filters, before_id=before_id, limit=limit)

    def audit_events(self) -> list[str]:
        return self.call("audit_events")

    # -- destinations
    def echo(self, destination: str) -> dict[str, Any]:
        return self.call("echo", destination=destination)

    def test(self, destination: str) -> dict[str, Any]:
        return self.call("test", destination=destination)

    def pause(self, destination: str) -> None:
        self.call("pause", destination=destination)

    def resume(self, destination: str) -> None:
        self.call("resume", destination=destination)

    # -- configuration and handlers
    def reload(self) -> dict[str, Any]:
        return self.call("reload")

    def handlers(self) -> list[dict[str, Any]]:
        return self.call("handlers")

    def reload_handler(self, name: str) -> dict[str, Any]:
        return self.call("reload_handler", name=name)

    def preview_handler(self, name: str, delivery_id: int | None = None, object_id: int | None = None,
                        reveal: bool = False) -> dict[str, Any]:
        return self.call("preview_handler", name=name, delivery_id=delivery_id, object_id=object_id,
                         reveal=reveal)

    def plan(self, hours: float | None = None) -> dict[str, Any]:
        """What a reload of config.toml would change (engine/plan.py); sends nothing."""
        return self.call("plan", hours=hours)

    def config_fields(self) -> list[dict[str, Any]]:
        return self.call("config_fields")

    def edit_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.call("edit_config", changes=changes)


class InProcessClient(Client):
    """The console hosts the engine in its own process (worker threads)."""

    hosts_engine = True

    def __init__(self, engine: Any, *, read_only: bool = False):
        from mfconsole.actor import local

        self.engine = engine
        self.read_only = read_only        # fixed for the console's lifetime
        self.actor = local(via="in-process console")
        self.description = "in-process engine"
        self._closing = threading.Lock()
        self._closed = False

    def call(self, op: str, **args: Any) -> Any:
        control = self.engine.control
        if control is None:
            raise ClientError("the engine is not running")
        try:
            result = control.service.call(op, args, actor=self.actor, read_only=self.read_only)
        except ControlError as exc:
            raise ClientError(str(exc)) from None
        # The same values an attached console would get.
        return json.loads(json.dumps(result, default=str))

    def close(self) -> None:
        """Stop the engine, once (a hang-up and the normal exit path may both ask)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self.engine.stop()


class AttachedClient(Client):
    """Talks to the engine serving the data directory over its control socket: the
    operator's, or the read-only one (then the engine refuses every change and every
    reveal, whatever this client sends)."""

    def __init__(self, socket_path: Path, pid: int | None = None, *, read_only: bool = False):
        if read_only and socket_path.name != RO_SOCKET_NAME:
            socket_path = socket_path.with_name(RO_SOCKET_NAME)
        self.socket_path = socket_path
        self.read_only = read_only
        self.description = f"attached to pid {pid}" if pid else "attached"

    def call(self, op: str, **args: Any) -> Any:
        try:
            result = request(self.socket_path, op, args, timeout=SLOW_OPS.get(op, 120.0))
            if op == "snapshot":
                # The engine behind the socket may have been restarted: name the one answering.
                pid = (result.get("engine") or {}).get("pid")
                if pid:
                    self.description = f"attached to pid {pid}"
            return result
        except ControlError as exc:
            raise ClientError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise ClientError(f"the engine's control socket did not answer ({exc.__class__.__name__})"
                              ) from None


def open_client(config: Config, *, read_only: bool = False) -> Client:
    """Attach to the engine serving ``config``'s data directory, or host one here.
    Raises EngineError when neither is possible (the message says why)."""
    from mfconsole.engine.engine import Engine

    served = engine_socket(config, read_only=read_only)
    if served is not None:
        pid, sock = served
        return AttachedClient(sock, pid, read_only=read_only)
    from mfconsole.metrics_export import serve_metrics

    engine = Engine(config, log_to_stderr=False,   # stderr is the console's screen
                    control=serve_control, metrics=serve_metrics)
    engine.start()
    return InProcessClient(engine, read_only=read_only)


def engine_socket(config: Config, *, read_only: bool = False) -> tuple[int | None, Path] | None:
    """(pid, control socket) of the engine serving ``config``'s data directory, or None
    when none does. Raises EngineError when one does but offers no socket."""
    from mfconsole.engine.engine_lock import EngineError, holder_pid

    data_dir = config.engine.data_dir
    pid = holder_pid(data_dir)
    if pid is None:
        return None
    sock = data_dir / (RO_SOCKET_NAME if read_only else SOCKET_NAME)
    deadline = time.monotonic() + 10      # an engine starting up opens it last
    while not sock.exists() and time.monotonic() < deadline and holder_pid(data_dir):
        time.sleep(0.1)
    if not sock.exists():
        raise EngineError(f"an engine (pid {pid}) serves {data_dir} but offers no control "
                          f"socket ({sock}); see its log")
    return (pid if pid > 0 else None), sock

"""Run mfconsole for tests: a temp config, the engine in-process or as `mfconsole serve`.

Everything binds to 127.0.0.1 on free ports; processes are stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Callable

from mfconsole.repository import Reads, db_path, reading

from peers import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
CANARY_NAME = "ZZCANARY^PHI"
CANARY_ID = "CANARY-0001"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):   # an inline table; keys quoted (they may hold dots)
        return "{ " + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(folder: Path, *, port: int | None = None, ae_title: str = "MF_SCP",
                 calling_aets: list[str] | None = None, listener: dict[str, Any] | None = None,
                 store: dict[str, Any] | None = None, destinations: list[dict[str, Any]] | None = None,
                 routes: list[dict[str, Any]] | None = None, egress: dict[str, Any] | None = None,
                 engine: dict[str, Any] | None = None,
                 more_listeners: list[dict[str, Any]] | None = None,
                 rules: list[dict[str, Any]] | None = None,
                 routing: dict[str, Any] | None = None,
                 tables: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config file in ``folder`` with one listener (and ``more_listeners``: each a
    ``name`` and the keys it changes, on a free port unless given); data_dir is
    ``folder/var``. ``rules``: [[rules]] tables (``when`` as an inline table),
    ``routing``: the [routing] table; ``tables``: more top-level tables by name
    ([health], [metrics] ...; a nested dict value is written as an inline table)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    lst = {"name": "modalities", "ae_title": ae_title, "host": "127.0.0.1", "port": port,
           "calling_aets": calling_aets or ["*"], "max_associations": 16,
           "acse_timeout_s": 5, "network_timeout_s": 10}
    lst.update(listener or {})
    others = [{**lst, "port": free_port(), **extra} for extra in more_listeners or []]
    dests = destinations if destinations is not None else [
        {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 1, "ae_title": "PACS"}]
    egress = egress or {"allowed_tcp": [f"{d['host']}:{d['port']}" for d in dests if "host" in d],
                        "allowed_http": [d["url"] for d in dests if "url" in d]}
    routes = routes if routes is not None else (
        [{"from": "modalities", "to": [d["name"] for d in dests]}] if dests else [])
    lines = ["[engine]", 'data_dir = "var"', 'log_level = "INFO"', "shutdown_timeout_s = 10"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (engine or {}).items()]
    lines += ["", "[store]", 'key_file = "var/keys/store.key"']
    lines += [f"{k} = {toml_value(v)}" for k, v in (store or {}).items()]
    lines += ["", "[egress]"] + [f"{k} = {toml_value(v)}" for k, v in egress.items()]
    for one in [lst, *others]:
        lines += ["", "[[listeners]]"] + [f"{k} = {toml_value(v)}" for k, v in one.items()]
    for d in dests:
        lines += ["", "[[destinations]]"] + [f"{k} = {toml_value(v)}" for k, v in d.items()]
    for r in routes:
        lines += ["", "[[routes]]"] + [f"{k} = {toml_value(v)}" for k, v in r.items()]
    for r in rules or []:
        lines += ["", "[[rules]]"] + [f"{k} = {toml_value(v)}" for k, v in r.items()]
    if routing is not None:
        lines += ["", "[routing]"] + [f"{k} = {toml_value(v)}" for k, v in routing.items()]
    for name, table in (tables or {}).items():
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ServeProcess:
    """`mfconsole serve` in a subprocess."""
    config: Path
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.config.parent / "serve.stderr"

    @property
    def data_dir(self) -> Path:
        return self.config.parent / "var"

    def start(self, wait: bool = True) -> "ServeProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mfconsole", "--config", str(self.config), "serve"],
            stdout=self._log, stderr=self._log, env=env, cwd=self.config.parent)
        if wait:
            wait_for_port("127.0.0.1", self.port, timeout=20)
            self.wait_for_control(timeout=20)
        return self

    def wait_for_control(self, timeout: float) -> None:
        """Until this process's engine answers on its control socket: the last thing an
        engine opens (after its listeners), and a stopped engine's may still be there."""
        from mfconsole.control import SOCKET_NAME, request

        pid = self.proc.pid if self.proc is not None else None

        def answering() -> bool:
            try:
                return request(self.data_dir / SOCKET_NAME, "snapshot", timeout=5)["engine"]["pid"] == pid
            except Exception:   # not there yet, refused, or the previous engine's
                return False

        poll(answering, timeout=timeout, message="the engine's control socket answering")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self._log.close()
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def db(self) -> AbstractContextManager[Reads]:
        """The database for the length of a block: a read-only ``Reads`` (works beside
        the running process)."""
        return reading(db_path(self.data_dir))


def poll(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
         message: str = "condition") -> Any:
    """Poll with a deadline; return the first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def run(cmd: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def mfconsole(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mfconsole", *args], timeout=timeout)


def holds(predicate: Callable[[], Any], seconds: float = 1.0) -> bool:
    """True if ``predicate`` stays true for ``seconds``: a negative check ("nothing more
    happens") after what it guards has been reached by a poll."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.05)
    return bool(predicate())


def store_files(port: int, paths: list[Path], called_ae: str = "MF_SCP") -> list[str]:
    """C-STORE files to a listener over one association, each in its own transfer
    syntax (compressed ones too); every one must be answered Success. Returns the SOP
    Instance UIDs."""
    import socket as socket_

    from pydicom import dcmread
    from pynetdicom import AE, evt

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket_.IPPROTO_TCP, socket_.TCP_NODELAY, 1)

    heads = [dcmread(p, stop_before_pixels=True) for p in paths]
    ae = AE(ae_title="MODALITY")
    for sop, ts in dict.fromkeys((str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads):
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()
    assert statuses == [0] * len(paths)
    return [str(h.SOPInstanceUID) for h in heads]


def stored_sha256(data_dir: Path, key_file: Path | None = None) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the stored object (its latest version), decrypted
    with the store key: "what the engine stored", to compare with what a peer received.
    (The database's own digest is keyed and cannot be compared with a plain hash.)"""
    import hashlib

    from mfconsole.engine.vault import Vault, load_key
    from mfconsole.repository.states import INLINE

    vault = Vault([load_key(key_file or data_dir / "keys" / "store.key")])
    with reading(db_path(data_dir)) as reads:
        out = {}
        for row in reads.rows("objects", order_by="version", purged_at=None):
            if row["blob"] == INLINE:
                sealed = reads.rows("blob_data", object_id=row["id"])[0]["sealed"]
                plain = vault.open_sealed(sealed)
            else:
                plain = vault.open_bytes(data_dir / "blobs" / row["blob"])
            out[row["sop_instance_uid"]] = hashlib.sha256(plain).hexdigest()
        return out


def delivery_states(reads: Reads) -> dict[str, int]:
    """State -> deliveries, every destination together."""
    counts: dict[str, int] = {}
    for by_state in reads.delivery_counts().values():
        for state, n in by_state.items():
            counts[state] = counts.get(state, 0) + n
    return counts


def plant(conn: Any, sql: str, params: tuple | list = ()) -> Any:
    """FOR FAULT PLANTING ONLY: run one raw SQL statement that no product write
    expresses (a corrupted row, a forced ``purged_at``, a store made read-only, bulk
    rows seeded straight into the tables; for bench/, a WAL checkpoint between phases).
    ``conn`` is a ``Tx`` (the engine's
    writer, through ``store.call``), a ``Reads`` or an sqlite3 connection. This is the
    one place outside mfconsole/repository that holds SQL text: tests and benches read
    through ``Reads`` (``rows(...)`` and the typed methods) and write through ``Tx``.
    A list of parameter tuples runs the statement once per tuple."""
    conn = getattr(conn, "conn", conn)
    if params and isinstance(params, list) and isinstance(params[0], (tuple, list)):
        return conn.executemany(sql, params)
    return conn.execute(sql, params)

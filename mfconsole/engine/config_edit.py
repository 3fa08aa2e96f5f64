"""Console edits of config.toml: the keys an operator changes when a link is down
(AE titles, the calling-AE allowlist, where destinations are, the egress allowlists),
written with the file's comments and layout kept (tomlkit).

An edit is validated exactly as `mfconsole check` validates: ``config.load`` on a
temporary copy next to the file (so relative paths resolve the same), which then
replaces the file atomically with its mode. When anything is wrong nothing is written,
and every problem comes back with its key path.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import tomlkit

from mfconsole.config import Config, ConfigError, load
from mfconsole.engine.vault import fsync_dir
from mfconsole.kinds import kind_of

_STEP = re.compile(r"([A-Za-z_]+)(?:\[(\d+)\])?")


def fields(config: Config) -> list[dict[str, Any]]:
    """The editable keys with their effective values (defaults included)."""
    out = [_field("egress.allowed_tcp", "egress", "allowed host:port (DIMSE, MLLP)", "list",
                  list(config.egress.allowed_tcp)),
           _field("egress.allowed_http", "egress", "allowed URL prefixes (STOW-RS)", "list",
                  list(config.egress.allowed_http))]
    for i, lc in enumerate(config.listeners):
        section = f"listener {lc.name}"
        out.append(_field(f"listeners[{i}].ae_title", section, "AE title", "str", lc.ae_title))
        out.append(_field(f"listeners[{i}].calling_aets", section, "calling AE allowlist", "list",
                          list(lc.calling_aets)))
    for i, d in enumerate(config.destinations):
        for key, label, kind in kind_of(d).editable():     # the keys its kind labels
            out.append(_field(f"destinations[{i}].{key}", f"destination {d.name}", label, kind,
                              getattr(d, key)))
    return out


def _field(key: str, section: str, label: str, kind: str, value: Any) -> dict[str, Any]:
    return {"key": key, "section": section, "label": label, "type": kind, "value": value}


def coerce(kind: str, value: Any) -> Any:
    """The console sends what the operator typed; lists may come as "A, B"."""
    if kind == "int":
        try:
            return int(str(value).strip())
        except ValueError:
            return str(value).strip()     # written as typed: the check names the key and why
    if kind == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError("must be a list")
        return [str(v).strip() for v in items if str(v).strip()]
    return str(value).strip()


def apply(config: Config, changes: dict[str, Any]) -> list[list[str]]:
    """Write ``changes`` ({key path: value}) to config.toml; return the problems (then
    nothing was written)."""
    editable = {f["key"]: f for f in fields(config)}
    path = config.path
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    problems: list[list[str]] = []
    for key, value in changes.items():
        spec = editable.get(key)
        if spec is None:
            problems.append([key, "cannot be edited from the console (edit config.toml)"])
            continue
        try:
            _set(doc, key, coerce(spec["type"], value))
        except ValueError as exc:
            problems.append([key, str(exc)])
    if problems:
        return problems
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.edit"
    mode = stat.S_IMODE(path.stat().st_mode)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tomlkit.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)      # the umask may have narrowed it
        try:
            load(tmp)
        except ConfigError as exc:
            return [[k, why] for k, why in exc.problems]
        _keep_owner(path, tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return []
    finally:
        tmp.unlink(missing_ok=True)


def _set(doc: Any, key: str, value: Any) -> None:
    node = doc
    steps = key.split(".")
    for step in steps[:-1]:
        m = _STEP.fullmatch(step)
        if m is None:
            raise ValueError("not a key path")
        name, index = m.group(1), m.group(2)
        if name not in node:
            node[name] = tomlkit.table()
        node = node[name]
        if index is not None:
            node = node[int(index)]
    node[steps[-1]] = value


def _keep_owner(original: Path, replacement: Path) -> None:
    """root editing a service account's file must not leave it owned by root."""
    if os.geteuid() == 0:
        st = original.stat()
        os.chown(replacement, st.st_uid, st.st_gid)

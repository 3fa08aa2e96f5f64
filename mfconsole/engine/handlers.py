"""Handlers at run time: load, check, version, reload, and run them for a delivery.

A handler is a module in ``handlers/`` with a ``VERSION`` string and ``handle(obj, ctx)``
(the contract: mfconsole/handlers/api.py). Each version is imported in isolation under
a name that includes the digest of its source, so a reload never disturbs the module a
delivery in progress is running: that delivery holds its ``LoadedHandler`` to the end.

Errors are routing-safe: the exception class and the line of the handler where it was
raised, never the exception's message (it may quote data set values).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("mfconsole.handlers")


class HandlerError(Exception):
    """A handler that cannot be loaded or that failed (routing-safe message)."""


@dataclass(frozen=True)
class LoadedHandler:
    name: str
    version: str
    digest: str          # SHA-256 of the source, hex
    path: Path
    handle: Callable[[Any, Any], Any]    # handle(obj, ctx), or handle_study(study, ctx)
    level: str = "instance"              # "study": handle_study over a study's objects

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.digest[:12]})"

    def run(self, obj: Any, ctx: Any) -> Any:
        try:
            return self.handle(obj, ctx)
        except Exception as exc:
            raise HandlerError(f"handler {self.name} {self.version} raised "
                               f"{exc.__class__.__name__}{where(exc, self.path)}") from None


def where(exc: BaseException, path: Path) -> str:
    """' at sr_to_oru.py line 42': the deepest frame in the handler file, if any."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    return f" at {path.name} line {line}" if line else ""


def load(name: str, handlers_dir: Path) -> LoadedHandler:
    """Import ``handlers_dir/name.py`` as a fresh module and check the contract."""
    path = (handlers_dir / f"{name}.py").resolve()
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise HandlerError(f"handler {name}: cannot read {path}: {exc.strerror}") from None
    digest = hashlib.sha256(source).hexdigest()
    module_name = f"mfconsole_handler_{name}_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerError(f"handler {name}: {path} is not importable")
    module = importlib.util.module_from_spec(spec)
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise HandlerError(f"handler {name}: syntax error at {path.name} line {exc.lineno}") from None
    try:
        sys.modules[module_name] = module     # dataclasses and friends look themselves up here
        exec(code, module.__dict__)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise HandlerError(f"handler {name}: import failed with {exc.__class__.__name__}"
                           f"{where(exc, path)}") from None
    version = getattr(module, "VERSION", None)
    level = getattr(module, "LEVEL", "instance")
    if not isinstance(version, str) or not version.strip():
        raise HandlerError(f"handler {name}: VERSION must be a non-empty string")
    if level not in LEVELS:
        raise HandlerError(f"handler {name}: LEVEL must be \"instance\" or \"study\"")
    function, args = ("handle_study", "(study, ctx)") if level == "study" else ("handle", "(obj, ctx)")
    handle = getattr(module, function, None)
    if not callable(handle):
        raise HandlerError(f"handler {name}: no {function}{args} function")
    try:
        inspect.signature(handle).bind(None, None)
    except TypeError:
        raise HandlerError(f"handler {name}: {function} must take two arguments {args}") from None
    except ValueError:
        pass    # no signature to inspect (a builtin): let it be
    return LoadedHandler(name, version.strip(), digest, path, handle, level)


# A handler's LEVEL: "instance" (handle(obj, ctx), per object; the default) or "study"
# (handle_study(study, ctx), once over a study's objects held for one destination).
LEVELS = ("instance", "study")


@dataclass(frozen=True)
class ReloadResult:
    name: str
    outcome: str              # "activated", "unchanged", "kept", "removed"
    active: str               # label of the version now active (or "")
    error: str = ""

    def __str__(self) -> str:
        if self.outcome == "kept":
            return f"{self.name}: new version refused ({self.error}); {self.active} stays active"
        return f"{self.name}: {self.outcome} {self.active}".rstrip()


class Handlers:
    """The active version of each handler named by the routes."""

    def __init__(self, handlers_dir: Path, names: Iterable[str]):
        self.handlers_dir = handlers_dir
        self._lock = threading.Lock()
        self._active: dict[str, LoadedHandler] = {}
        self.last_reload: list[ReloadResult] = []
        problems = []
        for name in sorted(set(names)):
            try:
                self._active[name] = load(name, handlers_dir)
            except HandlerError as exc:
                problems.append(str(exc))
        if problems:
            raise HandlerError("; ".join(problems))

    @classmethod
    def single(cls, handler: LoadedHandler) -> "Handlers":
        """A registry holding just this version (for a dry run)."""
        registry = cls(handler.path.parent, ())
        registry._active = {handler.name: handler}
        return registry

    def get(self, name: str) -> LoadedHandler:
        with self._lock:
            try:
                return self._active[name]
            except KeyError:
                raise HandlerError(f"handler {name} is not loaded") from None

    def active(self) -> dict[str, LoadedHandler]:
        with self._lock:
            return dict(self._active)

    def reload(self, handlers_dir: Path, names: Iterable[str],
               dry_run: Callable[[LoadedHandler, LoadedHandler | None], str | None],
               only: Iterable[str] | None = None) -> list[ReloadResult]:
        """Load the new version of each handler; ``dry_run(new, old)`` returns why the
        new one must not replace the old (None when fine). A refused version leaves the
        running one active. Handlers no route names any more are dropped. With ``only``
        (the console's "reload this one"), the others keep their running version."""
        names = sorted(set(names))
        only = set(only) if only is not None else None
        current = self.active()
        results: list[ReloadResult] = []
        new_active: dict[str, LoadedHandler] = {}
        for name in names:
            old = current.get(name)
            if only is not None and name not in only and old is not None:
                new_active[name] = old
                continue
            try:
                new = load(name, handlers_dir)
                if old is not None and new.digest == old.digest:
                    new_active[name] = old
                    results.append(ReloadResult(name, "unchanged", old.label))
                    continue
                if old is not None and new.version == old.version:
                    # Two different codes under one version would make "which version
                    # sent this" unanswerable (deliveries record the version).
                    raise HandlerError(f"the file changed but VERSION is still {old.version!r}: "
                                       "give the new code a new VERSION")
                problem = dry_run(new, old)
                if problem:
                    raise HandlerError(problem)
            except HandlerError as exc:
                if old is None:
                    results.append(ReloadResult(name, "kept", "", str(exc)))
                    continue
                new_active[name] = old
                results.append(ReloadResult(name, "kept", old.label, str(exc)))
                continue
            new_active[name] = new
            results.append(ReloadResult(name, "activated", new.label))
        results += [ReloadResult(n, "removed", "") for n in current if n not in new_active]
        with self._lock:
            self._active = new_active
            self.handlers_dir = handlers_dir
            self.last_reload = results
        for r in results:
            (log.warning if r.outcome == "kept" else log.info)("reload: %s", r)
        return results

"""The registry of destination kinds: one line per kind.

A kind (mfconsole/config.py: DestinationKind) is declared in its protocol package's
kind.py: its keys, its sender, its echo, the words for its target, what a handler
must make for it. Adding a kind is its package plus its entry here (the import and
its line in REGISTRY); nothing else in the core names a kind. The order of REGISTRY is
the order messages list the kinds.

``python -m mfconsole.kinds docs/destinations.md`` writes the reference of every
kind's keys from their declarations (tests/unit/test_kinds.py fails when it is stale).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Iterator

from mfconsole.config import DestinationConfig, DestinationKind, value_type

from mfconsole.dimse import kind as dimse
from mfconsole.fhir import kind as fhir
from mfconsole.mllp import kind as mllp
from mfconsole.stow import kind as stow


class Registry:
    """name → DestinationKind, in registration order."""

    def __init__(self, *kinds: DestinationKind):
        self._kinds: dict[str, DestinationKind] = {}
        for kind in kinds:
            self.register(kind)

    def register(self, kind: DestinationKind) -> DestinationKind:
        if kind.name in self._kinds:
            raise ValueError(f"destination kind {kind.name!r} is registered already")
        self._kinds[kind.name] = kind
        return kind

    def unregister(self, name: str) -> None:
        del self._kinds[name]

    def get(self, name: Any) -> DestinationKind | None:
        return self._kinds.get(name) if isinstance(name, str) else None

    def __getitem__(self, name: str) -> DestinationKind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def names(self) -> list[str]:
        return list(self._kinds)

    def kinds(self) -> Iterator[DestinationKind]:
        return iter(list(self._kinds.values()))


# The kinds, one line each, in the order messages list them ("dimse, stow, mllp or fhir").
REGISTRY = Registry(
    dimse.KIND,
    stow.KIND,
    mllp.KIND,
    fhir.KIND,
)


def kind_of(destination: DestinationConfig) -> DestinationKind:
    """The kind a built destination belongs to."""
    return REGISTRY[destination.kind]


# -- docs/destinations.md -----------------------------------------------------------


def _default(value: Any) -> str:
    if value is MISSING:
        return "required"
    if value is None or value == ():
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f'"{value}"' if isinstance(value, str) else str(value)


def docs_markdown(registry: Registry | None = None) -> str:
    """The reference of every destination key, from the kinds' declarations."""
    registry = registry or REGISTRY
    common = {f.name for f in dataclasses.fields(DestinationConfig)}
    lines = ["# Destination keys", "",
             "<!-- Generated from the kinds' declarations by `python -m mfconsole.kinds "
             "docs/destinations.md`; do not edit by hand. -->", "",
             "Every `[[destinations]]` table has a `kind`, one of: "
             + ", ".join(f"`{k.name}` ({k.doc})" for k in registry.kinds()) + ". "
             "config.toml shows each key in use, with a longer comment. Durations are in "
             "seconds; paths are relative to the config file's folder.", ""]

    def table(fields: list[Any]) -> list[str]:
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields:
            typ = {"tls": "table", "coerce": "array of tables"}.get(f.name) or {
                str: "string", int: "integer", float: "number", bool: "boolean",
                Path: "path", tuple: "list of strings"}[value_type(f)]
            rows.append(f"| `{f.name}` | {typ} | {_default(f.default)} | {f.metadata['doc']} |")
        return rows + [""]

    lines += ["## Every kind", ""] + table(list(dataclasses.fields(DestinationConfig)))
    lines += ["With `trigger = \"study_stable\"` the deliveries of a study are `held` until no "
              "instance of it has arrived for `stable_after_s`, then go out together (one STOW "
              "request per study within its batch limits; a study-level handler, `LEVEL = "
              "\"study\"` and `handle_study(study, ctx)`, runs once over them and its one "
              "result's outcome is each delivery's). The release time is stored (a restart keeps "
              "it). README, \"Study-stable delivery\", says more.", ""]
    for kind in registry.kinds():
        own = [f for f in kind.settings() if f.name not in common
               or f.default != DestinationConfig.__dataclass_fields__[f.name].default]
        lines += [f"## kind = \"{kind.name}\"", "", kind.doc[:1].upper() + kind.doc[1:] + ".", ""]
        lines += table(own)
        editable = ", ".join(f"`{key}`" for key, _, _ in kind.editable()) or "none"
        made = {"hl7": "an HL7 message (a route to it must name a handler)",
                "fhir": "a FHIR resource as a dict (a route to it must name a study-level "
                        "handler, e.g. study_to_imagingstudy)"}.get(kind.produces, "a DICOM data set")
        lines += [f"Editable from the console: {editable}. A handler on a route to it returns "
                  f"None (filtered) or {made}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = docs_markdown()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)

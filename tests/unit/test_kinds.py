"""The destination kinds' declarations (mfconsole/kinds.py) and what is made of them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from mfconsole.config import DestinationConfig
from mfconsole.kinds import REGISTRY, docs_markdown

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "destinations.md"


def test_docs_destinations_md_is_generated_from_the_declarations():
    assert DOCS.read_text(encoding="utf-8") == docs_markdown(), (
        "docs/destinations.md is stale: regenerate it with "
        "`python -m mfconsole.kinds docs/destinations.md`")


def test_every_key_is_declared_with_a_line_of_documentation():
    for kind in REGISTRY.kinds():
        for f in kind.settings():
            assert f.metadata.get("doc", "").strip(), f"{kind.name}.{f.name} has no doc"


def test_the_shipped_kinds_in_order():
    assert REGISTRY.names() == ["dimse", "stow", "mllp", "fhir"]
    for kind in REGISTRY.kinds():
        assert issubclass(kind.config, DestinationConfig)
        # the common keys are the base class's, not redeclared with their defaults
        common = {f.name for f in fields(DestinationConfig)}
        assert common <= kind.keys()


def test_loading_a_configuration_loads_no_sender():
    """config.py and the kinds' declarations stay light: the protocols' sender code
    (pynetdicom, httpx) is imported when a sender is made, not when config.toml is read."""
    code = ("import sys; from mfconsole.config import load; load('config.toml'); "
            "print(sorted(m for m in sys.modules if m.endswith(('.sender', '.client')) "
            "or m in ('httpx', 'pynetdicom')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

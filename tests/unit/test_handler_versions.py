"""A handler file changed without a new VERSION is refused at reload: deliveries record
the version that made them, and two codes under one version would make that a lie."""

from __future__ import annotations

from mfconsole.engine.handlers import Handlers


def test_a_changed_handler_needs_a_new_version(tmp_path):
    path = tmp_path / "h.py"
    path.write_text("VERSION = '1.0'\ndef handle(obj, ctx):\n    return None\n")
    handlers = Handlers(tmp_path, ["h"])
    path.write_text("VERSION = '1.0'\ndef handle(obj, ctx):\n    return obj\n")
    result, = handlers.reload(tmp_path, ["h"], lambda new, old: None)
    assert result.outcome == "kept" and "VERSION is still '1.0'" in result.error
    assert handlers.get("h").version == "1.0"
    path.write_text("VERSION = '1.1'\ndef handle(obj, ctx):\n    return obj\n")
    result, = handlers.reload(tmp_path, ["h"], lambda new, old: None)
    assert result.outcome == "activated" and handlers.get("h").version == "1.1"


def test_an_unchanged_file_is_unchanged(tmp_path):
    path = tmp_path / "h.py"
    path.write_text("VERSION = '1.0'\ndef handle(obj, ctx):\n    return None\n")
    handlers = Handlers(tmp_path, ["h"])
    result, = handlers.reload(tmp_path, ["h"], lambda new, old: None)
    assert result.outcome == "unchanged"

"""`mfconsole check`: exit 0 when the configuration is valid, 2 with every problem
named by its key path otherwise (run as a subprocess, like an administrator would)."""

from __future__ import annotations

import sys

import pytest

from harness import REPO, mfconsole, run, write_config
from test_config import ERROR_CASES, handler_file

# One case per error class (test_config.py covers every variant in-process).
CLI_CASES = [
    "unknown_listener_key", "unknown_section", "duplicate_listener_name",
    "duplicate_destination_name", "duplicate_listener_port", "route_unknown_listener",
    "route_unknown_destination", "route_unknown_handler", "dimse_outside_egress",
    "mllp_outside_egress", "stow_sibling_path", "ae_empty", "ae_too_long", "ae_backslash",
    "ae_control", "non_loopback_cleartext", "bool_as_port",
]
BY_ID = {c.id: c for c in ERROR_CASES}


def check(*args: str, cwd=None):
    if cwd is None:
        return mfconsole("check", *args, timeout=30)
    return run([sys.executable, "-m", "mfconsole", "check", *args], timeout=30, cwd=cwd)


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_check_reports_key_path(tmp_path, case_id):
    case = BY_ID[case_id]
    path = case.make(tmp_path)
    result = check("--config", str(path))
    assert result.returncode == 2, result
    out = result.stdout + result.stderr
    assert f"{case.key}:" in out, out
    line = next(ln for ln in out.splitlines() if f"{case.key}:" in ln)
    assert case.why in line, out
    assert "Traceback" not in out


def test_check_reports_every_problem_at_once(tmp_path):
    path = write_config(tmp_path, ae_title="", listener={"port": True, "host": "0.0.0.0"},
                        routes=[{"from": "nowhere", "to": ["pacs", "ghost"]}])
    result = check("--config", str(path))
    assert result.returncode == 2
    for key in ("listeners[0].ae_title", "listeners[0].port", "listeners[0].host",
                "routes[0].from", "routes[0].to[1]"):
        assert f"{key}:" in result.stderr, result.stderr
    assert "5 problem(s)" in result.stderr


def test_valid_config_exits_0(tmp_path):
    handler_file(tmp_path, "sr_to_oru")
    path = write_config(tmp_path, routes=[{"from": "modalities", "to": ["pacs"],
                                           "handler": "sr_to_oru"}])
    result = check("--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_shipped_config_passes_check():
    result = check("--config", str(REPO / "config.toml"))
    assert result.returncode == 0, result.stderr


def test_default_is_config_toml_in_the_working_directory(tmp_path):
    write_config(tmp_path)
    assert check(cwd=tmp_path).returncode == 0
    (tmp_path / "config.toml").unlink()
    result = check(cwd=tmp_path)
    assert result.returncode == 2
    assert "config.toml" in result.stderr and "no such file" in result.stderr


def test_config_option_before_the_command(tmp_path):
    path = write_config(tmp_path, ae_title="A" * 17)
    result = run([sys.executable, "-m", "mfconsole", "--config", str(path), "check"], timeout=30)
    assert result.returncode == 2
    assert "listeners[0].ae_title:" in result.stderr


def test_handlers_resolve_next_to_the_config_not_the_working_directory(tmp_path):
    site = tmp_path / "site"
    handler_file(site, "sr_to_oru")
    write_config(site, routes=[{"from": "modalities", "to": ["pacs"],
                                       "handler": "sr_to_oru"}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert check("--config", "../site/config.toml", cwd=elsewhere).returncode == 0
    (site / "handlers" / "sr_to_oru.py").unlink()
    handler_file(elsewhere, "sr_to_oru")
    result = check("--config", "../site/config.toml", cwd=elsewhere)
    assert result.returncode == 2
    assert "routes[0].handler:" in result.stderr


def test_syntax_error_exits_2_with_the_line(tmp_path):
    path = write_config(tmp_path)
    lines = path.read_text().splitlines()
    lines.insert(2, "log_level = = INFO")
    path.write_text("\n".join(lines) + "\n")
    result = check("--config", str(path))
    assert result.returncode == 2
    assert "line 3" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2(tmp_path):
    result = check("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml" in result.stderr
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_directory_as_config_exits_2(tmp_path):
    result = check("--config", str(tmp_path))
    assert result.returncode == 2
    assert "cannot be read" in result.stderr

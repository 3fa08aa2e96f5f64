"""mfconsole/health.py: the conditions behind `mfconsole health`, metrics and alerts —
severity, stable keys, thresholds from [health], certificate expiry read from the
configured files, routing-safe texts; and [health] validation naming the key."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import write_config
from mfconsole import health
from mfconsole.config import ConfigError, TLSConfig, load
from tlsgen import make_pki

NOW = 1_800_000_000.0


def config(tmp_path: Path, *, listeners=(), destinations=(), **thresholds):
    return SimpleNamespace(health=health.HealthConfig(**thresholds), listeners=listeners,
                           destinations=destinations,
                           engine=SimpleNamespace(data_dir=tmp_path / "var"))


def status(running=True, destinations=(), listeners=("modalities",)):
    return {"engine": {"running": running},
            "listeners": [{"name": n, "state": "listening" if running else "stopped"} for n in listeners],
            "destinations": [{"name": "pacs", "state": "up", "oldest_pending_at": None,
                              "last_error": None, **d} for d in destinations]}


def test_all_quiet_is_ok(tmp_path):
    found = health.problems(config(tmp_path), status(destinations=[{}]), now=NOW)
    assert found == [] and health.severity(found) == health.OK


def test_engine_not_running_is_down_and_comes_first(tmp_path):
    found = health.problems(config(tmp_path), status(False, [{"state": "down", "last_error": "refused"}]),
                            now=NOW)
    assert [(p.severity, p.key) for p in found] == [
        (health.DOWN, "engine_down"), (health.DEGRADED, "destination_down:pacs")]
    assert health.severity(found) == health.DOWN
    assert found[1].text == "destination pacs: down (refused)"


def test_oldest_pending_counts_past_the_threshold_unless_paused(tmp_path):
    cfg = config(tmp_path, oldest_pending_s=60)
    young = status(destinations=[{"oldest_pending_at": NOW - 30}])
    old = status(destinations=[{"oldest_pending_at": NOW - 3 * 3600}])
    paused = status(destinations=[{"oldest_pending_at": NOW - 3 * 3600, "state": "paused"}])
    assert health.problems(cfg, young, now=NOW) == []
    problem, = health.problems(cfg, old, now=NOW)
    assert problem.key == "oldest_pending:pacs" and "waiting 3 h (over 1 min)" in problem.text
    assert health.problems(cfg, paused, now=NOW) == []


class Reads:
    def __init__(self, dead=None, reload=None, export_error=None):
        self.dead, self.reload, self.export_error = dead or {}, reload, export_error

    def audit_export(self, name):
        assert name == "arr"
        return {"last_id": 41, "last_error": self.export_error}

    def events_since(self, events, since):
        assert events == ("dead_lettered",) and since == NOW - 600
        return self.dead

    def last_event(self, events):
        return self.reload


def test_dead_letters_growing_and_a_refused_reload(tmp_path):
    cfg = config(tmp_path, dead_letters=3, dead_letters_window_s=600)
    found = health.problems(cfg, status(), Reads({"pacs": 3, "web": 2}, {"status": "errors"}), now=NOW)
    assert [p.key for p in found] == ["dead_letters:pacs", "reload_refused"]
    assert found[0].text == "destination pacs: 3 dead letter(s) in the last 10 min"
    assert health.problems(cfg, status(), Reads({}, {"status": "ok"}), now=NOW) == []


def test_certificates_expiring_soon_or_expired(tmp_path):
    pki = make_pki(tmp_path / "pki")
    listener = SimpleNamespace(tls=TLSConfig(cert_file=pki["server.crt"], ca_file=pki["ca.crt"]))
    dest = SimpleNamespace(tls=TLSConfig(cert_file=pki["expired-client.crt"]))
    cfg = config(tmp_path, listeners=[listener], destinations=[dest, SimpleNamespace(tls=None)],
                 cert_expiry_days=7)
    expiry = health.certificate_expiry(cfg)
    assert set(expiry) == {str(pki["server.crt"]), str(pki["ca.crt"]), str(pki["expired-client.crt"])}
    found = {p.key: p for p in health.problems(cfg, status(), now=time.time())}
    assert found[f"certificate:{pki['expired-client.crt']}"].severity == health.DOWN
    soon = found[f"certificate:{pki['server.crt']}"]          # test leaves live two days
    assert soon.severity == health.DEGRADED and "expires in 2 d" in soon.text


def test_store_space(tmp_path, monkeypatch):
    monkeypatch.setattr(health, "free_percent", lambda path: 4.0)
    problem, = health.problems(config(tmp_path, store_min_free_percent=5), status(), now=NOW)
    assert (problem.severity, problem.key) == (health.DEGRADED, "store_space")
    monkeypatch.setattr(health, "free_percent", lambda path: 0.5)
    assert health.problems(config(tmp_path), status(), now=NOW)[0].severity == health.DOWN
    assert health.free_percent(tmp_path / "not" / "yet") is not None


def test_health_table_is_read_and_checked(tmp_path):
    cfg = load(write_config(tmp_path / "a", tables={"health": {"oldest_pending_s": 120, "dead_letters": 2}}))
    assert (cfg.health.oldest_pending_s, cfg.health.dead_letters) == (120, 2)
    assert load(write_config(tmp_path / "b")).health == health.HealthConfig()
    with pytest.raises(ConfigError) as err:
        load(write_config(tmp_path / "c", tables={"health": {"dead_letters": 0, "store_min_free_percent": 100,
                                                             "oldest": 1}}))
    keys = [k for k, _ in err.value.problems]
    assert "health.dead_letters" in keys and "health.store_min_free_percent" in keys
    assert any(k.startswith("health.oldest") for k in keys)


def test_a_failing_audit_export_is_degraded_when_enabled(tmp_path):
    from mfconsole.audit_export import AuditExportConfig

    cfg = config(tmp_path, dead_letters_window_s=600)
    cfg.audit_export = AuditExportConfig(enabled=True, host="127.0.0.1")
    problem, = health.problems(cfg, status(), Reads(export_error="cannot connect to 127.0.0.1:6514"), now=NOW)
    assert problem.key == "audit_export" and problem.text == (
        "audit export: the last attempt failed (cannot connect to 127.0.0.1:6514); "
        "audit rows after 41 wait for the ARR")
    assert health.problems(cfg, status(), Reads(), now=NOW) == []
    cfg.audit_export = AuditExportConfig(enabled=False)
    assert health.problems(cfg, status(), Reads(export_error="x"), now=NOW) == []

"""mfconsole.config: every problem is reported with its key path, all at once.

``ERROR_CASES`` is shared with test_cli_check.py, which runs the same files through
``mfconsole check``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from harness import REPO, write_config
from mfconsole import config as config_mod
from mfconsole.config import (
    ConfigError,
    accepted_keys,
    ae_title_problem,
    http_prefix_allows,
    is_loopback,
    load,
    tcp_allows,
)

SHIPPED = REPO / "config.toml"


def listener_toml(name: str, port: int, **extra: Any) -> str:
    lines = ["", "[[listeners]]", f'name = "{name}"', 'ae_title = "MF_SCP2"',
             'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def append(path: Path, text: str) -> Path:
    path.write_text(path.read_text() + text)
    return path


def handler_file(folder: Path, name: str) -> None:
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    (folder / "handlers" / f"{name}.py").write_text("def handle(obj):\n    return obj\n")


@dataclass(frozen=True)
class Case:
    """A config in ``folder`` that must fail with ``key`` and a reason containing ``why``."""
    id: str
    make: Callable[[Path], Path]
    key: str
    why: str


DIMSE = {"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS"}
STOW_PREFIX = "http://127.0.0.1:8042/dicom-web"


def stow(url: str, prefix: str = STOW_PREFIX) -> Callable[[Path], Path]:
    return lambda d: write_config(
        d, destinations=[{"name": "web", "kind": "stow", "url": url}],
        egress={"allowed_tcp": [], "allowed_http": [prefix]})


def audit_export(table: dict[str, Any], allowed: list[str] | None = None) -> Callable[[Path], Path]:
    """A config whose [egress] allows the pacs and ``allowed``, with [audit_export] ``table``."""
    return lambda d: write_config(
        d, egress={"allowed_tcp": ["127.0.0.1:1", *(allowed or [])]},
        tables={"audit_export": {"enabled": True, **table}})


ERROR_CASES = [
    # [audit_export]: the ARR must be allowed by [egress], and never cleartext off loopback
    Case("audit_export_not_in_egress", audit_export({"host": "127.0.0.1"}),
         "audit_export.host", "egress.allowed_tcp"),
    Case("audit_export_cleartext_off_loopback",
         audit_export({"host": "192.0.2.7"}, ["192.0.2.7:6514"]), "audit_export.host", "cleartext"),
    Case("audit_export_needs_host", audit_export({}), "audit_export.host", "is required"),
    Case("audit_export_listener_tls_key",
         audit_export({"host": "127.0.0.1", "tls": {"require_client_cert": True}}, ["127.0.0.1:6514"]),
         "audit_export.tls.require_client_cert", "does not apply"),
    Case("audit_export_hash_without_ids",
         audit_export({"host": "127.0.0.1", "patient_id_hash": False}, ["127.0.0.1:6514"]),
         "audit_export.patient_id_hash", "include_patient_ids"),
    Case("audit_export_app_name", audit_export({"host": "127.0.0.1", "app_name": "mf console"},
                                               ["127.0.0.1:6514"]),
         "audit_export.app_name", "APP-NAME"),
    Case("audit_export_unknown_key", audit_export({"host": "127.0.0.1", "hostname": "x"},
                                                  ["127.0.0.1:6514"]),
         "audit_export.hostname", "unknown key"),
    # unknown keys: a typo must never fall back to a default
    Case("unknown_listener_key", lambda d: write_config(d, listener={"calling_aet": ["X"]}),
         "listeners[0].calling_aet", "unknown key"),
    Case("unknown_engine_key", lambda d: write_config(d, engine={"datadir": "x"}),
         "engine.datadir", "unknown key"),
    Case("unknown_store_key", lambda d: write_config(d, store={"max_object_gb": 1}),
         "store.max_object_gb", "unknown key"),
    Case("unknown_section", lambda d: append(write_config(d), '\n[egres]\nallowed_tcp = []\n'),
         "egres", "unknown key"),
    Case("unknown_destination_key",
         lambda d: write_config(d, destinations=[dict(DIMSE, url="http://x/")]),
         "destinations[0].url", "unknown key"),
    Case("unknown_route_key",
         lambda d: write_config(d, routes=[{"from": "modalities", "to": ["pacs"], "filter": "x"}]),
         "routes[0].filter", "unknown key"),
    # duplicates
    Case("duplicate_listener_name",
         lambda d: append(write_config(d, port=11112), listener_toml("modalities", 11114)),
         "listeners[1].name", "already used"),
    Case("duplicate_destination_name",
         lambda d: write_config(d, destinations=[DIMSE, dict(DIMSE, port=11115)]),
         "destinations[1].name", "already used"),
    Case("duplicate_listener_port",
         lambda d: append(write_config(d, port=11112), listener_toml("second", 11112)),
         "listeners[1].port", "already used"),
    # routes naming what does not exist
    Case("route_unknown_listener",
         lambda d: write_config(d, routes=[{"from": "modalitys", "to": ["pacs"]}]),
         "routes[0].from", "names no listener"),
    Case("route_unknown_destination",
         lambda d: write_config(d, destinations=[DIMSE], routes=[{"from": "modalities",
                                                                  "to": ["pacs", "archive"]}]),
         "routes[0].to[1]", "names no destination"),
    Case("route_unknown_handler",
         lambda d: write_config(d, routes=[{"from": "modalities", "to": ["pacs"],
                                            "handler": "sr_to_oru"}]),
         "routes[0].handler", "does not exist"),
    Case("route_handler_not_a_module_name",
         lambda d: write_config(d, routes=[{"from": "modalities", "to": ["pacs"],
                                            "handler": "../evil"}]),
         "routes[0].handler", "module name"),
    # egress
    Case("dimse_outside_egress",
         lambda d: write_config(d, destinations=[DIMSE],
                                egress={"allowed_tcp": ["127.0.0.1:11114"], "allowed_http": []}),
         "destinations[0].host", "egress.allowed_tcp"),
    Case("mllp_outside_egress",
         lambda d: write_config(d, destinations=[{"name": "ehr", "kind": "mllp",
                                                  "host": "10.1.2.3", "port": 2575}],
                                egress={"allowed_tcp": ["10.1.2.3:2576"], "allowed_http": []}),
         "destinations[0].host", "egress.allowed_tcp"),
    Case("stow_sibling_path", stow("http://127.0.0.1:8042/dicom-web.evil"),
         "destinations[0].url", "egress.allowed_http"),
    Case("stow_other_port", stow("http://127.0.0.1:8043/dicom-web"),
         "destinations[0].url", "egress.allowed_http"),
    Case("stow_other_scheme", stow("https://127.0.0.1:8042/dicom-web"),
         "destinations[0].url", "egress.allowed_http"),
    Case("stow_other_host", stow("http://127.0.0.2:8042/dicom-web"),
         "destinations[0].url", "egress.allowed_http"),
    Case("stow_parent_path", stow("http://127.0.0.1:8042/"),
         "destinations[0].url", "egress.allowed_http"),
    Case("stow_dot_segments", stow("http://127.0.0.1:8042/dicom-web/../admin"),
         "destinations[0].url", "'..'"),
    Case("stow_bad_port", stow("http://127.0.0.1:99999/dicom-web"),
         "destinations[0].url", "port"),
    # AE titles
    Case("ae_empty", lambda d: write_config(d, ae_title=""), "listeners[0].ae_title", "empty"),
    Case("ae_blank", lambda d: write_config(d, ae_title="   "), "listeners[0].ae_title", "empty"),
    Case("ae_too_long", lambda d: write_config(d, ae_title="A" * 17),
         "listeners[0].ae_title", "at most 16"),
    Case("ae_backslash", lambda d: write_config(d, ae_title="MF\\SCP"),
         "listeners[0].ae_title", "backslash"),
    Case("ae_control", lambda d: write_config(d, ae_title="MF\tSCP"),
         "listeners[0].ae_title", "control"),
    Case("calling_ae_invalid", lambda d: write_config(d, calling_aets=["CT1", "X" * 17]),
         "listeners[0].calling_aets[1]", "at most 16"),
    Case("destination_ae_invalid",
         lambda d: write_config(d, destinations=[dict(DIMSE, ae_title="PA\\CS")]),
         "destinations[0].ae_title", "backslash"),
    Case("destination_calling_ae_invalid",
         lambda d: write_config(d, destinations=[dict(DIMSE, calling_ae_title="")]),
         "destinations[0].calling_ae_title", "empty"),
    # cleartext on the network
    Case("non_loopback_cleartext", lambda d: write_config(d, listener={"host": "0.0.0.0"}),
         "listeners[0].host", "allow_cleartext = true"),
    # types
    Case("bool_as_port", lambda d: write_config(d, listener={"port": True}),
         "listeners[0].port", "not a boolean"),
    Case("bool_as_max_associations", lambda d: write_config(d, listener={"max_associations": False}),
         "listeners[0].max_associations", "not a boolean"),
    Case("int_as_bool", lambda d: write_config(d, listener={"allow_cleartext": 1}),
         "listeners[0].allow_cleartext", "true or false"),
    Case("port_out_of_range", lambda d: write_config(d, port=70000), "listeners[0].port", "1-65535"),
    Case("missing_required", lambda d: write_config(
        d, destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1", "port": 11113}]),
         "destinations[0].ae_title", "required"),
    Case("unknown_kind", lambda d: write_config(
        d, destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 11113}]),
         "destinations[0].kind", "not a destination kind"),
]


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.id for c in ERROR_CASES])
def test_error_names_key_path(tmp_path, case):
    problems = problems_of(case.make(tmp_path))
    matching = [why for key, why in problems if key == case.key]
    assert matching, f"{case.key} not in {problems}"
    assert any(case.why in why for why in matching), problems


def test_bad_listener_does_not_cascade_into_routes(tmp_path):
    """A listener with a bad port is still a name routes may use: one problem, not two."""
    problems = problems_of(write_config(tmp_path, listener={"port": 0}))
    assert [k for k, _ in problems] == ["listeners[0].port"]


def test_unknown_key_suggests_the_right_one(tmp_path):
    problems = problems_of(write_config(tmp_path, listener={"calling_aet": ["X"]}))
    assert ("listeners[0].calling_aet", "unknown key (did you mean 'calling_aets'?)") in problems


def test_many_errors_at_once(tmp_path):
    path = write_config(
        tmp_path, ae_title="A" * 17,
        listener={"port": True, "max_pdu_kb": 1, "host": "0.0.0.0", "typo": 1},
        destinations=[dict(DIMSE, ae_title="")],
        egress={"allowed_tcp": [], "allowed_http": ["ftp://x/"]},
        store={"max_object_mb": 0},
        routes=[{"from": "nowhere", "to": ["pacs", "missing"]}])
    keys = {k for k, _ in problems_of(path)}
    assert keys >= {
        "listeners[0].ae_title", "listeners[0].port", "listeners[0].max_pdu_kb",
        "listeners[0].host", "listeners[0].typo", "destinations[0].ae_title",
        "destinations[0].host", "egress.allowed_http[0]", "store.max_object_mb",
        "routes[0].from", "routes[0].to[1]"}


def test_non_loopback_allowed_with_cleartext_opt_in(tmp_path):
    cfg = load(write_config(tmp_path, listener={"host": "0.0.0.0", "allow_cleartext": True}))
    assert cfg.listeners[0].allow_cleartext is True


def test_error_message_says_how_to_fix_cleartext(tmp_path):
    problems = dict(problems_of(write_config(tmp_path, listener={"host": "192.0.2.10"})))
    why = problems["listeners[0].host"]
    assert "127.0.0.1" in why and "listeners[0].allow_cleartext = true" in why


def test_handler_present_next_to_config(tmp_path):
    handler_file(tmp_path, "sr_to_oru")
    cfg = load(write_config(tmp_path, routes=[{"from": "modalities", "to": ["pacs"],
                                               "handler": "sr_to_oru"}]))
    assert cfg.routes[0].handler == "sr_to_oru"
    assert cfg.handlers_dir == tmp_path.resolve() / "handlers"


def test_valid_config_is_typed_and_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    path = write_config(folder, port=11112, destinations=[
        DIMSE, {"name": "web", "kind": "stow", "url": STOW_PREFIX + "/"},
        {"name": "ehr", "kind": "mllp", "host": "LOCALHOST", "port": 2575}],
        egress={"allowed_tcp": ["127.0.0.1:11113", "localhost:2575"],
                "allowed_http": [STOW_PREFIX]},
        routes=[{"from": "modalities", "to": ["pacs", "web"]},
                {"from": "modalities", "to": ["ehr"], "handler": "to_hl7"}])
    (folder / "handlers").mkdir()
    (folder / "handlers" / "to_hl7.py").write_text("VERSION = '1'\ndef handle(obj, ctx):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    cfg = load(Path("site/config.toml"))
    assert cfg.path == path.resolve()
    assert cfg.engine.data_dir == folder.resolve() / "var"
    assert cfg.store.key_file == folder.resolve() / "var" / "keys" / "store.key"
    assert cfg.engine.shutdown_timeout_s == 10.0 and isinstance(cfg.engine.shutdown_timeout_s, float)
    lst = cfg.listener("modalities")
    assert (lst.port, lst.ae_title, lst.calling_aets, lst.any_calling_aet) == (
        11112, "MF_SCP", ("*",), True)
    assert isinstance(lst.acse_timeout_s, float)
    assert [d.kind for d in cfg.destinations] == ["dimse", "stow", "mllp"]
    assert cfg.destination("pacs").calling_ae_title == "MFCONSOLE"
    assert cfg.routes[0].to == ("pacs", "web") and cfg.routes[1].handler == "to_hl7"
    ehr = cfg.destination("ehr")
    assert (ehr.max_associations, ehr.ack_timeout_s, ehr.sending_application) == (1, 30.0, "MFCONSOLE")


def test_mllp_destination_rules(tmp_path):
    ehr = {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": 2575,
           "max_associations": 2, "sending_facility": "RAD|1"}
    path = write_config(tmp_path, destinations=[ehr])
    problems = dict(problems_of(path))
    assert "in order" in problems["destinations[0].max_associations"]
    assert "delimiters" in problems["destinations[0].sending_facility"]
    fixed = {**ehr, "max_associations": 1, "sending_facility": "RAD"}
    problems = dict(problems_of(write_config(tmp_path / "b", destinations=[fixed])))
    assert "handler" in problems["routes[0].handler"]


def test_default_key_file_is_beside_the_config_not_in_data_dir(tmp_path):
    # A copy of data_dir must not carry its own key.
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('key_file = "var/keys/store.key"\n', ""))
    cfg = load(path)
    assert cfg.store.key_file == tmp_path.resolve() / "keys" / "store.key"
    assert not cfg.store.key_file.is_relative_to(cfg.engine.data_dir)
    assert cfg.store.previous_key_files == ()


def test_previous_key_files_resolve_beside_the_config(tmp_path):
    path = write_config(tmp_path, store={"previous_key_files": ["keys/old.key", "/abs/older.key"]})
    cfg = load(path)
    assert cfg.store.previous_key_files == (tmp_path.resolve() / "keys" / "old.key",
                                           Path("/abs/older.key"))


def test_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[engine]\ndata_dir = "var"\nlog_level = INFO\n')
    problems = problems_of(path)
    assert problems[0][0] == "(syntax)"
    assert "line 3" in problems[0][1]


def test_missing_file(tmp_path):
    problems = problems_of(tmp_path / "nope.toml")
    assert problems == [("(file)", problems[0][1])]
    assert "no such file" in problems[0][1]


def test_listeners_as_single_table(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[listeners]\nname = "x"\n')
    assert ("listeners", "must be an array of tables ([[listeners]])") in problems_of(path)


def test_empty_calling_aets_and_empty_to(tmp_path):
    path = write_config(tmp_path, listener={"calling_aets": []},
                        routes=[{"from": "modalities", "to": []}])
    keys = {k for k, _ in problems_of(path)}
    assert {"listeners[0].calling_aets", "routes[0].to"} <= keys


# -- helpers -----------------------------------------------------------------------


@pytest.mark.parametrize("value,ok", [
    ("MF_SCP", True), ("A" * 16, True), ("A" * 17, False), ("", False), ("  ", False),
    ("A\\B", False), ("A\x00B", False), ("A\x7fB", False), ("AÉ", False), (16, False)])
def test_ae_title_problem(value, ok):
    assert (ae_title_problem(value) is None) is ok


@pytest.mark.parametrize("prefix,url,ok", [
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web", True),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web/", True),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web/studies", True),
    ("http://h:8042/dicom-web/", "http://h:8042/dicom-web/studies", True),
    ("http://H:8042/dicom-web", "HTTP://h:8042/dicom-web", True),
    ("http://h/dicom-web", "http://h:80/dicom-web", True),
    ("https://h/dicom-web", "https://h:443/dicom-web", True),
    ("http://h:8042", "http://h:8042/anything", True),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web.evil", False),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-webx/studies", False),
    ("http://h:8042/dicom-web", "http://h:8042/dicom", False),
    ("http://h:8042/dicom-web", "http://h:8043/dicom-web", False),
    ("http://h:8042/dicom-web", "https://h:8042/dicom-web", False),
    ("http://h:8042/dicom-web", "http://h.evil:8042/dicom-web", False),
    ("http://h:8042/dicom-web", "http://h:8042@evil/dicom-web", False),
    ("http://h:8042/dicom-web", "http://user:pw@h:8042/dicom-web", False),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web/../admin", False),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web/%2e%2e/admin", False),
    ("http://h:8042/dicom-web", "http://h:8042/dicom-web?x=1", False),
    ("http://h:8042/dicom-web", "http://h:99999/dicom-web", False),
    ("http://h:8042/dicom-web", "ftp://h:8042/dicom-web", False),
])
def test_http_prefix_allows(prefix, url, ok):
    assert http_prefix_allows(prefix, url) is ok


@pytest.mark.parametrize("allowed,host,port,ok", [
    (("127.0.0.1:11113",), "127.0.0.1", 11113, True),
    (("127.0.0.1:11113",), "127.0.0.1", 11114, False),
    (("127.0.0.1:11113",), "127.0.0.2", 11113, False),
    (("PACS.example.org:104",), "pacs.example.org", 104, True),
    (("[::1]:104",), "::1", 104, True),
    (("pacs:104",), "pacs.evil", 104, False),
    (("127.0.0.1:11113",), "127.0.0.1:11113", 11113, False),
])
def test_tcp_allows(allowed, host, port, ok):
    assert tcp_allows(allowed, host, port) is ok


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.1:", ":104", "h:0", "h:70000",
                                   "::1:104", "h:1x", "h h:104"])
def test_bad_allowed_tcp_entries(tmp_path, entry):
    path = write_config(tmp_path, destinations=[], egress={"allowed_tcp": [entry]})
    assert "egress.allowed_tcp[0]" in {k for k, _ in problems_of(path)}


@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                     ("localhost", True), ("0.0.0.0", False), ("::", False),
                                     ("10.0.0.1", False), ("pacs", False), ("", False)])
def test_is_loopback(host, ok):
    assert is_loopback(host) is ok


# -- the shipped config.toml -------------------------------------------------------


def test_shipped_config_is_valid():
    cfg = load(SHIPPED)
    assert cfg.listeners and cfg.destinations and cfg.routes


def _sections(text: str) -> dict[str, str]:
    """Text of each [table] / [[array]] in a TOML file, comments included. A table
    shipped commented out (``# [[rules]]``) is documented by its commented example."""
    out: dict[str, str] = {"": ""}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\s*(?:#\s*)?\[\[?\s*([A-Za-z_]+)\s*\]\]?\s*(#.*)?$", line)
        if header:
            current = header.group(1)
            out.setdefault(current, "")
            continue
        out[current] += line + "\n"
    return out


def test_shipped_config_documents_every_accepted_key():
    sections = _sections(SHIPPED.read_text())
    missing = []
    for section, keys in accepted_keys().items():
        if section == "":
            missing += [k for k in keys if k not in sections]
            continue
        body = sections.get(section.split(".")[0], "")   # listeners.tls: in [[listeners]]
        missing += [f"{section}.{k}" for k in keys if not re.search(rf"\b{k}\s*=", body)]
    assert not missing, f"keys accepted by config.py but not documented in config.toml: {missing}"


def test_accepted_keys_cover_what_the_parser_reads():
    """Every key a dataclass holds is accepted somewhere (a renamed key would show here)."""
    from mfconsole.kinds import REGISTRY

    accepted = set().union(*accepted_keys().values())
    for cls in (config_mod.EngineConfig, config_mod.StoreConfig, config_mod.EgressConfig,
                config_mod.ListenerConfig, config_mod.DestinationConfig,
                config_mod.audit_export_mod.AuditExportConfig,
                *(k.config for k in REGISTRY.kinds())):
        for name in cls.__dataclass_fields__:
            assert name in accepted, f"{cls.__name__}.{name}"


@pytest.mark.parametrize("case_id", ["dimse_outside_egress", "unknown_kind", "stow_sibling_path"])
def test_bad_destination_does_not_cascade_into_routes(tmp_path, case_id):
    case = next(c for c in ERROR_CASES if c.id == case_id)
    assert [k for k, _ in problems_of(case.make(tmp_path))] == [case.key]


# -- DIMSE passcode_file: checked like STOW secrets, never sent in clear --------------------


def passcode_config(folder: Path, *, mode: int | None = 0o600, host: str = "127.0.0.1",
                    name: str = "secrets/pacs.passcode", **extra: Any) -> Path:
    """A DIMSE destination with username + passcode_file (made with ``mode``; None: not
    made), to ``host``, relative to the config's folder."""
    if mode is not None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("s3cret\n")
        path.chmod(mode)
    return write_config(folder, destinations=[dict(
        DIMSE, host=host, username="mf", passcode_file=name, **extra)])


def test_passcode_file_0600_on_loopback_without_tls_loads(tmp_path):
    cfg = load(passcode_config(tmp_path))
    assert cfg.destinations[0].passcode_file == tmp_path.resolve() / "secrets" / "pacs.passcode"


@pytest.mark.parametrize("mode,why", [(0o644, "readable by every user (mode 0644)"),
                                      (0o640, "readable by its group (mode 0640)"),
                                      (0o604, "readable by every user")])
def test_passcode_file_readable_by_others_is_refused(tmp_path, mode, why):
    found = dict(problems_of(passcode_config(tmp_path, mode=mode)))
    assert why in found["destinations[0].passcode_file"], found
    assert "chmod 600" in found["destinations[0].passcode_file"]


def test_passcode_file_missing_or_not_a_file_is_refused(tmp_path):
    found = dict(problems_of(passcode_config(tmp_path / "a", mode=None)))
    assert "does not exist" in found["destinations[0].passcode_file"], found
    (tmp_path / "b" / "secrets" / "pacs.passcode").mkdir(parents=True)
    found = dict(problems_of(passcode_config(tmp_path / "b", mode=None)))
    assert "is not a regular file" in found["destinations[0].passcode_file"], found


def test_passcode_never_travels_in_clear(tmp_path):
    # Off loopback without TLS the destination is refused anyway (cleartext PHI)…
    found = dict(problems_of(passcode_config(tmp_path / "a", host="10.1.2.3")))
    assert "allow_cleartext" in found["destinations[0].host"], found
    # …and accepting cleartext PHI does not extend to the passcode.
    found = dict(problems_of(passcode_config(tmp_path / "b", host="10.1.2.3", allow_cleartext=True)))
    assert "would travel in clear to '10.1.2.3'" in found["destinations[0].passcode_file"], found
    assert "tls" in found["destinations[0].passcode_file"]


def test_passcode_over_tls_off_loopback_loads(tmp_path):
    from tlsgen import make_pki

    pki = make_pki(tmp_path / "pki")
    cfg = load(passcode_config(tmp_path, host="10.1.2.3", tls={"ca_file": str(pki["ca.crt"])}))
    assert cfg.destinations[0].tls is not None and cfg.destinations[0].passcode_file is not None


def test_audit_export_read(tmp_path):
    from tlsgen import make_pki

    pki = make_pki(tmp_path / "pki")
    cfg = load(write_config(tmp_path, egress={"allowed_tcp": ["127.0.0.1:1", "localhost:6514"]},
                            tables={"audit_export": {
                                "enabled": True, "host": "localhost",
                                "tls": {"ca_file": str(pki["ca.crt"]), "cert_file": str(pki["client.crt"]),
                                        "key_file": str(pki["client.key"])},
                                "enterprise_site_id": "General Hospital", "include_patient_ids": True,
                                "patient_id_hash": True, "batch": 50, "interval_s": 0.5}}))
    ax = cfg.audit_export
    assert (ax.enabled, ax.host, ax.port, ax.app_name, ax.batch, ax.interval_s) == (
        True, "localhost", 6514, "mfconsole", 50, 0.5)
    assert ax.tls.ca_file == pki["ca.crt"] and ax.tls.cert_file == pki["client.crt"]
    assert ax.include_patient_ids and ax.patient_id_hash and ax.enterprise_site_id == "General Hospital"
    assert not load(write_config(tmp_path / "off")).audit_export.enabled

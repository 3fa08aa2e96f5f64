"""fhir destination keys and routes to it: `mfconsole check` accepts a valid one and
names the key of each problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import REPO, write_config
from mfconsole.config import ConfigError, load

PREFIX = "http://127.0.0.1:8080/fhir"


def config(folder: Path, url: str = PREFIX, allowed: list[str] | None = None,
           handler: str | None = "study_to_imagingstudy", **keys) -> Path:
    (folder / "handlers").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "handlers" / "study_to_imagingstudy.py", folder / "handlers")
    route = {"from": "modalities", "to": ["fhir"], **({"handler": handler} if handler else {})}
    return write_config(folder, destinations=[{"name": "fhir", "kind": "fhir", "url": url, **keys}],
                        routes=[route], egress={"allowed_tcp": [], "allowed_http": allowed or [PREFIX]})


def problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return {key: why for key, why in info.value.problems}


def secret(folder: Path, name: str, mode: int = 0o600) -> str:
    (folder / name).write_text("s3cret")
    (folder / name).chmod(mode)
    return name


def test_a_valid_fhir_destination(tmp_path):
    token = secret(tmp_path, "token")
    cfg = load(config(tmp_path, bearer_token_file=token, response_timeout_s=20))
    (dest,) = cfg.destinations
    assert (dest.kind, dest.url, dest.response_timeout_s) == ("fhir", PREFIX, 20)
    assert cfg.routes[0].handler == "study_to_imagingstudy"
    assert dest.trigger == "study_stable"          # a resource describes a whole study


def test_a_study_level_handler_needs_a_study_stable_destination(tmp_path):
    found = problems(config(tmp_path, trigger="instance"))
    assert found == {"routes[0].handler": (
        'study_to_imagingstudy is study-level (LEVEL = "study") but destination fhir sends each '
        'object as it arrives: set trigger = "study_stable" there (else it sees studies of one object)')}
    # The same through a rule, and for any kind (here an HL7 destination).
    (tmp_path / "r" / "handlers").mkdir(parents=True)
    (tmp_path / "r" / "handlers" / "per_study.py").write_text(
        'VERSION = "1"\nLEVEL = "study"\ndef handle_study(study, ctx):\n    return None\n')
    path = write_config(tmp_path / "r", destinations=[
        {"name": "ehr", "kind": "mllp", "host": "127.0.0.1", "port": 2575},
        {"name": "held", "kind": "mllp", "host": "127.0.0.1", "port": 2576, "trigger": "study_stable"}],
        routes=[], rules=[{"name": "r", "to": ["ehr", "held"], "handler": "per_study"}],
        routing={"fallback": []})
    found = problems(path)
    assert list(found) == ["rules[0].handler"] and "destination ehr sends each" in found["rules[0].handler"]


@pytest.mark.parametrize("keys, key, words", [
    ({"url": "http://127.0.0.1:8080/other"}, "destinations[0].url", "allowed_http"),
    ({"url": "ftp://127.0.0.1/fhir"}, "destinations[0].url", ""),
    ({"username": "u"}, "destinations[0].username", "needs password_file"),
    ({"response_timeout_s": 0}, "destinations[0].response_timeout_s", ""),
    ({"batch_max_objects": 3}, "destinations[0].batch_max_objects", ""),   # a stow key only
    ({"tls": {}}, "destinations[0].tls", "https"),
])
def test_problems_name_the_key(tmp_path, keys, key, words):
    found = problems(config(tmp_path, **keys))
    assert key in found and words in found[key], found


def test_world_readable_token(tmp_path):
    found = problems(config(tmp_path, bearer_token_file=secret(tmp_path, "token", 0o644)))
    assert "chmod 600" in found["destinations[0].bearer_token_file"]


def test_a_route_to_it_needs_a_handler(tmp_path):
    found = problems(config(tmp_path, handler=None))
    assert found == {"routes[0].handler": 'is required: fhir (fhir) takes FHIR resources, which a '
                     'handler makes (e.g. handler = "study_to_imagingstudy")'}


def test_cleartext_off_loopback(tmp_path):
    url = "http://fhir.invalid:8080/fhir"
    found = problems(config(tmp_path, url=url, allowed=[url]))
    assert "destinations[0].url" in found

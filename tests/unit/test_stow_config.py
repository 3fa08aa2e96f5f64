"""STOW-RS destination keys: each problem named by its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import write_config
from mfconsole.config import ConfigError, load
from mfconsole.stow.client import Target
from tlsgen import make_pki

PREFIX = "http://127.0.0.1:8042/dicom-web"


def config(folder: Path, url: str = PREFIX, allowed: list[str] | None = None, **keys) -> Path:
    return write_config(folder, destinations=[{"name": "web", "kind": "stow", "url": url, **keys}],
                        egress={"allowed_tcp": [], "allowed_http": allowed or [PREFIX]})


def problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    out: dict[str, str] = {}
    for key, why in info.value.problems:
        out[key] = f"{out[key]}; {why}" if key in out else why
    return out


def secret(folder: Path, name: str, mode: int = 0o600, text: str = "s3cret") -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return name     # relative: resolved against the config's folder


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8042/dicom-web.evil",      # a sibling that only looks like the prefix
    "http://127.0.0.1:8042/dicom-webx/studies",
    "http://127.0.0.1:8042/dicom",
    "http://127.0.0.1:80/dicom-web",
    "https://127.0.0.1:8042/dicom-web",
    "http://127.0.0.1.evil.example:8042/dicom-web",
    "http://127.0.0.1:8042/dicom-web/../admin",
    "http://127.0.0.1:8042/dicom-web/%2e%2e/admin",
])
def test_url_that_only_looks_allowed_is_refused_at_load(tmp_path, url):
    assert "destinations[0].url" in problems(config(tmp_path, url))


@pytest.mark.parametrize("url", [PREFIX, PREFIX + "/", PREFIX + "/tenant-a", "http://localhost:8042/dicom-web"])
def test_url_under_the_prefix_loads(tmp_path, url):
    allowed = ["http://localhost:8042/dicom-web"] if "localhost" in url else None
    dest = load(config(tmp_path, url, allowed)).destination("web")
    assert dest.url == url and dest.batch_max_objects == 10 and dest.batch_max_mb == 16
    assert Target.from_destination(dest).studies_url == url.rstrip("/") + "/studies"


def test_all_keys_are_typed_and_paths_resolve(tmp_path):
    make_pki(tmp_path / "s")
    keys = dict(bearer_token_file=secret(tmp_path, "s/token"),
                tls={"ca_file": "s/ca.crt", "cert_file": "s/client.crt", "key_file": "s/client.key",
                     "server_name": "archive.internal"},
                batch_max_objects=50, batch_max_mb=64, response_timeout_s=120, connect_timeout_s=3,
                network_timeout_s=20, idle_timeout_s=5, max_associations=4)
    d = load(config(tmp_path, "https://archive.example/dicom-web",
                    ["https://archive.example/dicom-web"], **keys)).destination("web")
    assert d.bearer_token_file == tmp_path / "s/token" and d.tls.ca_file == tmp_path / "s/ca.crt"
    assert Target.from_destination(d).extensions == {"sni_hostname": "archive.internal"}
    assert (d.batch_max_objects, d.batch_max_mb, d.response_timeout_s, d.idle_timeout_s) == (50, 64, 120.0, 5.0)


@pytest.mark.parametrize("keys,key,why", [
    ({"bearer_token_file": "missing"}, "bearer_token_file", "not a readable file"),
    ({"username": "mf"}, "username", "needs password_file"),
    ({"password_file": "@pw"}, "password_file", "needs username"),
    ({"bearer_token_file": "@tok", "username": "mf", "password_file": "@pw"}, "bearer_token_file", "not both"),
    ({"bearer_token_file": "@world"}, "bearer_token_file", "chmod 600"),
    ({"batch_max_objects": 0}, "batch_max_objects", "between 1 and 1000"),
    ({"batch_max_mb": 5000}, "batch_max_mb", "between 1 and 4096"),
    ({"response_timeout_s": 0}, "response_timeout_s", "greater than 0"),
    ({"allow_cleartext": "yes"}, "allow_cleartext", "true or false"),
    ({"priority": "high"}, "priority", "unknown key"),
    ({"passcode_file": "@pw"}, "passcode_file", "unknown key"),
])
def test_bad_keys_are_named(tmp_path, keys, key, why):
    files = {"@pw": secret(tmp_path, "pw"), "@tok": secret(tmp_path, "tok"),
             "@world": secret(tmp_path, "world", 0o644), "@key": secret(tmp_path, "key")}
    found = problems(config(tmp_path, **{k: files.get(v, v) for k, v in keys.items()}))
    assert why in found.get(f"destinations[0].{key}", ""), found


def test_tls_keys_need_https(tmp_path):
    make_pki(tmp_path / "pki")
    found = problems(config(tmp_path, tls={"ca_file": "pki/ca.crt"}))
    assert "https://" in found["destinations[0].tls"]


def test_cleartext_to_another_host_needs_the_opt_in(tmp_path):
    remote = "http://10.1.2.3/dicom-web"
    found = problems(config(tmp_path, remote, [remote]))
    assert "allow_cleartext" in found["destinations[0].url"]
    d = load(config(tmp_path, remote, [remote], allow_cleartext=True)).destination("web")
    assert d.allow_cleartext


def test_credentials_never_go_in_cleartext_to_another_host(tmp_path):
    remote = "http://10.1.2.3/dicom-web"
    found = problems(config(tmp_path, remote, [remote], allow_cleartext=True,
                            bearer_token_file=secret(tmp_path, "tok")))
    assert "cleartext" in found["destinations[0].bearer_token_file"]
    # Loopback is not the network: a local archive over http may take credentials.
    load(config(tmp_path, bearer_token_file=secret(tmp_path, "tok")))

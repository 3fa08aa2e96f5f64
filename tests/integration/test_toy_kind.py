"""A destination kind the core does not know: "toy", declared here and registered
through the registry's API (mfconsole/kinds.py), writes each object to a folder.

It shows that a kind's declaration is all the core needs: config.toml parsing with
its defaults and types, validation errors naming the key path and why (its own
checks and the common ones), the console's editable fields, the status target, and
delivery through the engine to its sender.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import pytest
from pydicom import dcmread

import dicomgen
from harness import poll, write_config
from mfconsole.config import (ConfigError, DestinationConfig, DestinationKind, Found, in_range,
                              load, setting)
from mfconsole.contract import DELIVERED, Outbound, Outcome
from test_forward_dimse import storescu


def _suffix(value: str) -> str | None:
    return None if value.startswith(".") and "/" not in value else "must start with '.' and name no folder"


def _folder(path: Path) -> str | None:
    return None if path.is_dir() else f"{path} is not a folder"


@dataclass(frozen=True, kw_only=True)
class ToyDestination(DestinationConfig):
    kind: ClassVar[str] = "toy"
    directory: Path = setting(doc="Where objects are written.", check=_folder, label="folder")
    suffix: str = setting(".dcm", doc="File name suffix.", check=_suffix)
    max_files: int = setting(100, doc="Files the folder may hold.", check=in_range(1, 1000))


class ToySender:
    """The Sender contract (mfconsole/contract.py), writing files."""
    max_batch = (1, 0)
    in_order = False
    received: list[tuple[str, str, bytes]] = []     # (destination, SOP instance UID, bytes)

    def __init__(self, dest: ToyDestination):
        self.dest = dest

    def prepare(self, items: Sequence[Any]) -> Outcome | None:
        return None

    def send_many(self, objs: list[Outbound]) -> list[Outcome]:
        for obj in objs:
            (self.dest.directory / f"{obj.sop_instance_uid}{self.dest.suffix}").write_bytes(obj.data)
            ToySender.received.append((self.dest.name, obj.sop_instance_uid, obj.data))
        return [Outcome(DELIVERED, status="written", reason="written") for _ in objs]

    def close(self) -> None:
        pass

    def close_if_idle(self, idle_s: float) -> None:
        pass


def _check(found: Found) -> None:
    v = found.values
    if v["max_files"] is not None and v["max_files"] < v["max_associations"]:
        found.fail("max_files", "must not be less than max_associations")


TOY = DestinationKind(ToyDestination, doc="files in a folder", sender=lambda d, checks: ToySender(d),
                      target=lambda d: f"folder {d.directory}", check=_check)


@pytest.fixture
def toy():
    from mfconsole.kinds import REGISTRY

    REGISTRY.register(TOY)
    ToySender.received = []
    try:
        yield TOY
    finally:
        REGISTRY.unregister("toy")


def toy_dest(**extra: Any) -> dict[str, Any]:
    return {"name": "box", "kind": "toy", "directory": "box", **extra}


def problems(path: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return dict(info.value.problems)


def test_a_toy_destination_parses_with_its_defaults_and_types(toy, tmp_path):
    (tmp_path / "box").mkdir()
    cfg = load(write_config(tmp_path, destinations=[toy_dest(max_files=7, retry_initial_s=1)]))
    box = cfg.destination("box")
    assert isinstance(box, ToyDestination) and box.kind == "toy"
    assert box.directory == tmp_path.resolve() / "box"       # relative to the config's folder
    assert (box.suffix, box.max_files) == (".dcm", 7)
    assert box.retry_initial_s == 1.0 and isinstance(box.retry_initial_s, float)   # common keys
    assert (box.max_associations, box.down_after, box.tls) == (2, 5, None)


def test_a_toy_destination_is_validated_by_its_declaration(toy, tmp_path):
    found = problems(write_config(tmp_path, destinations=[toy_dest(
        directory="missing", suffix="x", max_files=0, retry_max_s=-1, folder="typo", port=1)]))
    assert found["destinations[0].directory"] == f"{tmp_path.resolve() / 'missing'} is not a folder"
    assert found["destinations[0].suffix"] == "must start with '.' and name no folder"
    assert found["destinations[0].max_files"] == "must be between 1 and 1000"
    assert found["destinations[0].retry_max_s"] == "must be greater than 0"
    # A key of another kind, or none, is unknown here.
    assert found["destinations[0].port"] == "unknown key"
    assert found["destinations[0].folder"].startswith("unknown key")
    # Required keys, types, and the kind's own rule across keys.
    (tmp_path / "b" / "box").mkdir(parents=True)
    found = problems(write_config(tmp_path / "b", destinations=[
        {"name": "box", "kind": "toy"}, toy_dest(name="two", max_files=True),
        toy_dest(name="three", max_files=2, max_associations=3)]))
    assert found["destinations[0].directory"] == "is required"
    assert found["destinations[1].max_files"] == "must be an integer, not a boolean"
    assert found["destinations[2].max_files"] == "must not be less than max_associations"


def test_the_kind_list_in_messages_comes_from_the_registry(toy, tmp_path):
    found = problems(write_config(tmp_path, destinations=[toy_dest(kind="toys")]))
    assert found["destinations[0].kind"] == "'toys' is not a destination kind (dimse, stow, mllp, fhir or toy)"


def test_without_its_registration_the_kind_is_unknown(tmp_path):
    found = problems(write_config(tmp_path, destinations=[toy_dest()]))
    assert found["destinations[0].kind"] == "'toy' is not a destination kind (dimse, stow, mllp or fhir)"


def test_console_fields_and_status_come_from_the_kind(toy, tmp_path):
    from mfconsole.engine import config_edit, status

    (tmp_path / "box").mkdir()
    cfg = load(write_config(tmp_path, destinations=[toy_dest()]))
    fields = [f for f in config_edit.fields(cfg) if f["section"] == "destination box"]
    assert [(f["key"], f["label"], f["type"]) for f in fields] == [
        ("destinations[0].directory", "folder", "Path")]
    assert status.target(cfg.destination("box")) == f"folder {tmp_path.resolve() / 'box'}"


def test_the_engine_delivers_to_a_toy_destination(toy, engine_factory, tmp_path):
    box = tmp_path / "engine" / "box"
    box.mkdir(parents=True)
    engine = engine_factory(destinations=[toy_dest(suffix=".bin")])
    files = dicomgen.write_corpus(tmp_path / "ct", 3, kind="ct", pixel_bytes=1024)
    assert storescu(engine.listeners[0].address[1], files).returncode == 0
    poll(lambda: len(ToySender.received) == 3, timeout=30, message="three objects written")
    uids = {str(dcmread(f).SOPInstanceUID) for f in files}
    assert {uid for _, uid, _ in ToySender.received} == uids
    assert {p.name for p in box.iterdir()} == {f"{uid}.bin" for uid in uids}
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    for name, uid, data in ToySender.received:
        assert name == "box"
        assert (box / f"{uid}.bin").read_bytes() == data          # the stored data set, as received
        assert uid.encode() in data and originals[uid].PixelData in data
    poll(lambda: engine.store.reader().delivery_counts("box").get("box") == {"delivered": 3},
         timeout=10, message="three deliveries recorded as delivered")

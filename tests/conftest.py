"""Shared fixtures: the tests folder on sys.path (for `peers`, `harness`, `dicomgen`),
an in-process engine on a temp config, and `mfconsole serve` as a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServeProcess, write_config  # noqa: E402
from peers import free_port  # noqa: E402


@pytest.fixture
def engine_factory(tmp_path):
    """Start in-process engines: ``engine = engine_factory(**write_config kwargs)``."""
    from mfconsole.config import load
    from mfconsole.control import serve_control
    from mfconsole.engine.engine import Engine

    started = []

    def make(folder: str = "engine", **kwargs):
        path = write_config(tmp_path / folder, **kwargs)
        engine = Engine(load(path), log_to_stderr=False, control=serve_control)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


@pytest.fixture
def engine(engine_factory):
    return engine_factory()


@pytest.fixture
def serve_factory(tmp_path):
    """Start `mfconsole serve` subprocesses; all are stopped at teardown."""
    started: list[ServeProcess] = []

    def make(folder: str = "serve", **kwargs) -> ServeProcess:
        port = kwargs.pop("port", None) or free_port()
        path = write_config(tmp_path / folder, port=port, **kwargs)
        proc = ServeProcess(path, port).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()

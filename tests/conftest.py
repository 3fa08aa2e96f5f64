"""Shared fixtures: the tests folder on sys.path (for `peers`, `harness`, `dicomgen`),
an in-process engine on a temp config, and `mfconsole serve` as a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServeProcess, write_config  # noqa: E402
from peers import free_port  # noqa: E402


def _keep_responses_for_the_caller() -> None:
    """Work around a race in pynetdicom 3.0's requestor, which the tests use as a
    sending modality. ``send_c_store`` pauses the reactor thread by clearing an Event and
    polling ``_is_paused`` -- which the reactor sets True just *before* it waits. When
    the peer answers within that window (our listener answers a small object in about
    0.1 ms), the reactor takes the C-STORE-RSP off the queue, logs "Received unexpected
    C-STORE service message" and drops it; the caller then waits for a response that
    never comes. A response the reactor cannot serve is put back for the caller."""
    from pynetdicom.association import Association

    serve = Association._serve_request

    def _serve_request(self, msg, context_id):
        if self.is_requestor and not msg.is_valid_request:
            self.dimse.msg_queue.put((context_id, msg))
            return
        serve(self, msg, context_id)

    Association._serve_request = _serve_request


_keep_responses_for_the_caller()


@pytest.fixture
def engine_factory(tmp_path):
    """Start in-process engines: ``engine = engine_factory(**write_config kwargs)``."""
    from mfconsole.config import load
    from mfconsole.control import serve_control
    from mfconsole.engine.engine import Engine
    from mfconsole.metrics_export import serve_metrics

    started = []

    def make(folder: str = "engine", **kwargs):
        path = write_config(tmp_path / folder, **kwargs)
        engine = Engine(load(path), log_to_stderr=False, control=serve_control,
                        metrics=serve_metrics)
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


@pytest.fixture(autouse=True)
def _stop_fault_scps_a_test_left_running():
    """A FaultSCP a test started and did not stop is stopped by PID when the test ends
    (else it runs, and takes its share of two cores, until the session ends). Those of
    module-scoped fixtures were running before the test: they are left alone."""
    import fault_scp

    before = set(fault_scp._LIVE)
    yield
    for scp in set(fault_scp._LIVE) - before:
        scp.stop()

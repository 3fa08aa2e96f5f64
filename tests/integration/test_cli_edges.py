"""The CLI at the edges of a terminal session: output piped into a reader that leaves
early (`mfconsole status | head`) ends quietly; an attached console names the engine
that answers now, after a restart too."""

from __future__ import annotations

import subprocess
import sys

from harness import write_config


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    config = write_config(tmp_path / "cfg")
    for command in (["status"], ["status", "--json"], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "mfconsole", *command, "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()                     # the reader is gone before a byte is written
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
        assert proc.returncode == 0


def test_an_attached_client_names_the_engine_answering_after_a_restart(serve_factory):
    from mfconsole.client import AttachedClient
    from mfconsole.control import SOCKET_NAME

    serve = serve_factory()
    first = serve.proc.pid
    client = AttachedClient(serve.data_dir / SOCKET_NAME, first)
    assert client.snapshot()["engine"]["pid"] == first and client.description == f"attached to pid {first}"
    serve.stop()
    serve.start()
    assert serve.proc.pid != first
    assert client.snapshot()["engine"]["pid"] == serve.proc.pid
    assert client.description == f"attached to pid {serve.proc.pid}"

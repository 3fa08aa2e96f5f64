"""A real audit record repository's front door for the tests: rsyslogd (with
rsyslog-gnutls) on 127.0.0.1, receiving RFC 5425 syslog over TLS and writing each
message's MSG (the BOM and the DICOM audit XML) as one line of ``out``.

    arr = Rsyslog(tmp_path / "arr", pki).start()
    arr.messages()   # parsed AuditMessage elements, in order received
    arr.stop(); arr.start()   # same port, same file: an ARR outage

rsyslog escapes control characters on receipt (a newline in a value becomes "#012"),
so every message is one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from peers import _missing, free_port, wait_for_port

BOM = "\ufeff"


def rsyslogd() -> str:
    path = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    if path is None:
        _missing("rsyslogd", "rsyslog")
    gtls = [p for p in ("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
                        "/usr/lib/aarch64-linux-gnu/rsyslog/lmnsd_gtls.so") if os.path.exists(p)]
    if not gtls:
        _missing("rsyslog's gtls driver (lmnsd_gtls.so)", "rsyslog-gnutls")
    return path


class Rsyslog:
    def __init__(self, folder: Path, pki: dict[str, Path], *, app_name: str = "mfconsole",
                 tls: bool = True):
        self.folder = folder
        self.port = free_port()
        self.out = folder / "received.log"
        self.proc: subprocess.Popen | None = None
        (folder / "work").mkdir(parents=True, exist_ok=True)
        driver = (f'global(DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{pki["ca.crt"]}"\n'
                  f'       DefaultNetstreamDriverCertFile="{pki["server.crt"]}"\n'
                  f'       DefaultNetstreamDriverKeyFile="{pki["server.key"]}")\n'
                  'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" '
                  'StreamDriver.AuthMode="anon")\n') if tls else 'module(load="imtcp")\n'
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(
            f'global(workDirectory="{folder / "work"}" maxMessageSize="256k")\n' + driver +
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1")\n'
            'template(name="msgonly" type="string" string="%msg%\\n")\n'
            f'if $app-name == "{app_name}" then {{\n'
            f'  action(type="omfile" file="{self.out}" template="msgonly" flushOnTXEnd="on")\n'
            '}\n')

    def start(self) -> "Rsyslog":
        log = open(self.folder / "rsyslogd.stderr", "ab")
        self.proc = subprocess.Popen([rsyslogd(), "-n", "-f", str(self.conf),
                                      "-i", str(self.folder / "rsyslogd.pid")],
                                     stdout=log, stderr=log)
        log.close()
        wait_for_port("127.0.0.1", self.port, timeout=15)
        return self

    def stop(self) -> None:
        """SIGTERM and wait: what it received is in ``out`` when this returns."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def lines(self) -> list[str]:
        if not self.out.exists():
            return []
        text = self.out.read_text(encoding="utf-8")
        return [line for line in text.split("\n") if line.strip()]

    def messages(self) -> list[Any]:
        """Every message received, as lxml elements (the BOM checked and removed)."""
        from lxml import etree

        out = []
        for line in self.lines():
            assert line.startswith(BOM), f"MSG without the UTF-8 BOM: {line[:80]!r}"
            out.append(etree.fromstring(line[len(BOM):].encode("utf-8")))
        return out

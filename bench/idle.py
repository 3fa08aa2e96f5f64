"""What idle TCP connections cost a listener: `mfconsole serve` with each upper layer
(pynetdicom's, mfconsole's own), N connections that never send an A-ASSOCIATE-RQ.

    .venv/bin/python bench/idle.py              # 100 and 1000 idle connections
    .venv/bin/python bench/idle.py --counts 100

For each: the serve process's threads and CPU (utime + stime, /proc/PID/stat) over
5 s with the connections open, and how long an echoscu takes meanwhile.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from harness import ServeProcess, run, write_config  # noqa: E402
from peers import free_port, require_tool  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def measure(layer: str, count: int, scratch: Path) -> dict:
    port = free_port()
    config = write_config(scratch / f"{layer}-{count}", port=port,
                          listener={"upper_layer": layer, "acse_timeout_s": 120})
    serve = ServeProcess(config, port).start()
    idle: list[socket.socket] = []
    try:
        pid = serve.proc.pid
        base = threads(pid)
        for _ in range(count):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(2)   # let the listener take them all
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(5)
        cpu = (cpu_s(pid) - c0) / (time.monotonic() - t0)
        grown = threads(pid) - base
        e0 = time.monotonic()
        res = run([require_tool("echoscu"), "-aet", "BENCH", "-aec", "MF_SCP", "127.0.0.1", str(port)])
        echo = time.monotonic() - e0
        return {"layer": layer, "idle": count, "threads_added": grown, "cpu_cores": round(cpu, 3),
                "echo_s": round(echo, 3), "echo_ok": res.returncode == 0}
    finally:
        for s in idle:
            s.close()
        serve.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="100,1000")
    p.add_argument("--layers", default="pynetdicom,mfconsole")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    scratch = Path(tempfile.mkdtemp(prefix="mfidle-"))
    print(f"{'upper layer':<12} {'idle':>5} {'threads added':>14} {'CPU (cores)':>12} {'echoscu s':>10}")
    for count in (int(c) for c in args.counts.split(",")):
        for layer in args.layers.split(","):
            r = measure(layer, count, scratch)
            print(f"{layer:<12} {count:>5} {r['threads_added']:>14} {r['cpu_cores']:>12.3f} "
                  f"{r['echo_s']:>10.3f}{'' if r['echo_ok'] else '  ECHO FAILED'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

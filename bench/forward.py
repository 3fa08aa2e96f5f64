"""Outbound DIMSE forwarding: objects/s delivering one corpus to DCMTK storescp, mfconsole
beside DCMTK's own dcmsend/storescu (and stock pynetdicom) in the same run, plus what
one association per object costs against one reused association.

    .venv/bin/python bench/forward.py            # full: 1000 SRs, 200 CTs
    .venv/bin/python bench/forward.py --quick    # sanity: 200 SRs, 40 CTs

Receiver, the same for every sender: DCMTK ``storescp --fork`` (one child process per
association, so mfconsole's second association is served, as a PACS would), writing
plain files with unique names to a tmpfs folder (/dev/shm) so the disk is not the
limit and every case is verified by counting the files it wrote. ``--no-fork`` runs
storescp one association at a time instead (for every sender). Every case gets a fresh
storescp; every DCMTK process runs with TCP_NODELAY=1 (the peers at their best, as in
bench/ingest.py).

Senders:

* ``mfconsole xK``: ``mfconsole serve`` with one DIMSE destination (max_associations=K)
  pointing at storescp, sent with mfconsole's own upper layer (mfconsole/ul/sender.py).
  The destination is paused through the engine's control socket (what ``mfconsole
  pause`` does while an engine runs), N-1 objects are ingested (storescu), then the
  clock starts, the destination is resumed the same way (``mfconsole resume``: the
  engine wakes its workers at once) and the last object is sent in over an
  association opened beforehand. The clock stops at the last of the N 'delivered'
  audit rows (the engine's clock; the store is polled every 50 ms only to know when
  they are all in). So this is forwarding only: claim, read + decrypt, C-STORE, record
  outcome (fsynced commits, several outcomes each), plus one small ingest.
* ``dcmsend``, ``storescu``: one process, one association, all N files (storescu -R
  proposes only the contexts the files need). Wall time is the process's lifetime.
* ``... per object``: a new association for every object. mfconsole has no setting for
  that (a worker keeps its association until idle_timeout_s), so its cost is measured
  on mfconsole's own sender (ul/sender.py UlSender) driven directly (no queue, no store;
  objects preloaded in memory), reused vs closed after each object; likewise stock pynetdicom
  (send_c_store(path), TCP_NODELAY set) and storescu started once per file vs once.
  The Python senders run in a child process and time their own send loop (interpreter
  start and imports excluded).

objects/s = objects / wall time; "vs dcmsend" divides by dcmsend's objects/s for the
same corpus in the same run. sender CPU ms/obj: utime+stime of the sending process (all
threads: the whole serve process for mfconsole); receiver CPU ms/obj: storescp and its
children. other CPU: CPU used meanwhile by processes outside the benchmark, % of all
cores (as in bench/ingest.py).

Results go to stdout and to bench/results/forward-<time>.json; the exit status is 0
whenever the benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import ingest  # noqa: E402  (also puts tests/ on sys.path)
from ingest import (CLK_TCK, SENDER_TIMEOUT_S, busy_cpu_seconds, cpu_seconds, dcmtk_env,  # noqa: E402
                    kernel_thread_cpu_seconds, own_cpu_seconds, save_results)

import dicomgen  # noqa: E402
from harness import delivery_states, write_config  # noqa: E402
from peers import LOOPBACK, StoreSCP, free_port, require_tool  # noqa: E402

from mfconsole.repository import Reads, connect, db_path  # noqa: E402

SCP_AET = "STORESCP"
MF_AET = "MF_SCP"
DEST = "pacs"
DELIVERY_TIMEOUT_S = 600
# The store is polled only to know when a run is over: its time ends at the last
# 'delivered' audit row (the engine's clock, stamped as the outcome is committed).
# Polling every millisecond near the end, as this bench once did to time the run, took
# CPU from the two cores the engine and storescp share: 1.03x -> 1.07x dcmsend, paired
# medians over 27 turns each, the same code.
POLL_S = 0.05
STALL_GAP_S = 1.0          # a gap this long between two completed objects is a stall

MF_CASES = ("mfconsole x1", "mfconsole x2")
REUSE_PAIRS = (   # (one association for all, one association per object)
    ("storescu", "storescu per object"),
    ("mfconsole sender", "mfconsole sender per object"),
    ("pynetdicom", "pynetdicom per object"),
)
CASES = ("dcmsend", "storescu", *MF_CASES, "mfconsole sender", "pynetdicom",
         "storescu per object", "mfconsole sender per object", "pynetdicom per object")
BASELINE = "dcmsend"


# ---------------------------------------------------------------------------
# the receiver: storescp (optionally --fork), its CPU including its children


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:     # field 4: ppid
            kids.append(int(stat.parent.name))
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of pid, of its reaped children (cutime+cstime) and of its live or
    zombie children: storescp --fork's per-association processes included."""
    f = _stat_fields(pid)
    total = sum(int(v) for v in f[11:15])
    for kid in children_of(pid):
        try:
            total += sum(int(v) for v in _stat_fields(kid)[11:13])
        except (OSError, IndexError):
            pass
    return total / CLK_TCK


class ForwardSCP(StoreSCP):
    """tests/peers.StoreSCP without -v, optionally with --fork, TCP_NODELAY=1."""

    def __init__(self, output_dir: Path, fork: bool):
        super().__init__(output_dir, ae_title=SCP_AET)
        self.fork = fork

    def _command(self) -> list[str]:
        cmd = [c for c in super()._command() if c != "-v"]
        return cmd[:-1] + (["--fork"] if self.fork else []) + cmd[-1:]

    @staticmethod
    def flags(fork: bool) -> str:
        return "storescp -dhl +xa +uf -od <tmpfs>" + (" --fork" if fork else "") + \
            " (TCP_NODELAY=1, max PDU 16 KiB)"

    def start(self, timeout: float = 10.0) -> "ForwardSCP":
        with ingest._NodelayEnv(True):
            super().start(timeout)
        self.settle()    # the readiness probe made (with --fork) a short-lived child
        return self

    def settle(self, timeout: float = 30.0) -> list[int]:
        """Wait until storescp has no child left (every association ended); returns
        the PIDs still there after timeout (killed: they are ours, one association each)."""
        deadline = time.monotonic() + timeout
        while self.pid is not None:
            kids = [k for k in children_of(self.pid) if not _is_zombie(k)]
            if not kids:
                return []
            if time.monotonic() > deadline:
                for kid in kids:
                    try:
                        os.kill(kid, 9)
                    except OSError:
                        pass
                return kids
            time.sleep(0.02)
        return []

    def count(self) -> int:
        return sum(1 for p in self.output_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_zombie(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------
# mfconsole serve with one DIMSE destination


class ForwardEngine(ingest._PopenReceiver):
    name = "mfconsole"
    ae_title = MF_AET
    ready_text = "mfconsole: listener"

    def __init__(self, workdir: Path, dest_port: int, max_associations: int):
        super().__init__(workdir)
        self.port = free_port()
        self.config = write_config(workdir, port=self.port, ae_title=MF_AET, destinations=[{
            "name": DEST, "kind": "dimse", "host": LOOPBACK, "port": dest_port,
            "ae_title": SCP_AET, "calling_ae_title": "MF_SCU",
            "max_associations": max_associations}])
        self.data_dir = workdir / "var"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mfconsole", "--config", str(self.config), "serve"]

    def db(self) -> Reads:
        """A read-only ``Reads`` on the database (close with ``.conn.close()``)."""
        return Reads(connect(db_path(self.data_dir), readonly=True))


# ---------------------------------------------------------------------------
# results


@dataclass
class Result:
    case: str
    corpus: str
    objects: int
    associations: str           # "1", "per object", "1-2 (workers)"
    seconds: float
    objects_per_s: float
    sender_cpu_ms_per_object: float | None
    receiver_cpu_ms_per_object: float
    received: int
    other_cpu_pct: float
    stalled_s: float | None = None   # sum of gaps > STALL_GAP_S between completions (None: not seen)
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    repeats: list[float] = field(default_factory=list)


@dataclass
class Ctx:
    """What every case needs: the corpus, where to put scratch files, the receiver mode."""
    corpus: str
    files: list[Path]           # all N files, one folder
    folder: Path
    preload: Path               # N-1 of them (hard links), for mfconsole
    kick: Path                  # the last one: sent into mfconsole after the resume
    scratch: Path
    shm: Path
    fork: bool


class Window:
    """Wall and CPU readings around a transfer, for 'other CPU'."""

    def __init__(self, scp: ForwardSCP, extra_pids: tuple[int, ...] = ()):
        self.scp, self.extra_pids = scp, extra_pids

    def __enter__(self) -> "Window":
        self.k0 = kernel_thread_cpu_seconds()
        self.recv0 = tree_cpu_seconds(self.scp.pid)
        self.extra0 = sum(cpu_seconds(p) for p in self.extra_pids)
        self.busy0, self.own0, self.t0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *_: Any) -> None:
        self.busy1, self.own1, self.t1 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        self.extra1 = sum(cpu_seconds(p) for p in self.extra_pids)
        self.recv1 = tree_cpu_seconds(self.scp.pid)
        self.k1 = kernel_thread_cpu_seconds()

    @property
    def receiver_cpu(self) -> float:
        return self.recv1 - self.recv0

    @property
    def extra_cpu(self) -> float:
        return self.extra1 - self.extra0

    @property
    def other_pct(self) -> float:
        cores_s = (self.t1 - self.t0) * (os.cpu_count() or 1)
        ours = self.receiver_cpu + self.extra_cpu + (self.own1 - self.own0) + (self.k1 - self.k0)
        return round(100 * max(0.0, (self.busy1 - self.busy0) - ours) / cores_s, 1)


def children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------
# senders


def dcmtk_sender_cmds(case: str, ctx: Ctx, port: int) -> list[list[str]]:
    if case == "dcmsend":
        return [[require_tool("dcmsend"), "-aet", "BENCH", "-aec", SCP_AET, "-ma", "+sd",
                 LOOPBACK, str(port), str(ctx.folder)]]
    base = [require_tool("storescu"), "-aet", "BENCH", "-aec", SCP_AET, "-R"]
    if case == "storescu":
        return [base + ["+sd", LOOPBACK, str(port), str(ctx.folder)]]
    assert case == "storescu per object"
    return [base + [LOOPBACK, str(port), str(path)] for path in ctx.files]


def run_dcmtk(cmds: list[list[str]]) -> tuple[float, float, list[str]]:
    """Run the commands one after the other; wall seconds, their CPU seconds, problems."""
    env = dcmtk_env(True)
    problems: list[str] = []
    deadline = time.monotonic() + SENDER_TIMEOUT_S
    cpu0 = children_cpu()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        for cmd in cmds:
            out.seek(0)
            out.truncate()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
            if ingest.wait_or_kill(proc, max(1, deadline - time.monotonic())):
                problems.append(f"{Path(cmd[0]).name} killed after {SENDER_TIMEOUT_S} s")
                break
            rc = proc.returncode
            out.seek(0)
            bad = [ln for ln in out.read().decode(errors="replace").splitlines()
                   if ln.startswith(("E:", "F:"))]
            if rc or bad:
                problems.append(f"{Path(cmd[0]).name} rc={rc}: " + " | ".join(bad[:3]))
                if len(problems) > 3:
                    break
    elapsed = time.perf_counter() - t0
    return elapsed, children_cpu() - cpu0, problems


def run_python_sender(mode: str, ctx: Ctx, port: int, per_object: bool
                      ) -> tuple[float, float, float, list[str]]:
    """bench/forward.py _send ... in a child process; it times its own send loop."""
    listing = ctx.scratch / f"files-{ctx.corpus}.txt"
    listing.write_text("\n".join(map(str, ctx.files)) + "\n")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_send", mode, str(port),
           "--files", str(listing)] + (["--per-object"] if per_object else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SENDER_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} sender rc={proc.returncode}: {proc.stderr[-1500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stolen = proc.stderr.count("Received unexpected C-STORE service message")
    if stolen:   # pynetdicom 3.0.4's reactor can take a C-STORE response meant for the
        # sender (its pause handshake is racy): the sender then waits and fails that object
        out["failures"].append(f"{stolen} C-STORE response(s) taken by pynetdicom's reactor")
    return out["seconds"], out["cpu_s"], out["stalled_s"], out["failures"]


def run_sender_case(case: str, ctx: Ctx) -> Result:
    scp = ForwardSCP(Path(tempfile.mkdtemp(prefix="scp-", dir=ctx.shm)) / "received", ctx.fork)
    try:
        scp.start()
        time.sleep(0.2)
        with Window(scp) as w:
            stalled = None
            if case in ("dcmsend", "storescu", "storescu per object"):
                elapsed, cpu, problems = run_dcmtk(dcmtk_sender_cmds(case, ctx, scp.port))
            else:
                mode = "pynetdicom" if case.startswith("pynetdicom") else "mfsender"
                elapsed, cpu, stalled, problems = run_python_sender(
                    mode, ctx, scp.port, per_object=case.endswith("per object"))
            left = scp.settle()
        received = scp.count()
    finally:
        scp.stop()
        shutil.rmtree(scp.output_dir.parent, ignore_errors=True)
    n = len(ctx.files)
    if left:
        problems.append(f"storescp children still running after the case: killed {left}")
    if received != n:
        problems.append(f"storescp wrote {received} of {n} objects")
    return Result(case, ctx.corpus, n, "per object" if case.endswith("per object") else "1",
                  elapsed, n / elapsed, cpu / n * 1000, w.receiver_cpu / n * 1000, received,
                  w.other_pct, stalled, problems)


def run_mfconsole_case(case: str, ctx: Ctx, live: list[Any]) -> Result:
    from pynetdicom import AE
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian

    from mfconsole.client import engine_socket
    from mfconsole.config import load
    from mfconsole.control import request

    k = int(case.rpartition("x")[2])
    n = len(ctx.files)
    problems: list[str] = []
    scp = ForwardSCP(Path(tempfile.mkdtemp(prefix="scp-", dir=ctx.shm)) / "received", ctx.fork)
    workdir = Path(tempfile.mkdtemp(prefix="mf-", dir=ctx.scratch))    # on disk, as in production
    engine = ForwardEngine(workdir, scp.port, k)
    assoc = None
    try:
        scp.start()
        live.append(engine)
        engine.start()
        config = load(engine.config)
        served = engine_socket(config)
        if served is None:
            raise RuntimeError("mfconsole serve offers no control socket")
        control = served[1]
        request(control, "pause", {"destination": DEST})
        # Pre-load N-1 objects (one storescu, TCP_NODELAY=1) while the destination is paused.
        _, _, pre = run_dcmtk([[require_tool("storescu"), "-aet", "BENCH", "-aec", MF_AET, "-R",
                                "+sd", LOOPBACK, str(engine.port), str(ctx.preload)]])
        if pre:
            raise RuntimeError(f"pre-load into mfconsole failed: {pre}")
        conn = engine.db()
        queued = delivery_states(conn)
        if queued.get("pending") != n - 1 or scp.count():
            raise RuntimeError(f"pre-load left {queued} (expected {n - 1} pending) and "
                               f"{scp.count()} file(s) at storescp")
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(str(dcmread(ctx.kick, stop_before_pixels=True).SOPClassUID),
                                 ExplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, engine.port, ae_title=MF_AET)
        if not assoc.is_established:
            raise RuntimeError("cannot associate with mfconsole for the last object")
        time.sleep(0.5)    # let the workers settle into their paused poll
        states: dict[str, int] = {}
        with Window(scp, (engine.pid,)) as w:
            wall0 = time.time()
            t0 = time.perf_counter()
            request(control, "resume", {"destination": DEST})
            status = assoc.send_c_store(ctx.kick)
            assoc.release()
            assoc = None
            deadline = time.monotonic() + DELIVERY_TIMEOUT_S
            while True:
                states = delivery_states(conn)
                if states.get("delivered", 0) >= n or states.get("dead") or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            elapsed = time.perf_counter() - t0   # (when not all were delivered)
        if not status or status.Status != 0:
            problems.append(f"last object not accepted by mfconsole: {status}")
        if states.get("delivered", 0) != n:
            problems.append(f"deliveries after {elapsed:.0f} s: {states}")
        delivered_at = sorted(r["ts"] for r in conn.rows("audit", event="delivered"))
        if len(delivered_at) == n:
            elapsed = delivered_at[-1] - wall0
        first = delivered_at[0] if delivered_at else None
        retries = [r["detail"] for r in conn.rows("audit", event="retry_scheduled")]
        conn.conn.close()
        if retries:
            problems.append(f"{len(retries)} retried: {retries[0]}")
        # The workers keep their association up to idle_timeout_s: stop the engine (it
        # releases them) before waiting for storescp's children to end.
        engine.stop()
        left = scp.settle()
        if left:
            problems.append(f"storescp children still running after the case: killed {left}")
        received = scp.count()
    finally:
        if assoc is not None:
            assoc.abort()
        engine.stop()
        if engine in live:
            live.remove(engine)
        scp.stop()
        shutil.rmtree(scp.output_dir.parent, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    if received != n:
        problems.append(f"storescp wrote {received} of {n} objects")
    extra = {"first_delivery_after_s": round(first - wall0, 4) if first else None,
             "max_associations": k, "retries": len(retries)}
    return Result(case, ctx.corpus, n, "1" if k == 1 else f"1-{k} (workers)", elapsed, n / elapsed,
                  w.extra_cpu / n * 1000, w.receiver_cpu / n * 1000, received, w.other_pct,
                  stalls([wall0] + delivered_at), problems, extra)


def run_case(case: str, ctx: Ctx, live: list[Any]) -> Result:
    if case in MF_CASES:
        return run_mfconsole_case(case, ctx, live)
    return run_sender_case(case, ctx)


# ---------------------------------------------------------------------------
# the Python senders (child process: `forward.py _send MODE PORT --files LIST`)


def _nodelay_pynetdicom() -> None:
    """TCP_NODELAY on pynetdicom's requestor sockets (stock pynetdicom leaves Nagle on,
    and every object would wait for storescp's delayed ACK)."""
    import socket

    from pynetdicom import transport

    original = transport.AssociationSocket._create_socket

    def create(self: Any, address: Any) -> socket.socket:
        sock = original(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    transport.AssociationSocket._create_socket = create


def _send_pynetdicom(port: int, files: list[Path], per_object: bool) -> tuple[float, float, float, list[str]]:
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    _nodelay_pynetdicom()
    ae = AE(ae_title="BENCH")
    for sop_class in dict.fromkeys(str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    failures: list[str] = []
    done: list[float] = []

    def loop() -> None:
        assoc = None
        for path in files:
            if assoc is None:
                assoc = ae.associate(LOOPBACK, port, ae_title=SCP_AET)
                if not assoc.is_established:
                    failures.append("association not established")
                    return
            status = assoc.send_c_store(path)
            done.append(time.perf_counter())
            if not status or status.Status != 0:
                failures.append(f"{path.name}: status {getattr(status, 'Status', None)}")
                if len(failures) > 3:
                    break
            if per_object:
                assoc.release()
                assoc = None
        if assoc is not None:
            assoc.release()

    return (*_timed(loop, done), failures)


def _send_mfsender(port: int, files: list[Path], per_object: bool) -> tuple[float, float, float, list[str]]:
    from pydicom import config as pydicom_config
    from pydicom import dcmread

    from mfconsole import egress
    from mfconsole.contract import Outbound
    from mfconsole.dimse.sender import Peer
    from mfconsole.ul.sender import UlSender

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE   # as the engine
    objects = []
    for path in files:   # in memory before the clock starts: the sender alone
        data, ts = dicomgen.dataset_bytes(path)
        ds = dcmread(path, stop_before_pixels=True)
        objects.append(Outbound(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, data))
    sender = UlSender(Peer(LOOPBACK, port, SCP_AET, calling_ae="MF_SCU"), egress.unchecked)
    failures: list[str] = []
    done: list[float] = []

    def loop() -> None:
        for obj in objects:
            outcome, = sender.send_many([obj])
            done.append(time.perf_counter())
            if not outcome.is_success:
                failures.append(f"{obj.sop_instance_uid}: {outcome.label}: {outcome.reason}")
                if len(failures) > 3:
                    break
            if per_object:
                sender.close()
        sender.close()

    return (*_timed(loop, done), failures)


def _timed(fn: Callable[[], None], done: list[float]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds, and stalled seconds (``done``: completion times)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return elapsed, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), stalls([t0] + done)


def stalls(times: list[float]) -> float:
    return sum(g for g in (b - a for a, b in zip(times, times[1:])) if g > STALL_GAP_S)


def send_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="forward.py _send", description="internal: one Python sender")
    p.add_argument("mode", choices=("pynetdicom", "mfsender"))
    p.add_argument("port", type=int)
    p.add_argument("--files", type=Path, required=True, help="a text file, one path per line")
    p.add_argument("--per-object", action="store_true", help="a new association per object")
    a = p.parse_args(argv)
    files = [Path(x) for x in a.files.read_text().splitlines() if x]
    fn = _send_pynetdicom if a.mode == "pynetdicom" else _send_mfsender
    seconds, cpu_s, stalled_s, failures = fn(a.port, files, a.per_object)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu_s, "stalled_s": stalled_s, "failures": failures}))
    return 0


# ---------------------------------------------------------------------------
# report


def print_table(results: list[Result]) -> None:
    base = {r.corpus: r.objects_per_s for r in results if r.case == BASELINE}
    head = (f"{'case':<28} {'corpus':<6} {'assocs':<13} {'objects':>7} {'seconds':>8} "
            f"{'objects/s':>9} {'vs dcmsend':>10} {'snd CPU ms/obj':>14} {'rcv CPU ms/obj':>14} "
            f"{'other CPU':>9}  check")
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = f"{r.objects_per_s / base[r.corpus]:.2f}" if r.corpus in base else "-"
        snd = f"{r.sender_cpu_ms_per_object:.2f}" if r.sender_cpu_ms_per_object is not None else "-"
        check = "ok" if not r.problems else "; ".join(r.problems)[:90]
        print(f"{r.case:<28} {r.corpus:<6} {r.associations:<13} {r.objects:>7} {r.seconds:>8.2f} "
              f"{r.objects_per_s:>9.1f} {ratio:>10} {snd:>14} {r.receiver_cpu_ms_per_object:>14.2f} "
              f"{r.other_cpu_pct:>8.0f}%  {check}")
    paired = [r for r in results if "paired_vs_dcmsend" in r.extra]
    if paired and any(len(r.extra["paired_vs_dcmsend"]["each"]) > 1 for r in paired):
        print("\nvs dcmsend, paired: each repeat over the dcmsend run of the same turn, median (min-max):")
        for r in paired:
            paired_ratio = r.extra["paired_vs_dcmsend"]
            each = paired_ratio["each"]
            print(f"  {r.case:<28} {r.corpus:<3} {paired_ratio['median']:6.2f}  ({min(each):.2f}-{max(each):.2f}, "
                  f"{sum(x >= 1 for x in each)} of {len(each)} at 1.00 or more)")
    stalled = [r for r in results if r.stalled_s]
    if stalled:
        print(f"\nstalls (gaps > {STALL_GAP_S:g} s between two completed objects), and the rate without them:")
        for r in stalled:
            rest = r.seconds - r.stalled_s
            print(f"  {r.case:<28} {r.corpus:<3} {r.stalled_s:6.1f} s stalled; "
                  f"{r.objects / rest if rest > 0 else float('nan'):8.1f} objects/s over the other {rest:.2f} s")
    if results:
        mean_other = statistics.mean(r.other_cpu_pct for r in results)
        noisy = [r for r in results if r.other_cpu_pct > 10]
        print(f"\nother CPU = CPU used by processes outside the benchmark during the case "
              f"(kernel threads excluded), % of all {os.cpu_count()} cores (mean {mean_other:.0f}%).")
        if noisy:
            print(f"WARNING: {len(noisy)} case(s) shared the machine with > 10% foreign load; "
                  f"their objects/s are low by roughly that much. Re-run, or use --repeat 3.")


def association_costs(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.case, r.corpus): r for r in results}
    rows = []
    for corpus in dict.fromkeys(r.corpus for r in results):
        for reuse, per in REUSE_PAIRS:
            a, b = by.get((reuse, corpus)), by.get((per, corpus))
            if a is None or b is None:
                continue
            rows.append({"corpus": corpus, "sender": reuse,
                         "reuse_objects_per_s": a.objects_per_s, "per_object_objects_per_s": b.objects_per_s,
                         "reuse_over_per_object": a.objects_per_s / b.objects_per_s,
                         "ms_per_association": (b.seconds - a.seconds) / b.objects * 1000})
        x1, x2 = by.get(("mfconsole x1", corpus)), by.get(("mfconsole x2", corpus))
        if x1 is not None and x2 is not None:
            rows.append({"corpus": corpus, "sender": "mfconsole x2 / x1",
                         "x2_over_x1": x2.objects_per_s / x1.objects_per_s})
    return rows


def print_costs(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\none association for all objects vs a new association per object (same receiver):")
    for row in rows:
        if "x2_over_x1" in row:
            print(f"  {row['corpus']:<3} mfconsole max_associations=2 / =1: {row['x2_over_x1']:.2f}x")
            continue
        print(f"  {row['corpus']:<3} {row['sender']:<18} reuse {row['reuse_objects_per_s']:8.1f}/s, "
              f"per object {row['per_object_objects_per_s']:8.1f}/s: reuse is "
              f"{row['reuse_over_per_object']:.2f}x; {row['ms_per_association']:.2f} ms per extra association")
    print("  (mfconsole has no per-object-association setting: the engine keeps one association per "
          "worker until idle_timeout_s; 'mfconsole sender' is its UlSender driven directly)")


# ---------------------------------------------------------------------------


def build_corpus(root: Path, kind: str, count: int, **kw: Any) -> tuple[Path, list[Path], Path, Path]:
    """count objects in root/all; root/preload hard-links all but the last (the kick)."""
    files = dicomgen.write_corpus(root / "all", count, kind=kind, **kw)
    preload = root / "preload"
    preload.mkdir()
    for path in files[:-1]:
        os.link(path, preload / path.name)
    return root / "all", files, preload, files[-1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_send"]:
        return send_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 SRs, 40 CTs")
    p.add_argument("--sr", type=int, help="number of SR objects (default 1000; --quick 200)")
    p.add_argument("--ct", type=int, help="number of CT objects (default 200; --quick 40)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per case, fresh receiver each, the cases taken in turn; the median is "
                        "reported (default 1)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated subset of: {','.join(CASES)}")
    p.add_argument("--no-fork", action="store_true",
                   help="storescp without --fork (one association at a time), for every sender")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = p.parse_args(argv)

    n_sr = args.sr if args.sr is not None else (200 if args.quick else 1000)
    n_ct = args.ct if args.ct is not None else (40 if args.quick else 200)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = set(names) - set(CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    names = [c for c in CASES if c in names]    # baseline first
    for tool in ("storescu", "storescp", "dcmsend"):
        require_tool(tool)
    fork = not args.no_fork

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfbench-fwd-"))
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else scratch
    shm = Path(tempfile.mkdtemp(prefix="mfbench-fwd-", dir=shm_root))
    live: list[Any] = []
    results: list[Result] = []
    failures: list[str] = []
    interrupted = False
    try:
        t = time.perf_counter()
        ctxs = []
        for corpus, kind, count, kw in (("SR", "sr", n_sr, {}), ("CT", "ct", n_ct, {"pixel_bytes": 512 * 512 * 2})):
            if count < 2:
                continue
            folder, files, preload, kick = build_corpus(scratch / kind, kind, count, **kw)
            ctxs.append(Ctx(corpus, files, folder, preload, kick, scratch, shm, fork))
            size = sum(f.stat().st_size for f in files) / count / 1024
            print(f"corpus {corpus}: {count} objects, {size:.1f} KiB each", flush=True)
        print(f"built in {time.perf_counter() - t:.1f} s; receiver: {ForwardSCP.flags(fork)}", flush=True)
        for ctx in ctxs:
            runs = ingest.take_turns(names, args.repeat, lambda case: run_case(case, ctx, live),
                                     failures, ctx.corpus)
            paired = ingest.paired_ratios(runs, BASELINE)
            for case, done in runs.items():
                r = ingest.median_run(done)
                if case in paired:
                    r.extra["paired_vs_dcmsend"] = paired[case]
                results.append(r)
                snd = (f"{r.sender_cpu_ms_per_object:6.2f}" if r.sender_cpu_ms_per_object is not None
                       else "     -")
                print(f"  {case:<28} {ctx.corpus}  {r.objects_per_s:8.1f} objects/s  {r.seconds:7.2f} s  "
                      f"sender {snd} CPU ms/obj  other CPU {r.other_cpu_pct:.0f}%"
                      f"{'  ' + '; '.join(r.problems) if r.problems else ''}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping processes", file=sys.stderr)
    finally:
        for proc in list(live):
            try:
                proc.stop()
            except Exception as exc:
                print(f"could not stop {proc.name}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"scratch kept: {scratch} {shm}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)

    print(f"\n== bench/forward.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{os.cpu_count()} CPU(s), loopback ==")
    print(f"receiver for every case: {ForwardSCP.flags(fork)}, fresh per case")
    print("objects/s = objects / wall time (mfconsole: resume -> the last 'delivered' audit row, queue "
          "pre-loaded while paused; DCMTK: process lifetime; Python senders: their send loop)\n")
    print_table(results)
    costs = association_costs(results)
    print_costs(costs)
    for failure in failures:
        print(f"FAILED: {failure}")
    total = time.time() - started
    print(f"\ntotal run time {total:.0f} s")

    save_results("forward", ["dcmsend", "storescu", "storescp"], {
        "started": started, "seconds": total, "quick": args.quick, "repeat": args.repeat,
        "interrupted": interrupted,
        "corpus": {"sr": n_sr, "ct": n_ct, "ct_pixel_bytes": 512 * 512 * 2},
        "receiver": ForwardSCP.flags(fork),
        "results": [asdict(r) for r in results],
        "association_costs": costs, "failures": failures,
    })
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

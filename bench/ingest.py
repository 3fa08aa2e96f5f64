"""Ingest throughput, CPU and memory: mfconsole beside DCMTK storescp, Orthanc and a
bare pynetdicom SCP, all measured in the same run on the same corpus.

    .venv/bin/python bench/ingest.py            # full: 1000 SRs, 200 CTs, 10 + 200 MiB
    .venv/bin/python bench/ingest.py --quick    # sanity: 200 SRs, 40 CTs, 10 MiB only

Every case gets a fresh receiver process with a fresh temporary directory (so no
receiver ever sees a duplicate SOP Instance UID). Senders are DCMTK ``storescu``
processes, one association each; with 4 senders the corpus is split in 4 folders and
the 4 processes run concurrently. Wall time runs from the first sender's start until
the last one exits; objects/s = objects / wall time. The receiver's CPU time (utime +
stime of all its threads, /proc/PID/stat) and its peak RSS (VmHWM, reset just before
the senders start where the kernel allows) are read around the transfer.

Receivers run with their default settings (PDU sizes, socket options). DCMTK (>= 3.6.2)
leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment, and that holds
for storescu *and* for the DCMTK-based receivers (storescp, Orthanc): with Nagle on at
either end every object waits for a delayed ACK (~40 ms). So in the normal cases every
DCMTK process (senders, storescp, Orthanc) gets TCP_NODELAY=1 — the peers at their
best. The "nagle on" case (4 senders, SR, at most 400 objects) runs every DCMTK process
stock, which is how many real modalities send. pynetdicom ignores the variable: the
bare SCP always runs with pynetdicom's sockets (Nagle on), mfconsole with its own
(TCP_NODELAY + TCP_QUICKACK).

Results go to stdout (a table and ratios) and to bench/results/ingest-<time>.json.
The PASS/MISS lines are informational; the exit status is 0 whenever the benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

import dicomgen  # noqa: E402
import httpx  # noqa: E402
from harness import CANARY_NAME, write_config  # noqa: E402
from peers import LOOPBACK, Orthanc, StoreSCP, _pdeathsig_prefix, free_port, require_tool  # noqa: E402

from mfconsole.repository import db_path, reading  # noqa: E402

MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
SENDER_TIMEOUT_S = 600
NAGLE_CAP = 400            # objects in the Nagle-on case (stock DCMTK peers: ~11/s)
TRIGGER = "instance"     # --trigger: the mfconsole destination's
RECEIVERS = ("mfconsole", "orthanc", "orthanc-stock", "bare-pynetdicom", "storescp")
PEERS = RECEIVERS[1:]


# ---------------------------------------------------------------------------
# /proc readings


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    return sum(cpu_times(pid))


def busy_cpu_seconds() -> float:
    """CPU seconds all processors spent busy since boot (/proc/stat), all processes."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


PF_KTHREAD = 0x00200000


def kernel_thread_cpu_seconds() -> float:
    """CPU seconds of kernel threads (jbd2 journal commits, kworkers, ksoftirqd): work
    the kernel does on behalf of whoever fsyncs or sends, so not foreign load."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[6]) & PF_KTHREAD:   # field 9: flags
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def own_cpu_seconds() -> float:
    """This process plus its reaped children (the storescu senders)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# receivers: each knows how to start, how to be counted and how to stop


class Receiver:
    name = "?"
    ae_title = "?"
    port = 0
    notes = ""

    def __init__(self, workdir: Path):
        self.workdir = workdir

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self, nodelay: bool) -> None:
        """nodelay: TCP_NODELAY=1 in the receiver's environment (DCMTK honours it)."""
        raise NotImplementedError

    def count(self) -> int | None:
        """Objects the receiver holds (None: it stores nothing, cannot be verified)."""
        return None

    def stop(self) -> None:
        raise NotImplementedError


class _PopenReceiver(Receiver):
    """A receiver we spawn ourselves (with pdeathsig so it cannot outlive us)."""

    ready_text = ""

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, nodelay: bool = True) -> None:
        self._log = open(self.log_path, "ab")
        env = dcmtk_env(nodelay, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(_pdeathsig_prefix() + self.command(), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log, env=env, cwd=self.workdir)
        deadline = time.monotonic() + 30
        # Wait for the process to say it listens (no probe connection to pollute logs).
        while self.ready_text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after 30 s")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


class MfconsoleReceiver(_PopenReceiver):
    name = "mfconsole"
    ae_title = "MF_SCP"
    ready_text = "mfconsole: listener"
    notes = "one unreachable destination (queued rows); max PDU 256 KiB (default); TCP_NODELAY + QUICKACK"

    def __init__(self, workdir: Path, max_object_mb: int = 1024):
        super().__init__(workdir)
        self.port = free_port()
        # One unreachable DIMSE destination: every object gets a queued delivery row,
        # as in production, but nothing is ever sent during the benchmark.
        # --trigger study_stable: that destination holds every study (a quiet period of a
        # day), so each object also costs its hold upsert (engine/holds.py).
        held = ({"trigger": "study_stable", "stable_after_s": 86400} if TRIGGER == "study_stable"
                else {})
        self.config = write_config(workdir, port=self.port, ae_title=self.ae_title,
                                   store={"max_object_mb": max_object_mb},
                                   destinations=[{"name": "pacs", "kind": "dimse", "host": "127.0.0.1",
                                                  "port": 1, "ae_title": "PACS", **held}])
        self.data_dir = workdir / "var"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mfconsole", "--config", str(self.config), "serve"]

    def count(self) -> int:
        with reading(db_path(self.data_dir)) as reads:
            return reads.object_count()


class BareReceiver(_PopenReceiver):
    name = "bare-pynetdicom"
    ae_title = "BARE"
    ready_text = "bare_scp: listening"
    notes = "stock pynetdicom: max PDU 16 KiB, Nagle on, stores nothing"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.port = free_port()

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH / "bare_scp.py"), str(self.port),
                "--ae-title", self.ae_title]


class _QuietStoreSCP(StoreSCP):
    """tests/peers.StoreSCP without -v: no log line per object."""

    def _command(self) -> list[str]:
        return [c for c in super()._command() if c != "-v"]


class _NodelayEnv:
    """Start a DCMTK-based peer (it inherits os.environ) with or without TCP_NODELAY=1."""

    def __init__(self, nodelay: bool):
        self.nodelay = nodelay

    def __enter__(self) -> None:
        self.saved = os.environ.pop("TCP_NODELAY", None)
        if self.nodelay:
            os.environ["TCP_NODELAY"] = "1"

    def __exit__(self, *_: Any) -> None:
        os.environ.pop("TCP_NODELAY", None)
        if self.saved is not None:
            os.environ["TCP_NODELAY"] = self.saved


def dcmtk_env(nodelay: bool, **extra: str) -> dict[str, str]:
    """DCMTK >= 3.6.2 leaves Nagle on unless TCP_NODELAY=1 is in the environment."""
    env = dict(os.environ, **extra)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


class _PeerReceiver(Receiver):
    """A receiver run by one of tests/peers.py's peers (``self.peer``)."""
    peer: Any

    @property
    def pid(self) -> int:
        assert self.peer.pid is not None
        return self.peer.pid

    def start(self, nodelay: bool = True) -> None:
        with _NodelayEnv(nodelay):
            self.peer.start()


class StorescpReceiver(_PeerReceiver):
    name = "storescp"
    ae_title = "STORESCP"
    notes = "-od dir +uf, no fsync, max PDU 16 KiB"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.peer = _QuietStoreSCP(workdir / "received", ae_title=self.ae_title)
        self.port = self.peer.port

    def count(self) -> int:
        return len(self.peer.received_files())

    def stop(self) -> None:
        self.peer.stop()


class OrthancReceiver(_PeerReceiver):
    name = "orthanc"
    ae_title = "ORTHANC"
    notes = "Orthanc 1.10 defaults (fsync storage, SQLite index), DICOMweb plugin loaded"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.peer = Orthanc(workdir / "orthanc", ae_title=self.ae_title)
        self.port = self.peer.dicom_port

    def count(self) -> int:
        with httpx.Client(trust_env=False, timeout=30) as c:
            r = c.get(f"{self.peer.base_url}/statistics")
            r.raise_for_status()
            return int(r.json()["CountInstances"])

    def stop(self) -> None:
        self.peer.stop()


class OrthancStockReceiver(OrthancReceiver):
    """Orthanc exactly as Debian runs it: no TCP_NODELAY in its environment (DCMTK's
    default, Nagle on), whatever the senders do. The "orthanc" receiver is Orthanc at
    its best (TCP_NODELAY=1, like the senders in the nagle-off cases)."""
    name = "orthanc-stock"
    notes = "as orthanc, but without TCP_NODELAY=1 in its environment (as installed)"

    def start(self, nodelay: bool = True) -> None:
        super().start(nodelay=False)


FACTORIES = {
    "mfconsole": MfconsoleReceiver,
    "orthanc": OrthancReceiver,
    "orthanc-stock": OrthancStockReceiver,
    "bare-pynetdicom": BareReceiver,
    "storescp": StorescpReceiver,
}


# ---------------------------------------------------------------------------
# senders


def storescu_cmd(receiver: Receiver, folder: Path) -> list[str]:
    return [require_tool("storescu"), "-aet", "BENCH", "-aec", receiver.ae_title,
            "+sd", "+r", LOOPBACK, str(receiver.port), str(folder)]


def wait_or_kill(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait for ``proc`` with a blocking wait, killing it after ``seconds``; True when
    it was killed. (subprocess's own timeout polls the child with sleeps of up to
    50 ms: 0 to 50 ms added to a run that takes a few tenths of a second.)"""
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    killer = threading.Timer(max(0.0, seconds), kill)
    killer.start()
    try:
        proc.wait()
    finally:
        killer.cancel()
    return killed.is_set()


def send(receiver: Receiver, folders: list[Path], *, nodelay: bool) -> tuple[float, list[str]]:
    """Run one storescu per folder concurrently; return wall seconds and problems."""
    env = dcmtk_env(nodelay)
    procs: list[tuple[subprocess.Popen, Any]] = []
    problems: list[str] = []
    t0 = time.perf_counter()
    try:
        for folder in folders:
            err = tempfile.TemporaryFile()
            procs.append((subprocess.Popen(_pdeathsig_prefix() + storescu_cmd(receiver, folder),
                                           stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                           env=env), err))
        deadline = time.monotonic() + SENDER_TIMEOUT_S
        killed = [proc.pid for proc, _ in procs
                  if wait_or_kill(proc, max(1, deadline - time.monotonic()))]
        elapsed = time.perf_counter() - t0
        problems += [f"storescu {pid} killed after {SENDER_TIMEOUT_S} s" for pid in killed]
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                problems.append(f"storescu {proc.pid} killed after {SENDER_TIMEOUT_S} s")
            err.seek(0)
            out = err.read().decode(errors="replace")
            err.close()
            bad = [ln for ln in out.splitlines() if ln.startswith(("E:", "F:"))]
            if proc.returncode or bad:
                problems.append(f"storescu rc={proc.returncode}: " + " | ".join(bad[:3]))
    return elapsed, problems


# ---------------------------------------------------------------------------
# one case


@dataclass
class Result:
    receiver: str
    corpus: str
    senders: int
    nagle: bool                 # True: stock DCMTK (Nagle on); False: TCP_NODELAY=1 for DCMTK
    objects: int
    seconds: float
    objects_per_s: float
    cpu_ms_per_object: float
    sys_ms_per_object: float    # the kernel's part of cpu_ms_per_object (fsync, sockets)
    peak_rss_mib: float
    received: int | None
    other_cpu_pct: float        # CPU used by processes outside the benchmark, % of all cores
    kernel_threads_cpu_pct: float   # kernel threads (journal, softirq) meanwhile, % of all cores
    problems: list[str] = field(default_factory=list)
    repeats: list[float] = field(default_factory=list)   # objects/s of every repetition
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)   # peer -> paired_ratios()

    @property
    def label(self) -> str:
        return f"{self.corpus} x{self.senders}{' nagle' if self.nagle else ''}"


def wait_count(receiver: Receiver, expected: int, timeout: float = 15.0) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        n = receiver.count()
        if n is None or n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def run_case(name: str, corpus: str, folders: list[Path], objects: int, *, nagle: bool,
             scratch: Path, live: list[Receiver]) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    receiver = FACTORIES[name](workdir)
    live.append(receiver)
    try:
        receiver.start(nodelay=not nagle)
        time.sleep(0.3)   # let start-up threads settle before the baseline
        pid = receiver.pid
        reset_peak_rss(pid)
        k0 = kernel_thread_cpu_seconds()
        cpu0, busy0, own0, t0 = cpu_times(pid), busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        elapsed, problems = send(receiver, folders, nodelay=not nagle)
        received = wait_count(receiver, objects)
        cpu1 = cpu_times(pid)   # includes any work finished after the last response
        busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
        k1 = kernel_thread_cpu_seconds()
        peak = status_kib(pid, "VmHWM") / 1024
    finally:
        receiver.stop()
        live.remove(receiver)
        shutil.rmtree(workdir, ignore_errors=True)
    if received is not None and received != objects:
        problems.append(f"receiver holds {received} of {objects} objects")
    cpu = sum(cpu1) - sum(cpu0)
    sys_cpu = cpu1[1] - cpu0[1]
    # Whatever else ran meanwhile (other users' tests...) competes for the same cores.
    cores_s = (t1 - t0) * (os.cpu_count() or 1)
    kernel = k1 - k0
    other = max(0.0, (busy1 - busy0) - cpu - (own1 - own0) - kernel) / cores_s
    return Result(name, corpus, len(folders), nagle, objects, elapsed, objects / elapsed,
                  cpu / objects * 1000, sys_cpu / objects * 1000, peak, received,
                  round(100 * other, 1), round(100 * kernel / cores_s, 1), problems)


def run_repeated(repeat: int, *args: Any, **kw: Any) -> Result:
    return median_run([run_case(*args, **kw) for _ in range(repeat)])


def median_run(runs: list[Any]) -> Any:
    """The median run by objects/s, carrying every run's rate and problems."""
    runs = sorted(runs, key=lambda r: r.objects_per_s)
    median = runs[len(runs) // 2]
    median.repeats = [round(r.objects_per_s, 1) for r in runs]
    for r in runs:
        if r is not median:
            median.problems += r.problems
    return median


def take_turns(names: list[str], repeat: int, run: Callable[[str], Any], failures: list[str],
               what: str) -> dict[str, list[Any]]:
    """``run(name)`` ``repeat`` times for each name, in turn (A B A B ...), not one name
    after the other: a machine whose speed drifts during the run shifts every one
    alike. A name whose run raises is dropped (added to ``failures``, with ``what``
    the corpus); one broken receiver or case must not void the others."""
    runs: dict[str, list[Any]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in list(runs):
            try:
                runs[name].append(run(name))
            except Exception as exc:
                failures.append(f"{name} {what}: {exc.__class__.__name__}: {exc}")
                print(f"  {name:<28} FAILED: {failures[-1][:300]}", flush=True)
                del runs[name]
    return runs


def paired_ratios(runs: dict[str, list[Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Each receiver's (or case's) objects/s over the baseline's run of the same turn
    (the repeats are taken in turn), per turn, with their median: on a machine whose
    speed swings from one second to the next, the ratio of two medians drifts with it;
    this pairs runs made a few seconds apart."""
    base = runs.get(baseline, [])
    out: dict[str, dict[str, Any]] = {}
    for name, done in runs.items():
        if name == baseline or not base or len(done) != len(base):
            continue
        each = [round(r.objects_per_s / b.objects_per_s, 3) for r, b in zip(done, base)]
        out[name] = {"median": statistics.median(each), "each": each}
    return out


# ---------------------------------------------------------------------------
# large objects into mfconsole


def make_marker() -> bytes:
    marker = b"MFBENCH-PLAINTEXT-" + os.urandom(7).hex().encode()
    assert len(marker) == 32
    return marker


def write_large(path: Path, size: int, marker: bytes) -> Path:
    ds = dicomgen.make_image(pixel_bytes=size)
    pixels = bytearray(ds.PixelData)
    for offset in (0, len(pixels) // 2, len(pixels) - len(marker)):
        pixels[offset:offset + len(marker)] = marker
    ds.PixelData = bytes(pixels)
    del pixels
    dicomgen.save(ds, path)
    return path


def find_plaintext(root: Path, needles: list[bytes], extra: list[Path] = ()) -> list[str]:
    """Files under root (and extra files) that contain any needle, streamed in chunks."""
    hits = []
    overlap = max(len(n) for n in needles) - 1
    files = [p for p in root.rglob("*") if p.is_file()] + [p for p in extra if p.is_file()]
    for path in files:
        tail = b""
        with open(path, "rb") as f:
            while chunk := f.read(8 * MIB):
                buf = tail + chunk
                found = [n for n in needles if n in buf]
                if found:
                    hits.append(f"{path} contains {found[0][:12]!r}…")
                    break
                tail = buf[-overlap:]
    return hits


def run_large(size_mib: int, scratch: Path, live: list[Receiver]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"large{size_mib}-", dir=scratch))
    marker = make_marker()
    src = write_large(folder / "in" / "large.dcm", size_mib * MIB, marker)
    file_bytes = src.stat().st_size
    receiver = MfconsoleReceiver(folder / "serve", max_object_mb=max(512, size_mib * 2))
    live.append(receiver)
    try:
        receiver.start()
        time.sleep(0.5)
        pid = receiver.pid
        idle = status_kib(pid, "VmRSS") / 1024
        reset = reset_peak_rss(pid)
        cpu0 = cpu_seconds(pid)
        elapsed, problems = send(receiver, [src.parent], nodelay=True)
        cpu1 = cpu_seconds(pid)
        received = wait_count(receiver, 1)
        peak = status_kib(pid, "VmHWM") / 1024
    finally:
        receiver.stop()
        live.remove(receiver)
    if received != 1:
        problems.append(f"receiver holds {received} of 1 objects")
    hits = find_plaintext(receiver.data_dir, [marker, CANARY_NAME.encode()],
                          extra=[receiver.log_path])
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "size_mib": size_mib, "file_bytes": file_bytes, "seconds": elapsed,
        "mib_per_s": file_bytes / MIB / elapsed, "cpu_s": cpu1 - cpu0,
        "idle_rss_mib": idle, "peak_rss_mib": peak, "peak_reset": reset,
        "peak_over_idle_mib": peak - idle,
        "peak_over_idle_x_object": (peak - idle) / (file_bytes / MIB),
        "plaintext_found": hits, "problems": problems,
    }


# ---------------------------------------------------------------------------
# report


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception as exc:  # informational only
        return f"unknown ({exc.__class__.__name__})"


def print_table(results: list[Result]) -> None:
    head = (f"{'receiver':<16} {'corpus':<4} {'senders':>7} {'nagle':<5} {'objects':>7} "
            f"{'objects/s':>9} {'CPU ms/obj':>10} {'(sys)':>6} {'peak RSS MiB':>12} {'other CPU':>9}  check")
    print(head)
    print("-" * len(head))
    for r in results:
        check = "ok" if not r.problems else "; ".join(r.problems)[:80]
        if r.received is None and not r.problems:
            check = "ok (not verifiable: stores nothing)"
        print(f"{r.receiver:<16} {r.corpus:<4} {r.senders:>7} {('on' if r.nagle else 'off'):<5} "
              f"{r.objects:>7} {r.objects_per_s:>9.1f} {r.cpu_ms_per_object:>10.2f} "
              f"{r.sys_ms_per_object:>6.2f} "
              f"{r.peak_rss_mib:>12.1f} {r.other_cpu_pct:>8.0f}%  {check}")
    if results:
        mean_other = statistics.mean(r.other_cpu_pct for r in results)
        noisy = [r for r in results if r.other_cpu_pct > 10]
        print(f"\nother CPU = CPU used by processes outside the benchmark during the case "
              f"(kernel threads excluded), % of all {os.cpu_count()} cores (mean {mean_other:.0f}%).")
        if noisy:
            print(f"WARNING: {len(noisy)} case(s) shared the machine with > 10% foreign load; "
                  f"their objects/s are low by roughly that much. Re-run on a quiet machine "
                  f"or with --repeat 3.")


# Issue 16's targets: mfconsole's objects/s over Orthanc's, same corpus and senders
# (Orthanc with TCP_NODELAY=1 in the nagle-off cases, stock in the nagle-on one).
TARGETS = {("SR", 4, False): 1.5, ("CT", 4, False): 1.0, ("SR", 1, False): 1.0,
           ("SR", 4, True): 10.0}


def ratios(results: list[Result]) -> list[dict[str, Any]]:
    by = {(r.receiver, r.corpus, r.senders, r.nagle): r for r in results}
    out = []
    for corpus, senders, nagle in (("SR", 4, False), ("CT", 4, False), ("SR", 4, True),
                                   ("SR", 1, False), ("CT", 1, False)):
        mf = by.get(("mfconsole", corpus, senders, nagle))
        if mf is None:
            continue
        row: dict[str, Any] = {"corpus": corpus, "senders": senders, "nagle": nagle,
                               "mfconsole_objects_per_s": mf.objects_per_s}
        for peer in PEERS:
            other = by.get((peer, corpus, senders, nagle))
            if other is not None:
                row[f"vs_{peer}"] = mf.objects_per_s / other.objects_per_s
            if peer in mf.paired:
                row[f"paired_vs_{peer}"] = mf.paired[peer]
        out.append(row)
    return out


def row_label(row: dict[str, Any]) -> str:
    return f"{row['corpus']} x{row['senders']} nagle {'on ' if row['nagle'] else 'off'}"


def print_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts = []
    print("\nmfconsole objects/s divided by the peer's, same corpus and senders:")
    for row in rows:
        parts = [f"vs {p}: {row[f'vs_{p}']:.2f}x" for p in PEERS if f"vs_{p}" in row]
        print(f"  {row_label(row)}  " + "   ".join(parts))
    paired = [(row, p) for row in rows for p in PEERS if len(row.get(f"paired_vs_{p}", {}).get("each", ())) > 1]
    if paired:
        print("\npaired: each repeat over the peer's run of the same turn, median (min-max):")
        for row, peer in paired:
            ratio = row[f"paired_vs_{peer}"]
            print(f"  {row_label(row)}  vs {peer}: {ratio['median']:.2f}x  "
                  f"({min(ratio['each']):.2f}-{max(ratio['each']):.2f})")
    print("\ntargets (mfconsole / orthanc; the paired median when repeated; informational):")
    for row in rows:
        target = TARGETS.get((row["corpus"], row["senders"], row["nagle"]))
        if target is None or "vs_orthanc" not in row:
            continue
        value = row.get("paired_vs_orthanc", {}).get("median", row["vs_orthanc"])
        ok = value >= target
        verdicts.append({"corpus": row["corpus"], "senders": row["senders"], "nagle": row["nagle"],
                         "peer": "orthanc", "target": target, "ratio": value, "pass": ok})
        print(f"  {'PASS' if ok else 'MISS'}  {row_label(row)}: {value:.2f} (target >= {target})")
    return verdicts


def print_large(large: list[dict[str, Any]]) -> None:
    if not large:
        return
    print("\nlarge objects into mfconsole (one storescu, TCP_NODELAY=1):")
    for item in large:
        leak = "NO plaintext found under data_dir or serve log" if not item["plaintext_found"] \
            else "PLAINTEXT FOUND: " + "; ".join(item["plaintext_found"])
        probs = ("  problems: " + "; ".join(item["problems"])) if item["problems"] else ""
        print(f"  {item['size_mib']:>4} MiB: {item['seconds']:.2f} s ({item['mib_per_s']:.0f} MiB/s), "
              f"idle RSS {item['idle_rss_mib']:.0f} MiB, peak {item['peak_rss_mib']:.0f} MiB, "
              f"peak - idle = {item['peak_over_idle_mib']:.0f} MiB = "
              f"{item['peak_over_idle_x_object']:.2f}x the object; {leak}{probs}")


# ---------------------------------------------------------------------------


def build_corpus(root: Path, kind: str, count: int, **kw: Any) -> list[Path]:
    """count objects split into 4 folders of (almost) equal size; returns the folders."""
    folders = []
    study_files = dicomgen.write_corpus(root / "all", count, kind=kind, **kw)
    for i in range(4):
        folder = root / f"part{i}"
        folder.mkdir(parents=True)
        for path in study_files[i::4]:
            path.rename(folder / path.name)
        folders.append(folder)
    (root / "all").rmdir()
    return folders


def subset(folders: list[Path], count: int, root: Path) -> list[Path]:
    """The first count/4 files of each folder, hard-linked into new folders."""
    out = []
    for i, folder in enumerate(folders):
        dest = root / f"part{i}"
        dest.mkdir(parents=True)
        for path in sorted(folder.iterdir())[:count // len(folders)]:
            os.link(path, dest / path.name)
        out.append(dest)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 SRs, 40 CTs, no 200 MiB object")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per case, fresh receiver each, receivers in turn; the median and "
                        "mfconsole's paired ratios are reported (default 1)")
    p.add_argument("--receivers", default=",".join(RECEIVERS),
                   help=f"comma-separated subset of {','.join(RECEIVERS)}")
    p.add_argument("--no-large", action="store_true", help="skip the large-object runs")
    p.add_argument("--trigger", choices=("instance", "study_stable"), default="instance",
                   help="the mfconsole destination's trigger (study_stable: every object held)")
    p.add_argument("--cases", default="",
                   help="comma-separated subset of the cases, by label: SRx1,SRx4,SRx4nagle,CTx1,CTx4")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args(argv)
    global TRIGGER
    TRIGGER = args.trigger

    n_sr, n_ct = (200, 40) if args.quick else (1000, 200)
    large_sizes = [] if args.no_large else ([10] if args.quick else [10, 200])
    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    unknown = set(names) - set(RECEIVERS)
    if unknown:
        p.error(f"unknown receiver(s): {', '.join(sorted(unknown))}")
    for tool in ("storescu", "storescp", "Orthanc"):
        require_tool(tool)

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfbench-"))
    live: list[Receiver] = []
    results: list[Result] = []
    large: list[dict[str, Any]] = []
    failures: list[str] = []
    interrupted = False
    try:
        t = time.perf_counter()
        sr = build_corpus(scratch / "sr", "sr", n_sr)
        ct = build_corpus(scratch / "ct", "ct", n_ct, pixel_bytes=512 * 512 * 2)
        print(f"corpus: {n_sr} SRs ({sum(f.stat().st_size for d in sr for f in d.iterdir()) / n_sr / 1024:.1f} KiB each), "
              f"{n_ct} CTs ({sum(f.stat().st_size for d in ct for f in d.iterdir()) / n_ct / 1024:.0f} KiB each); "
              f"built in {time.perf_counter() - t:.1f} s", flush=True)
        # Nagle-on peers crawl (~11 objects/s for stock DCMTK): a rate needs no 1000.
        n_nagle = min(n_sr, NAGLE_CAP)
        sr_nagle = sr if n_nagle == n_sr else subset(sr, n_nagle, scratch / "sr-nagle")
        cases = [("SR", sr, n_sr, 1, False), ("SR", sr, n_sr, 4, False),
                 ("SR", sr_nagle, n_nagle, 4, True),
                 ("CT", ct, n_ct, 1, False), ("CT", ct, n_ct, 4, False)]
        if args.cases:
            wanted = {c.strip() for c in args.cases.split(",")}
            cases = [c for c in cases if f"{c[0]}x{c[3]}{'nagle' if c[4] else ''}" in wanted]
        for corpus, folders, count, senders, nagle in cases:
            # one sender: the whole corpus (storescu +sd +r on the parent folder)
            use = [folders[0].parent] if senders == 1 else folders
            runs = take_turns(names, args.repeat, lambda name: run_case(
                name, corpus, use, count, nagle=nagle, scratch=scratch, live=live),
                failures, f"{corpus} x{senders}")
            for name, done in runs.items():
                r = median_run(done)
                if name == "mfconsole":   # over each peer's run of the same turn
                    r.paired = {peer: paired_ratios({name: done, peer: runs[peer]}, peer)[name]
                                for peer in runs if peer != name and len(runs[peer]) == len(done)}
                results.append(r)
                print(f"  {name:<16} {r.label:<12} {r.objects_per_s:8.1f} objects/s  "
                      f"{r.cpu_ms_per_object:6.2f} CPU ms/object  {r.peak_rss_mib:7.1f} MiB  "
                      f"other CPU {r.other_cpu_pct:.0f}%"
                      f"{'  ' + '; '.join(r.problems) if r.problems else ''}", flush=True)
        if "mfconsole" in names:
            for size in large_sizes:
                try:
                    large.append(run_large(size, scratch, live))
                except Exception as exc:
                    failures.append(f"mfconsole large {size} MiB: {exc.__class__.__name__}: {exc}")
                    print(f"  FAILED: {failures[-1][:300]}", flush=True)
                    continue
                print(f"  mfconsole large {size} MiB done", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; stopping receivers", file=sys.stderr)
    finally:
        for receiver in list(live):
            try:
                receiver.stop()
            except Exception as exc:
                print(f"could not stop {receiver.name}: {exc}", file=sys.stderr)
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n== bench/ingest.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{os.cpu_count()} CPU(s), loopback; objects/s = objects / wall time of all senders ==\n")
    print_table(results)
    rows = ratios(results)
    verdicts = print_ratios(rows)
    print_large(large)
    for failure in failures:
        print(f"FAILED: {failure}")
    total = time.time() - started
    print(f"\ntotal run time {total:.0f} s")
    save_results("ingest", ["storescu", "Orthanc"], {
        "started": started, "seconds": total, "quick": args.quick, "repeat": args.repeat,
        "interrupted": interrupted,
        "corpus": {"sr": n_sr, "ct": n_ct, "ct_pixel_bytes": 512 * 512 * 2},
        "receiver_notes": {n: FACTORIES[n].notes for n in names},
        "results": [asdict(r) for r in results],
        "ratios": rows, "targets": verdicts, "large_objects": large, "failures": failures,
    })
    return 130 if interrupted else 0


def save_results(name: str, tools: list[str], fields: dict[str, Any]) -> Path:
    """bench/results/NAME-<time>.json: ``fields`` plus the machine and the versions of
    ``tools``, pydicom and pynetdicom; prints its path."""
    import pydicom
    import pynetdicom

    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    versions = {tool: tool_version([require_tool(tool), "--version"]) for tool in tools}
    out.write_text(json.dumps({
        **fields,
        "machine": {"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "loadavg_at_end": os.getloadavg()},
        "versions": {**versions, "pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__},
    }, indent=2))
    print(f"results: {out.relative_to(REPO)}")
    return out


if __name__ == "__main__":
    sys.exit(main())

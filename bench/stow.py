"""STOW-RS forwarding into Orthanc at batch sizes 1, 10 and 50, beside DIMSE forwarding
to the same Orthanc, in the same run.

    .venv/bin/python bench/stow.py              # 1000 SRs, 200 CTs; 1 and 4 workers
    .venv/bin/python bench/stow.py --quick      # 300 SRs, 60 CTs
    .venv/bin/python bench/stow.py --workers 2 --batches 1,10

Receiver: Debian's Orthanc with its DICOMweb plugin (tests/peers.py), a fresh one per
case (fresh storage and index, so it never sees a duplicate), TCP_NODELAY=1 in its
environment (DCMTK's DICOM server leaves Nagle on otherwise; the peer at its best, as
in bench/ingest.py). The same Orthanc build and settings receive both lanes: DIMSE on
its DICOM port, STOW-RS at /dicom-web/studies.

Sender: ``mfconsole serve`` with one destination, ``max_associations`` = workers:
kind "dimse" (C-STORE, one object per request over a reused association) or kind
"stow" with ``batch_max_objects`` = batch (``batch_max_mb`` = 256, so the count is the
bound). As in bench/forward.py the destination is paused, N-1 objects are ingested
(storescu), then the clock starts, the destination is resumed (what ``mfconsole
resume`` runs) and the last object is sent over an association opened beforehand: that
ingest wakes the delivery workers at once. The clock stops when all N deliveries are
'delivered' (read-only SQLite poll every 10 ms); Orthanc's instance count is checked
afterwards. So this measures forwarding: claim, read + decrypt, send, record outcome.

Corpora: small Basic Text SRs (~1 KiB) in studies of 100, and CT-sized images
(~512 KiB) in studies of 50: a STOW request carries one study, so studies must be
larger than the batch for the batch to fill.

objects/s = N / wall time; "vs dimse" divides by DIMSE's objects/s for the same corpus
and worker count. CPU ms/obj: utime+stime of the serve process and of Orthanc during
the transfer. other CPU: processes outside the benchmark, % of all cores.

Results go to stdout and bench/results/stow-<time>.json; exit status 0 whenever the
benchmark ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import ingest  # noqa: E402  (also puts tests/ on sys.path)
from ingest import busy_cpu_seconds, cpu_seconds, own_cpu_seconds, tool_version  # noqa: E402

import dicomgen  # noqa: E402
import httpx  # noqa: E402
from harness import ServeProcess, write_config  # noqa: E402
from peers import LOOPBACK, Orthanc, free_port, require_tool  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pynetdicom import AE  # noqa: E402

from mfconsole import ops  # noqa: E402
from mfconsole.config import load  # noqa: E402
from mfconsole.repository import db_path, reading  # noqa: E402

DEST = "archive"
DELIVERY_TIMEOUT_S = 900
STUDY_SIZE = {"SR": 100, "CT": 50}


@dataclass
class Result:
    corpus: str
    lane: str                   # "dimse" or "stow b<N>"
    workers: int
    objects: int
    seconds: float
    objects_per_s: float
    mf_cpu_ms_per_object: float
    orthanc_cpu_ms_per_object: float
    other_cpu_pct: float
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.corpus} {self.lane} x{self.workers}"


def build_corpus(root: Path, kind: str, count: int, **kw) -> list[Path]:
    files: list[Path] = []
    per_study = STUDY_SIZE[kind.upper()]
    for n in range(0, count, per_study):
        files += dicomgen.write_corpus(root / f"study{n // per_study:03d}", min(per_study, count - n),
                                       kind=kind, **kw)
    return files


def destination(lane: str, orthanc: Orthanc, workers: int) -> dict:
    common = {"name": DEST, "max_associations": workers, "retry_initial_s": 0.5, "retry_max_s": 2}
    if lane == "dimse":
        return {**common, "kind": "dimse", "host": LOOPBACK, "port": orthanc.dicom_port,
                "ae_title": orthanc.ae_title}
    batch = int(lane.split("b")[1])
    return {**common, "kind": "stow", "url": orthanc.dicomweb_url, "batch_max_objects": batch,
            "batch_max_mb": 256}


def delivered(db: Path) -> int:
    with reading(db) as reads:
        return sum(by_state.get("delivered", 0) for by_state in reads.delivery_counts().values())


def problems_in(db: Path) -> list[str]:
    with reading(db) as reads:
        deliveries = reads.rows("deliveries")
    by_state: dict[str, list[dict]] = {}
    for d in deliveries:
        if d["state"] != "delivered":
            by_state.setdefault(d["state"], []).append(d)
    rows = [(state, len(ds), max((d["last_reason"] for d in ds if d["last_reason"] is not None), default=None))
            for state, ds in sorted(by_state.items())]
    retries = len([d for d in deliveries if d["attempts"] > 1])
    out = [f"{n} {state} ({reason})" for state, n, reason in rows]
    return out + ([f"{retries} needed retries"] if retries else [])


def orthanc_count(orthanc: Orthanc) -> int:
    with httpx.Client(trust_env=False, timeout=30) as c:
        r = c.get(f"{orthanc.base_url}/statistics")
        r.raise_for_status()
        return int(r.json()["CountInstances"])


def run_case(corpus: str, files: list[Path], lane: str, workers: int, scratch: Path) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"{corpus}-{lane.replace(' ', '')}-x{workers}-", dir=scratch))
    saved = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"          # Orthanc (DCMTK) inherits it
    orthanc = Orthanc(workdir / "orthanc")
    serve: ServeProcess | None = None
    try:
        orthanc.start()
        if saved is None:
            os.environ.pop("TCP_NODELAY")
        port = free_port()
        config = write_config(workdir / "mf", port=port, destinations=[destination(lane, orthanc, workers)])
        serve = ServeProcess(config, port)
        try:
            serve.start()
        except TimeoutError:
            tail = serve.log_path.read_text(errors="replace")[-800:] if serve.log_path.exists() else ""
            raise RuntimeError(f"mfconsole serve did not listen: {tail}") from None
        cfg = load(config)
        db = db_path(serve.data_dir)
        ops.pause(cfg, DEST)
        res = ingest.subprocess.run([require_tool("storescu"), "-aec", "MF_SCP", LOOPBACK, str(port),
                                     *map(str, files[:-1])], capture_output=True, text=True,
                                    timeout=ingest.SENDER_TIMEOUT_S, env=ingest.dcmtk_env(True))
        if res.returncode != 0:
            raise RuntimeError(f"storescu failed: {res.stderr[-500:]}")
        last = dcmread(files[-1])
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(last.SOPClassUID, [last.file_meta.TransferSyntaxUID])
        assoc = ae.associate(LOOPBACK, port, ae_title="MF_SCP")
        assert assoc.is_established
        mf_pid, o_pid = serve.proc.pid, orthanc.pid
        time.sleep(0.3)
        mf0, o0, busy0, own0 = cpu_seconds(mf_pid), cpu_seconds(o_pid), busy_cpu_seconds(), own_cpu_seconds()
        t0 = time.monotonic()
        ops.resume(cfg, DEST)
        status = assoc.send_c_store(last)
        assoc.release()
        if status.Status != 0:
            raise RuntimeError(f"last object answered 0x{int(status.Status):04X}")
        n = len(files)
        deadline = t0 + DELIVERY_TIMEOUT_S
        while delivered(db) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{delivered(db)} of {n} delivered after {DELIVERY_TIMEOUT_S} s")
            time.sleep(0.01)
        t1 = time.monotonic()
        mf1, o1, busy1, own1 = cpu_seconds(mf_pid), cpu_seconds(o_pid), busy_cpu_seconds(), own_cpu_seconds()
        problems = problems_in(db)
        held = orthanc_count(orthanc)
        if held != n:
            problems.append(f"Orthanc holds {held} of {n}")
    finally:
        if serve is not None:
            serve.stop()
        orthanc.kill()
        if saved is not None:
            os.environ["TCP_NODELAY"] = saved
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = t1 - t0
    mf, o = mf1 - mf0, o1 - o0
    cores_s = elapsed * (os.cpu_count() or 1)
    other = max(0.0, (busy1 - busy0) - mf - o - (own1 - own0)) / cores_s
    return Result(corpus, lane, workers, n, round(elapsed, 3), round(n / elapsed, 1),
                  round(mf / n * 1000, 2), round(o / n * 1000, 2), round(100 * other, 1), problems)


def print_table(results: list[Result]) -> None:
    print(f"{'case':<22} {'objects':>7} {'seconds':>8} {'objects/s':>9} {'vs dimse':>8} "
          f"{'mf CPU ms/obj':>13} {'Orthanc CPU ms/obj':>18} {'other CPU':>9}  check")
    for r in results:
        base = next((b for b in results if b.corpus == r.corpus and b.workers == r.workers
                     and b.lane == "dimse"), None)
        ratio = f"{r.objects_per_s / base.objects_per_s:8.2f}" if base else f"{'-':>8}"
        print(f"{r.label:<22} {r.objects:>7} {r.seconds:>8.2f} {r.objects_per_s:>9.1f} {ratio} "
              f"{r.mf_cpu_ms_per_object:>13.2f} {r.orthanc_cpu_ms_per_object:>18.2f} "
              f"{r.other_cpu_pct:>8.0f}%  {'; '.join(r.problems) or 'ok'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 SRs, 60 CTs")
    p.add_argument("--workers", default="1,4", help="comma-separated max_associations (default 1,4)")
    p.add_argument("--batches", default="1,10,50", help="STOW batch sizes (default 1,10,50)")
    p.add_argument("--corpora", default="SR,CT", help="SR, CT or both (default SR,CT)")
    args = p.parse_args(argv)
    n_sr, n_ct = (300, 60) if args.quick else (1000, 200)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    lanes = ["dimse"] + [f"stow b{int(b)}" for b in args.batches.split(",") if b.strip()]
    corpora = [c.strip().upper() for c in args.corpora.split(",") if c.strip()]
    for tool in ("storescu", "Orthanc"):
        require_tool(tool)

    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="mfbench-stow-"))
    results: list[Result] = []
    failures: list[str] = []
    try:
        corpus_files = {}
        if "SR" in corpora:
            corpus_files["SR"] = build_corpus(scratch / "sr", "sr", n_sr)
        if "CT" in corpora:
            corpus_files["CT"] = build_corpus(scratch / "ct", "ct", n_ct, pixel_bytes=512 * 512 * 2)
        for corpus, files in corpus_files.items():
            size = sum(f.stat().st_size for f in files) / len(files) / 1024
            print(f"corpus {corpus}: {len(files)} objects, {size:.1f} KiB each, studies of "
                  f"{STUDY_SIZE[corpus]}", flush=True)
            for w in workers:
                for lane in lanes:
                    try:
                        r = run_case(corpus, files, lane, w, scratch)
                    except Exception as exc:   # one broken case must not void the others
                        failures.append(f"{corpus} {lane} x{w}: {exc.__class__.__name__}: {exc}")
                        print(f"  FAILED: {failures[-1][:300]}", flush=True)
                        continue
                    results.append(r)
                    print(f"  {r.label:<22} {r.objects_per_s:8.1f} objects/s  "
                          f"{'; '.join(r.problems)}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n== bench/stow.py{' --quick' if args.quick else ''}: {platform.node()}, "
          f"{os.cpu_count()} CPU(s), loopback, {tool_version(['Orthanc', '--version'])}; "
          "objects/s = objects / time from resume to the last 'delivered' ==\n")
    print_table(results)
    for failure in failures:
        print(f"FAILED: {failure}")
    out = BENCH / "results" / f"stow-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "quick": args.quick,
                               "seconds": round(time.time() - started, 1),
                               "results": [asdict(r) for r in results], "failures": failures},
                              indent=2))
    print(f"\nresults: {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SR → HL7 ORU^R01 mappings per second (handlers/sr_to_oru.py), beside what reading the
same SR with pydicom and parsing the resulting ORU with HL7 libraries cost, in the
same run and process.

    .venv/bin/python bench/handlers.py            # ~1 s per case and SR, best of 3
    .venv/bin/python bench/handlers.py --quick    # ~0.2 s per case, best of 2

SRs: pydicom's bundled test SRs (the ones the tests map), and generated ones from
tests/srgen.py: every value type, a CT dose report, a Basic Text report, hostile text,
and a Key Object Selection listing 200 images (the large case).

Cases, per SR (each a loop timed with perf_counter; the best of the rounds is kept):

* ``parse+map+encode``: what a delivery runs — ``DicomObject.from_bytes`` on the stored
  data set bytes (header-only read), the handler, ``encode()`` to UTF-8 bytes;
* ``map+encode``: the handler and the encoding on an object whose data set is already
  read (pydicom's per-element conversion included only once, before the loop);
* peers: ``pydicom read``: ``dcmread`` of the Part 10 file from memory, touching every
  element (what a naive handler reading the whole SR pays); ``hl7apy strict``: parsing
  the produced ORU as v2.5.1 ORU_R01 with groups, STRICT (what a validating receiver
  pays); ``python-hl7``: parsing it with python-hl7.

"vs pydicom read" = parse+map+encode / pydicom read, in operations per second: above 1,
the whole mapping costs less than reading the SR with pydicom the usual way. The last
line maps the SRs round-robin (the mix), as the engine would.

Results go to stdout and bench/results/handlers-<time>.json; the exit status is 0
whenever the benchmark ran. No network, no peers to install: hl7apy and python-hl7 are
test dependencies (``./dev test`` installs them); a missing one is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import srgen  # noqa: E402
from pydicom import config as pydicom_config, dcmread  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from mfconsole.handlers.api import Context, DicomObject  # noqa: E402

CASES = ("parse+map+encode", "map+encode", "pydicom read", "hl7apy strict", "python-hl7")


def load_handler() -> Any:
    spec = importlib.util.spec_from_file_location("sr_to_oru_bench", REPO / "handlers" / "sr_to_oru.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus() -> dict[str, tuple[bytes, str, bytes]]:
    """name → (data set bytes, transfer syntax, Part 10 file bytes)."""
    out = {}
    for path in srgen.bundled_sr_files():
        ds = dcmread(path)
        ts = str(ds.file_meta.TransferSyntaxUID)
        out[Path(path).name] = (srgen.dataset_bytes(ds, ts), ts, Path(path).read_bytes())
    for name, make in (("every_value_type", srgen.every_value_type), ("dose_report", srgen.dose_report),
                       ("basic_text", srgen.basic_text), ("hostile", srgen.hostile),
                       ("key_objects_200", lambda: srgen.key_objects(200))):
        ds = make()
        part10 = BytesIO()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(part10, enforce_file_format=True)
        out[name] = (srgen.dataset_bytes(ds), ExplicitVRLittleEndian, part10.getvalue())
    return out


def rate(fn: Callable[[], Any], seconds: float, rounds: int) -> float:
    """Best operations per second over ``rounds`` loops of about ``seconds`` each."""
    fn()
    best = 0.0
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            fn()
            n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n / (now - start))
    return best


def touch_all(ds: Any) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                touch_all(item)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~0.2 s per case, best of 2")
    args = p.parse_args(argv)
    seconds, rounds = (0.2, 2) if args.quick else (1.0, 3)
    # As the engine runs: pydicom's value validation off (it would warn and log values).
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    warnings.simplefilter("ignore")

    handler = load_handler()
    ctx = Context(route="bench", destination="ehr", destination_kind="mllp",
                  message_control_id="MF000000000001", handler_name="sr_to_oru",
                  handler_version=handler.VERSION,
                  now=lambda: datetime(2026, 1, 1, tzinfo=timezone.utc))
    try:
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.parser import parse_message
    except ImportError:
        parse_message = None
    try:
        import hl7 as python_hl7
    except ImportError:
        python_hl7 = None

    srs = corpus()
    results: list[dict[str, Any]] = []
    for name, (data, ts, part10) in srs.items():
        obj = DicomObject.from_bytes(data, ts)
        er7 = handler.handle(obj, ctx).encode()
        touch_all(obj.dataset)
        row: dict[str, Any] = {"sr": name, "items": len(obj.sr), "oru_bytes": len(er7.encode("utf-8"))}
        row["parse+map+encode"] = rate(
            lambda: handler.handle(DicomObject.from_bytes(data, ts), ctx).to_bytes(), seconds, rounds)
        row["map+encode"] = rate(
            lambda: handler.handle(DicomObject(obj.dataset, ts), ctx).to_bytes(), seconds, rounds)
        row["pydicom read"] = rate(lambda: touch_all(dcmread(BytesIO(part10))), seconds, rounds)
        if parse_message is not None:
            row["hl7apy strict"] = rate(lambda: parse_message(
                er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True), seconds, rounds)
        if python_hl7 is not None:
            row["python-hl7"] = rate(lambda: python_hl7.parse(er7), seconds, rounds)
        results.append(row)
        print(f"  {name}: {row['parse+map+encode']:.0f} mappings/s", file=sys.stderr)

    items = list(srs.values())
    state = {"i": 0}

    def one_of_the_mix() -> None:
        data, ts, _ = items[state["i"] % len(items)]
        state["i"] += 1
        handler.handle(DicomObject.from_bytes(data, ts), ctx).to_bytes()

    mix = rate(one_of_the_mix, seconds * 3, rounds)

    header = ["SR", "items", "ORU B", *CASES, "vs pydicom read"]
    widths = [36, 6, 7, 17, 11, 13, 14, 11, 16]
    print("\nSR → ORU^R01, operations per second (one thread, in process)\n")
    print("".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in results:
        cells = [r["sr"], str(r["items"]), str(r["oru_bytes"])]
        cells += [f"{r[c]:.0f}" if c in r else "-" for c in CASES]
        cells.append(f"{r['parse+map+encode'] / r['pydicom read']:.2f}")
        print("".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    print(f"\nround-robin over the {len(items)} SRs, parse+map+encode: {mix:.0f} mappings/s "
          f"({1000 / mix:.2f} ms each)")

    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"handlers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                               "python": platform.python_version(), "quick": args.quick,
                               "seconds_per_round": seconds, "rounds": rounds,
                               "results": results, "mix_mappings_per_s": mix}, indent=2))
    print(f"\nresults: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

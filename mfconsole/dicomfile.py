"""Part 10 files on the command line (``handlers run``): the data set bytes as the
engine would hold them, after the file meta information, and their transfer syntax."""

from __future__ import annotations

from pathlib import Path

from pydicom.filereader import read_dataset, read_preamble


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    raw = Path(path).read_bytes()
    with open(path, "rb") as fp:
        read_preamble(fp, force=True)       # skips the 128-byte preamble and "DICM" if present
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag.group != 0x0002)
        offset = fp.tell()
    ts = meta.get("TransferSyntaxUID")
    if ts is None:
        raise ValueError("no transfer syntax in the file meta information")
    return raw[offset:], str(ts)

"""engine.tune_malloc: with glibc, objects of a few hundred KiB allocated and freed
group after group come from a heap that is kept, not from fresh pages every time
(what reading and decrypting objects for sending does); an operator's own
MALLOC_*_THRESHOLD_ environment wins."""

from __future__ import annotations

import resource
import sys

import pytest

from mfconsole.engine import engine


def _faults_per_group(groups: int = 20, size: int = 512 * 1024, per_group: int = 8) -> float:
    for _ in range(3):   # warm up
        held = [bytes(size) for _ in range(per_group)]
        del held
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(groups):
        held = [bytes(size) for _ in range(per_group)]
        del held
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / groups


def test_operator_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert engine.tune_malloc() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_groups_of_large_objects_reuse_the_heap(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    if not engine.tune_malloc():
        pytest.skip("no glibc mallopt")
    pages = 8 * 512 * 1024 // resource.getpagesize()
    # Each group of 8 x 512 KiB touches `pages` pages; they are faulted in once, not
    # again for every group.
    assert _faults_per_group() < pages / 10

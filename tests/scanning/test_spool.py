"""BodySpool: memory up to the threshold, then a file; byte-identical echo; flat RSS."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.scanning.spool import BodySpool, purge_stale


def test_small_body_stays_in_memory(tmp_path: Path) -> None:
    spool = BodySpool(100, tmp_path / "spool")
    spool.write(b"a" * 60)
    spool.write(b"b" * 40)  # exactly at the threshold: still memory
    assert spool.in_memory and spool.size == 100
    assert spool.scan_target() == b"a" * 60 + b"b" * 40
    assert b"".join(spool.iter_chunks(block=7)) == b"a" * 60 + b"b" * 40
    assert all(len(c) <= 7 for c in spool.iter_chunks(block=7))
    assert not (tmp_path / "spool").exists()  # never needed
    spool.close()


def test_body_in_one_piece_is_handed_to_the_scanner_uncopied(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    with BodySpool(1024**2, tmp_path) as spool:
        spool.write(data)
        assert spool.scan_target() is data
        assert next(spool.iter_chunks(block=65536 * 2)) is data  # one block: no copy for the echo


def test_large_pieces_are_joined_once_in_order(tmp_path: Path) -> None:
    pieces = [os.urandom(65536) for _ in range(5)] + [b"tail"]
    with BodySpool(1024**2, tmp_path) as spool:
        for piece in pieces:
            spool.write(piece)
        assert spool.scan_target() == b"".join(pieces)
        assert b"".join(spool.iter_chunks(block=1000, start=3)) == b"".join(pieces)[3:]


def test_tiny_pieces_share_buffers_and_mutable_ones_are_copied(tmp_path: Path) -> None:
    """One-byte writes (a peer sending one-byte chunks) must not cost an
    object each: memory stays near the body's size."""
    with BodySpool(1024**2, tmp_path) as spool:
        expected = bytearray()
        for i in range(100_000):
            spool.write(bytes([i % 256]))
            expected.append(i % 256)
        assert len(spool._pieces) == 1
        reused = bytearray(b"m" * 65536)
        spool.write(reused)
        reused[:] = b"X" * 65536  # the caller reuses its buffer: the spool kept a copy
        assert spool.scan_target() == bytes(expected) + b"m" * 65536


def test_switches_to_file_past_threshold(tmp_path: Path) -> None:
    spool_dir = tmp_path / "var" / "spool"  # created on demand
    data = os.urandom(300_000)
    spool = BodySpool(100_000, spool_dir)
    for i in range(0, len(data), 4096):
        spool.write(data[i : i + 4096])
    assert not spool.in_memory
    path = spool.scan_target()
    assert isinstance(path, str) and Path(path).parent == spool_dir
    assert Path(path).name.startswith(f"body-{os.getpid()}-")
    assert Path(path).read_bytes() == data  # finished: flushed for YARA to read
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert spool.size == len(data)
    assert b"".join(spool.iter_chunks(block=65536)) == data
    assert b"".join(spool.iter_chunks(block=1000)) == data  # again: repeatable
    spool.close()
    assert not Path(path).exists()
    spool.close()  # twice is fine


def test_write_after_finish_refused(tmp_path: Path) -> None:
    with BodySpool(10, tmp_path) as spool:
        spool.write(b"x")
        spool.finish()
        with pytest.raises(ValueError):
            spool.write(b"y")


def test_context_manager_deletes(tmp_path: Path) -> None:
    with BodySpool(10, tmp_path) as spool:
        spool.write(b"x" * 100)
        path = spool.path
        assert path and Path(path).exists()
    assert not Path(path).exists()


def test_purge_stale(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"body-{dead_pid}-abc.spool").write_bytes(b"old")
    (tmp_path / f"decoded-{dead_pid}-abc.spool").write_bytes(b"old")
    mine = tmp_path / f"body-{os.getpid()}-abc.spool"
    mine.write_bytes(b"in use")
    parent = tmp_path / f"body-{os.getppid()}-abc.spool"  # a live sibling's
    parent.write_bytes(b"in use")
    other = tmp_path / "unrelated.txt"
    other.write_bytes(b"keep")
    assert purge_stale(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, parent.name, other.name])
    assert purge_stale(tmp_path / "missing") == 0


RSS_SCRIPT = r"""
import hashlib, os, sys
from pathlib import Path
from gateway.scanning.spool import BodySpool

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

chunk = os.urandom(65536)
spool = BodySpool(1024 * 1024, Path(sys.argv[1]))
spool.write(chunk)  # warm up
before = rss_kib()
h = hashlib.sha256(chunk)
for _ in range(50 * 16 - 1):  # 50 MiB in all
    spool.write(chunk)
    h.update(chunk)
after_write = rss_kib()
out = hashlib.sha256()
for part in spool.iter_chunks():
    out.update(part)
after_read = rss_kib()
assert out.hexdigest() == h.hexdigest(), "echo differs"
print(spool.size, before, after_write, after_read)
spool.close()
"""


def test_50_mib_body_keeps_rss_flat(tmp_path: Path) -> None:
    # A fresh interpreter, so the figure is not blurred by other tests' memory.
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    size, before, after_write, after_read = map(int, proc.stdout.split())
    assert size == 50 * 1024**2
    # Threshold is 1 MiB: growth stays within a few MiB, not 50.
    assert after_write - before < 4096, proc.stdout
    assert after_read - before < 4096, proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_hash_of_echo_matches_for_memory_body(tmp_path: Path) -> None:
    data = os.urandom(5000)
    with BodySpool(10_000, tmp_path) as spool:
        spool.write(data)
        assert hashlib.sha256(b"".join(spool.iter_chunks(1024))).digest() == hashlib.sha256(data).digest()


FAULTS_SCRIPT = r"""
import resource, sys
from pathlib import Path
from gateway.alloc import tune_malloc
from gateway.scanning.spool import BodySpool

# the thresholds a worker sets at start ([server] body_memory_budget's default as the trim threshold)
tuned = bool(tune_malloc(64 * 1024**2, environ={})) if sys.argv[2] == "tuned" else False
piece = bytes(range(256)) * 256

def body():  # eight 1 MiB bodies in flight, as under load
    spools = [BodySpool(1024**2, Path(sys.argv[1])) for _ in range(8)]
    for spool in spools:
        for _ in range(16):
            spool.write(bytearray(piece))
        spool.scan_target()
    for spool in spools:
        spool.close()

body()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    body()
print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 160)
"""


def test_tuned_allocator_reuses_memory_for_bodies(tmp_path: Path) -> None:
    def faults(mode: str) -> tuple[str, float]:
        proc = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, str(tmp_path), mode], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parents[2])
        tuned, per_body = proc.stdout.split()
        return tuned, float(per_body)

    tuned, per_body = faults("tuned")
    if tuned != "True":
        # Only glibc has mallopt; CI runs on glibc, where not tuning is a failure.
        if os.environ.get("CI"):
            pytest.fail("mallopt did not take on the CI machine")
        pytest.skip("no glibc mallopt here")
    _, untuned = faults("plain")
    # A 1 MiB body is 256 pages: untuned, most of them are faulted in anew.
    assert per_body < 8 < untuned, (per_body, untuned)

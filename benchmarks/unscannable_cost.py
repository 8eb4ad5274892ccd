"""What an unscannable body costs the scanner: time to a verdict per case.

    PYTHONPATH=. .venv/bin/python -m benchmarks.unscannable_cost [--rules DIR] [--repeat N]

Each case is scanned by ``YaraScanner.scan_blocking`` in a worker thread (as
the gateway runs it) with the default ``[scan]`` settings over the bundled
rules, and the median of ``--repeat`` runs is printed with the verdict, the
bytes handed to YARA and the throughput on the wire.  Figures, not a test:
timings vary with the machine.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import statistics
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import brotli
import zstandard

from gateway.config import PROJECT_ROOT, ScanSettings
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner

# Built at run time so no file holds the EICAR string itself.
EICAR = base64.b64decode(
    "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
MIB = 1024**2


def cases() -> list[tuple[str, bytes, str]]:
    text = b"".join(b"<p>line %d of an ordinary page</p>\n" % i for i in range(30_000))  # ~1 MiB
    rand = os.urandom(MIB)
    return [
        ("gzip 1 MiB text (clean, baseline)", gzip.compress(text), "gzip"),
        ("gzip 1 MiB text + 1 MiB trailing random", gzip.compress(text) + rand, "gzip"),
        ("gzip 1 MiB text + EICAR trailing", gzip.compress(text) + EICAR, "gzip"),
        ("zstd 1 MiB text + 1 MiB trailing random", zstandard.ZstdCompressor().compress(text) + rand, "zstd"),
        ("deflate 1 MiB text + 1 MiB trailing random", zlib.compress(text) + rand, "deflate"),
        ("gzip bomb: 10 MiB zeros + EICAR", gzip.compress(bytes(10 * MIB) + EICAR, 9), "gzip"),
        ("gzip bomb: 1 GiB zeros", gzip.compress(bytes(1024 * MIB), 1), "gzip"),
        ("zstd bomb: 1 GiB zeros", zstandard.ZstdCompressor().compress(bytes(1024 * MIB)), "zstd"),
        ("br bomb: 1 GiB zeros", brotli.compress(bytes(1024 * MIB), quality=5), "br"),
        ("gzip 1 MiB random, truncated at half", gzip.compress(rand)[: MIB // 2], "gzip"),
    ]


def in_thread(f: Callable[[], Verdict]) -> tuple[Verdict, float]:
    out: list[tuple[Verdict, float]] = []

    def run() -> None:
        started = time.perf_counter()
        verdict = f()
        out.append((verdict, time.perf_counter() - started))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, default=PROJECT_ROOT / "rules")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    manager = RulesManager(args.rules, None, None, 0)  # type: ignore[arg-type]
    manager.load_now()
    with tempfile.TemporaryDirectory() as spool:
        scanner = YaraScanner(manager, None, None, ScanSettings(), Path(spool))
        print(f"{'case':45} {'wire':>9} {'verdict':32} {'scanned':>10} {'median ms':>10} {'MB/s wire':>9}")
        for name, body, coding in cases():
            context = ScanContext(direction="response", content_encoding=coding)
            runs = [in_thread(lambda body=body, ctx=context: scanner.scan_blocking(body, ctx))
                    for _ in range(args.repeat)]
            verdict = runs[0][0]
            median = statistics.median(seconds for _, seconds in runs)
            # getattr: the same script runs against a tree from before the unscannable verdict
            label = " ".join(filter(None, (verdict.outcome, getattr(verdict, "reason", verdict.detail),
                                           getattr(verdict, "action", ""))))
            print(f"{name:45} {len(body):>9} {label:32} {verdict.scanned_bytes:>10} "
                  f"{median * 1000:>10.1f} {len(body) / median / 1e6:>9.1f}")


if __name__ == "__main__":
    main()

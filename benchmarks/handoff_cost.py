"""What handing a scan to a thread and its verdict back costs: CPU µs per job.

    PYTHONPATH=. .venv/bin/python -m benchmarks.handoff_cost [--jobs N] [--in-flight K]

The job does nothing, so only the hand-off is measured: ``deferToThreadPool``
on Twisted's ``ThreadPool`` (the gateway before issue 9) against the
gateway's ``ScanPool`` with its ``CompletionQueue``, both on the real
reactor with ``--in-flight`` jobs outstanding (8: the benchmark suite's
connections), run one after the other in this process, best of three.
Prints process CPU and wall time per job and the ratio lean / Twisted.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from gateway.scanning.handoff import CompletionQueue, ScanPool


def _nothing() -> None:
    return None


def _drive(submit: Callable[[], Deferred[Any]], jobs: int, in_flight: int) -> tuple[float, float]:
    """(CPU s, wall s) for ``jobs`` jobs, ``in_flight`` at a time, on the running reactor."""
    state = {"started": 0, "done": 0}
    finished: Deferred[None] = Deferred()

    def completed(_: object) -> None:
        state["done"] += 1
        if state["done"] == jobs:
            finished.callback(None)
        elif state["started"] < jobs:
            state["started"] += 1
            submit().addCallback(completed)

    cpu0, wall0 = sum(os.times()[:2]), time.perf_counter()
    for _ in range(min(in_flight, jobs)):
        state["started"] += 1
        submit().addCallback(completed)
    result: list[tuple[float, float]] = []
    finished.addCallback(lambda _: result.append((sum(os.times()[:2]) - cpu0, time.perf_counter() - wall0)))
    while not result:
        reactor.iterate(0.01)  # type: ignore[attr-defined]
    return result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    twisted_pool = ThreadPool(minthreads=args.threads, maxthreads=args.threads, name="twisted")
    lean_pool = ScanPool(args.threads, name="lean")
    completions = CompletionQueue(reactor)
    twisted_pool.start()
    lean_pool.start()
    rows = {}
    try:
        for name, submit in [
            ("Twisted ThreadPool + deferToThreadPool", lambda: deferToThreadPool(reactor, twisted_pool, _nothing)),
            ("ScanPool + CompletionQueue", lambda: completions.run(lean_pool, _nothing)),
        ]:
            best = min((_drive(submit, args.jobs, args.in_flight) for _ in range(3)), key=lambda r: r[0])
            rows[name] = best
            cpu, wall = best
            print(f"{name:<40} {1e6 * cpu / args.jobs:8.1f} CPU µs/job {1e6 * wall / args.jobs:8.1f} wall µs/job")
    finally:
        twisted_pool.stop()
        lean_pool.stop()
    (tc, tw), (lc, lw) = rows.values()
    print(f"lean / Twisted: CPU {lc / tc:.2f}, wall {lw / tw:.2f}; "
          f"{completions.delivered} results in {completions.drains} reactor calls "
          f"({completions.delivered / max(1, completions.drains):.1f} per wake-up)")


if __name__ == "__main__":
    main()

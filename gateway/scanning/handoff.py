"""Work between the reactor and the scanning threads, both ways, cheaply.

To the threads: :class:`ScanPool`, a fixed set of threads taking jobs from
one ``queue.SimpleQueue`` (a C deque and a lock: one ``put``, one ``get``).
Twisted's ``ThreadPool`` wraps each job in a context call and hands it
through a coordinator (``twisted._threads``: a lock-worker queue and a
condition per idle worker); for a 1 KiB scan that bookkeeping was a large
share of the reactor thread's own time.  It keeps Twisted's job interface,
``callInThreadWithCallback``, so ``deferToThreadPool`` (reloads, polls) runs
on it unchanged.  Deadlines are not the pool's business: a scan carries its
own timeout into the engine (``[scan] timeout``), and the protocol's scan
timer answers a transaction whose verdict is late.

Back to the reactor: :class:`CompletionQueue`.  ``callFromThread`` per
result writes the waker pipe and takes the reactor's lock each time; here a
finished scan appends to a deque, and only the one that finds it empty
schedules a drain, so every verdict ready by the time the reactor wakes up
is delivered in one call.

Neither way at all: :class:`InlineScans`.  Even batched, the round trip
through a thread costs CPU that a cheap scan does not: a queue put that
wakes a thread, the GIL handed over and back, the waker pipe and an epoll
wake-up.  Measured with the benchmark suite (1 KiB RESPMOD, empty ruleset,
8 connections, 2 workers): 0.41 ms of CPU per transaction through the
threads, 0.24 ms with the scan run where the body is (see
benchmarks/README.md).  So a scan the estimate says is cheaper than that
hand-off runs on the reactor thread; every other one goes to the pool.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "INLINE_MAX_BYTES",
    "INLINE_STALL_SECONDS",
    "INLINE_TIMEOUT",
    "SIZE_CLASSES",
    "CompletionQueue",
    "InlineScans",
    "Pool",
    "ScanPool",
    "size_class",
]

log = Logger(namespace="gateway.scanning.handoff")

OnResult = Callable[[bool, Any], None]


class Pool(Protocol):
    """What runs work off the reactor: Twisted's ThreadPool interface, the part
    ``deferToThreadPool`` uses (tests give a synchronous stand-in)."""

    def callInThreadWithCallback(self, onResult: OnResult | None, func: Callable[..., Any],
                                 *args: Any, **kw: Any) -> None: ...


_STOP = object()
_names = itertools.count(1)


class ScanPool:
    """``threads`` threads named ``<name>-N``, started by :meth:`start` and
    joined by :meth:`stop`.  Work given before ``start`` waits for it; work
    given after ``stop`` fails at once (``onResult(False, Failure)``)."""

    def __init__(self, threads: int, name: str = "yara-scan",
                 on_thread_start: Callable[[], None] | None = None) -> None:
        self.max = threads
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._on_thread_start = on_thread_start

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads or self._stopped:
            return
        for _ in range(self.max):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{next(_names)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish the jobs already queued, then end the threads (join them)."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def callInThreadWithCallback(self, onResult: OnResult | None, func: Callable[..., Any],
                                 *args: Any, **kw: Any) -> None:
        if self._stopped:
            if onResult is not None:
                onResult(False, Failure(RuntimeError("scanning pool stopped")))
            return
        self._jobs.put((onResult, func, args, kw))

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)

    def _work(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            on_result, func, args, kw = job
            try:
                result = func(*args, **kw)
                ok = True
            except BaseException:
                result, ok = Failure(), False
            del job, func, args, kw  # a finished body is not kept alive while the thread waits
            if on_result is None:
                if not ok:
                    log.failure("scanning pool job failed", result)
                continue
            try:
                on_result(ok, result)
            except BaseException:
                log.failure("scanning pool result callback failed")
            del result, on_result


class CompletionQueue:
    """Results finished in any thread, handed to their receivers on the reactor
    thread in batches: one ``callFromThread`` per reactor wake-up, not per result."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._lock = threading.Lock()
        self._ready: deque[tuple[Callable[[Any], object], Any]] = deque()
        self._scheduled = False
        self.drains = 0  # reactor calls made (measurements, tests)
        self.delivered = 0

    def deliver(self, receiver: Callable[[Any], object], value: Any) -> None:
        """From any thread: call ``receiver(value)`` on the reactor thread."""
        with self._lock:
            self._ready.append((receiver, value))
            if self._scheduled:
                return
            self._scheduled = True
        self._reactor.callFromThread(self._drain)

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, deque()
            self._scheduled = False
        self.drains += 1
        self.delivered += len(ready)
        for receiver, value in ready:
            try:
                receiver(value)
            except Exception:  # one receiver's bug must not strand the others' results
                log.failure("completion receiver failed")

    def _settle(self, d: Deferred[Any], ok: bool, result: Any) -> None:
        self.deliver(d.callback if ok else d.errback, result)

    def run(self, pool: Pool, func: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """``deferToThreadPool`` with the result coming back through this queue."""
        d: Deferred[Any] = Deferred()
        pool.callInThreadWithCallback(partial(self._settle, d), func, *args)
        return d


# Bodies larger than this never run on the reactor, whatever the estimate:
# the estimate is learnt mostly from small bodies, and a reactor stall must
# stay bounded by a small input even when a body hits a rule's worst case.
# 64 KiB is one Twisted read; two thirds of web responses are smaller
# (benchmarks/webmix.py).
INLINE_MAX_BYTES = 64 * 1024
# Scans of a new ruleset (of one size class) that go to the pool before any
# of that class may run inline: the estimate needs a few measurements of
# the set it speaks for.
INLINE_LEARN_SCANS = 16
# A scan of a small body that took this much CPU, inline or in a thread,
# ends inline scans of its ruleset for good (until a reload brings changed
# rules: a new version): some body hits one of its rules' slow paths, and a
# peer can send it again.  An attacker may thus turn the optimisation off, never on; the
# worst an inline scan can do is once per ruleset and worker, for at most
# INLINE_TIMEOUT.  Ordinary spikes (a collector pause, a cold cache) stay
# well under it: the running mean absorbs those.
INLINE_STALL_SECONDS = 0.02
# The timeout of an inline scan, in YARA's whole seconds (its shortest): a
# body that reaches it was no verdict yet, and is scanned again in the
# threads with all of ``[scan] timeout``.
INLINE_TIMEOUT = 1
# Weight of the newest measurement in the running mean (1/8: a few dozen
# scans move it; one outlier does not).
_EWMA_WEIGHT = 0.125


def size_class(size: int) -> int:
    """0: up to 1 KiB, 1: up to 2 KiB, ... 6: up to 64 KiB (INLINE_MAX_BYTES).
    A scan costs a fixed part and a part per byte, in proportions that vary
    with the rules: a mean per power of two follows both without a model."""
    return max(0, (size - 1).bit_length() - 10)


SIZE_CLASSES = size_class(INLINE_MAX_BYTES) + 1


class _Estimate:
    """One ruleset version's: the mean CPU seconds of a scan per size class."""

    __slots__ = ("closed", "counts", "means", "ruleset")

    def __init__(self, ruleset: str | None) -> None:
        self.ruleset = ruleset
        self.means = [0.0] * SIZE_CLASSES
        self.counts = [0] * SIZE_CLASSES
        self.closed = False  # a stall: no inline scan of this ruleset any more


def _learnt_mean(estimate: _Estimate, ruleset: str, size: int) -> float | None:
    """The mean CPU seconds of a scan of ``size`` bytes with ``ruleset``,
    once INLINE_LEARN_SCANS scans of its size class taught it; else None
    (a body too large to be estimated, another ruleset, still learning)."""
    if size > INLINE_MAX_BYTES or estimate.ruleset != ruleset:
        return None
    c = size_class(size)
    return estimate.means[c] if estimate.counts[c] >= INLINE_LEARN_SCANS else None


class InlineScans:
    """Decides, per scan, whether it runs on the reactor thread: only a
    small body (``INLINE_MAX_BYTES``) of a ruleset whose scans of that size
    were measured to take less than ``budget`` seconds of CPU, and never
    again once one of its scans stalled (INLINE_STALL_SECONDS).  ``budget``
    0: never.

    Only full scans teach the mean: a verdict from the cache or a body
    refused unscanned costs nothing like a scan, and would make an expensive
    size class look cheap; any scan can be a stall.

    One estimate per ruleset version (what the caller hands in as
    ``ruleset``): a reload of unchanged files (any SIGHUP) keeps it, closure
    and all; changed rules start over.  The caller reports only scans of the
    current set: a scan queued before a reload would otherwise reset the new
    set's estimate.  :meth:`observe` is called from the scanning threads and
    the reactor at once: each update is one list item (or the whole
    estimate) replaced, so a race loses a measurement, never corrupts one."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._estimate = _Estimate(None)
        self.stalls = 0  # scans that ended inline scans of their ruleset

    def allows(self, ruleset: str, size: int) -> bool:
        if self.budget <= 0:
            return False
        estimate = self._estimate
        mean = _learnt_mean(estimate, ruleset, size)
        return mean is not None and not estimate.closed and mean <= self.budget

    def cheaper_than(self, ruleset: str, size: int, seconds: float) -> bool:
        """Scans of ``size`` bytes with ``ruleset`` were measured (learnt, as
        for :meth:`allows`) to cost under ``seconds`` of CPU on average.
        Inline scans or not: the verdict cache asks it too."""
        mean = _learnt_mean(self._estimate, ruleset, size)
        return mean is not None and mean < seconds

    def observe(self, ruleset: str, size: int, seconds: float, *, full: bool = True) -> bool:
        """A scan of ``size`` bytes with ``ruleset`` took ``seconds`` of CPU;
        ``full``: it really scanned the body (no cache hit, no early refusal),
        so it teaches the mean.  True when it was a stall, which ends inline
        scans of ``ruleset``."""
        if size > INLINE_MAX_BYTES:
            return False
        estimate = self._estimate
        if estimate.ruleset != ruleset:  # a version: the same files recompiled (SIGHUP) keep their estimate
            self._estimate = estimate = _Estimate(ruleset)
        if seconds > INLINE_STALL_SECONDS:
            if estimate.closed:
                return False
            estimate.closed = True
            self.stalls += 1
            return True
        if full:
            c = size_class(size)
            count = estimate.counts[c]
            # The plain mean while learning, then a running one.
            weight = 1 / (count + 1) if count < INLINE_LEARN_SCANS else _EWMA_WEIGHT
            estimate.means[c] += (seconds - estimate.means[c]) * weight
            estimate.counts[c] = count + 1
        return False

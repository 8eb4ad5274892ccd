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

__all__ = ["CompletionQueue", "Pool", "ScanPool"]

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

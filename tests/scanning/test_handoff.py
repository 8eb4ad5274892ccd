"""The scanning pool and the completion queue that hands results to the reactor."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.config import ScanSettings
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.handoff import CompletionQueue, ScanPool
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner

from .conftest import BUNDLED_RULES, EICAR


class HeldReactor:
    """Keeps what ``callFromThread`` is given until the test runs it: a reactor
    that has not woken up yet."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []
        self.lock = threading.Lock()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        with self.lock:
            self.calls.append(lambda: f(*args))

    def wake(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for call in calls:
            call()


def fired(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_results_ready_before_the_reactor_wakes_come_in_one_call() -> None:
    reactor = HeldReactor()
    queue = CompletionQueue(reactor)
    deferreds = [Deferred[int]() for _ in range(5)]
    results = [fired(d) for d in deferreds]
    for i, d in enumerate(deferreds):
        queue.deliver(d.callback, i)
    assert len(reactor.calls) == 1 and results == [[]] * 5  # nothing fires off the reactor
    reactor.wake()
    assert results == [[0], [1], [2], [3], [4]]
    assert (queue.drains, queue.delivered) == (1, 5)
    # Emptied: the next result schedules a new drain.
    late = Deferred[int]()
    queue.deliver(late.callback, 9)
    assert len(reactor.calls) == 1
    reactor.wake()
    assert fired(late) == [9] and queue.drains == 2


def test_a_failing_receiver_does_not_strand_the_others() -> None:
    reactor = HeldReactor()
    queue = CompletionQueue(reactor)
    got: list[int] = []

    def broken(value: int) -> None:
        raise ValueError(value)

    queue.deliver(broken, 1)
    queue.deliver(got.append, 2)
    reactor.wake()
    assert got == [2]


def test_pool_runs_in_its_threads_and_reports_errors() -> None:
    reactor = HeldReactor()
    queue = CompletionQueue(reactor)
    pool = ScanPool(2, name="test-scan")
    pool.start()
    try:
        names = [queue.run(pool, lambda: threading.current_thread().name) for _ in range(6)]
        broken = queue.run(pool, lambda: 1 // 0)
        outs = [fired(d) for d in names]
        broken_out = fired(broken)
    finally:
        pool.stop()  # finishes the queued jobs first
    reactor.wake()
    assert all(o and o[0].startswith("test-scan-") for o in outs)
    assert isinstance(broken_out[0], Failure) and broken_out[0].check(ZeroDivisionError)
    assert queue.drains <= len(names) + 1


def test_work_before_start_waits_and_after_stop_fails() -> None:
    reactor = HeldReactor()
    queue = CompletionQueue(reactor)
    pool = ScanPool(1)
    early = fired(queue.run(pool, lambda: "ran"))
    pool.start()
    pool.stop()
    reactor.wake()
    assert early == ["ran"]
    late = fired(queue.run(pool, lambda: "never"))
    reactor.wake()
    assert isinstance(late[0], Failure) and late[0].check(RuntimeError)


def test_thread_start_hook_runs_in_each_thread() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def hook() -> None:
        with lock:
            seen.append(threading.current_thread().name)

    pool = ScanPool(3, name="hooked", on_thread_start=hook)
    pool.start()
    pool.stop()
    assert len(seen) == 3 and all(name.startswith("hooked-") for name in seen)


@pytest.mark.parametrize("threads", [1, 2])
def test_stop_joins_every_thread(threads: int) -> None:
    pool = ScanPool(threads, name="joined")
    pool.start()
    pool.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("joined-")]


def test_scan_then_delivers_verdicts_without_a_deferred(tmp_path: Path) -> None:
    reactor = HeldReactor()
    pool = ScanPool(2)
    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0)
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path)
    verdicts: list[Verdict] = []
    pool.start()
    try:
        for body in (b"clean", EICAR, b"also clean"):
            scanner.scan_then(body, ScanContext(direction="response"), verdicts.append)
    finally:
        pool.stop()
    assert verdicts == []  # only on the reactor thread
    reactor.wake()
    assert sorted(v.outcome for v in verdicts) == ["blocked", "clean", "clean"]


def test_a_stopped_pool_is_an_engine_error_verdict(tmp_path: Path) -> None:
    reactor = HeldReactor()
    pool = ScanPool(1)
    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0)
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path)
    pool.start()
    pool.stop()
    out = fired(scanner.scan(b"anything", ScanContext(direction="response")))
    reactor.wake()
    assert (out[0].outcome, out[0].reason, out[0].action) == ("unscannable", "engine-error", "block")

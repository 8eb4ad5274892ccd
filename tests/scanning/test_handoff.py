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
from gateway.scanning.handoff import (
    INLINE_LEARN_SCANS,
    INLINE_MAX_BYTES,
    INLINE_STALL_SECONDS,
    SIZE_CLASSES,
    CompletionQueue,
    InlineScans,
    ScanPool,
    size_class,
)
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


# --- inline scans -------------------------------------------------------------


def learnt(inline: InlineScans, ruleset: str, seconds: float, size: int = 1024,
           scans: int = INLINE_LEARN_SCANS) -> None:
    for _ in range(scans):
        inline.observe(ruleset, size, seconds)


def test_inline_only_after_learning_and_within_the_budget() -> None:
    inline = InlineScans(budget=100e-6)
    rules = "v1"
    assert not inline.allows(rules, 1024)  # nothing known yet: to the threads
    learnt(inline, rules, 20e-6, scans=INLINE_LEARN_SCANS - 1)
    assert not inline.allows(rules, 1024)  # still learning
    learnt(inline, rules, 20e-6, scans=1)
    assert inline.allows(rules, 1024)
    assert inline.allows(rules, 1000)  # the same size class
    assert not inline.allows(rules, 1025)  # the next one: not learnt yet
    learnt(inline, rules, 90e-6, size=8 * 1024)
    assert inline.allows(rules, 8 * 1024)
    learnt(inline, rules, 170e-6, size=16 * 1024)
    assert not inline.allows(rules, 16 * 1024)  # over the budget
    assert not inline.allows("v2", 1024)  # changed rules (a reload): learnt anew
    assert [size_class(n) for n in (0, 1, 1024, 1025, 2048, 65536)] == [0, 0, 0, 1, 1, SIZE_CLASSES - 1]


def test_inline_never_above_the_size_cap_or_with_a_zero_budget() -> None:
    inline = InlineScans(budget=1.0)
    rules = "v1"
    learnt(inline, rules, 1e-9, size=INLINE_MAX_BYTES)
    assert inline.allows(rules, INLINE_MAX_BYTES)
    assert not inline.allows(rules, INLINE_MAX_BYTES + 1)
    off = InlineScans(budget=0)
    learnt(off, rules, 1e-9)
    assert not off.allows(rules, 10)


def test_expensive_scans_move_the_estimate_back_to_the_threads() -> None:
    inline = InlineScans(budget=100e-6)
    rules = "v1"
    learnt(inline, rules, 20e-6)
    assert inline.allows(rules, 1024)
    for _ in range(8):  # the ruleset got expensive (or inline scans cost more)
        inline.observe(rules, 1024, 400e-6)
    assert not inline.allows(rules, 1024)


def test_a_stall_ends_inline_scans_of_the_ruleset_for_good() -> None:
    inline = InlineScans(budget=100e-6)
    rules = "v1"
    learnt(inline, rules, 20e-6)
    assert not inline.observe(rules, 1024, INLINE_STALL_SECONDS, full=False)  # slow, but not a stall
    assert inline.allows(rules, 1024)
    assert inline.observe(rules, 1024, INLINE_STALL_SECONDS * 1.01, full=False)  # any scan can stall
    assert inline.stalls == 1
    assert not inline.allows(rules, 1024)
    learnt(inline, rules, 1e-6, scans=1000)  # cheap scans do not open it again
    assert not inline.allows(rules, 1024)
    assert not inline.observe(rules, 1024, 1.0)  # counted once
    assert inline.stalls == 1
    fresh = "v2"  # changed rules: learnt anew
    learnt(inline, fresh, 20e-6)
    assert inline.allows(fresh, 1024)


def test_only_full_scans_teach_the_mean() -> None:
    inline = InlineScans(budget=100e-6)
    rules = "v1"
    for _ in range(10 * INLINE_LEARN_SCANS):  # cache hits, refusals: cheap, and no measure of a scan
        inline.observe(rules, 30_000, 20e-6, full=False)
    assert not inline.allows(rules, 30_000)
    learnt(inline, rules, 5e-3, size=30_000)  # what scanning such a body really costs
    assert not inline.allows(rules, 30_000)


def _scanner(tmp_path: Path, reactor: Any, pool: ScanPool, **settings: Any) -> YaraScanner:
    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0)
    manager.load_now()
    return YaraScanner(manager, reactor, pool, ScanSettings(**settings), tmp_path)


def test_cheap_scans_run_on_the_calling_thread_once_learnt(tmp_path: Path) -> None:
    reactor = HeldReactor()
    pool = ScanPool(1)
    scanner = _scanner(tmp_path, reactor, pool, inline_budget=1.0)  # everything small is "cheap"
    context = ScanContext(direction="response")
    verdicts: list[Verdict] = []
    pool.start()
    try:
        for i in range(INLINE_LEARN_SCANS):  # learning: through the pool, back on the reactor's wake-up
            scanner.scan_then(b"clean %d" % i, context, verdicts.append)
    finally:
        pool.stop()
    assert verdicts == []
    reactor.wake()
    assert len(verdicts) == INLINE_LEARN_SCANS and not any(v.inline for v in verdicts)
    # The pool is stopped: only an inline scan can still give real verdicts.
    verdicts.clear()
    scanner.scan_then(EICAR, context, verdicts.append)
    scanner.scan_then(b"clean", context, verdicts.append)
    assert [v.outcome for v in verdicts] == ["blocked", "clean"]  # at once, in this thread
    assert verdicts[0].rules
    assert all(v.inline for v in verdicts)  # for the metrics
    # Never inline: an encoded body (decoding is not bounded by its size), a large one.
    scanner.scan_then(b"clean", ScanContext(direction="response", content_encoding="gzip"), verdicts.append)
    scanner.scan_then(b"x" * (INLINE_MAX_BYTES + 1), context, verdicts.append)
    reactor.wake()
    assert [(v.outcome, v.reason) for v in verdicts[2:]] == [("unscannable", "engine-error")] * 2  # the pool's


def assert_all_through_the_pool(scanner: YaraScanner, reactor: HeldReactor, pool: ScanPool) -> None:
    """Twice the learning scans, and not one verdict before the reactor wakes."""
    verdicts: list[Verdict] = []
    pool.start()
    try:
        for _ in range(2 * INLINE_LEARN_SCANS):
            scanner.scan_then(b"clean", ScanContext(direction="response"), verdicts.append)
    finally:
        pool.stop()
    assert verdicts == []  # none given before the reactor woke: all went through the pool
    reactor.wake()
    assert len(verdicts) == 2 * INLINE_LEARN_SCANS


def test_no_inline_scans_with_a_zero_budget(tmp_path: Path) -> None:
    reactor = HeldReactor()
    pool = ScanPool(1)
    assert_all_through_the_pool(_scanner(tmp_path, reactor, pool, inline_budget=0), reactor, pool)


class NotInCaller:
    """An engine whose match waits on another process (YARA-X's kind)."""

    name = "fake-remote"
    tag = b"remote"
    runs_in_caller = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def compile(self, version: str, sources: Any) -> Any:
        return self.inner.compile(version, sources)

    def match(self, rules: Any, target: Any, externals: Any, timeout: int) -> list[str]:
        return self.inner.match(rules, target, externals, timeout)

    def close(self) -> None:
        pass


def test_an_engine_that_waits_on_another_process_never_runs_inline(tmp_path: Path) -> None:
    from gateway.scanning.yara_engine import YaraEngine

    reactor = HeldReactor()
    pool = ScanPool(1)
    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0, engine=NotInCaller(YaraEngine()))
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(inline_budget=1.0), tmp_path)
    assert_all_through_the_pool(scanner, reactor, pool)


def test_cheaper_than_needs_a_learnt_mean_of_the_same_ruleset() -> None:
    inline = InlineScans(budget=0)  # inline scans off: the estimate still serves the cache
    assert not inline.cheaper_than("v1", 1024, 50e-6)
    learnt(inline, "v1", 10e-6, scans=INLINE_LEARN_SCANS - 1)
    assert not inline.cheaper_than("v1", 1024, 50e-6)  # still learning
    learnt(inline, "v1", 10e-6, scans=1)
    assert inline.cheaper_than("v1", 1024, 50e-6)
    assert not inline.cheaper_than("v1", 1024, 10e-6)  # not under it
    assert not inline.cheaper_than("v2", 1024, 50e-6)  # another ruleset
    assert not inline.cheaper_than("v1", 4096, 50e-6)  # another size class, not learnt
    assert not inline.cheaper_than("v1", 128 * 1024, 1.0)  # above INLINE_MAX_BYTES: never measured
    learnt(inline, "v1", 5e-3, scans=1)  # one expensive scan moves the running mean over
    assert not inline.cheaper_than("v1", 1024, 50e-6)

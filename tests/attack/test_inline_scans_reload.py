"""Findings of a second attack on inline scans (gateway.scanning.handoff.InlineScans,
YaraScanner._scan_inline): what a reload does to a ruleset's stall closure,
and the re-scan after an inline timeout when [scan] timeout is no longer.
Each test failed before its fix."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.config import ScanSettings
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.handoff import INLINE_LEARN_SCANS, INLINE_STALL_SECONDS, INLINE_TIMEOUT
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner
from tests.attack.test_inline_scans import LOOP_RULE, REGEX_RULE
from tests.scanning.conftest import SyncPool, SyncReactor, write_rule

CONTEXT = ScanContext(direction="response")
# ~1 ms of CPU per KiB with REGEX_RULE: a stall (> INLINE_STALL_SECONDS), far
# under INLINE_TIMEOUT, so the test stays short.
STALL_BODY = (b"<script" * 6000)[:40_000]


def _scan(scanner: YaraScanner, pool: SyncPool, body: bytes) -> tuple[Verdict, bool]:
    out: list[Verdict] = []
    calls = pool.calls
    scanner.scan_then(body, CONTEXT, out.append)
    assert len(out) == 1
    return out[0], pool.calls == calls  # (verdict, scanned inline?)


def _train(scanner: YaraScanner, pool: SyncPool) -> bool:
    """Cheap 32-64 KiB bodies until the class is learnt; True when the next one runs inline."""
    for i in range(3 * INLINE_LEARN_SCANS):
        _scan(scanner, pool, b"%08d" % i + b"x" * 39_992)
    return _scan(scanner, pool, b"trained!" + b"x" * 39_992)[1]


def _setup(tmp_path: Path, rule: str = REGEX_RULE, **settings: float) -> tuple[RulesManager, YaraScanner, SyncPool]:
    write_rule(tmp_path / "rules", "r.yar", rule)
    pool, reactor = SyncPool(), SyncReactor()
    manager = RulesManager(tmp_path / "rules", reactor, pool, interval=0)  # type: ignore[arg-type]
    manager.load_now()
    scanner = YaraScanner(manager, reactor, pool, ScanSettings(**settings), tmp_path / "spool")  # type: ignore[arg-type]
    return manager, scanner, pool


def _stall(scanner: YaraScanner, pool: SyncPool) -> None:
    started = time.thread_time()
    verdict, inline = _scan(scanner, pool, STALL_BODY)
    assert inline and verdict.outcome == "clean"
    assert time.thread_time() - started > INLINE_STALL_SECONDS  # really a stall on the "reactor"


def test_a_sighup_that_changes_no_rule_does_not_reopen_inline_scans_of_a_stalled_ruleset(tmp_path: Path) -> None:
    # InlineScans keys its estimate on the CompiledRules object, and
    # every SIGHUP (also one sent for certificates or tenant tables, chained in
    # gateway.serve) recompiles the same files into a new object: the closure
    # ("until a reload brings a new set") is forgotten, the same body stalls
    # the reactor again after 16 learning scans.
    manager, scanner, pool = _setup(tmp_path)
    assert _train(scanner, pool)
    _stall(scanner, pool)
    assert scanner._inline.stalls == 1
    version = manager.version
    result: list[bool] = []
    manager.reload().addCallback(result.append)  # what SIGHUP does
    assert result == [True] and manager.version == version  # the same set
    inline_again = _train(scanner, pool)
    _scan(scanner, pool, STALL_BODY)
    assert (inline_again, scanner._inline.stalls) == (False, 1)


def test_a_scan_of_the_previous_set_finishing_after_a_reload_does_not_reopen_inline_scans(tmp_path: Path) -> None:
    # A scan queued before a reload finishes in its thread after the swap:
    # InlineScans.observe(old set) replaces the new set's estimate, closure and
    # all; the next scan of the new set starts a fresh, open one.
    manager, scanner, pool = _setup(tmp_path)
    old = manager.current
    assert old is not None
    write_rule(tmp_path / "rules", "r.yar", REGEX_RULE + "\n// edited\n")
    manager.reload()
    assert manager.current is not old
    assert _train(scanner, pool)
    _stall(scanner, pool)  # the new set is closed now
    scanner._scan_measured(b"queued before the reload", CONTEXT, old)  # what the pool thread runs, late
    inline_again = _train(scanner, pool)
    _scan(scanner, pool, STALL_BODY)
    assert (inline_again, scanner._inline.stalls) == (False, 1)


def test_an_inline_timeout_is_not_scanned_again_when_scan_timeout_gives_no_more_time(tmp_path: Path) -> None:
    # [scan] timeout = 1 s (<= INLINE_TIMEOUT): the inline scan already had all
    # of it (min(INLINE_TIMEOUT, timeout)), yet "scan-timeout" sends the body
    # to the threads for a second, identical 1 s scan: twice the CPU and the
    # latency, for the same verdict.
    _, scanner, pool = _setup(tmp_path, LOOP_RULE, timeout=float(INLINE_TIMEOUT))
    assert _train(scanner, pool)
    started = time.thread_time()
    verdict, inline = _scan(scanner, pool, b"AB" * 32768)
    took = time.thread_time() - started
    assert verdict.reason == "scan-timeout"
    assert inline, f"scanned again in the pool: {took:.2f} s of CPU for one verdict"

"""RulesManager: first load, reload, polling on a Clock, SIGHUP, refusing broken sets."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from gateway.interfaces import ScanContext
from gateway.scanning.engine import RulesError
from gateway.scanning.rules import RulesManager

from .conftest import SyncPool, SyncReactor, bump, result_of, scan, write_rule

ONE = 'rule one { strings: $a = "alpha" condition: $a }\n'
TWO = 'rule two { strings: $a = "beta" condition: $a }\n'
BROKEN = 'rule broken {\n  condition:\n    true and\n}\n'

Events = list[tuple[bool, int, str]]


@pytest.fixture
def events() -> Events:
    return []


@pytest.fixture
def manager(tmp_path: Path, reactor: SyncReactor, pool: SyncPool, events: Events) -> RulesManager:
    rules = tmp_path / "rules"
    write_rule(rules, "one.yar", ONE)
    m = RulesManager(rules, reactor, pool, interval=2.0,  # type: ignore[arg-type]
                     on_loaded=lambda *a: events.append(a))
    m.load_now()
    return m


def test_load_now(manager: RulesManager, events: Events) -> None:
    assert manager.rule_count == 1
    assert len(manager.version) == 16
    assert events == [(True, 1, manager.version)]


def test_load_now_raises_and_reports(tmp_path: Path, reactor: SyncReactor, pool: SyncPool) -> None:
    write_rule(tmp_path, "bad.yar", BROKEN)
    events: Events = []
    m = RulesManager(tmp_path, reactor, pool, 2.0, on_loaded=lambda *a: events.append(a))  # type: ignore[arg-type]
    with pytest.raises(RulesError, match=r"bad\.yar:4: "):
        m.load_now()
    assert (m.version, m.rule_count, m.current) == ("", 0, None)
    assert events == [(False, 0, "")]


def test_reload_swaps_and_changes_version(manager: RulesManager, events: Events) -> None:
    old = manager.version
    write_rule(manager.directory, "two.yar", TWO)
    assert result_of(manager.reload()) is True
    assert manager.rule_count == 2
    assert manager.version != old
    assert events[-1] == (True, 2, manager.version)


def test_broken_file_keeps_old_set(manager: RulesManager, events: Events, tmp_path: Path,
                                   reactor: SyncReactor, pool: SyncPool) -> None:
    from gateway.config import ScanSettings
    from gateway.scanning.scanner import YaraScanner

    scanner = YaraScanner(manager, reactor, pool, ScanSettings(), tmp_path / "spool")  # type: ignore[arg-type]
    old = manager.version
    bad = write_rule(manager.directory, "sub/bad.yar", BROKEN)
    write_rule(manager.directory, "two.yar", TWO)
    assert result_of(manager.reload()) is False
    assert manager.version == old and manager.rule_count == 1
    assert events[-1] == (False, 1, old)
    assert manager.last_error is not None
    assert (manager.last_error.file, manager.last_error.line) == (str(bad), 4)
    # The old rules keep serving.
    verdict = scan(scanner, b"alpha beta")
    assert (verdict.rules, verdict.ruleset_version) == (("one.yar.one",), old)
    # Fixed: the next reload takes it.
    bad.unlink()
    assert result_of(manager.reload()) is True
    assert manager.last_error is None
    assert scan(scanner, b"alpha beta").rules == ("one.yar.one", "two.yar.two")


def test_polling_on_clock(manager: RulesManager, reactor: SyncReactor, pool: SyncPool,
                          events: Events) -> None:
    manager.start()
    loaded = len(events)
    reactor.advance(2.0)
    assert len(events) == loaded  # nothing changed: no recompile
    path = write_rule(manager.directory, "two.yar", TWO)
    reactor.advance(1.0)
    assert len(events) == loaded  # not yet time
    reactor.advance(1.0)
    assert events[-1] == (True, 2, manager.version)

    # A broken edit is reported once, not every interval, and the set stays.
    good = manager.version
    path.write_text(BROKEN)
    bump(path)
    reactor.advance(2.0)
    assert events[-1] == (False, 2, good)
    count = len(events)
    reactor.advance(2.0)
    reactor.advance(2.0)
    assert len(events) == count
    # The fix is picked up by the next poll.
    path.write_text(TWO.replace("beta", "gamma"))
    bump(path)
    reactor.advance(2.0)
    assert events[-1][0] is True
    assert manager.version not in ("", good)

    # A removed file is a change too.
    path.unlink()
    reactor.advance(2.0)
    assert manager.rule_count == 1
    manager.stop()
    write_rule(manager.directory, "three.yar", TWO)
    reactor.advance(10.0)
    assert manager.rule_count == 1  # stopped: no more polling


def test_polling_stats_off_the_reactor(manager: RulesManager, reactor: SyncReactor,
                                       pool: SyncPool) -> None:
    manager.start()
    calls = pool.calls
    reactor.advance(2.0)
    assert pool.calls == calls + 1  # the directory walk went to the pool


def test_interval_zero_disables_polling(tmp_path: Path, reactor: SyncReactor, pool: SyncPool) -> None:
    write_rule(tmp_path, "one.yar", ONE)
    m = RulesManager(tmp_path, reactor, pool, interval=0)  # type: ignore[arg-type]
    m.load_now()
    m.start()
    assert reactor.getDelayedCalls() == []


def test_reloads_requested_while_compiling_coalesce(manager: RulesManager, reactor: SyncReactor) -> None:
    class HeldPool:
        """Holds work until released, like a busy thread."""

        def __init__(self) -> None:
            self.held: list = []

        def callInThreadWithCallback(self, on_result, f, *args, **kw):  # type: ignore[no-untyped-def]
            self.held.append((on_result, f, args, kw))

        def run_one(self) -> None:
            on_result, f, args, kw = self.held.pop(0)
            on_result(True, f(*args, **kw))

    held = HeldPool()
    manager._pool = held  # type: ignore[assignment]
    first = manager.reload()
    second = manager.reload()
    third = manager.reload()
    assert len(held.held) == 1
    write_rule(manager.directory, "two.yar", TWO)
    held.run_one()  # the first compile, which may have started before the change ...
    assert result_of(first) is True
    assert len(held.held) == 1  # ... so one follow-up serves the two later calls
    held.run_one()
    assert result_of(second) is True and result_of(third) is True
    assert manager.rule_count == 2
    assert held.held == []


def test_sighup_reloads(manager: RulesManager) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    try:
        manager.install_sighup()
        write_rule(manager.directory, "two.yar", TWO)
        os.kill(os.getpid(), signal.SIGHUP)
        assert manager.rule_count == 2
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_scan_uses_the_set_it_started_with(manager: RulesManager, reactor: SyncReactor,
                                           tmp_path: Path) -> None:
    from gateway.config import ScanSettings
    from gateway.scanning.scanner import YaraScanner

    class HeldPool:
        def __init__(self) -> None:
            self.held: list = []

        def callInThreadWithCallback(self, on_result, f, *args, **kw):  # type: ignore[no-untyped-def]
            self.held.append(lambda: on_result(True, f(*args, **kw)))

    held = HeldPool()
    scanner = YaraScanner(manager, reactor, held, ScanSettings(), tmp_path)  # type: ignore[arg-type]
    old = manager.version
    d = scanner.scan(b"alpha beta", ScanContext(direction="response"))
    write_rule(manager.directory, "two.yar", TWO)
    manager._pool = held  # type: ignore[assignment]
    r = manager.reload()
    held.held.pop(1)()  # the reload finishes first ...
    assert result_of(r) is True
    held.held.pop(0)()  # ... then the scan that started before it
    verdict = result_of(d)
    assert (verdict.rules, verdict.ruleset_version) == (("one.yar.one",), old)

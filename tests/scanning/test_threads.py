"""The real thing: the real reactor, a real ScanPool, concurrent scans."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from gateway.config import ScanSettings
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.handoff import ScanPool
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner, make_scan_pool

from .conftest import BUNDLED_RULES, EICAR, write_rule


class RecordingScanner(YaraScanner):
    threads: set[str]

    def scan_blocking(self, *args: Any, **kwargs: Any) -> Verdict:
        self.threads.add(threading.current_thread().name)
        return super().scan_blocking(*args, **kwargs)


@pytest.fixture
def pool() -> Generator[ScanPool, None, None]:
    p = make_scan_pool(ScanSettings(threads=2))
    p.start()
    yield p
    p.stop()


def test_pool_size_follows_settings() -> None:
    assert make_scan_pool(ScanSettings(threads=3)).max == 3
    assert make_scan_pool(ScanSettings(threads=0)).max >= 1


@pytest_twisted.inlineCallbacks
def test_concurrent_scans_off_the_reactor(pool: ScanPool, tmp_path: Path) -> Any:
    from twisted.internet import reactor

    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0)
    manager.load_now()
    scanner = RecordingScanner(manager, reactor, pool, ScanSettings(), tmp_path)
    scanner.threads = set()
    bodies = [gzip.compress(b"x" * 100_000 + (EICAR if i % 2 else b"")) for i in range(8)]
    verdicts = yield defer.gatherResults([
        scanner.scan(body, ScanContext(direction="response", content_encoding="gzip"))
        for body in bodies
    ])
    assert [v.outcome for v in verdicts] == ["clean", "blocked"] * 4
    assert threading.current_thread().name not in scanner.threads
    assert scanner.threads and all("yara-scan" in name for name in scanner.threads)


@pytest_twisted.inlineCallbacks
def test_reload_in_the_pool(pool: ScanPool, tmp_path: Path) -> Any:
    from twisted.internet import reactor

    write_rule(tmp_path, "a.yar", 'rule a { strings: $a = "one" condition: $a }\n')
    events: list[tuple[bool, int, str]] = []
    manager = RulesManager(tmp_path, reactor, pool, 0, on_loaded=lambda *a: events.append(a))
    manager.load_now()
    write_rule(tmp_path, "b.yar", "rule b { condition: nope }\n")
    ok = yield manager.reload()
    assert ok is False and manager.rule_count == 1
    write_rule(tmp_path, "b.yar", "rule b { condition: true }\n")
    ok = yield manager.reload()
    assert ok is True and manager.rule_count == 2
    assert [e[0] for e in events] == [True, False, True]


@pytest_twisted.inlineCallbacks
def test_reload_compiles_outside_the_scanning_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A compile fragments the malloc arena of its thread, which then slows every
    scan there (gateway.scanning.rules.make_rules_pool): the gateway's rules
    manager compiles in its own thread."""
    from twisted.internet import reactor

    from gateway.config import parse_config
    from gateway.scanning import rules as rules_module
    from gateway.service import build_gateway

    write_rule(tmp_path / "rules", "a.yar", 'rule a { strings: $a = "one" condition: $a }\n')
    config = parse_config({"server": {"state_dir": str(tmp_path / "state"), "listen": ["tcp:0:interface=127.0.0.1"]},
                           "scan": {"rules": str(tmp_path / "rules"), "threads": 2},
                           "monitoring": {"metrics_listen": "tcp:0:interface=127.0.0.1"}}, "test")
    gateway = build_gateway(config, reactor)
    compiled_in: list[str] = []
    real_compile = rules_module.compile_directory

    def recording_compile(*args: Any) -> Any:
        compiled_in.append(threading.current_thread().name)
        return real_compile(*args)

    monkeypatch.setattr(rules_module, "compile_directory", recording_compile)
    gateway.service.startService()
    try:
        verdict = yield gateway.context.scanner.scan(b"one", ScanContext(direction="response"))
        assert verdict.outcome == "blocked"
        write_rule(tmp_path / "rules", "b.yar", 'rule b { strings: $a = "two" condition: $a }\n')
        ok = yield gateway.rules.reload()
        assert ok is True
    finally:
        yield gateway.service.stopService()
    assert compiled_in and all(name.startswith("rules-compile") for name in compiled_in)


@pytest_twisted.inlineCallbacks
def test_a_stall_reaches_the_metrics_of_the_built_gateway(tmp_path: Path) -> Any:
    """build_gateway hands the scanners the observer: a stall measured in any
    thread is counted on the reactor (icap_gateway_inline_scans_closed_total)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from gateway.config import parse_config
    from gateway.service import build_gateway

    write_rule(tmp_path / "rules", "a.yar", 'rule a { strings: $a = "one" condition: $a }\n')
    config = parse_config({"server": {"state_dir": str(tmp_path / "state"), "listen": ["tcp:0:interface=127.0.0.1"]},
                           "scan": {"rules": str(tmp_path / "rules")},
                           "monitoring": {"metrics_listen": "tcp:0:interface=127.0.0.1"}}, "test")
    gateway = build_gateway(config, reactor)
    scanner = gateway.context.scanner.default
    assert gateway.rules.current is not None
    stalled = threading.Thread(target=scanner._log_stall, args=(1000, 0.05, gateway.rules.current, "a test"))
    stalled.start()
    stalled.join()
    yield deferLater(reactor, 0.05, lambda: None)  # the completion queue's reactor call
    gateway.monitoring.service.stopService()  # folds what waits
    registry = gateway.monitoring.registry
    assert registry.get_sample_value("icap_gateway_inline_scans_closed_total") == 1.0

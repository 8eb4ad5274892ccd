"""Shared helpers for the scanning tests: a synchronous pool and reactor, so
reloads and scans complete inside the call and time is a ``Clock``."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.config import ScanSettings
from gateway.interfaces import ScanContext, Verdict
from gateway.scanning.rules import RulesManager
from gateway.scanning.scanner import YaraScanner

REPO = Path(__file__).resolve().parents[2]
BUNDLED_RULES = REPO / "rules"

# Built at run time so no file of the repository holds the EICAR string itself.
EICAR = base64.b64decode(
    "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
assert len(EICAR) == 68


class SyncReactor(Clock):
    """A Clock that also runs ``callFromThread`` at once (what deferToThreadPool uses)."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class SyncPool:
    """Runs "thread" work inline: ``deferToThreadPool`` then fires synchronously."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        self.calls += 1
        try:
            result = f(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def write_rule(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bump(path: Path) -> None:
    """Make a change visible to the poller even within one mtime tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def result_of(d: Any) -> Any:
    """The result of a Deferred that has already fired (synchronous stand-ins)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def reactor() -> SyncReactor:
    return SyncReactor()


@pytest.fixture
def pool() -> SyncPool:
    return SyncPool()


@pytest.fixture
def make_scanner(
    tmp_path: Path, reactor: SyncReactor, pool: SyncPool
) -> Callable[..., YaraScanner]:
    def make(rules_dir: Path = BUNDLED_RULES, **settings: Any) -> YaraScanner:
        manager = RulesManager(rules_dir, reactor, pool, interval=0)  # type: ignore[arg-type]
        manager.load_now()
        config = dataclasses.replace(ScanSettings(), **settings)
        return YaraScanner(manager, reactor, pool, config, tmp_path / "spool")  # type: ignore[arg-type]

    return make


def scan(scanner: YaraScanner, body: bytes | str, **context: Any) -> Verdict:
    context.setdefault("direction", "response")
    return result_of(scanner.scan(body, ScanContext(**context)))

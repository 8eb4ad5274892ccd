"""The key-change listener's reconnect loop, with a fake connection and a
fake stop flag that records each back-off wait (no clock, no server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from register.db import create_register_engine
from register.listener import RECONNECT_MAX, RECONNECT_MIN, KeyChangeListener


class RecordingStop:
    """Stands in for the listener's threading.Event: records how long each
    back-off would wait and ends the loop after ``rounds`` waits."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return len(self.waits) >= self.rounds

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.is_set()

    def set(self) -> None:
        self.rounds = 0

    def clear(self) -> None: ...


class FakeResult:
    def fetchone(self) -> tuple[str]:
        return ("reg",)


class FakeInfo:
    backend_pid = 4242


class FakeConnection:
    """LISTENs, hears one notification, then the link breaks."""

    info = FakeInfo()

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None: ...

    def execute(self, query: str) -> FakeResult:
        return FakeResult()

    def notifies(self, timeout: float) -> Iterator[Any]:
        yield psycopg.Notify("icap_gateway_keys", "reg", 1)
        raise psycopg.OperationalError("server closed the connection unexpectedly")


@pytest.fixture
def listener() -> Iterator[KeyChangeListener]:
    engine = create_register_engine("postgresql+psycopg://postgres@127.0.0.1:1/none")
    changes: list[int] = []
    lis = KeyChangeListener(engine, lambda: changes.append(1))
    lis.changes = changes  # type: ignore[attr-defined]
    yield lis
    engine.dispose()


def test_back_off_doubles_to_its_ceiling_while_the_server_is_unreachable(
        listener: KeyChangeListener, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []

    def refused() -> Any:
        attempts.append(1)
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(listener, "_connect", refused)
    stop = RecordingStop(rounds=10)
    listener._stop = stop  # type: ignore[assignment]
    listener._run()
    assert len(attempts) == 10
    assert stop.waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert stop.waits[0] == RECONNECT_MIN and max(stop.waits) == RECONNECT_MAX
    assert listener.changes == [] and not listener.listening  # type: ignore[attr-defined]


def test_each_reconnect_reloads_and_a_link_that_worked_starts_the_back_off_again(
        listener: KeyChangeListener, monkeypatch: pytest.MonkeyPatch) -> None:
    script = iter(["refuse", "refuse", "ok", "refuse", "ok"])

    def connect() -> Any:
        if next(script) == "refuse":
            raise psycopg.OperationalError("connection refused")
        return FakeConnection()

    monkeypatch.setattr(listener, "_connect", connect)
    stop = RecordingStop(rounds=5)
    listener._stop = stop  # type: ignore[assignment]
    listener._run()
    # refused, refused (doubling), listened then lost (back to the minimum), refused, listened then lost
    assert stop.waits == [0.5, 1.0, 0.5, 1.0, 0.5]
    assert listener.connects == 2 and listener.backend_pid == 4242
    # Each connect reloads once (changes missed meanwhile), each notification once more.
    assert len(listener.changes) == 4 and listener.notifications == 2  # type: ignore[attr-defined]

"""The supervisor on a Clock with a stand-in spawnProcess: restart backoff,
readiness for /readyz, the ready pipe, the restart metric."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway import workers as workers_module
from gateway.workers import (
    FIRST_LISTENER_FD,
    RESTART_DELAY,
    RESTART_DELAY_MAX,
    STABLE_AFTER,
    Listener,
    Supervisor,
    SupervisorCollector,
)


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class SpawningClock(Clock):
    """A Clock whose spawnProcess only records what would have been started."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> None:
        proto.makeConnection(_Transport(1_000_000 + len(self.spawned)))
        self.spawned.append((proto, args, childFDs))


@pytest.fixture
def clock() -> SpawningClock:
    return SpawningClock()


@pytest.fixture
def supervisor(clock: SpawningClock, monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(workers_module.os, "kill", lambda pid, sig: sent.append((pid, sig)))  # no real pids
    sock = socket.socket()
    s = Supervisor(clock, 2, ["python", "-m", "gateway", "serve"], [Listener(sock, socket.AF_INET, "tcp:0")], {})
    s.startService()
    return s


def _die(supervisor: Supervisor, index: int) -> None:
    supervisor.workers[index].processEnded(Failure(RuntimeError("died")))


def _ready(supervisor: Supervisor, index: int) -> None:
    supervisor.workers[index].childDataReceived(supervisor.ready_fd, b"ready 0123456789abcdef\n")


def test_workers_get_a_ready_pipe(supervisor: Supervisor, clock: SpawningClock) -> None:
    _, args, child_fds = clock.spawned[0]
    assert supervisor.ready_fd == FIRST_LISTENER_FD + 1  # after the one listener
    assert child_fds[supervisor.ready_fd] == "r"
    assert args[-2:] == ["--ready-fd", str(supervisor.ready_fd)]


def test_ready_only_once_every_worker_loaded_its_rules(supervisor: Supervisor) -> None:
    # Before: "2 of 2 workers running" (200) as soon as the processes existed.
    assert supervisor.readiness() == (False, "0 of 2 workers ready")
    _ready(supervisor, 0)
    assert supervisor.readiness() == (False, "1 of 2 workers ready")
    supervisor.workers[1].childDataReceived(supervisor.ready_fd, b"rea")  # half a line is not a line
    assert supervisor.readiness()[0] is False
    supervisor.workers[1].childDataReceived(supervisor.ready_fd, b"dy 0123\n")
    assert supervisor.readiness() == (True, "2 of 2 workers ready")
    # A worker being restarted: the other still accepts everything, the node stays in.
    _die(supervisor, 1)
    assert supervisor.readiness() == (True, "1 of 2 workers ready")
    _die(supervisor, 0)
    assert supervisor.readiness() == (False, "0 of 2 workers ready")


def test_not_ready_while_shutting_down(supervisor: Supervisor) -> None:
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    supervisor.stopService()
    assert supervisor.readiness() == (False, "shutting down")


def test_restarts_back_off_exponentially_and_reset_after_a_stable_run(
    supervisor: Supervisor, clock: SpawningClock
) -> None:
    delays = []
    for _ in range(9):
        before = len(clock.spawned)
        _die(supervisor, 0)  # dies as soon as it starts (a crash loop)
        waited = 0.0
        while len(clock.spawned) == before:
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [RESTART_DELAY * 2**i for i in range(6)] + [RESTART_DELAY_MAX] * 3
    clock.advance(STABLE_AFTER)  # this one stays up
    _die(supervisor, 0)
    assert len(clock.spawned) == 2 + 9
    clock.advance(RESTART_DELAY)
    assert len(clock.spawned) == 2 + 10  # a new incident: restarted at the first delay again
    assert supervisor.restarts == 10


def test_restarts_are_a_metric(supervisor: Supervisor, clock: SpawningClock) -> None:
    _die(supervisor, 1)
    _ready(supervisor, 0)
    families = {f.name: f for f in SupervisorCollector(supervisor).collect()}
    assert families["icap_gateway_worker_restarts"].samples[0].value == 1
    assert families["icap_gateway_workers_ready"].samples[0].value == 1


def test_no_restart_while_stopping_and_stragglers_are_killed(
    supervisor: Supervisor, clock: SpawningClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(workers_module.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    done: list[object] = []
    supervisor.stopService().addCallback(done.append)
    assert {sig for _, sig in sent} == {workers_module.signal.SIGTERM}
    assert supervisor.listeners[0].sock.fileno() == -1  # our copy of the listener is closed
    _die(supervisor, 0)
    clock.advance(RESTART_DELAY_MAX)
    assert len(clock.spawned) == 2 and done == []
    clock.advance(supervisor.shutdown_timeout + workers_module.WORKER_EXIT_GRACE)
    assert sent[-1][1] == workers_module.signal.SIGKILL
    _die(supervisor, 1)
    assert done == [None]

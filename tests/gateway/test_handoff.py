"""The hand-off of accepted connections to the least-loaded worker
(gateway.handoff, gateway.workers.Supervisor with ``handoff=True``): the
choice, the pipes (real socketpairs, no reactor: a stand-in records readers
and adoptions), a worker's death with connections in its pipe, and the
worker's end draining its pipe at shutdown."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway import workers as workers_module
from gateway.connections import SharedConnectionCount, create_slots
from gateway.handoff import (
    ACCEPTS_PER_WAKEUP,
    Acceptor,
    HandedListener,
    Handoff,
    HandoffReceiverService,
    dispatch_order,
    listeners_argument,
    parse_listeners_argument,
    receive_connection,
)
from gateway.proxyprotocol import ProxyHeaderFactory
from gateway.workers import FIRST_LISTENER_FD, Listener, Supervisor, wrap_adopted_factory

# --- the choice --------------------------------------------------------------


def test_least_loaded_first() -> None:
    assert dispatch_order([(0, 5), (1, 2), (2, 9)], after=-1, slots=3) == [1, 0, 2]


def test_ties_go_round_robin_after_the_last_chosen() -> None:
    loads = [(0, 1), (1, 1), (2, 1)]
    assert dispatch_order(loads, after=-1, slots=3) == [0, 1, 2]
    assert dispatch_order(loads, after=0, slots=3) == [1, 2, 0]
    assert dispatch_order(loads, after=2, slots=3) == [0, 1, 2]
    # a tie among the least loaded only: the busier worker stays last
    assert dispatch_order([(0, 0), (1, 4), (2, 0)], after=0, slots=3) == [2, 0, 1]


def test_a_missing_worker_is_skipped_in_the_rotation() -> None:
    # worker 1 is being restarted: after worker 0 comes 2
    assert dispatch_order([(0, 0), (2, 0)], after=0, slots=3) == [2, 0]


def test_listener_argument_round_trips() -> None:
    listeners = [HandedListener(socket.AF_INET, False, "tcp:1344:interface=127.0.0.1"),
                 HandedListener(socket.AF_UNIX, True, "unix:/run/a,b:c.sock")]
    assert parse_listeners_argument(listeners_argument(listeners)) == listeners


# --- the supervisor's side -------------------------------------------------------


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class HandoffReactor(Clock):
    """A Clock that records spawned workers and the descriptors it would read."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []
        self.readers: set[Any] = set()

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None) -> None:
        proto.makeConnection(_Transport(1_000_000 + len(self.spawned)))
        self.spawned.append((proto, args, childFDs))

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


@pytest.fixture
def reactor() -> HandoffReactor:
    return HandoffReactor()


@pytest.fixture
def slots(tmp_path: Path) -> Path:
    path = tmp_path / "connections.slots"
    create_slots(path, 2)
    return path


@pytest.fixture
def listener() -> Listener:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return Listener(sock, socket.AF_INET, "tcp:0:interface=127.0.0.1")


@pytest.fixture
def supervisor(reactor: HandoffReactor, slots: Path, listener: Listener,
               monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    monkeypatch.setattr(workers_module.os, "kill", lambda pid, sig: None)  # no real pids
    s = Supervisor(reactor, 2, ["python", "-m", "gateway", "serve"], [listener], {}, connection_slots=slots,
                   handoff=True)
    s.startService()
    return s


def _ready(supervisor: Supervisor, index: int) -> None:
    supervisor.workers[index].childDataReceived(supervisor.ready_fd, b"ready 0123\n")


def _connection(listener: Listener) -> tuple[socket.socket, socket.socket]:
    """(the client's end, the accepted end) of one real connection."""
    client = socket.create_connection(listener.sock.getsockname())
    listener.sock.setblocking(True)
    accepted, _ = listener.sock.accept()
    listener.sock.setblocking(False)
    return client, accepted


def _received(supervisor: Supervisor, index: int) -> list[tuple[int, int]]:
    """Everything waiting in a worker's pipe, read from our copy of its end."""
    out = []
    while (item := receive_connection(supervisor.workers[index].pipe_peer)) is not None:  # type: ignore[arg-type]
        out.append(item)
    return out


def test_the_worker_gets_its_pipe_and_the_listeners_stay_with_the_supervisor(
    supervisor: Supervisor, reactor: HandoffReactor
) -> None:
    _, _args, child_fds = reactor.spawned[0]
    worker = supervisor.workers[0]
    assert worker.pipe_peer is not None and child_fds[FIRST_LISTENER_FD] == worker.pipe_peer.fileno()
    assert supervisor.ready_fd == FIRST_LISTENER_FD + 1 and child_fds[supervisor.ready_fd] == "r"
    assert supervisor.listeners[0].sock.fileno() not in child_fds.values()


def test_accepting_starts_once_every_worker_is_ready_and_stops_with_the_last(
    supervisor: Supervisor, reactor: HandoffReactor
) -> None:
    assert reactor.readers == set()  # the kernel's backlog holds connections meanwhile
    _ready(supervisor, 1)
    # Before: the first worker ready took all 8 persistent connections of the
    # benchmark while the other still compiled signature-base.
    assert reactor.readers == set()
    _ready(supervisor, 0)
    assert len(reactor.readers) == 1
    supervisor.workers[0].processEnded(Failure(RuntimeError("died")))
    assert len(reactor.readers) == 1  # worker 1 still takes them while 0 restarts
    supervisor.workers[1].processEnded(Failure(RuntimeError("died")))
    assert reactor.readers == set()
    reactor.advance(workers_module.RESTART_DELAY)
    _ready(supervisor, 1)  # after the start-up, one ready worker is enough
    assert len(reactor.readers) == 1


def test_a_worker_that_cannot_start_does_not_hold_the_others_forever(
    supervisor: Supervisor, reactor: HandoffReactor
) -> None:
    _ready(supervisor, 0)
    reactor.advance(workers_module.ACCEPT_ALONE_AFTER - 1)
    assert reactor.readers == set()
    reactor.advance(1)
    assert len(reactor.readers) == 1


def test_connections_go_to_the_least_loaded_worker(supervisor: Supervisor, listener: Listener, slots: Path) -> None:
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    SharedConnectionCount(slots, 0).publish(3)  # worker 0 holds 3 (Squid's long-lived ones)
    clients = []
    for _ in range(5):
        client, accepted = _connection(listener)
        clients.append(client)
        supervisor.hand_off(accepted, 0)
        assert accepted.fileno() == -1  # our copy is closed: the worker holds it now
    # 3 to the idle worker; then 3/3 is a tie, which goes to the other one; then 4/3
    assert [len(_received(supervisor, i)) for i in (0, 1)] == [1, 4]
    assert supervisor.handed_off == 5


def test_a_burst_is_spread_before_any_worker_adopted_a_connection(
    supervisor: Supervisor, listener: Listener
) -> None:
    # Before (the kernel's accept spreading): 6/2 and 7/1 splits of 8.
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    clients = []
    for _ in range(8):
        client, accepted = _connection(listener)
        clients.append(client)
        supervisor.hand_off(accepted, 0)
    assert [supervisor.load(supervisor.workers[i]) for i in (0, 1)] == [4, 4]
    assert [len(_received(supervisor, i)) for i in (0, 1)] == [4, 4]


def test_adopted_connections_are_counted_once(supervisor: Supervisor, listener: Listener, slots: Path) -> None:
    _ready(supervisor, 0)
    _client, accepted = _connection(listener)
    supervisor.hand_off(accepted, 0)
    worker = supervisor.workers[0]
    assert supervisor.load(worker) == 1  # still in the pipe
    count = SharedConnectionCount(slots, 0)
    count.publish(1)  # the worker adopted it: open, no longer in the pipe
    count.adopted()
    assert supervisor.load(worker) == 1
    count.publish(0)  # and it closed
    assert supervisor.load(worker) == 0


def test_a_worker_not_ready_gets_nothing(supervisor: Supervisor, listener: Listener) -> None:
    _ready(supervisor, 1)
    clients = []
    for _ in range(3):
        client, accepted = _connection(listener)
        clients.append(client)
        supervisor.hand_off(accepted, 0)
    assert [len(_received(supervisor, i)) for i in (0, 1)] == [0, 3]


def test_a_pipe_that_refuses_sends_the_connection_to_the_next_worker(
    supervisor: Supervisor, listener: Listener, reactor: HandoffReactor
) -> None:
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    broken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    broken.close()  # any send fails, like a full pipe
    supervisor.workers[0].pipe = broken
    _client, accepted = _connection(listener)
    supervisor.hand_off(accepted, 0)
    assert len(_received(supervisor, 1)) == 1


def test_when_every_pipe_is_full_connections_wait_in_order_and_accepting_stops(
    supervisor: Supervisor, listener: Listener, reactor: HandoffReactor
) -> None:
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    assert len(reactor.readers) == 1
    pipes = [supervisor.workers[i].pipe for i in (0, 1)]
    broken = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    broken.close()
    for i in (0, 1):
        supervisor.workers[i].pipe = broken
    clients = []
    for _ in range(2):
        client, accepted = _connection(listener)
        clients.append(client)
        supervisor.hand_off(accepted, 0)
        assert accepted.fileno() != -1  # still ours, not closed
    assert reactor.readers == set()  # the kernel's backlog holds the next ones
    reactor.advance(workers_module.HANDOFF_RETRY)  # still full
    assert reactor.readers == set() and supervisor.handoffs_dropped == 0
    supervisor.workers[1].pipe = pipes[1]  # worker 1 catches up
    reactor.advance(workers_module.HANDOFF_RETRY)
    assert len(_received(supervisor, 1)) == 2 and supervisor.handoffs_dropped == 0
    assert len(reactor.readers) == 1  # accepting again


def test_with_no_worker_ready_a_connection_is_closed_and_counted(
    supervisor: Supervisor, listener: Listener
) -> None:
    client, accepted = _connection(listener)
    supervisor.hand_off(accepted, 0)
    assert supervisor.handoffs_dropped == 1 and accepted.fileno() == -1
    client.settimeout(5)
    assert client.recv(1) == b""  # closed, not left hanging


def test_a_dead_workers_unreceived_connections_go_to_the_others(
    supervisor: Supervisor, listener: Listener
) -> None:
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    supervisor.workers[1].handed = 100  # busy: the next ones go to worker 0
    clients = []
    for _ in range(2):
        client, accepted = _connection(listener)
        clients.append(client)
        supervisor.hand_off(accepted, 0)
    supervisor.workers[0].processEnded(Failure(RuntimeError("killed")))  # before it read its pipe
    handed = _received(supervisor, 1)
    assert [index for _, index in handed] == [0, 0]
    # the very connections, untouched: what the client sends arrives
    for client, (fd, _) in zip(clients, handed, strict=True):
        with socket.socket(fileno=fd) as conn:
            client.sendall(b"OPTIONS")
            conn.settimeout(5)
            assert conn.recv(16) == b"OPTIONS"


def test_shutdown_hands_out_the_backlog_before_signalling(
    supervisor: Supervisor, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    _ready(supervisor, 0)
    _ready(supervisor, 1)
    clients = [socket.create_connection(listener.sock.getsockname()) for _ in range(3)]
    original = supervisor.hand_off
    monkeypatch.setattr(supervisor, "hand_off", lambda conn, i: (events.append("handed"), original(conn, i)))
    supervisor.acceptor.hand_off = supervisor.hand_off  # type: ignore[union-attr]
    monkeypatch.setattr(workers_module.os, "kill", lambda pid, sig: events.append(f"signal {sig}"))
    supervisor.stopService()
    assert events[:3] == ["handed"] * 3 and events[3].startswith("signal")
    assert listener.sock.fileno() == -1
    assert sum(len(_received(supervisor, i)) for i in (0, 1)) == len(clients)


# --- the accept loop ---------------------------------------------------------------


def test_the_accept_loop_takes_at_most_a_bound_per_wakeup(listener: Listener, reactor: HandoffReactor) -> None:
    got: list[socket.socket] = []
    acceptor = Acceptor(reactor, [listener.sock], lambda conn, index: got.append(conn))
    acceptor.start()
    clients = [socket.create_connection(listener.sock.getsockname()) for _ in range(ACCEPTS_PER_WAKEUP + 3)]
    acceptor.accept(0)
    assert len(got) == ACCEPTS_PER_WAKEUP
    acceptor.accept(0)
    assert len(got) == ACCEPTS_PER_WAKEUP + 3
    acceptor.accept(0)  # nothing queued: returns at once
    assert len(got) == len(clients)
    for conn in got:
        conn.close()


def test_the_accept_loop_pauses_when_out_of_descriptors(listener: Listener, reactor: HandoffReactor,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    class Exhausted:
        def fileno(self) -> int:
            return listener.sock.fileno()

        def accept(self) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

    acceptor = Acceptor(reactor, [Exhausted()], lambda conn, index: None)  # type: ignore[list-item]
    acceptor.start()
    assert len(reactor.readers) == 1
    acceptor.accept(0)
    assert reactor.readers == set()  # not spinning on a socket it cannot accept from
    reactor.advance(1.0)
    assert len(reactor.readers) == 1


# --- the worker's side -------------------------------------------------------------


class AdoptingReactor:
    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.adopted: list[tuple[int, int, Any]] = []

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        self.adopted.append((os.dup(fd), family, factory))  # as Twisted: it keeps a duplicate


class CountingCount:
    def __init__(self) -> None:
        self.adopted_count = 0

    def publish(self, local: int) -> None:
        pass

    def total(self, local: int) -> int:
        return local

    def adopted(self) -> None:
        self.adopted_count += 1


def _worker_end(listener: Listener, pipe_count: int) -> tuple[socket.socket, HandoffReceiverService,
                                                               AdoptingReactor, CountingCount, list[socket.socket]]:
    supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reactor, count = AdoptingReactor(), CountingCount()
    handed = Handoff(worker_end.detach(), [HandedListener(socket.AF_INET, False, "tcp:1344:interface=127.0.0.1"),
                                           HandedListener(socket.AF_INET, True, "haproxy:tcp:1345")])
    factory = object()
    receiver = HandoffReceiverService(reactor, handed, lambda index: factory, count,  # type: ignore[arg-type,return-value]
                                      lambda f, r, proxy: wrap_adopted_factory(f, r, proxy))
    receiver.startService()
    clients = []
    for i in range(pipe_count):
        client, accepted = _connection(listener)
        clients.append(client)
        socket.send_fds(supervisor_end, [bytes([i % 2])], [accepted.fileno()])
        accepted.close()
    return supervisor_end, receiver, reactor, count, clients


def test_the_worker_adopts_each_connection_with_its_listeners_wrapping(listener: Listener) -> None:
    supervisor_end, receiver, reactor, count, _clients = _worker_end(listener, 2)
    [reader] = reactor.readers
    reader.doRead()
    assert len(reactor.adopted) == 2 and count.adopted_count == 2
    (_, family, plain), (_, _, proxied) = reactor.adopted
    assert family == socket.AF_INET
    assert not isinstance(plain, ProxyHeaderFactory) and isinstance(proxied, ProxyHeaderFactory)
    assert receiver.address() == "tcp:1344:interface=127.0.0.1, haproxy:tcp:1345"
    for fd, _, _ in reactor.adopted:
        os.close(fd)
    supervisor_end.close()


def test_at_shutdown_the_worker_takes_everything_left_in_its_pipe(listener: Listener) -> None:
    supervisor_end, receiver, reactor, _count, _clients = _worker_end(listener, ACCEPTS_PER_WAKEUP + 5)
    [reader] = reactor.readers
    reader.doRead()
    assert len(reactor.adopted) == ACCEPTS_PER_WAKEUP  # bounded per wake-up
    receiver.stopService()
    assert len(reactor.adopted) == ACCEPTS_PER_WAKEUP + 5  # none lost
    assert reactor.readers == set()
    for fd, _, _ in reactor.adopted:
        os.close(fd)
    supervisor_end.close()


def test_the_worker_stops_reading_when_the_supervisor_is_gone(listener: Listener) -> None:
    supervisor_end, receiver, reactor, _count, _clients = _worker_end(listener, 0)
    supervisor_end.close()
    [reader] = reactor.readers
    reader.doRead()
    assert reactor.readers == set() and receiver.pipe is None
    receiver.stopService()  # and stops cleanly after that

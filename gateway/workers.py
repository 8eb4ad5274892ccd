"""Several worker processes sharing the ICAP listeners, to use every core.

The reactor is one thread: with YARA in threads the protocol work of one
process still tops out at one core.  The parent binds each listener once.
By default (``[server] worker_balance = "least-loaded"``) it accepts on them
itself and hands each connection to the worker holding the fewest
(``gateway.handoff``, which states the costs).  With ``"kernel"`` it hands
the listening sockets to N workers (``childFDs``), which adopt them
(``IReactorSocket.adoptStreamPort``): the kernel spreads new connections
over the processes blocked in ``accept``.  Each worker accepts one
connection per wake-up (``_OneAcceptPort``): Twisted's default takes up to a
hundred at once, so the first worker to wake took a whole burst of connects
(measured: 7/1 and 8/0 splits of 8 connections), and Squid's few long-lived
ICAP connections would all have landed on one core.  Each worker has its own reactor,
scanning pool, rules and register writer.  The parent only supervises:
restarts a worker that dies (with a growing delay; a restarted worker next
to a broken rule file serves the last good set, see gateway.scanning.snapshot),
forwards SIGHUP/SIGUSR1, stops them on SIGTERM (each drains its connections),
learns on a pipe when each worker is ready (/readyz), and serves /metrics
summed over the workers' prometheus_client multiprocess files.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol, tcp
from twisted.logger import Logger

from gateway.alloc import with_tcache
from gateway.connections import SLOTS_ENV, SlotTable, clear_slot, create_slots
from gateway.handoff import (
    Acceptor,
    HandedListener,
    dispatch_order,
    listeners_argument,
    receive_connection,
    send_connection,
)
from gateway.proxyprotocol import ProxyHeaderFactory, inner_endpoint, is_proxy_endpoint
from gateway.tls import TLSListeners, client_policy, plain_endpoint

log = Logger()

# A worker that dies is restarted after RESTART_DELAY, doubled for each
# death in a row up to RESTART_DELAY_MAX: a worker that cannot start (a
# broken register URL, say) must not spin the machine, yet one crash is
# repaired within a second.  A worker that ran STABLE_AFTER seconds resets
# the delay: its next death is a new incident, not part of a loop.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
STABLE_AFTER = 60.0

# On SIGTERM the supervisor waits for its workers' own graceful shutdown
# ([server] shutdown_timeout) plus this much for their register flush and
# exit, then kills what is left: a stuck worker must not hold the stop forever.
WORKER_EXIT_GRACE = 15.0

# On shutdown a port accepts what the kernel already queued (peers whose
# connect completed; they may have sent a request) before it closes, at most
# this many (the default listen backlog is 1024).
BACKLOG_ACCEPT_LIMIT = 4096

# At start-up the supervisor hands connections out once every worker is ready,
# or after this many seconds to whichever are (signature-base compiles in
# about 1-25 s depending on the machine's load).
ACCEPT_ALONE_AFTER = 60.0

# Every worker's hand-off pipe was full: try the connections waiting again
# after this long (gateway.handoff).
HANDOFF_RETRY = 0.01

# First child file descriptor used for adopted listeners (0-2 are stdio).
FIRST_LISTENER_FD = 3

# A worker writes this line to its ready pipe (``--ready-fd``) once its rules
# are loaded and it accepts; the supervisor's /readyz counts those workers.
# Anything longer than READY_LINE_LIMIT bytes is not kept.
READY_LINE = b"ready"
READY_LINE_LIMIT = 256


@dataclass(frozen=True)
class Listener:
    sock: socket.socket
    family: int
    description: str

    @property
    def proxy_protocol(self) -> bool:
        return is_proxy_endpoint(self.description)


@dataclass(frozen=True)
class AdoptedSocket:
    """A listening socket a worker inherits: child fd, address family, and
    whether connections start with a PROXY header (``haproxy:`` listener)."""

    fd: int
    family: int
    proxy_protocol: bool = False


def _endpoint_args(description: str) -> tuple[str, list[str], dict[str, str]]:
    kind, *rest = description.split(":")
    args = [p for p in rest if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in rest if "=" in p)
    return kind, args, kwargs


def bind_listener(description: str) -> Listener:
    """Bind a tcp, tcp6 or unix endpoint string, each optionally after
    ``haproxy:`` (the workers then read a PROXY header first); raises
    ValueError for others."""
    kind, args, kwargs = _endpoint_args(inner_endpoint(plain_endpoint(description)))  # ssl: binds tcp:
    backlog = int(kwargs.get("backlog", "1024"))
    if kind in ("tcp", "tcp6"):
        family = socket.AF_INET if kind == "tcp" else socket.AF_INET6
        port = int(kwargs.get("port") or args[0])
        interface = kwargs.get("interface", "" if kind == "tcp" else "::")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
    elif kind == "unix":
        family = socket.AF_UNIX
        path = kwargs.get("address") or args[0]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind(path)
        if "mode" in kwargs:
            os.chmod(path, int(kwargs["mode"], 8))
    else:
        raise ValueError(f"{description}: with several workers only tcp, tcp6 and unix listeners "
                         "(each optionally after haproxy:) are supported")
    sock.listen(backlog)
    sock.setblocking(False)
    return Listener(sock, family, description)


# Marks an adopted listener whose connections start with a PROXY header.
PROXY_FD_FLAG = "proxy"


def worker_count(config: Any) -> int:
    """``[server] workers``, 0 meaning one per core."""
    return int(config.server.workers or os.cpu_count() or 1)


def worker_fds_argument(listeners: Sequence[Listener]) -> str:
    """``3:2,4:10:proxy``: child fd and address family of each adopted
    listener, and ``proxy`` for a ``haproxy:`` one."""
    return ",".join(
        f"{FIRST_LISTENER_FD + i}:{int(lst.family)}" + (f":{PROXY_FD_FLAG}" if lst.proxy_protocol else "")
        for i, lst in enumerate(listeners)
    )


def parse_worker_fds(value: str) -> list[AdoptedSocket]:
    out = []
    for item in value.split(","):
        fd, family, *flags = item.split(":")
        out.append(AdoptedSocket(int(fd), int(family), proxy_protocol=PROXY_FD_FLAG in flags))
    return out


def accept_backlog(port: Any) -> None:
    """Accept every connection already queued on a listening port (before it
    stops listening at shutdown), so none is reset unanswered."""
    if not isinstance(port, tcp.Port) or not port.connected:
        return
    if isinstance(port, _OneAcceptPort):
        port.accepts_per_wakeup = BACKLOG_ACCEPT_LIMIT
    else:
        port.numberAccepts = BACKLOG_ACCEPT_LIMIT
    port.doRead()  # accepts until the queue is empty (EAGAIN) or the limit


def describe_address(address: Any) -> str:
    """An endpoint string for a listening port's address (for the log)."""
    kind = getattr(address, "type", "")
    if kind == "TCP":
        prefix = "tcp6" if ":" in address.host else "tcp"
        return f"{prefix}:{address.port}:interface={address.host}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


class _OneAcceptPort(tcp.Port):
    """A port that accepts one connection each time it is readable, so idle
    workers, woken together with busy ones, take their share of a burst."""

    accepts_per_wakeup = 1  # accept_backlog raises it to empty the queue at shutdown

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return self.accepts_per_wakeup

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:  # Twisted grows it after a full batch
        pass


def wrap_adopted_factory(factory: protocol.Factory, reactor: Any, proxy_protocol: bool) -> Any:
    """The factory for connections of an inherited listener or handed off by
    the supervisor.  A haproxy: listener: each connection starts with a PROXY
    header, so the gateway sees the balancer's client, not the balancer."""
    return ProxyHeaderFactory(factory, reactor) if proxy_protocol else factory


class AdoptedListenerService(Service):
    """Accepts on a listening socket inherited from the supervising parent."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: protocol.Factory,
                 proxy_protocol: bool = False) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = wrap_adopted_factory(factory, reactor, proxy_protocol)
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        if isinstance(self.port, tcp.Port) and self.family != socket.AF_UNIX:
            self.port.__class__ = _OneAcceptPort
        os.close(self.fd)  # adoptStreamPort duplicated it

    def address(self) -> str:
        return describe_address(self.port.getHost()) if self.port is not None else f"fd {self.fd}"

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        accept_backlog(port)
        return defer.maybeDeferred(port.stopListening)


def listening_addresses(listeners: Sequence[Listener]) -> list[str]:
    """The endpoints bound (port 0 resolved)."""
    out = []
    for lst in listeners:
        name = lst.sock.getsockname()
        if lst.family == socket.AF_UNIX:
            out.append(f"unix:{name}")
        else:
            out.append(f"{'tcp6' if lst.family == socket.AF_INET6 else 'tcp'}:{name[1]}:interface={name[0]}")
    return out


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False  # wrote its ready line: rules loaded, listening
        self.started = supervisor.reactor.seconds()
        self._ready_buffer = b""
        # The hand-off (gateway.handoff): our sending end, our copy of the
        # worker's end (to take back what it never received if it dies), and
        # the connections sent to it.
        self.pipe: socket.socket | None = None
        self.pipe_peer: socket.socket | None = None
        self.handed = 0

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.supervisor.ready_fd:
            return
        self._ready_buffer = (self._ready_buffer + data)[-READY_LINE_LIMIT:]
        if not self.ready and b"\n" in self._ready_buffer and self._ready_buffer.startswith(READY_LINE):
            self.ready = True
            self.supervisor._worker_ready()

    def processEnded(self, reason: Any) -> None:
        self.supervisor._worker_ended(self, reason)


class Supervisor(Service):
    """Starts ``count`` workers running ``argv`` with the listeners as fds
    3, 4, ... (``handoff``: its hand-off pipe as fd 3) and a ready pipe after
    them, and keeps them running until stopped."""

    def __init__(self, reactor: Any, count: int, argv: list[str], listeners: Sequence[Listener],
                 env: dict[str, str], on_exit: Any = None, connection_slots: Any = None,
                 shutdown_timeout: float = 30.0, handoff: bool = False) -> None:
        self.reactor = reactor
        # gateway.connections: one slot per worker, so max_connections holds
        # for the gateway, not per worker (None: no shared count).
        self.connection_slots = connection_slots
        self.count = count
        self.argv = argv
        self.listeners = list(listeners)
        self.env = env
        self.on_exit = on_exit
        self.shutdown_timeout = shutdown_timeout
        self.handoff = handoff
        self.ready_fd = FIRST_LISTENER_FD + (1 if handoff else len(self.listeners))
        self.acceptor: Acceptor | None = None
        self.slot_table: SlotTable | None = None  # every worker's counts (connection_slots)
        self.handed_off = 0
        self.handoffs_dropped = 0
        self._last_chosen = -1
        # Accepted connections no pipe took yet (every worker's was full),
        # oldest first; at most ACCEPTS_PER_WAKEUP per listener plus what a
        # dead worker left, as accepting stops while any waits.
        self._waiting: deque[tuple[socket.socket, int]] = deque()
        self._retry: Any = None
        self._start_waited = False  # ACCEPT_ALONE_AFTER passed since the start
        self._start_timer: Any = None
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._kill_timer: Any = None
        self.restarts = 0
        self._delays: dict[int, float] = {}  # worker index -> its next restart delay
        self._all_ready_once = False

    def startService(self) -> None:
        super().startService()
        if self.connection_slots is not None:
            self.slot_table = SlotTable(self.connection_slots)
        if self.handoff:
            self.acceptor = Acceptor(self.reactor, [lst.sock for lst in self.listeners], self.hand_off)
            self._start_timer = self.reactor.callLater(ACCEPT_ALONE_AFTER, self._start_wait_over)
        for i in range(self.count):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        worker = _WorkerProcess(self, index)
        if self.handoff:
            worker.pipe, worker.pipe_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            worker.pipe.setblocking(False)
            worker.pipe_peer.setblocking(False)
            child_fds[FIRST_LISTENER_FD] = worker.pipe_peer.fileno()
        else:
            for i, lst in enumerate(self.listeners):
                child_fds[FIRST_LISTENER_FD + i] = lst.sock.fileno()
        child_fds[self.ready_fd] = "r"
        env = self.env
        if self.connection_slots is not None:
            clear_slot(self.connection_slots, index)
            env = dict(env, **{SLOTS_ENV: f"{self.connection_slots}:{index}"})
        self.reactor.spawnProcess(worker, self.argv[0], [*self.argv, "--ready-fd", str(self.ready_fd)],
                                  env=env, childFDs=child_fds)
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _worker_ended(self, worker: _WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.on_exit is not None and worker.pid is not None:
            self.on_exit(worker.pid)
        if self.connection_slots is not None:
            clear_slot(self.connection_slots, worker.index)  # its connections died with it
        if self.handoff:
            self._take_back(worker)
        if self._stopping:
            if not self.workers:
                self._close_waiting()
            if not self.workers and self._stopped is not None and not self._stopped.called:
                if self._kill_timer is not None and self._kill_timer.active():
                    self._kill_timer.cancel()
                self._stopped.callback(None)
            return
        delay = self._restart_delay(worker)
        log.warn("worker {index} (pid {pid}) exited: {reason}; restarting in {delay:.0f}s", index=worker.index,
                 pid=worker.pid, reason=reason.value, delay=delay)
        self.restarts += 1
        self.reactor.callLater(delay, self._spawn, worker.index)

    def _restart_delay(self, worker: _WorkerProcess) -> float:
        """RESTART_DELAY, doubled for each death in a row up to the cap;
        reset once a worker stayed up STABLE_AFTER seconds."""
        if self.reactor.seconds() - worker.started >= STABLE_AFTER:
            self._delays.pop(worker.index, None)
        delay = self._delays.get(worker.index, RESTART_DELAY)
        self._delays[worker.index] = min(delay * 2, RESTART_DELAY_MAX)
        return delay

    # --- the hand-off (gateway.handoff) ----------------------------------

    def _worker_ready(self) -> None:
        if self.ready_workers() >= self.count:
            self._all_ready_once = True
        self._maybe_accept()

    def _may_accept(self) -> bool:
        """Accept once every worker is ready (at start-up, the first one ready
        would otherwise get every persistent connection for good, measured:
        8/0 while the other compiled signature-base), or ACCEPT_ALONE_AFTER
        has passed (a worker that cannot start must not hold the others);
        then while any worker is ready and no connection waits for room."""
        started = self._all_ready_once or self._start_waited
        return not self._stopping and started and not self._waiting and self.ready_workers() > 0

    def _maybe_accept(self) -> None:
        if self.acceptor is not None and self._may_accept():
            self.acceptor.start()

    def _start_wait_over(self) -> None:
        self._start_waited = True
        self._maybe_accept()

    def load(self, worker: _WorkerProcess) -> int:
        """Connections the worker holds plus those still in its pipe."""
        if self.slot_table is None:
            return worker.handed
        opened, adopted = self.slot_table.read(worker.index)
        return opened + max(0, worker.handed - adopted)

    def hand_off(self, conn: socket.socket, listener_index: int) -> None:
        """Give an accepted connection to the least-loaded ready worker whose
        pipe takes it.  When every pipe is full it waits (in order) and the
        listeners are not read meanwhile: the kernel's backlog is the queue."""
        if self._waiting or not self._send(conn, listener_index):
            self._waiting.append((conn, listener_index))
            if self.acceptor is not None:
                self.acceptor.stop()
            if self._retry is None:
                self._retry = self.reactor.callLater(HANDOFF_RETRY, self._send_waiting)

    def _send(self, conn: socket.socket, listener_index: int) -> bool:
        """False when ready workers exist but none of their pipes took it (the
        connection is still ours); else it is gone: to a worker, or closed
        because no worker is ready (at shutdown, or every worker died)."""
        candidates = {w.index: w for w in self.workers.values() if w.ready and w.pipe is not None}
        order = dispatch_order([(i, self.load(w)) for i, w in candidates.items()], self._last_chosen, self.count)
        for index in order:
            worker = candidates[index]
            if send_connection(worker.pipe, conn, listener_index):  # type: ignore[arg-type]
                worker.handed += 1
                self.handed_off += 1
                self._last_chosen = index
                conn.close()  # the worker has its own descriptor now
                return True
        if candidates:
            return False
        self._drop(conn)
        return True

    def _drop(self, conn: socket.socket) -> None:
        conn.close()
        self.handoffs_dropped += 1
        if self.handoffs_dropped & (self.handoffs_dropped - 1) == 0:  # 1, 2, 4, ...: no log flood
            log.warn("no worker ready to take a connection: closed ({count} so far)", count=self.handoffs_dropped)

    def _send_waiting(self) -> None:
        self._retry = None
        while self._waiting:
            conn, listener_index = self._waiting[0]
            if not self._send(conn, listener_index):
                self._retry = self.reactor.callLater(HANDOFF_RETRY, self._send_waiting)
                return
            self._waiting.popleft()
        self._maybe_accept()

    def _take_back(self, worker: _WorkerProcess) -> None:
        """A worker died: hand what it never received to the others."""
        pipe, peer = worker.pipe, worker.pipe_peer
        worker.pipe = worker.pipe_peer = None
        if pipe is not None:
            pipe.close()
        if peer is None:
            return
        taken_back = 0
        try:
            while True:
                try:
                    item = receive_connection(peer)
                except (EOFError, OSError):
                    break
                if item is None:
                    break
                fd, listener_index = item
                taken_back += 1
                self.hand_off(socket.socket(fileno=fd), listener_index)
        finally:
            peer.close()
        if taken_back:
            log.info("{count} connections not yet received by worker {index} handed to the others",
                     count=taken_back, index=worker.index)
        if self.acceptor is not None and self.ready_workers() == 0:
            self.acceptor.stop()  # the kernel's backlog holds new ones until a worker is ready

    def _close_waiting(self) -> None:
        """The last worker is gone at shutdown: nobody will take these."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        while self._waiting:
            self._drop(self._waiting.popleft()[0])

    def worker_connections(self) -> dict[int, int]:
        """Open connections of each live worker (the shared slot file)."""
        if self.slot_table is None:
            return {}
        return {index: self.slot_table.read(index)[0] for index in sorted(self.workers)}

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass

    def alive(self) -> int:
        return len(self.workers)

    def listening(self) -> list[str]:
        """The endpoints bound (port 0 resolved)."""
        return listening_addresses(self.listeners)

    def ready_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

    def readiness(self) -> tuple[bool, str]:
        """/readyz of the gateway.  Not before every worker has loaded its
        rules once: a node must not join the pool at part capacity or with a
        start that failed.  After that, one ready worker is enough: a worker
        being restarted is not handed connections (nor in accept(), with
        worker_balance = "kernel"), so every request is still answered; taking
        the whole node out of HAProxy for one worker's restart (or for one
        crash-looping worker) would move all its load elsewhere for nothing.
        The restarts are visible in icap_gateway_worker_restarts_total."""
        ready = self.ready_workers()
        message = f"{ready} of {self.count} workers ready"
        if self._stopping:
            return False, "shutting down"
        if ready >= self.count:
            self._all_ready_once = True
        if not self._all_ready_once:
            return False, message
        return ready > 0, message

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        if self.acceptor is not None:
            # What the kernel queued goes to the workers before they are told
            # to stop (they take all of their pipe before draining).
            self.acceptor.stop()
            self.acceptor.accept_backlog()
            self._send_waiting()  # once: a worker drains its pipe before it stops
        # Our copies of the listening sockets go first: once the workers close
        # theirs (after accepting what is queued) new peers are refused at
        # once instead of waiting in a backlog no one reads.
        for lst in self.listeners:
            lst.sock.close()
        if not self.workers:
            return None
        self._stopped = defer.Deferred()
        self.signal_workers(signal.SIGTERM)
        self._kill_timer = self.reactor.callLater(self.shutdown_timeout + WORKER_EXIT_GRACE, self._kill_left)
        return self._stopped

    def _kill_left(self) -> None:
        left = [w.pid for w in self.workers.values()]
        log.warn("workers {pids} did not stop in time: killing them", pids=left)
        self.signal_workers(signal.SIGKILL)


class SupervisorCollector:
    """The supervisor's own figures on its /metrics (the workers' are summed
    from their files): restarts, and workers running and ready."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.supervisor
        yield CounterMetricFamily("icap_gateway_worker_restarts", "Worker processes restarted after they died",
                                  value=s.restarts)
        yield GaugeMetricFamily("icap_gateway_workers_ready", "Worker processes with rules loaded, accepting",
                                value=s.ready_workers())
        per_worker = GaugeMetricFamily("icap_gateway_worker_connections", "Open ICAP connections of each worker",
                                       labels=["worker"])
        for index, connections in s.worker_connections().items():
            per_worker.add_metric([str(index)], connections)
        yield per_worker
        yield CounterMetricFamily("icap_gateway_handoffs", "Connections the supervisor handed to a worker",
                                  value=s.handed_off)
        yield CounterMetricFamily("icap_gateway_handoffs_dropped",
                                  "Connections closed because no worker's hand-off pipe took them",
                                  value=s.handoffs_dropped)


def build_supervisor(config: Any, reactor: Any, argv: list[str], count: int) -> tuple[MultiService, Supervisor]:
    """The parent's services: the supervisor and the summed /metrics listener."""
    from monitoring.metrics import prepare_multiprocess_dir, worker_exited
    from monitoring.service import build_metrics_service, multiprocess_dir

    mp_dir = multiprocess_dir(config) or str(config.state_path("prometheus"))
    prepare_multiprocess_dir(mp_dir)
    # ssl: listeners' files loaded once here (ConfigErrors), not failing in every worker
    TLSListeners(client_policy(config.tls), reactor, config.server.listen, config.source)
    listeners = [bind_listener(d) for d in config.server.listen]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mp_dir)
    env = with_tcache(env) or env  # YARA on a worker's reactor thread (gateway.alloc)
    handoff = config.server.worker_balance == "least-loaded"
    if handoff:
        handed = [HandedListener(lst.family, lst.proxy_protocol, address)
                  for lst, address in zip(listeners, listening_addresses(listeners), strict=True)]
        mode = ["--handoff-fd", str(FIRST_LISTENER_FD), "--handoff-listeners", listeners_argument(handed)]
    else:
        mode = ["--worker-fds", worker_fds_argument(listeners)]
    # The listeners too: a worker wraps an ssl: listener's connections in TLS with its options.
    worker_argv = [sys.executable, "-m", "gateway", *argv, *(f"--listen={d}" for d in config.server.listen), *mode]
    top = MultiService()
    slots = config.state_path("connections.slots")
    create_slots(slots, count)
    supervisor = Supervisor(reactor, count, worker_argv, listeners, env,
                            on_exit=lambda pid: worker_exited(pid, mp_dir), connection_slots=slots,
                            shutdown_timeout=config.server.shutdown_timeout, handoff=handoff)
    build_metrics_service(config, reactor, ready=supervisor.readiness, multiprocess_dir=mp_dir,
                          collectors=[SupervisorCollector(supervisor)]).setServiceParent(top)
    supervisor.setServiceParent(top)
    return top, supervisor

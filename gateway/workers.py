"""Several worker processes sharing the ICAP listeners, to use every core.

The reactor is one thread: with YARA in threads the protocol work of one
process still tops out at one core.  The parent binds each listener once and
hands the listening sockets to N workers (``childFDs``), which adopt them
(``IReactorSocket.adoptStreamPort``): the kernel spreads new connections
over the processes blocked in ``accept``.  Each worker accepts one
connection per wake-up (``_OneAcceptPort``): Twisted's default takes up to a
hundred at once, so the first worker to wake took a whole burst of connects
(measured: 7/1 and 8/0 splits of 8 connections), and Squid's few long-lived
ICAP connections would all have landed on one core.  Each worker has its own reactor,
scanning pool, rules and register writer.  The parent only supervises:
restarts a worker that dies (with a growing delay; a restarted worker next
to a broken rule file serves the last good set, see gateway.rulesnapshot),
forwards SIGHUP/SIGUSR1, stops them on SIGTERM (each drains its connections),
learns on a pipe when each worker is ready (/readyz), and serves /metrics
summed over the workers' prometheus_client multiprocess files.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol, tcp
from twisted.logger import Logger

from gateway.connections import SLOTS_ENV, clear_slot, create_slots
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


class AdoptedListenerService(Service):
    """Accepts on a listening socket inherited from the supervising parent."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: protocol.Factory,
                 proxy_protocol: bool = False) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        # A haproxy: listener: each connection starts with a PROXY header, so
        # the gateway sees the balancer's client, not the balancer.
        self.factory = ProxyHeaderFactory(factory, reactor) if proxy_protocol else factory
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


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False  # wrote its ready line: rules loaded, listening
        self.started = supervisor.reactor.seconds()
        self._ready_buffer = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.supervisor.ready_fd:
            return
        self._ready_buffer = (self._ready_buffer + data)[-READY_LINE_LIMIT:]
        if b"\n" in self._ready_buffer and self._ready_buffer.startswith(READY_LINE):
            self.ready = True

    def processEnded(self, reason: Any) -> None:
        self.supervisor._worker_ended(self, reason)


class Supervisor(Service):
    """Starts ``count`` workers running ``argv`` with the listeners as fds
    3, 4, ... and a ready pipe after them, and keeps them running until stopped."""

    def __init__(self, reactor: Any, count: int, argv: list[str], listeners: Sequence[Listener],
                 env: dict[str, str], on_exit: Any = None, connection_slots: Any = None,
                 shutdown_timeout: float = 30.0) -> None:
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
        self.ready_fd = FIRST_LISTENER_FD + len(self.listeners)
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self._kill_timer: Any = None
        self.restarts = 0
        self._delays: dict[int, float] = {}  # worker index -> its next restart delay
        self._all_ready_once = False

    def startService(self) -> None:
        super().startService()
        for i in range(self.count):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        child_fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2}
        for i, lst in enumerate(self.listeners):
            child_fds[FIRST_LISTENER_FD + i] = lst.sock.fileno()
        child_fds[self.ready_fd] = "r"
        worker = _WorkerProcess(self, index)
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
        if self._stopping:
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
        out = []
        for lst in self.listeners:
            name = lst.sock.getsockname()
            if lst.family == socket.AF_UNIX:
                out.append(f"unix:{name}")
            else:
                out.append(f"{'tcp6' if lst.family == socket.AF_INET6 else 'tcp'}:{name[1]}:interface={name[0]}")
        return out

    def ready_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

    def readiness(self) -> tuple[bool, str]:
        """/readyz of the gateway.  Not before every worker has loaded its
        rules once: a node must not join the pool at part capacity or with a
        start that failed.  After that, one ready worker is enough: a worker
        being restarted is not in accept(), so the kernel hands connections
        only to the live ones and every request is still answered; taking
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
    # The listeners too: a worker wraps an adopted ssl: socket in TLS with its options.
    worker_argv = [sys.executable, "-m", "gateway", *argv, *(f"--listen={d}" for d in config.server.listen),
                   "--worker-fds", worker_fds_argument(listeners)]
    top = MultiService()
    slots = config.state_path("connections.slots")
    create_slots(slots, count)
    supervisor = Supervisor(reactor, count, worker_argv, listeners, env,
                            on_exit=lambda pid: worker_exited(pid, mp_dir), connection_slots=slots,
                            shutdown_timeout=config.server.shutdown_timeout)
    build_metrics_service(config, reactor, ready=supervisor.readiness, multiprocess_dir=mp_dir,
                          collectors=[SupervisorCollector(supervisor)]).setServiceParent(top)
    supervisor.setServiceParent(top)
    return top, supervisor

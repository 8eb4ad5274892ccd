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
restarts a worker that dies, forwards SIGHUP/SIGUSR1, stops them on
SIGTERM, and serves /metrics summed over the workers' prometheus_client
multiprocess files.
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

from gateway.proxyprotocol import ProxyHeaderFactory, inner_endpoint, is_proxy_endpoint

log = Logger()

# A worker that dies is restarted, but not faster than this: a worker that
# cannot start (a broken register URL, say) must not spin the machine.
RESTART_DELAY = 1.0

# First child file descriptor used for adopted listeners (0-2 are stdio).
FIRST_LISTENER_FD = 3


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
    kind, args, kwargs = _endpoint_args(inner_endpoint(description))
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


class _OneAcceptPort(tcp.Port):
    """A port that accepts one connection each time it is readable, so idle
    workers, woken together with busy ones, take their share of a burst."""

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

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

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else None


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def processEnded(self, reason: Any) -> None:
        self.supervisor._worker_ended(self, reason)


class Supervisor(Service):
    """Starts ``count`` workers running ``argv`` with the listeners as fds
    3, 4, ... and keeps them running until stopped."""

    def __init__(self, reactor: Any, count: int, argv: list[str], listeners: Sequence[Listener],
                 env: dict[str, str], on_exit: Any = None) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.listeners = list(listeners)
        self.env = env
        self.on_exit = on_exit
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self.restarts = 0

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
        worker = _WorkerProcess(self, index)
        self.reactor.spawnProcess(worker, self.argv[0], self.argv, env=self.env, childFDs=child_fds)
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _worker_ended(self, worker: _WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.on_exit is not None and worker.pid is not None:
            self.on_exit(worker.pid)
        if self._stopping:
            if not self.workers and self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        log.warn("worker {index} (pid {pid}) exited: {reason}; restarting", index=worker.index,
                 pid=worker.pid, reason=reason.value)
        self.restarts += 1
        self.reactor.callLater(RESTART_DELAY, self._spawn, worker.index)

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass

    def alive(self) -> int:
        return len(self.workers)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if not self.workers:
            return None
        self._stopped = defer.Deferred()
        self.signal_workers(signal.SIGTERM)
        return self._stopped


def build_supervisor(config: Any, reactor: Any, argv: list[str], count: int) -> tuple[MultiService, Supervisor]:
    """The parent's services: the supervisor and the summed /metrics listener."""
    from monitoring.metrics import prepare_multiprocess_dir, worker_exited
    from monitoring.service import build_metrics_service, multiprocess_dir

    mp_dir = multiprocess_dir(config) or str(config.state_path("prometheus"))
    prepare_multiprocess_dir(mp_dir)
    listeners = [bind_listener(d) for d in config.server.listen]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mp_dir)
    worker_argv = [sys.executable, "-m", "gateway", *argv, "--worker-fds", worker_fds_argument(listeners)]
    top = MultiService()
    supervisor = Supervisor(reactor, count, worker_argv, listeners, env,
                            on_exit=lambda pid: worker_exited(pid, mp_dir))

    def ready() -> tuple[bool, str]:
        alive = supervisor.alive()
        return (alive > 0, f"{alive} of {count} workers running")

    build_metrics_service(config, reactor, ready=ready, multiprocess_dir=mp_dir).setServiceParent(top)
    supervisor.setServiceParent(top)
    return top, supervisor

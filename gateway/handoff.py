"""Each new connection to the least-loaded worker (``[server] worker_balance``).

Squid keeps a few long-lived ICAP connections per proxy, so letting the
kernel wake whichever worker sits in ``accept`` leaves the load where the
first connects fell (measured: 6/2 splits of 8 connections over 2 workers,
and a core idle for hours).  Instead the supervisor accepts on the listening
sockets itself and passes each accepted socket (``SCM_RIGHTS``: the kernel
duplicates the descriptor into the receiver) over a UNIX socketpair to the
worker with the fewest connections; the worker adopts it
(``IReactorSocket.adoptStreamConnection``) with the same factory wrapping
(PROXY protocol) as an adopted listener.

A worker's load is what the shared slot file says it holds
(``gateway.connections``: its open connections) plus the connections sent
down its pipe that it has not taken yet (sent here minus its ``adopted``
count): a burst of connects is spread at once, before any worker has woken.
Ties go round-robin, starting after the worker chosen last, so short
connections (one request each) alternate instead of piling on worker 0.

The costs, and what keeps them small:

- The supervisor's accept loop is a single point every connection passes.
  It only accepts, reads a few integers and sends one byte with one
  descriptor (no parsing, no allocation beyond the socket object, at most
  ``ACCEPTS_PER_WAKEUP`` per wake-up so one listener cannot starve the
  others); the supervisor does no other work on its reactor but /metrics.
  It reads the listeners only while some worker is ready: otherwise the
  kernel's listen backlog is the bounded queue.  Each pipe is bounded by its
  socket buffer (a few hundred connections): a worker that stopped reading
  refuses the send and the connection goes to the next-least-loaded worker;
  when every pipe refuses, the supervisor stops accepting and retries every
  10 ms, so the kernel's backlog is again the queue.  A connection is
  closed unserved only when no worker is ready at all
  (``icap_gateway_handoffs_dropped_total``).
- A worker that dies with connections still in its pipe: the supervisor
  keeps its own copy of the worker's end, takes back every connection the
  worker never received, and hands them to the others.  None of them had a
  byte read, so nothing is lost; only connections already adopted die with
  their worker, as with a shared listener.
- SIGTERM: the supervisor first accepts what the kernel queued and hands it
  out, closes the listeners, and only then signals the workers; each worker
  receives everything left in its pipe before it drains (``stopService``),
  so a connection accepted before the stop is served like any other.  (One
  gap: connections still waiting for room in a full pipe at that moment
  are retried until the workers stop, then closed.)
- One more hop per connection (accept, sendmsg, recvmsg: about 20 us), paid
  once per connection, not per request: nothing for Squid's persistent
  connections.

``SO_REUSEPORT`` with a listener per worker (and a BPF program choosing the
socket) was the alternative: no single point, but the kernel chooses by a
hash of the 4-tuple or by CPU, not by load, so a few long-lived connections
still land unevenly.  ``worker_balance = "kernel"`` keeps the shared-listener
mode (``gateway.workers.AdoptedListenerService``): no hop through the
supervisor, for sites whose many short connections the kernel spreads well.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from gateway.connections import ConnectionCount

log = Logger()

# Connections one listener accepts per wake-up of the supervisor (and a
# worker receives per wake-up): a bound on the time one burst holds the loop.
ACCEPTS_PER_WAKEUP = 64

# On a shutdown, at most this many queued connections are still accepted and
# handed out (the default listen backlog is 1024; as gateway.workers).
BACKLOG_ACCEPT_LIMIT = 4096

# accept() failing for lack of descriptors or memory: stop reading the
# listeners this long (the kernel keeps the connections queued) rather than
# spin on a readable socket that cannot be accepted.
ACCEPT_PAUSE = 1.0
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class HandedListener:
    """What a worker knows of a listener it receives connections from."""

    family: int
    proxy_protocol: bool
    address: str  # its endpoint string, for the log


@dataclass(frozen=True)
class Handoff:
    """A worker's end of the hand-off: its pipe's descriptor and the listeners,
    in the order of the index byte that comes with each connection."""

    fd: int
    listeners: list[HandedListener]


def listeners_argument(listeners: Sequence[HandedListener]) -> str:
    return json.dumps([[lst.family, lst.proxy_protocol, lst.address] for lst in listeners])


def parse_listeners_argument(value: str) -> list[HandedListener]:
    return [HandedListener(int(family), bool(proxy), str(address)) for family, proxy, address in json.loads(value)]


def dispatch_order(loads: Sequence[tuple[int, int]], after: int, slots: int) -> list[int]:
    """Worker indexes to try, least-loaded first.  ``loads``: (worker index,
    load) of the candidates; ties go to the first index after ``after`` (the
    worker chosen last), wrapping at ``slots``."""
    return [index for index, _ in sorted(loads, key=lambda item: (item[1], (item[0] - after - 1) % slots))]


def send_connection(pipe: socket.socket, conn: socket.socket, listener_index: int) -> bool:
    """One connection down a worker's pipe; False when the pipe is full or
    its worker gone (the connection is then still ours)."""
    try:
        return socket.send_fds(pipe, [bytes([listener_index])], [conn.fileno()]) == 1
    except OSError:  # BlockingIOError (full), BrokenPipeError, ConnectionResetError
        return False


def receive_connection(pipe: socket.socket) -> tuple[int, int] | None:
    """(descriptor, listener index) of the next connection in a pipe, None when
    it is empty; raises EOFError when its other end closed."""
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(pipe, 1, 1)
        except (BlockingIOError, InterruptedError):
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            raise EOFError
        if fds:  # else a byte without a descriptor: our supervisor sends none
            return fds[0], data[0]


@implementer(IReadDescriptor)
class _Readable:
    """The least a reactor needs to call ``on_read`` when ``sock`` is readable."""

    def __init__(self, sock: socket.socket, on_read: Callable[[], None]) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self.on_read = on_read

    def fileno(self) -> int:
        return self._fd if self.sock.fileno() != -1 else -1

    def doRead(self) -> None:
        self.on_read()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "handoff"


class Acceptor:
    """The supervisor's accept loop: accepts on every listener and gives each
    connection to ``hand_off(conn, listener_index)`` (which owns it then)."""

    def __init__(self, reactor: Any, sockets: Sequence[socket.socket],
                 hand_off: Callable[[socket.socket, int], None]) -> None:
        self.reactor = reactor
        self.hand_off = hand_off
        self._readers = [_Readable(sock, partial(self.accept, i)) for i, sock in enumerate(sockets)]
        self.reading = False
        self._paused: Any = None  # the delayed call ending an ACCEPT_PAUSE

    def start(self) -> None:
        if not self.reading and self._paused is None:
            for reader in self._readers:
                self.reactor.addReader(reader)
        self.reading = True

    def stop(self) -> None:
        if self.reading and self._paused is None:
            for reader in self._readers:
                self.reactor.removeReader(reader)
        self.reading = False

    def accept(self, index: int, limit: int = ACCEPTS_PER_WAKEUP, *, draining: bool = False) -> None:
        sock = self._readers[index].sock
        for _ in range(limit):
            if not (self.reading or draining):  # hand_off stopped us: every pipe is full
                return
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ECONNABORTED:
                    continue
                if e.errno in _RESOURCE_ERRORS:
                    self._pause(e)
                return
            self.hand_off(conn, index)

    def accept_backlog(self) -> None:
        """Before the listeners close at shutdown: everything the kernel queued."""
        for index in range(len(self._readers)):
            self.accept(index, BACKLOG_ACCEPT_LIMIT, draining=True)

    def _pause(self, error: OSError) -> None:
        if self._paused is not None:
            return
        log.warn("cannot accept connections ({error}): pausing {pause}s", error=str(error), pause=ACCEPT_PAUSE)
        reading = self.reading
        self.stop()
        self.reading = reading
        self._paused = self.reactor.callLater(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.reading:
            self.reading = False
            self.start()


class HandoffReceiverService(Service):
    """A worker's end of the hand-off: adopts each connection the supervisor
    sends, wrapped like an adopted listener's (``wrap_factory``).
    ``factory_for(index)`` is the factory of the supervisor's listener
    ``index`` (the gateway's, or it wrapped in TLS for an ssl: listener)."""

    def __init__(self, reactor: Any, handoff: Handoff, factory_for: Callable[[int], protocol.Factory],
                 count: ConnectionCount, wrap_factory: Callable[[protocol.Factory, Any, bool], Any]) -> None:
        self.reactor = reactor
        self.handoff = handoff
        self.count = count
        self.factories = [wrap_factory(factory_for(index), reactor, lst.proxy_protocol)
                          for index, lst in enumerate(handoff.listeners)]
        self.pipe: socket.socket | None = None
        self._reader: _Readable | None = None

    def startService(self) -> None:
        super().startService()
        self.pipe = socket.socket(fileno=self.handoff.fd)
        self.pipe.setblocking(False)
        self._reader = _Readable(self.pipe, self.receive)
        self.reactor.addReader(self._reader)

    def address(self) -> str:
        return ", ".join(lst.address for lst in self.handoff.listeners) or "hand-off"

    def receive(self, limit: int | None = ACCEPTS_PER_WAKEUP) -> None:
        received = 0
        while self.pipe is not None and (limit is None or received < limit):
            try:
                item = receive_connection(self.pipe)
            except EOFError:
                log.warn("the supervisor closed the hand-off pipe: no new connections")
                self._close()
                return
            except OSError as e:
                log.error("hand-off pipe failed: {error}", error=str(e))
                self._close()
                return
            if item is None:
                return
            received += 1
            self.adopt(*item)

    def adopt(self, fd: int, listener_index: int) -> None:
        try:
            if listener_index < len(self.factories):
                lst = self.handoff.listeners[listener_index]
                self.reactor.adoptStreamConnection(fd, lst.family, self.factories[listener_index])
        except OSError as e:  # reset before we got to it (getpeername: ENOTCONN)
            log.debug("handed-off connection gone before adoption: {error}", error=str(e))
        finally:
            os.close(fd)  # adoptStreamConnection duplicated it
            # After the adoption: the supervisor may count this connection
            # twice for a moment (open and still in the pipe), never zero times.
            self.count.adopted()

    def _close(self) -> None:
        if self._reader is not None:
            self.reactor.removeReader(self._reader)
            self._reader = None
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def stopService(self) -> None:
        super().stopService()
        # The supervisor handed out everything it accepted before it signalled
        # us: take all of it, then stop (see the module docstring).
        self.receive(limit=None)
        self._close()

"""The Twisted side of ICAP: it moves bytes, runs the timers and applies
back-pressure; nothing here decides an answer.

A request passes three layers, each testable without Twisted:

- ``gateway.icap`` (the sans-IO core) turns bytes into events and answers
  into bytes;
- ``gateway.transaction.Transaction`` owns one transaction's lifecycle (its
  spool, the early commit and trickle for Squid bug 5352, its record);
- ``gateway.decision`` maps routing, the authentication result, the verdict,
  the policy and what the peer allows to an answer; ``gateway.options``
  builds OPTIONS and the common headers once per ISTag.

Who may use the gateway is the ``Authenticator``'s call, what a body holds
the ``Scanner``'s, what is kept the ``Recorder``'s, what is shown the
``Observer``'s: they are handed in at construction through
``GatewayContext``, as Twisted's SMTP asks for an ``IMessageDelivery``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from twisted.internet import interfaces, tcp
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import decision
from gateway.blockpage import BlockPage, new_reference
from gateway.connections import ConnectionCount, LocalConnectionCount
from gateway.icap.connection import ServerConnection
from gateway.icap.errors import ProtocolError
from gateway.icap.events import (
    NEED_DATA,
    PAUSED,
    BodyData,
    ConnectionClosed,
    EndOfMessage,
    PreviewEnd,
    Request,
)
from gateway.icap.http import parse_request_head, parse_response_head
from gateway.interfaces import (
    Authenticated,
    Authenticator,
    Credentials,
    Direction,
    Identity,
    Observer,
    Outcome,
    Recorder,
    Scanner,
    UserSeen,
    Verdict,
)
from gateway.lateblock import LateBlockMemory
from gateway.options import AnswerHeaders, istag
from gateway.policy import RulesetScanners, TenantPolicy
from gateway.tls import client_certificate_sha256
from gateway.transaction import Spool, Transaction

log = Logger()

# Echoed bodies are read back from the spool in blocks of this size: large
# enough to keep syscalls few, small enough that memory stays flat.
ECHO_BLOCK_SIZE = 64 * 1024

# Requests one connection has answered in one call of _process before it
# lets the reactor serve the others (the rest go on in the next turn): a
# peer that pipelines hundreds of small requests, each answered at once (no
# body, or a scan on the reactor thread: gateway.scanning.handoff
# .InlineScans), must not hold a worker for all of them in one go.
REQUESTS_PER_TURN = 16

# What the connection's read/idle timer guards (see _arm_timer).
PHASE_IDLE = "idle"  # between requests: idle_timeout, then a quiet close
PHASE_HEAD = "head"  # a request head is arriving: one head_timeout deadline
PHASE_BODY = "body"  # a body is arriving: min_body_rate checked every read_timeout
# The rest of a body we already answered (a refusal, an early 204) is read
# only to stay in frame: one read_timeout deadline, then the connection
# closes.  Progress must not extend it: the peer gets nothing more for it,
# and a refused peer would otherwise hold its connection at min_body_rate.
PHASE_DRAIN = "drain"


@dataclass
class GatewayContext:
    """Everything a connection needs, built once by ``makeService``."""

    scanner: Scanner
    authenticator: Authenticator
    recorder: Recorder
    observer: Observer
    new_spool: Callable[[], Spool]
    block_page: BlockPage
    clock: interfaces.IReactorTime
    # (lower-cased ICAP headers, peer ip) -> username or None, canonical client ip, refused headers
    identify: Callable[[Mapping[str, str], str], Identity]
    # (lower-cased ICAP headers, peer ip) -> what the authenticator checks
    credentials: Callable[[Mapping[str, str], str], Credentials] = field(
        default_factory=lambda: bearer_credentials)
    service_id: str = "yara"
    max_connections: int = 1000
    options_ttl: int = 3600
    preview_size: int = 4096
    head_timeout: float = 30.0
    read_timeout: float = 30.0
    min_body_rate: int = 256
    idle_timeout: float = 300.0
    # Recycling (see _recycle_due), 0: off; the service sets [server]'s values.
    max_connection_age: float = 0.0
    max_connection_transactions: int = 0
    write_timeout: float = 30.0
    max_pipelined_bytes: int = 256 * 1024
    error_policy: str = "fail-closed"  # or "fail-open"
    oversize_policy: str = "pass"  # or "block"
    max_scan_size: int = 256 * 1024**2
    early_response_after: int = 60 * 1024
    skip_types: list[str] = field(default_factory=list)  # see gateway.scanning.filetypes
    # Verdicts of transfers cut after our early commit, for the next request
    # of the URL (gateway.lateblock); None: off.
    late_blocks: LateBlockMemory | None = None
    # Tenant name -> its policy ([tenants.NAME] over [scan], gateway.policy),
    # asked once per transaction after authentication.  None: every tenant
    # gets the fields above (error_policy ... skip_types, block_page).
    policy_for: Callable[[str], TenantPolicy] | None = None
    wall_time: Callable[[], float] = time.time
    connections: int = field(default=0)  # this process's open connections
    # The whole gateway's count (all workers): gateway.connections
    connection_count: ConnectionCount = field(default_factory=LocalConnectionCount)
    # Keep-alive connections waiting for a request, longest idle first: the
    # ones closed to make room at max_connections (see _make_room).
    idle_connections: dict[ICAPServerProtocol, None] = field(default_factory=dict)

    # The common headers and the OPTIONS answer, built once per ISTag.
    answer_headers: AnswerHeaders = field(default_factory=AnswerHeaders)

    def istag(self) -> str:
        return istag(self.service_id, self.scanner.version)

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        if self.policy_for is not None:
            return self.policy_for(tenant)
        return TenantPolicy(
            decision=decision.Policy(error_policy=self.error_policy, oversize_policy=self.oversize_policy,
                                     max_scan_size=self.max_scan_size),
            block_page=self.block_page, skip_types=self.skip_types)


def _first_ip(peer: Any) -> str:
    return getattr(peer, "host", "") or "unix"


def _direct_transport(transport: Any) -> tcp.Connection | None:
    """The TCP connection ``_write`` may send on directly: a plain one, or
    the one under a wrapper that only passes writes through (the PROXY
    protocol's); never under TLS or a test transport."""
    if isinstance(transport, policies.ProtocolWrapper) and type(transport).write is policies.ProtocolWrapper.write:
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
        return transport
    return None


# IHalfCloseableProtocol: a client may send its request and shut down its
# sending side (``nc -N``, some health checkers); without it Twisted treats
# that end of input as a full close and the answer is never written.
@implementer(interfaces.IPushProducer, interfaces.IHalfCloseableProtocol)
class ICAPServerProtocol(Protocol):
    """One ICAP connection.  It is registered with its transport as a
    streaming producer of everything it writes: when the peer stops reading
    and our unsent output passes the transport's high-water mark, the
    transport pauses us; we then stop reading and processing requests, stop
    an echo, and give the peer ``write_timeout`` to drain before aborting."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.conn = ServerConnection()
        self.tx: Transaction | None = None
        self._busy = False  # a scan or an echo is under way: events wait
        self._timer: DelayedCall | None = None
        self._timer_phase: tuple[str, int] = ("", 0)  # what the running timer guards: (PHASE_*, request)
        # The idle timer outlives idle periods (see _arm_timer): one
        # DelayedCall per idle_timeout, not one per request.
        self._idle_timer: DelayedCall | None = None
        self._idle_since = 0.0  # when the current idle period began (the clock's seconds)
        self._bytes_in = 0  # bytes read from the peer, ever
        self._window_start = 0  # _bytes_in when the current body window began
        self._paused = False  # we stopped reading the transport (see dataReceived)
        self._write_blocked = False  # the transport paused us: the peer is not reading
        self._write_timer: DelayedCall | None = None
        self._echo: Iterator[bytes] | None = None  # a spooled body being written back
        self._counted = False  # this connection is in ctx.connections
        self._peer = ""
        self._over_limit = False
        self._draining = False  # shutting down: finish what was sent, then close (finish_and_close)
        self._opened_at = ctx.clock.seconds()  # for max_connection_age (see _recycle_due)
        self._direct: tcp.Connection | None = None  # the TCP connection _write may send on
        # The TLS client certificate's SHA-256 (None: none), read at the
        # first request (the handshake is done by then): fixed for the connection.
        self._client_cert: str | None = None
        self._client_cert_read = False
        self._tenant_policy: TenantPolicy | None = None  # the current transaction's tenant's
        self._processing = False  # inside _process: see there
        self._next_turn: DelayedCall | None = None  # _process again, after the other connections (REQUESTS_PER_TURN)

    # --- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        ctx = self.ctx
        ctx.connections += 1
        self._counted = True
        ctx.connection_count.publish(ctx.connections)
        self._peer = _first_ip(self.transport.getPeer())
        self._direct = _direct_transport(self.transport)
        ctx.observer.connection_opened()
        self._over_limit = not self._make_room()
        self.transport.registerProducer(self, True)
        self._arm_timer()
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_started(self)

    def _make_room(self) -> bool:
        """At max_connections (the whole gateway's), close this worker's
        longest-idle keep-alive connections rather than refuse the new one:
        an idle connection costs a socket, a refused proxy costs its users.
        False when there is still no room (this connection then gets 503)."""
        ctx = self.ctx
        total = ctx.connection_count.total(ctx.connections)
        while total > ctx.max_connections and ctx.idle_connections:
            victim = next(iter(ctx.idle_connections))
            victim._evict()
            total -= 1
        return total <= ctx.max_connections

    def _evict(self) -> None:
        """Closed, while idle, to make room for a new connection."""
        self.ctx.idle_connections.pop(self, None)
        self._release()
        self._cancel_timer()
        self.ctx.observer.connection_dropped("evicted-idle")
        self.transport.loseConnection()

    def _release(self) -> None:
        """Leave the connection count (once: eviction counts us out early)."""
        if self._counted:
            self._counted = False
            self.ctx.connections -= 1
            self.ctx.connection_count.publish(self.ctx.connections)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_ended(self)
        self._release()
        self.ctx.idle_connections.pop(self, None)
        self.ctx.observer.connection_closed()
        self._cancel_timer()
        self._cancel_write_timer()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None
        self._stop_echo()
        self._close_spool()

    def dataReceived(self, data: bytes) -> None:
        self._bytes_in += len(data)
        self.conn.receive_data(data)
        if self._busy or self._write_blocked or self._next_turn is not None:
            # Bytes while we scan or echo (a pipelining client), while the
            # peer does not read our answers, or while its requests wait for
            # their next turn (REQUESTS_PER_TURN): keep them, but read no more
            # until we answered, so they cannot pile up.  Paused lazily, as
            # Squid sends nothing before our answer: no epoll change per
            # request.  A transport that goes on delivering is cut off.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            if self.conn.buffered_bytes > self.ctx.max_pipelined_bytes:
                log.info("ICAP peer {peer} sent over {limit} bytes ahead of our answers: closing",
                         peer=self._peer, limit=self.ctx.max_pipelined_bytes)
                self._drop("pipelined-overflow")
            return
        self._process()

    def _write(self, data: bytes) -> None:
        """Send ``data``: straight to the socket when nothing of ours waits
        in the transport's buffer, else through the transport.  Twisted's
        ``FileDescriptor.write`` only buffers and registers the socket for
        writing (an epoll change), and once it is written out unregisters it
        again (another): two syscalls and a reactor turn per answer, where a
        socket with room (always, for a small answer to a peer that reads)
        takes the bytes at once.  What the socket does not take goes the
        usual way, with the transport's back-pressure."""
        direct = self._direct
        if (direct is not None and not direct._tempDataLen and len(direct.dataBuffer) == direct.offset
                and direct.connected and not direct.disconnecting and not direct._writeDisconnected
                and not direct._aborting and not direct.TLS):
            try:
                sent = direct.socket.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or broken: the transport's path handles and reports it
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)

    def _resume_reading(self) -> None:
        if self._paused and not self._write_blocked and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def _drop(self, reason: str) -> None:
        """Abort a connection that broke a limit where no answer fits."""
        self.ctx.observer.connection_dropped(reason)
        self._cancel_timer()
        self._cancel_write_timer()
        self._stop_echo()
        self._close_spool()
        self._busy = True  # nothing more is processed on this connection
        self.transport.abortConnection()

    # --- output back-pressure (IPushProducer, registered in connectionMade) --

    def pauseProducing(self) -> None:
        """Our unsent output passed the transport's high-water mark."""
        if self._write_blocked:
            return
        self._write_blocked = True
        if not self._paused and self.transport is not None and not self.transport.disconnecting:
            self._paused = True
            self.transport.pauseProducing()
        self._cancel_timer()  # the write timer governs now
        self._write_timer = self.ctx.clock.callLater(self.ctx.write_timeout, self._write_timed_out)

    def resumeProducing(self) -> None:
        """The transport sent everything we wrote."""
        self._write_blocked = False
        self._cancel_write_timer()
        transport = self.transport
        if transport is None:
            return
        if getattr(transport, "disconnecting", False):
            # A transport with a producer does not close until it is
            # unregistered (loseConnection's contract).
            transport.unregisterProducer()
            return
        if self._echo is not None:
            self._pump_echo()
            return
        if not self._busy:
            self._resume_reading()
            self._process()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._stop_echo()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None and self._write_timer.active():
            self._write_timer.cancel()
        self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.info("ICAP peer {peer} read nothing of our answer for {seconds}s: aborting",
                 peer=self._peer, seconds=self.ctx.write_timeout)
        self._drop("write-timeout")

    def _stop_echo(self) -> None:
        echo, self._echo = self._echo, None
        close = getattr(echo, "close", None)
        if close:
            close()

    def readConnectionLost(self) -> None:  # half-close: treat as end of input
        self.conn.receive_data(b"")
        if not self._busy:  # else the answer under way resumes processing
            self._process()

    def writeConnectionLost(self) -> None:
        """The peer no longer reads: nothing we write can arrive."""
        if self.transport is not None:
            self.transport.abortConnection()

    # --- timers -------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm_timer(self) -> None:
        """While we read, a slow peer is the peer's problem: a request head
        must be complete ``head_timeout`` after its first byte, a body must
        bring ``min_body_rate`` bytes a second, checked every
        ``read_timeout`` (408 and close); an idle keep-alive connection
        closes quietly after ``idle_timeout``.  Progress never extends a
        deadline: a timer runs on while its phase lasts, so one byte a second
        holds a connection no longer than the others.  While we scan no read
        timer runs; while the peer does not read, the write timer does."""
        ctx = self.ctx
        if self._busy or self._write_blocked or self.transport is None:
            self._set_phase("")
            return
        conn = self.conn
        if not conn.mid_request:
            phase = PHASE_IDLE
        elif conn.their_state == "IDLE":
            phase = PHASE_HEAD
        elif conn.draining_body:
            phase = PHASE_DRAIN
        else:
            phase = PHASE_BODY
        if phase == PHASE_IDLE:
            if self._timer_phase == (PHASE_IDLE, conn.requests_seen):
                return  # idle since this request was answered: its deadline stands
            self._set_phase(phase)
            ctx.idle_connections[self] = None
            # A keep-alive connection goes idle after every answer: arming a
            # timer each time (and cancelling it at the next request) cost
            # more than the rest of the timer work.  The one timer pending
            # stays, and when it fires it checks the idle period's start.
            self._idle_since = ctx.clock.seconds()
            if self._idle_timer is None:
                self._idle_timer = ctx.clock.callLater(ctx.idle_timeout, self._idle_check)
            return
        timer = self._timer
        # Per request: a pipelined request's head gets its own deadline.
        if timer is not None and timer.active() and self._timer_phase == (phase, conn.requests_seen):
            return
        self._set_phase(phase)
        if phase == PHASE_HEAD:
            self._timer = ctx.clock.callLater(ctx.head_timeout, self._read_timed_out, "head-timeout")
        elif phase == PHASE_DRAIN:
            self._timer = ctx.clock.callLater(ctx.read_timeout, self._drain_timed_out)
        else:
            self._window_start = self._bytes_in
            self._timer = ctx.clock.callLater(ctx.read_timeout, self._body_progress_check)

    def _set_phase(self, phase: str) -> None:
        self._cancel_timer()
        if self._timer_phase[0] == PHASE_IDLE:
            self.ctx.idle_connections.pop(self, None)
        self._timer_phase = (phase, self.conn.requests_seen)

    def _idle_check(self) -> None:
        """The idle timer fired: close if the connection has been idle since
        ``idle_timeout`` ago, else wait for the rest of its idle period.  Not
        idle now (a request under way): it is armed again once it is."""
        self._idle_timer = None
        if self._timer_phase[0] != PHASE_IDLE or self.transport is None or not self.connected:
            return
        ctx = self.ctx
        left = self._idle_since + ctx.idle_timeout - ctx.clock.seconds()
        if left > 1e-9:  # not rounding noise
            self._idle_timer = ctx.clock.callLater(left, self._idle_check)
            return
        self._idle_timed_out()

    def _body_progress_check(self) -> None:
        """Every read_timeout while a body arrives: enough bytes since the last check?"""
        self._timer = None
        ctx = self.ctx
        needed = max(1, int(ctx.min_body_rate * ctx.read_timeout))
        if self._bytes_in - self._window_start < needed:
            self._read_timed_out("read-timeout")
            return
        self._window_start = self._bytes_in
        self._timer = ctx.clock.callLater(ctx.read_timeout, self._body_progress_check)

    def _drain_timed_out(self) -> None:
        """The rest of an answered body did not arrive within read_timeout:
        close (the answer is out; nothing more is owed to this peer)."""
        self._timer = None
        self._timer_phase = ("", 0)
        log.info("ICAP drain-timeout from {peer}: closing", peer=self._peer)
        self.ctx.observer.connection_dropped("drain-timeout")
        self.transport.loseConnection()

    def _read_timed_out(self, detail: str) -> None:
        self._timer = None
        self._timer_phase = ("", 0)
        log.info("ICAP {detail} from {peer}: answering 408", detail=detail, peer=self._peer)
        self.ctx.observer.connection_dropped(detail)
        self._finish_tx(icap_status=408, outcome="error", detail=detail)
        self._write(self.conn.send_error(408, self._common_headers()))
        self.transport.loseConnection()

    def _idle_timed_out(self) -> None:
        self._timer = None
        self._set_phase("")
        self.transport.loseConnection()

    # --- event loop ---------------------------------------------------------

    def _process(self) -> None:
        """Take events and act on them until one needs waiting for."""
        if self._processing:
            # Called back from inside the loop below (a verdict given at once
            # by an inline scan, an echo written whole): the loop goes on by
            # itself.  Recursing instead would nest one level per pipelined
            # request and run out of stack.
            return
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False

    def _process_events(self) -> None:
        conn = self.conn
        requests_at_start = conn.requests_seen
        while not self._busy and not self._write_blocked and self.transport is not None:
            if (conn.requests_seen - requests_at_start >= REQUESTS_PER_TURN and conn.their_state == "IDLE"
                    and conn.has_buffered_input):
                # Between two requests: the next one waits for the next turn.
                if self._next_turn is None:
                    self._next_turn = self.ctx.clock.callLater(0, self._take_turn)
                break
            try:
                event = self.conn.next_event()
            except ProtocolError as e:
                self._protocol_error(e)
                return
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ConnectionClosed):
                self.transport.loseConnection()
                return
            try:
                self._dispatch(event)
            except Exception:
                self._internal_error(Failure())
                return
        if self.conn.our_state == "MUST_CLOSE" and not self._busy:
            self.transport.loseConnection()
            return
        if self._draining and self._idle_keep_alive():
            self.transport.loseConnection()  # shutting down and nothing more was sent
            return
        self._arm_timer()

    def _take_turn(self) -> None:
        self._next_turn = None
        if self.connected and not self._busy:
            self._process()
            if self._next_turn is None and not self._busy:
                self._resume_reading()  # paused while the turn waited (dataReceived)

    def _dispatch(self, event: object) -> None:
        if isinstance(event, Request):
            self._on_request(event)
        elif isinstance(event, BodyData):
            self._on_body(event.data)
        elif isinstance(event, PreviewEnd):
            self._on_preview_end()
        elif isinstance(event, EndOfMessage):
            self._on_end()

    def _internal_error(self, failure: Failure) -> None:
        """The safety net of per-transaction code: an exception we did not
        foresee answers ICAP 500 if nothing of an answer went out yet, else
        aborts the connection (a half-sent answer cannot be repaired), so a
        peer never waits on a connection nobody serves.  Logged once, with
        the traceback and a reference the access-log line also carries."""
        reference = new_reference()
        log.failure("internal error serving {peer} (ref {ref})", failure, peer=self._peer, ref=reference)
        tx = self.tx
        answered = tx is not None and tx.answered
        self._busy = True  # this connection processes nothing more
        self._cancel_timer()
        for step in (lambda: self.ctx.observer.internal_error(),
                     lambda: self._finish_tx(icap_status=500, outcome="error", detail="internal-error",
                                             reference=reference),
                     self._close_spool):
            try:
                step()
            except Exception:
                log.failure("internal error: cleaning up failed too (ref {ref})", ref=reference)
        if self.transport is None:
            return
        answer = b""
        if not answered:
            try:
                answer = self.conn.send_error(500, self._common_headers())
            except Exception:
                answer = b""
        if answer:
            self._write(answer)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _verdict_guarded(self, verdict: Verdict, tx: Transaction) -> None:
        """``_on_verdict`` behind the safety net: an exception there would
        otherwise go to the scanner's completion queue (logged, nothing
        answered) and leave the connection busy."""
        try:
            self._on_verdict(verdict, tx)
        except Exception:
            if self.transport is not None and self.tx is tx:
                self._internal_error(Failure())
            else:
                log.failure("internal error after the connection moved on")

    # --- graceful shutdown ----------------------------------------------------

    def finish_and_close(self) -> None:
        """Shutdown: answer the transaction under way and every request the
        peer already sent (buffered here or still in the socket), with
        ``Connection: close`` on the last answer, then close.  An idle
        connection closes at once."""
        self._draining = True
        if not self._busy and self.transport is not None:
            self._process()

    def _idle_keep_alive(self) -> bool:
        """Answered at least one request and nothing more was sent.  A fresh
        connection is not idle: its peer connected to send a request, maybe
        still on its way (the drain deadline bounds the wait)."""
        return (self.tx is not None and not self._busy and self.conn.our_state == "IDLE"
                and not self._input_pending())

    def _input_pending(self) -> bool:
        """Request bytes beyond what an answer sent now would cover: the rest
        of the current request, a pipelined request, or bytes in the socket."""
        conn = self.conn
        return conn.mid_request or conn.has_buffered_input or self._socket_has_input()

    def _socket_has_input(self) -> bool:
        if self._paused:
            return True  # we stopped reading while busy: assume the peer sent more
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if not isinstance(handle, socket.socket):
            return False
        try:
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing to read (EAGAIN) or the socket is gone
            return False

    def _protocol_error(self, e: ProtocolError) -> None:
        log.info("ICAP protocol error from {peer}: {status} {reason}", peer=self._peer,
                 status=e.status, reason=e.reason)
        self._finish_tx(icap_status=e.status, outcome="error", detail=e.reason)
        self._write(self.conn.send_error(e.status, self._common_headers()))
        self.transport.loseConnection()

    def _common_headers(self) -> list[tuple[str, str]]:
        # Called right before every answer: while shutting down, the answer
        # after which the peer has sent nothing more is the connection's last.
        if (self._draining or self._recycle_due()) and not self._input_pending():
            self.conn.close_after_response()
        ctx = self.ctx
        return ctx.answer_headers.common(ctx.service_id, ctx.scanner.version)

    def _recycle_due(self) -> bool:
        """This connection is old enough, or has served enough requests, to
        close after the answer under way: behind a load balancer, a node back
        from a failure only gets new connections (RFC 3507 4.1 lets the
        server close a persistent connection; Squid opens another)."""
        ctx = self.ctx
        by_count = 0 < ctx.max_connection_transactions <= self.conn.requests_seen + 1
        by_age = 0 < ctx.max_connection_age <= ctx.clock.seconds() - self._opened_at
        return by_count or by_age

    # --- transaction steps --------------------------------------------------

    def _on_request(self, req: Request) -> None:
        ctx = self.ctx
        direction: Direction = "request" if req.method == "REQMOD" else "response"
        self.tx = tx = Transaction(
            request=req, started=ctx.clock.seconds(), direction=direction, peer=self._peer, client_ip=self._peer,
        )
        self._tenant_policy = None
        refusal = decision.route(req.method, req.service, over_limit=self._over_limit)
        if refusal is not None:
            self._answer_now(refusal)
            return
        if req.method == "OPTIONS":
            return  # answered at EndOfMessage
        headers = req.headers.lowered()
        username, tx.client_ip, tx.bad_headers = ctx.identify(headers, self._peer)
        # The authenticator records its own refusals: only it knows which
        # tenant a key claimed and how it rate-limits a source.
        if not self._client_cert_read:
            self._client_cert = client_certificate_sha256(self.transport)  # handshake done
            self._client_cert_read = True
        credentials = ctx.credentials(headers, self._peer)
        if self._client_cert is not None:
            credentials = replace(credentials, client_cert_sha256=self._client_cert)
        result = ctx.authenticator.authenticate(credentials)
        refusal = decision.authorise(result)
        if refusal is not None:
            ctx.observer.auth_failed(refusal.detail)
            self._answer_now(refusal)
            return
        assert isinstance(result, Authenticated)
        tx.tenant = result.tenant
        self._tenant_policy = policy = ctx.tenant_policy(result.tenant.name)
        tx.max_scan_size = policy.decision.max_scan_size
        tx.user = username
        if username:
            ctx.recorder.record(UserSeen(
                tenant_id=result.tenant.id, username=username, client_ip=tx.client_ip, at=ctx.wall_time()))
        try:
            if req.req_hdr is not None:
                tx.http_request = parse_request_head(req.req_hdr)
            if req.res_hdr is not None:
                tx.http_response = parse_response_head(req.res_hdr)
        except ProtocolError as e:
            self._answer_now(decision.Error(400, "error", e.reason))
            return
        if ctx.late_blocks is not None and self._answer_remembered(tx, ctx.late_blocks):
            return
        if req.has_body:
            tx.spool = ctx.new_spool()

    def _answer_remembered(self, tx: Transaction, late_blocks: LateBlockMemory) -> bool:
        """The block page at the head of a request for a URL whose last
        transfer (this tenant's) was cut after our early commit; the body,
        if any, is read and dropped.  False when there is none to give."""
        assert tx.tenant is not None
        if self._policy().decision.mode == "monitor":
            return False  # a tenant in monitor mode is never refused (an entry may predate the switch)
        remembered = late_blocks.recall(tx.tenant.id, tx.url)
        if remembered is None:  # nearly always: nothing else to look up
            return False
        # The version of the set this tenant's scans use (its [rulesets] one,
        # or [scan] rules): a verdict of any other is not given.
        scanner = self._policy().scanner or self.ctx.scanner
        version = scanner.default.version if isinstance(scanner, RulesetScanners) else scanner.version
        answer = decision.remembered_block(remembered, version)
        if answer is None:
            return False
        self.ctx.observer.late_block("reqmod-refused" if tx.request.method == "REQMOD" else "respmod-blocked")
        # Its rules and reason go to the record; no scan ran for this one.
        self._answer(tx, answer, replace(remembered, duration=0.0, scanned_bytes=0))
        return True

    def _allows(self, tx: Transaction) -> decision.PeerAllows:
        return decision.peer_allows(self.conn.can_send_204, tx.committed)

    def _on_body(self, data: bytes) -> None:
        tx = self.tx
        if tx is None or tx.answered or tx.spool is None:
            return
        tx.take(data)
        ctx = self.ctx
        policy = self._policy().decision
        if tx.body_bytes > policy.max_scan_size:
            early = decision.oversize_answer(tx.body_bytes, policy, self._allows(tx))
            if early is not None:
                # It will not be scanned: say so now, and the rest is read and
                # dropped instead of spooled to disk.
                self._answer(tx, early)
                return
        out = tx.spool_body(data, self.conn, ctx.early_response_after, self._common_headers)
        if out:
            self._write(out)

    def _policy(self) -> TenantPolicy:
        """The current transaction's tenant's (set once authenticated: every
        body has one; an answer before that gets [scan]'s)."""
        if self._tenant_policy is None:
            self._tenant_policy = self.ctx.tenant_policy("")
        return self._tenant_policy

    def _on_preview_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        kind = tx.skipped_type(self._policy().skip_types)
        if kind:  # decided on the preview alone: the rest never crosses the wire
            self._answer(tx, decision.pass_unscanned(f"type:{kind}", self._allows(tx)))
            return
        # The whole body is needed for a verdict: ask for the rest.
        self._write(self.conn.send_continue())

    def _on_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        if tx.request.method == "OPTIONS":
            self._answer_options(tx)
            return
        if tx.spool is None:
            self._answer(tx, decision.pass_without_body(self._allows(tx)))
            return
        tx.spool.finish()
        kind = None if tx.committed else tx.skipped_type(self._policy().skip_types)
        if kind:
            self._answer(tx, decision.pass_unscanned(f"type:{kind}", self._allows(tx)))
            return
        tx.body_complete()
        self._busy = True
        self._cancel_timer()
        scanner = self._policy().scanner or self.ctx.scanner  # the tenant's ruleset's, if it has one
        scanner.scan_then(tx.spool.scan_target(), tx.scan_context(), partial(self._verdict_guarded, tx=tx))

    def _on_verdict(self, verdict: Verdict, tx: Transaction) -> None:
        if self.transport is None or self.tx is not tx or not self.connected:
            return
        verdict = decision.normalise(verdict, self._policy().decision)
        self.ctx.observer.scan_finished(verdict, tx.direction)
        self._busy = False
        self._answer(tx, decision.decide(verdict, self._allows(tx)), verdict)
        if not self._busy:  # an echo still being written resumes reading when done
            self._resume_reading()
            self._process()

    # --- answers ------------------------------------------------------------

    def _answer(self, tx: Transaction, answer: decision.Answer, verdict: Verdict | None = None) -> None:
        """Send ``answer`` (one transport write, except an echo's later
        blocks) and finish the transaction's record."""
        policy = self._policy().decision
        if policy.mode != "block":  # monitor mode: a block becomes a pass
            answer = decision.monitor(answer, policy, self._allows(tx))
        if isinstance(answer, decision.NoContent):
            headers = self._common_headers()
            if answer.scan_status:
                headers.append(("X-Scan-Status", answer.scan_status))
            self._write(self.conn.send_response(204, headers))
            self._finish_tx(icap_status=204, outcome=answer.outcome, detail=answer.detail, verdict=verdict)
            tx.release()
        elif isinstance(answer, decision.Echo):
            self._answer_echo(tx, answer, verdict)
        elif isinstance(answer, decision.BlockPage):
            self._answer_block(tx, answer, verdict)
        elif isinstance(answer, decision.Abort):
            # The original head is out: no block page can replace it now.
            # Closing mid-body makes the proxy abort the response, so not one
            # byte of the matched content reaches the client.
            reference = new_reference()
            log.warn("blocked after the response head was sent: aborting (ref {ref})", ref=reference)
            late_blocks = self.ctx.late_blocks
            if late_blocks is not None and tx.tenant is not None and verdict is not None:
                # The person gets a broken download: the next try gets the page.
                late_blocks.remember(tx.tenant.id, tx.url, verdict)
            self._finish_tx(icap_status=200, outcome=answer.outcome, detail=answer.detail, verdict=verdict,
                            reference=reference)
            tx.release()
            self._busy = True
            self.transport.abortConnection()
        else:
            self._answer_now(answer)

    def _answer_now(self, error: decision.Error) -> None:
        """An answer without body, maybe before the request body (if any) was read."""
        tx = self.tx
        assert tx is not None
        tx.release()
        self._write(self.conn.send_response(error.status, self._common_headers(), close=error.close))
        self._finish_tx(icap_status=error.status, outcome=error.outcome, detail=error.detail)

    def _answer_options(self, tx: Transaction) -> None:
        ctx = self.ctx
        headers = ctx.answer_headers.options(
            tx.request.service, service_id=ctx.service_id, version=ctx.scanner.version,
            max_connections=ctx.max_connections, options_ttl=ctx.options_ttl, preview_size=ctx.preview_size,
            now=ctx.wall_time())
        if headers is None:
            self._answer_now(decision.UNKNOWN_SERVICE)
            return
        self._common_headers()  # while draining: this may be the connection's last answer
        self._write(self.conn.send_response(200, headers))
        self._finish_tx(icap_status=200, outcome=None, detail="")

    def _answer_echo(self, tx: Transaction, answer: decision.Echo, verdict: Verdict | None) -> None:
        if tx.committed:  # our head is out: the rest of the body follows
            self._finish_tx(icap_status=200, outcome=answer.outcome, detail=answer.detail, verdict=verdict)
            self._start_echo(tx, b"")
            return
        headers = self._common_headers()
        if answer.scan_status:
            headers.append(("X-Scan-Status", answer.scan_status))
        # No 204 allowed: send the whole original message back unchanged.
        req = tx.request
        if req.method == "REQMOD":
            head_kw = {"req_hdr": req.req_hdr}
        else:
            head_kw = {"res_hdr": req.res_hdr} if req.res_hdr is not None else {"req_hdr": req.req_hdr}
        self._finish_tx(icap_status=200, outcome=answer.outcome, detail=answer.detail, verdict=verdict)
        if tx.spool is None:
            self._write(self.conn.send_response(200, headers, **head_kw))
            return
        self._start_echo(tx, self.conn.send_response(200, headers, body=True, **head_kw))

    def _start_echo(self, tx: Transaction, head: bytes) -> None:
        assert tx.spool is not None
        self._busy = True
        self._echo = tx.spool.iter_chunks(ECHO_BLOCK_SIZE, start=tx.trickled)
        self._pump_echo(head)

    def _pump_echo(self, lead: bytes = b"") -> None:
        """Write the spooled body back as ICAP chunks until the transport
        pauses us (the peer reads slower than we write) or it is all out.
        Each write carries one block, the last one the end chunk too, and
        the first one the head: a small echo is one write."""
        out = lead
        while self._echo is not None and not self._write_blocked and self.transport is not None:
            try:
                data = next(self._echo)
            except StopIteration:
                self._echo = None
                self._write(out + self.conn.send_end())
                self._response_sent()
                return
            if out:
                self._write(out)
            out = self.conn.send_data(data)
        if out and self.transport is not None:
            self._write(out)

    def _answer_block(self, tx: Transaction, answer: decision.BlockPage, verdict: Verdict | None) -> None:
        reference = new_reference()
        url = tx.url
        policy = self._policy()
        head, body = policy.block_page.render(
            url=url, rules=list(answer.rules), reference=reference, explanation=answer.explanation,
            reason=answer.reason, support_contact=policy.support_contact,
            accept_language=tx.http_request.headers.get("Accept-Language") if tx.http_request else None)
        headers = self._common_headers()
        if answer.rules:
            headers += decision.threat_headers(answer.rules, url)
        conn = self.conn
        self._write(b"".join((conn.send_response(200, headers, res_hdr=head, body=True),
                              conn.send_data(body), conn.send_end())))
        self._finish_tx(icap_status=200, outcome=answer.outcome, detail=answer.detail,
                        verdict=verdict, http_status=403, reference=reference)
        tx.release()

    def _response_sent(self) -> None:
        """The echo wrote the last chunk."""
        self._busy = False
        self._close_spool()
        self._resume_reading()
        self._process()

    def _close_spool(self) -> None:
        if self.tx is not None:
            self.tx.release()

    def _finish_tx(
        self, *, icap_status: int, outcome: Outcome | None, detail: str, verdict: Verdict | None = None,
        http_status: int | None = None, reference: str = "",
    ) -> None:
        tx = self.tx
        if tx is None:
            return
        ctx = self.ctx
        record = tx.answer(now=ctx.clock.seconds(), wall_time=ctx.wall_time(), icap_status=icap_status,
                           outcome=outcome, detail=detail, verdict=verdict, http_status=http_status,
                           reference=reference)
        if record is not None:
            ctx.observer.transaction_finished(record)


def bearer_credentials(headers: Mapping[str, str], peer: str) -> Credentials:
    """Credentials from ``Authorization: Bearer <key>`` (names lower-cased)."""
    value = headers.get("authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return Credentials(key=key, source_ip=peer)


class ICAPFactory(Factory):
    """Builds the connections and, for a graceful shutdown, knows them all."""

    protocol = ICAPServerProtocol  # type: ignore[assignment]

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.protocols: set[ICAPServerProtocol] = set()
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> ICAPServerProtocol:
        p = ICAPServerProtocol(self.ctx)
        p.factory = self
        return p

    def protocol_started(self, proto: ICAPServerProtocol) -> None:
        self.protocols.add(proto)
        if self.draining:  # accepted from the backlog after the shutdown began
            proto.finish_and_close()

    def protocol_ended(self, proto: ICAPServerProtocol) -> None:
        self.protocols.discard(proto)
        if self.draining and not self.protocols:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred[int]:
        """Every connection finishes what its peer sent, then closes (see
        ``ICAPServerProtocol.finish_and_close``).  Fires with the number of
        connections still open after ``timeout`` seconds, which are aborted
        then (0 when all finished in time).  Stop accepting first."""
        self.draining = True
        for proto in list(self.protocols):
            proto.finish_and_close()
        if not self.protocols:
            return succeed(0)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        result: Deferred[int] = Deferred()

        def timed_out() -> None:
            left = list(self.protocols)
            log.warn("shutdown: {count} connections still busy after {timeout}s: aborting them",
                     count=len(left), timeout=timeout)
            for proto in left:
                if proto.transport is not None:
                    proto.transport.abortConnection()
            if not result.called:
                result.callback(len(left))

        timer = self.ctx.clock.callLater(timeout, timed_out)

        def finished(_: None) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(0)

        done.addCallback(finished)
        return result

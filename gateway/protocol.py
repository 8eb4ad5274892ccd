"""The Twisted side of ICAP: shuttle bytes between the transport and the
sans-IO core, and hand each transaction to the policy objects.

The protocol decides nothing itself: who may use the gateway is the
``Authenticator``'s call, what a body holds the ``Scanner``'s, what is kept
the ``Recorder``'s, what is shown the ``Observer``'s.  They are handed in at
construction through ``GatewayContext``, as Twisted's SMTP asks for an
``IMessageDelivery``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.blockpage import BlockPage, new_reference
from gateway.filetypes import SNIFF_BYTES, sniff
from gateway.filetypes import matches as type_matches
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
from gateway.icap.http import (
    HTTPRequestHead,
    HTTPResponseHead,
    message_facts,
    parse_request_head,
    parse_response_head,
)
from gateway.interfaces import (
    Authenticated,
    Authenticator,
    Credentials,
    Direction,
    Observer,
    Recorder,
    Refused,
    ScanContext,
    Scanner,
    Tenant,
    TransactionRecord,
    UserSeen,
    Verdict,
)

log = Logger()

# The two services and the method each one adapts.
SERVICES: dict[str, str] = {"reqmod": "REQMOD", "respmod": "RESPMOD"}

# Echoed bodies are read back from the spool in blocks of this size: large
# enough to keep syscalls few, small enough that memory stays flat.
ECHO_BLOCK_SIZE = 64 * 1024

# At most this many body bytes trickle out before the verdict (see
# _maybe_commit): a few bytes of a blocked file, never a usable part of it.
TRICKLE_PREFIX = 4096


class Spool(TypingProtocol):
    """Where a body waits while it is scanned (gateway.scanner.BodySpool)."""

    size: int

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def scan_target(self) -> bytes | str: ...

    def iter_chunks(self, block: int = ..., start: int = ...) -> Iterator[bytes]: ...

    def close(self) -> None: ...


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
    # (lower-cased ICAP headers, peer ip) -> (username or None, client ip)
    identify: Callable[[Mapping[str, str], str], tuple[str | None, str]]
    # (lower-cased ICAP headers, peer ip) -> what the authenticator checks
    credentials: Callable[[Mapping[str, str], str], Credentials] = field(
        default_factory=lambda: bearer_credentials)
    service_id: str = "yara"
    max_connections: int = 1000
    options_ttl: int = 3600
    preview_size: int = 4096
    read_timeout: float = 30.0
    idle_timeout: float = 300.0
    error_policy: str = "fail-closed"  # or "fail-open"
    oversize_policy: str = "pass"  # or "block"
    max_scan_size: int = 256 * 1024**2
    early_response_after: int = 60 * 1024
    skip_types: list[str] = field(default_factory=list)  # see gateway.filetypes
    wall_time: Callable[[], float] = time.time
    connections: int = field(default=0)

    def istag(self) -> str:
        # RFC 3507 4.7: at most 32 characters, quoted; it changes with the rules
        # so Squid's cached OPTIONS and adapted responses are invalidated.
        version = self.scanner.version or "none"
        return f'"{(self.service_id + "-" + version)[:30]}"'


def _first_ip(peer: Any) -> str:
    return getattr(peer, "host", "") or "unix"


@dataclass
class _Transaction:
    request: Request
    started: float
    service: str
    direction: Direction
    peer: str
    client_ip: str
    tenant: Tenant | None = None
    user: str | None = None
    http_request: HTTPRequestHead | None = None
    http_response: HTTPResponseHead | None = None
    spool: Spool | None = None
    body_bytes: int = 0
    answered: bool = False
    committed: bool = False  # our 200 head went out before the verdict (see _maybe_commit)
    prefix: bytearray = field(default_factory=bytearray)  # the body's first bytes, for trickling
    released: int = 0  # body bytes sent before the verdict
    finished: bool = False  # its TransactionRecord went out


@implementer(interfaces.IPullProducer)
class _EchoProducer:
    """Writes a spooled body back as ICAP chunks as fast as the peer reads."""

    def __init__(self, proto: ICAPServerProtocol, chunks: Iterator[bytes]) -> None:
        self.proto = proto
        self.chunks = chunks

    def resumeProducing(self) -> None:
        proto = self.proto
        if proto.transport is None:
            return
        try:
            data = next(self.chunks)
        except StopIteration:
            proto.transport.unregisterProducer()
            proto.transport.write(proto.conn.send_end())
            proto._response_sent()
            return
        proto.transport.write(proto.conn.send_data(data))

    def stopProducing(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close:
            close()


class ICAPServerProtocol(Protocol):
    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.conn = ServerConnection()
        self.tx: _Transaction | None = None
        self._busy = False  # a scan or an echo is under way: events wait
        self._timer: DelayedCall | None = None
        self._timer_mid = False  # what the running timer guards: a request or idleness
        self._paused = False  # we stopped reading the transport (see dataReceived)
        self._peer = ""
        self._over_limit = False
        self._draining = False  # shutting down: finish what was sent, then close (finish_and_close)

    # --- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        self.ctx.connections += 1
        self._over_limit = self.ctx.connections > self.ctx.max_connections
        self._peer = _first_ip(self.transport.getPeer())
        self.ctx.observer.connection_opened()
        self._arm_timer()
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_started(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_ended(self)
        self.ctx.connections -= 1
        self.ctx.observer.connection_closed()
        self._cancel_timer()
        if self.tx and self.tx.spool:
            self.tx.spool.close()
            self.tx.spool = None

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self._busy:
            # Bytes while we scan or echo (a pipelining client): keep them,
            # but read no more until we answered, so they cannot pile up.
            # Paused lazily, as Squid sends nothing before our answer: no
            # epoll change per request.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._process()

    def _resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:  # half-close: treat as end of input
        self.conn.receive_data(b"")
        self._process()

    # --- timers -------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm_timer(self) -> None:
        """While we read, a stall is the peer's: 408 mid-request, a quiet
        close when idle.  While we scan or write, no read timer runs.  One
        DelayedCall is reset rather than replaced: this runs for every read."""
        if self._busy or self.transport is None:
            self._cancel_timer()
            return
        mid = self.conn.mid_request
        delay = self.ctx.read_timeout if mid else self.ctx.idle_timeout
        timer = self._timer
        if timer is not None and timer.active() and self._timer_mid == mid:
            timer.reset(delay)
            return
        self._cancel_timer()
        self._timer_mid = mid
        self._timer = self.ctx.clock.callLater(delay, self._read_timed_out if mid else self._idle_timed_out)

    def _read_timed_out(self) -> None:
        self._timer = None
        log.info("ICAP read timeout from {peer}: answering 408", peer=self._peer)
        self._finish_tx(icap_status=408, outcome="error", detail="read-timeout")
        self.transport.write(self.conn.send_error(408, self._common_headers()))
        self.transport.loseConnection()

    def _idle_timed_out(self) -> None:
        self._timer = None
        self.transport.loseConnection()

    # --- event loop ---------------------------------------------------------

    def _process(self) -> None:
        while not self._busy and self.transport is not None:
            try:
                event = self.conn.next_event()
            except ProtocolError as e:
                self._protocol_error(e)
                return
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, Request):
                self._on_request(event)
            elif isinstance(event, BodyData):
                self._on_body(event.data)
            elif isinstance(event, PreviewEnd):
                self._on_preview_end()
            elif isinstance(event, EndOfMessage):
                self._on_end()
            elif isinstance(event, ConnectionClosed):
                self.transport.loseConnection()
                return
        if self.conn.our_state == "MUST_CLOSE" and not self._busy:
            self.transport.loseConnection()
            return
        if self._draining and self._idle_keep_alive():
            self.transport.loseConnection()  # shutting down and nothing more was sent
            return
        self._arm_timer()

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
        self.transport.write(self.conn.send_error(e.status, self._common_headers()))
        self.transport.loseConnection()

    def _common_headers(self) -> list[tuple[str, str]]:
        # Called right before every answer: while shutting down, the answer
        # after which the peer has sent nothing more is the connection's last.
        if self._draining and not self._input_pending():
            self.conn.close_after_response()
        return [("ISTag", self.ctx.istag()), ("Server", "icap-gateway")]

    # --- transaction steps --------------------------------------------------

    def _on_request(self, req: Request) -> None:
        ctx = self.ctx
        direction: Direction = "request" if req.method == "REQMOD" else "response"
        self.tx = tx = _Transaction(
            request=req, started=ctx.clock.seconds(), service=req.service,
            direction=direction, peer=self._peer, client_ip=self._peer,
        )
        if self._over_limit:
            self._answer_now(503, outcome="error", detail="too-many-connections", close=True)
            return
        if req.method == "OPTIONS":
            return  # answered at EndOfMessage
        expected = SERVICES.get(req.service)
        if expected is None:
            self._answer_now(404, outcome="error", detail="unknown-service")
            return
        if expected != req.method:
            self._answer_now(405, outcome="error", detail="method-not-allowed-for-service")
            return
        headers = req.headers.lowered()
        username, tx.client_ip = ctx.identify(headers, self._peer)
        # The authenticator records its own refusals: only it knows which
        # tenant a key claimed and how it rate-limits a source.
        decision = ctx.authenticator.authenticate(ctx.credentials(headers, self._peer))
        if isinstance(decision, Refused):
            ctx.observer.auth_failed(decision.reason)
            self._answer_now(decision.status, outcome="unauthenticated", detail=decision.reason)
            return
        assert isinstance(decision, Authenticated)
        tx.tenant = decision.tenant
        tx.user = username
        if username:
            ctx.recorder.record(UserSeen(
                tenant_id=decision.tenant.id, username=username, client_ip=tx.client_ip, at=ctx.wall_time()))
        try:
            if req.req_hdr is not None:
                tx.http_request = parse_request_head(req.req_hdr)
            if req.res_hdr is not None:
                tx.http_response = parse_response_head(req.res_hdr)
        except ProtocolError as e:
            self._answer_now(400, outcome="error", detail=e.reason)
            return
        if req.has_body:
            tx.spool = ctx.new_spool()

    def _on_body(self, data: bytes) -> None:
        tx = self.tx
        if tx is None or tx.answered or tx.spool is None:
            return
        if len(tx.prefix) < TRICKLE_PREFIX:
            tx.prefix += data[: TRICKLE_PREFIX - len(tx.prefix)]
        tx.body_bytes += len(data)
        if (tx.body_bytes > self.ctx.max_scan_size and self.ctx.oversize_policy == "pass"
                and not tx.committed and self.conn.can_send_204):
            # It will not be scanned and may pass as it is: say so now, and
            # the rest is read and dropped instead of spooled to disk.
            self._answer_clean(None, outcome="unscanned", detail="too-large")
            return
        tx.spool.write(data)
        if not tx.committed and tx.body_bytes >= self.ctx.early_response_after > 0:
            self._maybe_commit(tx)
        if tx.committed and tx.released < len(tx.prefix):
            # One byte per batch received keeps Squid's store moving, which is
            # what wakes its stalled origin read (bug 5352); see _maybe_commit.
            self.transport.write(self.conn.send_data(bytes(tx.prefix[tx.released : tx.released + 1])))
            tx.released += 1

    def _maybe_commit(self, tx: _Transaction) -> None:
        """Send our 200 head (the original HTTP response head, no body yet)
        before the verdict.  Squid before 6.10 (bug 5352) stops reading the
        origin once its 64 KiB virgin buffer fills and waits for the adapted
        response to start: without this, any response larger than that buffer
        would hang until our read timeout.  Before the verdict only single
        bytes of the body's start follow (one per piece received, at most
        TRICKLE_PREFIX): enough to keep Squid's store reading, never a usable
        part of a file.  A block after this point can only abort the response."""
        req = tx.request
        if req.method != "RESPMOD" or req.res_hdr is None or req.allow_204:
            return  # Squid buffers Allow: 204 bodies whole; REQMOD bodies flow
        if self.conn.their_state == "PREVIEW_WAIT":
            return
        tx.committed = True
        self.transport.write(self.conn.send_response(200, self._common_headers(), res_hdr=req.res_hdr, body=True))

    def _on_preview_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        kind = self._skipped_type(tx)
        if kind:  # decided on the preview alone: the rest never crosses the wire
            self._answer_clean(None, outcome="unscanned", detail=f"type:{kind}")
            return
        # The whole body is needed for a verdict: ask for the rest.
        self.transport.write(self.conn.send_continue())

    def _skipped_type(self, tx: _Transaction) -> str | None:
        """The body's type by magic bytes, when ``skip_types`` exempts it."""
        if not self.ctx.skip_types or not tx.prefix:
            return None
        facts = message_facts(tx.http_request, tx.http_response)
        if facts.content_encoding not in ("", "identity"):
            return None  # the first bytes are compressed: their type says nothing
        kind = sniff(bytes(tx.prefix[:SNIFF_BYTES]))
        return kind if type_matches(kind, self.ctx.skip_types) else None

    def _on_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        req = tx.request
        if req.method == "OPTIONS":
            self._answer_options(req)
            return
        if tx.spool is None:
            # Nothing to scan (a GET, a HEAD, a 304): pass it as it is.
            self._answer_clean(None, outcome="clean", detail="no-body")
            return
        tx.spool.finish()
        kind = None if tx.committed else self._skipped_type(tx)
        if kind:
            self._answer_clean(None, outcome="unscanned", detail=f"type:{kind}")
            return
        facts = message_facts(tx.http_request, tx.http_response)
        context = ScanContext(
            direction=tx.direction,
            url=facts.url,
            host=facts.host,
            filepath=facts.path,
            filename=facts.filename,
            extension=facts.extension,
            filetype=facts.mime_type,
            tenant=tx.tenant.name if tx.tenant else "",
            content_encoding=facts.content_encoding,
        )
        self._busy = True
        self._cancel_timer()
        d = self.ctx.scanner.scan(tx.spool.scan_target(), context)
        d.addCallback(self._on_verdict, tx)
        d.addErrback(self._on_scan_failure, tx)

    def _on_scan_failure(self, failure: Failure, tx: _Transaction) -> None:
        log.failure("scanner failed", failure)
        self._on_verdict(Verdict(outcome="error", detail="internal scanner error"), tx)

    def _on_verdict(self, verdict: Verdict, tx: _Transaction) -> None:
        if self.transport is None or self.tx is not tx or not self.connected:
            return
        self.ctx.observer.scan_finished(verdict, tx.direction)
        self._busy = False
        outcome = verdict.outcome
        if outcome == "blocked":
            self._answer_block(verdict.rules, verdict, explanation="")
        elif outcome == "error":
            if self.ctx.error_policy == "fail-open":
                self._answer_clean(verdict, outcome="error", detail=verdict.detail)
            else:
                self._answer_block(
                    (), verdict, explanation="The content could not be scanned, and the policy blocks "
                    "what cannot be scanned.", outcome="error")
        elif outcome == "unscanned":
            if self.ctx.oversize_policy == "block":
                self._answer_block((), verdict, explanation="The content is too large to be scanned.",
                                   outcome="unscanned")
            else:
                self._answer_clean(verdict, outcome="unscanned", detail=verdict.detail)
        else:
            self._answer_clean(verdict, outcome="clean")
        if not self._busy:  # an echo still being written resumes reading when done
            self._resume_reading()
            self._process()

    # --- answers ------------------------------------------------------------

    def _answer_now(self, status: int, *, outcome: str, detail: str, close: bool = False) -> None:
        """An answer without body, before the request body (if any) was read."""
        tx = self.tx
        assert tx is not None
        tx.answered = True
        if tx.spool:
            tx.spool.close()
            tx.spool = None
        self.transport.write(self.conn.send_response(status, self._common_headers(), close=close))
        self._finish_tx(icap_status=status, outcome=outcome, detail=detail)

    def _answer_options(self, req: Request) -> None:
        method = SERVICES.get(req.service)
        if method is None:
            self._answer_now(404, outcome="error", detail="unknown-service")
            return
        ctx = self.ctx
        headers = [
            ("Methods", method),
            ("Service", "icap-gateway YARA scanner"),
            *self._common_headers(),
            ("Service-ID", ctx.service_id),
            ("Max-Connections", str(ctx.max_connections)),
            ("Options-TTL", str(ctx.options_ttl)),
            ("Allow", "204"),
            ("Transfer-Preview", "*"),
            ("Date", formatdate(ctx.wall_time(), usegmt=True)),
        ]
        if ctx.preview_size > 0:
            headers.append(("Preview", str(ctx.preview_size)))
        self.tx.answered = True  # type: ignore[union-attr]
        self.transport.write(self.conn.send_response(200, headers))
        self._finish_tx(icap_status=200, outcome=None, detail="")

    def _answer_clean(self, verdict: Verdict | None, *, outcome: str, detail: str = "") -> None:
        tx = self.tx
        assert tx is not None
        tx.answered = True
        headers = self._common_headers()
        if outcome == "unscanned":
            headers.append(("X-Scan-Status", f"unscanned; reason={detail or 'unknown'}"))
        req = tx.request
        if tx.committed:
            self._finish_tx(icap_status=200, outcome=outcome, detail=detail, verdict=verdict)
            self._start_echo(tx)
            return
        if self.conn.can_send_204:
            self.transport.write(self.conn.send_response(204, headers))
            self._finish_tx(icap_status=204, outcome=outcome, detail=detail, verdict=verdict)
            self._close_spool()
            return
        # No 204 allowed: send the whole original message back unchanged.
        if req.method == "REQMOD":
            head_kw = {"req_hdr": req.req_hdr}
        else:
            head_kw = {"res_hdr": req.res_hdr} if req.res_hdr is not None else {"req_hdr": req.req_hdr}
        spool = tx.spool
        self._finish_tx(icap_status=200, outcome=outcome, detail=detail, verdict=verdict)
        if spool is None:
            self.transport.write(self.conn.send_response(200, headers, **head_kw))
            return
        self.transport.write(self.conn.send_response(200, headers, body=True, **head_kw))
        self._start_echo(tx)

    def _start_echo(self, tx: _Transaction) -> None:
        assert tx.spool is not None
        self._busy = True
        chunks = tx.spool.iter_chunks(ECHO_BLOCK_SIZE, start=tx.released)
        self.transport.registerProducer(_EchoProducer(self, chunks), False)

    def _answer_block(self, rules: Any, verdict: Verdict, *, explanation: str, outcome: str = "blocked") -> None:
        tx = self.tx
        assert tx is not None
        tx.answered = True
        reference = new_reference()
        if tx.committed:
            # The original head is out: no block page can replace it now.
            # Closing mid-body makes the proxy abort the response, so not one
            # byte of the matched content reaches the client.
            log.warn("blocked after the response head was sent: aborting (ref {ref})", ref=reference)
            self._finish_tx(icap_status=200, outcome=outcome, detail=f"aborted {verdict.detail}".strip(),
                            verdict=verdict, reference=reference)
            self._close_spool()
            self._busy = True
            self.transport.abortConnection()
            return
        facts_url = tx.http_request.url if tx.http_request else ""
        head, body = self.ctx.block_page.render(
            url=facts_url, rules=list(rules), reference=reference, explanation=explanation)
        headers = self._common_headers()
        if rules:
            threat = ", ".join(rules)
            headers.append(("X-Infection-Found", f"Type=0; Resolution=2; Threat={threat};"))
            headers.append(("X-Violations-Found", _violations(rules, facts_url)))
        self.transport.write(self.conn.send_response(200, headers, res_hdr=head, body=True))
        self.transport.write(self.conn.send_data(body))
        self.transport.write(self.conn.send_end())
        self._finish_tx(icap_status=200, outcome=outcome, detail=verdict.detail,
                        verdict=verdict, http_status=403, reference=reference)
        self._close_spool()

    def _response_sent(self) -> None:
        """The echo producer wrote the last chunk."""
        self._busy = False
        self._close_spool()
        self._resume_reading()
        self._process()

    def _close_spool(self) -> None:
        tx = self.tx
        if tx and tx.spool:
            tx.spool.close()
            tx.spool = None

    def _finish_tx(
        self, *, icap_status: int, outcome: str | None, detail: str, verdict: Verdict | None = None,
        http_status: int | None = None, reference: str = "",
    ) -> None:
        tx = self.tx
        if tx is None or tx.finished:
            return
        tx.finished = True
        ctx = self.ctx
        if http_status is None and tx.http_response is not None:
            http_status = tx.http_response.status
        record = TransactionRecord(
            started=ctx.wall_time() - (ctx.clock.seconds() - tx.started),
            duration=ctx.clock.seconds() - tx.started,
            method=tx.request.method,
            service=tx.service,
            icap_status=icap_status,
            client_ip=tx.client_ip,
            peer=tx.peer,
            tenant=tx.tenant.name if tx.tenant else "",
            user=tx.user or "",
            url=tx.http_request.url if tx.http_request else "",
            http_status=http_status,
            outcome=outcome,  # type: ignore[arg-type]
            rules=tuple(verdict.rules) if verdict else (),
            direction=tx.direction if tx.request.method != "OPTIONS" else None,
            body_bytes=tx.body_bytes,
            scan_duration=verdict.duration if verdict else None,
            detail=(reference and f"ref={reference} {detail}".strip()) or detail,
        )
        ctx.observer.transaction_finished(record)


def bearer_credentials(headers: Mapping[str, str], peer: str) -> Credentials:
    """Credentials from ``Authorization: Bearer <key>`` (names lower-cased)."""
    value = headers.get("authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return Credentials(key=key, source_ip=peer)


def _violations(rules: Any, url: str) -> str:
    # RFC 3507 draft "ICAP extensions" X-Violations-Found: a count line, then
    # four lines per violation (filename, id, name, disposition).
    lines = [str(len(rules))]
    for rule in rules:
        lines += [url or "-", rule, rule, "2"]
    return "\r\n\t".join(lines)


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

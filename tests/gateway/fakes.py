"""Stand-ins for the policy objects, so protocol tests drive only the protocol."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.blockpage import BlockPage
from gateway.interfaces import (
    Authenticated,
    AuthFailure,
    Credentials,
    Identity,
    NullObserver,
    Refused,
    RegisterEvent,
    ScanContext,
    Tenant,
    TransactionRecord,
    Verdict,
)
from gateway.protocol import GatewayContext, ICAPServerProtocol

GOOD_KEY = "good-key"


class MemorySpool:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.finished = False

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def scan_target(self) -> bytes:
        return bytes(self.data)

    def iter_chunks(self, block: int = 65536, start: int = 0) -> Iterator[bytes]:
        for i in range(start, len(self.data), block):
            yield bytes(self.data[i : i + block])

    def close(self) -> None:
        self.closed = True


class SubstringScanner:
    """Blocks bodies containing ``needle``; can hold verdicts back (``hold``)."""

    version = "test1"

    def __init__(self, needle: bytes = b"EVIL") -> None:
        self.needle = needle
        self.hold = False
        self.pending: list[tuple[Deferred[Verdict], Verdict]] = []
        self.contexts: list[ScanContext] = []
        self.result: Verdict | None = None

    def scan(self, body: bytes | str, context: ScanContext) -> Deferred[Verdict]:
        self.contexts.append(context)
        assert isinstance(body, bytes)
        if self.result is not None:
            verdict = self.result
        elif self.needle in body:
            verdict = Verdict("blocked", rules=("test.evil",), scanned_bytes=len(body))
        else:
            verdict = Verdict("clean", scanned_bytes=len(body))
        if self.hold:
            d: Deferred[Verdict] = Deferred()
            self.pending.append((d, verdict))
            return d
        return succeed(verdict)

    def scan_then(self, body: bytes | str, context: ScanContext, on_verdict: Callable[[Verdict], object]) -> None:
        self.scan(body, context).addCallback(on_verdict)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, v in pending:
            d.callback(v)


class KeyAuthenticator:
    def __init__(self, recorder: ListRecorder) -> None:
        self.recorder = recorder

    def authenticate(self, credentials: Credentials) -> Authenticated | Refused:
        result = self._check(credentials)
        if isinstance(result, Refused):
            self.recorder.record(AuthFailure(0.0, credentials.source_ip, None, result.reason))
        return result

    def _check(self, credentials: Credentials) -> Authenticated | Refused:
        if credentials.key is None:
            return Refused(401, "missing-key")
        if credentials.key != GOOD_KEY:
            return Refused(403, "unknown-key")
        return Authenticated(Tenant(1, "acme"))


@dataclass
class ListRecorder:
    events: list[RegisterEvent] = field(default_factory=list)

    def record(self, event: RegisterEvent) -> None:
        self.events.append(event)


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.records: list[TransactionRecord] = []
        self.opened = 0
        self.closed = 0
        self.dropped: list[str] = []

    def connection_opened(self) -> None:
        self.opened += 1

    def connection_closed(self) -> None:
        self.closed += 1

    def transaction_finished(self, record: TransactionRecord) -> None:
        self.records.append(record)

    def connection_dropped(self, reason: str) -> None:
        self.dropped.append(reason)


def identify(headers: Mapping[str, str], peer: str) -> Identity:
    return Identity(headers.get("x-client-username"), headers.get("x-client-ip", peer))


@dataclass
class Harness:
    proto: ICAPServerProtocol
    transport: StringTransport
    clock: Clock
    scanner: SubstringScanner
    recorder: ListRecorder
    observer: RecordingObserver
    spools: list[MemorySpool]

    def send(self, data: bytes, bytewise: bool = False) -> None:
        if bytewise:
            for i in range(len(data)):
                self.proto.dataReceived(data[i : i + 1])
        else:
            self.proto.dataReceived(data)

    def output(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def pump_producer(self) -> None:
        """StringTransport does not pull: drive a registered pull producer."""
        while self.transport.producer is not None and not self.transport.streaming:
            self.transport.producer.resumeProducing()


class BufferingTransport(StringTransport):
    """A StringTransport with a socket's send buffer: what is written stays
    unsent until ``drain()`` (the peer reads), and a streaming producer is
    paused past ``high_water`` and resumed once all is sent, as Twisted's
    FileDescriptor does; a pull producer is asked for more after a drain."""

    def __init__(self, high_water: int = 64 * 1024) -> None:
        super().__init__()
        self.high_water = high_water
        self.unsent = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        if (self.producer is not None and self.streaming and not self.producer_paused
                and self.unsent > self.high_water):
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything sent so far."""
        out = self.value()
        self.clear()
        self.unsent = 0
        if self.producer is not None and (not self.streaming or self.producer_paused):
            self.producer_paused = False
            self.producer.resumeProducing()
        return out


def make_harness(*, transport: StringTransport | None = None, **overrides: object) -> Harness:
    clock = Clock()
    scanner = SubstringScanner()
    recorder = ListRecorder()
    observer = RecordingObserver()
    spools: list[MemorySpool] = []

    def new_spool() -> MemorySpool:
        s = MemorySpool()
        spools.append(s)
        return s

    ctx = GatewayContext(
        scanner=scanner, authenticator=KeyAuthenticator(recorder), recorder=recorder, observer=observer,
        new_spool=new_spool, block_page=BlockPage(), clock=clock, identify=identify,
        wall_time=lambda: 1_700_000_000.0 + clock.seconds(),
    )
    for k, v in overrides.items():
        setattr(ctx, k, v)
    proto = ICAPServerProtocol(ctx)
    transport = transport if transport is not None else StringTransport()
    proto.makeConnection(transport)
    return Harness(proto, transport, clock, scanner, recorder, observer, spools)

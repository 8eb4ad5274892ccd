"""Answers on a real TCP connection go straight to the socket when it has
room: no epoll registration per answer (ICAPServerProtocol._write)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, tcp
from twisted.internet.protocol import ClientFactory, Protocol

from gateway.protocol import ICAPFactory, ICAPServerProtocol
from tests.gateway.fakes import make_harness
from tests.gateway.test_protocol import AUTH, chunked, options, respmod
from tests.icap_responses import parse_responses


class Collect(Protocol):
    """Sends ``request`` once connected; fires ``done`` when ``complete(data)``."""

    def __init__(self, request: bytes, complete: Callable[[bytes], bool]) -> None:
        self.request = request
        self.complete = complete
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.complete(self.data) and not self.done.called:
            self.done.callback(self.data)


@pytest.fixture
def start_writing_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    calls: list[object] = []
    original = tcp.Server.startWriting

    def counting(self: tcp.Server) -> None:
        calls.append(self)
        original(self)

    monkeypatch.setattr(tcp.Server, "startWriting", counting)
    yield calls


async def _exchange(request: bytes, complete: Callable[[bytes], bool]) -> tuple[bytes, ICAPServerProtocol]:
    ctx = make_harness().proto.ctx
    ctx.clock = reactor  # type: ignore[assignment]
    factory = ICAPFactory(ctx)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    client = Collect(request, complete)
    connector = reactor.connectTCP(  # type: ignore[attr-defined]
        "127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: client))
    try:
        data = await client.done
        [server] = factory.protocols
        return data, server
    finally:
        connector.disconnect()
        await port.stopListening()


def _answers(n: int) -> Callable[[bytes], bool]:
    return lambda data: data.count(b"ICAP/1.0 ") >= n and data.endswith(b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_small_answers_need_no_write_registration(start_writing_calls: list[object]) -> None:
    data, server = await _exchange(options() + respmod(chunked(b"clean body"), AUTH, "Allow: 204"), _answers(2))
    assert [r.status for r in parse_responses(data)] == [200, 204]
    assert server._direct is not None
    assert not [t for t in start_writing_calls if t is server.transport]


@pytest_twisted.ensureDeferred
async def test_an_answer_larger_than_the_socket_takes_arrives_whole() -> None:
    body = bytes(range(256)) * 16 * 1024  # 4 MiB echoed back: more than a socket buffer holds
    data, _ = await _exchange(respmod(chunked(body, 65536), AUTH), lambda d: d.endswith(b"\r\n0\r\n\r\n"))
    [r] = parse_responses(data)
    assert r.status == 200 and r.body == body

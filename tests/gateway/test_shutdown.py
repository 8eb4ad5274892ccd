"""Graceful shutdown at the factory level: ``ICAPFactory.drain`` over
StringTransport and a Clock (no real time, no sockets)."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.protocol import ICAPFactory, ICAPServerProtocol
from gateway.service import GatewayService
from tests.gateway.fakes import BufferingTransport, make_harness
from tests.gateway.test_protocol import AUTH, chunked, options, respmod
from tests.icap_responses import parse_responses


class Connections:
    """A factory with the fakes' context, and its connections."""

    def __init__(self, **overrides: object) -> None:
        self.harness = make_harness(**overrides)  # its context and fakes; its own connection is not used
        self.harness.proto.connectionLost(None)
        self.factory = ICAPFactory(self.harness.proto.ctx)
        self.clock = self.harness.clock
        self.scanner = self.harness.scanner

    def open(self) -> tuple[ICAPServerProtocol, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def close_if_asked(proto: ICAPServerProtocol, transport: StringTransport) -> None:
        """StringTransport only records loseConnection: deliver the loss."""
        if transport.disconnecting and proto.transport is not None:
            proto.connectionLost(Failure(ConnectionError("closed")))
            proto.transport = None


def test_transaction_in_flight_is_finished_and_closes_with_connection_close() -> None:
    c = Connections()
    c.scanner.hold = True
    proto, transport = c.open()
    proto.dataReceived(respmod(chunked(b"hello world"), AUTH, "Allow: 204"))
    drained = c.factory.drain(30)
    results: list[int] = []
    drained.addCallback(results.append)
    assert not transport.disconnecting and results == []  # the scan is still running
    c.scanner.release()
    [r] = parse_responses(transport.value())
    assert r.status == 204
    assert r.headers["connection"] == "close"
    assert transport.disconnecting
    c.close_if_asked(proto, transport)
    assert results == [0]


def test_idle_keep_alive_connection_closes_at_once() -> None:
    c = Connections()
    busy, busy_transport = c.open()
    idle, idle_transport = c.open()
    idle.dataReceived(options())  # served before the shutdown: now an idle keep-alive connection
    assert not idle_transport.disconnecting
    idle_transport.clear()
    c.scanner.hold = True
    busy.dataReceived(respmod(chunked(b"x"), AUTH, "Allow: 204"))
    c.factory.drain(30)
    assert idle_transport.disconnecting and idle_transport.value() == b""
    assert not busy_transport.disconnecting


def test_pipelined_requests_already_received_are_all_answered() -> None:
    c = Connections()
    c.scanner.hold = True
    proto, transport = c.open()
    proto.dataReceived(respmod(chunked(b"one"), AUTH, "Allow: 204") + options())
    proto.dataReceived(respmod(chunked(b"two"), AUTH, "Allow: 204"))  # arrives while scanning
    results: list[int] = []
    c.factory.drain(30).addCallback(results.append)
    c.scanner.release()  # answers "one" and OPTIONS, starts scanning "two"
    c.scanner.release()
    answers = parse_responses(transport.value())
    assert [r.status for r in answers] == [204, 200, 204]
    assert [r.headers.get("connection") for r in answers] == [None, None, "close"]
    c.close_if_asked(proto, transport)
    assert results == [0]


def test_request_arriving_in_pieces_is_finished() -> None:
    c = Connections()
    proto, transport = c.open()
    message = respmod(chunked(b"hello world"), AUTH, "Allow: 204")
    proto.dataReceived(message[:40])  # the head is not even complete
    c.factory.drain(30)
    assert not transport.disconnecting
    proto.dataReceived(message[40:])
    [r] = parse_responses(transport.value())
    assert r.status == 204 and r.headers["connection"] == "close"
    assert transport.disconnecting


def test_echo_under_way_is_finished() -> None:
    c = Connections()
    proto = c.factory.buildProtocol(None)
    transport = BufferingTransport(high_water=64 * 1024)  # the peer reads slower than we write
    proto.makeConnection(transport)
    proto.dataReceived(respmod(chunked(b"z" * 200_000, 65536), AUTH))  # no Allow: 204: echoed whole
    assert transport.producer_paused  # the echo waits for the peer
    c.factory.drain(30)
    assert not transport.disconnecting
    out = b""
    while chunk := transport.drain():
        out += chunk
    [r] = parse_responses(out)
    assert r.status == 200 and r.body is not None and len(r.body) == 200_000
    assert transport.disconnecting  # its head went out before the drain: closed after the body


def test_connections_still_busy_at_the_deadline_are_aborted_and_counted() -> None:
    c = Connections()
    c.scanner.hold = True
    proto, transport = c.open()
    proto.dataReceived(respmod(chunked(b"stuck"), AUTH, "Allow: 204"))
    results: list[int] = []
    c.factory.drain(30).addCallback(results.append)
    c.clock.advance(29)
    assert results == [] and not transport.disconnected
    c.clock.advance(1)
    assert results == [1]
    assert transport.disconnected  # aborted, not waited for


def test_connection_accepted_after_the_drain_began_serves_its_request() -> None:
    c = Connections()
    c.factory.drain(30)
    proto, transport = c.open()  # from the listen backlog, accepted while stopping
    assert not transport.disconnecting  # its request may still be on the way
    proto.dataReceived(options())
    [r] = parse_responses(transport.value())
    assert r.status == 200 and r.headers["connection"] == "close"
    assert transport.disconnecting


def test_idle_connection_with_bytes_waiting_in_the_socket_is_not_closed() -> None:
    import socket

    c = Connections()
    proto, transport = c.open()
    proto.dataReceived(options())
    ours, theirs = socket.socketpair()
    try:
        transport.getHandle = lambda: ours  # type: ignore[attr-defined]
        theirs.sendall(options())  # sent, not yet read by the reactor
        c.factory.drain(30)
        assert not transport.disconnecting
        proto.dataReceived(ours.recv(65536))
        answers = parse_responses(transport.value())
        assert [r.headers.get("connection") for r in answers] == [None, "close"]
        assert transport.disconnecting
    finally:
        ours.close()
        theirs.close()


def test_drain_with_no_connections_fires_at_once() -> None:
    c = Connections()
    results: list[int] = []
    c.factory.drain(30).addCallback(results.append)
    assert results == [0]


class RecordingService(Service):
    def __init__(self, label: str, events: list[str]) -> None:
        self.label = label
        self.events = events

    def stopService(self) -> None:
        super().stopService()
        self.events.append(self.label)


def test_gateway_stops_listeners_then_drains_then_flushes_the_register() -> None:
    c = Connections()
    c.scanner.hold = True
    top = GatewayService(shutdown_timeout=30)
    top.factory = c.factory
    events: list[str] = []
    RecordingService("register", events).setServiceParent(top)  # stands for the register's writer
    RecordingService("listener", events).setServiceParent(top.listeners)
    top.listeners.setServiceParent(top)
    top.startService()
    proto, transport = c.open()
    proto.dataReceived(respmod(chunked(b"in flight"), AUTH, "Allow: 204"))
    stopped: list[object] = []
    top.stopService().addCallback(stopped.append)
    assert events == ["listener"]  # no new connections; the one in flight still runs
    c.scanner.release()
    c.close_if_asked(proto, transport)
    assert events == ["listener", "register"]  # its record was made before the writer flushed
    assert stopped and c.harness.observer.records[-1].icap_status == 204

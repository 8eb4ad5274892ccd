"""PROXY protocol in front of the ICAP protocol (gateway/proxyprotocol.py),
over StringTransport with a Clock: the gateway sees the source the header
names, only after a complete, valid header, within a deadline and a bound."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.interfaces import AuthFailure
from gateway.protocol import ICAPFactory
from gateway.proxyprotocol import (
    MAX_V1_HEADER,
    MAX_V2_HEADER,
    PROXY_HEADER_TIMEOUT,
    ProxyHeaderFactory,
    inner_endpoint,
    is_proxy_endpoint,
)
from gateway.settings import endpoint
from gateway.workers import AdoptedSocket, Listener, parse_worker_fds, worker_fds_argument
from tests.gateway.fakes import GOOD_KEY, make_harness
from tests.gateway.test_protocol import chunked, options, respmod
from tests.icap_responses import parse_responses

BALANCER = IPv4Address("TCP", "10.0.0.1", 40000)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(source: str, dest: str = "192.0.2.10", family: str = "TCP4") -> bytes:
    return f"PROXY {family} {source} {dest} 51000 1344\r\n".encode()


def v2_header(source: str, dest: str = "192.0.2.10", command: int = 0x21, tlv: bytes = b"") -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton(dest) + struct.pack("!HH", 51000, 1344)
    body = addresses + tlv
    return V2_SIGNATURE + bytes([command, 0x11]) + struct.pack("!H", len(body)) + body


@dataclass
class Proxied:
    wrapper: object
    transport: StringTransport
    factory: ProxyHeaderFactory
    clock: Clock
    harness: object

    def send(self, data: bytes, bytewise: bool = False) -> None:
        pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            self.wrapper.dataReceived(piece)  # type: ignore[attr-defined]


def proxied() -> Proxied:
    """The real ICAP protocol behind a ProxyHeaderFactory, its connection
    coming from the balancer's address."""
    h = make_harness()
    clock = h.clock
    h.proto.connectionLost(None)  # the harness connected its own; we build ours through the factory
    factory = ProxyHeaderFactory(ICAPFactory(h.proto.ctx), clock)
    wrapper = factory.buildProtocol(BALANCER)
    transport = StringTransport(peerAddress=BALANCER)
    wrapper.makeConnection(transport)
    return Proxied(wrapper, transport, factory, clock, h)


def failures(p: Proxied) -> list[AuthFailure]:
    return [e for e in p.harness.recorder.events if isinstance(e, AuthFailure)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("header", [v1_header, v2_header])
def test_refusal_is_recorded_against_the_source_the_header_names(header: object, bytewise: bool) -> None:
    p = proxied()
    p.send(header("203.0.113.7") + respmod(None, "Authorization: Bearer wrong"), bytewise)  # type: ignore[operator]
    [r] = parse_responses(p.transport.value())
    assert r.status == 403
    assert [f.source_ip for f in failures(p)] == ["203.0.113.7"]  # not the balancer's 10.0.0.1
    assert p.wrapper.getPeer().host == "203.0.113.7"  # type: ignore[attr-defined]


def test_the_gateway_is_connected_only_once_the_header_is_read() -> None:
    p = proxied()
    observer = p.harness.observer  # type: ignore[attr-defined]
    opened_before = observer.opened
    p.send(v1_header("203.0.113.7")[:-3])
    assert observer.opened == opened_before  # connectionMade would have seen the balancer
    p.send(v1_header("203.0.113.7")[-3:] + options())
    assert observer.opened == opened_before + 1
    assert parse_responses(p.transport.value())[0].status == 200


def test_good_key_after_the_header_is_served() -> None:
    p = proxied()
    p.send(v2_header("198.51.100.2") + respmod(None, f"Authorization: Bearer {GOOD_KEY}", "Allow: 204"))
    assert parse_responses(p.transport.value())[0].status == 204
    assert failures(p) == []


def test_no_header_within_the_deadline_closes_without_connecting() -> None:
    p = proxied()
    observer = p.harness.observer  # type: ignore[attr-defined]
    opened = observer.opened
    p.send(b"PROXY TCP4 ")
    p.clock.advance(PROXY_HEADER_TIMEOUT - 0.1)
    assert not p.transport.disconnecting
    p.clock.advance(0.2)
    assert p.transport.disconnecting and p.factory.rejected == 1
    assert observer.opened == opened
    p.wrapper.connectionLost(None)  # type: ignore[attr-defined]
    assert observer.closed == observer.opened  # the gateway never counted it
    assert p.clock.getDelayedCalls() == []


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",  # no PROXY signature: a client talking to the wrong port
    options(),  # plain ICAP on a PROXY listener
    b"PROXY TCP4 " + b"1" * MAX_V1_HEADER,  # v1 line longer than the spec's 107 bytes
    b"PROXY TCP4 evil\x1b[31m 192.0.2.10 51000 1344\r\n",  # source that is no address
    b"PROXY TCP4 203.0.113.7 192.0.2.10 port 1344\r\n",
    b"PROXY SCTP 203.0.113.7 192.0.2.10 51000 1344\r\n",
    b"PROXY TCP4 \xff\xfe 192.0.2.10 51000 1344\r\n",
    V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_HEADER),  # announces more than the bound
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for two IPv4 addresses
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_bad_header_closes_without_connecting(data: bytes, bytewise: bool) -> None:
    p = proxied()
    observer = p.harness.observer  # type: ignore[attr-defined]
    opened = observer.opened
    p.send(data + options(), bytewise)
    assert p.transport.disconnecting and p.factory.rejected == 1
    assert p.transport.value() == b"" and observer.opened == opened


def test_large_v2_header_with_tlvs_is_accepted() -> None:
    p = proxied()
    tlv = b"\x05" + struct.pack("!H", 128) + b"u" * 128  # PP2_TYPE_UNIQUE_ID
    p.send(v2_header("203.0.113.9", tlv=tlv) + respmod(None, "Authorization: Bearer wrong"))
    assert [f.source_ip for f in failures(p)] == ["203.0.113.9"]


def test_local_command_keeps_the_real_peer() -> None:
    """v2 LOCAL (HAProxy's own checks with check-send-proxy): no client; the
    connection is the balancer's own."""
    p = proxied()
    p.send(v2_header("203.0.113.7", command=0x20) + respmod(None, "Authorization: Bearer wrong"))
    assert [f.source_ip for f in failures(p)] == ["10.0.0.1"]


def test_ipv4_mapped_source_is_made_canonical() -> None:
    p = proxied()
    p.send(v1_header("::ffff:203.0.113.7", "::1", "TCP6") + respmod(None, "Authorization: Bearer wrong"))
    assert [f.source_ip for f in failures(p)] == ["203.0.113.7"]


def test_two_proxies_are_two_sources_to_the_real_rate_limiter() -> None:
    """One proxy with a wrong key is limited; another behind the same balancer is not."""
    from register.auth import KeyAuthenticator, credentials_from_headers
    from register.settings import AuthSettings

    settings = AuthSettings(failure_burst=2, failure_interval=3600.0)
    limited = KeyAuthenticator(settings, recorder=type("R", (), {"record": lambda self, e: None})(), clock=Clock())
    sources = []
    for source in ["203.0.113.7"] * 4 + ["198.51.100.2"]:
        p = proxied()
        seen: list[str] = []
        p.factory.wrappedFactory.ctx.credentials = (  # type: ignore[attr-defined]
            lambda headers, peer, seen=seen: seen.append(peer) or credentials_from_headers(headers, peer, settings))
        p.factory.wrappedFactory.ctx.authenticator = limited  # type: ignore[attr-defined]
        p.send(v1_header(source) + respmod(None, "Authorization: Bearer wrong"))
        sources += seen
    assert sources == ["203.0.113.7"] * 4 + ["198.51.100.2"]
    assert limited.limiter.limited("203.0.113.7")
    assert not limited.limiter.limited("198.51.100.2")
    assert not limited.limiter.limited("10.0.0.1")  # the balancer itself is never blamed


def test_endpoint_validator_accepts_haproxy_prefix() -> None:
    assert endpoint("haproxy:tcp:1344:interface=0.0.0.0") is None
    assert endpoint("haproxy:unix:/run/icap.sock") is None
    assert "udp" in (endpoint("haproxy:udp:1344") or "")
    assert endpoint("haproxy:haproxy:tcp:1344")
    assert endpoint("haproxy:")
    assert is_proxy_endpoint("haproxy:tcp:1") and inner_endpoint("haproxy:tcp:1") == "tcp:1"
    assert inner_endpoint("tcp:1") == "tcp:1"


def test_worker_fds_carry_the_proxy_flag() -> None:
    a, b = socket.socket(), socket.socket()
    try:
        listeners = [Listener(a, socket.AF_INET, "tcp:1344"),
                     Listener(b, socket.AF_INET6, "haproxy:tcp6:1345")]
        assert parse_worker_fds(worker_fds_argument(listeners)) == [
            AdoptedSocket(3, int(socket.AF_INET), False), AdoptedSocket(4, int(socket.AF_INET6), True)]
    finally:
        a.close()
        b.close()


def test_supervisor_binds_a_haproxy_listener_and_marks_it() -> None:
    from gateway.workers import bind_listener

    listener = bind_listener("haproxy:tcp:0:interface=127.0.0.1")
    try:
        assert listener.proxy_protocol and listener.family == socket.AF_INET
        assert listener.sock.getsockname()[0] == "127.0.0.1"
        assert worker_fds_argument([listener]).endswith(":proxy")
    finally:
        listener.sock.close()
    with pytest.raises(ValueError, match="haproxy:"):
        bind_listener("haproxy:ssl:1344")


def test_a_half_close_after_the_request_reaches_the_gateway_protocol() -> None:
    # Without IHalfCloseableProtocol on the wrapper, Twisted turns the peer's
    # shutdown(SHUT_WR) into a full close and the answer is never written.
    from twisted.internet.interfaces import IHalfCloseableProtocol

    p = proxied()
    assert IHalfCloseableProtocol.providedBy(p.wrapper)
    # A scan still running when the input ends: the answer follows it.
    scanner = p.harness.scanner  # type: ignore[attr-defined]
    scanner.hold = True
    p.send(v1_header("203.0.113.7") + respmod(chunked(b"body"), f"Authorization: Bearer {GOOD_KEY}", "Allow: 204"))
    p.wrapper.readConnectionLost()  # type: ignore[attr-defined]
    assert not p.transport.disconnecting
    scanner.release()
    assert [r.status for r in parse_responses(p.transport.value())] == [204]
    assert p.transport.disconnecting  # then closed: the peer sends nothing more


def test_a_half_close_before_the_header_closes() -> None:
    p = proxied()
    p.send(b"PROXY TCP4 ")
    p.wrapper.readConnectionLost()  # type: ignore[attr-defined]
    assert p.transport.disconnecting and p.transport.value() == b""

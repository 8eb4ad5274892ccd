"""PROXY protocol (v1 and v2) in front of the ICAP listeners.

Behind a TCP load balancer (HAProxy ``send-proxy-v2``) every connection
comes from the balancer's address, so the per-source rate limiter and the
failure records would see one source and one proxy sending wrong keys would
lock out every tenant behind the balancer.  A listener written
``haproxy:tcp:1344:...`` (Twisted's own endpoint prefix) reads the PROXY
header first, and the gateway then sees the proxy's real address in
``transport.getPeer()``.

Twisted's ``HAProxyProtocolWrapper`` is not used as it is: it connects the
wrapped protocol before the header is read (so ``connectionMade`` still sees
the balancer's address), drops a header split over two reads shorter than
its 8/16 first bytes, buffers by concatenation (quadratic for a trickle),
has no deadline for the header, and passes a v1 source address through
without checking that it is one.  ``ProxyHeaderReader`` keeps Twisted's
header parsers and fixes those: the gateway's protocol is connected only
once a valid header has been read, within ``PROXY_HEADER_TIMEOUT`` and
``MAX_PROXY_HEADER`` bytes, and the source address is canonical.

Anyone who can connect to such a listener can claim any source address:
only the load balancer may reach it (deploy/README.md).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import address, interfaces
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from register.users import canonical_ip

log = Logger()

# The endpoint prefix that asks for the PROXY protocol (Twisted's own).
PROXY_PREFIX = "haproxy:"

# HAProxy writes the header together with the connection, before any byte
# of the client: a peer that has not sent it within this is not HAProxy.
PROXY_HEADER_TIMEOUT = 5.0

# v1: the spec's maximum line, 107 bytes including CRLF.
MAX_V1_HEADER = 107
# v2: 16 fixed bytes, at most 216 of addresses (AF_UNIX), and the TLVs
# HAProxy adds on request (unique id up to 128, authority up to 255, SSL
# details): 4 KiB holds them all with room, while the format's own limit
# (16 + 65535) would let a peer park 64 KiB per connection.
MAX_V2_HEADER = 4096

_V1_SIGNATURE = V1Parser.PROXYSTR + b" "
_V2_SIGNATURE = V2Parser.PREFIX
_CRLF = b"\r\n"


def is_proxy_endpoint(description: str) -> bool:
    return description.startswith(PROXY_PREFIX)


def inner_endpoint(description: str) -> str:
    """``haproxy:tcp:1344`` -> ``tcp:1344``; other descriptions unchanged."""
    return description[len(PROXY_PREFIX):] if is_proxy_endpoint(description) else description


class BadProxyHeader(Exception):
    """Not a PROXY header we accept: the connection is closed."""


def parse_proxy_header(pending: bytes | bytearray) -> tuple[Any, int] | None:
    """(ProxyInfo, header length) once ``pending`` starts with a complete
    header; None while it may still become one; raises BadProxyHeader."""
    if pending[:len(_V2_SIGNATURE)] == _V2_SIGNATURE[:len(pending)]:
        if len(pending) < 16:
            return None
        size = 16 + struct.unpack("!H", pending[14:16])[0]
        if size > MAX_V2_HEADER:
            raise BadProxyHeader(f"v2 header of {size} bytes")
        if len(pending) < size:
            return None
        return _parsed(V2Parser.parse, bytes(pending[:size])), size
    if pending[:len(_V1_SIGNATURE)] == _V1_SIGNATURE[:len(pending)]:
        end = pending.find(_CRLF, 0, MAX_V1_HEADER)
        if end < 0:
            if len(pending) >= MAX_V1_HEADER:
                raise BadProxyHeader("v1 header without CRLF in its first 107 bytes")
            return None
        return _parsed(V1Parser.parse, bytes(pending[:end])), end + len(_CRLF)
    raise BadProxyHeader("no PROXY signature")


def _parsed(parse: Any, header: bytes) -> Any:
    try:
        return parse(header)
    except (InvalidProxyHeader, ValueError, struct.error, KeyError, IndexError) as e:
        raise BadProxyHeader(type(e).__name__) from None


def _canonical(addr: Any) -> Any:
    """An IP source as a canonical address; None (use the real peer) for
    LOCAL, UNKNOWN and AF_UNIX; BadProxyHeader for anything else."""
    if addr is None or isinstance(addr, address.UNIXAddress):
        return None
    host = canonical_ip(addr.host) if isinstance(addr.host, str) else None
    if host is None:
        raise BadProxyHeader("source is not an IP address")
    kind = address.IPv6Address if ":" in host else address.IPv4Address
    return kind("TCP", host, addr.port)


def _first_host(addr: Any) -> str:
    return getattr(addr, "host", "") or "unix"


@implementer(interfaces.IHalfCloseableProtocol)
class ProxyHeaderReader(policies.ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol with
    ``getPeer()`` giving the source the header names."""

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory, wrappedProtocol: interfaces.IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._pending: bytearray | None = bytearray()
        self._source: Any = None
        self._destination: Any = None
        self._deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without connecting the wrapped
        # protocol: that waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._deadline = self.factory.clock.callLater(PROXY_HEADER_TIMEOUT, self._reject, "no header in time")

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:  # rejected: what still arrives is dropped
            return
        self._pending += data
        try:
            parsed = parse_proxy_header(self._pending)
            if parsed is None:
                return
            info, length = parsed
            self._source, self._destination = _canonical(info.source), _canonical(info.destination)
        except BadProxyHeader as e:
            self._reject(str(e))
            return
        rest, self._pending = bytes(self._pending[length:]), None
        self._cancel_deadline()
        self.wrappedProtocol.makeConnection(self)
        if rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def _reject(self, why: str) -> None:
        self._cancel_deadline()
        self.factory.rejected += 1
        log.info("PROXY protocol: closing a connection from {peer}: {why}",
                 peer=_first_host(self.transport.getPeer()), why=why)
        self._pending = bytearray()  # nothing more is kept
        self.loseConnection()  # sets self.disconnecting

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def readConnectionLost(self) -> None:
        """A half-close reaches the wrapped protocol as it would unwrapped."""
        if self._pending is not None:  # ended before its header: nothing to serve
            self._reject("closed before the header")
            return
        half_closeable = interfaces.IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half_closeable is not None:
            half_closeable.readConnectionLost()
        else:
            self.loseConnection()

    def writeConnectionLost(self) -> None:
        half_closeable = interfaces.IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half_closeable is not None and self._pending is None:
            half_closeable.writeConnectionLost()
        else:
            self.loseConnection()

    def getPeer(self) -> Any:
        return self._source or self.transport.getPeer()

    def getHost(self) -> Any:
        return self._destination or self.transport.getHost()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_deadline()
        self.factory.unregisterProtocol(self)
        if self._pending is None:  # the wrapped protocol was connected
            self.wrappedProtocol.connectionLost(reason)
        self._pending = None
        self.wrappedProtocol = None


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps the ICAP factory of a ``haproxy:`` listener."""

    protocol = ProxyHeaderReader

    def __init__(self, wrappedFactory: Any, clock: Any) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.rejected = 0  # connections closed for a missing, late or bad header

    def logPrefix(self) -> str:
        return f"{super().logPrefix()} (PROXY)"


def listener_factory(description: str, factory: Any, clock: Any) -> Any:
    """The factory a listener described by ``description`` serves."""
    return ProxyHeaderFactory(factory, clock) if is_proxy_endpoint(description) else factory

"""A real gateway listening with ``haproxy:`` (PROXY protocol), single-process
and with workers: the failure records and the rate limiter see the source
the PROXY header names, so a proxy sending wrong keys locks out only itself,
not another proxy behind the same balancer."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.peers import GatewayProcess, gateway_process, wait_for

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
WRONG_KEY = "icgw.acme." + "x" * 43
# The failures one source may have before it is limited (small so the test is short).
BURST = 3


def v1_header(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 51000 1344\r\n".encode()


def v2_header(source: str) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 51000, 1344)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def reqmod(key: str) -> bytes:
    http = b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"
    return (f"REQMOD icap://127.0.0.1/reqmod ICAP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Allow: 204\r\nEncapsulated: req-hdr=0, null-body={len(http)}\r\n\r\n").encode() + http


class Proxy:
    """One persistent ICAP connection, as Squid keeps, behind a fake balancer."""

    def __init__(self, port: int, header: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(header)
        self.buffer = b""

    def status(self, key: str) -> int:
        """Send one REQMOD, return the ICAP status of its answer."""
        self.sock.sendall(reqmod(key))
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        # The answers here are 204 or an error without a body (null-body).
        assert b"null-body=0" in head or b"Encapsulated" not in head, head
        self.buffer = rest
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


def _bootstrap(gw: GatewayProcess) -> None:
    gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
    out = gw.cli("tenant", "add", "acme", "--company", "Acme Oy", "--json", "--operator", "e2e")
    gw.key = json.loads(out.stdout)["key"]  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=[1, 2], ids=["single-process", "workers"])
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    with gateway_process(auth_required=True, before_start=_bootstrap, proxy_protocol=True,
                         settings={"server": {"workers": request.param},
                                   "auth": {"failure_burst": BURST, "failure_interval": "1h"}}) as gw:
        yield gw


def failures(gw: GatewayProcess) -> list[dict[str, str]]:
    out = gw.cli("register", "export", "--tenant", "acme", "--json", "--operator", "e2e")
    return json.loads(out.stdout)["auth_failures"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("header", [v1_header, v2_header], ids=["v1", "v2"])
def test_wrong_keys_lock_out_only_the_proxy_that_sent_them(gateway: GatewayProcess, header: object) -> None:
    # Fresh sources per case: the module's gateway remembers earlier failures.
    bad, good = ("203.0.113.1", "198.51.100.1") if header is v1_header else ("203.0.113.2", "198.51.100.2")
    key = gateway.key  # type: ignore[attr-defined]
    wrong = Proxy(gateway.port, header(bad))  # type: ignore[operator]
    try:
        # One persistent connection: with workers, one process sees all of it.
        assert [wrong.status(WRONG_KEY) for _ in range(BURST + 1)] == [403] * (BURST + 1)
        assert wrong.status(key) == 403  # now limited, even with the right key
    finally:
        wrong.close()
    other = Proxy(gateway.port, header(good))  # type: ignore[operator]
    try:
        assert other.status(key) == 204  # same balancer address, another proxy: served
    finally:
        other.close()
    recorded = wait_for(lambda: [f for f in failures(gateway) if f["source_ip"] == bad], timeout=15)
    assert [f["reason"] for f in recorded] == ["unknown-key"] * BURST + ["rate-limited"]
    assert not [f for f in failures(gateway) if f["source_ip"] in (good, "127.0.0.1")]


def test_a_connection_without_a_header_is_closed_and_the_gateway_keeps_serving(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as plain:
        plain.sendall(reqmod(gateway.key))  # type: ignore[attr-defined]
        assert plain.recv(65536) == b""  # closed, nothing answered
    proxy = Proxy(gateway.port, v1_header("198.51.100.9"))
    try:
        assert proxy.status(gateway.key) == 204  # type: ignore[attr-defined]
    finally:
        proxy.close()

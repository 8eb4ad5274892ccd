"""ICAP over TLS (``ssl:`` listeners) against a real gateway process, with
Python's ssl as the client: single process, workers, behind ``haproxy:``,
a certificate rotated with SIGHUP, old protocol versions refused."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import EICAR, GatewayProcess, gateway_process, wait_for
from tests.tlscerts import Authority, Issued, issue, make_ca


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return make_ca(tmp_path)


@pytest.fixture
def server_cert(ca: Authority, tmp_path: Path) -> Issued:
    return issue(ca, tmp_path, "gateway", server=True)


def tls_option(cert: Issued) -> str:
    return f"privateKey={cert.key}:certKey={cert.cert}"


def client_context(ca: Authority, cert: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def connect(port: int, ctx: ssl.SSLContext, *, before_tls: bytes = b"") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    if before_tls:
        raw.sendall(before_tls)  # a PROXY header, in clear, ahead of the handshake
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def options(port: int) -> bytes:
    return f"OPTIONS icaps://127.0.0.1:{port}/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()


def respmod(port: int, body: bytes, *, key: str = "", allow_204: bool = True) -> bytes:
    req = b"GET http://example.com/file HTTP/1.1\r\nHost: example.com\r\n\r\n"
    res = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    allow = "Allow: 204\r\n" if allow_204 else ""
    head = (f"RESPMOD icaps://127.0.0.1:{port}/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n{auth}{allow}"
            f"Encapsulated: req-hdr=0, res-hdr={len(req)}, res-body={len(req) + len(res)}\r\n\r\n").encode()
    return head + req + res + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def exchange(sock: ssl.SSLSocket, request: bytes) -> tuple[int, bytes]:
    """Send one ICAP request; the status and whole answer."""
    sock.sendall(request)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"closed before an answer: {buffer!r}"
        buffer += data
    head = buffer.partition(b"\r\n\r\n")[0]
    if b"res-body=" in head or b"req-body=" in head:
        while not buffer.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "closed mid-answer"
            buffer += data
    return int(head.split(b" ", 2)[1]), buffer


def peer_sha256(sock: ssl.SSLSocket) -> str:
    import hashlib

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


@pytest.fixture(params=[1, 2], ids=["single-process", "two-workers"])
def icaps_gateway(request: pytest.FixtureRequest, server_cert: Issued) -> Iterator[GatewayProcess]:
    with gateway_process(tls=tls_option(server_cert), settings={"server": {"workers": request.param}}) as gw:
        yield gw


def test_options_and_respmod_over_tls(icaps_gateway: GatewayProcess, ca: Authority, server_cert: Issued) -> None:
    port = icaps_gateway.port
    with connect(port, client_context(ca)) as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert peer_sha256(sock) == server_cert.sha256
        status, answer = exchange(sock, options(port))
        assert status == 200 and b"ISTag:" in answer
        # one persistent connection: several transactions, icaps:// in the request line
        status, answer = exchange(sock, respmod(port, EICAR))
        assert status == 200 and b"X-Infection-Found" in answer and b"403 Forbidden" in answer
        status, _ = exchange(sock, respmod(port, b"clean bytes\n"))
        assert status == 204


def test_plain_icap_on_a_tls_listener_gets_no_answer(icaps_gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", icaps_gateway.port), timeout=30) as sock:
        sock.sendall(options(icaps_gateway.port))
        answer = b""
        while data := sock.recv(65536):
            answer += data
        assert b"ICAP/1.0" not in answer  # a TLS alert at most, never ICAP in clear


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(server_cert: Issued, ca: Authority, version: ssl.TLSVersion) -> None:
    with gateway_process(tls=tls_option(server_cert)) as gw:
        ctx = client_context(ca)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old version at all
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            connect(gw.port, ctx)
        # the same client allowed TLS 1.2 is served: it was the version that was refused
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with connect(gw.port, ctx) as sock:
            assert sock.version() == "TLSv1.2"
            assert sock.cipher()[0].startswith("ECDHE-")


def test_proxy_header_then_tls(server_cert: Issued, ca: Authority) -> None:
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1344\r\n"
    with gateway_process(tls=tls_option(server_cert), proxy_protocol=True, auth_required=True) as gw:
        with connect(gw.port, client_context(ca), before_tls=header) as sock:
            status, _ = exchange(sock, respmod(gw.port, b"x", key="icgw.nobody." + "x" * 43))
            assert status == 403
        # the gateway saw the source the PROXY header named, not the balancer
        wait_for(lambda: gw.access_log.exists() and "192.0.2.7" in gw.access_log.read_text(), timeout=10)


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "two-workers"])
def test_sighup_rotates_the_certificate(ca: Authority, tmp_path: Path, workers: int) -> None:
    first = issue(ca, tmp_path, "first", server=True)
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(first.cert.read_bytes())
    live_key.write_bytes(first.key.read_bytes())
    with gateway_process(tls=f"privateKey={live_key}:certKey={live_cert}",
                         settings={"server": {"workers": workers}}) as gw:
        ctx = client_context(ca)
        with connect(gw.port, ctx) as old:
            assert peer_sha256(old) == first.sha256
            second = issue(ca, tmp_path, "second", server=True)
            live_cert.write_bytes(second.cert.read_bytes())
            live_key.write_bytes(second.key.read_bytes())
            os.kill(gw.proc.pid, signal.SIGHUP)

            def rotated() -> bool:
                with connect(gw.port, ctx) as new:
                    return peer_sha256(new) == second.sha256

            # every worker, not just one: several new connections all see it
            wait_for(lambda: all(rotated() for _ in range(6)), timeout=15)
            # the connection opened before keeps working on its handshake
            assert exchange(old, options(gw.port))[0] == 200
        # a broken certificate keeps the last good one serving, and says why
        live_cert.write_text("not a certificate\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: "old certificate keeps serving" in gw.log(), timeout=15)
        for _ in range(4):
            with connect(gw.port, ctx) as sock:
                assert peer_sha256(sock) == second.sha256
                assert exchange(sock, options(gw.port))[0] == 200

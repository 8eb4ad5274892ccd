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


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "two-workers"])
def test_proxy_header_then_tls(server_cert: Issued, ca: Authority, workers: int) -> None:
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1344\r\n"
    with gateway_process(tls=tls_option(server_cert), proxy_protocol=True, auth_required=True,
                         settings={"server": {"workers": workers}}) as gw:
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


# --- client certificates bound to tenants ------------------------------------------


def x_user(name: str) -> str:
    import base64

    return "X-Authenticated-User: " + base64.b64encode(f"WinNT://CORP/{name}".encode()).decode() + "\r\n"


def with_header(request: bytes, header: str) -> bytes:
    line_end = request.index(b"\r\n") + 2
    return request[:line_end] + header.encode() + request[line_end:]


def export(gw: GatewayProcess, tenant: str) -> dict[str, object]:
    import json

    out = gw.cli("register", "export", "--tenant", tenant, "--json", "--operator", "e2e")
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def failure_rows(gw: GatewayProcess) -> list[tuple[str, str | None]]:
    import sqlite3

    with sqlite3.connect(gw.workdir / "register.sqlite3") as db:
        return list(db.execute("SELECT reason, client_cert_sha256 FROM auth_failures ORDER BY id"))


@pytest.fixture
def proxies(ca: Authority, tmp_path: Path) -> dict[str, Issued]:
    other_ca = make_ca(tmp_path, "other-ca")
    return {name: issue(ca, tmp_path, name, server=False) for name in ("acme", "beta", "unbound", "revoked")} | {
        "foreign": issue(other_ca, tmp_path, "foreign", server=False)}


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "two-workers"])
def test_client_certificates_bound_to_tenants(ca: Authority, server_cert: Issued, proxies: dict[str, Issued],
                                              workers: int) -> None:
    keys: dict[str, str] = {}

    def bootstrap(gw: GatewayProcess) -> None:
        import json

        gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
        for tenant in ("acme", "beta"):
            keys[tenant] = json.loads(gw.cli("tenant", "add", tenant, "--json", "--operator", "e2e").stdout)["key"]
            gw.cli("tenant", "cert", "add", tenant, str(proxies[tenant].cert), "--operator", "e2e")
        gw.cli("tenant", "cert", "add", "acme", str(proxies["revoked"].cert), "--operator", "e2e")
        gw.cli("tenant", "cert", "revoke", "acme", proxies["revoked"].sha256, "--operator", "e2e")

    settings = {"server": {"workers": workers},
                "tls": {"client_certificates": "optional", "client_ca": str(ca.cert)}}
    with gateway_process(tls=tls_option(server_cert), auth_required=True, settings=settings,
                         before_start=bootstrap) as gw:
        port = gw.port

        def status(cert: Issued | None, request: bytes) -> int:
            with connect(port, client_context(ca, cert)) as sock:
                return exchange(sock, request)[0]

        # acme's proxy: no key needed; EICAR blocked, clean passes, its user's login recorded under acme
        with connect(port, client_context(ca, proxies["acme"])) as sock:
            code, answer = exchange(sock, with_header(respmod(port, EICAR), x_user("alice")))
            assert code == 200 and b"X-Infection-Found" in answer
            assert exchange(sock, with_header(respmod(port, b"clean\n"), x_user("alice")))[0] == 204
            assert exchange(sock, respmod(port, b"clean\n", key=keys["acme"]))[0] == 204  # its own key: fine
            assert exchange(sock, respmod(port, b"clean\n", key=keys["beta"]))[0] == 403  # another tenant's
        wait_for(lambda: [u["username"] for u in export(gw, "acme")["users"]] == ["alice"], timeout=15)  # type: ignore[union-attr,index]
        assert export(gw, "beta")["users"] == []
        # OPTIONS needs nothing, over TLS without a certificate
        assert status(None, options(port)) == 200
        assert status(None, respmod(port, b"x")) == 401  # no certificate, no key
        assert status(None, respmod(port, b"x", key=keys["beta"])) == 204  # keys still work alone
        assert status(proxies["unbound"], respmod(port, b"x")) == 403
        assert status(proxies["unbound"], respmod(port, b"x", key=keys["acme"])) == 403
        assert status(proxies["revoked"], respmod(port, b"x")) == 403
        # a certificate of another CA does not finish the handshake
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            status(proxies["foreign"], options(port))

        wanted = [("key-not-certificate-tenant", proxies["acme"].sha256), ("missing-key", None),
                  ("unknown-certificate", proxies["unbound"].sha256),
                  ("unknown-certificate", proxies["unbound"].sha256),
                  ("revoked-certificate", proxies["revoked"].sha256)]
        wait_for(lambda: failure_rows(gw) == wanted, timeout=15)
        revoked = [f for f in export(gw, "acme")["auth_failures"]  # type: ignore[union-attr]
                   if f["reason"] == "revoked-certificate"]  # type: ignore[index]
        assert revoked and revoked[0]["client_cert_sha256"] == proxies["revoked"].sha256  # type: ignore[index]
        for issued in proxies.values():  # no certificate bytes in the logs
            body = "".join(issued.cert.read_text().splitlines()[1:-1])
            assert body[:40] not in gw.log() and body[:40] not in gw.access_log.read_text()


def test_required_client_certificates_end_a_handshake_without_one(ca: Authority, server_cert: Issued,
                                                                   proxies: dict[str, Issued]) -> None:
    settings = {"tls": {"client_certificates": "required", "client_ca": str(ca.cert)}}
    with gateway_process(tls=tls_option(server_cert), settings=settings) as gw:
        with connect(gw.port, client_context(ca, proxies["unbound"])) as sock:
            assert exchange(sock, options(gw.port))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with connect(gw.port, client_context(ca)) as sock:
                exchange(sock, options(gw.port))  # TLS 1.3: the alert comes after the handshake


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "two-workers"])
def test_a_certificate_that_does_not_load_fails_the_start(tmp_path: Path, server_cert: Issued, workers: int) -> None:
    import subprocess
    import sys

    listen = f"ssl:0:privateKey={server_cert.key}:certKey={tmp_path / 'missing.crt'}:interface=127.0.0.1"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--listen", listen, "--workers", str(workers),
         "--metrics", "tcp:0:interface=127.0.0.1", "--database", f"sqlite:///{tmp_path / 'r.sqlite3'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "missing.crt: No such file or directory" in result.stderr, result.stderr

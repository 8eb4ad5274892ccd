"""gateway.tls without a network: endpoint strings, contexts, reload, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gateway.config import parse_config
from gateway.settings import ConfigErrors
from gateway.tls import (
    HANDSHAKE_TIMEOUT,
    ClientCertificatePolicy,
    ReloadingContextFactory,
    TLSConfigError,
    TLSListeners,
    build_context,
    certificate_sha256,
    normalise_fingerprint,
    parse_tls_endpoint,
    plain_endpoint,
)
from tests.tlscerts import Authority, Issued, issue, make_ca


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return make_ca(tmp_path)


@pytest.fixture
def server(ca: Authority, tmp_path: Path) -> Issued:
    return issue(ca, tmp_path, "gateway", server=True)


def ssl_endpoint(cert: Issued, extra: str = "") -> str:
    return f"ssl:11344:privateKey={cert.key}:certKey={cert.cert}:interface=0.0.0.0{extra}"


def test_ssl_endpoint_binds_the_tcp_one(server: Issued) -> None:
    options = parse_tls_endpoint(ssl_endpoint(server, ":backlog=50"))
    assert (options.port, options.private_key, options.certificate) == (11344, str(server.key), str(server.cert))
    assert plain_endpoint(ssl_endpoint(server)) == "tcp:11344:interface=0.0.0.0"
    assert plain_endpoint("haproxy:" + ssl_endpoint(server)) == "haproxy:tcp:11344:interface=0.0.0.0"
    assert plain_endpoint("ssl:1344:privateKey=k.pem:interface=\\:\\:1") == "tcp:1344:interface=\\:\\:1"
    assert plain_endpoint("tcp:1344") == "tcp:1344"  # others unchanged
    # certKey defaults to privateKey (one PEM file with both), as in Twisted
    assert parse_tls_endpoint("ssl:1344:privateKey=both.pem").certificate == "both.pem"


@pytest.mark.parametrize("description, why", [
    ("ssl:1344", "privateKey"),
    ("ssl:privateKey=k.pem", "port"),
    ("ssl:1344:privateKey=k.pem:sslmethod=TLSv1_METHOD", "sslmethod"),
    ("ssl:1344:privateKey=k.pem:backlog=x", "backlog"),
])
def test_bad_ssl_endpoints_say_why(description: str, why: str) -> None:
    with pytest.raises(TLSConfigError, match=why):
        parse_tls_endpoint(description)


def test_context_is_tls_1_2_or_later_with_aead_ciphers(server: Issued) -> None:
    ctx = build_context(parse_tls_endpoint(ssl_endpoint(server)), ClientCertificatePolicy())
    conn = SSL.Connection(ctx, None)
    ciphers = conn.get_cipher_list()
    assert ciphers and all("GCM" in c or "CHACHA20" in c for c in ciphers), ciphers
    assert not any(c.startswith(("AES", "DES", "RC4")) for c in ciphers)  # no RSA key exchange
    assert ctx.get_verify_mode() == SSL.VERIFY_NONE


def test_client_certificate_modes(server: Issued, ca: Authority) -> None:
    options = parse_tls_endpoint(ssl_endpoint(server))
    optional = build_context(options, ClientCertificatePolicy("optional", str(ca.cert)))
    assert optional.get_verify_mode() == SSL.VERIFY_PEER
    required = build_context(options, ClientCertificatePolicy("required", str(ca.cert)))
    assert required.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    with pytest.raises(TLSConfigError, match="client_ca"):
        build_context(options, ClientCertificatePolicy("required", ""))


def test_broken_files_name_the_file_not_its_contents(server: Issued, tmp_path: Path) -> None:
    secret = tmp_path / "broken.key"
    secret.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGJ5dGVz\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSConfigError) as raised:
        build_context(parse_tls_endpoint(f"ssl:1:privateKey={secret}:certKey={server.cert}"),
                      ClientCertificatePolicy())
    assert str(secret) in str(raised.value) and "c2VjcmV0" not in str(raised.value)
    with pytest.raises(TLSConfigError, match=r"missing\.pem"):
        build_context(parse_tls_endpoint(f"ssl:1:privateKey={server.key}:certKey={tmp_path}/missing.pem"),
                      ClientCertificatePolicy())


def test_reload_swaps_the_context_and_keeps_the_old_one_on_failure(ca: Authority, tmp_path: Path) -> None:
    first, second = issue(ca, tmp_path, "first", server=True), issue(ca, tmp_path, "second", server=True)
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    factory = ReloadingContextFactory(f"ssl:1:privateKey={key}:certKey={cert}", ClientCertificatePolicy())
    original = factory.context
    cert.write_bytes(second.cert.read_bytes())
    key.write_bytes(second.key.read_bytes())
    assert factory.reload() and factory.context is not original
    rotated = factory.context
    cert.write_text("garbage")
    assert not factory.reload()
    assert factory.context is rotated and factory.reloads_failed == 1
    assert factory.serverConnectionForTLS(None).get_context() is rotated


def test_listeners_wrap_only_ssl_ones(server: Issued, tmp_path: Path) -> None:
    listeners = TLSListeners(ClientCertificatePolicy(), Clock(), ["tcp:1344", "haproxy:" + ssl_endpoint(server)], "t")
    plain = object()
    assert listeners.wrap(0, plain) is plain
    wrapped = listeners.wrap(1, plain)
    assert wrapped.wrappedFactory is plain and len(listeners.factories) == 1
    with pytest.raises(ConfigErrors, match=r"\[server\] listen: certificate .*missing\.pem"):
        TLSListeners(ClientCertificatePolicy(), Clock(),
                     [f"ssl:1:privateKey={server.key}:certKey={tmp_path}/missing.pem"], "t")


def test_fingerprints(server: Issued) -> None:
    assert certificate_sha256(server.cert.read_bytes()) == server.sha256
    colons = ":".join(server.sha256[i:i + 2] for i in range(0, 64, 2)).upper()
    assert normalise_fingerprint(colons) == server.sha256
    assert normalise_fingerprint("abc") is None and normalise_fingerprint("g" * 64) is None


def test_tls_config_section() -> None:
    assert parse_config({"tls": {"client_certificates": "required", "client_ca": "ca.pem"}}, "t").tls.client_ca
    with pytest.raises(ConfigErrors, match="client_ca"):
        parse_config({"tls": {"client_certificates": "optional"}}, "t")
    with pytest.raises(ConfigErrors, match="needs privateKey"):
        parse_config({"server": {"listen": ["tcp:1344", "haproxy:ssl:11344:certKey=c.pem"]}}, "t")
    with pytest.raises(ConfigErrors, match="client_certificates"):
        parse_config({"tls": {"client_certificates": "sometimes", "client_ca": "ca.pem"}}, "t")


def test_icaps_request_uris_are_accepted() -> None:
    from gateway.icap.connection import ServerConnection, service_of
    from gateway.icap.events import Request

    conn = ServerConnection()
    conn.receive_data(b"OPTIONS icaps://gw.example:11344/respmod ICAP/1.0\r\nHost: gw.example\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, Request) and event.service == "respmod"
    assert service_of("icaps://gw.example:11344/reqmod?x=1") == "reqmod"


def test_a_handshake_not_finished_in_time_is_cut(server: Issued) -> None:
    clock = Clock()
    listeners = TLSListeners(ClientCertificatePolicy(), clock, [ssl_endpoint(server)], "t")
    factory = listeners.wrap(0, Factory.forProtocol(Protocol))
    stalled, transport = factory.buildProtocol(None), StringTransport()
    stalled.makeConnection(transport)
    stalled.dataReceived(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and factory.handshakes_timed_out == 1
    stalled.connectionLost(None)
    # a connection that goes away first leaves no timer behind
    gone = factory.buildProtocol(None)
    gone.makeConnection(StringTransport())
    gone.connectionLost(None)
    assert clock.getDelayedCalls() == []

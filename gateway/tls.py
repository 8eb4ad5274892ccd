"""ICAP over TLS (ICAPS): ``ssl:`` listeners, certificate reload, client certificates.

An ``ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem:interface=ADDR`` listener
is served as the plain TCP listener ``tcp:PORT:interface=ADDR`` whose
factory is wrapped in Twisted's ``TLSMemoryBIOFactory``.  One shape for
every case: a single process binds the TCP endpoint, a worker adopts the TCP
socket its supervisor bound (gateway.workers), and behind ``haproxy:`` the
PROXY header is read from the raw stream before TLS starts
(``ProxyHeaderFactory(TLSMemoryBIOFactory(ICAPFactory))``); a handshake must
finish within ``HANDSHAKE_TIMEOUT``.  Twisted's own
``ssl:`` endpoint would fix the context at bind time (no reload) and cannot
adopt a socket.

Each listener's ``ReloadingContextFactory`` builds an OpenSSL context from
the files and hands every new connection a connection on the current
context; ``reload()`` (SIGHUP) builds a new one from the files and swaps it
in, so new connections get the new certificate while open ones keep theirs.
A certificate or key that does not load leaves the old context serving and
logs why.

Protocol versions and ciphers: TLS 1.2 and 1.3 only.  TLS 1.3 suites are all
AEAD with forward secrecy (OpenSSL's defaults: AES-GCM, ChaCha20-Poly1305);
for TLS 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
(``TLS12_CIPHERS``): no CBC, no RSA key exchange, no SHA-1 MACs.
Compression and renegotiation are off (CRIME; a client renegotiating in a
loop costs us a handshake each time).

Client certificates (``[tls] client_certificates``): "optional" asks for
one and verifies a presented one against ``[tls] client_ca``; "required"
also ends a handshake without one.  Which tenant a certificate is, is the
register's business (SHA-256 fingerprint, register.auth): the CA only
decides who may finish a handshake.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet import endpoints, interfaces
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from gateway.proxyprotocol import PROXY_PREFIX, inner_endpoint, is_proxy_endpoint

log = Logger()

TLS_PREFIX = "ssl:"

# TLS 1.2 suites: ECDHE (forward secrecy) with an AEAD cipher, ECDSA or RSA
# certificates.  TLS 1.3 suites are configured separately by OpenSSL and are
# all AEAD.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

# Sessions resumed by id or ticket skip the public-key work; the id context
# ties a resumed session to this service (required with client certificates).
SESSION_ID_CONTEXT = b"icap-gateway"

# The keys of an ssl: endpoint string we understand.  Twisted's others
# (sslmethod, dhParameters) would loosen what this module fixes: refused.
_TLS_OPTIONS = frozenset({"port", "privateKey", "certKey", "extraCertChain", "interface", "backlog"})

# A proxy's handshake is a few round trips, done at once: a peer that has not
# finished it within this is cut (the ICAP timers start only with ICAP bytes;
# before them a handshake would have had the 300 s idle timeout).
HANDSHAKE_TIMEOUT = 10.0


class TLSConfigError(ValueError):
    """An ssl: listener or [tls] setting that cannot be served; ``str()`` says why."""


@dataclass(frozen=True)
class TLSListenerOptions:
    """What an ``ssl:`` endpoint string says."""

    port: int
    private_key: str
    certificate: str
    extra_chain: str | None
    interface: str
    backlog: int | None

    def tcp_endpoint(self) -> str:
        """The plain TCP endpoint this listener binds."""
        parts = [f"tcp:{self.port}"]
        if self.interface:
            parts.append("interface=" + self.interface.replace(":", "\\:"))
        if self.backlog is not None:
            parts.append(f"backlog={self.backlog}")
        return ":".join(parts)


@dataclass(frozen=True)
class ClientCertificatePolicy:
    """``[tls] client_certificates`` and ``client_ca``."""

    mode: str = "off"
    ca_file: str = ""


def client_policy(settings: Any) -> ClientCertificatePolicy:
    """The policy of a ``[tls]`` section (gateway.config.TLSSettings)."""
    return ClientCertificatePolicy(settings.client_certificates, settings.client_ca)


def is_tls_endpoint(description: str) -> bool:
    return inner_endpoint(description).startswith(TLS_PREFIX)


def parse_tls_endpoint(description: str) -> TLSListenerOptions:
    """The options of ``ssl:...`` (after ``haproxy:`` or not); raises TLSConfigError."""
    inner = inner_endpoint(description)
    try:
        args, kwargs = endpoints._parse(inner)  # Twisted's own parser: \\: escapes and all
    except Exception as e:
        raise TLSConfigError(f"{description}: not an endpoint string ({e})") from None
    if not args or args[0] != "ssl":
        raise TLSConfigError(f"{description}: not an ssl: endpoint")
    unknown = sorted(set(kwargs) - _TLS_OPTIONS)
    if unknown:
        raise TLSConfigError(f"{description}: unsupported ssl: option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(_TLS_OPTIONS))})")
    port = kwargs.get("port") or (args[1] if len(args) > 1 else None)
    if port is None or not str(port).isdigit() or int(port) > 65535:
        raise TLSConfigError(f"{description}: needs a port number")
    private_key = kwargs.get("privateKey")
    if not private_key:
        raise TLSConfigError(f"{description}: needs privateKey=KEY.pem")
    backlog = kwargs.get("backlog")
    if backlog is not None and not backlog.isdigit():
        raise TLSConfigError(f"{description}: backlog must be a number")
    return TLSListenerOptions(
        port=int(port), private_key=private_key, certificate=kwargs.get("certKey") or private_key,
        extra_chain=kwargs.get("extraCertChain"), interface=kwargs.get("interface", ""),
        backlog=int(backlog) if backlog is not None else None,
    )


def tls_endpoint_problem(description: str) -> str | None:
    """Why an ``ssl:`` endpoint string cannot be served (its files unread), or None."""
    if not isinstance(description, str) or not is_tls_endpoint(description):
        return None
    try:
        parse_tls_endpoint(description)
    except TLSConfigError as e:
        return str(e)
    return None


def plain_endpoint(description: str) -> str:
    """``ssl:...`` -> the ``tcp:...`` it binds (``haproxy:`` kept); others unchanged."""
    if not is_tls_endpoint(description):
        return description
    tcp = parse_tls_endpoint(description).tcp_endpoint()
    return PROXY_PREFIX + tcp if is_proxy_endpoint(description) else tcp


def build_context(options: TLSListenerOptions, clients: ClientCertificatePolicy) -> SSL.Context:
    """An OpenSSL server context from the files; raises TLSConfigError naming
    the file that did not load (never its contents)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.set_session_id(SESSION_ID_CONTEXT)
    _readable(options.certificate, "certificate")
    _readable(options.private_key, "private key")
    try:
        ctx.use_certificate_chain_file(options.certificate.encode())
    except SSL.Error as e:
        raise TLSConfigError(f"certificate {options.certificate}: {_ssl_reason(e)}") from None
    if options.extra_chain:
        try:
            with open(options.extra_chain, "rb") as f:
                for cert in x509.load_pem_x509_certificates(f.read()):
                    ctx.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        except (OSError, ValueError, SSL.Error) as e:
            raise TLSConfigError(f"extraCertChain {options.extra_chain}: {_ssl_reason(e)}") from None
    try:
        ctx.use_privatekey_file(options.private_key.encode())
        ctx.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(f"private key {options.private_key}: {_ssl_reason(e)}") from None
    if clients.mode != "off":
        _require_client_certificates(ctx, clients)
    return ctx


def _require_client_certificates(ctx: SSL.Context, clients: ClientCertificatePolicy) -> None:
    if not clients.ca_file:
        raise TLSConfigError(f"[tls] client_certificates = {clients.mode!r} needs [tls] client_ca")
    try:
        with open(clients.ca_file, "rb") as f:
            authorities = x509.load_pem_x509_certificates(f.read())
        ctx.load_verify_locations(clients.ca_file.encode())
    except (OSError, ValueError, SSL.Error) as e:
        raise TLSConfigError(f"[tls] client_ca {clients.ca_file}: {_ssl_reason(e)}") from None
    # The CA names go into the CertificateRequest, so a client with several
    # certificates picks the one we accept.
    for authority in authorities:
        ctx.add_client_ca(authority)
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if clients.mode == "required" else 0)
    ctx.set_verify(mode, lambda _conn, _cert, _errno, _depth, ok: bool(ok))


def _readable(path: str, what: str) -> None:
    """OpenSSL says "system lib" for a missing file: say what the system said."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TLSConfigError(f"{what} {path}: {e.strerror}") from None


def _ssl_reason(error: Exception) -> str:
    """A short reason from an OpenSSL error or OSError (no file contents)."""
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        reasons = [str(item[-1]) for item in error.args[0] if item and item[-1]]
        return "; ".join(dict.fromkeys(reasons)) or "OpenSSL refused it"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


@implementer(interfaces.IOpenSSLServerConnectionCreator)
class ReloadingContextFactory:
    """Hands each new connection an ``SSL.Connection`` on the current context."""

    def __init__(self, description: str, clients: ClientCertificatePolicy) -> None:
        self.description = description
        self.options = parse_tls_endpoint(description)
        self.clients = clients
        self.context = build_context(self.options, clients)  # a broken file fails the start
        self.reloads_failed = 0

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)

    def reload(self) -> bool:
        """Rebuild the context from the files; on failure keep the old one."""
        try:
            context = build_context(self.options, self.clients)
        except TLSConfigError as e:
            self.reloads_failed += 1
            log.error("TLS reload of {listener} failed, the old certificate keeps serving: {why}",
                      listener=self.options.tcp_endpoint(), why=str(e))
            return False
        self.context = context
        log.info("TLS certificate reloaded for {listener}", listener=self.options.tcp_endpoint())
        return True


class _HandshakeDeadlineProtocol(TLSMemoryBIOProtocol):
    """TLS whose handshake must finish within ``HANDSHAKE_TIMEOUT``."""

    factory: HandshakeDeadlineFactory
    _deadline: Any = None

    def makeConnection(self, transport: Any) -> None:
        self._deadline = self.factory.clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_late)
        super().makeConnection(transport)

    def _handshake_late(self) -> None:
        self._deadline = None
        if not self._handshakeDone:
            self.factory.handshakes_timed_out += 1
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        super().connectionLost(reason)


class HandshakeDeadlineFactory(TLSMemoryBIOFactory):
    protocol = _HandshakeDeadlineProtocol

    def __init__(self, context_factory: Any, wrapped_factory: Any, clock: Any) -> None:
        super().__init__(context_factory, False, wrapped_factory)
        self.clock = clock
        self.handshakes_timed_out = 0


class TLSListeners:
    """The context factories of a gateway's ``ssl:`` listeners, by their
    index in ``[server] listen``; every file is loaded here, once."""

    def __init__(self, clients: ClientCertificatePolicy, clock: Any, listen: list[str], source: str) -> None:
        from gateway.settings import ConfigError, ConfigErrors

        self.clock = clock
        self.by_index: dict[int, ReloadingContextFactory] = {}
        errors = []
        for index, description in enumerate(listen):
            if is_tls_endpoint(description):
                try:
                    self.by_index[index] = ReloadingContextFactory(description, clients)
                except TLSConfigError as e:
                    errors.append(ConfigError(source, "[server] listen", str(e)))
        if errors:
            raise ConfigErrors(errors)
        self.factories = list(self.by_index.values())

    def wrap(self, index: int, factory: Any) -> Any:
        """The factory of listener ``index``: ``factory`` itself, or wrapped in TLS."""
        context_factory = self.by_index.get(index)
        return factory if context_factory is None else HandshakeDeadlineFactory(context_factory, factory, self.clock)

    def reload(self) -> None:
        for context_factory in self.factories:
            context_factory.reload()

    def install_sighup(self, reactor: Any) -> None:
        """Reload certificates on SIGHUP too, keeping the handler already
        installed (the rules' reload).  Call from the main thread."""
        if not self.factories:
            return
        previous: Callable[..., Any] | int | None = signal.getsignal(signal.SIGHUP)

        def handler(signum: int, frame: Any) -> None:
            if callable(previous):
                previous(signum, frame)
            reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, handler)


def client_certificate_sha256(transport: Any) -> str | None:
    """Lower-case hex SHA-256 of the DER certificate the TLS peer presented
    (verified in the handshake), or None: no TLS or no certificate."""
    if not interfaces.ISSLTransport.providedBy(transport):
        return None
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return cert.to_cryptography().fingerprint(hashes.SHA256()).hex()


def normalise_fingerprint(value: str) -> str | None:
    """``AB:CD:...`` or ``abcd...`` (64 hex digits) -> lower-case hex; None if it is not one."""
    digits = value.strip().replace(":", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return digits


def certificate_sha256(pem: bytes) -> str:
    """SHA-256 fingerprint of the first certificate of a PEM file; ValueError if none."""
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()

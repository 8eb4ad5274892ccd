"""The small interfaces the ICAP protocol is handed at construction.

The protocol knows *when* to authenticate, scan, record and observe; the
objects behind these interfaces know *how*.  They meet only here and in
``gateway.service.makeService``: ``register/`` and ``monitoring/`` may import
this module (it imports nothing heavy) but never the protocol.

Everything here is called on the reactor thread and must not block: an
implementation that needs the database or YARA defers to a thread pool and
calls back (scan) or enqueues (record).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

Direction = Literal["request", "response"]


# --- authentication -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant as the request path needs it: no personal data here."""

    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """What an ICAP request presents.  ``key`` is secret: never log it."""

    key: str | None  # from "Authorization: Bearer <key>", None when absent
    source_ip: str  # the ICAP peer (the proxy), not the end user
    tenant_hint: str | None = None  # e.g. a tenant name the key's prefix names
    # Lower-case hex SHA-256 of the TLS client certificate of the connection
    # (verified in the handshake, gateway.tls), None without one.
    client_cert_sha256: str | None = None

    def __repr__(self) -> str:  # keep the key out of any accidental log line
        return (f"Credentials(key={'<set>' if self.key else None}, source_ip={self.source_ip!r}, "
                f"client_cert_sha256={self.client_cert_sha256!r})")


@dataclass(frozen=True, slots=True)
class Authenticated:
    tenant: Tenant


@dataclass(frozen=True, slots=True)
class Refused:
    """A refusal: ``status`` is the ICAP status to answer (401 or 403)."""

    status: int
    reason: str  # short, safe to log and to record ("missing-key", "unknown-key", ...)


class Authenticator(Protocol):
    """Checks a request's key.  Called on the reactor: must be cheap (an
    in-memory lookup of a fast hash), never a database round trip."""

    def authenticate(self, credentials: Credentials) -> Authenticated | Refused: ...


# --- the register ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserSeen:
    """An end user's request passed through ``tenant``'s proxy."""

    tenant_id: int
    username: str
    client_ip: str
    at: float  # POSIX seconds, from the injected clock


# The fixed names an identity header with a refused value is counted and
# logged under (a metric label: never the configured header name).
BAD_CLIENT_IP = "x-client-ip"
BAD_USER = "x-authenticated-user"
BAD_HEADER_NAMES = (BAD_CLIENT_IP, BAD_USER)


class Identity(NamedTuple):
    """Who the end user is, from the ICAP headers the proxy adds."""

    username: str | None
    client_ip: str  # canonical; the peer's address when the header was absent or refused
    # BAD_HEADER_NAMES of headers whose value was refused: counted and noted
    # in the access log, never stored.
    bad_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthFailure:
    at: float
    source_ip: str
    tenant_presented: str | None
    reason: str
    client_cert_sha256: str | None = None  # the refused certificate's fingerprint, never its bytes


RegisterEvent = UserSeen | AuthFailure


class Recorder(Protocol):
    """Takes register events without waiting: a bounded queue drained by a
    background writer.  ``record`` never blocks and never raises."""

    def record(self, event: RegisterEvent) -> None: ...


# --- scanning -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScanContext:
    """Fills the YARA externals for one transaction."""

    direction: Direction
    url: str = ""
    host: str = ""
    filepath: str = ""  # the URL path
    filename: str = ""  # Content-Disposition filename, else the URL path's last part
    extension: str = ""
    filetype: str = ""  # the MIME type the HTTP message claims
    tenant: str = ""
    # Not an external: how the body is encoded (Content-Encoding); the
    # scanner decodes gzip, deflate, br and zstd before matching, off the reactor.
    content_encoding: str = ""
    # Not an external: the tenant's max_scan_size ([tenants.NAME]); 0: the scanner's own.
    max_scan_size: int = 0


# Why a body could not be vouched for, a fixed set (metric labels, access log,
# X-Scan-Status, the [scan] unscannable_policy keys), with the block page's
# explanation for each.  A rule match blocks whatever the reason.
UNSCANNABLE_REASONS: dict[str, str] = {
    "too-large": "The content is too large to be scanned.",
    "decode-limit": "The content decompresses to more than the gateway scans.",
    "bomb": "The content is compressed so strongly that it looks like a decompression bomb.",
    "corrupt-encoding": "The content's compression is corrupt or truncated.",
    "unknown-encoding": "The content is compressed in a way the gateway cannot undo.",
    "trailing-data": "The content carries data after the end of its compressed stream.",
    "scan-timeout": "Scanning the content took too long.",
    "engine-error": "The scanner failed on this content.",
}
UnscannableReason = Literal[
    "too-large", "decode-limit", "bomb", "corrupt-encoding", "unknown-encoding", "trailing-data",
    "scan-timeout", "engine-error",
]
Action = Literal["block", "pass"]
CacheUse = Literal["hit", "miss", "bypass"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a scan decided.  ``outcome`` is clean, blocked (a rule matched) or
    unscannable: the body could not be scanned whole, ``reason`` says why and
    ``action`` is what the policy for that reason does with it.  ("error" and
    "unscanned" are the older spellings of unscannable with reason
    engine-error and too-large; the transaction still understands them.)"""

    outcome: Literal["clean", "blocked", "unscannable", "error", "unscanned"]
    rules: Sequence[str] = ()  # "namespace.rule" for each match
    detail: str = ""  # why, for the access log: error text, "cached" ...
    scanned_bytes: int = 0
    duration: float = 0.0
    ruleset_version: str = ""
    # One of UNSCANNABLE_REASONS when part of the body went unscanned, also
    # on a "blocked" verdict (a match in what could be scanned); else "".
    reason: str = ""
    action: Action | Literal[""] = ""  # for unscannable: what the policy does
    # Scanned on the reactor thread, not in a scanning thread
    # (gateway.scanning.handoff.InlineScans): for the metrics.
    inline: bool = False
    # What the verdict cache had to do with it, for the metrics: "hit" (it
    # answered), "miss" (asked, then scanned) or "bypass" (never asked: no
    # cache, a body whose scan costs less than a lookup, a verdict made
    # without a scan).
    cache: CacheUse = "bypass"


# --- observation ----------------------------------------------------------


# monitored: a tenant in monitor mode passed what would have been blocked.
Outcome = Literal["clean", "blocked", "error", "unauthenticated", "unscanned", "monitored"]


@dataclass(slots=True)
class TransactionRecord:
    """One finished ICAP transaction, for metrics and the access log.
    Holds no secret: no Authorization, no key."""

    started: float
    duration: float
    method: str
    service: str
    icap_status: int
    client_ip: str  # X-Client-IP, else the peer
    peer: str  # the proxy
    tenant: str = ""
    user: str = ""
    url: str = ""
    http_status: int | None = None
    outcome: Outcome | None = None
    rules: Sequence[str] = field(default_factory=tuple)
    direction: Direction | None = None
    body_bytes: int = 0
    scan_duration: float | None = None
    detail: str = ""
    # Identity headers whose value was refused (see Identity.bad_headers).
    bad_headers: tuple[str, ...] = ()
    unscannable: str = ""  # the verdict's reason (UNSCANNABLE_REASONS), "" when scanned whole


class Observer(Protocol):
    """Sees what the gateway does.  Must not block or raise."""

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def transaction_finished(self, record: TransactionRecord) -> None: ...

    def scan_finished(self, verdict: Verdict, direction: Direction) -> None: ...

    def auth_failed(self, reason: str) -> None: ...

    def rules_loaded(self, ok: bool, rule_count: int, version: str) -> None: ...

    def internal_error(self) -> None:
        """An unexpected exception in per-transaction code (answered 500)."""
        ...

    def connection_dropped(self, reason: str) -> None:
        """A connection closed by a limit: head-timeout, read-timeout,
        drain-timeout, write-timeout, pipelined-overflow, evicted-idle."""

    def late_block(self, event: str) -> None:
        """The late-block memory (gateway.lateblock) at work: one of
        LATE_BLOCK_EVENTS (remembered, respmod-blocked, reqmod-refused,
        expired, evicted)."""


class NullObserver:
    """An Observer that does nothing (tests, tools)."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def transaction_finished(self, record: TransactionRecord) -> None:
        pass

    def scan_finished(self, verdict: Verdict, direction: Direction) -> None:
        pass

    def auth_failed(self, reason: str) -> None:
        pass

    def rules_loaded(self, ok: bool, rule_count: int, version: str) -> None:
        pass

    def internal_error(self) -> None:
        pass

    def connection_dropped(self, reason: str) -> None:
        pass

    def late_block(self, event: str) -> None:
        pass


class Scanner(Protocol):
    """Scans a complete body off the reactor.  ``body`` is bytes or a path to
    a spooled file.  It never fails: errors and timeouts become unscannable
    verdicts (engine-error, scan-timeout)."""

    @property
    def version(self) -> str:
        """The ISTag-worthy identity of the loaded ruleset."""
        ...

    def scan(self, body: bytes | str, context: ScanContext) -> Deferred[Verdict]:
        """The verdict as a Deferred that never errbacks (tools, tests, reloads)."""
        ...

    def scan_then(self, body: bytes | str, context: ScanContext, on_verdict: Callable[[Verdict], object]) -> None:
        """Call ``on_verdict(verdict)`` once, on the reactor thread (maybe
        before returning).  What the protocol calls per transaction: no
        Deferred and its callback chain per scan."""
        ...


__all__ = [
    "BAD_CLIENT_IP",
    "BAD_HEADER_NAMES",
    "BAD_USER",
    "UNSCANNABLE_REASONS",
    "Action",
    "AuthFailure",
    "Authenticated",
    "Authenticator",
    "Credentials",
    "Direction",
    "Identity",
    "NullObserver",
    "Observer",
    "Outcome",
    "Recorder",
    "Refused",
    "RegisterEvent",
    "ScanContext",
    "Scanner",
    "Tenant",
    "TransactionRecord",
    "UnscannableReason",
    "UserSeen",
    "Verdict",
]

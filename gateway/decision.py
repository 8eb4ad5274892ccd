"""What to answer: pure functions from what is known about a transaction to
the answer it gets.  No Twisted, no I/O, no clock: table-tested in
``tests/gateway/test_decision.py``.

The protocol asks three questions in order:

1. ``route``: may this request be served here at all (connection limit,
   service, method)?
2. ``authorise``: did the authenticator accept the key?
3. ``decide`` (after the scan) or ``pass_unscanned`` (when the gateway
   passes a body without a verdict): what does the answer say, given the
   policy and what the peer allows (``Allow: 204`` or a preview; our head
   already out for Squid bug 5352)?

Each answer names the access-log outcome and detail it is recorded with,
so the record and the bytes on the wire cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from gateway import sanitise
from gateway.interfaces import UNSCANNABLE_REASONS, Authenticated, Outcome, Refused, Verdict

# The two services and the method each one adapts.
SERVICES: dict[str, str] = {"reqmod": "REQMOD", "respmod": "RESPMOD"}

# Scan failures stay "error" in metrics and the access log (the error-ratio
# alert watches them); the reason has its own field.
_ERROR_REASONS = frozenset({"scan-timeout", "engine-error"})


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the answer depends on: [scan]'s, or a tenant's
    ([tenants.NAME], gateway.policy).  The scanner applies [scan]
    ``unscannable_policy`` itself; ``unscannable_policy`` here is a tenant's
    overrides of it, reason by reason (``normalise``)."""

    error_policy: Literal["fail-closed", "fail-open"] | str = "fail-closed"
    oversize_policy: Literal["pass", "block"] | str = "pass"
    max_scan_size: int = 256 * 1024**2
    # monitor: nothing is blocked; what would be is passed as "monitored" (``monitor``)
    mode: Literal["block", "monitor"] | str = "block"
    unscannable_policy: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerAllows:
    """What the peer lets us answer with now."""

    no_content: bool  # 204: Allow: 204, or in answer to a preview
    committed: bool = False  # our 200 head (the original one) is already out


# The four there are, shared: the protocol asks for one per answer.
_PEER_ALLOWS = {(n, c): PeerAllows(n, c) for n in (False, True) for c in (False, True)}


def peer_allows(no_content: bool, committed: bool) -> PeerAllows:
    """``PeerAllows(no_content, committed)``, without building one."""
    return _PEER_ALLOWS[no_content, committed]


# --- answers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoContent:
    """ICAP 204: pass the message unchanged, nothing more to send."""

    outcome: Outcome
    detail: str = ""
    scan_status: str = ""  # X-Scan-Status value, "" for none


@dataclass(frozen=True, slots=True)
class Echo:
    """ICAP 200 with the original message (or, when committed, the rest of
    its body after what already went out)."""

    outcome: Outcome
    detail: str = ""
    scan_status: str = ""


@dataclass(frozen=True, slots=True)
class BlockPage:
    """ICAP 200 carrying an HTTP 403 block page."""

    outcome: Outcome
    detail: str
    rules: tuple[str, ...]
    explanation: str = ""
    reason: str = ""  # the unscannable reason the explanation gives, for the page's other languages


@dataclass(frozen=True, slots=True)
class Abort:
    """Blocked after the original head went out: no block page can replace
    it, so the connection is cut and the proxy aborts the response."""

    outcome: Outcome
    detail: str


@dataclass(frozen=True, slots=True)
class Error:
    """An ICAP error status, no body."""

    status: int
    outcome: Outcome
    detail: str
    close: bool = False  # Connection: close, then close


Answer = NoContent | Echo | BlockPage | Abort | Error


# --- the questions ------------------------------------------------------------


def route(method: str, service: str, *, over_limit: bool) -> Error | None:
    """None when the request may be served; else the refusal.  OPTIONS of an
    unknown service is refused too (when its message ended: ``options_method``)."""
    if over_limit:
        return Error(503, "error", "too-many-connections", close=True)
    if method == "OPTIONS":
        return None
    expected = SERVICES.get(service)
    if expected is None:
        return UNKNOWN_SERVICE
    if expected != method:
        return Error(405, "error", "method-not-allowed-for-service")
    return None


UNKNOWN_SERVICE = Error(404, "error", "unknown-service")


def authorise(result: Authenticated | Refused) -> Error | None:
    """None for an accepted key; the refusal's status (401/403) otherwise."""
    if isinstance(result, Refused):
        return Error(result.status, "unauthenticated", result.reason)
    return None


def oversize_answer(body_bytes: int, policy: Policy, allows: PeerAllows) -> Answer | None:
    """What to answer as soon as a body crosses ``max_scan_size``, before the
    rest arrives, or None to read on.  Its verdict is known then (too-large):
    blocked at once under a block policy, and passed at once with a 204
    where the peer allows one, so the rest is read and dropped instead of
    spooled to disk.  A pass without 204 must echo the body: it reads on."""
    if body_bytes <= policy.max_scan_size:
        return None
    if policy.oversize_policy == "block" and policy.mode == "monitor":
        # Would be blocked, so "monitored"; without 204 it reads on (an echo
        # needs the whole body) and the scanner's too-large verdict passes.
        may_204 = allows.no_content and not allows.committed
        return _pass("monitored", "too-large", "too-large", allows) if may_204 else None
    if policy.oversize_policy == "pass":
        return pass_unscanned("too-large", allows) if allows.no_content and not allows.committed else None
    return decide(normalise(Verdict("unscanned", detail="too-large"), policy), allows)


def normalise(verdict: Verdict, policy: Policy) -> Verdict:
    """The older spellings ("error", "unscanned" without a reason, e.g. a
    failed scan Deferred) become unscannable verdicts: the scanner's policy
    did not see them, the transaction's settings decide."""
    if verdict.outcome == "unscannable" and verdict.reason in policy.unscannable_policy:
        return replace(verdict, action=policy.unscannable_policy[verdict.reason])  # type: ignore[arg-type]
    if verdict.outcome not in ("error", "unscanned") or verdict.reason:
        return verdict
    if verdict.outcome == "unscanned":
        return replace(verdict, outcome="unscannable", reason="too-large",
                       action="pass" if policy.oversize_policy == "pass" else "block")
    return replace(verdict, outcome="unscannable", reason="engine-error",
                   action="pass" if policy.error_policy == "fail-open" else "block")


def decide(verdict: Verdict, allows: PeerAllows) -> Answer:
    """The answer to a (normalised) verdict."""
    if verdict.outcome == "blocked":
        return _block(verdict.detail, tuple(verdict.rules), "", "", "blocked", allows)
    if verdict.outcome == "unscannable":
        recorded: Outcome = "error" if verdict.reason in _ERROR_REASONS else "unscanned"
        if verdict.action == "pass":
            return _pass(recorded, verdict.detail, verdict.reason, allows)
        why = UNSCANNABLE_REASONS.get(verdict.reason, "The content could not be scanned.")
        return _block(verdict.detail, (), f"{why} The policy blocks content that cannot be scanned.",
                      verdict.reason, recorded, allows)
    return _pass("clean", "", "", allows)


def remembered_block(remembered: Verdict | None, ruleset_version: str) -> BlockPage | None:
    """The answer, at a request's head, for a URL whose last transfer was
    cut after our early commit (``gateway.lateblock``): the block page that
    transfer could not get, or None to go on as usual.  Nothing is
    committed yet, so it is always a page, never an abort.  A verdict of
    another ruleset than ``ruleset_version`` (the one in force) is not
    given: a rule fixed since (a false positive) must stop blocking at once."""
    if remembered is None or remembered.ruleset_version not in ("", ruleset_version):
        return None
    answer = decide(remembered, PeerAllows(no_content=False))
    if not isinstance(answer, BlockPage):  # a remembered pass: nothing to refuse
        return None
    return replace(answer, detail=f"late-block {answer.detail}".strip())


def monitor(answer: Answer, policy: Policy, allows: PeerAllows) -> Answer:
    """Monitor mode (a tenant trying the gateway out): what would have been
    blocked passes, recorded with outcome "monitored" and the rules that
    matched (metrics count it per tenant, the access log names the rules);
    the detail keeps what the block would have said.  Block mode: unchanged."""
    if policy.mode != "monitor" or not isinstance(answer, BlockPage | Abort):
        return answer
    detail = answer.detail.removeprefix("aborted ").strip()
    return _pass("monitored", detail, "", allows)


def pass_unscanned(detail: str, allows: PeerAllows) -> NoContent | Echo:
    """Passed without a scan: ``detail`` says why (``too-large``, ``type:png``)."""
    return _pass("unscanned", detail, "", allows)


def pass_without_body(allows: PeerAllows) -> NoContent | Echo:
    """Nothing to scan (a GET, a HEAD, a 304): pass it as it is."""
    return _pass("clean", "no-body", "", allows)


# The answer to nearly every transaction, built once.
_CLEAN_NO_CONTENT = NoContent("clean")
_CLEAN_ECHO = Echo("clean")


def _pass(outcome: Outcome, detail: str, reason: str, allows: PeerAllows) -> NoContent | Echo:
    if outcome == "clean" and not detail and not reason:
        return _CLEAN_NO_CONTENT if allows.no_content and not allows.committed else _CLEAN_ECHO
    scan_status = ""
    if reason or outcome == "unscanned":
        scan_status = sanitise.header_value(f"unscanned; reason={reason or detail or 'unknown'}", 128)
    if allows.no_content and not allows.committed:
        return NoContent(outcome, detail, scan_status)
    return Echo(outcome, detail, scan_status)


def _block(detail: str, rules: tuple[str, ...], explanation: str, reason: str, outcome: Outcome,
           allows: PeerAllows) -> BlockPage | Abort:
    if allows.committed:
        return Abort(outcome, f"aborted {detail}".strip())
    return BlockPage(outcome, detail, rules, explanation, reason)


def threat_headers(rules: Sequence[str], url: str) -> list[tuple[str, str]]:
    """X-Infection-Found and X-Violations-Found of a block.  The URL and the
    rule names are the peer's and the rule files' text: sanitised here, at
    the one place they become ICAP response headers (no CR, LF or NUL can
    start a header of the attacker's choosing), and bounded in length."""
    named = [sanitise.header_value(rule, sanitise.HEADER_RULE_MAX) for rule in list(rules)[: sanitise.HEADER_RULES_MAX]]
    threat = ", ".join(named)
    return [("X-Infection-Found", f"Type=0; Resolution=2; Threat={threat};"),
            ("X-Violations-Found", _violations(named, sanitise.url(url, sanitise.HEADER_URL_MAX)))]


def _violations(rules: Sequence[str], url: str) -> str:
    # RFC 3507 draft "ICAP extensions" X-Violations-Found: a count line, then
    # four lines per violation (filename, id, name, disposition), folded onto
    # continuation lines.  The values must already be sanitised.
    lines = [str(len(rules))]
    for rule in rules:
        lines += [url or "-", rule, rule, "2"]
    return "\r\n\t".join(lines)

"""The decision layer, table-tested: no Twisted, no transport, no clock."""

from __future__ import annotations

import pytest

from gateway import decision
from gateway.decision import Abort, BlockPage, Echo, Error, NoContent, PeerAllows, Policy
from gateway.interfaces import UNSCANNABLE_REASONS, Authenticated, Refused, Tenant, Verdict
from gateway.options import AnswerHeaders, istag

ALLOW_204 = PeerAllows(no_content=True)
NO_204 = PeerAllows(no_content=False)
COMMITTED = PeerAllows(no_content=False, committed=True)


@pytest.mark.parametrize(("method", "service", "over_limit", "expected"), [
    ("RESPMOD", "respmod", False, None),
    ("REQMOD", "reqmod", False, None),
    ("OPTIONS", "respmod", False, None),
    ("OPTIONS", "nope", False, None),  # refused at the end of its message (AnswerHeaders.options)
    ("RESPMOD", "reqmod", False, Error(405, "error", "method-not-allowed-for-service")),
    ("REQMOD", "respmod", False, Error(405, "error", "method-not-allowed-for-service")),
    ("RESPMOD", "avscan", False, Error(404, "error", "unknown-service")),
    ("RESPMOD", "respmod", True, Error(503, "error", "too-many-connections", close=True)),
    ("OPTIONS", "respmod", True, Error(503, "error", "too-many-connections", close=True)),
])
def test_route(method: str, service: str, over_limit: bool, expected: Error | None) -> None:
    assert decision.route(method, service, over_limit=over_limit) == expected


@pytest.mark.parametrize(("result", "expected"), [
    (Authenticated(Tenant(1, "acme")), None),
    (Refused(401, "missing-key"), Error(401, "unauthenticated", "missing-key")),
    (Refused(403, "revoked-key"), Error(403, "unauthenticated", "revoked-key")),
])
def test_authorise(result: Authenticated | Refused, expected: Error | None) -> None:
    assert decision.authorise(result) == expected


BLOCKED = Verdict("blocked", rules=["ns.Evil"], detail="matched")
UNSCANNABLE_BLOCK = Verdict("unscannable", detail="bomb detail", reason="bomb", action="block")
TIMEOUT_PASS = Verdict("unscannable", detail="took 5s", reason="scan-timeout", action="pass")
TOO_LARGE_PASS = Verdict("unscannable", detail="", reason="too-large", action="pass")
BOMB_SCAN_STATUS = "unscanned; reason=bomb"


@pytest.mark.parametrize(("verdict", "allows", "expected"), [
    (Verdict("clean"), ALLOW_204, NoContent("clean")),
    (Verdict("clean"), NO_204, Echo("clean")),
    (Verdict("clean"), COMMITTED, Echo("clean")),
    # committed wins over 204: our 200 head is already out
    (Verdict("clean"), PeerAllows(no_content=True, committed=True), Echo("clean")),
    (BLOCKED, ALLOW_204, BlockPage("blocked", "matched", ("ns.Evil",))),
    (BLOCKED, NO_204, BlockPage("blocked", "matched", ("ns.Evil",))),
    (BLOCKED, COMMITTED, Abort("blocked", "aborted matched")),
    (UNSCANNABLE_BLOCK, ALLOW_204, BlockPage(
        "unscanned", "bomb detail", (), "The content is compressed so strongly that it looks like a decompression "
        "bomb. The policy blocks content that cannot be scanned.", "bomb")),
    (UNSCANNABLE_BLOCK, COMMITTED, Abort("unscanned", "aborted bomb detail")),
    (TIMEOUT_PASS, ALLOW_204, NoContent("error", "took 5s", "unscanned; reason=scan-timeout")),
    (TIMEOUT_PASS, NO_204, Echo("error", "took 5s", "unscanned; reason=scan-timeout")),
    (TOO_LARGE_PASS, ALLOW_204, NoContent("unscanned", "", "unscanned; reason=too-large")),
])
def test_decide(verdict: Verdict, allows: PeerAllows, expected: decision.Answer) -> None:
    assert decision.decide(verdict, allows) == expected


@pytest.mark.parametrize(("verdict", "policy", "reason", "action"), [
    (Verdict("error", detail="boom"), Policy(error_policy="fail-closed"), "engine-error", "block"),
    (Verdict("error", detail="boom"), Policy(error_policy="fail-open"), "engine-error", "pass"),
    (Verdict("unscanned"), Policy(oversize_policy="pass"), "too-large", "pass"),
    (Verdict("unscanned"), Policy(oversize_policy="block"), "too-large", "block"),
])
def test_older_spellings_follow_the_transaction_policy(
        verdict: Verdict, policy: Policy, reason: str, action: str) -> None:
    normal = decision.normalise(verdict, policy)
    assert (normal.outcome, normal.reason, normal.action, normal.detail) == (
        "unscannable", reason, action, verdict.detail)


def test_normalise_leaves_reasoned_verdicts_alone() -> None:
    for verdict in (Verdict("clean"), BLOCKED, UNSCANNABLE_BLOCK, Verdict("error", reason="scan-timeout")):
        assert decision.normalise(verdict, Policy(error_policy="fail-open")) is verdict


@pytest.mark.parametrize(("detail", "allows", "expected"), [
    ("too-large", ALLOW_204, NoContent("unscanned", "too-large", "unscanned; reason=too-large")),
    ("type:png", NO_204, Echo("unscanned", "type:png", "unscanned; reason=type:png")),
])
def test_pass_unscanned(detail: str, allows: PeerAllows, expected: decision.Answer) -> None:
    assert decision.pass_unscanned(detail, allows) == expected


def test_pass_without_body() -> None:
    assert decision.pass_without_body(ALLOW_204) == NoContent("clean", "no-body")
    assert decision.pass_without_body(NO_204) == Echo("clean", "no-body")


_TOO_LARGE_BLOCK = BlockPage(
    "unscanned", "too-large", (),
    f"{UNSCANNABLE_REASONS['too-large']} The policy blocks content that cannot be scanned.", "too-large")


@pytest.mark.parametrize(("body_bytes", "policy", "allows", "expected"), [
    (101, Policy(max_scan_size=100), ALLOW_204, NoContent("unscanned", "too-large", "unscanned; reason=too-large")),
    (100, Policy(max_scan_size=100), ALLOW_204, None),
    # Blocked as soon as the size is crossed: the rest is never spooled.
    (101, Policy(max_scan_size=100, oversize_policy="block"), ALLOW_204, _TOO_LARGE_BLOCK),
    (101, Policy(max_scan_size=100, oversize_policy="block"), NO_204, _TOO_LARGE_BLOCK),
    (101, Policy(max_scan_size=100, oversize_policy="block"), PeerAllows(no_content=False, committed=True),
     Abort("unscanned", "aborted too-large")),
    (100, Policy(max_scan_size=100, oversize_policy="block"), NO_204, None),
    # A pass without 204 must echo the whole body: read on.
    (101, Policy(max_scan_size=100), NO_204, None),
    (101, Policy(max_scan_size=100), PeerAllows(no_content=True, committed=True), None),
])
def test_oversize_answer(body_bytes: int, policy: Policy, allows: PeerAllows,
                         expected: decision.Answer | None) -> None:
    assert decision.oversize_answer(body_bytes, policy, allows) == expected


def test_scan_status_is_sanitised() -> None:
    [status] = [a.scan_status for a in [decision.pass_unscanned("type:x\r\nEvil: 1", ALLOW_204)]]
    assert "\r" not in status and "\n" not in status


# --- OPTIONS and the common headers --------------------------------------------


def test_istag_is_quoted_and_bounded() -> None:
    assert istag("yara", "") == '"yara-none"'
    tag = istag("yara", "f" * 64)
    assert len(tag) == 32 and tag.startswith('"yara-') and tag.endswith('"')


def test_options_answer_per_service() -> None:
    cache = AnswerHeaders()
    kw = {"service_id": "yara", "version": "v1", "max_connections": 10, "options_ttl": 60, "preview_size": 4096,
          "now": 0.0}
    headers = dict(cache.options("reqmod", **kw))  # type: ignore[arg-type]
    assert headers["Methods"] == "REQMOD" and headers["ISTag"] == '"yara-v1"'
    assert headers["Max-Connections"] == "10" and headers["Options-TTL"] == "60" and headers["Preview"] == "4096"
    assert headers["Date"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert dict(cache.options("respmod", **kw))["Methods"] == "RESPMOD"  # type: ignore[arg-type]
    assert cache.options("nope", **kw) is None  # type: ignore[arg-type]
    assert "Preview" not in dict(cache.options("respmod", **{**kw, "preview_size": 0}))  # type: ignore[arg-type]


def test_a_new_ruleset_version_changes_the_cached_istag() -> None:
    cache = AnswerHeaders()
    assert cache.common("yara", "v1") == [("ISTag", '"yara-v1"'), ("Server", "icap-gateway")]
    cache.common("yara", "v1").append(("X", "y"))  # a fresh list: the cache is not touched
    assert cache.common("yara", "v1") == [("ISTag", '"yara-v1"'), ("Server", "icap-gateway")]
    assert cache.common("yara", "v2")[0] == ("ISTag", '"yara-v2"')
    kw = {"service_id": "yara", "max_connections": 10, "options_ttl": 60, "preview_size": 0, "now": 86400.0}
    assert dict(cache.options("respmod", version="v3", **kw))["ISTag"] == '"yara-v3"'  # type: ignore[arg-type]
    assert dict(cache.options("respmod", version="v4", **kw))["ISTag"] == '"yara-v4"'  # type: ignore[arg-type]


def test_remembered_block_is_a_page_at_the_head() -> None:
    from gateway.decision import remembered_block

    assert remembered_block(None, "v1") is None
    assert remembered_block(Verdict("clean"), "v1") is None
    assert remembered_block(Verdict("blocked", rules=("ns.Evil",), detail="matched", ruleset_version="v1"),
                            "v1") == BlockPage("blocked", "late-block matched", ("ns.Evil",))
    # The rules changed since: the rule may be fixed, the URL is scanned again.
    assert remembered_block(Verdict("blocked", rules=("ns.Evil",), ruleset_version="v1"), "v2") is None
    page = remembered_block(Verdict("unscannable", detail="too-large", reason="too-large", action="block"), "v1")
    assert isinstance(page, BlockPage) and page.detail == "late-block too-large" and page.explanation


@pytest.mark.parametrize("no_content", [False, True])
@pytest.mark.parametrize("committed", [False, True])
def test_peer_allows_gives_the_shared_instance_of_that_value(no_content: bool, committed: bool) -> None:
    shared = decision.peer_allows(no_content, committed)
    assert shared == decision.PeerAllows(no_content=no_content, committed=committed)
    assert decision.peer_allows(no_content, committed) is shared

"""Values that leave the gateway are sanitised where they leave: ICAP response
headers, the block page, the register's identity values; and no exception in
per-transaction code drops a connection without an answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import fail
from twisted.logger import capturedLogs

from gateway import sanitise
from gateway.blockpage import BlockPage
from gateway.decision import threat_headers as _threat_headers
from gateway.interfaces import Identity, NullObserver, TransactionRecord, UserSeen, Verdict
from register import users
from register.settings import AuthSettings
from tests.gateway.fakes import make_harness
from tests.gateway.test_protocol import AUTH, RES_HDR, chunked
from tests.icap_responses import parse_responses

EVIL_URL = "http://example.com/a\nX-Evil: 1\r\nX-Evil2: 2\x00/b"


def respmod_for(req_hdr: bytes, body: bytes, *extra: str) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(req_hdr)}, res-body={len(req_hdr) + len(RES_HDR)}"
    head = "\r\n".join(["RESPMOD icap://gw/respmod ICAP/1.0", "Host: gw", *extra, f"Encapsulated: {enc}"])
    return head.encode() + b"\r\n\r\n" + req_hdr + RES_HDR + chunked(body)


def _lines_of_head(out: bytes) -> list[bytes]:
    # As a lenient peer reads it: a bare CR or LF ends a line too.
    return re.split(rb"\r\n|\r|\n", out[: out.index(b"\r\n\r\n")])


# --- the sanitising functions --------------------------------------------------


def test_url_is_percent_encoded_and_capped() -> None:
    assert sanitise.url(EVIL_URL, 200) == "http://example.com/a%0AX-Evil:%201%0D%0AX-Evil2:%202%00/b"
    assert sanitise.url("http://h/\xe9\u20ac", 100) == "http://h/%E9%E2%82%AC"
    # A lone surrogate (a caller's str; wire URLs are Latin-1) is escaped, not an exception.
    assert sanitise.url("http://h/\udc80\ud800x", 100) == "http://h/%ED%B2%80%ED%A0%80x"
    cut = sanitise.url("http://h/" + "\n" * 1000, 50)
    assert len(cut) <= 50 and cut.endswith(sanitise.TRUNCATED)
    assert "%0A" in cut and not cut[: -len(sanitise.TRUNCATED)].endswith(("%", "%0"))


def test_text_replaces_controls_surrogates_and_caps() -> None:
    assert sanitise.text("a\r\nb\x00c\x85d\ud800e\u2028f", 100) == "a\ufffd\ufffdb\ufffdc\ufffdd\ufffde\ufffdf"
    assert sanitise.text("x" * 10, 5) == "xx..."
    assert sanitise.text("matti.meikäläinen", 100) == "matti.meikäläinen"


@given(st.text(), st.integers(min_value=3, max_value=300))
def test_header_values_never_carry_a_line_break(value: str, limit: int) -> None:
    for out in (sanitise.url(value, limit), sanitise.header_value(value, limit)):
        assert len(out) <= limit
        assert not set(out) & {"\r", "\n", "\x00"}
        out.encode("ascii")  # latin-1 encodable, as send_response needs
    text = sanitise.text(value, limit)
    assert len(text) <= limit and not sanitise.has_control(text)
    text.encode("utf-8")  # no lone surrogate: a log line can always be written


# --- ICAP response headers ----------------------------------------------------


@pytest.mark.parametrize(("value", "safe"), [
    ("Type=0; Resolution=2; Threat=a.b;", True),
    ("1\r\n\thttp://h/\r\n\tr\r\n\tr\r\n\t2", True),  # X-Violations-Found's folds
    ("a\nX-Evil: 1", False),
    ("a\rX-Evil: 1", False),
    ("a\r\nX-Evil: 1", False),  # CRLF not followed by SP/HTAB starts a header
    ("a\x00b", False),
    ("a\u20acb", False),  # not Latin-1: send_response could not encode it
    ("caf\xe9", True),
])
def test_header_safe_is_the_final_check(value: str, safe: bool) -> None:
    assert sanitise.header_safe(value) is safe


@given(st.text(), st.text())
def test_threat_headers_always_pass_the_final_check(rule: str, url: str) -> None:
    assert all(sanitise.header_safe(v) for _n, v in _threat_headers([rule, rule], url))


def test_threat_headers_built_from_a_hostile_url_and_rule_names() -> None:
    headers = dict(_threat_headers(["ns.yar.Rule\r\nX-Evil: 1", "ns\u20ac.yar.R"], EVIL_URL))
    for value in headers.values():
        # The only line breaks are X-Violations-Found's folds (CRLF + TAB).
        assert "\r" not in value.replace("\r\n\t", "") and "\n" not in value.replace("\r\n\t", "")
        assert "\x00" not in value
        value.encode("latin-1")
    lines = headers["X-Violations-Found"].split("\r\n\t")
    assert lines[0] == "2"
    assert lines[1] == "http://example.com/a%0AX-Evil:%201%0D%0AX-Evil2:%202%00/b"
    assert lines[2] == "ns.yar.Rule??X-Evil: 1"
    assert "Threat=ns.yar.Rule??X-Evil: 1, ns?.yar.R;" in headers["X-Infection-Found"]


def test_threat_headers_are_bounded() -> None:
    rules = [f"ns.yar.R{i}" for i in range(500)]
    headers = dict(_threat_headers(rules, "http://h/" + "a" * 100_000))
    lines = headers["X-Violations-Found"].split("\r\n\t")
    assert lines[0] == str(sanitise.HEADER_RULES_MAX) == str((len(lines) - 1) // 4)
    assert len(lines[1]) <= sanitise.HEADER_URL_MAX
    assert len(headers["X-Violations-Found"]) < (sanitise.HEADER_URL_MAX + 100) * sanitise.HEADER_RULES_MAX


def test_bare_lf_in_the_url_writes_no_header_of_its_own() -> None:
    h = make_harness()
    req = b"GET http://example.com/a\nX-Evil:1/b HTTP/1.1\r\nHost: example.com\r\n\r\n"
    h.send(respmod_for(req, b"some EVIL bytes", AUTH, "Allow: 204"))
    out = h.output()
    assert out, "an answer, whether the parser refuses the URL or the block names it"
    assert not any(line.lower().startswith(b"x-evil") for line in _lines_of_head(out))
    [r] = parse_responses(out)
    if r.status == 200:  # blocked (not refused by the parser): the URL is there, encoded
        assert b"\r\n\thttp://example.com/a%0AX-Evil:1/b\r\n\t" in out


def test_rule_name_outside_latin1_still_answers() -> None:
    # send_response encodes headers as Latin-1: a rule file named "€.yar" made
    # that raise, and the connection was dropped with no answer.
    h = make_harness()
    h.scanner.result = Verdict("blocked", rules=("\u20ac.yar.Rule",))
    h.send(respmod_for(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"x", AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 200 and "Threat=?.yar.Rule;" in r.headers["x-infection-found"]
    assert "\u20ac.yar.Rule".encode() in r.body  # the block page (UTF-8) names it as it is


# --- the block page -----------------------------------------------------------


def test_block_page_escapes_url_rules_and_explanation() -> None:
    head, body = BlockPage().render(
        url='http://h/"><script>alert(1)</script>', rules=["ns.yar.<img src=x onerror=alert(2)>"],
        reference="abc", explanation="<b>why</b>")
    page = body.decode()
    assert "<script>" not in page and "<img" not in page and "<b>why" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&quot;&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "&lt;b&gt;why&lt;/b&gt;" in page
    assert b"Content-Type: text/html; charset=utf-8\r\n" in head


# --- identity headers through the protocol --------------------------------------


def test_refused_client_ip_is_never_recorded_and_is_noted() -> None:
    h = make_harness(identify=partial(users.identify, settings=AuthSettings()))
    peer = h.proto._peer
    h.send(respmod_for(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"clean",
                       AUTH, "Allow: 204", "X-Authenticated-User: Ym9i", "X-Client-IP: " + "1" * 3000))
    assert parse_responses(h.output())[0].status == 204
    assert h.recorder.events == [UserSeen(1, "bob", peer, 1_700_000_000.0)]
    record = h.observer.records[0]
    assert record.client_ip == peer and record.bad_headers == (users.BAD_CLIENT_IP,)


# --- the safety net -------------------------------------------------------------


class CountingObserver(NullObserver):
    def __init__(self, raise_in: str = "") -> None:
        self.raise_in = raise_in
        self.records: list[TransactionRecord] = []
        self.internal_errors = 0

    def transaction_finished(self, record: TransactionRecord) -> None:
        self.records.append(record)

    def scan_finished(self, verdict: Verdict, direction: str) -> None:  # type: ignore[override]
        if self.raise_in == "scan_finished":
            raise RuntimeError("observer broke")

    def internal_error(self) -> None:
        self.internal_errors += 1


class RaisingScanner:
    version = "test1"

    def __init__(self, how: str) -> None:
        self.how = how

    def scan(self, body: bytes | str, context: object) -> object:
        if self.how == "raise":
            raise RuntimeError("scanner broke")
        return fail(RuntimeError("scanner failed"))

    def scan_then(self, body: bytes | str, context: object, on_verdict: Callable[[Verdict], object]) -> None:
        if self.how == "raise":
            raise RuntimeError("scanner broke")
        # A scanner that failed inside reports it as the older "error" verdict.
        on_verdict(Verdict("error", detail="internal scanner error"))


class RaisingAuthenticator:
    def authenticate(self, credentials: object) -> object:
        raise RuntimeError("authenticator broke")


def _request(*extra: str) -> bytes:
    return respmod_for(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", b"body", AUTH, *extra)


@pytest.mark.parametrize("part", ["scanner", "authenticator", "observer", "identify"])
def test_an_exception_answers_500_logged_once_with_a_reference(part: str) -> None:
    observer = CountingObserver("scan_finished" if part == "observer" else "")
    overrides: dict[str, object] = {"observer": observer}
    if part == "scanner":
        overrides["scanner"] = RaisingScanner("raise")
    elif part == "authenticator":
        overrides["authenticator"] = RaisingAuthenticator()
    elif part == "identify":
        overrides["identify"] = lambda headers, peer: 1 / 0
    h = make_harness(**overrides)
    with capturedLogs() as events:
        h.send(_request("Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 500
    assert h.transport.disconnecting
    assert observer.internal_errors == 1
    [record] = observer.records
    assert (record.icap_status, record.outcome) == (500, "error")
    reference = record.detail.split()[0].removeprefix("ref=")
    assert record.detail == f"ref={reference} internal-error"
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1 and failures[0]["ref"] == reference
    assert all(s.closed for s in h.spools)


def test_a_failed_scan_deferred_still_follows_the_error_policy() -> None:
    observer = CountingObserver()
    h = make_harness(scanner=RaisingScanner("errback"), observer=observer)
    with capturedLogs():
        h.send(_request("Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.sections["res-hdr"].startswith(b"HTTP/1.1 403")  # fail-closed
    assert observer.internal_errors == 0 and not h.transport.disconnecting


def test_an_exception_after_the_head_went_out_aborts() -> None:
    # Our 200 head is out before the verdict (early_response_after): a 500
    # cannot follow it, so the connection is aborted, never left waiting.
    observer = CountingObserver("scan_finished")
    h = make_harness(observer=observer, early_response_after=1)
    h.transport.abortConnection = lambda: setattr(h.transport, "aborted", True)  # type: ignore[method-assign]
    with capturedLogs():
        h.send(_request())
    out = h.output()
    assert out.startswith(b"ICAP/1.0 200 OK\r\n") and b"ICAP/1.0 500" not in out
    assert getattr(h.transport, "aborted", False)
    assert observer.internal_errors == 1 and observer.records[0].icap_status == 500


def test_an_unparsable_url_gets_an_answer() -> None:
    # urlsplit raises on "http://[::1/x" (message_facts): the connection was
    # dropped with no answer at all.
    h = make_harness()
    with capturedLogs():
        h.send(respmod_for(b"GET http://[::1/x HTTP/1.1\r\nHost: h\r\n\r\n", b"body", AUTH, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status in (204, 400, 500)


def test_identity_default_has_no_bad_headers() -> None:
    assert Identity("bob", "10.0.0.1").bad_headers == ()


def test_block_page_url_is_encoded_and_capped() -> None:
    from gateway.blockpage import URL_SHOWN_MAX

    _head, body = BlockPage().render(url="http://h/\x00\n" + "a" * 100_000, rules=["r"], reference="abc")
    page = body.decode()
    assert "http://h/%00%0Aaaa" in page and "\x00" not in page
    assert "a" * (URL_SHOWN_MAX + 1) not in page and len(page) < URL_SHOWN_MAX + 4096


def test_the_net_holds_with_an_observer_that_predates_internal_error() -> None:
    class OldObserver:  # an Observer from before internal_error() existed
        def __getattr__(self, name: str) -> object:
            if name == "internal_error":
                raise AttributeError(name)
            return lambda *args: None

    h = make_harness(observer=OldObserver(), authenticator=RaisingAuthenticator())
    with capturedLogs():
        h.send(_request("Allow: 204"))
    assert parse_responses(h.output())[0].status == 500

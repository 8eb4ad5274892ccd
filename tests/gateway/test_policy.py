"""Per-tenant policy ([tenants.NAME]): parsing and validation, the table the
protocol asks, monitor mode in the decision layer and through the protocol,
and the SIGHUP reload keeping the old table on a bad file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway import decision
from gateway.blockpage import BlockPage
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.decision import Abort, Echo, NoContent, PeerAllows, Policy
from gateway.decision import BlockPage as BlockAnswer
from gateway.interfaces import ScanContext, Verdict
from gateway.policy import Policies, PolicyTable, RulesetScanners
from gateway.settings import ConfigErrors
from tests.gateway.fakes import GOOD_KEY, Harness, SubstringScanner, make_harness
from tests.icap_responses import parse_responses

AUTH = f"Authorization: Bearer {GOOD_KEY}"  # the fake authenticator's tenant: acme
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
REQ_HDR = b"GET http://example.com/dl/file.txt HTTP/1.1\r\nHost: example.com\r\n\r\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def config(text: str) -> GatewayConfig:
    return parse_config(tomllib.loads(text), "test.toml")


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        config(text)
    return [(e.key, e.reason) for e in info.value.errors]


# --- parsing and validation ---------------------------------------------------


def test_tenant_tables_parse_every_key(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<p>$url $rules $reference $explanation $support_contact</p>")
    parsed = config(f"""
[tenants.acme]
mode = "monitor"
unscannable_policy = {{too-large = "block"}}
max_scan_size = "1 MiB"
skip_types = ["video/*"]
support_contact = "IT helpdesk, 555 0100"
block_page = "{page}"
[tenants.beta-2]
""")
    acme = parsed.tenants["acme"]
    assert (acme.mode, acme.unscannable_policy, acme.max_scan_size, acme.skip_types) == (
        "monitor", {"too-large": "block"}, 1024**2, ["video/*"])
    assert (acme.support_contact, acme.block_page) == ("IT helpdesk, 555 0100", str(page))
    beta = parsed.tenants["beta-2"]
    assert (beta.mode, beta.max_scan_size, beta.skip_types, beta.block_page) == ("block", None, None, None)


@pytest.mark.parametrize(("text", "key", "reason"), [
    ('[tenants.acme]\nmode = "audit"', "[tenants.acme] mode", "one of 'block', 'monitor'"),
    ('[tenants.acme]\nunscannable_policy = {bomb = "allow"}', "[tenants.acme] unscannable_policy",
     "bomb: expected \"block\" or \"pass\""),
    ('[tenants.acme]\nunscannable_policy = {huge = "pass"}', "[tenants.acme] unscannable_policy",
     "unknown reason 'huge'"),
    ("[tenants.acme]\nmax_scan_size = 0", "[tenants.acme] max_scan_size", "greater than zero"),
    ('[tenants.acme]\nmax_scan_size = "big"', "[tenants.acme] max_scan_size", "expected a size"),
    ("[tenants.acme]\nskip_types = \"video/*\"", "[tenants.acme] skip_types", "a list of a string"),
    ('[tenants.acme]\nsupport_contact = "call\\nus"', "[tenants.acme] support_contact", "control characters"),
    (f'[tenants.acme]\nsupport_contact = "{"x" * 201}"', "[tenants.acme] support_contact", "at most 200"),
    ('[tenants.acme]\nblock_page = "/nonexistent/page.html"', "[tenants.acme] block_page", "no such file"),
    ('[tenants.acme]\nrules = "x"', "[tenants.acme] rules", "no ruleset 'x' in [rulesets]"),
    ('[rulesets]\nx = "rules"\n[tenants.acme]\nrules = "y"', "[tenants.acme] rules", "no ruleset 'y'"),
    ('[rulesets]\n"Strict" = "rules"', "[rulesets] 'Strict'", "not a ruleset name"),
    ("[rulesets]\nstrict = 1", "[rulesets] strict", "expected a directory"),
    ('[tenants.acme]\nbogus = "x"', "[tenants.acme] bogus", "unknown key"),
    ('[tenants.Acme]\nmode = "block"', "[tenants.'Acme']", "not a tenant name"),
    ('[tenants."a b"]\nmode = "block"', "[tenants.'a b']", "not a tenant name"),
    ('[tenants."acme\\n"]\nmode = "block"', "[tenants.'acme\\n']", "not a tenant name"),
    ('[tenants]\nacme = "monitor"', "[tenants.acme]", "expected a table"),
    ('tenants = "x"', "[tenants]", "expected tables"),
])
def test_bad_tenant_values_name_tenant_key_and_reason(text: str, key: str, reason: str) -> None:
    [(found_key, found_reason)] = problems(text)
    assert found_key == key and reason in found_reason


def test_every_tenant_problem_at_once() -> None:
    found = problems('[tenants.acme]\nmode = "x"\nmax_scan_size = -1\n[tenants.beta]\nbogus = 1\n')
    assert [k for k, _ in found] == ["[tenants.acme] mode", "[tenants.acme] max_scan_size", "[tenants.beta] bogus"]


# --- the table ------------------------------------------------------------------


def test_a_tenant_without_a_table_gets_scan_policy() -> None:
    table = PolicyTable(config('[scan]\nmax_scan_size = 1000\noversize_policy = "block"\nskip_types = ["image/*"]\n'
                               "[tenants.acme]\nmode = \"monitor\"\n"), BlockPage())
    other = table("other")
    assert other is table("") is table.default
    assert other.decision == Policy(error_policy="fail-closed", oversize_policy="block", max_scan_size=1000)
    assert other.skip_types == ["image/*"]
    acme = table("acme")  # keys not given: [scan]'s
    assert acme.decision == Policy(error_policy="fail-closed", oversize_policy="block", max_scan_size=1000,
                                   mode="monitor")
    assert acme.skip_types == ["image/*"] and acme.block_page is table.default.block_page


def test_tenant_overrides_win_over_scan(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("tenant page $url $support_contact")
    table = PolicyTable(config(f"""
[scan]
error_policy = "fail-closed"
unscannable_policy = {{bomb = "block", trailing-data = "block"}}
[tenants.acme]
unscannable_policy = {{too-large = "block", engine-error = "pass", bomb = "pass"}}
max_scan_size = 500
skip_types = []
support_contact = "helpdesk"
block_page = "{page}"
"""), BlockPage())
    acme = table("acme")
    assert acme.decision.oversize_policy == "block" and acme.decision.error_policy == "fail-open"
    assert acme.decision.max_scan_size == 500 and acme.skip_types == []
    # Only the tenant's own reasons override the scanner's action ([scan]'s).
    assert acme.decision.unscannable_policy == {"too-large": "block", "engine-error": "pass", "bomb": "pass"}
    assert acme.support_contact == "helpdesk"
    _, body = acme.block_page.render(url="http://x/", rules=[], reference="r", support_contact="help&desk")
    assert body == b"tenant page http://x/ help&amp;desk"


# --- the decision layer: monitor mode ----------------------------------------------

MONITOR = Policy(mode="monitor")
BLOCK_PAGE = BlockAnswer("blocked", "matched", ("ns.Evil",))
ALLOW_204 = PeerAllows(no_content=True)
NO_204 = PeerAllows(no_content=False)
COMMITTED = PeerAllows(no_content=False, committed=True)


@pytest.mark.parametrize(("answer", "policy", "allows", "expected"), [
    (BlockAnswer("blocked", "matched", ("ns.Evil",)), MONITOR, ALLOW_204, NoContent("monitored", "matched")),
    (BlockAnswer("blocked", "matched", ("ns.Evil",)), MONITOR, NO_204, Echo("monitored", "matched")),
    (BlockAnswer("unscanned", "bomb", (), "why"), MONITOR, ALLOW_204, NoContent("monitored", "bomb")),
    # Our head is out: the rest of the body follows instead of a cut.
    (Abort("blocked", "aborted matched"), MONITOR, COMMITTED, Echo("monitored", "matched")),
    (NoContent("clean"), MONITOR, ALLOW_204, NoContent("clean")),
    (BLOCK_PAGE, Policy(), ALLOW_204, BLOCK_PAGE),
    (Abort("blocked", "aborted matched"), Policy(mode="block"), COMMITTED, Abort("blocked", "aborted matched")),
])
def test_monitor(answer: decision.Answer, policy: Policy, allows: PeerAllows, expected: decision.Answer) -> None:
    assert decision.monitor(answer, policy, allows) == expected


@pytest.mark.parametrize(("allows", "expected"), [
    (ALLOW_204, NoContent("monitored", "too-large", "unscanned; reason=too-large")),
    (NO_204, None),  # an echo needs the whole body: read on
])
def test_oversize_under_a_block_policy_in_monitor_mode(allows: PeerAllows, expected: decision.Answer | None) -> None:
    policy = Policy(max_scan_size=100, oversize_policy="block", mode="monitor")
    assert decision.oversize_answer(101, policy, allows) == expected


@pytest.mark.parametrize(("overrides", "action"), [({}, "block"), ({"bomb": "pass"}, "pass"),
                                                   ({"too-large": "pass"}, "block")])
def test_tenant_unscannable_policy_overrides_the_scanners_action(overrides: dict[str, str], action: str) -> None:
    verdict = Verdict("unscannable", detail="bomb", reason="bomb", action="block")
    assert decision.normalise(verdict, Policy(unscannable_policy=overrides)).action == action


# --- through the protocol ------------------------------------------------------------


def respmod(body: bytes, *extra: str) -> bytes:
    res_hdr = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(res_hdr)}"
    head = "\r\n".join(["RESPMOD icap://gw/respmod ICAP/1.0", "Host: gw", AUTH, *extra, f"Encapsulated: {enc}"])
    size = 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
                      for i in range(0, len(body), size))
    return head.encode() + b"\r\n\r\n" + REQ_HDR + res_hdr + chunks + b"0\r\n\r\n"


def harness(text: str, **overrides: object) -> Harness:
    h = make_harness(policy_for=PolicyTable(config(text), BlockPage()), **overrides)
    h.scanner.needle = EICAR
    return h


@pytest.mark.parametrize("allow_204", [True, False])
def test_monitor_mode_tenant_gets_eicar_passed_and_the_match_recorded(allow_204: bool) -> None:
    h = harness('[tenants.acme]\nmode = "monitor"\n')
    body = b"prefix " + EICAR
    h.send(respmod(body, *(["Allow: 204"] if allow_204 else [])))
    h.pump_producer()
    [r] = parse_responses(h.output())
    if allow_204:
        assert r.status == 204
    else:
        assert r.status == 200 and r.body == body and r.sections["res-hdr"].startswith(b"HTTP/1.1 200 OK")
    assert "x-infection-found" not in r.headers
    [rec] = h.observer.records
    assert (rec.tenant, rec.outcome, rec.rules) == ("acme", "monitored", ("test.evil",))


def test_block_mode_tenant_gets_the_block_page_with_its_contact(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<p>blocked $url; call $support_contact ($reference)</p>")
    h = harness(f'[tenants.acme]\nmode = "block"\nsupport_contact = "Helpdesk <555>"\nblock_page = "{page}"\n')
    h.send(respmod(EICAR, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 200 and r.sections["res-hdr"].startswith(b"HTTP/1.1 403")
    assert b"call Helpdesk &lt;555&gt;" in r.body
    assert h.observer.records[0].outcome == "blocked"


def test_tenants_without_a_table_follow_scan() -> None:
    h = harness('[tenants.other]\nmode = "monitor"\n')  # acme has no table
    h.send(respmod(EICAR, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize(("tenant_policy", "status"), [("pass", 204), ("block", 200)])
def test_tenant_unscannable_policy_is_honoured(tenant_policy: str, status: int) -> None:
    # The scanner applied [scan]'s action (the opposite); the tenant's wins.
    h = harness(f'[tenants.acme]\nunscannable_policy = {{corrupt-encoding = "{tenant_policy}"}}\n')
    scanners_action = "block" if tenant_policy == "pass" else "pass"
    h.scanner.result = Verdict("unscannable", detail="corrupt", reason="corrupt-encoding", action=scanners_action)
    h.send(respmod(b"some bytes", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == status
    if status == 200:
        assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")
    assert h.observer.records[0].unscannable == "corrupt-encoding"


def test_tenant_max_scan_size_is_honoured() -> None:
    h = harness('[scan]\nmax_scan_size = "1 MiB"\n[tenants.acme]\nmax_scan_size = 1000\n'
                'unscannable_policy = {too-large = "block"}\n')
    h.send(respmod(b"a" * 5000, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")  # blocked as it crossed 1000 bytes
    assert h.scanner.contexts == [] and h.observer.records[0].unscannable == "too-large"
    h.send(respmod(b"a" * 900, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 204 and h.scanner.contexts[0].max_scan_size == 1000  # the scanner's limit too


def test_monitor_mode_passes_a_body_the_size_policy_would_block() -> None:
    h = harness('[scan]\noversize_policy = "block"\nmax_scan_size = 1000\n[tenants.acme]\nmode = "monitor"\n')
    h.send(respmod(b"a" * 5000, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.status == 204 and r.headers["x-scan-status"] == "unscanned; reason=too-large"
    [rec] = h.observer.records
    assert (rec.outcome, rec.unscannable) == ("monitored", "too-large")


def test_tenant_skip_types_are_honoured() -> None:
    h = harness('[scan]\nskip_types = ["image/*"]\n[tenants.acme]\nskip_types = []\n')
    h.send(respmod(PNG + EICAR, "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403")  # the tenant scans images


# --- reload -----------------------------------------------------------------------------


def test_reload_swaps_the_table_and_a_bad_file_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[tenants.acme]\nmode = "monitor"\n')
    policies = Policies(load_config(path), BlockPage())
    assert policies.policy_for("acme").decision.mode == "monitor"
    path.write_text('[tenants.acme]\nmode = "block"\n[tenants.beta]\nmode = "monitor"\n')
    assert policies.reload()
    assert policies.policy_for("acme").decision.mode == "block"
    assert policies.policy_for("beta").decision.mode == "monitor"
    path.write_text('[tenants.acme]\nmode = "monitor"\n[tenants.beta]\nmode = "sometimes"\n')
    assert not policies.reload()
    assert policies.policy_for("beta").decision.mode == "monitor"  # the old table
    page = tmp_path / "page.html"
    page.write_text("$nosuchplaceholder")
    path.write_text(f'[tenants.acme]\nmode = "monitor"\nblock_page = "{page}"\n')
    assert not policies.reload()  # a template that does not render: old table
    assert policies.policy_for("acme").decision.mode == "block"
    path.unlink()
    assert not policies.reload()


def test_reload_keeps_the_running_scan_section(tmp_path: Path) -> None:
    # The scanner keeps [scan] until a restart: tenants must inherit what it runs with.
    path = tmp_path / "gateway.toml"
    path.write_text("[scan]\nmax_scan_size = 1000\n[tenants.acme]\nmode = \"monitor\"\n")
    policies = Policies(load_config(path), BlockPage())
    path.write_text("[scan]\nmax_scan_size = 99\n[tenants.acme]\nmode = \"block\"\n")
    assert policies.reload()
    assert policies.policy_for("acme").decision == Policy(max_scan_size=1000, mode="block")
    assert policies.policy_for("other").decision.max_scan_size == 1000


def test_the_protocol_asks_the_reloaded_table(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[tenants.acme]\nmode = "monitor"\n')
    policies = Policies(load_config(path), BlockPage())
    h = make_harness(policy_for=policies.policy_for)
    h.scanner.needle = EICAR
    h.send(respmod(EICAR, "Allow: 204"))
    assert parse_responses(h.output())[0].status == 204
    path.write_text('[tenants.acme]\nmode = "block"\n')
    policies.reload()
    h.send(respmod(EICAR, "Allow: 204"))
    assert parse_responses(h.output())[0].sections["res-hdr"].startswith(b"HTTP/1.1 403")


# --- [rulesets] -------------------------------------------------------------------------


class VersionedScanner(SubstringScanner):
    def __init__(self, needle: bytes, version: str) -> None:
        super().__init__(needle)
        self._version = version

    @property  # type: ignore[override]
    def version(self) -> str:
        return self._version


def test_ruleset_scanners_version_changes_when_any_set_changes() -> None:
    default, strict = VersionedScanner(b"EVIL", "v1"), VersionedScanner(b"STRICT", "s1")
    assert RulesetScanners(default, {}).version == "v1"  # no other set: the ISTag as before
    both = RulesetScanners(default, {"strict": strict})
    first = both.version
    assert len(first) == 16 and first != "v1"
    strict._version = "s2"
    assert both.version != first
    default._version = "v2"
    second = both.version
    strict._version = "s1"
    assert len({first, second, both.version}) == 3
    both.scan(b"x", ScanContext(direction="response"))
    assert default.contexts and not strict.contexts  # the protocol's scanner scans with [scan] rules


def test_a_tenant_with_a_ruleset_is_scanned_with_it() -> None:
    strict = VersionedScanner(b"STRICT", "s1")
    table = PolicyTable(config('[rulesets]\nstrict = "rules"\n[tenants.acme]\nrules = "strict"\n'), BlockPage(),
                        {"strict": strict})
    assert table("acme").scanner is strict and table("other").scanner is None
    h = make_harness(policy_for=table)
    h.send(respmod(b"STRICT bytes", "Allow: 204"))
    [r] = parse_responses(h.output())
    assert r.sections["res-hdr"].startswith(b"HTTP/1.1 403") and strict.contexts and not h.scanner.contexts
    h.send(respmod(b"EVIL bytes", "Allow: 204"))  # [scan] rules' match: not in acme's set
    assert parse_responses(h.output())[0].status == 204


def test_reload_cannot_name_a_ruleset_loaded_only_by_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[rulesets]\nstrict = "rules"\n[tenants.acme]\nrules = "strict"\n')
    strict = VersionedScanner(b"STRICT", "s1")
    policies = Policies(load_config(path), BlockPage(), scanners={"strict": strict})
    path.write_text('[rulesets]\nstrict = "rules"\nnew = "rules"\n[tenants.acme]\nrules = "new"\n')
    assert not policies.reload()
    assert policies.policy_for("acme").scanner is strict

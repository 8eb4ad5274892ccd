"""A real gateway with two tenants ([tenants.NAME]): one in monitor mode gets
EICAR passed, counted in /metrics under its tenant and written to the access
log as "monitored"; the other is blocked.  SIGHUP re-reads the tables (in
every worker too); a broken file keeps the old ones."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request

import pytest

from tests.peers import EICAR, GatewayProcess, gateway_process, wait_for

pytestmark = pytest.mark.cicap

REQ_HDR = b"GET http://example.com/eicar.com HTTP/1.1\r\nHost: example.com\r\n\r\n"
RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 68\r\n\r\n"
TABLES = ('[tenants.acme]\nmode = "monitor"\n\n[tenants.beta]\nmode = "block"\nsupport_contact = "Beta IT, 555 0100"\n'
          'block_page = "beta.html"\n')
# The shipped templates are the block-page owner's (gateway.blockpage); this
# one shows that the tenant's template and contact reach the render.
BETA_PAGE = "<p>Blocked: $url ($rules). Call $support_contact, reference $reference.</p>$explanation"


def respmod(key: str) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(RES_HDR)}"
    head = (f"RESPMOD icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Allow: 204\r\nEncapsulated: {enc}\r\n\r\n").encode()
    return head + REQ_HDR + RES_HDR + b"%x\r\n%s\r\n0\r\n\r\n" % (len(EICAR), EICAR)


def answer(port: int, key: str) -> bytes:
    """One RESPMOD of EICAR on a new connection: its whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(respmod(key))
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while data := sock.recv(65536):
            out += data
            if out.startswith(b"ICAP/1.0 204") and b"\r\n\r\n" in out:
                break
            if out.endswith(b"0\r\n\r\n"):
                break
        return out


def _bootstrap(gw: GatewayProcess) -> None:
    gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
    keys = {}
    for name in ("acme", "beta"):
        out = gw.cli("tenant", "add", name, "--company", f"{name} Oy", "--json", "--operator", "e2e")
        keys[name] = json.loads(out.stdout)["key"]
    gw.keys = keys  # type: ignore[attr-defined]
    (gw.workdir / "beta.html").write_text(BETA_PAGE)  # relative paths: the gateway's working directory
    with open(gw.config_path, "a") as config:
        config.write(TABLES)


def monitored_count(gw: GatewayProcess, tenant: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("icap_gateway_requests_total{") and f'tenant="{tenant}"' in line
               and 'outcome="monitored"' in line)


def access_lines(gw: GatewayProcess) -> list[dict[str, object]]:
    if not gw.access_log.exists():
        return []
    return [json.loads(line) for line in gw.access_log.read_text().splitlines() if line]


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "workers"])
def test_monitor_and_block_tenants_and_sighup(workers: int) -> None:
    with gateway_process(auth_required=True, before_start=_bootstrap,
                         settings={"server": {"workers": workers}}) as gw:
        keys = gw.keys  # type: ignore[attr-defined]
        acme = answer(gw.port, keys["acme"])
        assert acme.startswith(b"ICAP/1.0 204"), acme[:200]
        beta = answer(gw.port, keys["beta"])
        assert beta.startswith(b"ICAP/1.0 200") and b"HTTP/1.1 403" in beta
        assert b"X-Infection-Found" in beta and b"Call Beta IT, 555 0100, reference" in beta

        assert wait_for(lambda: monitored_count(gw, "acme") == 1.0, timeout=15)
        lines = wait_for(lambda: [x for x in access_lines(gw) if x["tenant"] == "acme"], timeout=15)
        [line] = lines
        assert line["outcome"] == "monitored" and line["icap_status"] == 204
        assert line["rules"] and all("EICAR" in str(r).upper() for r in line["rules"])  # type: ignore[union-attr]

        # A broken file: the old tables stay, and the log says why.
        text = gw.config_path.read_text()
        gw.config_path.write_text(text.replace('mode = "block"', 'mode = "sometimes"'))
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "tenant policies not reloaded" in gw.log(), timeout=15), gw.log()[-2000:]
        assert answer(gw.port, keys["acme"]).startswith(b"ICAP/1.0 204")

        # Swapped modes: acme is blocked now, beta monitored, in every worker.
        gw.config_path.write_text(text.replace('"monitor"', '"X"').replace('"block"', '"monitor"')
                                  .replace('"X"', '"block"'))
        gw.proc.send_signal(signal.SIGHUP)
        expected = workers if workers > 1 else 1
        assert wait_for(lambda: gw.log().count("tenant policies reloaded") >= expected, timeout=15), gw.log()[-2000:]
        for _ in range(4):  # connections spread over the workers
            assert b"HTTP/1.1 403" in answer(gw.port, keys["acme"])
            assert answer(gw.port, keys["beta"]).startswith(b"ICAP/1.0 204")


STRICT_RULE = 'rule strict_marker { strings: $a = "STRICT-POLICY-MARKER" condition: $a }\n'
MARKER_BODY = b"some text with STRICT-POLICY-MARKER inside"


def marker_respmod(key: str) -> bytes:
    res_hdr = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(MARKER_BODY)
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(res_hdr)}"
    head = (f"RESPMOD icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Allow: 204\r\nEncapsulated: {enc}\r\n\r\n").encode()
    return head + REQ_HDR + res_hdr + b"%x\r\n%s\r\n0\r\n\r\n" % (len(MARKER_BODY), MARKER_BODY)


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while data := sock.recv(65536):
            out += data
            if (out.startswith((b"ICAP/1.0 204", b"ICAP/1.0 200 OK\r\nMethods")) and b"\r\n\r\n" in out) \
                    or out.endswith(b"0\r\n\r\n"):
                break
        return out


def istag(port: int) -> bytes:
    answer = exchange(port, b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n"
                            b"Encapsulated: null-body=0\r\n\r\n")
    [line] = [x for x in answer.split(b"\r\n") if x.lower().startswith(b"istag:")]
    return line


def test_a_tenant_ruleset_scans_its_bodies_and_its_changes_change_the_istag(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    strict = tmp_path_factory.mktemp("strict-rules")
    (strict / "strict.yar").write_text(STRICT_RULE)

    def bootstrap(gw: GatewayProcess) -> None:
        _bootstrap(gw)
        text = gw.config_path.read_text().replace("[tenants.beta]\n", '[tenants.beta]\nrules = "strict"\n')
        text = text.replace('mode = "monitor"', 'mode = "block"')  # both block: a pass is the rules' doing
        gw.config_path.write_text(text + f'\n[rulesets]\nstrict = "{strict}"\n')

    with gateway_process(auth_required=True, before_start=bootstrap,
                         settings={"scan": {"reload_interval": "200ms"}}) as gw:
        keys = gw.keys  # type: ignore[attr-defined]
        assert b"HTTP/1.1 403" in exchange(gw.port, marker_respmod(keys["beta"]))  # beta's set matches
        assert exchange(gw.port, marker_respmod(keys["acme"])).startswith(b"ICAP/1.0 204")  # [scan] rules do not
        assert b"HTTP/1.1 403" in exchange(gw.port, respmod(keys["acme"]))  # EICAR: [scan] rules
        # beta's set does not hold EICAR's rule: a per-tenant ruleset replaces [scan] rules
        assert exchange(gw.port, respmod(keys["beta"])).startswith(b"ICAP/1.0 204")
        before = istag(gw.port)
        (strict / "more.yar").write_text(STRICT_RULE.replace("strict_marker", "strict_other"))
        assert wait_for(lambda: istag(gw.port) != before, timeout=15)

"""Metrics, health endpoints and the access log under real traffic:
curl -> Squid (basic auth, tenant key) -> icap-gateway process -> YARA.

Read back what a Prometheus scrape and a log shipper would see.
"""

from __future__ import annotations

import base64
import datetime as dt
import inspect
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from tests.peers import (
    EICAR,
    GatewayProcess,
    Origin,
    SquidProcess,
    curl,
    gateway_process,
    read_json_lines,
    squid_process,
)

pytestmark = pytest.mark.squid

TENANT = "acme"
USER, PASSWORD = "alice", "secret-pw-771"
# Squid authenticates end users with a helper that accepts any password, so
# the gateway sees X-Authenticated-User and the access log a user name.
SQUID_AUTH = """
auth_param basic program /usr/lib/squid/basic_fake_auth
auth_param basic realm icap-test
acl authed proxy_auth REQUIRED
http_access deny !authed
"""
KEY: dict[str, str] = {}


def add_tenant(gw: GatewayProcess) -> None:
    from register import ops
    from register.access import Actor
    from register.db import open_register

    engine = open_register(f"sqlite:///{gw.workdir / 'register.sqlite3'}", upgrade=True)
    try:
        with Session(engine) as s, s.begin():
            _, _, KEY["acme"] = ops.add_tenant(s, Actor("test", "admin"), TENANT, dt.datetime.now(dt.UTC))
    finally:
        engine.dispose()



@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    monitoring = {"access_log_users": True, "url_redaction": "no-query"}
    # tests/peers.py takes ``settings`` (a dict per section); older copies took ``extra`` text.
    if "settings" in inspect.signature(gateway_process).parameters:
        options: dict[str, Any] = {"settings": {"monitoring": monitoring}}
    else:
        options = {"extra": 'access_log_users = true\nurl_redaction = "no-query"\n'}
    with gateway_process(auth_required=True, before_start=add_tenant, **options) as gw:
        wait_until(lambda: http_get(gw, "/healthz")[0] == 200, what="metrics listener")
        yield gw


@pytest.fixture(scope="module")
def squid(gateway: GatewayProcess) -> Iterator[SquidProcess]:
    with squid_process(gateway.port, key=KEY["acme"], extra=SQUID_AUTH) as sq:
        yield sq


@pytest.fixture(scope="module")
def bad_key_squid(gateway: GatewayProcess) -> Iterator[SquidProcess]:
    with squid_process(gateway.port, key="acme_" + "x" * 40) as sq:
        yield sq


# --- helpers ------------------------------------------------------------------


def http_get(gw: GatewayProcess, path: str) -> tuple[int, str]:
    # No proxy: an http_proxy in the environment must not take the scrape.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{gw.metrics_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def scrape(gw: GatewayProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    code, text = http_get(gw, "/metrics")
    assert code == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_until(cond: Callable[[], Any], *, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def lines_for(gw: GatewayProcess, url_part: str, path: Path | None = None) -> list[dict[str, Any]]:
    return [r for r in read_json_lines(path or gw.access_log) if url_part in str(r.get("url", ""))]


def respmod_lines(gw: GatewayProcess, url_part: str) -> list[dict[str, Any]]:
    return [r for r in lines_for(gw, url_part) if r.get("method") == "RESPMOD"]


def user() -> str:
    return f"{USER}:{PASSWORD}"


# --- tests ----------------------------------------------------------------------


def test_health_endpoints(gateway: GatewayProcess) -> None:
    assert http_get(gateway, "/healthz") == (200, "ok\n")
    code, body = http_get(gateway, "/readyz")
    assert code == 200 and body.startswith("ready"), body
    assert http_get(gateway, "/nothing-here")[0] == 404


def test_counters_follow_real_traffic(gateway: GatewayProcess, squid: SquidProcess, origin: Origin) -> None:
    before = scrape(gateway)
    clean = os.urandom(50_000)
    clean_url = origin.add("/metrics-clean.bin", clean)
    eicar_url = origin.add("/metrics-eicar.com", EICAR)
    upload = b"form " + EICAR + b" data"

    assert curl(squid.port, clean_url, user=user()).status == 200
    assert curl(squid.port, eicar_url, user=user()).status == 403
    assert curl(squid.port, f"http://127.0.0.1:{origin.port}/up", data=upload, user=user()).status == 403

    def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        after = scrape(gateway)
        done = total(after, "icap_gateway_requests_total", method="REQMOD", outcome="blocked") > total(
            before, "icap_gateway_requests_total", method="REQMOD", outcome="blocked")
        return after if done else None

    after = wait_until(settled, what="the REQMOD block to be counted")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    req = "icap_gateway_requests_total"
    assert delta(req, method="RESPMOD", tenant=TENANT, outcome="clean") >= 1
    assert delta(req, method="RESPMOD", tenant=TENANT, outcome="blocked") == 1
    assert delta(req, method="REQMOD", tenant=TENANT, outcome="blocked") == 1
    assert total(after, req, method="OPTIONS", outcome="none") >= 1  # Squid asks OPTIONS first
    assert delta("icap_gateway_scanned_bytes_total", direction="response") >= len(clean) + len(EICAR)
    assert delta("icap_gateway_scanned_bytes_total", direction="request") >= len(upload)
    assert delta("icap_gateway_scan_duration_seconds_count", direction="response") >= 2
    assert delta("icap_gateway_request_duration_seconds_count", method="RESPMOD") >= 2
    eicar_matches = sum(v - before.get((n, ls), 0.0) for (n, ls), v in after.items()
                        if n == "icap_gateway_rule_matches_total" and "eicar" in dict(ls)["rule"].lower())
    assert eicar_matches >= 2
    assert total(after, "icap_gateway_rules_loaded") > 0
    assert total(after, "icap_gateway_rules_reload_total", result="success") >= 1
    assert total(after, "icap_gateway_rules_last_reload_success") == 1
    assert total(after, "icap_gateway_connections_total") >= 1
    assert total(after, "icap_gateway_register_write_errors_total") == 0
    assert total(after, "process_resident_memory_bytes") > 0


def test_access_log_lines_of_real_traffic(gateway: GatewayProcess, squid: SquidProcess, origin: Origin) -> None:
    with_query = origin.add("/logged.bin?token=s3cr3t-query", b"nothing to see here")
    url = with_query.split("?")[0]
    assert curl(squid.port, with_query, user=user()).status == 200
    eicar = origin.add("/logged-eicar.com", EICAR)
    assert curl(squid.port, eicar, user=user()).status == 403

    # Lines reach the file in batches (at most 200 ms late): wait for the
    # download's (RESPMOD) line, not the upload's that may be out first.
    clean_line = wait_until(lambda: respmod_lines(gateway, "/logged.bin"), what="the clean line")[-1]
    blocked_line = wait_until(lambda: respmod_lines(gateway, "/logged-eicar.com"), what="the block line")[-1]
    assert clean_line["url"] == url  # the query is gone (url_redaction = "no-query")
    assert clean_line["tenant"] == TENANT
    assert clean_line["user"] == USER
    assert clean_line["method"] == "RESPMOD" and clean_line["outcome"] == "clean"
    assert clean_line["icap_status"] in (200, 204)
    assert clean_line["client_ip"] == "127.0.0.1"
    assert clean_line["duration"] > 0
    assert clean_line["time"].endswith("Z")
    assert blocked_line["outcome"] == "blocked"
    assert any("eicar" in r.lower() for r in blocked_line["rules"])
    assert blocked_line["http_status"] == 403


def test_no_secret_reaches_the_access_log(gateway: GatewayProcess, squid: SquidProcess, origin: Origin) -> None:
    # curl turns URL userinfo into an Authorization header for the origin:
    # the gateway sees it in the encapsulated request, and must not log it.
    target = origin.add("/creds.txt", b"hello")
    with_userinfo = target.replace("http://", "http://bob:hunter2-pw@")
    curl(squid.port, with_userinfo, user=user())
    wait_until(lambda: lines_for(gateway, "/creds.txt"), what="the line of the userinfo URL")
    text = gateway.access_log.read_text()
    forbidden = [
        "hunter2-pw", base64.b64encode(b"bob:hunter2-pw").decode(),
        PASSWORD, base64.b64encode(user().encode()).decode(),
        KEY["acme"], KEY["acme"][-20:], "Bearer", "uthorization", "s3cr3t-query",
    ]
    for secret in forbidden:
        assert secret not in text, f"{secret!r} leaked into the access log"
    assert "bob" not in text


def test_bad_key_counts_unauthenticated(gateway: GatewayProcess, bad_key_squid: SquidProcess,
                                        origin: Origin) -> None:
    before = scrape(gateway)
    url = origin.add("/refused.bin", b"x" * 100)
    got = curl(bad_key_squid.port, url)
    assert got.status != 200  # bypass=off: Squid refuses what the gateway refused

    def settled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        after = scrape(gateway)
        grew = total(after, "icap_gateway_auth_failures_total") > total(before, "icap_gateway_auth_failures_total")
        return after if grew else None

    after = wait_until(settled, what="the auth failure to be counted")
    assert total(after, "icap_gateway_requests_total", outcome="unauthenticated") > total(
        before, "icap_gateway_requests_total", outcome="unauthenticated")
    refused = wait_until(
        lambda: [r for r in read_json_lines(gateway.access_log) if r.get("outcome") == "unauthenticated"],
        what="an unauthenticated access line")
    assert refused[-1]["icap_status"] in (401, 403)
    assert KEY["acme"] not in gateway.access_log.read_text()
    assert "x" * 40 not in gateway.access_log.read_text()  # the wrong key neither


def test_sigusr1_reopens_the_running_gateways_access_log(gateway: GatewayProcess, squid: SquidProcess,
                                                          origin: Origin) -> None:
    rotated = gateway.access_log.with_name("access.log.1")
    first = origin.add("/before-rotation.txt", b"one")
    curl(squid.port, first, user=user())
    wait_until(lambda: lines_for(gateway, "/before-rotation.txt"), what="the line before rotation")
    os.rename(gateway.access_log, rotated)  # logrotate's move
    os.kill(gateway.proc.pid, signal.SIGUSR1)  # its postrotate
    wait_until(gateway.access_log.exists, what="a new access.log after SIGUSR1")
    second = origin.add("/after-rotation.txt", b"two")
    curl(squid.port, second, user=user())
    wait_until(lambda: lines_for(gateway, "/after-rotation.txt"), what="the line after rotation")
    assert lines_for(gateway, "/before-rotation.txt", rotated)
    assert not lines_for(gateway, "/after-rotation.txt", rotated)
    assert not lines_for(gateway, "/before-rotation.txt")
    assert gateway.proc.poll() is None  # the signal did not kill it

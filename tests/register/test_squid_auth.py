"""End to end through real Squid: basic_ncsa_auth users, the tenant key sent
with adaptation_meta, login records and auth failures in the register."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import GatewayProcess, Origin, curl, gateway_process, require_binary, squid_process, wait_for
from tests.register.conftest import BACKENDS, drop_pg_schema, new_pg_schema, pg_url

pytestmark = pytest.mark.squid
NCSA = "/usr/lib/squid/basic_ncsa_auth"



def _bootstrap(gw: GatewayProcess) -> None:
    gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
    out = gw.cli("tenant", "add", "acme", "--company", "Acme Oy", "--json", "--operator", "e2e")
    gw.key = json.loads(out.stdout)["key"]  # type: ignore[attr-defined]


@pytest.fixture(scope="module", params=BACKENDS)
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    """The gateway as a process, its register on SQLite, then on PostgreSQL."""
    schema = new_pg_schema() if request.param == "postgresql" else None
    try:
        with gateway_process(auth_required=True, before_start=_bootstrap,
                             database=pg_url(schema) if schema else None,
                             settings={"auth": {"refresh_interval": "500ms"}}) as gw:
            yield gw
    finally:
        if schema:
            drop_pg_schema(schema)


@pytest.fixture(scope="module")
def squid_auth() -> Iterator[str]:
    """squid.conf lines asking for a basic_ncsa_auth user (alice:wonderland)."""
    if not Path(NCSA).exists():
        require_binary("basic_ncsa_auth")
    openssl = require_binary("openssl")
    hashed = subprocess.run([openssl, "passwd", "-apr1", "wonderland"], capture_output=True,
                            text=True, check=True).stdout.strip()
    # Squid's helper runs as Squid's own user: the file must be readable to it.
    tmp = Path(tempfile.mkdtemp(prefix="squid-auth-"))
    tmp.chmod(0o755)
    passwd = tmp / "passwd"
    passwd.write_text(f"alice:{hashed}\n")
    passwd.chmod(0o644)
    yield (f"auth_param basic program {NCSA} {passwd}\n"
           "auth_param basic realm test\n"
           "acl authed proxy_auth REQUIRED\n"
           "http_access deny !authed\n")
    shutil.rmtree(tmp, ignore_errors=True)


def export(gw: GatewayProcess, *extra: str) -> dict:  # type: ignore[type-arg]
    out = gw.cli("register", "export", "--tenant", "acme", *extra, "--json", "--operator", "e2e")
    return json.loads(out.stdout)



def test_squid_user_with_tenant_key_is_recorded(gateway: GatewayProcess, origin: Origin,
                                                squid_auth: str) -> None:
    key = gateway.key  # type: ignore[attr-defined]
    url = origin.add("/hello.txt", b"hello")
    with squid_process(gateway.port, key=key, extra=squid_auth) as squid:
        assert curl(squid.port, url).status == 407  # Squid wants its user first
        got = curl(squid.port, url, user="alice:wonderland")
        assert got.status == 200 and got.body == b"hello"
        curl(squid.port, url, user="alice:wonderland")
    logins = wait_for(lambda: export(gateway, "--user", "alice")["user"]["logins"])
    assert len(logins) == 1 and logins[0]["client_ip"] == "127.0.0.1"
    assert logins[0]["last_seen"] >= logins[0]["login_at"]
    assert key not in gateway.log()
    assert key.split(".")[2] not in (gateway.workdir / "access.log").read_text(errors="replace")


def test_wrong_key_is_refused_and_recorded_without_the_key(gateway: GatewayProcess, origin: Origin,
                                                           squid_auth: str) -> None:
    wrong = "icgw.acme." + "x" * 43
    url = origin.add("/blocked.txt", b"never")
    with squid_process(gateway.port, key=wrong, extra=squid_auth) as squid:
        got = curl(squid.port, url, user="alice:wonderland")
    assert got.status != 200 and got.body != b"never"
    failures = wait_for(lambda: export(gateway)["auth_failures"])
    assert failures and failures[-1]["reason"] == "unknown-key"
    assert failures[-1]["source_ip"] == "127.0.0.1"
    assert wrong not in gateway.log() and "x" * 43 not in json.dumps(export(gateway))


def test_revoked_key_is_refused_within_the_refresh_interval(gateway: GatewayProcess, origin: Origin,
                                                            squid_auth: str) -> None:
    out = gateway.cli("key", "create", "acme", "--json", "--operator", "e2e")
    created = json.loads(out.stdout)
    time.sleep(1.5)  # a new key, too, takes effect within [auth] refresh_interval (500ms here)
    url = origin.add("/revoked.txt", b"ok")
    with squid_process(gateway.port, key=created["key"], extra=squid_auth) as squid:
        got = curl(squid.port, url, user="alice:wonderland")
        assert got.status == 200, (export(gateway)["auth_failures"], gateway.log()[-3000:])
        gateway.cli("key", "revoke", str(created["key_id"]), "--operator", "e2e")
        time.sleep(1.5)  # [auth] refresh_interval is 500ms here
        assert curl(squid.port, url, user="alice:wonderland").status != 200
    reasons = [f["reason"] for f in export(gateway)["auth_failures"]]
    assert "revoked-key" in reasons

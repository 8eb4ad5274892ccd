"""A database outage in the middle of real Squid traffic: scanning goes on,
login records wait in the writer's queue, and all of them reach the register
when the database is back."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.peers import (
    GatewayProcess,
    Origin,
    TCPForwarder,
    curl,
    gateway_process,
    squid_basic_auth,
    squid_process,
    wait_for,
)
from tests.register.conftest import drop_pg_schema, new_pg_schema, pg_url

pytestmark = [pytest.mark.squid, pytest.mark.postgres]
USERS = ("alice", "bob", "carol")


@pytest.fixture
def auth_lines() -> Iterator[str]:
    tmp = Path(tempfile.mkdtemp(prefix="squid-auth-"))
    yield squid_basic_auth(USERS, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def logins(gw: GatewayProcess) -> set[str]:
    """Users with at least one login record in the register."""
    found = set()
    for user in USERS:
        out = gw.cli("register", "export", "--tenant", "acme", "--user", user, "--json", "--operator", "e2e",
                     check=False)
        if out.returncode == 0 and json.loads(out.stdout).get("user", {}).get("logins"):
            found.add(user)
    return found


def queue_depth(gw: GatewayProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("icap_gateway_register_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no queue depth metric")



def test_outage_mid_traffic_loses_no_login_record(auth_lines: str) -> None:
    schema = new_pg_schema()
    direct = pg_url(schema)
    pg_port = urlsplit(direct.replace("postgresql+psycopg", "http")).port or 5432
    forwarder = TCPForwarder(pg_port)
    url = direct.replace(f"127.0.0.1:{pg_port}", f"127.0.0.1:{forwarder.port}")
    origin = Origin()

    def bootstrap(gw: GatewayProcess) -> None:
        gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
        out = gw.cli("tenant", "add", "acme", "--json", "--operator", "e2e")
        gw.key = json.loads(out.stdout)["key"]  # type: ignore[attr-defined]

    try:
        with gateway_process(auth_required=True, database=url, before_start=bootstrap,
                             settings={"auth": {"refresh_interval": "500ms"},
                                       "register": {"flush_interval": "200ms"}}) as gw, \
                squid_process(gw.port, key=gw.key, extra=auth_lines) as squid:  # type: ignore[attr-defined]
            page = origin.add("/page.txt", b"ordinary page")
            assert curl(squid.port, page, user="alice:secret-alice").status == 200
            assert wait_for(lambda: "alice" in logins(gw)), gw.log()

            forwarder.cut()  # the database goes away mid-traffic
            for user in ("bob", "carol"):
                got = curl(squid.port, page, user=f"{user}:secret-{user}")
                assert got.status == 200 and got.body == b"ordinary page"  # scanning goes on
            assert wait_for(lambda: queue_depth(gw) >= 2, timeout=5), (queue_depth(gw), gw.log()[-3000:])
            time.sleep(1.0)  # several flushes fail meanwhile
            assert queue_depth(gw) >= 2, gw.log()[-4000:]

            forwarder.restore()
            assert wait_for(lambda: logins(gw) >= set(USERS), timeout=30), (logins(gw), gw.log()[-3000:])
            assert wait_for(lambda: queue_depth(gw) == 0, timeout=10)
    finally:
        forwarder.close()
        origin.close()
        drop_pg_schema(schema)

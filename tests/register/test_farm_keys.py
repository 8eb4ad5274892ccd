"""Two gateway processes on one PostgreSQL register: a key created or revoked
with the CLI is live on both within 2 s, with the reload timer at an hour,
so LISTEN/NOTIFY in the real service wiring (reactor, thread pool) does it."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.peers import GatewayProcess, gateway_process
from tests.register.conftest import _pg_admin, drop_pg_schema, new_pg_schema, pg_url

pytestmark = pytest.mark.postgres

PROPAGATION_LIMIT = 2.0  # seconds: the bound for a key change to reach every node
SETTINGS: dict[str, dict[str, object]] = {"auth": {"refresh_interval": "1h"}}


def icap_status(port: int, key: str) -> int:
    """The status of a minimal REQMOD carrying ``key``."""
    http = b"GET http://origin.invalid/ HTTP/1.1\r\nHost: origin.invalid\r\n\r\n"
    head = (f"REQMOD icap://127.0.0.1:{port}/reqmod ICAP/1.0\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\nAllow: 204\r\n"
            f"Encapsulated: req-hdr=0, null-body={len(http)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + http)
        line = s.makefile("rb").readline()
    return int(line.split()[1])


def live_on_all(nodes: list[GatewayProcess], key: str, accepted: bool) -> float | None:
    """Seconds until every node accepts (or refuses) ``key``; None after the limit."""
    began = time.monotonic()
    while time.monotonic() - began < PROPAGATION_LIMIT:
        if all((icap_status(n.port, key) in (200, 204)) == accepted for n in nodes):
            return time.monotonic() - began
        time.sleep(0.01)
    return None


@pytest.fixture(scope="module")
def farm() -> Iterator[list[GatewayProcess]]:
    _pg_admin()  # fails (CI) or skips when PostgreSQL is unreachable
    schema = new_pg_schema()
    database = pg_url(schema)

    def bootstrap(gw: GatewayProcess) -> None:
        gw.cli("register", "upgrade")
        gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
        gw.cli("tenant", "add", "acme", "--operator", "e2e")

    try:
        with contextlib.ExitStack() as stack:
            nodes = [stack.enter_context(gateway_process(
                auth_required=True, database=database, settings=SETTINGS,
                before_start=bootstrap if i == 0 else None)) for i in range(2)]
            yield nodes
    finally:
        drop_pg_schema(schema)


def test_cli_key_changes_are_live_on_every_node_within_2s(farm: list[GatewayProcess]) -> None:
    created = json.loads(farm[0].cli("key", "create", "acme", "--json", "--operator", "e2e").stdout)
    took = live_on_all(farm, created["key"], accepted=True)
    assert took is not None, [n.log()[-2000:] for n in farm]
    farm[1].cli("key", "revoke", str(created["key_id"]), "--operator", "e2e")
    took = live_on_all(farm, created["key"], accepted=False)
    assert took is not None, "a revoked key still worked on a node 2 s after the CLI returned"
    assert icap_status(farm[0].port, created["key"]) == 403

"""Real Squid (squid-openssl) reaches the gateway over icaps:// with a client
certificate bound to a tenant, and no key: EICAR blocked, a clean download
byte-identical, the user's login in the register under that tenant."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import EICAR, GatewayProcess, Origin, curl, gateway_process, squid_process, wait_for
from tests.register.test_squid_auth import squid_auth as squid_auth  # the fixture, re-exported
from tests.tlscerts import issue, make_ca

pytestmark = pytest.mark.squid


@pytest.fixture(scope="module")
def certificates() -> Iterator[Path]:
    """A CA, the gateway's certificate and the proxy's, readable to Squid's own user."""
    directory = Path(tempfile.mkdtemp(prefix="icaps-"))
    directory.chmod(0o755)
    ca = make_ca(directory)
    issue(ca, directory, "gateway", server=True)
    issue(ca, directory, "proxy", server=False)
    for path in directory.iterdir():
        path.chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _bootstrap(certificates: Path) -> object:
    def bootstrap(gw: GatewayProcess) -> None:
        gw.cli("operator", "add", "e2e", "--role", "admin", "--operator", "e2e")
        gw.cli("tenant", "add", "other", "--json", "--operator", "e2e")
        gw.cli("tenant", "add", "acme", "--company", "Acme Oy", "--json", "--operator", "e2e")
        gw.cli("tenant", "cert", "add", "acme", str(certificates / "proxy.crt"), "--operator", "e2e")
    return bootstrap


def export(gw: GatewayProcess, tenant: str) -> dict:  # type: ignore[type-arg]
    return json.loads(gw.cli("register", "export", "--tenant", tenant, "--json", "--operator", "e2e").stdout)


def test_squid_over_icaps_with_a_bound_client_certificate(certificates: Path, origin: Origin,
                                                         squid_auth: str) -> None:
    tls = f"privateKey={certificates / 'gateway.key'}:certKey={certificates / 'gateway.crt'}"
    settings = {"tls": {"client_certificates": "required", "client_ca": str(certificates / "test-ca.pem")}}
    with gateway_process(tls=tls, auth_required=True, settings=settings,
                         before_start=_bootstrap(certificates)) as gw:  # type: ignore[arg-type]
        # tls-domain: Squid 5 matches the certificate's DNS names only, never an IP address SAN.
        squid_tls = (f"tls-cafile={certificates / 'test-ca.pem'} tls-cert={certificates / 'proxy.crt'} "
                     f"tls-key={certificates / 'proxy.key'} tls-domain=localhost")
        clean = os.urandom(200_000)  # past Squid's preview and the early-response size
        clean_url = origin.add("/clean.bin", clean, Content_Type="application/octet-stream")
        eicar_url = origin.add("/eicar.com", EICAR, Content_Type="application/octet-stream")
        with squid_process(gw.port, extra=squid_auth, tls=squid_tls) as squid:  # no key: the certificate
            blocked = curl(squid.port, eicar_url, user="alice:wonderland")
            assert blocked.status == 403 and b"This content was blocked" in blocked.body, squid.cache_log()
            assert EICAR not in blocked.body
            got = curl(squid.port, clean_url, user="alice:wonderland")
            assert got.status == 200 and got.body == clean
        users = wait_for(lambda: export(gw, "acme")["users"], timeout=15)
        assert [u["username"] for u in users] == ["alice"] and users[0]["logins"]
        assert export(gw, "other")["users"] == []
        records = [json.loads(line) for line in gw.access_log.read_text().splitlines()]
        assert {r.get("tenant") for r in records if r.get("method") in ("REQMOD", "RESPMOD")} == {"acme"}

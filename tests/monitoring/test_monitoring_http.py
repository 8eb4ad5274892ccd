"""/metrics, /healthz and /readyz on a real loopback port with the real reactor."""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from gateway.config import GatewayConfig
from gateway.interfaces import TransactionRecord
from monitoring.service import MonitoringComponents, build_monitoring
from monitoring.settings import MonitoringSettings

# Twisted's own client warns about its internal transport proxy; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")


def config(listen: str = "tcp:0:interface=127.0.0.1") -> GatewayConfig:
    return GatewayConfig(monitoring=MonitoringSettings(metrics_listen=listen, access_log="none"))


class Ready:
    def __init__(self) -> None:
        self.state: tuple[bool, str] | Exception = (False, "rules not loaded")

    def __call__(self) -> tuple[bool, str]:
        if isinstance(self.state, Exception):
            raise self.state
        return self.state


@pytest.fixture
def ready() -> Ready:
    return Ready()


@pytest.fixture
def running(ready: Ready, monkeypatch: pytest.MonkeyPatch) -> Generator[tuple[MonitoringComponents, str], None, None]:
    from twisted.internet import reactor

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    c = build_monitoring(config(), reactor, ready=ready, queue_depth=lambda: 3)
    c.service.startService()
    port = pytest_twisted.blockon(c.service.whenListening())  # type: ignore[attr-defined]
    yield c, f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(defer.maybeDeferred(c.service.stopService))


@defer.inlineCallbacks
def get(url: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
    from twisted.internet import reactor

    response = yield Agent(reactor).request(b"GET", url.encode(), Headers(headers or {}))
    body = yield readBody(response)
    return response.code, response.headers, body.decode()


@pytest_twisted.inlineCallbacks
def test_metrics_endpoint_serves_the_registry(running: tuple[MonitoringComponents, str]) -> Any:
    c, base = running
    c.observer.connection_opened()
    c.observer.transaction_finished(TransactionRecord(
        started=0.0, duration=0.01, method="REQMOD", service="yara", icap_status=200,
        client_ip="10.0.0.1", peer="127.0.0.1", tenant="acme", outcome="blocked"))
    code, headers, body = yield get(base + "/metrics")
    assert code == 200
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert "# TYPE icap_gateway_requests_total counter" in body
    assert 'icap_gateway_requests_total{method="REQMOD",outcome="blocked",service="yara",tenant="acme"} 1.0' in body
    assert "icap_gateway_active_connections 1.0" in body
    assert "icap_gateway_register_queue_depth 3.0" in body
    assert "process_cpu_seconds_total" in body


@pytest_twisted.inlineCallbacks
def test_metrics_openmetrics_negotiation(running: tuple[MonitoringComponents, str]) -> Any:
    _, base = running
    code, headers, body = yield get(base + "/metrics", {
        b"accept": [b"application/openmetrics-text; version=1.0.0"]})
    assert code == 200
    assert headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


@pytest_twisted.inlineCallbacks
def test_healthz_is_always_ok(running: tuple[MonitoringComponents, str]) -> Any:
    _, base = running
    code, headers, body = yield get(base + "/healthz")
    assert (code, body) == (200, "ok\n")
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]


@pytest_twisted.inlineCallbacks
def test_readyz_follows_the_ready_callable(running: tuple[MonitoringComponents, str], ready: Ready) -> Any:
    _, base = running
    code, _, body = yield get(base + "/readyz")
    assert (code, body) == (503, "not ready: rules not loaded\n")
    ready.state = (True, "")
    code, _, body = yield get(base + "/readyz")
    assert (code, body) == (200, "ready\n")
    ready.state = (False, "register unreachable and queue over bound")
    code, _, body = yield get(base + "/readyz")
    assert code == 503 and "register unreachable" in body


@pytest_twisted.inlineCallbacks
def test_readyz_503_when_the_check_raises(running: tuple[MonitoringComponents, str], ready: Ready) -> Any:
    _, base = running
    ready.state = RuntimeError("boom")
    code, _, body = yield get(base + "/readyz")
    assert code == 503 and "failed" in body


@pytest_twisted.inlineCallbacks
def test_unknown_path_is_404_and_root_lists_endpoints(running: tuple[MonitoringComponents, str]) -> Any:
    _, base = running
    code, _, _ = yield get(base + "/nope")
    assert code == 404
    code, _, body = yield get(base + "/")
    assert code == 200 and "/metrics" in body


@pytest_twisted.inlineCallbacks
def test_stop_closes_the_port(ready: Ready, monkeypatch: pytest.MonkeyPatch) -> Any:
    from twisted.internet import reactor

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    c = build_monitoring(config(), reactor, ready=ready)
    c.service.startService()
    port = yield c.service.whenListening()  # type: ignore[attr-defined]
    number = port.getHost().port
    yield defer.maybeDeferred(c.service.stopService)
    s = socket.socket()
    try:
        assert s.connect_ex(("127.0.0.1", number)) != 0
    finally:
        s.close()


def test_port_in_use_raises_at_start(ready: Ready, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        number = taken.getsockname()[1]
        c = build_monitoring(config(f"tcp:{number}:interface=127.0.0.1"), reactor, ready=ready)
        with pytest.raises(CannotListenError):
            c.service.startService()
        assert not c.service.running
    finally:
        taken.close()


def test_serve_http_false_has_no_listener(ready: Ready, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    c = build_monitoring(config(), reactor, ready=ready, serve_http=False)
    c.service.startService()
    try:
        assert c.service.port is None  # type: ignore[attr-defined]
    finally:
        c.service.stopService()

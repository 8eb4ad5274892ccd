"""Config section of metrics, health endpoints and the access log."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import endpoint, setting


@dataclass(frozen=True)
class MonitoringSettings:
    metrics_listen: str = setting(
        "tcp:9344:interface=127.0.0.1", "Listener of /metrics, /healthz, /readyz (Twisted endpoint)",
        validate=endpoint,
    )

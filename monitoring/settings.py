"""Config section of metrics, health endpoints and the access log."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.settings import endpoint, positive, setting

UrlRedaction = Literal["full", "no-query", "host-only", "none"]


def _access_log_destination(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return 'expected "stdout", "none" or a file path'
    if value.endswith("/"):
        return "expected a file path, not a directory"
    return None


@dataclass(frozen=True)
class MonitoringSettings:
    metrics_listen: str = setting(
        "tcp:9344:interface=127.0.0.1", "Listener of /metrics, /healthz, /readyz (Twisted endpoint)",
        validate=endpoint,
    )
    access_log: str = setting(
        "stdout",
        'Where the JSON access log goes: "stdout", "none", or a file path (reopened on SIGUSR1)',
        validate=_access_log_destination,
    )
    # Off by default: a username in a log file is personal data that the
    # register's erasure and retention (privacy notice, section 7) do not reach.
    access_log_users: bool = setting(
        False, "Write the end user's name into the access log (personal data: mind retention)"
    )
    url_redaction: UrlRedaction = setting(
        "no-query",
        "How much of the URL the access log keeps: full, no-query, host-only, none "
        "(user:password@ is always removed)",
    )
    max_tenant_labels: int = setting(
        100, "Distinct tenant label values in metrics; later tenants are counted as \"other\"",
        validate=positive,
    )
    max_rule_labels: int = setting(
        200, "Distinct rule label values in metrics; later rules are counted as \"other\"",
        validate=positive,
    )
    multiprocess_dir: str = setting(
        "",
        "Directory for Prometheus multiprocess metric files when several workers run "
        "(empty: $PROMETHEUS_MULTIPROC_DIR, which the supervisor of several workers sets to "
        "<state_dir>/prometheus)",
    )

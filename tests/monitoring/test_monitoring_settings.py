"""The [monitoring] config section: defaults, checks, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig, ServerSettings, parse_config
from gateway.settings import ConfigErrors
from monitoring.service import multiprocess_dir
from monitoring.settings import MonitoringSettings


def test_defaults() -> None:
    m = GatewayConfig().monitoring
    assert m.metrics_listen == "tcp:9344:interface=127.0.0.1"  # loopback only
    assert m.access_log == "stdout"
    assert m.access_log_users is False  # personal data: opt in
    assert m.url_redaction == "no-query"


def test_valid_section() -> None:
    config = parse_config({"monitoring": {
        "metrics_listen": "tcp:9100:interface=0.0.0.0", "access_log": "/var/log/icap/access.log",
        "access_log_users": True, "url_redaction": "host-only", "max_tenant_labels": 10,
        "max_rule_labels": 50, "multiprocess_dir": "/run/icap/metrics",
    }}, "gw.toml")
    assert config.monitoring.url_redaction == "host-only"
    assert config.monitoring.max_tenant_labels == 10


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("url_redaction", "partial", "one of 'full', 'no-query', 'host-only', 'none'"),
    ("metrics_listen", "9344", "Twisted endpoint"),
    ("metrics_listen", "udp:9344", "unsupported endpoint type"),
    ("access_log", "", "stdout"),
    ("access_log", "/var/log/", "not a directory"),
    ("access_log_users", "yes", "true or false"),
    ("max_tenant_labels", 0, "greater than zero"),
    ("max_rule_labels", -1, "greater than zero"),
    ("metrics_port", 9344, "unknown key"),
])
def test_bad_values_name_file_key_and_reason(key: str, value: object, reason: str) -> None:
    with pytest.raises(ConfigErrors) as e:
        parse_config({"monitoring": {key: value}}, "/etc/icap/gw.toml")
    [err] = e.value.errors
    assert err.source == "/etc/icap/gw.toml"
    assert err.key == f"[monitoring] {key}"
    assert reason in err.reason


def test_multiprocess_dir_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    one = GatewayConfig(server=ServerSettings(state_dir=str(tmp_path), workers=1))
    assert multiprocess_dir(one) is None
    # A process is a multiprocess worker only when told so (the supervisor sets
    # the variable for its children): the workers setting alone does not say it.
    many = GatewayConfig(server=ServerSettings(state_dir=str(tmp_path), workers=4))
    assert multiprocess_dir(many) is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/run/from-env")
    assert multiprocess_dir(one) == "/run/from-env"
    configured = GatewayConfig(monitoring=MonitoringSettings(multiprocess_dir="/run/configured"))
    assert multiprocess_dir(configured) == "/run/configured"

"""Config files: errors name file, key and reason; the shipped example is complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import GatewayConfig, load_config, parse_config, render_example, with_overrides
from gateway.settings import ConfigErrors, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_shipped_example_is_generated_and_valid() -> None:
    example = REPO / "config" / "gateway.toml"
    assert example.read_text() == render_example(), "regenerate: icap-gateway config example > config/gateway.toml"
    assert load_config(example) == GatewayConfig(source=str(example))


def test_example_uncommented_parses_to_the_defaults(tmp_path: Path) -> None:
    # Every commented "# key = value" line, uncommented, is valid TOML and the default.
    lines = []
    for line in render_example().splitlines():
        if line.startswith("[") or (line.startswith("# ") and " = " in line and not line.startswith("#   ")):
            lines.append(line.removeprefix("# "))
    text = "\n".join(lines)
    data = tomllib.loads(text)
    config = parse_config(data, "uncommented")
    assert config == GatewayConfig(source="uncommented")


@pytest.mark.parametrize(
    ("toml", "key", "reason"),
    [
        ('[server]\nlisten = ["1344"]', "[server] listen", "Twisted endpoint"),
        ("[server]\nworkers = -1", "[server] workers", "negative"),
        ("[server]\npreview_size = \"lots\"", "[server] preview_size", "expected a size"),
        ("[server]\nread_timeout = \"soon\"", "[server] read_timeout", "expected seconds"),
        ("[server]\nbogus = 1", "[server] bogus", "unknown key"),
        ("[scan]\nerror_policy = \"maybe\"", "[scan] error_policy", "one of"),
        ("[scan]\nthreads = \"two\"", "[scan] threads", "an integer"),
        ("[nosuch]\nx = 1", "[nosuch]", "unknown section"),
        ("[server\n", "-", "not valid TOML"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    [err] = info.value.errors
    assert err.source == str(path) and err.key == key and reason in err.reason
    assert str(err).startswith(f"{path}: {key}: ")


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nworkers = -1\nbogus = 2\n[scan]\nthreads = \"x\"\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert len(info.value.errors) == 3


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('[server]\npreview_size = "8 KiB"\n')
    bad.write_text("[scan]\nnope = 1\n")
    assert main(["config", "check", str(good)]) == 0
    assert main(["config", "check", str(bad)]) == 1
    assert f"{bad}: [scan] nope: unknown key" in capsys.readouterr().err
    assert main(["config", "check", "--json", str(bad)]) == 1
    assert '"key": "[scan] nope"' in capsys.readouterr().out


def test_units() -> None:
    assert parse_size("64 KiB") == 65536 and parse_size("1MB") == 1_000_000 and parse_size(7) == 7
    assert parse_duration("500ms") == 0.5 and parse_duration("90d") == 90 * 86400 and parse_duration(3) == 3.0


def test_overrides() -> None:
    config = with_overrides(GatewayConfig(), server__listen=["tcp:1"], scan__rules="/r", register__database=None)
    assert config.server.listen == ["tcp:1"] and config.scan.rules == "/r"
    assert config.register.database == GatewayConfig().register.database

"""``[scan] unscannable_policy``: what an admin writes, what ``config check``
says about typos, and how it meets the older ``error_policy`` and
``oversize_policy``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import UNSCANNABLE_DEFAULTS, ScanSettings, load_config
from gateway.interfaces import UNSCANNABLE_REASONS
from gateway.settings import ConfigErrors


def test_every_reason_has_a_default_and_an_explanation() -> None:
    assert list(UNSCANNABLE_DEFAULTS) == list(UNSCANNABLE_REASONS)
    assert all(UNSCANNABLE_REASONS.values())


def test_safe_defaults() -> None:
    settings = ScanSettings()
    assert {reason: settings.policy_for(reason) for reason in UNSCANNABLE_REASONS} == {
        "too-large": "pass", "decode-limit": "block", "bomb": "block", "corrupt-encoding": "block",
        "unknown-encoding": "pass",
        "trailing-data": "pass", "scan-timeout": "block", "engine-error": "block",
    }


@pytest.mark.parametrize("toml", [
    '[scan]\nunscannable_policy = { bomb = "pass", too-large = "block" }\n',
    '[scan.unscannable_policy]\nbomb = "pass"\ntoo-large = "block"\n',
])
def test_inline_or_sub_table(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(toml)
    scan = load_config(path).scan
    assert (scan.policy_for("bomb"), scan.policy_for("too-large"), scan.policy_for("corrupt-encoding")) == (
        "pass", "block", "block")


def test_older_keys_set_their_reasons_defaults_and_the_table_wins() -> None:
    older = ScanSettings(error_policy="fail-open", oversize_policy="block")
    assert (older.policy_for("scan-timeout"), older.policy_for("engine-error")) == ("pass", "pass")
    assert older.policy_for("too-large") == "block"
    assert older.policy_for("bomb") == "block"  # not theirs
    both = ScanSettings(error_policy="fail-open", unscannable_policy={"scan-timeout": "block"})
    assert (both.policy_for("scan-timeout"), both.policy_for("engine-error")) == ("block", "pass")


def test_typos_are_all_reported_by_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[scan]\nunscannable_policy = { bom = "block", too-large = "blok" }\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.key == "[scan] unscannable_policy"
    assert "unknown reason 'bom' (known: too-large, decode-limit, bomb" in error.reason
    assert "too-large: expected \"block\" or \"pass\", got 'blok'" in error.reason
    assert main(["config", "check", str(path)]) == 1
    assert "unknown reason 'bom'" in capsys.readouterr().err


def test_not_a_table(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[scan]\nunscannable_policy = "block"\n')
    with pytest.raises(ConfigErrors, match="expected a table"):
        load_config(path)

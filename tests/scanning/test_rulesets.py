"""Real third-party rulesets load unmodified with the gateway's externals.

They live outside the repository (``../shared/rulesets`` beside the checkout,
or ``$ICAP_GATEWAY_RULESETS``).  Absent on a workstation: skipped.  Absent
under CI (``CI`` set): a failure, so a green CI always means they loaded.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from gateway.interfaces import ScanContext
from gateway.scanning.rules import CompiledRules, compile_directory
from gateway.scanning.scanner import externals_for

from .conftest import EICAR, REPO


def rulesets_dir() -> Path:
    override = os.environ.get("ICAP_GATEWAY_RULESETS")
    return Path(override) if override else REPO.parent / "shared" / "rulesets"


def ruleset(name: str) -> Path:
    path = rulesets_dir() / name / "yara"
    if not path.is_dir():
        message = f"third-party ruleset not found: {path} (set ICAP_GATEWAY_RULESETS)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def signature_base() -> CompiledRules:
    return compile_directory(ruleset("signature-base"))


def test_signature_base_loads_unmodified(signature_base: CompiledRules) -> None:
    assert signature_base.file_count > 700
    assert signature_base.rule_count > 5000
    assert len(signature_base.version) == 16
    # Compile time matters for startup and reloads; about 1 s on a 2-core box.
    assert signature_base.compile_seconds < 20


def test_signature_base_scans_in_a_thread(signature_base: CompiledRules) -> None:
    externals = externals_for(ScanContext(direction="response", filename="index.html",
                                          extension="html", filetype="text/html"))
    results: list[object] = []

    def work() -> None:
        started = time.perf_counter()
        matches = signature_base.match(b"<html>" + EICAR + b"</html>" + bytes(1024), externals, timeout=10)
        results.append((matches, time.perf_counter() - started))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    matches, seconds = results[0]  # type: ignore[misc]
    assert isinstance(matches, list)
    assert seconds < 5


def test_reversinglabs_loads() -> None:
    compiled = compile_directory(ruleset("reversinglabs"))
    assert compiled.file_count > 250
    assert compiled.rule_count > 1000

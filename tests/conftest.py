"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import Origin


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    """An origin web server for Squid to fetch from (one per test module)."""
    o = Origin()
    yield o
    o.close()

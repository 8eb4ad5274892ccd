"""The scanning tests' synchronous reactor, pool and scanner factory, reused."""

from tests.scanning.conftest import make_scanner, pool, reactor

__all__ = ["make_scanner", "pool", "reactor"]

"""The named body scenarios of the suite: what is sent, with which ICAP method.

- ``1k`` ... ``20m``: RESPMOD, random bytes of that size (downloads);
- ``gzip``: RESPMOD, 1 MiB of text gzip-encoded;
- ``up-1k``, ``up-1m``: REQMOD, a POST of random bytes (uploads);
- ``block-1k``, ``block-64k``: RESPMOD, random bytes with the EICAR test string
  inside: with the bundled rules a scanning server answers its block page;
- ``webmix``: RESPMOD, 200 bodies drawn from the HTTP Archive's distribution
  of response sizes and types (``benchmarks/webmix.py``), taken in turn;
- ``file``: ``--body-file``, a file or the files of a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.bodies import Body, KiB, MiB, block_body, file_body, gzip_body, random_body
from benchmarks.webmix import web_mix


@dataclass(frozen=True)
class Scenario:
    kind: str  # random | gzip | block | webmix
    size: int  # bytes per body (decoded for gzip); webmix: 0, its bodies vary
    method: str = "RESPMOD"

    @property
    def blocks(self) -> bool:
        """Its bodies match the bundled rules: the block page is what is measured."""
        return self.kind == "block"


SCENARIOS: dict[str, Scenario] = {
    "1k": Scenario("random", KiB),
    "64k": Scenario("random", 64 * KiB),
    "1m": Scenario("random", MiB),
    "20m": Scenario("random", 20 * MiB),
    "gzip": Scenario("gzip", MiB),
    "up-1k": Scenario("random", KiB, "REQMOD"),
    "up-1m": Scenario("random", MiB, "REQMOD"),
    "block-1k": Scenario("block", KiB),
    "block-64k": Scenario("block", 64 * KiB),
    "webmix": Scenario("webmix", 0),
}

# the ruleset whose rules the block scenarios' bodies match (rules/eicar.yar)
BLOCK_RULESET = "bundled"
MAX_FILES = 1000


def method(scenario: str) -> str:
    """The ICAP method a scenario's requests use (``file``: RESPMOD)."""
    sc = SCENARIOS.get(scenario)
    return sc.method if sc else "RESPMOD"


def blocks(scenario: str) -> bool:
    sc = SCENARIOS.get(scenario)
    return sc.blocks if sc else False


def plotted_size(scenario: str) -> int | None:
    """The body size of a RESPMOD scenario of plain random bytes (the points of the
    throughput-against-size plot); None for every other scenario."""
    sc = SCENARIOS.get(scenario)
    if sc is None or sc.kind != "random" or sc.method != "RESPMOD":
        return None
    return sc.size


def make_bodies(scenario: str, body_file: str | None = None) -> list[Body]:
    """The bodies of a scenario; requests take them in turn.

    ``file`` with ``--body-file``: that file, or every non-empty file under a
    directory (sorted, at most MAX_FILES), each sent as is plus the token.
    """
    if scenario == "file":
        if not body_file:
            raise ValueError("scenario 'file' needs --body-file")
        path = Path(body_file)
        if path.is_dir():
            files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.stat().st_size]
            if not files:
                raise ValueError(f"{body_file}: no non-empty files")
            return [file_body(p) for p in files[:MAX_FILES]]
        return [file_body(path)]
    sc = SCENARIOS[scenario]
    if sc.kind == "gzip":
        return [gzip_body(sc.size)]
    if sc.kind == "block":
        return [block_body(sc.size)]
    if sc.kind == "webmix":
        return web_mix()
    return [random_body(sc.size)]


def make_body(scenario: str, body_file: str | None = None) -> Body:
    return make_bodies(scenario, body_file)[0]

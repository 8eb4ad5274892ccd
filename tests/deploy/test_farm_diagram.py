"""docs/farm.png is generated from docs/farm.dot (``make diagrams``): the
source renders, and the committed picture is that rendering, not a stale one."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from tests.peers import REPO, require_binary

SOURCE = REPO / "docs" / "farm.dot"
PICTURE = REPO / "docs" / "farm.png"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])  # type: ignore[return-value]


def test_committed_diagram_is_the_rendering_of_its_source(tmp_path: Path) -> None:
    dot = require_binary("dot")
    fresh = tmp_path / "farm.png"
    # The command of the Makefile's docs/farm.png target.
    make = (REPO / "Makefile").read_text()
    assert "dot -Tpng -Gdpi=96 $< -o $@" in make
    subprocess.run([dot, "-Tpng", "-Gdpi=96", str(SOURCE), "-o", str(fresh)], check=True, timeout=60)
    # Pixels may differ with Graphviz's and the fonts' versions; the layout's
    # size changes with any node, edge or label added or removed.
    assert png_size(PICTURE.read_bytes()) == png_size(fresh.read_bytes()), "run: make diagrams"


def test_readme_shows_the_diagram() -> None:
    assert "](docs/farm.png)" in (REPO / "README.md").read_text()

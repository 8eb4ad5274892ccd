"""The "web mix": response bodies drawn from a published distribution of web responses.

Source: HTTP Archive, Web Almanac 2024, chapter "Page Weight" (October 2024
crawl, median desktop home page: 71 requests, 2,652 KB; images 1,054 KB in 18
requests, JavaScript 613 KB in 24 requests, fonts 131 KB, CSS 78 KB, HTML
18 KB), with the per-response image median of the Web Almanac 2020 "Page
Weight" chapter (JPEG, the most common image format, median 20 KB) and the
share of text responses served compressed from the 2024 chapter (70 % of
home pages use text compression).  benchmarks/README.md cites them and says
which numbers below are ours: the Almanac gives bytes and request counts per
type, not per-response spreads, so each type's sizes are log-normal with the
chapter's mean per request and a spread of our choosing; request counts for
CSS, fonts, HTML and "other" (JSON, beacons) fill the 71 requests; one video
segment per page stands in for the "some video" a proxy sees.

Every body is generated, not sampled from real files: random bytes for
already-compressed formats (images, fonts, video), English-like text for text
types, 70 % of those gzip-encoded.  The draw is seeded, so every run (and
every generator process, and raw YARA) sees the same bodies in the same order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from benchmarks.bodies import Body, KiB, MiB, gzip_body, random_body, text_body

# our text compresses about 3.1 x with gzip level 6 (1 MiB -> 329 KiB): a
# drawn transfer size of a gzip response becomes this many decoded bytes
GZIP_RATIO = 3.1
MIN_SIZE = 64  # bytes on the wire: at least the token and a little
MAX_SIZE = 8 * MiB  # bounds the generator's memory (every process holds the mix)
SEED = 2024
COUNT = 200  # bodies in the mix; requests take them in turn


@dataclass(frozen=True)
class ResponseType:
    """One content type of the mix: how often it is requested and how big it is."""

    name: str
    requests: int  # per median page (of 71)
    mean_bytes: int  # mean transfer size per response
    median_bytes: int  # log-normal median; with the mean it fixes the spread
    content_types: tuple[str, ...]
    text: bool  # English-like text (compressible) or random bytes
    gzip_share: float = 0.0  # of this type's responses sent gzip-encoded

    @property
    def sigma(self) -> float:
        """The log-normal spread whose mean is ``mean_bytes`` at ``median_bytes``:
        mean = median * exp(sigma^2 / 2)."""
        ratio = max(1.0, self.mean_bytes / self.median_bytes)
        return math.sqrt(2 * math.log(ratio))


# Almanac 2024 desktop medians (bytes, requests) where given; see the docstring.
TYPES: tuple[ResponseType, ...] = (
    ResponseType("image", 18, 1_054_000 // 18, 20_000,
                 ("image/jpeg", "image/png", "image/webp", "image/gif"), text=False),
    ResponseType("javascript", 24, 613_000 // 24, 8_000,
                 ("application/javascript", "text/javascript"), text=True, gzip_share=0.7),
    ResponseType("css", 7, 78_000 // 7, 4_000, ("text/css",), text=True, gzip_share=0.7),
    ResponseType("font", 4, 131_000 // 4, 25_000, ("font/woff2",), text=False),
    ResponseType("html", 2, 18_000, 12_000, ("text/html; charset=utf-8",), text=True,
                 gzip_share=0.7),
    ResponseType("other", 15, 2_000, 1_000, ("application/json", "text/plain"), text=True),
    ResponseType("video", 1, 1_500_000, 1_200_000, ("video/mp4",), text=False),
)


@dataclass(frozen=True)
class Draw:
    """One response of the mix, before its body is built."""

    kind: str
    content_type: str
    size: int  # bytes on the wire (drawn transfer size)
    text: bool
    gzip: bool


def draw(count: int = COUNT, seed: int = SEED) -> list[Draw]:
    """``count`` responses: type by request share, size log-normal per type."""
    rng = random.Random(seed)
    weights = [t.requests for t in TYPES]
    out: list[Draw] = []
    for _ in range(count):
        t = rng.choices(TYPES, weights)[0]
        size = round(rng.lognormvariate(math.log(t.median_bytes), t.sigma))
        size = min(MAX_SIZE, max(MIN_SIZE, size))
        gz = t.text and rng.random() < t.gzip_share
        out.append(Draw(t.name, rng.choice(t.content_types), size, t.text, gz))
    return out


def build(d: Draw, seed: int) -> Body:
    """The body of one drawn response (deterministic for a seed)."""
    if d.gzip:
        body = gzip_body(max(MIN_SIZE, round(d.size * GZIP_RATIO)), seed, d.content_type)
    elif d.text:
        body = text_body(d.size, seed, d.content_type)
    else:
        body = random_body(d.size, seed, d.content_type)
    body.name = f"{d.kind}-{body.name}"
    return body


def web_mix(count: int = COUNT, seed: int = SEED) -> list[Body]:
    return [build(d, seed + i) for i, d in enumerate(draw(count, seed))]


def describe(bodies: list[Body]) -> str:
    """A one-line summary: how many, mean wire size, share under 16 KiB, gzip share."""
    n = len(bodies)
    small = sum(1 for b in bodies if b.length < 16 * KiB)
    gz = sum(1 for b in bodies if b.encoding == "gzip")
    mean = sum(b.length for b in bodies) / n
    return (f"{n} bodies, mean {mean / KiB:.1f} KiB on the wire, {small / n:.0%} under 16 KiB, "
            f"{gz / n:.0%} gzip")

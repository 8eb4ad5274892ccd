"""Bodies the benchmark sends: random bytes, text, gzip-encoded text, files.

Every request's body is unique: a fixed-width token (client and sequence
number) is appended, so a server that caches verdicts by content hash cannot
answer from its cache.  The body is built once; per request only the token's
few bytes are new, so the generator never copies a large body.

For gzip the token must be inside the compressed stream: the text is
compressed once and flushed with Z_SYNC_FLUSH (byte aligned, not final), and
each request ends it with a final *stored* deflate block holding the token
plus the gzip trailer (CRC-32 extended over the token, total length).  That
keeps the encoded length fixed, so Content-Length is exact.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.icapwire import TOKEN_LEN

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_WORDS = (
    "the of and to in is was that for on with as by at from his her they this which "
    "be are or an had not but what all were when we there can been has more if will "
    "their would so no who up out about into than them could only other new some time "
    "these two may first then do any like my now over such our man me even most made "
    "after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right "
    "invoice payment account password verify login security update document attached "
    "server request response gateway proxy content policy tenant scan archive network"
).split()


@dataclass
class Body:
    """One scenario's body: ``segments(tok)`` are the wire bytes of a request."""

    name: str
    encoding: str | None  # Content-Encoding on the wire
    prefix: bytes  # wire bytes before the per-request tail
    decoded_prefix_len: int
    _crc: int = field(default=0, repr=False)
    content_type: str = "application/octet-stream"

    @property
    def length(self) -> int:
        """Wire length of every request's body (the token included)."""
        return len(self.prefix) + self.tail_length

    @property
    def decoded_length(self) -> int:
        return self.decoded_prefix_len + TOKEN_LEN

    @property
    def tail_length(self) -> int:
        return TOKEN_LEN + (5 + 8 if self.encoding == "gzip" else 0)

    def tail(self, tok: bytes) -> bytes:
        if self.encoding != "gzip":
            return tok
        crc = zlib.crc32(tok, self._crc)
        size = (self.decoded_prefix_len + len(tok)) & 0xFFFFFFFF
        stored = b"\x01" + struct.pack("<HH", len(tok), len(tok) ^ 0xFFFF) + tok
        return stored + struct.pack("<II", crc, size)

    def segments(self, tok: bytes) -> list[memoryview]:
        return [memoryview(self.prefix), memoryview(self.tail(tok))]

    def wire(self, tok: bytes) -> bytes:
        return self.prefix + self.tail(tok)


def random_body(size: int, seed: int = 1, content_type: str = "application/octet-stream") -> Body:
    """``size`` bytes on the wire: random bytes, the last 32 the unique token."""
    base = random.Random(seed).randbytes(max(0, size - TOKEN_LEN))
    return Body(_size_name(size), None, base, len(base), content_type=content_type)


def text_body(size: int, seed: int = 2, content_type: str = "text/plain") -> Body:
    """``size`` bytes of English-like text on the wire (no Content-Encoding), token included."""
    base = text(max(0, size - TOKEN_LEN), seed)
    return Body(f"text-{_size_name(size)}", None, base, len(base), content_type=content_type)


# The EICAR test string, written as bytes built from hex so that this file is
# not itself flagged by a scanner reading the repository (rules/eicar.yar does the same).
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d24"
    "45494341522d5354414e444152442d414e544956495255532d54455354"
    "2d46494c452124482b482a")


def block_body(size: int, seed: int = 5) -> Body:
    """``size`` bytes of random data with the EICAR test string inside: the bundled
    rules (rules/eicar.yar) match it anywhere, so a scanning server answers its block page."""
    base = bytearray(random.Random(seed).randbytes(max(0, size - TOKEN_LEN)))
    at = max(0, min(len(base) - len(EICAR), len(base) // 2))
    base[at : at + len(EICAR)] = EICAR
    return Body(f"eicar-{_size_name(size)}", None, bytes(base[: max(0, size - TOKEN_LEN)]), len(base))


def text(size: int, seed: int = 2) -> bytes:
    rng = random.Random(seed)
    words = rng.choices(_WORDS, k=size // 4 + 16)
    out = " ".join(words).encode()
    # break into lines so the text looks like text to the rules
    lines = [out[i : i + 79] for i in range(0, len(out), 80)]
    return b"\n".join(lines)[:size]


def gzip_body(decoded_size: int, seed: int = 3, content_type: str = "application/octet-stream"
              ) -> Body:
    """English-like text of ``decoded_size`` bytes (with the token), gzip-encoded."""
    raw = text(max(0, decoded_size - TOKEN_LEN), seed)
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = comp.compress(raw) + comp.flush(zlib.Z_SYNC_FLUSH)
    # 10-byte gzip header: magic, deflate, no flags, mtime 0, xfl 0, OS unknown
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return Body(f"gzip-{_size_name(decoded_size)}", "gzip", header + deflated, len(raw),
                _crc=zlib.crc32(raw), content_type=content_type)


def file_body(path: str | Path) -> Body:
    data = Path(path).read_bytes()
    return Body(f"file:{Path(path).name}", None, data, len(data))



def decode(body: Body, wire: bytes) -> bytes:
    """What a scanner sees: the wire bytes with Content-Encoding undone."""
    if body.encoding == "gzip":
        return zlib.decompress(wire, 31)
    return wire


def _size_name(size: int) -> str:
    for unit, n in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= n and size % n == 0:
            return f"{size // n}{unit}"
    return f"{size}B"


def mean_lengths(bodies: list[Body]) -> tuple[float, float]:
    """Mean wire and decoded length: requests take the bodies in turn."""
    return (sum(b.length for b in bodies) / len(bodies),
            sum(b.decoded_length for b in bodies) / len(bodies))


def bodies_name(bodies: list[Body]) -> str:
    return bodies[0].name if len(bodies) == 1 else f"{len(bodies)} files"


def parse_size(text: str) -> int:
    """``2GiB``, ``64 MiB``, ``1048576``: a byte count for command-line options."""
    units = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in units:
        raise ValueError(f"not a size: {text!r}")
    return int(float(num) * units[unit])

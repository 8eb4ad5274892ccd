"""File types by their magic bytes, not by the Content-Type a server claims.

Used by the ``[scan] skip_types`` policy: an admin may trade coverage for
speed by not scanning, say, video.  The type is read from the body's first
bytes, so a server cannot smuggle an executable past the policy by calling
it ``image/png``; a polyglot that starts as an image can still pass, which is
the trade the admin makes (README, "Scanning less").
"""

from __future__ import annotations

from fnmatch import fnmatchcase

# How many leading bytes sniff() looks at: enough for every signature below.
SNIFF_BYTES = 64

# (offset, magic, type), first match wins: longer, more specific first.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"\x00\x00\x01\x00", "image/x-icon"),
    (0, b"wOFF", "font/woff"),
    (0, b"wOF2", "font/woff2"),
    (0, b"OTTO", "font/otf"),
    (0, b"\x00\x01\x00\x00\x00", "font/ttf"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"Rar!\x1a\x07", "application/x-rar"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"MZ", "application/x-dosexec"),
    (0, b"\x7fELF", "application/x-elf"),
    (0, b"\xca\xfe\xba\xbe", "application/x-java-class"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"\xff\xfb", "audio/mpeg"),
    (0, b"\x00asm", "application/wasm"),
)


def sniff(prefix: bytes) -> str:
    """The type the first bytes show; ``application/octet-stream`` when none."""
    for offset, magic, kind in _MAGIC:
        if prefix[offset : offset + len(magic)] == magic:
            return kind
    if prefix[:4] == b"RIFF" and len(prefix) >= 12:
        return {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}.get(
            prefix[8:12], "application/octet-stream")
    if prefix[4:8] == b"ftyp":
        brand = prefix[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1"):
            return "image/heic"
        return "video/mp4"
    return "application/octet-stream"


def matches(kind: str, patterns: list[str]) -> bool:
    """``image/*`` style patterns, case-insensitive."""
    kind = kind.lower()
    return any(fnmatchcase(kind, p.lower()) for p in patterns)

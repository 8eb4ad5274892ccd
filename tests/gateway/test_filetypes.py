from __future__ import annotations

import pytest

from gateway.scanning.filetypes import matches, sniff


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"GIF89a....", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
        (b"\x00\x00\x00\x1cftypavif", "image/avif"),
        (b"MZ\x90\x00", "application/x-dosexec"),
        (b"\x7fELF\x02", "application/x-elf"),
        (b"PK\x03\x04", "application/zip"),
        (b"%PDF-1.7", "application/pdf"),
        (b"<html>", "application/octet-stream"),
        (b"", "application/octet-stream"),
    ],
)
def test_sniff(prefix: bytes, kind: str) -> None:
    assert sniff(prefix) == kind


def test_patterns() -> None:
    assert matches("image/png", ["image/*"]) and matches("video/mp4", ["VIDEO/MP4"])
    assert not matches("application/x-dosexec", ["image/*", "video/*"])

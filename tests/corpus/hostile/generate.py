"""Write the hostile seed corpus: one file per attack, bytes exactly as sent.

Run ``python -m tests.corpus.hostile.generate`` after changing a case; the
files are committed so that a fuzzer (or a reviewer) can use them as they
are.  What the gateway must answer to each is in ``manifest.toml``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

GET = b"GET http://origin.test/file.txt HTTP/1.1\r\nHost: origin.test\r\n\r\n"
RES = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"


def icap(method: str, service: str, *headers: str, encapsulated: str | None = None) -> bytes:
    lines = [f"{method} icap://gw:1344/{service} ICAP/1.0", "Host: gw", *headers]
    if encapsulated is not None:
        lines.append(f"Encapsulated: {encapsulated}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def reqmod(req_hdr: bytes, *headers: str) -> bytes:
    return icap("REQMOD", "reqmod", *headers, encapsulated=f"req-hdr=0, null-body={len(req_hdr)}") + req_hdr


def respmod(body: bytes, *headers: str, req_hdr: bytes = GET, res_hdr: bytes = RES) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(req_hdr)}, res-body={len(req_hdr) + len(res_hdr)}"
    return icap("RESPMOD", "respmod", *headers, encapsulated=enc) + req_hdr + res_hdr + body


OPTIONS = icap("OPTIONS", "respmod")

CASES: dict[str, bytes] = {
    # The attacks of issue 8.
    "icap-head-space-run.bin": b"OPTIONS icap://h/respmod ICAP/1.0\r\nX: a" + b" " * 65000 + b"a\r\n\r\n",
    "http-head-space-run.bin": reqmod(
        b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\nX: a" + b" " * 250_000 + b"a\r\n\r\n",
        "Allow: 204"),
    "client-ip-bare-cr.bin": reqmod(GET, "Allow: 204", "X-Client-IP: fe80::1%\rX-Evil: 1"),
    "client-ip-3000-chars.bin": reqmod(GET, "Allow: 204", "X-Client-IP: " + "1" * 3000),
    "url-unclosed-ipv6.bin": reqmod(b"GET http://[::1/x HTTP/1.1\r\nHost: x\r\n\r\n", "Allow: 204"),
    "url-bare-lf-into-response-header.bin": respmod(
        b"44\r\nX5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n0\r\n\r\n",
        req_hdr=b"GET http://evil.test/\nX-Evil: 1 HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
    # NUL, CR and LF injection.
    "icap-header-nul.bin": icap("OPTIONS", "respmod", "X-A: a\x00b"),
    "icap-header-bare-lf.bin": icap("OPTIONS", "respmod", "X-A: a\nX-Injected: b"),
    "icap-request-line-bare-cr.bin": b"OPTIONS icap://gw/respmod\r ICAP/1.0\r\n\r\n",
    "http-header-nul.bin": reqmod(b"GET http://o.test/ HTTP/1.1\r\nHost: o.test\r\nX: a\x00b\r\n\r\n", "Allow: 204"),
    "http-status-line-bare-cr.bin": respmod(b"0\r\n\r\n", "Allow: 204", res_hdr=b"HTTP/1.1 200 O\rK\r\n\r\n"),
    "http-header-escape.bin": reqmod(b"GET http://o.test/ HTTP/1.1\r\nHost: o.test\r\nX: \x1b[31m\r\n\r\n"),
    # Bad URLs.
    "url-port-out-of-range.bin": reqmod(b"GET http://o.test:99999/ HTTP/1.1\r\n\r\n", "Allow: 204"),
    "url-host-header-unclosed-ipv6.bin": reqmod(b"GET /x HTTP/1.1\r\nHost: [::1\r\n\r\n", "Allow: 204"),
    "url-too-long.bin": reqmod(b"GET http://o.test/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", "Allow: 204"),
    "http-two-host-headers.bin": reqmod(
        b"GET /x HTTP/1.1\r\nHost: good.test\r\nHost: evil.test\r\n\r\n", "Allow: 204"),
    # Smuggling through Encapsulated offsets and names.
    "encapsulated-offset-inside-block.bin": icap(
        "REQMOD", "reqmod", encapsulated=f"req-hdr=0, null-body={len(GET) - 10}") + GET,
    "encapsulated-offsets-decrease.bin": icap("RESPMOD", "respmod", encapsulated="req-hdr=40, res-hdr=0, res-body=80")
    + GET + RES,
    "encapsulated-duplicate-section.bin": icap(
        "REQMOD", "reqmod", encapsulated=f"req-hdr=0, req-hdr=0, null-body={len(GET)}") + GET,
    "encapsulated-twice.bin": icap("REQMOD", "reqmod", f"Encapsulated: req-hdr=0, null-body={len(GET)}",
                                   encapsulated=f"req-hdr=0, req-body={len(GET)}") + GET + b"0\r\n\r\n",
    "encapsulated-beyond-limit.bin": icap("REQMOD", "reqmod", encapsulated="req-hdr=0, null-body=300000"),
    "encapsulated-negative.bin": icap("REQMOD", "reqmod", encapsulated="req-hdr=0, null-body=-5") + GET,
    "transfer-encoding-space-before-colon.bin": icap("OPTIONS", "respmod", "Transfer-Encoding : chunked"),
    "obs-fold.bin": b"OPTIONS icap://gw/respmod ICAP/1.0\r\nX-A: a\r\n b\r\n\r\n",
    # Chunked framing.
    "chunk-size-huge.bin": respmod(b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n", "Allow: 204"),
    "chunk-size-past-2-62.bin": respmod(b"7fffffffffffffff\r\nabc\r\n0\r\n\r\n", "Allow: 204"),
    "chunk-size-negative.bin": respmod(b"-1\r\nabc\r\n0\r\n\r\n", "Allow: 204"),
    "chunk-extension-flood.bin": respmod(b"3;" + b"x=y;" * 600 + b"\r\nabc\r\n0\r\n\r\n", "Allow: 204"),
    "chunk-data-overrun.bin": respmod(b"3\r\nabcdef\r\n0\r\n\r\n", "Allow: 204"),
    "trailer-flood.bin": respmod(b"3\r\nabc\r\n0\r\n" + b"X-T: " + b"t" * 20000 + b"\r\n\r\n", "Allow: 204"),
    # Preview.
    "preview-negative.bin": respmod(b"0\r\n\r\n", "Allow: 204", "Preview: -1"),
    "preview-garbage.bin": respmod(b"0\r\n\r\n", "Allow: 204", "Preview: 1e3"),
    "preview-huge.bin": respmod(b"0\r\n\r\n", "Allow: 204", "Preview: 99999999999999999"),
    "preview-superscript-digit.bin": respmod(b"0\r\n\r\n", "Allow: 204", "Preview: \xb9"),
    "encapsulated-superscript-digit.bin": icap("REQMOD", "reqmod", encapsulated="req-hdr=0, null-body=\xb2"),
    "preview-overrun.bin": respmod(b"8\r\nabcdefgh\r\n0\r\n\r\n", "Allow: 204", "Preview: 4"),
    # Floods and sizes.
    "icap-header-flood.bin": icap("OPTIONS", "respmod", *(f"X-{i}: y" for i in range(101))),
    "http-header-flood.bin": reqmod(
        b"GET http://o.test/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(257)) + b"\r\n",
        "Allow: 204"),
    "icap-head-without-end.bin": b"OPTIONS icap://gw/respmod ICAP/1.0\r\nX: " + b"a" * 70000,
    "content-disposition-filename-star-flood.bin": respmod(
        b"3\r\nabc\r\n0\r\n\r\n", "Allow: 204",
        res_hdr=b"HTTP/1.1 200 OK\r\nContent-Disposition: attachment" + b"; filename*=" * 15000 + b"\r\n\r\n"),
    # Truncated and garbage.
    "truncated-in-head.bin": b"OPTIONS icap://gw/respmod ICAP/1.0\r\nHost: g",
    "truncated-in-encapsulated.bin": reqmod(GET)[:-10],
    "truncated-in-body.bin": respmod(b"10\r\nabc", "Allow: 204"),
    "http-not-icap.bin": b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n",
    "icap-version-2.bin": b"OPTIONS icap://gw/respmod ICAP/2.0\r\n\r\n",
    "unknown-method.bin": b"PATCH icap://gw/respmod ICAP/1.0\r\n\r\n",
    "unknown-service.bin": icap("OPTIONS", "nosuch"),
    "method-not-for-service.bin": icap("REQMOD", "respmod", encapsulated=f"req-hdr=0, null-body={len(GET)}") + GET,
    "binary-noise.bin": bytes(range(256)) * 4 + b"\r\n\r\n",
    "blank-lines-only.bin": b"\r\n" * 1000,
    "empty.bin": b"",
    "pipelined-options-then-garbage.bin": OPTIONS + b"\x00\xffgarbage\r\n\r\n",
    "pipelined-options-twice-then-truncated.bin": OPTIONS + OPTIONS + b"OPTIONS icap://gw/resp",
}


def main() -> None:
    for name, data in CASES.items():
        (HERE / name).write_bytes(data)
    stale = {p.name for p in HERE.glob("*.bin")} - set(CASES)
    for name in stale:
        (HERE / name).unlink()
    print(f"wrote {len(CASES)} files to {HERE}")


if __name__ == "__main__":
    main()

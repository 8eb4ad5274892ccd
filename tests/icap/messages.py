"""Well-formed ICAP requests as real peers send them (Squid 6 and
c-icap-client, header order and wording kept), for fuzzing by mutation."""

from __future__ import annotations


def _encapsulated(blocks: list[tuple[str, bytes]], body_name: str) -> str:
    entries, offset = [], 0
    for name, block in blocks:
        entries.append(f"{name}={offset}")
        offset += len(block)
    entries.append(f"{body_name}={offset}")
    return ", ".join(entries)


def _message(first: str, headers: list[str], blocks: list[tuple[str, bytes]], body_name: str,
             body: bytes = b"") -> bytes:
    lines = [first, *headers, f"Encapsulated: {_encapsulated(blocks, body_name)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + b"".join(block for _, block in blocks) + body


SQUID_REQ = (
    b"GET http://origin.test:8080/files/report.pdf?x=1 HTTP/1.1\r\n"
    b"User-Agent: curl/8.5.0\r\nAccept: */*\r\nHost: origin.test:8080\r\n"
    b"Via: 1.1 squid (squid/6.6)\r\nX-Forwarded-For: 127.0.0.1\r\nCache-Control: max-age=259200\r\n\r\n"
)
SQUID_POST = (
    b"POST http://origin.test:8080/upload HTTP/1.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
    b"Content-Length: 11\r\nContent-Type: application/x-www-form-urlencoded\r\nHost: origin.test:8080\r\n\r\n"
)
SQUID_RES = (
    b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\nDate: Tue, 01 Dec 2026 04:00:00 GMT\r\n"
    b"Content-Type: application/pdf\r\nContent-Length: 11\r\n"
    b'Content-Disposition: attachment; filename="report.pdf"\r\n\r\n'
)
SQUID_ICAP_HEADERS = [
    "Host: 127.0.0.1:1344",
    "Date: Tue, 01 Dec 2026 04:00:00 GMT",
    "Authorization: Bearer gw_test_0123456789abcdef",
    "X-Client-IP: 127.0.0.1",
    "X-Client-Username: YWxpY2U=",
]

REAL_MESSAGES: dict[str, bytes] = {
    "squid OPTIONS": (
        b"OPTIONS icap://127.0.0.1:1344/respmod ICAP/1.0\r\nHost: 127.0.0.1:1344\r\n"
        b"Date: Tue, 01 Dec 2026 04:00:00 GMT\r\nEncapsulated: null-body=0\r\nAllow: 206\r\n\r\n"
    ),
    "squid REQMOD GET": _message(
        "REQMOD icap://127.0.0.1:1344/reqmod ICAP/1.0", [*SQUID_ICAP_HEADERS, "Allow: 204, trailers"],
        [("req-hdr", SQUID_REQ)], "null-body"),
    "squid REQMOD POST with preview": _message(
        "REQMOD icap://127.0.0.1:1344/reqmod ICAP/1.0",
        [*SQUID_ICAP_HEADERS, "Preview: 4", "Allow: 204, trailers"],
        [("req-hdr", SQUID_POST)], "req-body", b"4\r\nname\r\n0\r\n\r\n7\r\n=value!\r\n0\r\n\r\n"),
    "squid RESPMOD with ieof preview": _message(
        "RESPMOD icap://127.0.0.1:1344/respmod ICAP/1.0",
        [*SQUID_ICAP_HEADERS, "Preview: 1024", "Allow: 204, trailers"],
        [("req-hdr", SQUID_REQ), ("res-hdr", SQUID_RES)], "res-body",
        b"b; ieof\r\nhello world\r\n0; ieof\r\n\r\n"),
    "c-icap-client RESPMOD": _message(
        "RESPMOD icap://127.0.0.1:1344/respmod ICAP/1.0",
        ["Host: 127.0.0.1", "Connection: close", "User-Agent: C-ICAP-Client/x.xx", "Allow: 204",
         "Preview: 4"],
        [("res-hdr", b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 04:00:00 GMT\r\n"
                     b"Content-Length: 68\r\n\r\n")],
        "res-body", b"4\r\nX5O!\r\n0\r\n\r\n40\r\n" + b"P" * 64 + b"\r\n0\r\n\r\n"),
}

"""A small strict reader of ICAP responses, for tests."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass
class ParsedResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    sections: dict[str, bytes]  # encapsulated header blocks by name
    body: bytes | None  # de-chunked, None for null-body


def parse_responses(data: bytes) -> list[ParsedResponse]:
    out = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n\r\n", pos)
        lines = data[pos:end].decode("latin-1").split("\r\n")
        pos = end + 4
        proto, code, *_ = lines[0].split(" ", 2)
        assert proto == "ICAP/1.0", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        if status == 100:
            out.append(ParsedResponse(100, headers, {}, None))
            continue
        entries = [
            (n.strip(), int(o)) for n, o in (e.split("=") for e in headers["encapsulated"].split(","))
        ]
        sections = {}
        for (name, start), (_, stop) in pairwise(entries):
            sections[name] = data[pos + start : pos + stop]
        pos += entries[-1][1]
        body = None
        if entries[-1][0] != "null-body":
            body = bytearray()
            while True:
                line_end = data.index(b"\r\n", pos)
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    assert data[pos : pos + 2] == b"\r\n"
                    pos += 2
                    break
                body += data[pos : pos + size]
                assert data[pos + size : pos + size + 2] == b"\r\n"
                pos += size + 2
            body = bytes(body)
        out.append(ParsedResponse(status, headers, sections, body))
    return out

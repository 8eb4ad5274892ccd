"""The hostile seed corpus (tests/corpus/hostile) driven through a real gateway
process over TCP: each file gets the answers its manifest names, the
connection is closed after an error, and the gateway still answers a normal
OPTIONS on a new connection afterwards."""

from __future__ import annotations

import re
import socket
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import GatewayProcess, gateway_process

pytestmark = pytest.mark.hostile

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "hostile"
MANIFEST: dict[str, dict[str, object]] = tomllib.loads((CORPUS / "manifest.toml").read_text())
# Short stall limits, so the truncated files get their 408 and the silent ones
# their close within a second instead of the production defaults.
STALL_SETTINGS = {"server": {"head_timeout": "1s", "read_timeout": "1s", "idle_timeout": "1s"}}
CASE_DEADLINE = 20.0  # seconds: far above the 1 s stall limits, only a hang reaches it
_STATUS = re.compile(rb"(?m)^ICAP/1\.0 (\d{3}) ")


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    with gateway_process(settings=STALL_SETTINGS) as gw:
        yield gw


def exchange(port: int, data: bytes, *, answers: int, until_close: bool) -> tuple[list[int], bool]:
    """Send ``data``; read until the gateway closes, or (``until_close``
    False) until ``answers`` complete response heads arrived.  Returns the
    statuses seen and whether the gateway closed the connection."""
    received = b""
    closed = False
    deadline = time.monotonic() + CASE_DEADLINE
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_DEADLINE) as sock:
        if data:
            sock.sendall(data)
        while time.monotonic() < deadline:
            statuses = [int(s) for s in _STATUS.findall(received)]
            if not until_close and len(statuses) >= answers and received.endswith(b"\r\n\r\n"):
                break
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return [int(s) for s in _STATUS.findall(received)], closed


def test_manifest_names_every_corpus_file() -> None:
    assert set(MANIFEST) == {p.name for p in CORPUS.glob("*.bin")}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_hostile_message_gets_its_answer(gateway: GatewayProcess, name: str) -> None:
    expect = list(MANIFEST[name]["expect"])  # type: ignore[call-overload]
    must_close = not expect or expect[-1] >= 400
    statuses, closed = exchange(gateway.port, (CORPUS / name).read_bytes(), answers=len(expect),
                                until_close=must_close)
    assert statuses == expect, MANIFEST[name]["why"]
    if must_close:
        assert closed, "the gateway kept the connection open after an error"
    # The gateway survived and serves a new client normally.
    assert gateway.proc.poll() is None, gateway.log()[-2000:]
    options = b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nEncapsulated: null-body=0\r\n\r\n"
    assert exchange(gateway.port, options, answers=1, until_close=False)[0] == [200]


def test_request_then_half_close_is_answered(gateway: GatewayProcess) -> None:
    # A client that shuts down its sending side after the request (nc -N,
    # some health checkers) still gets its answer, then the close.  Was: the
    # end of input dropped the connection with the answer unsent.
    options = b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nEncapsulated: null-body=0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=CASE_DEADLINE) as sock:
        sock.sendall(options)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert [int(s) for s in _STATUS.findall(received)] == [200]

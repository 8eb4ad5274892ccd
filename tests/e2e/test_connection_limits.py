"""Max-Connections holds for the gateway over real sockets and two workers:
idle keep-alive connections make room for a new client."""

from __future__ import annotations

import select
import socket
import subprocess
import time
from contextlib import ExitStack

from tests.peers import gateway_process

OPTIONS = b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nEncapsulated: null-body=0\r\n\r\n"


def _options(sock: socket.socket) -> bytes:
    """Send OPTIONS and read its (bodyless) answer's head."""
    sock.sendall(OPTIONS)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _closed_by_server(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server closed (readable at EOF)."""
    _, _, _ = select.select([], [], [], 0.5)  # let the closes arrive
    readable, _, _ = select.select(socks, [], [], 0)
    closed = 0
    for sock in readable:
        try:
            closed += sock.recv(1) == b""
        except ConnectionResetError:
            closed += 1
    return closed


def test_new_client_is_served_when_idle_connections_fill_the_gateway() -> None:
    with gateway_process(settings={"server": {"workers": 2, "max_connections": 50}}) as gw, ExitStack() as stack:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True).stdout.split()
            if len(kids) == 2:
                break
            time.sleep(0.1)
        idle = []
        for _ in range(60):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", gw.port), timeout=10))
            assert _options(sock).startswith(b"ICAP/1.0 200")  # served, then idle
            idle.append(sock)
        newcomer = stack.enter_context(socket.create_connection(("127.0.0.1", gw.port), timeout=10))
        answer = _options(newcomer)
        assert answer.startswith(b"ICAP/1.0 200"), answer[:200]
        assert b"Max-Connections: 50\r\n" in answer
        still_open = len(idle) - _closed_by_server(idle)
        # 61 connections against a gateway-wide limit of 50 (each worker
        # counting alone would have allowed 100): the longest idle were closed.
        assert still_open + 1 <= 50, still_open

"""Memory and CPU of a server's whole process tree, read from /proc.

c-icap and a multi-worker gateway are several processes: every figure here is
summed over the tree (the process and all its descendants, found through
``/proc/PID/task/TID/children``).  Peak RSS is sampled (sum of VmRSS, the
largest seen); the kernel's own peak (VmHWM) is reset before a scenario
through ``clear_refs`` so it covers that scenario only.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return sum(_status_kib(p, "VmRSS") for p in tree(pid))


def pss_kib(pid: int) -> int:
    """Proportional set size of the tree: shared pages (libraries, a forked
    parent's memory) counted once across processes, unlike summed RSS."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total


def anon_kib(pid: int) -> int:
    """Anonymous RSS of the tree: heap and buffers, without mapped files
    (YARA maps a spooled body to scan it; those pages are page cache)."""
    return sum(_status_kib(p, "RssAnon") for p in tree(pid))


def hwm_kib(pid: int) -> int:
    return sum(_status_kib(p, "VmHWM") for p in tree(pid))


def reset_hwm(pid: int) -> None:
    for p in tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass  # not ours, or an old kernel: the sampled peak still holds


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (user, system, irq, softirq, steal).

    On loopback much of a request's cost is kernel network processing that no
    process is charged for; this shows it, and shows other work on the machine.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # guest time is already counted in user
    return busy / CLK_TCK


def connection_owners(pid: int, port: int) -> tuple[dict[int, int], list[int]]:
    """Which process of the tree holds each established connection on local ``port``.

    Returns (peer port -> process id, every process of the tree): from the
    peer's (the generator's) side of a connection this names the worker that
    serves it.  A socket held by two processes (inherited) goes to the last seen.
    """
    peer_of: dict[str, int] = {}  # socket inode -> the peer's port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            # local and remote "HEX_IP:HEX_PORT", state 01 = ESTABLISHED, inode field 9
            if len(f) > 9 and f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) == port:
                peer_of[f[9]] = int(f[2].rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    processes = tree(pid)
    for p in processes:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in peer_of:
                    owners[peer_of[target[8:-1]]] = p
        except OSError:
            continue
    return owners, processes


def connections_per_process(pid: int, port: int) -> dict[int, int]:
    """Established TCP connections on local ``port`` held by each process of the tree.

    Shows whether a multi-process server spreads its clients over its workers.
    """
    return count_per_process(*connection_owners(pid, port))


def count_per_process(owners: dict[int, int], processes: list[int]) -> dict[int, int]:
    """Connections per process (every process of the tree, 0 for those without)."""
    out = dict.fromkeys(processes, 0)
    for p in owners.values():
        out[p] = out.get(p, 0) + 1
    return out


def requests_per_process(owners: dict[int, int], per_port: dict[int, int]) -> tuple[dict[int, int], int]:
    """Requests each server process served, from the requests completed on each
    client port and the process holding that connection; and how many requests
    went over connections no process was seen holding (opened after the sample)."""
    out: dict[int, int] = {}
    unknown = 0
    for client_port, n in per_port.items():
        p = owners.get(client_port)
        if p is None:
            unknown += n
        else:
            out[p] = out.get(p, 0) + n
    return out, unknown


@dataclass
class TreeUsage:
    rss_start_kib: int = 0  # before the load started
    rss_peak_kib: int = 0  # largest sampled sum of VmRSS
    hwm_kib: int = 0  # sum of VmHWM after the scenario (reset before it)
    rss_end_kib: int = 0
    cpu: float = 0.0  # CPU seconds of the tree inside the measurement window
    machine_cpu: float = 0.0  # CPU seconds the whole machine was busy inside the window
    connections: dict[int, int] | None = None  # per process, sampled mid-window
    owners: dict[int, int] | None = None  # client port -> server process, sampled mid-window

    @property
    def peak_mib(self) -> float:
        return max(self.rss_peak_kib, self.hwm_kib) / 1024

    @property
    def growth_mib(self) -> float:
        return (max(self.rss_peak_kib, self.hwm_kib) - self.rss_start_kib) / 1024


class Sampler:
    """Watch a process tree while a load runs: call ``during(lo, hi)`` from the
    parent; it samples RSS every ``interval`` and takes CPU at lo and hi."""

    def __init__(self, pid: int | None, interval: float = 0.05, port: int | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.port = port
        self.usage = TreeUsage()

    def begin(self) -> None:
        if self.pid is None:
            return
        reset_hwm(self.pid)
        self.usage.rss_start_kib = rss_kib(self.pid)
        self.usage.rss_peak_kib = self.usage.rss_start_kib

    def during(self, lo: float, hi: float) -> None:
        if self.pid is None:
            return
        cpu0: float | None = None
        busy0 = 0.0
        while True:
            now = time.monotonic()
            if cpu0 is None and now >= lo:
                cpu0 = cpu_seconds(self.pid)
                busy0 = machine_busy_seconds()
            if now >= hi:
                break
            if self.port and self.usage.connections is None and now >= (lo + hi) / 2:
                owners, processes = connection_owners(self.pid, self.port)
                self.usage.owners = owners
                self.usage.connections = count_per_process(owners, processes)
            self.usage.rss_peak_kib = max(self.usage.rss_peak_kib, rss_kib(self.pid))
            time.sleep(min(self.interval, max(0.0, hi - now)))
        self.usage.cpu = cpu_seconds(self.pid) - (cpu0 or 0.0)
        self.usage.machine_cpu = machine_busy_seconds() - busy0

    def end(self) -> TreeUsage:
        if self.pid is not None:
            self.usage.rss_peak_kib = max(self.usage.rss_peak_kib, rss_kib(self.pid))
            self.usage.hwm_kib = hwm_kib(self.pid)
            self.usage.rss_end_kib = rss_kib(self.pid)
        return self.usage


class BackgroundSampler:
    """Sample a tree's RSS in a thread until stopped (for streaming scenarios)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = rss_kib(pid)
        self.anon_peak_kib = anon_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
            self.anon_peak_kib = max(self.anon_peak_kib, anon_kib(self.pid))

    def __enter__(self) -> BackgroundSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

"""What sanitising costs, typical and worst case: µs per call.

    .venv/bin/python benchmarks/sanitise_cost.py

Each function of ``gateway.sanitise`` cuts its input to the limit before it
looks at it, so a hostile megabyte costs what a value at the limit costs;
``header_safe`` (the final check, not cut) is linear: the figures for 64 KiB
and 1 MiB show it.  Prints best of three; a few seconds in all.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.metrics_cost import measure
from gateway import sanitise
from register.users import canonical_ip, decode_username


def main() -> None:
    typical_url = "http://example.com/dl/file.exe?x=1"
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("url(): typical URL, cap 4096", lambda: sanitise.url(typical_url, 4096), 100_000),
        ("url(): 1 MiB of LF, cap 4096", lambda: sanitise.url("\n" * 2**20, 4096), 200),
        ("text(): typical detail, cap 512", lambda: sanitise.text("timeout", 512), 100_000),
        ("text(): 1 MiB of NUL, cap 512", lambda: sanitise.text("\x00" * 2**20, 512), 2000),
        ("header_safe(): 64 KiB of spaces", lambda: sanitise.header_safe(" " * 2**16), 200),
        ("header_safe(): 1 MiB of spaces", lambda: sanitise.header_safe(" " * 2**20), 20),
        ("canonical_ip(): 2001:db8::1", lambda: canonical_ip("2001:db8::1"), 100_000),
        ("canonical_ip(): 1 MiB value", lambda: canonical_ip("1" * 2**20), 200),
        ("decode_username(): 1 MiB base64", lambda: decode_username("QUFB" * 2**18, "base64"), 200),
    ]
    for name, fn, calls in cases:
        print(f"{name:<40} {measure(fn, calls) / 1000:>10,.2f} µs/call")


if __name__ == "__main__":
    main()

"""What the late-block memory and the block page's language choice cost on
the request path: ns per call, against parsing the same encapsulated HTTP
request head (which every REQMOD/RESPMOD pays already), in the same run.

    .venv/bin/python benchmarks/lateblock_cost.py [--calls N]

Single-threaded, bounded (default 100 000 calls per case: a few seconds).
"""

from __future__ import annotations

import argparse

from benchmarks.metrics_cost import measure
from gateway.blockpage import ACCEPT_LANGUAGE_MAX, BlockPage, choose_language
from gateway.icap.http import parse_request_head
from gateway.interfaces import Verdict
from gateway.lateblock import LateBlockMemory

HEAD = (b"GET http://example.com/download/file.bin?session=abc HTTP/1.1\r\nHost: example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        b"Accept: */*\r\nAccept-Language: fi-FI,fi;q=0.9,en-US;q=0.8,en;q=0.7\r\n\r\n")
URL = "http://example.com/download/file.bin?session=abc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    n = args.calls

    empty = LateBlockMemory(ttl=600, max_entries=10_000, clock=lambda: 1.0)
    full = LateBlockMemory(ttl=600, max_entries=10_000, clock=lambda: 1.0)
    bad = Verdict("blocked", rules=("sig.Eicar",))
    for i in range(10_000):
        full.remember(1, f"http://example.com/dl/{i}", bad)
    full.remember(1, URL, bad)
    hostile = ("x-" * (ACCEPT_LANGUAGE_MAX // 2))[:ACCEPT_LANGUAGE_MAX] + ",fi"
    many = ",".join(["de;q=0.5"] * 200)
    page = BlockPage()

    baseline = measure(lambda: parse_request_head(HEAD), n)
    rows = [
        ("recall, empty memory (the usual case)", measure(lambda: empty.recall(1, URL), n)),
        ("recall, miss in 10,000 entries", measure(lambda: full.recall(1, URL + "x"), n)),
        ("recall, hit in 10,000 entries", measure(lambda: full.recall(1, URL), n)),
        ("choose_language, a browser's header", measure(
            lambda: choose_language("fi-FI,fi;q=0.9,en-US;q=0.8,en;q=0.7"), n)),
        (f"choose_language, {ACCEPT_LANGUAGE_MAX}+ chars of junk", measure(lambda: choose_language(hostile), n)),
        ("choose_language, 200 entries", measure(lambda: choose_language(many), n)),
        ("render the Finnish block page", measure(lambda: page.render(
            url=URL, rules=["sig.Eicar"], reference="0123456789ab", accept_language="fi",
            support_contact="Helpdesk 010 123 4567"), n // 10)),
    ]
    print(f"{'case':45} {'ns/call':>10} {'x head parse':>13}")
    print(f"{'baseline: parse the HTTP request head':45} {baseline:10.0f} {1:13.2f}")
    for name, ns in rows:
        print(f"{name:45} {ns:10.0f} {ns / baseline:13.2f}")


if __name__ == "__main__":
    main()

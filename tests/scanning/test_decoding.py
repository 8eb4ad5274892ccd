"""The streaming decoders: correctness at any read size, errors, bounded memory."""

from __future__ import annotations

import gzip
import io
import os
import tracemalloc
import zlib

import brotli
import pytest
import zstandard

from gateway.scanning.decoding import (
    BLOCK,
    MAX_CODINGS,
    BytesSource,
    DecodeError,
    DecodeTimeout,
    decode_into,
    decoder_chain,
    parse_encodings,
)

TEXT = b"".join(b"line %d of some ordinary text\n" % i for i in range(5000))
DATA = TEXT + os.urandom(100_000) + TEXT


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODE = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": lambda data: brotli.compress(data, quality=5),
    "zstd": zstandard.ZstdCompressor().compress,
}


def read_all(stream: object, n: int) -> bytes:
    out = bytearray()
    while chunk := stream.read(n):  # type: ignore[attr-defined]
        assert len(chunk) <= n
        out += chunk
    return bytes(out)


def test_parse_encodings() -> None:
    assert parse_encodings("") == []
    assert parse_encodings("identity") == []
    assert parse_encodings(" GZIP , br,, identity ,zstd") == ["gzip", "br", "zstd"]
    assert parse_encodings("x-gzip") == ["gzip"]


@pytest.mark.parametrize("coding", sorted(ENCODE))
@pytest.mark.parametrize("n", [1, 7, 65536])
def test_roundtrip_at_any_read_size(coding: str, n: int) -> None:
    data = DATA if n > 1 else DATA[:20_000]  # byte-at-a-time is slow in Python
    stream = decoder_chain(BytesSource(ENCODE[coding](data)), [coding])
    assert read_all(stream, n) == data


def test_raw_deflate_and_stacks() -> None:
    assert read_all(decoder_chain(BytesSource(raw_deflate(DATA)), ["deflate"]), 4096) == DATA
    body = DATA
    codings = ["deflate", "zstd", "gzip", "br"]
    for c in codings:
        body = ENCODE[c](body)
    assert read_all(decoder_chain(BytesSource(body), codings), 1000) == DATA


def test_several_members_and_frames() -> None:
    gz = gzip.compress(b"one ") + gzip.compress(b"two")
    assert read_all(decoder_chain(BytesSource(gz), ["gzip"]), 3) == b"one two"
    z = ENCODE["zstd"](b"one ") + ENCODE["zstd"](b"two")
    assert read_all(decoder_chain(BytesSource(z), ["zstd"]), 3) == b"one two"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
@pytest.mark.parametrize("n", [1, 7, 100])
def test_trailing_data_is_passed_through_and_counted(coding: str, n: int) -> None:
    # Was ignored (as gzip(1) and browsers do): then nothing scanned it.
    junk = b"\n<!-- junk -->"
    body = ENCODE[coding](b"payload") + junk
    assert read_all(decoder_chain(BytesSource(body), [coding]), n) == b"payload" + junk
    out = bytearray()
    result = decode_into(body, [coding], out.extend, limit=100)
    assert (bytes(out), result.trailing, result.error, result.exceeded) == (b"payload" + junk, len(junk), "", False)


def test_trailing_data_larger_than_a_read_block() -> None:
    junk = os.urandom(3 * BLOCK + 5)
    out = bytearray()
    result = decode_into(gzip.compress(TEXT) + junk, ["gzip"], out.extend, limit=10**9)
    assert bytes(out) == TEXT + junk
    assert result.trailing == len(junk)


def test_trailing_data_of_an_inner_coding_is_passed_through_the_outer() -> None:
    # "Content-Encoding: gzip, zstd": the gzip stream's tail is inside the zstd frame.
    inner = gzip.compress(b"payload") + b"TAIL"
    body = ENCODE["zstd"](inner)
    out = bytearray()
    result = decode_into(body, ["gzip", "zstd"], out.extend, limit=100)
    assert (bytes(out), result.trailing) == (b"payload" + b"TAIL", 4)


def test_no_trailing_data_on_a_clean_stream() -> None:
    for coding, encode in ENCODE.items():
        result = decode_into(encode(DATA), [coding], lambda b: None, limit=10**9)
        assert (result.trailing, result.error) == (0, ""), coding


def test_brotli_trailing_garbage_is_an_error() -> None:
    # The brotli decoder refuses input past the end of the stream (so do browsers).
    result = decode_into(brotli.compress(b"payload") + b"junk", ["br"], lambda b: None, limit=100)
    assert result.error.startswith("br:")


def test_brotli_trailing_data_after_a_stream_that_ends_on_a_read_boundary() -> None:
    # The old decoder stopped at is_finished() and ignored the rest unread.
    payload = os.urandom(BLOCK)
    encoded = brotli.compress(payload, quality=0)
    cut = len(encoded) - BLOCK
    assert cut > 0
    # Random bytes are stored uncompressed: trim the payload until the stream
    # is exactly one read block long.
    for size in range(BLOCK - cut - 64, BLOCK - cut + 64):
        encoded = brotli.compress(payload[:size], quality=0)
        if len(encoded) == BLOCK:
            break
    assert len(encoded) == BLOCK
    out = bytearray()
    result = decode_into(encoded + b"junk", ["br"], out.extend, limit=10**9)
    assert (result.trailing, result.error) == (4, "")
    assert bytes(out) == payload[:size] + b"junk"


@pytest.mark.parametrize("coding", sorted(ENCODE))
def test_truncation_is_an_error_after_the_decodable_prefix(coding: str) -> None:
    data = os.urandom(300_000)
    body = ENCODE[coding](data)
    out = bytearray()
    result = decode_into(body[: len(body) * 2 // 3], [coding], out.extend, limit=10**9)
    assert result.error, result
    assert not result.exceeded
    assert result.size == len(out)
    assert data.startswith(bytes(out))
    assert len(out) > 0 or coding == "zstd"  # zstd emits whole blocks only


def test_corrupt_and_unknown() -> None:
    with pytest.raises(DecodeError, match="gzip"):
        read_all(decoder_chain(BytesSource(b"not gzip at all"), ["gzip"]), 100)
    with pytest.raises(DecodeError, match="unsupported content-coding 'lzma'"):
        decoder_chain(BytesSource(b""), ["lzma"])
    result = decode_into(b"\x28\xb5\x2f\xfdgarbage", ["zstd"], lambda b: None, limit=100)
    assert result.error.startswith("zstd")


def test_a_deep_stack_of_codings_is_corrupt_not_a_recursion_error() -> None:
    # "gzip, gzip, ..." a thousand times nested a thousand decoders: RecursionError.
    result = decode_into(b"hello", ["gzip"] * 1000, lambda b: None, limit=100)
    assert (result.size, result.error) == (0, f"1000 content-codings (at most {MAX_CODINGS})")
    nested = b"payload"
    for _ in range(MAX_CODINGS):
        nested = gzip.compress(nested)
    out = bytearray()
    assert decode_into(nested, ["gzip"] * MAX_CODINGS, out.extend, limit=100).error == ""
    assert out == b"payload"


def test_limit_exact_and_exceeded() -> None:
    body = gzip.compress(b"x" * 1000)
    out = bytearray()
    assert decode_into(body, ["gzip"], out.extend, limit=1000).exceeded is False
    assert len(out) == 1000
    out.clear()
    result = decode_into(body, ["gzip"], out.extend, limit=999)
    assert (result.exceeded, result.size, len(out)) == (True, 999, 999)


def test_decode_from_file_object() -> None:
    out = bytearray()
    decode_into(io.BytesIO(ENCODE["br"](DATA)), ["br"], out.extend, limit=10**9)
    assert out == DATA


def test_deadline() -> None:
    ticks = iter([0.0, 0.5, 2.0, 3.0])
    with pytest.raises(DecodeTimeout):
        decode_into(gzip.compress(os.urandom(500_000)), ["gzip"], lambda b: None, limit=10**9,
                    deadline=1.0, clock=lambda: next(ticks))


def _gzip_bomb(gib: float) -> bytes:
    member = gzip.compress(bytes(1024**2), 9)  # 1 MiB of zeros in ~1 KiB
    return member * int(gib * 1024)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_bomb_memory_stays_flat(coding: str) -> None:
    if coding == "gzip":
        bomb = _gzip_bomb(1)  # 1 GiB from ~1 MiB
    elif coding == "br":
        bomb = brotli.compress(bytes(128 * 1024**2), quality=1)
    else:
        bomb = zstandard.ZstdCompressor(level=1).compress(bytes(128 * 1024**2))
    seen = 0

    def discard(chunk: bytes) -> None:
        nonlocal seen
        seen += len(chunk)

    tracemalloc.start()
    try:
        result = decode_into(bomb, [coding], discard, limit=64 * 1024**2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exceeded and seen == 64 * 1024**2
    # The whole point: a 64 MiB (or 1 GiB) expansion never sits in memory.
    assert peak < 10 * 1024**2, f"peak {peak} bytes"

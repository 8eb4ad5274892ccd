"""Streaming Content-Encoding decoders, bounded against decompression bombs.

Runs in a scanning thread, never on the reactor: decoding is CPU work.  Each
decoder is a pull stream (``read(n) -> bytes``, ``b""`` only at the end) over
the stream below it, so stacked encodings ("gzip, br") chain naturally and no
stage ever holds more than about one block of output: a bomb is stopped after
``limit`` bytes whatever its ratio, without ever being inflated in memory.

Corrupt or truncated input raises :class:`DecodeError` *after* every byte that
could be decoded has been returned, so the caller can still scan that prefix.

Bytes after the end of an encoded stream (that do not start another gzip
member or zstd frame) are not ignored, as gzip(1) and browsers ignore them:
the decoder passes them through verbatim after its decoded output and counts
them in ``trailing``, so the scanner matches them too (a hostile server could
otherwise hide a payload there for a client that reads the raw body) and the
verdict can say "trailing-data".
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import brotli
import zstandard

BLOCK = 64 * 1024
# RFC 9659: HTTP zstd senders keep the window at 8 MiB or less; refusing
# bigger windows bounds the decoder's own memory, whatever the frame claims.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
# zstd's decompressobj has no output limit, and one 4-byte RLE block expands
# to 128 KiB: feeding it 128 bytes at a time caps one call's output at 4 MiB
# (measured peak on a bomb: 8 MiB) and still decodes about 90 MB/s of
# incompressible input.  (stream_reader's output is bounded, but it reports a
# truncated frame as a clean end: a cut-off body would pass as complete.)
ZSTD_FEED = 128

# Content-Encoding stacks more codings than anyone applies ("gzip, br" is
# rare already): each is a decoder nested in the next, and a header listing
# thousands would exhaust Python's recursion in read().  More is corrupt.
MAX_CODINGS = 8

# The content-codings the decoders undo (x-gzip is read as gzip).
KNOWN_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# RFC 8878 section 3.1.2: a skippable frame's magic is 0x184D2A5? (little
# endian).  Decoders skip it and go on with the next frame, so it is a frame
# too, not the start of trailing data: taking it for one left a zstd frame
# after it undecoded (a payload a browser decodes, scanned compressed).
_ZSTD_SKIPPABLE_MAGIC_TAIL = b"\x2a\x4d\x18"


def _starts_zstd_frame(data: bytes) -> bool:
    """Whether ``data`` starts a zstd frame, data or skippable."""
    return data.startswith(_ZSTD_MAGIC) or (
        len(data) >= 4 and data[0] & 0xF0 == 0x50 and data[1:4] == _ZSTD_SKIPPABLE_MAGIC_TAIL)


class DecodeError(Exception):
    """The body is not what its Content-Encoding says (corrupt, truncated, unknown)."""


class DecodeTimeout(Exception):
    """Decoding ran past the scan's deadline."""


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


def parse_encodings(header: str) -> list[str]:
    """The codings of a Content-Encoding value, in the order they were applied.

    ``identity`` and empty items mean nothing; ``x-gzip`` is ``gzip`` (RFC 9110).
    """
    codings = []
    for item in header.split(","):
        token = item.strip().lower()
        if token in ("", "identity"):
            continue
        codings.append("gzip" if token == "x-gzip" else token)
    return codings


class BytesSource:
    """A pull stream over bytes in memory, without copying them up front."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int, /) -> bytes:
        chunk = self._view[self._pos : self._pos + n]
        self._pos += len(chunk)
        return bytes(chunk)


class _Decoder:
    """Base: buffers what ``_produce`` makes so ``read(n)`` never returns more than n."""

    name = ""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner
        self._buf = b""
        self._pos = 0  # read offset in _buf: slicing off the rest would copy it each time
        self._done = False
        self.trailing = 0  # bytes after the end of the stream, passed through verbatim
        self._in_tail = False
        self._tail = b""  # trailing input read ahead, not yet passed through

    def read(self, n: int, /) -> bytes:
        while self._pos >= len(self._buf) and not self._done:
            self._buf, self._pos = self._produce(n), 0
        if self._pos == 0 and len(self._buf) <= n:
            out, self._buf = self._buf, b""
            return out
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _produce(self, n: int) -> bytes:  # b"" means "call again" unless _done is set
        raise NotImplementedError

    def _more(self) -> bytes:
        return self._inner.read(BLOCK)

    def _begin_tail(self, read_ahead: bytes) -> bytes:
        """The stream has ended and ``read_ahead`` (not empty) follows it:
        from here on the input is output, unchanged."""
        self._in_tail, self._tail = True, read_ahead
        return self._pass_through()

    def _pass_through(self) -> bytes:
        out, self._tail = self._tail or self._more(), b""
        if not out:
            self._done = True
        self.trailing += len(out)
        return out


class _ZlibDecoder(_Decoder):
    """gzip (several members allowed) and deflate (zlib-wrapped or raw, as
    servers disagree about what "deflate" means: sniff the zlib header)."""

    def __init__(self, inner: Readable, coding: str) -> None:
        super().__init__(inner)
        self.name = coding
        self._obj: zlib._Decompress | None = None
        self._pending = b""  # compressed input not yet given to zlib

    def _start(self) -> bool:
        """Begin a (new) stream at ``_pending``; False at a clean end of input."""
        need = 2
        while len(self._pending) < need:
            more = self._more()
            if not more:
                break
            self._pending += more
        if not self._pending:
            return False
        if self._obj is not None and (self.name != "gzip" or not self._pending.startswith(_GZIP_MAGIC)):
            return False  # not another gzip member: trailing data (see _produce)
        if self.name == "gzip":
            wbits = 31
        else:
            b0, b1 = self._pending[0], self._pending[1] if len(self._pending) > 1 else 0
            wbits = 15 if (b0 & 0x0F) == 8 and ((b0 << 8) | b1) % 31 == 0 else -15
        self._obj = zlib.decompressobj(wbits)
        return True

    def _produce(self, n: int) -> bytes:
        if self._in_tail:
            return self._pass_through()
        obj = self._obj
        if obj is None or obj.eof:
            if obj is not None:
                self._pending = obj.unused_data + self._pending
            if not self._start():
                if self._pending:
                    rest, self._pending = self._pending, b""
                    return self._begin_tail(rest)
                self._done = True
                return b""
            obj = self._obj
            assert obj is not None
        if obj.unconsumed_tail:
            data = obj.unconsumed_tail
        elif self._pending:
            data, self._pending = self._pending, b""
        else:
            data = self._more()
            if not data:
                # Inflate may have read all its input and still hold output
                # it had no room for (the rest of a match): a raw deflate
                # stream has no trailer left unread to show it.  Ask for it
                # before calling the stream truncated (a valid body blocked).
                try:
                    out = obj.decompress(b"", n)
                except zlib.error as e:
                    self._done = True
                    raise DecodeError(f"{self.name}: {e}") from None
                if out or obj.eof:
                    return out
                self._done = True
                raise DecodeError(f"{self.name}: truncated stream")
        try:
            return obj.decompress(data, n)
        except zlib.error as e:
            self._done = True
            raise DecodeError(f"{self.name}: {e}") from None


class _BrotliDecoder(_Decoder):
    """``output_buffer_limit`` (brotli >= 1.2) bounds each call's output; what
    is left comes from further calls with no input, until one returns nothing."""

    name = "br"

    def __init__(self, inner: Readable) -> None:
        super().__init__(inner)
        self._obj = brotli.Decompressor()
        self._draining = False

    def _produce(self, n: int) -> bytes:
        if self._in_tail:
            return self._pass_through()
        obj = self._obj
        try:
            if self._draining or not obj.can_accept_more_data():
                out: bytes = obj.process(b"", output_buffer_limit=n)
                if out:
                    return out
                self._draining = False
            if obj.is_finished():
                # The stream ended at the end of a read: what follows is
                # trailing data.  (Trailing data in the same read makes the
                # brotli library fail, and it cannot say where its stream
                # ended: that reads as a corrupt encoding, as browsers see it.)
                rest = self._more()
                if rest:
                    return self._begin_tail(rest)
                self._done = True
                return b""
            data = self._more()
            if not data:
                self._done = True
                raise DecodeError("br: truncated stream")
            self._draining = True
            decoded: bytes = obj.process(data, output_buffer_limit=n)
            return decoded
        except brotli.error as e:
            self._done = True
            raise DecodeError(f"br: {e}") from None


class _ZstdDecoder(_Decoder):
    name = "zstd"

    def __init__(self, inner: Readable) -> None:
        super().__init__(inner)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._pending = b""

    def _produce(self, n: int) -> bytes:
        if self._in_tail:
            return self._pass_through()
        obj = self._obj
        if obj is None or obj.eof:
            if obj is not None:
                self._pending = obj.unused_data + self._pending
            while len(self._pending) < 4:
                more = self._more()
                if not more:
                    break
                self._pending += more
            if not self._pending:
                self._done = True  # a clean end
                return b""
            if obj is not None and not _starts_zstd_frame(self._pending):
                rest, self._pending = self._pending, b""
                return self._begin_tail(rest)  # not another frame: trailing data
            obj = self._obj = self._dctx.decompressobj()
        if not self._pending:
            self._pending = self._more()
            if not self._pending:
                self._done = True
                raise DecodeError("zstd: truncated stream")
        data, self._pending = self._pending[:ZSTD_FEED], self._pending[ZSTD_FEED:]
        try:
            return obj.decompress(data)
        except zstandard.ZstdError as e:
            self._done = True
            raise DecodeError(f"zstd: {e}") from None


def decoder_chain(source: Readable, codings: list[str]) -> Readable:
    """Stack decoders over ``source``: the last coding applied is undone first."""
    return _decoder_layers(source, codings)[-1] if codings else source


def _decoder_layers(source: Readable, codings: list[str]) -> list[_Decoder]:
    if len(codings) > MAX_CODINGS:
        raise DecodeError(f"{len(codings)} content-codings (at most {MAX_CODINGS})")
    layers: list[_Decoder] = []
    stream = source
    for coding in reversed(codings):
        if coding in ("gzip", "deflate"):
            layer: _Decoder = _ZlibDecoder(stream, coding)
        elif coding == "br":
            layer = _BrotliDecoder(stream)
        elif coding == "zstd":
            layer = _ZstdDecoder(stream)
        else:
            raise DecodeError(f"unsupported content-coding {coding!r}")
        layers.append(layer)
        stream = layer
    return layers


@dataclass
class DecodeResult:
    size: int  # decoded bytes written to the sink
    exceeded: bool  # more output was there past ``limit`` (not decoded further)
    error: str = ""  # why decoding stopped early ("" when it completed)
    trailing: int = 0  # bytes found after the end of an encoded stream (passed through, any layer)


def decode_into(
    source: bytes | BinaryIO,
    codings: list[str],
    write: Callable[[bytes], None],
    *,
    limit: int,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DecodeResult:
    """Decode ``source`` and pass at most ``limit`` decoded bytes to ``write``.

    Never raises DecodeError: a corrupt stream ends the output where the
    damage starts and is reported in ``error``.  Raises DecodeTimeout when
    ``deadline`` (on ``clock``) passes.
    """
    src: Readable = BytesSource(source) if isinstance(source, bytes | bytearray) else source
    written = 0
    layers: list[_Decoder] = []

    def trailing() -> int:
        return sum(layer.trailing for layer in layers)

    try:
        layers = _decoder_layers(src, codings)
        stream: Readable = layers[-1] if layers else src
        while True:
            if deadline is not None and clock() > deadline:
                raise DecodeTimeout()
            # One byte past the limit tells "exactly at the limit" from "over it".
            chunk = stream.read(min(BLOCK, limit - written + 1))
            if not chunk:
                return DecodeResult(written, exceeded=False, trailing=trailing())
            if written + len(chunk) > limit:
                write(chunk[: limit - written])
                return DecodeResult(limit, exceeded=True, trailing=trailing())
            write(chunk)
            written += len(chunk)
    except DecodeError as e:
        return DecodeResult(written, exceeded=False, error=str(e), trailing=trailing())

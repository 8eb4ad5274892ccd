"""Bodies held in memory while small, in a temporary file once they grow.

The ICAP protocol feeds a :class:`BodySpool` chunk by chunk as the body
arrives, hands ``scan_target()`` to the scanner (bytes, or the file's path,
which YARA maps itself) and, for a 200 echo, streams the raw body back out
with ``iter_chunks()``.  Memory stays flat at ``memory_threshold`` whatever
the body's size.

Writes happen on the reactor thread.  That is acceptable because they are
``write(2)`` calls into the page cache of a local spool directory: they copy
memory and return, the kernel writes back later; a body never waits for the
disk unless the machine is out of dirty-page budget, and then the whole box is
in trouble anyway.  Handing each 64 KiB chunk to a thread would cost more than
the copy.  (Keep ``state_dir`` on a local disk or tmpfs, not NFS.)
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Spool files carry the creating process's id, so a restarted worker can
# remove what a crashed one left behind without touching its siblings' files.
PREFIXES = ("body-", "decoded-")
_NAME = re.compile(r"^(?:body|decoded)-(\d+)-")


# A write at least this large is kept as its own piece; smaller ones are
# gathered into a shared buffer.  Twisted reads up to 64 KiB, so a body's
# pieces are mostly reads; the per-piece overhead stays under 1 %.
_OWN_PIECE = 16 * 1024


class MemoryBudget:
    """Body bytes one worker may hold in memory, over all its spools.

    Each spool takes from it what it keeps in memory and gives it back when
    it moves to a file or is closed; a spool that cannot take a write goes to
    disk at once.  Body memory per worker is then at most ``limit``, however
    many bodies arrive together.  Used on the reactor thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


def open_spool_file(spool_dir: Path, prefix: str = "body-") -> tuple[BinaryIO, str]:
    """A new private (0600) temporary file in ``spool_dir``, created if missing."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".spool", dir=spool_dir)
    return os.fdopen(fd, "wb"), path


class BodySpool:
    """One message body: bytes in memory up to ``memory_threshold``, then a file."""

    def __init__(self, memory_threshold: int, spool_dir: Path, *, prefix: str = "body-",
                 budget: MemoryBudget | None = None) -> None:
        self.memory_threshold = memory_threshold
        self.budget = budget
        self._held = 0  # bytes taken from the budget
        # Built once by the caller (a Path per body cost more than the rest of this)
        self.spool_dir = spool_dir if isinstance(spool_dir, Path) else Path(spool_dir)
        self._prefix = prefix
        # The body in memory as the pieces it arrived in, joined once when
        # the scanner asks for it: appending each piece to one growing
        # buffer and copying that out at the end touched every byte twice
        # more, and growing a buffer past the allocator's mmap threshold
        # page-faulted it anew for each body.
        self._pieces: list[bytes | bytearray] = []
        self._buffered = 0  # bytes in _pieces
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self._size = 0
        self._finished = False
        self._frozen: bytes | None = None

    @property
    def size(self) -> int:
        return self._size

    @property
    def path(self) -> str | None:
        """The temporary file, once the body outgrew memory; else None."""
        return self._path

    @property
    def in_memory(self) -> bool:
        return self._path is None

    def write(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("write after finish()")
        if not data:
            return
        self._size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        size = len(data)
        if self._buffered + size <= self.memory_threshold and self._take(size):
            self._buffered += size
            pieces = self._pieces
            if size >= _OWN_PIECE and type(data) is bytes:
                pieces.append(data)  # immutable: kept as it is, uncopied
            elif pieces and type(pieces[-1]) is bytearray:
                # Small pieces share one buffer: a peer sending one-byte
                # chunks cannot make us keep an object (and its overhead) per byte.
                pieces[-1] += data
            else:
                pieces.append(bytearray(data))
            return
        self._file, self._path = open_spool_file(self.spool_dir, self._prefix)
        self._file.writelines(self._pieces)
        self._file.write(data)
        self._pieces = []
        self._buffered = 0
        self._give_back()

    def _take(self, size: int) -> bool:
        if self.budget is None:
            return True
        if not self.budget.take(size):
            return False
        self._held += size
        return True

    def _give_back(self) -> None:
        if self.budget is not None and self._held:
            self.budget.give_back(self._held)
        self._held = 0

    def finish(self) -> None:
        """No more data: flush the file so readers (YARA, iter_chunks) see it all."""
        if self._finished:
            return
        self._finished = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def scan_target(self) -> bytes | str:
        """The body for ``Scanner.scan``: its bytes, or the spool file's path."""
        self.finish()
        if self._path is not None:
            return self._path
        if self._frozen is None:
            # One copy (none for a body that came in one piece: join returns it).
            self._frozen = b"".join(self._pieces)
            self._pieces = []
        return self._frozen

    def iter_chunks(self, block: int = 65536, start: int = 0) -> Iterator[bytes]:
        """The raw body again from offset ``start``, ``block`` bytes at a time
        (for the 200 echo)."""
        self.finish()
        if self._path is None:
            data = self.scan_target()
            assert isinstance(data, bytes)  # in memory: the bytes, not a path
            if start == 0 and len(data) <= block:
                if data:
                    yield data  # the whole body in one block: no copy
                return
            view = memoryview(data)
            for offset in range(start, len(view), block):
                yield bytes(view[offset : offset + block])
            return
        with open(self._path, "rb") as f:
            f.seek(start)
            while chunk := f.read(block):
                yield chunk

    def close(self) -> None:
        """Forget the body and delete its file.  Safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None
        self._pieces = []
        self._buffered = 0
        self._frozen = None
        self._finished = True
        self._give_back()

    def __enter__(self) -> BodySpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a file or held budget behind a lost spool
        if self._file is not None or self._path is not None or self._held:
            with contextlib.suppress(Exception):
                self.close()


def purge_stale(spool_dir: Path) -> int:
    """Delete spool files whose process is gone (a crash); returns how many.

    Call once at startup.  Files of live processes (sibling workers) stay."""
    removed = 0
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        m = _NAME.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue  # ours or a sibling's: possibly in use
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True

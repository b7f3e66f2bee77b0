"""Decompress-and-verify streams.

:class:`DiffStream` sniffs the compression of a layer blob by its magic bytes (gzip, zstd, xz,
bzip2 or none) and is a reader of the *uncompressed* tar that hashes what
passes through it (the DiffID), optionally hashes the *compressed* bytes too (the blob digest), and stops
at the configured byte limit. Errors of the underlying decompressors are translated into
:class:`~lamina.errors.ArchiveError` so no raw ``EOFError``/``OSError`` escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from lamina.digest import DiffID, Digest, parse_digest
from lamina.errors import ArchiveError, DigestMismatch, LimitExceeded, write_failure

CHUNK = 1 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def detect(prefix: bytes) -> str:
    if prefix.startswith(GZIP_MAGIC):
        return "gzip"
    if prefix.startswith(ZSTD_MAGIC):
        return "zstd"
    if prefix.startswith(XZ_MAGIC):
        return "xz"
    if prefix.startswith(BZIP2_MAGIC):
        return "bzip2"
    return "none"


class _HashingRaw:
    """The compressed side: counts and optionally hashes bytes read from the source."""

    def __init__(self, src: Readable, prefix: bytes, hashed: bool) -> None:
        self._src = src
        self._prefix = prefix
        self._hash = hashlib.sha256() if hashed else None
        self.count = 0
        if prefix and self._hash is not None:
            self._hash.update(prefix)
        self.count = len(prefix)

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n < 0 or n >= len(self._prefix):
                out, self._prefix = self._prefix, b""
                rest = self._read_src(n - len(out) if n >= 0 else -1) if n != len(out) else b""
                return out + rest
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._read_src(n)

    def _read_src(self, n: int) -> bytes:
        try:
            data = self._src.read(n)
        except OSError as e:
            raise ArchiveError(f"cannot read layer data: {e.strerror or e}") from e
        if data:
            self.count += len(data)
            if self._hash is not None:
                self._hash.update(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def digest(self) -> Digest | None:
        return Digest("sha256:" + self._hash.hexdigest()) if self._hash is not None else None


class _GzipChunks:
    """gzip decoding on a helper thread (ISA-L releases the GIL), overlapping the apply loop."""

    def __init__(self, raw: _HashingRaw) -> None:
        from isal import igzip_threaded

        try:
            self._f = igzip_threaded.open(raw, "rb", threads=1, block_size=CHUNK)  # type: ignore[no-untyped-call]
        except OSError as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from e

    def __call__(self) -> bytes:
        try:
            return bytes(self._f.read(CHUNK))
        except EOFError as e:
            raise ArchiveError("truncated gzip stream: it ends before its end-of-stream marker") from e
        except (OSError, ValueError) as e:
            raise ArchiveError(f"corrupt gzip stream: {e}") from e

    def close(self) -> None:
        """Stop the helper thread (it would otherwise keep the source open after a failed apply)."""
        with contextlib.suppress(Exception):
            self._f.close()


class _ZstdChunks:
    """Multi-frame zstd decoding that notices a stream cut inside a frame."""

    def __init__(self, raw: _HashingRaw) -> None:
        import zstandard

        self._zstd = zstandard
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._raw = raw
        self._pending = b""
        self._in_frame = False

    def __call__(self) -> bytes:
        while True:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self._raw.read(CHUNK)
            if not data:
                if self._in_frame:
                    raise ArchiveError("truncated zstd stream: a frame ends early")
                return b""
            self._in_frame = True
            try:
                out = self._obj.decompress(data)
            except self._zstd.ZstdError as e:
                raise ArchiveError(f"corrupt zstd stream: {e}") from e
            if self._obj.eof:
                self._pending = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False
            if out:
                return bytes(out)


def _stdlib_chunks(raw: _HashingRaw, kind: str) -> Callable[[], bytes]:
    import bz2  # imported when a layer needs them: most commands never read xz or bzip2
    import lzma

    f: lzma.LZMAFile | bz2.BZ2File = (
        lzma.LZMAFile(raw) if kind == "xz" else bz2.BZ2File(raw)  # type: ignore[arg-type,call-overload]  # noqa: SIM115
    )

    def read() -> bytes:
        try:
            return f.read(CHUNK)
        except EOFError as e:
            raise ArchiveError(f"truncated {kind} stream") from e
        except (OSError, ValueError, lzma.LZMAError) as e:
            raise ArchiveError(f"corrupt {kind} stream: {e}") from e

    return read


def _plain_chunks(raw: _HashingRaw) -> Callable[[], bytes]:
    return lambda: raw.read(CHUNK)


class BackgroundHash:
    """sha256 on a helper thread: hashlib releases the GIL, so hashing overlaps parsing and writing.

    Small pieces (an exported layer's headers and small files) are gathered into batches of 256 KiB first:
    handing each to the thread on its own costs more than hashing it. At most 32 batches or chunks wait
    (bounded memory). The thread ends at :meth:`hexdigest`, or when this object is dropped unfinished (an
    apply that failed).
    """

    _BATCH = 1 << 18

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | bytearray | memoryview | None] = queue.Queue(maxsize=32)  # None: the end
        self._t = threading.Thread(target=_hash_worker, args=(self._q, self._h), name="lamina-sha256",
                                   daemon=True)
        self._t.start()
        self._batch = bytearray()
        self._digest: str | None = None
        weakref.finalize(self, self._q.put, None)

    def update(self, chunk: bytes | memoryview) -> None:
        if len(chunk) >= self._BATCH:
            self._flush()
            self._q.put(chunk)
            return
        self._batch += chunk
        if len(self._batch) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self._q.put(self._batch)
            self._batch = bytearray()

    def hexdigest(self) -> str:
        if self._digest is None:
            self._flush()
            self._q.put(None)
            self._t.join()
            self._digest = self._h.hexdigest()
        return self._digest


def _hash_worker(q: Any, h: Any) -> None:
    while True:
        chunk = q.get()
        if chunk is None:  # the end (an empty piece is just empty)
            return
        h.update(chunk)


class DiffStream:
    """A read-once view of a layer's uncompressed tar stream that computes its DiffID as it goes."""

    def __init__(
        self,
        src: Readable,
        *,
        max_bytes: int | None = None,
        max_entries: int = 0,
        hash_compressed: bool = False,
    ) -> None:
        self.max_entries = max_entries  # read by lamina.tar.format.TarReader
        # Where lamina.fs.apply.apply_tar keeps the tar-split record of this stream (set by the layer
        # store for drivers that do not keep streams themselves), or None.
        self.record: str | None = None
        try:
            prefix = src.read(8)
        except OSError as e:
            raise ArchiveError(f"cannot read layer data: {e.strerror or e}") from e
        self.compression = detect(prefix)
        self._raw = _HashingRaw(src, prefix, hash_compressed)
        self._next: Callable[[], bytes]
        if self.compression == "gzip":
            self._next = _GzipChunks(self._raw)
        elif self.compression == "zstd":
            self._next = _ZstdChunks(self._raw)
        elif self.compression in ("xz", "bzip2"):
            self._next = _stdlib_chunks(self._raw, self.compression)
        else:
            self._next = _plain_chunks(self._raw)
        self._hash = BackgroundHash()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self.size = 0
        self._max = max_bytes

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._next()
        if not chunk:
            self._eof = True
            return False
        self.size += len(chunk)
        if self._max is not None and self.size > self._max:
            raise LimitExceeded(f"layer expands beyond the limit of {self._max} bytes (storage.limits)")
        self._hash.update(chunk)
        rest = len(self._buf) - self._pos
        self._buf = self._buf[self._pos :] + chunk if rest else chunk
        self._pos = 0
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                break
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def buffer(self) -> tuple[bytes, int]:
        """The decoded bytes at hand and the position of the next unread one (no copy, no read)."""
        return self._buf, self._pos

    def consumed(self, pos: int) -> None:
        """The caller used :meth:`buffer`'s bytes up to ``pos``."""
        if not self._pos <= pos <= len(self._buf):
            raise ValueError("position outside the buffer")
        self._pos = pos

    def read_chunks(self, n: int) -> list[bytes | memoryview] | None:
        """Exactly ``n`` bytes as a list of views of the decoded chunks (no copying, no joining), or None
        if the stream ends first."""
        parts: list[bytes | memoryview] = []
        while n > 0:
            avail = len(self._buf) - self._pos
            if avail == 0:
                if not self._fill():
                    return None
                continue
            take = min(avail, n)
            if self._pos == 0 and take == len(self._buf):
                parts.append(self._buf)
            else:
                parts.append(memoryview(self._buf)[self._pos : self._pos + take])
            self._pos += take
            n -= take
        return parts

    def close(self) -> None:
        close = getattr(self._next, "close", None)
        if close is not None:
            close()

    def drain(self, sink: Callable[[bytes], object] | None = None) -> None:
        """Read to the end of the stream, handing what was left to ``sink``."""
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        if rest and sink is not None:
            sink(rest)
        while self._fill():
            if sink is not None:
                sink(self._buf)
            self._buf, self._pos = b"", 0

    @property
    def diff_id(self) -> DiffID:
        if not self._eof or self._pos != len(self._buf):
            raise RuntimeError("DiffID requested before the stream was read to its end")
        return DiffID("sha256:" + self._hash.hexdigest())

    @property
    def compressed_digest(self) -> Digest | None:
        return self._raw.digest()

    @property
    def compressed_size(self) -> int:
        return self._raw.count


def verify(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise DigestMismatch(f"{what} digest mismatch: expected {expected}, got {actual}")


GZIP_LEVEL = 1  # pinned: recompressed layers must come out byte-identical every time
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0, OS unknown


def deterministic_gzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Gzip a stream the same way every time: fixed header, pinned level (ISA-L deflate)."""
    from isal import isal_zlib

    comp = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -15)
    crc = 0
    size = 0
    yield _GZIP_HEADER
    for chunk in chunks:
        crc = isal_zlib.crc32(chunk, crc)
        size += len(chunk)
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush() + crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")


# -- verified reads of blobs ----------------------------------------------------------------------------
class VerifyingReader:
    """Reads exactly ``size`` bytes from ``src`` and checks they hash to ``digest``.

    Raises :class:`DigestMismatch` on a wrong size or digest, :class:`ArchiveError` on a short read; the
    check runs when the last byte has been read (a consumer that stops early must call :meth:`finish`).
    Bytes read can be copied to ``tee`` (an open file) on the way.
    """

    def __init__(self, src: Readable, digest: str, size: int, what: str, tee: BinaryIO | None = None) -> None:
        self._src = src
        self.digest = parse_digest(digest)
        algo = self.digest.split(":", 1)[0]
        self._hash = hashlib.new(algo)
        self._left = size
        self.size = size
        self._what = what
        self._tee = tee
        self._done = False

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            self._check_end()
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        try:
            data = self._src.read(want)
        except OSError as e:
            raise ArchiveError(f"cannot read {self._what}: {e.strerror or e}") from e
        if not data:
            raise ArchiveError(f"{self._what} is truncated: {self._left} of {self.size} bytes missing")
        self._left -= len(data)
        self._hash.update(data)
        if self._tee is not None:
            try:
                self._tee.write(data)
            except OSError as e:
                raise write_failure(e, f"storing {self._what}") from e
        if self._left == 0:
            self._check_end()
        return data

    def _check_end(self) -> None:
        if self._done:
            return
        self._done = True
        extra = self._src.read(1)
        if extra:
            raise DigestMismatch(f"{self._what} is longer than its descriptor's size {self.size}")
        actual = self._hash.name + ":" + self._hash.hexdigest()
        if actual != self.digest:
            raise DigestMismatch(f"{self._what} does not match its digest: expected {self.digest}, got {actual}")

    def finish(self) -> None:
        """Read whatever the consumer left and verify."""
        while self._left > 0:
            self.read(CHUNK)
        self._check_end()


def read_verified(src: Readable, digest: str, size: int, what: str, limit: int) -> bytes:
    """A small document read whole, with its size bounded and its digest checked."""
    if size > limit:
        raise LimitExceeded(f"{what} is {size} bytes; documents are limited to {limit}")
    reader = VerifyingReader(src, digest, size, what)
    parts = []
    while chunk := reader.read(CHUNK):
        parts.append(chunk)
    reader.finish()
    return b"".join(parts)

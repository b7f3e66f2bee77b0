"""Writing a stream of pieces into a regular file with the file bodies copied in the kernel.

A stream that is mostly file contents (a layer's exact tar: headers from its record, bodies from the
layer's files) is handed over as *segments*: ``bytes`` for what only the stream has, and :class:`Span`
for a range of an open file. :class:`FileWriter` writes bytes with ``write(2)`` and copies spans with
``copy_file_range(2)``; where the kernel refuses that for a pair of files (another filesystem type, an
old kernel, a filesystem without it) it falls back to ``sendfile(2)``, and failing that to reads and
writes, once for the rest of the copy. :class:`MappedHash` hashes what was written, from a mapping of the
destination on a helper thread (hashlib releases the GIL), so a verified copy passes no byte through a
Python buffer either.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from typing import NamedTuple

_MAX = 1 << 26  # per system call (an interrupt waits for one at most)
_READ = 1 << 20  # per read in the last-resort copy
# what says "not between these two files" rather than a failure of either
_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF})


class Span(NamedTuple):
    """``length`` bytes of the open file ``fd`` from ``offset`` (``path`` names it in messages).

    A span is valid until the next segment of its stream is asked for: its producer closes ``fd`` then."""

    fd: int
    offset: int
    length: int
    path: str


Segment = bytes | bytearray | memoryview | Span


class ShortSource(Exception):
    """A span's file ended before the span did."""

    def __init__(self, span: Span, copied: int) -> None:
        super().__init__(span.path)
        self.span = span
        self.copied = copied


class SourceError(Exception):
    """Reading a span's file failed (not writing the output): :attr:`error` says why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def read_span(span: Span, piece: int = _READ) -> Iterable[bytes]:
    """The bytes of a span, for a consumer that needs them (a pipe, an HTTP body); :class:`ShortSource`
    when its file is shorter."""
    done = 0
    while done < span.length:
        chunk = os.pread(span.fd, min(span.length - done, piece), span.offset + done)
        if not chunk:
            raise ShortSource(span, done)
        done += len(chunk)
        yield chunk


class FileWriter:
    """Writes segments at the current position of ``fd`` (a regular file, or anything ``write(2)`` takes)
    and counts them in :attr:`written`. The method used for spans is kept in :attr:`method`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self.method = "copy_file_range"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def put(self, segment: Segment) -> None:
        if isinstance(segment, Span):
            self.copy(segment)
        else:
            self.write(segment)

    def put_all(self, segments: Iterable[Segment]) -> int:
        """Write every segment; returns the bytes written by this call."""
        before = self.written
        for s in segments:
            self.put(s)
        return self.written - before

    def copy(self, span: Span) -> None:
        """Copy a span; :class:`ShortSource` if its file ends first, :class:`SourceError` if it cannot be
        read (an error writing the output stays an ``OSError``)."""
        done = 0
        while done < span.length:
            try:
                n = self._copy_some(span.fd, span.offset + done, min(span.length - done, _MAX))
            except OSError as e:
                try:  # whose fault: a source that cannot be read here is the span's file's
                    os.pread(span.fd, 1, span.offset + done)
                except OSError as source:
                    raise SourceError(source) from e
                raise
            if n == 0:
                raise ShortSource(span, done)
            done += n
            self.written += n

    def _copy_some(self, src: int, offset: int, count: int) -> int:
        if self.method == "copy_file_range":
            try:
                n = os.copy_file_range(src, self.fd, count, offset)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.method = "sendfile"
            else:
                if n or not _has_data(src, offset):
                    return n
                self.method = "sendfile"  # 0 bytes although the file goes on: a filesystem that fakes support
        if self.method == "sendfile":
            try:
                n = os.sendfile(self.fd, src, offset, count)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.method = "read/write"
            else:
                if n or not _has_data(src, offset):
                    return n
                self.method = "read/write"
        chunk = os.pread(src, min(count, _READ), offset)
        self.write(chunk)
        self.written -= len(chunk)  # counted by copy()
        return len(chunk)


def _has_data(fd: int, offset: int) -> bool:
    return bool(os.pread(fd, 1, offset))


class MappedHash:
    """sha256 of a file's bytes from ``start`` on, hashed on a helper thread from a read-only mapping while
    the file is still being written: :meth:`advance` says how far the bytes are final, :meth:`hexdigest`
    where they end. ``fd`` must be open for reading (mappings need it)."""

    WINDOW = 8 << 20  # bytes mapped and hashed at a time

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._h = hashlib.sha256()
        self._told = self._hashed = start
        self._end = -1  # where the stream ends, once known
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._abandoned = False
        self._t = threading.Thread(target=self._run, name="lamina-sha256-map", daemon=True)
        self._t.start()

    def advance(self, position: int) -> None:
        """The bytes before ``position`` are written; hashed once a window's worth waits. A hash that
        already failed stops the copy here rather than at its end."""
        if self._error is not None:
            raise self._error
        if position - self._told >= self.WINDOW:
            with self._cv:
                self._told = position
                self._cv.notify()

    def hexdigest(self, end: int) -> str:
        self._finish(end)
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()

    def close(self) -> None:
        """Stop the thread without hashing further (after a failed copy); harmless after :meth:`hexdigest`."""
        if self._t.is_alive():
            with self._cv:
                self._abandoned = True
                self._cv.notify()
            self._t.join()

    def _finish(self, end: int) -> None:
        if self._t.is_alive():
            with self._cv:
                self._told = max(self._told, end)
                self._end = end
                self._cv.notify()
            self._t.join()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._told == self._hashed and self._end < 0 and not self._abandoned:
                        self._cv.wait()
                    if self._abandoned:
                        return
                    target, end = self._told, self._end
                self._hash(self._hashed, target)
                self._hashed = target
                if end >= 0 and self._hashed >= end:
                    return
        except BaseException as e:  # reported by hexdigest
            self._error = e

    def _hash(self, start: int, end: int) -> None:
        while start < end:
            stop = min(end, start + self.WINDOW)
            base = start - start % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            try:
                m = mmap.mmap(self._fd, stop - base, flags=flags, prot=mmap.PROT_READ, offset=base)
            except (OSError, ValueError) as e:  # ValueError: its size is not what was written (procfs says 0)
                if isinstance(e, OSError) and e.errno not in (errno.ENODEV, errno.EINVAL):
                    raise
                self._read_hash(start, end)  # a file that cannot be mapped: read back
                return
            try:
                with memoryview(m) as whole, whole[start - base:] as part:
                    self._h.update(part)
            finally:
                m.close()
            start = stop

    def _read_hash(self, start: int, end: int) -> None:
        buf = bytearray(min(self.WINDOW, _READ))
        with memoryview(buf) as view:
            while start < end:
                n = os.preadv(self._fd, [view[:min(len(buf), end - start)]], start)
                if n == 0:
                    raise OSError(errno.EIO, "the file being hashed is shorter than what was written to it")
                self._h.update(view[:n])
                start += n


def copy_file(src: int, dst: int, path: str) -> int:
    """All of the file ``src`` (from its start, as long as it is now) written at the position of ``dst`` in
    the kernel; returns the bytes written (fewer when the file shrank meanwhile)."""
    out = FileWriter(dst)
    with contextlib.suppress(ShortSource):
        out.copy(Span(src, 0, os.fstat(src).st_size, path))
    return out.written

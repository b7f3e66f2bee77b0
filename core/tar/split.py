"""Byte-exact re-export of an applied layer.

While a layer is applied, a :class:`RecordWriter` keeps every byte of the tar stream that is *not* a file
payload stored in the layer (headers, PAX records, padding, the end-of-archive blocks and anything after
them), plus, for each stored payload, the file's layer-relative path and size. :func:`assemble_segments`
replays the record, with each payload a reference to a range of the layer's file (opened through
:class:`lamina.fs.ops.Root`), and so reproduces the original stream exactly; :class:`ExactTarStream` hands
it out as bytes, or copies it into a file with the payloads copied by the kernel, and checks the result
against the DiffID.

Record format (gzip-compressed): a magic line, then operations ``R <len> <bytes>`` (raw bytes),
``F <pathlen> <path> <size>`` (payload from a file) and ``S <pathlen> <path> <count> (<offset> <length>)*``
(the payload of a sparse file: its data segments, read from the file at their offsets). A payload the
same layer later replaced is kept in a side file ``<record>.sup`` keyed by the operation's index.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from lamina.errors import ExportError, ExportUnreadable, shown
from lamina.fs.kcopy import FileWriter, MappedHash, Segment, ShortSource, SourceError, Span, read_span
from lamina.fs.ops import Root
from lamina.tar.compression import BackgroundHash

MAGIC = b"LAMINA-TARSPLIT-1\n"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_READ = 1 << 20


class RecordWriter:
    """A :class:`lamina.tar.format.Recorder` that writes the record file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from isal import igzip

        self.path = os.fspath(path)
        self._f: BinaryIO = igzip.open(self.path, "wb", compresslevel=1)  # type: ignore[no-untyped-call]
        self._f.write(MAGIC)
        self._raw = bytearray()  # raw bytes not yet framed
        self._out = bytearray()  # framed operations not yet compressed
        self._files: dict[str, int] = {}  # path -> index of its latest F or S operation
        # index of an S operation -> where its segments are in _mapfile (offset, count): a layer may hold
        # many sparse files of many segments, which memory need not hold until one is replaced
        self._maps: dict[int, tuple[int, int]] = {}
        self._mapfile: BinaryIO | None = None
        self._index = 0
        self._superseded: dict[int, bytes] = {}

    def raw(self, data: bytes | memoryview) -> None:
        self._raw += data
        self._flush_full()

    def _flush_full(self) -> None:
        """Frame the pending raw bytes and compress the framed operations once a piece's worth waits."""
        if len(self._raw) >= _READ:
            self._frame_raw()
        self._spill(_READ)

    def _frame_raw(self) -> None:
        if self._raw:
            self._out += b"R" + _U32.pack(len(self._raw))
            self._out += self._raw
            self._raw = bytearray()

    def _spill(self, at_least: int) -> None:
        """Compress the framed operations once ``at_least`` bytes of them are waiting."""
        if self._out and len(self._out) >= at_least:
            self._f.write(self._out)
            self._out = bytearray()

    def file(self, path: str, size: int) -> None:
        self._frame_raw()
        p = path.encode("utf-8", "surrogateescape")
        self._out += b"F" + _U32.pack(len(p)) + p + _U64.pack(size)
        self._spill(_READ)
        self._files[path] = self._index
        self._index += 1

    def sparse_file(self, path: str, segments: Sequence[tuple[int, int]]) -> None:
        self._frame_raw()
        p = path.encode("utf-8", "surrogateescape")
        self._out += b"S" + _U32.pack(len(p)) + p + _U32.pack(len(segments))
        if self._mapfile is None:
            import tempfile

            self._mapfile = tempfile.TemporaryFile(dir=os.path.dirname(self.path) or ".")  # noqa: SIM115 (closed by close/abort)
        at = self._mapfile.seek(0, os.SEEK_END)
        for offset, length in segments:
            pair = _U64.pack(offset) + _U64.pack(length)
            self._out += pair
            self._mapfile.write(pair)
            self._spill(_READ)
        self._spill(_READ)
        self._files[path] = self._index
        self._maps[self._index] = (at, len(segments))
        self._index += 1

    def native_state(self) -> tuple[bytearray, bytearray, int]:
        """What :func:`lamina.fs._native.run` appends to: pending raw bytes, framed operations, and the next
        operation's index."""
        return self._raw, self._out, self._index

    def note_file(self, path: str, index: int) -> None:
        """The F operation ``index`` (written by :func:`lamina.fs._native.run`) stored ``path``."""
        self._files[path] = index

    def native_done(self, index: int) -> None:
        """After :func:`lamina.fs._native.run` appended operations up to ``index``."""
        self._index = index
        self._flush_full()

    def supersede(self, path: str, f: BinaryIO) -> None:
        """The file at ``path`` written earlier by this layer is about to be replaced: keep its bytes."""
        idx = self._files.pop(path, None)
        if idx is None:
            return
        where = self._maps.pop(idx, None)
        if where is None:
            self._superseded[idx] = f.read()
            return
        assert self._mapfile is not None
        self._mapfile.seek(where[0])
        data = bytearray()  # a sparse file: its data segments only, never its holes
        for _ in range(where[1]):
            pair = self._mapfile.read(16)
            f.seek(_U64.unpack_from(pair, 0)[0])
            data += f.read(_U64.unpack_from(pair, 8)[0])
        self._superseded[idx] = bytes(data)

    def _drop_maps(self) -> None:
        if self._mapfile is not None:
            self._mapfile.close()
            self._mapfile = None

    def close(self) -> None:
        self._drop_maps()
        self._frame_raw()
        self._spill(1)
        self._f.close()
        if self._superseded:
            with open(self.path + ".sup", "wb") as s:
                for idx, data in sorted(self._superseded.items()):
                    s.write(_U32.pack(idx) + _U64.pack(len(data)))
                    s.write(data)

    def abort(self) -> None:
        self._drop_maps()
        try:
            self._f.close()
        finally:
            for p in (self.path, self.path + ".sup"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)


def _index_superseded(f: BinaryIO) -> dict[int, tuple[int, int]]:
    """Where each kept payload is in a record's side file: operation index -> (offset, length)."""
    out: dict[int, tuple[int, int]] = {}
    end = os.fstat(f.fileno()).st_size
    pos = 0
    while pos < end:
        head = f.read(12)
        if len(head) != 12:
            raise ExportError("kept payloads of the layer record are truncated")
        idx = _U32.unpack(head[:4])[0]
        n = _U64.unpack(head[4:])[0]
        pos += 12
        out[idx] = (pos, n)
        pos = f.seek(pos + n)
    return out


class _RecordReader:
    """The decompressed record read a piece at a time and parsed from memory: a record holds several small
    fields per file of the layer, which read one by one from the gzip file cost more than the parsing."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0

    def _fill(self, n: int) -> None:
        """At least ``n`` bytes from the current position in the buffer, or :class:`ExportError`."""
        rest = self._buf[self._pos:]
        more = self._f.read(max(n - len(rest), _READ))
        self._buf, self._pos = rest + more, 0
        if len(self._buf) < n:
            raise ExportError("layer record is truncated")

    def at_end(self) -> bool:
        if self._pos < len(self._buf):
            return False
        self._buf, self._pos = self._f.read(_READ), 0
        return not self._buf

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._fill(n)
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def u32(self) -> int:
        if self._pos + 4 > len(self._buf):
            self._fill(4)
        value: int = _U32.unpack_from(self._buf, self._pos)[0]
        self._pos += 4
        return value

    def u64(self) -> int:
        if self._pos + 8 > len(self._buf):
            self._fill(8)
        value: int = _U64.unpack_from(self._buf, self._pos)[0]
        self._pos += 8
        return value


def assemble_segments(record: str | os.PathLike[str], layer_dir: str | os.PathLike[str] | int) -> Iterator[Segment]:
    """The original tar stream of a layer from its record and its directory, as segments: the record's
    bytes, and each payload as :class:`~lamina.fs.kcopy.Span` s of the layer's file (or of the record's
    side file, for a payload the layer later replaced). A span's file is closed when the next segment is
    asked for."""
    from isal import igzip

    rpath = os.fspath(record)
    try:
        f = igzip.open(rpath, "rb")  # type: ignore[no-untyped-call]
    except OSError as e:
        raise ExportError(f"layer record {rpath} unreadable: {e}") from e
    with contextlib.ExitStack() as held:
        held.enter_context(f)
        try:
            sup_file: BinaryIO | None = held.enter_context(open(rpath + ".sup", "rb"))
        except FileNotFoundError:
            sup_file = None
        except OSError as e:
            raise ExportError(f"layer record {rpath} unreadable: {e.strerror}") from e
        try:
            root = held.enter_context(Root(layer_dir))
        except OSError as e:
            raise ExportError(f"the layer's files are gone: {e.strerror}") from e
        try:
            sup = _index_superseded(sup_file) if sup_file is not None else {}
            if f.read(len(MAGIC)) != MAGIC:
                raise ExportError(f"{rpath} is not a lamina layer record")
            r = _RecordReader(f)
            index = 0
            while not r.at_end():
                op = r.take(1)
                if op == b"R":
                    yield r.take(r.u32())
                elif op in (b"F", b"S"):
                    path = r.take(r.u32()).decode("utf-8", "surrogateescape")
                    if op == b"F":
                        size = r.u64()
                        segments = [(0, size)]
                    else:
                        count = r.u32()
                        segments = [(r.u64(), r.u64()) for _ in range(count)]
                        size = sum(length for _, length in segments)
                    kept = sup.get(index)
                    if kept is not None:
                        assert sup_file is not None
                        if kept[1] != size:
                            raise ExportError(f"kept payload of {shown(path)} has the wrong size")
                        yield Span(sup_file.fileno(), kept[0], size, path)
                    else:
                        yield from _payload(root, path, segments)
                    index += 1
                else:
                    raise ExportError(f"layer record {rpath} is corrupt")
        except (EOFError, OSError) as e:
            if isinstance(e, OSError) and e.filename:
                raise _read_error(e, f"cannot read {shown(e.filename)} back from the layer: {e.strerror}") from e
            raise ExportError(f"layer record {rpath} is corrupt: {e}") from e


def assemble(record: str | os.PathLike[str], layer_dir: str | os.PathLike[str] | int) -> Iterator[bytes]:
    """Yield the original tar stream of a layer from its record and its directory, as bytes."""
    return as_bytes(assemble_segments(record, layer_dir))


def as_bytes(segments: Iterator[Segment]) -> Iterator[bytes]:
    """Segments as bytes: each span read from its file (for a consumer that is not a file)."""
    try:
        for seg in segments:
            if isinstance(seg, Span):
                yield from _span_bytes(seg)
            else:
                yield seg if isinstance(seg, bytes) else bytes(seg)
    finally:
        close = getattr(segments, "close", None)
        if close is not None:
            close()


# What a layer's files being gone or changed looks like; any other failure to read them is not the layer's.
_DAMAGE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL})


def _read_error(e: OSError, message: str) -> ExportError:
    return ExportError(message) if e.errno in _DAMAGE_ERRNOS else ExportUnreadable(message)


def _short(span: Span) -> ExportError:
    return ExportError(f"file {shown(span.path)} of the layer is shorter than when it was applied")


def _span_bytes(span: Span) -> Iterator[bytes]:
    try:
        yield from read_span(span)
    except ShortSource:
        raise _short(span) from None
    except OSError as e:
        raise _read_error(e, f"cannot read {shown(span.path)} back from the layer: {e.strerror}") from e


def _payload(root: Root, path: str, segments: Sequence[tuple[int, int]]) -> Iterator[Span]:
    """``path``'s bytes in ``segments`` (offset, length), as spans: the whole file, or a sparse file's data."""
    try:
        fd = root.open_file(path)
    except OSError as e:
        raise _read_error(e, f"file {shown(path)} of the layer is missing or changed: {e.strerror}") from e
    try:
        for offset, length in segments:
            if length:
                yield Span(fd, offset, length, path)
    finally:
        os.close(fd)


class ExactTarStream:
    """A readable file object over an iterator of tar pieces, verified against a DiffID at the end
    (when one is given: without, nothing is hashed).

    The pieces are bytes or :class:`~lamina.fs.kcopy.Span` s of file bodies (:func:`assemble_segments`).
    :meth:`read` and :meth:`chunks` hand out bytes; :meth:`copy_to` writes the whole stream into a file
    with the spans copied by the kernel, and verifies what it wrote; :meth:`segments` passes the pieces on
    unverified."""

    def __init__(self, chunks: Iterator[Segment], diff_id: str | None) -> None:
        self._src = chunks
        self._it: Iterator[bytes] | None = None  # the pieces as bytes, once reading started
        self._buf = bytearray()
        self._expected = diff_id
        self._hash: BackgroundHash | None = None
        self._done = False
        self._taken = False  # handed to copy_to or segments

    def readable(self) -> bool:
        return True

    def _check(self, actual: str) -> None:
        if actual != self._expected:
            raise ExportError(f"layer content no longer matches its DiffID {self._expected} (got {actual})") from None

    def _next(self) -> bytes | None:
        if self._it is None:
            if self._taken:
                raise ValueError("the stream was handed on already")
            self._it = as_bytes(self._src)
            if self._expected is not None:
                self._hash = BackgroundHash()  # overlaps reading the layer back
        try:
            chunk = next(self._it)
        except StopIteration:
            self._done = True
            if self._hash is not None:
                self._check("sha256:" + self._hash.hexdigest())
            return None
        if self._hash is not None:
            self._hash.update(chunk)
        return chunk

    def _take(self) -> None:
        if self._taken or self._it is not None:
            raise ValueError("the stream was read or handed on already")
        self._taken = self._done = True

    def copy_to(self, fd: int) -> int:
        """Write the whole stream at the position of ``fd`` (a regular file open for reading and writing:
        what was written is hashed from a mapping of it), file bodies copied by the kernel; returns the
        bytes written. With a DiffID, an :class:`ExportError` at the end if they do not hash to it. Only
        on a stream nothing was read from."""
        self._take()
        out = FileWriter(fd)
        start = os.lseek(fd, 0, os.SEEK_CUR)
        hasher = MappedHash(fd, start) if self._expected is not None else None
        try:
            step = MappedHash.WINDOW
            for seg in self._src:
                if not isinstance(seg, Span):
                    out.write(seg)
                elif hasher is None or seg.length <= step:
                    self._copy(out, seg)
                else:  # a large file in windows, each hashed while the next is copied
                    for at in range(0, seg.length, step):
                        self._copy(out, seg._replace(offset=seg.offset + at, length=min(step, seg.length - at)))
                        hasher.advance(start + out.written)
                if hasher is not None:
                    hasher.advance(start + out.written)
            if hasher is not None:
                self._check("sha256:" + hasher.hexdigest(start + out.written))
        finally:
            if hasher is not None:
                hasher.close()
        return out.written

    @staticmethod
    def _copy(out: FileWriter, span: Span) -> None:
        try:
            out.copy(span)
        except ShortSource:
            raise _short(span) from None
        except SourceError as e:  # the layer's file, not the archive, failed
            raise _read_error(e.error, f"cannot read {shown(span.path)} back from the layer: "
                                       f"{e.error.strerror or e.error}") from e.error

    @property
    def verified(self) -> bool:
        """Whether the stream checks itself against a DiffID (then it is read or copied, not handed on)."""
        return self._expected is not None

    def segments(self) -> Iterator[Segment]:
        """The pieces as made (each span valid until the next piece is asked for), for a consumer that
        copies them; only on a stream without a DiffID (nothing here verifies them), nothing read from."""
        if self._expected is not None:
            raise ValueError("a verified stream is read or copied, not handed on")
        self._take()
        return self._src

    def chunks(self) -> Iterator[bytes]:
        """The rest of the stream as it is produced (no re-buffering); verified at its end."""
        if self._buf:
            out, self._buf = bytes(self._buf), bytearray()
            yield out
        while not self._done:
            chunk = self._next()
            if chunk is not None:
                yield chunk

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self._done:
            chunk = self._next()
            if chunk is not None:
                self._buf += chunk
        if n < 0 or n >= len(self._buf):
            out, self._buf = bytes(self._buf), bytearray()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out

    def close(self) -> None:
        for it in (self._it, self._src):
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> ExactTarStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A streaming tar reader for layer diffs.

Everything is decoded here, without ``tarfile``: header blocks (checksums, octal and base-256 numbers,
the ustar prefix), PAX (and Solaris ``X``) and GNU long-name records, GNU sparse maps in their four
encodings, payload framing and padding; a stream may end without end-of-archive blocks. Every byte of
the stream is accounted for: header bytes and padding go to a :class:`Recorder` (for byte-exact
re-export), payloads go wherever the consumer sends them. Nothing here touches the filesystem.
"""

from __future__ import annotations

import base64
import re
import struct
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lamina.errors import ArchiveError, shown
from lamina.tar import whiteout
from lamina.tar.compression import DiffStream

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_PIECE = 1 << 20

REG = "0"
LNK = "1"
SYM = "2"
CHR = "3"
BLK = "4"
DIR = "5"
FIFO = "6"
_REGULAR_TYPES = {b"0", b"\0", b"7"}
_KNOWN = {
    b"0": REG, b"\0": REG, b"7": REG, b"1": LNK, b"2": SYM, b"3": CHR, b"4": BLK, b"5": DIR, b"6": FIFO,
}


class Recorder(Protocol):
    """Receives the parts of the stream that are not file payloads stored in the layer."""

    def raw(self, data: bytes | memoryview) -> None: ...

    def file(self, path: str, size: int) -> None: ...

    def sparse_file(self, path: str, segments: Sequence[tuple[int, int]]) -> None:
        """The payload of a sparse file: its data segments (offset in the file, length), read in order."""


@dataclass(slots=True)
class Entry:
    name: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    # A GNU sparse file: its data segments (offset, length; ascending, non-empty, within ``realsize``),
    # whose lengths add up to ``size``, the payload's length in the stream; None for any other entry.
    sparse: tuple[tuple[int, int], ...] | None = None
    realsize: int = 0

    @property
    def apparent_size(self) -> int:
        """The file's length once written: a sparse file's real size, else its payload's."""
        return self.size if self.sparse is None else self.realsize


class Header:
    """One decoded 512-byte header block (ustar, GNU or v7 layout)."""

    __slots__ = ("devmajor", "devminor", "gid", "gname", "gnu_sparse", "linkname", "mode", "mtime", "name", "size",
                 "type", "uid", "uname")

    def __init__(self, block: bytes) -> None:
        (name, mode, uid, gid, size, mtime, chksum, typ, linkname, magic, _version, uname, gname, devmajor,
         devminor, prefix) = _LAYOUT.unpack_from(block)
        # Checksum first: the sum of all bytes with the checksum field read as spaces (some old
        # writers summed signed bytes; accept that too).
        stored = _num(chksum, "checksum")
        if stored != sum(block) - sum(chksum) + 256:
            signed = sum(b - 256 if b > 127 else b for b in block) - sum(
                b - 256 if b > 127 else b for b in chksum) + 256
            if stored != signed:
                raise ArchiveError("bad tar header: checksum mismatch")
        self.name = _str(name)
        self.mode = _num(mode, "mode")
        self.uid = _num(uid, "uid")
        self.gid = _num(gid, "gid")
        self.size = _num(size, "size")
        self.mtime = _num(mtime, "mtime")
        self.type = typ
        self.linkname = _str(linkname) if linkname[0] else ""
        self.uname = _str(uname) if uname[0] else ""
        self.gname = _str(gname) if gname[0] else ""
        if typ in (b"3", b"4"):
            self.devmajor = _num(devmajor, "devmajor")
            self.devminor = _num(devminor, "devminor")
        else:
            self.devmajor = self.devminor = 0
        if magic == b"ustar\0" and prefix[0]:  # POSIX: a prefix completes the name (GNU uses it otherwise)
            self.name = _str(prefix) + "/" + self.name
        # Old GNU sparse file: the first 4 map slots, whether extension blocks follow, the real size.
        self.gnu_sparse: tuple[list[tuple[int, int]], bool, int] | None = None
        if typ == b"S":
            segments, more = _gnu_map(block, 386, 4)
            self.gnu_sparse = (segments, more, _num(block[483:495], "sparse real size"))


_LAYOUT = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")


def _str(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _num(field: bytes, what: str) -> int:
    first = field[0]
    if first in (0o200, 0o377):  # GNU base-256
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if first == 0o377 else n
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ArchiveError(f"bad tar header: {what} field {shown(field)} is not a number") from None


def _gnu_map(block: bytes, at: int, slots: int) -> tuple[list[tuple[int, int]], bool]:
    """Old GNU sparse map slots (12-byte offset, 12-byte length) from ``at``, up to the first empty one (as
    GNU tar reads them), and the "more blocks follow" flag after the last slot."""
    out: list[tuple[int, int]] = []
    for i in range(slots):
        pos = at + 24 * i
        if block[pos] == 0:
            break
        out.append((_num(block[pos : pos + 12], "sparse offset"), _num(block[pos + 12 : pos + 24], "sparse length")))
    return out, block[at + 24 * slots] != 0


def _pad(n: int) -> int:
    return (BLOCK - n % BLOCK) % BLOCK


def _parse_mtime_ns(text: str) -> int:
    try:
        neg = text.startswith("-")
        whole, _, frac = text.lstrip("-").partition(".")
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
        return -ns if neg else ns
    except ValueError as e:
        raise ArchiveError(f"bad PAX mtime {shown(text)}") from e


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Decode PAX extended-header records (``"%d %s=%s\\n"``) into raw byte values (the last of a repeated
    key wins)."""
    return dict(pax_records(data))


def pax_records(data: bytes) -> list[tuple[str, bytes]]:
    """PAX extended-header records in their order, repeated keys included (GNU sparse 0.0 repeats some)."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding some writers leave
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise ArchiveError("malformed PAX header: record without length")
        try:
            length = int(data[pos:sp])
        except ValueError as e:
            raise ArchiveError("malformed PAX header: bad record length") from e
        end = pos + length
        if length <= sp - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError("malformed PAX header: record length does not match")
        kv = data[sp + 1 : end - 1]
        eq = kv.find(b"=")
        if eq <= 0:
            raise ArchiveError("malformed PAX header: record without key")
        key = kv[:eq].decode("utf-8", "surrogateescape")
        out.append((key, kv[eq + 1 :]))
        pos = end
    return out


class TarReader:
    """Iterate over the entries of an uncompressed tar stream, accounting for every byte."""

    def __init__(self, stream: DiffStream, recorder: Recorder | None = None, max_entries: int = 0) -> None:
        self._s = stream
        self.recorder = recorder
        self._pending = 0  # payload bytes of the current entry not yet consumed
        self._pending_pad = 0
        self._global: dict[str, bytes] = {}
        self._done = False
        self._started = False  # a block was read
        self.entries = 0
        self._max_entries = max_entries or stream.max_entries  # the store's limit unless told otherwise

    # -- raw access ---------------------------------------------------------------------------------
    def _raw(self, data: bytes | memoryview) -> None:
        if self.recorder is not None and data:
            self.recorder.raw(data)

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._s.read(n)
        if len(data) != n:
            raise ArchiveError(f"truncated tar stream: it ends inside {what}")
        return data

    @property
    def done(self) -> bool:
        """The end of the archive has been reached (its end-of-archive block, or the end of the stream
        where the next header would start)."""
        return self._done

    @property
    def has_globals(self) -> bool:
        """A PAX global header applies to the entries that follow."""
        return bool(self._global)

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def finish_entry(self) -> None:
        """Consume what is left of the current entry (unstored payload, padding): the stream is then at
        the next header."""
        if self._pending:
            # The consumer did not store this payload: keep it inline in the record.
            parts = self._s.read_chunks(self._pending)
            if parts is None:
                raise ArchiveError("truncated tar stream: it ends inside a file's contents")
            for p in parts:
                self._raw(p)
            self._pending = 0
        if self._pending_pad:
            self._raw(self._read_exact(self._pending_pad, "padding"))
            self._pending_pad = 0

    # -- payload ------------------------------------------------------------------------------------
    def payload_chunks(self) -> Iterator[bytes | memoryview]:
        """The payload of the current entry, in pieces of at most 1 MiB read as they are consumed, so a
        file of any size costs bounded memory. Consume it whole (it is then recorded as stored)."""
        while self._pending:
            parts = self._s.read_chunks(min(self._pending, _PIECE))
            if parts is None:
                raise ArchiveError("truncated tar stream: it ends inside a file's contents")
            for part in parts:
                self._pending -= len(part)
                yield part

    def record_file(self, path: str, size: int, sparse: Sequence[tuple[int, int]] | None = None) -> None:
        """The consumer stored the payload just read at ``path`` (a sparse file: its data segments)."""
        if self.recorder is not None:
            if sparse is None:
                self.recorder.file(path, size)
            else:
                self.recorder.sparse_file(path, sparse)

    def payload_bytes(self, limit: int) -> bytes:
        """The payload of a small entry (e.g. a PAX record), kept inline in the record."""
        if self._pending > limit:
            raise ArchiveError(f"tar entry payload of {self._pending} bytes exceeds {limit}")
        data = b"".join(self.payload_chunks())
        self._raw(data)
        return data

    # -- headers ------------------------------------------------------------------------------------
    def _header(self, prefixed: bool) -> Header | None:
        """The next header, or None at the end of the archive: a zero block, or the end of the stream
        where a header would start (producers that write no end-of-archive blocks). ``prefixed``: extended
        headers for the next entry were read, so the stream may not end here."""
        block = self._s.read(BLOCK)
        if not block:
            if prefixed:
                raise ArchiveError("truncated tar stream: it ends after an extended header")
            if not self._started:  # as GNU tar and Python's tarfile: an empty file is no archive
                raise ArchiveError("truncated tar stream: it is empty")
            return None
        self._started = True
        if len(block) != BLOCK:
            raise ArchiveError("truncated tar stream: it ends inside a header")
        self._raw(block)
        if block == _ZERO_BLOCK:
            return None
        try:
            return Header(block)
        except ArchiveError as e:
            raise ArchiveError(f"entry {self.entries + 1}: {e.message}") from None

    def next(self) -> Entry | None:
        if self._done:
            return None
        self.finish_entry()
        pax: dict[str, bytes] = dict(self._global)
        sparse00: list[tuple[str, bytes]] = []  # GNU sparse 0.0: offset and length records, in order
        longname: str | None = None
        longlink: str | None = None
        kind: str | None = None
        prefixed = False
        while True:
            ti = self._header(prefixed)
            if ti is None:
                self._done = True
                self._s.drain(self._raw)  # end-of-archive blocks and anything after them
                return None
            t = ti.type
            size = ti.size
            if size < 0:
                raise ArchiveError("bad tar header: negative size")
            if t in (b"x", b"X", b"g", b"L", b"K"):  # X: Solaris tar's name for the PAX x header
                prefixed = prefixed or t != b"g"
                self._pending = size
                self._pending_pad = _pad(size)
                data = self.payload_bytes(16 << 20)
                self.finish_entry()
                if t in (b"x", b"X"):
                    records = pax_records(data)
                    pax.update(records)
                    pairs = [r for r in records if r[0] in (_SPARSE_OFFSET, _SPARSE_LENGTH)]
                    if pairs:
                        sparse00 = pairs
                elif t == b"g":
                    g = parse_pax(data)
                    if any(k.startswith("GNU.sparse.") for k in g):
                        raise ArchiveError("GNU sparse records in a PAX global header")
                    self._global.update(g)
                    pax.update(g)
                elif t == b"L":  # a GNU long name ends at its first NUL, as every reader cuts it
                    longname = _str(data)
                else:
                    longlink = _str(data)
                continue
            if t == b"V":  # volume label: no content, nothing to apply
                self._pending = size
                self._pending_pad = _pad(size)
                self.finish_entry()
                continue
            kind = REG if t == b"S" else _KNOWN.get(t)
            if kind is None:
                raise ArchiveError(f"unsupported tar entry type {shown(t)} for {shown(ti.name)}")
            break
        assert kind is not None
        self.entries += 1
        if self._max_entries and self.entries > self._max_entries:
            from lamina.errors import LimitExceeded

            raise LimitExceeded(f"layer has more than {self._max_entries} entries (storage.limits)")
        name = ti.name
        linkname = ti.linkname
        uid, gid = ti.uid, ti.gid
        mtime_ns = int(ti.mtime) * 1_000_000_000
        uname, gname = ti.uname, ti.gname
        xattrs: dict[str, bytes] = {}
        sparse_keys = False
        if pax:
            for key, value in pax.items():
                if key == "path":
                    name = value.decode("utf-8", "surrogateescape")
                elif key == "linkpath":
                    linkname = value.decode("utf-8", "surrogateescape")
                elif key == "size":
                    size = _pax_int(key, value)
                elif key == "uid":
                    uid = _pax_int(key, value)
                elif key == "gid":
                    gid = _pax_int(key, value)
                elif key == "mtime":
                    mtime_ns = _parse_mtime_ns(value.decode("ascii", "replace"))
                elif key == "uname":
                    uname = value.decode("utf-8", "surrogateescape")
                elif key == "gname":
                    gname = value.decode("utf-8", "surrogateescape")
                elif key.startswith("SCHILY.xattr."):
                    xattrs[key[len("SCHILY.xattr.") :]] = value
                elif key.startswith("LIBARCHIVE.xattr."):
                    xname = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
                    if xname not in xattrs:
                        try:
                            xattrs[xname] = base64.b64decode(value + b"==", validate=False)
                        except ValueError as e:
                            raise ArchiveError(f"bad LIBARCHIVE xattr value for {shown(xname)}") from e
                elif key.startswith("GNU.sparse."):
                    sparse_keys = True
        if longname is not None:
            name = longname
        if longlink is not None:
            linkname = longlink
        if sparse_keys and _SPARSE_NAME in pax:  # the real name of a PAX sparse file (its header's is made up)
            name = pax[_SPARSE_NAME].decode("utf-8", "surrogateescape")
        if kind == DIR or (kind == REG and name.endswith("/") and ti.type == b"\0"):
            kind = DIR
        _check(kind, name, linkname, uid, gid, mtime_ns, ti.devmajor, ti.devminor, xattrs)
        sparse: tuple[tuple[int, int], ...] | None = None
        realsize = 0
        if kind == REG:
            self._pending = size
            self._pending_pad = _pad(size)
            if ti.gnu_sparse is not None or sparse_keys:
                size, sparse, realsize = self._sparse(name, ti, pax, sparse00, size)
        else:
            if sparse_keys or ti.gnu_sparse is not None:
                raise ArchiveError(f"tar entry {shown(name)}: GNU sparse records on an entry that is not a file")
            # Header-only types: links, directories, devices and FIFOs have no data blocks, whatever
            # their size field says.
            self._pending = 0
            self._pending_pad = 0
        return Entry(
            name=name,
            type=kind,
            mode=ti.mode & 0o7777,
            uid=uid,
            gid=gid,
            size=size if kind == REG else 0,
            mtime_ns=mtime_ns,
            linkname=linkname,
            uname=uname,
            gname=gname,
            devmajor=ti.devmajor,
            devminor=ti.devminor,
            xattrs=xattrs,
            sparse=sparse,
            realsize=realsize,
        )

    # -- GNU sparse files -----------------------------------------------------------------------------
    def _sparse(self, name: str, ti: Header, pax: dict[str, bytes], pairs: list[tuple[str, bytes]],
                size: int) -> tuple[int, tuple[tuple[int, int], ...], int]:
        """The map of a GNU sparse file in any of its encodings (old GNU header and extension blocks, PAX
        0.0, 0.1 and 1.0), checked; returns the data's length in the stream, the data segments and the real
        size. The stream is then at the first data byte (PAX 1.0's map, which precedes the data in the
        payload, and old GNU extension blocks are raw bytes of the record)."""
        segments: list[tuple[int, int]]
        if ti.gnu_sparse is not None:
            if any(k.startswith("GNU.sparse.") for k in pax):
                raise ArchiveError(f"sparse file {shown(name)}: both an old GNU and a PAX sparse map")
            segments, more, realsize = ti.gnu_sparse
            while more:
                if len(segments) > SPARSE_SEGMENTS_MAX:
                    break
                block = self._read_exact(BLOCK, "a sparse map")
                self._raw(block)
                try:
                    ext, more = _gnu_map(block, 0, 21)
                except ArchiveError as e:
                    raise ArchiveError(f"sparse file {shown(name)}: {e.message}") from None
                segments += ext
        else:
            major, minor = pax.get("GNU.sparse.major"), pax.get("GNU.sparse.minor")
            version = (major, minor) if major is not None or minor is not None else None
            size_key = "GNU.sparse.realsize" if version == (b"1", b"0") else "GNU.sparse.size"
            real = pax.get(size_key, pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size")))
            if real is None:
                raise ArchiveError(f"sparse file {shown(name)}: no real size in its PAX records")
            realsize = _sparse_int(name, real)
            if version == (b"1", b"0"):
                segments, used = self._map_in_data(name, size)
                size -= used
            elif version not in (None, (b"0", b"0"), (b"0", b"1")):
                raise ArchiveError(f"sparse file {shown(name)}: unknown GNU sparse format "
                                   f"{shown((major or b'').decode('ascii', 'replace'))}."
                                   f"{shown((minor or b'').decode('ascii', 'replace'))}")
            elif "GNU.sparse.map" in pax:  # 0.1
                text = pax["GNU.sparse.map"]
                numbers = [_sparse_int(name, v) for v in text.split(b",")] if text else []
                if len(numbers) % 2:
                    raise ArchiveError(f"sparse file {shown(name)}: its map has an odd count of numbers")
                segments = list(zip(numbers[::2], numbers[1::2], strict=True))
            else:  # 0.0: offset and length records, alternating
                if len(pairs) % 2 or any(k != (_SPARSE_OFFSET, _SPARSE_LENGTH)[i % 2] for i, (k, _) in
                                         enumerate(pairs)):
                    raise ArchiveError(f"sparse file {shown(name)}: its offset and length records do not pair up")
                numbers = [_sparse_int(name, v) for _, v in pairs]
                segments = list(zip(numbers[::2], numbers[1::2], strict=True))
            if version != (b"1", b"0") and "GNU.sparse.numblocks" in pax and \
                    _sparse_int(name, pax["GNU.sparse.numblocks"]) != len(segments):
                raise ArchiveError(f"sparse file {shown(name)}: its map does not have the number of segments "
                                   "it announces")
        return size, _check_sparse(name, segments, realsize, size), realsize

    def _map_in_data(self, name: str, size: int) -> tuple[list[tuple[int, int]], int]:
        """PAX 1.0: the map at the start of the payload, in blocks of decimal numbers one a line (the count
        of segments, then offset and length of each). Returns the segments and the bytes the map used."""
        buf = bytearray()
        numbers: list[int] = []
        want = -1  # numbers the map holds once its count is read
        pos = 0
        while want < 0 or len(numbers) < want:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if self._pending < BLOCK:
                    raise ArchiveError(f"sparse file {shown(name)}: its map runs past its data")
                if len(buf) >= _SPARSE_MAP_BYTES_MAX:
                    raise ArchiveError(f"sparse file {shown(name)}: its map is larger than "
                                       f"{_SPARSE_MAP_BYTES_MAX} bytes")
                block = self._read_exact(BLOCK, "a sparse map")
                self._raw(block)
                self._pending -= BLOCK
                buf += block
                continue
            numbers.append(_sparse_int(name, bytes(buf[pos:nl])))
            pos = nl + 1
            if want < 0:
                if numbers[0] > SPARSE_SEGMENTS_MAX:
                    raise ArchiveError(f"sparse file {shown(name)}: more than {SPARSE_SEGMENTS_MAX} segments")
                want = 1 + 2 * numbers[0]
        return list(zip(numbers[1::2], numbers[2::2], strict=True)), len(buf)


_SPARSE_OFFSET = "GNU.sparse.offset"
_SPARSE_LENGTH = "GNU.sparse.numbytes"
_SPARSE_NAME = "GNU.sparse.name"
SPARSE_SEGMENTS_MAX = 1 << 18  # data segments in one sparse file's map
_SPARSE_MAP_BYTES_MAX = 16 << 20
SPARSE_SIZE_MAX = (1 << 44) - 4096  # a sparse file's real size: the largest file ext4 holds (4 KiB blocks)


def _sparse_int(name: str, value: bytes) -> int:
    if not value.isdigit() or len(value) > 19:
        raise ArchiveError(f"sparse file {shown(name)}: bad number {shown(value[:32])} in its map")
    return int(value)


def _check_sparse(name: str, segments: list[tuple[int, int]], realsize: int,
                  size: int) -> tuple[tuple[int, int], ...]:
    """The data segments of a sparse map (empty ones dropped), once the map is sound: offsets ascending,
    segments apart and within the real size, their lengths adding up to the data in the stream."""
    if len(segments) > SPARSE_SEGMENTS_MAX:
        raise ArchiveError(f"sparse file {shown(name)}: more than {SPARSE_SEGMENTS_MAX} segments")
    if not 0 <= realsize <= SPARSE_SIZE_MAX:
        raise ArchiveError(f"sparse file {shown(name)}: real size {realsize} is out of range "
                           f"(at most {SPARSE_SIZE_MAX})")
    end = 0
    total = 0
    for offset, length in segments:
        if offset < end or length < 0:
            raise ArchiveError(f"sparse file {shown(name)}: its map's segments overlap or are out of order")
        end = offset + length
        if end > realsize:
            raise ArchiveError(f"sparse file {shown(name)}: its map reaches beyond its real size {realsize}")
        total += length
    if total != size:
        raise ArchiveError(f"sparse file {shown(name)}: its map holds {total} bytes, its data {size}")
    return tuple((o, n) for o, n in segments if n)


NAME_MAX = 255  # bytes in one component of a name (every Linux filesystem's limit)
SYMLINK_MAX = 4095  # bytes in a symlink's target (PATH_MAX less its NUL)
XATTR_NAME_MAX = 255  # bytes in an extended attribute's name
XATTR_SIZE_MAX = 65536  # bytes in an extended attribute's value
ID_MAX = 4294967294  # the largest uid or gid ((uid_t)-1 means "no change" to chown)
_LONG_COMPONENT = re.compile(f"[^/]{{{NAME_MAX // 4 + 1},}}")  # components that may be longer than NAME_MAX bytes
_TIME_MAX = (1 << 63) - 1  # seconds of a time_t
_CAPABILITY_FORMATS = {(20, b"\x02"), (24, b"\x03")}  # struct vfs_cap_data: size, revision (high byte, LE)


def _encoded(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _check(kind: str, name: str, linkname: str, uid: int, gid: int, mtime_ns: int, devmajor: int, devminor: int,
           xattrs: dict[str, bytes]) -> None:
    """Refuse an entry no Linux tree can hold, whatever the driver: every driver, those that keep the
    stream as it is included, reads archives through this reader, so a layer is valid or invalid alike
    on all of them."""
    if not name:
        raise ArchiveError("tar entry without a name")
    if "\0" in name or "\0" in linkname:
        raise ArchiveError(f"tar entry name {shown(name)} contains a NUL byte")
    last = len(name.rstrip("/"))
    for m in _LONG_COMPONENT.finditer(name):  # a regular expression: names can be thousands of levels deep
        c = m.group()
        # a whiteout names what it deletes after its prefix: only that must fit
        limit = NAME_MAX + len(whiteout.PREFIX) if m.end() == last and c.startswith(whiteout.PREFIX) else NAME_MAX
        if _encoded(c) > limit:
            raise ArchiveError(f"tar entry {shown(name)}: a name component is longer than {NAME_MAX} bytes")
    if kind == SYM and not 0 < _encoded(linkname) <= SYMLINK_MAX:
        raise ArchiveError(f"symlink {shown(name)}: its target must be 1 to {SYMLINK_MAX} bytes long")
    if not (0 <= uid <= ID_MAX and 0 <= gid <= ID_MAX):
        raise ArchiveError(f"tar entry {shown(name)}: owner {uid}:{gid} is out of range")
    if not -_TIME_MAX - 1 <= mtime_ns // 1_000_000_000 <= _TIME_MAX:
        raise ArchiveError(f"tar entry {shown(name)}: modification time out of range")
    if kind in (CHR, BLK) and not (0 <= devmajor < 1 << 12 and 0 <= devminor < 1 << 20):
        raise ArchiveError(f"device {shown(name)}: number {devmajor}:{devminor} is out of range")
    for key, value in xattrs.items():
        if not key or "\0" in key or _encoded(key) > XATTR_NAME_MAX:
            raise ArchiveError(f"tar entry {shown(name)}: bad extended attribute name {shown(key)}")
        if len(value) > XATTR_SIZE_MAX:
            raise ArchiveError(f"tar entry {shown(name)}: extended attribute {shown(key)} is larger than "
                               f"{XATTR_SIZE_MAX} bytes")
        if key == "security.capability" and (len(value), value[3:4]) not in _CAPABILITY_FORMATS:
            raise ArchiveError(f"tar entry {shown(name)}: security.capability is not a file capability set "
                               "(revision 2 of 20 bytes or revision 3 of 24)")


def _pax_int(key: str, value: bytes) -> int:
    try:
        v = int(value.split(b".")[0])
    except ValueError as e:
        raise ArchiveError(f"bad PAX {key} {value[:32]!r}") from e
    if v < 0:
        raise ArchiveError(f"bad PAX {key}: negative")
    return v

"""Where image archives are read from and written to: a directory or a tar file.

Format modules (:mod:`lamina.formats.ocilayout`, :mod:`lamina.formats.dockerarchive`) see only :class:`Source` and
:class:`Sink`; every filesystem decision lives here.

Reading is safe against hostile archives: a tar is indexed once from its headers (members are never
extracted; names with ``..`` or a leading ``/`` are refused, and only regular files can be opened), and a
directory is walked component by component with ``O_NOFOLLOW`` relative to its own descriptor, so a
symlinked ``manifest.json`` or blob cannot lead outside it. Writing goes to a temporary name beside the
destination that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from lamina.errors import ArchiveError, ExportError, InvalidDocument, UnsafePathError
from lamina.formats.imagemodel import BlobSource
from lamina.tar.compression import Readable
from lamina.tar.format import BLOCK, Header, parse_pax

CHUNK = 1 << 20



def check_member_name(name: str, what: str = "archive member") -> str:
    """A relative, ``..``-free name with no empty components; returned normalized."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{what} name {name!r} is not a valid relative path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise UnsafePathError(f"{what} name {shown!r} leads outside the archive")
    return "/".join(parts)


class Source(Protocol):
    description: str

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> Readable: ...

    def resolve_layer(self, name: str) -> str: ...

    def close(self) -> None: ...


# -- directories ----------------------------------------------------------------------------------------
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirSource:
    def __init__(self, path: Path) -> None:
        self.description = str(path)
        try:
            self._fd = os.open(path, _O_DIR)
        except OSError as e:
            raise ArchiveError(f"cannot open {path}: {e.strerror}") from e

    def _open_fd(self, name: str) -> int:
        parts = check_member_name(name).split("/")
        fd = self._fd
        opened: list[int] = []
        try:
            for comp in parts[:-1]:
                fd = os.open(comp, _O_DIR, dir_fd=fd)
                opened.append(fd)
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise ArchiveError(f"{self.description}: {name} is missing") from None
        except OSError as e:
            if e.errno in (40, 20):  # ELOOP, ENOTDIR: a symlink or a file where a directory should be
                raise UnsafePathError(f"{self.description}: {name} is a symlink or crosses one; refused") from None
            raise ArchiveError(f"{self.description}: cannot open {name}: {e.strerror}") from e
        finally:
            for o in opened:
                os.close(o)
        st = os.fstat(leaf)
        if not stat.S_ISREG(st.st_mode):
            os.close(leaf)
            raise UnsafePathError(f"{self.description}: {name} is not a regular file")
        return leaf

    def exists(self, name: str) -> bool:
        try:
            os.close(self._open_fd(name))
        except ArchiveError:
            return False
        return True

    def size(self, name: str) -> int:
        fd = self._open_fd(name)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def open(self, name: str) -> Readable:
        return os.fdopen(self._open_fd(name), "rb", buffering=0)

    def resolve_layer(self, name: str) -> str:
        return check_member_name(name)  # directories: symlinks are refused when opened

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- tar files ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Member:
    type: bytes
    offset: int
    size: int
    linkname: str = ""


class _Slice:
    """A bounded reader over one member of a tar file."""

    def __init__(self, path: str, offset: int, size: int, name: str) -> None:
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed at the end of the member or by close()
        self._f.seek(offset)
        self._left = size
        self._name = name

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            self.close()
            return b""
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(want)
        if not data:
            self.close()
            raise ArchiveError(f"archive member {self._name} is truncated")
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


def _pad(n: int) -> int:
    return -n % BLOCK


class TarSource:
    """An uncompressed tar archive, indexed from its headers in one pass."""

    MAX_MEMBERS = 100_000

    def __init__(self, path: Path) -> None:
        self.description = str(path)
        self._path = str(path)
        self._members: dict[str, _Member] = {}
        try:
            with open(path, "rb") as f:
                self._index(f)
        except OSError as e:
            raise ArchiveError(f"cannot read {path}: {e.strerror}") from e

    def _index(self, f: BinaryIO) -> None:
        pos = 0
        pax: dict[str, bytes] = {}
        longname: str | None = None
        while True:
            block = f.read(BLOCK)
            if len(block) == 0 and pos == 0:
                raise ArchiveError(f"{self.description} is empty")
            if len(block) == 0 and not pax and longname is None and f.tell() <= os.fstat(f.fileno()).st_size:
                return  # ends where a header would start: no end-of-archive blocks (docker and podman load these)
            if len(block) != BLOCK:
                raise ArchiveError(f"{self.description} is truncated inside a tar header")
            if block == b"\0" * BLOCK:
                return
            h = Header(block)
            if h.size < 0:
                raise ArchiveError(f"{self.description}: negative member size")
            pos += BLOCK
            if h.type in (b"x", b"X", b"g", b"L"):  # X: Solaris tar's PAX x header
                if h.size > 1 << 20:
                    raise ArchiveError(f"{self.description}: oversized tar extension header")
                data = f.read(h.size)
                if len(data) != h.size:
                    raise ArchiveError(f"{self.description} is truncated")
                f.seek(_pad(h.size), os.SEEK_CUR)
                pos += h.size + _pad(h.size)
                if h.type in (b"x", b"X"):
                    pax = parse_pax(data)
                elif h.type == b"L":  # cut at its first NUL, as every reader does
                    longname = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = longname or h.name
            if "path" in pax:
                name = pax["path"].decode("utf-8", "surrogateescape")
            size = h.size
            if "size" in pax:
                text = pax["size"]
                if not text.isdigit() or len(text) > 20:
                    raise ArchiveError(f"{self.description}: bad size in a PAX header")
                size = int(text)
            stripped = name.rstrip("/")
            if stripped not in ("", "."):
                name = check_member_name(stripped)
                if len(self._members) >= self.MAX_MEMBERS:
                    raise ArchiveError(f"{self.description} has more than {self.MAX_MEMBERS} members")
                link = pax["linkpath"].decode("utf-8", "surrogateescape") if "linkpath" in pax else h.linkname
                self._members[name] = _Member(h.type, pos, size, link)
            pax, longname = {}, None
            if h.type in (b"0", b"\0", b"7"):
                f.seek(size + _pad(size), os.SEEK_CUR)
                pos += size + _pad(size)

    def _member(self, name: str) -> _Member:
        m = self._members.get(check_member_name(name))
        if m is None:
            raise ArchiveError(f"{self.description}: {name} is missing")
        if m.type not in (b"0", b"\0", b"7"):
            raise UnsafePathError(f"{self.description}: {name} is not a regular file (links are refused)")
        return m

    def resolve_layer(self, name: str) -> str:
        """Where a layer member's data is: older ``docker save`` writes a repeated layer as a relative
        symlink to the first copy; such links are followed between members, never outside the archive.
        (Documents are never reached through links.)"""
        current = check_member_name(name)
        for _ in range(8):
            m = self._members.get(current)
            if m is None or m.type in (b"0", b"\0", b"7"):
                return current
            if m.type != b"2" or not m.linkname or m.linkname.startswith("/"):
                raise UnsafePathError(f"{self.description}: {name} is not a regular file (links are refused)")
            parent = current.rsplit("/", 1)[0] if "/" in current else ""
            joined = f"{parent}/{m.linkname}" if parent else m.linkname
            parts: list[str] = []
            for comp in joined.split("/"):
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if not parts:
                        raise UnsafePathError(f"{self.description}: {name} links outside the archive")
                    parts.pop()
                else:
                    parts.append(comp)
            current = check_member_name("/".join(parts))
        raise UnsafePathError(f"{self.description}: {name}: too many levels of links")

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
        except ArchiveError:
            return False
        return True

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> Readable:
        m = self._member(name)
        return _Slice(self._path, m.offset, m.size, name)

    def close(self) -> None:
        pass


def read_member(src: Source, name: str, limit: int) -> bytes:
    """A small member (a document) read whole, refused when larger than ``limit``."""
    size = src.size(name)
    if size > limit:
        raise InvalidDocument(f"{src.description}: {name} is {size} bytes; documents are limited to {limit}")
    f = src.open(name)
    parts = []
    while chunk := f.read(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def open_source(path: str | os.PathLike[str]) -> Source:
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise ArchiveError(f"cannot open {p}: {e.strerror}") from e
    if stat.S_ISDIR(st.st_mode):
        return DirSource(p)
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{p} is neither a directory nor a tar file")
    with open(p, "rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":
        raise ArchiveError(f"{p} is compressed; decompress it first (lamina reads plain tar archives)")
    if len(head) < 512 or head[257:262] != b"ustar":
        raise ArchiveError(f"{p} is not a tar archive or an image directory")
    return TarSource(p)


# -- writing --------------------------------------------------------------------------------------------
class Sink(Protocol):
    def add_bytes(self, name: str, data: bytes) -> None: ...

    def add_blob(self, name: str, blob: BlobSource) -> None:
        """``blob.size`` bytes: copied into the archive's file by ``blob.copy_to`` when it has one."""

    def has(self, name: str) -> bool: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


def _check_size(name: str, written: int, size: int) -> None:
    if written != size:
        raise ExportError(f"{name}: wrote {written} bytes, expected {size}")


def _temp_beside(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lamina-{secrets.token_hex(6)}")


class DirSink:
    """Writes an image directory at ``dest`` (which must not exist, or be an empty directory)."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise ExportError(f"{dest} already exists and is not an empty directory")
        self._tmp = _temp_beside(dest)
        try:
            self._tmp.mkdir(mode=0o755)
        except OSError as e:
            raise ExportError(f"cannot write {dest}: {e.strerror}") from e
        self._names: set[str] = set()

    def _path(self, name: str) -> Path:
        p = self._tmp / check_member_name(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._names.add(name)
        return p

    def has(self, name: str) -> bool:
        return name in self._names

    def add_bytes(self, name: str, data: bytes) -> None:
        self._path(name).write_bytes(data)

    def add_stream(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        written = 0
        with open(self._path(name), "wb") as f:
            for c in chunks:
                f.write(c)
                written += len(c)
        _check_size(name, written, size)

    def add_blob(self, name: str, blob: BlobSource) -> None:
        if blob.copy_to is None:
            self.add_stream(name, blob.size, blob.chunks())
            return
        with open(self._path(name), "w+b", buffering=0) as f:
            written = blob.copy_to(f.fileno())
        _check_size(name, written, blob.size)

    def commit(self) -> None:
        if self.dest.exists():
            self.dest.rmdir()
        os.rename(self._tmp, self.dest)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class TarSink:
    """Writes a deterministic tar archive (root-owned entries, mtime 0) at ``dest``."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        if dest.is_dir():
            raise ExportError(f"{dest} is a directory; give a file name for the archive")
        self._tmp = _temp_beside(dest)
        try:  # unbuffered: blobs are copied into it by the kernel, between the headers written here
            self._f = open(self._tmp, "w+b", buffering=0)  # noqa: SIM115 - closed by commit() or abort()
        except OSError as e:
            raise ExportError(f"cannot write {dest}: {e.strerror}") from e
        except BaseException:  # interrupted as the file was made: it goes
            self._tmp.unlink(missing_ok=True)
            raise
        self._names: set[str] = set()
        self._dirs: set[str] = set()

    def _header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = size
        ti.type = kind
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        ti.mtime = 0
        ti.uname = ti.gname = ""
        self._write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._header(d + "/", 0, tarfile.DIRTYPE)

    def has(self, name: str) -> bool:
        return name in self._names

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add_stream(name, len(data), iter([data]))

    def _member(self, name: str, size: int) -> str:
        name = check_member_name(name)
        self._parents(name)
        self._names.add(name)
        self._header(name, size)
        return name

    def add_stream(self, name: str, size: int, chunks: Iterator[bytes]) -> None:
        name = self._member(name, size)
        pending = bytearray()  # small pieces (an exact tar's headers) gathered into fewer writes
        written = 0
        for c in chunks:
            written += len(c)
            if written > size:
                raise ExportError(f"{name}: more data than the {size} bytes announced")
            if len(c) >= CHUNK:
                self._write(pending)
                self._write(c)
                pending = bytearray()
                continue
            pending += c
            if len(pending) >= CHUNK:
                self._write(pending)
                pending = bytearray()
        _check_size(name, written, size)
        self._write(pending + b"\0" * _pad(size))

    def add_blob(self, name: str, blob: BlobSource) -> None:
        if blob.copy_to is None:
            self.add_stream(name, blob.size, blob.chunks())
            return
        name = self._member(name, blob.size)
        _check_size(name, blob.copy_to(self._f.fileno()), blob.size)
        self._write(b"\0" * _pad(blob.size))

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[self._f.write(view) or 0:]

    def commit(self) -> None:
        self._write(b"\0" * (2 * BLOCK))
        self._f.close()
        os.rename(self._tmp, self.dest)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the close's flush too: the file goes anyway
            self._f.close()
        self._tmp.unlink(missing_ok=True)

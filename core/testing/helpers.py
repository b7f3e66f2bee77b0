"""Helpers for tests: build layer tars, snapshot trees, gate on root and tools."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from typing import Any

from lamina.tar import whiteout

_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (a skip is a failure under CI=true)")
    pytest.skip(reason)


def require_root() -> None:
    """Skip unless running as root; under ``CI=true`` fail instead."""
    if os.geteuid() != 0:
        _skip_or_fail("requires root")


def require_tool(name: str) -> str:
    """Return the path of ``name`` on PATH; skip (fail under ``CI=true``) when missing."""
    path = shutil.which(name)
    if path is None:
        _skip_or_fail(f"requires {name} on PATH")
        raise AssertionError("unreachable")
    return path


@dataclass
class _Item:
    name: str
    kind: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    linkname: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


class TarBuilder:
    """Build a layer tar in memory, in the order entries are added."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.items: list[_Item] = []
        self.fmt = fmt

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "dir", mode=mode, **kw))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "file", data=data, mode=mode, **kw))
        return self

    def symlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "symlink", linkname=target, mode=0o777, **kw))
        return self

    def hardlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "hardlink", linkname=target, **kw))
        return self

    def fifo(self, name: str, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "fifo", **kw))
        return self

    def char(self, name: str, major: int, minor: int, **kw: Any) -> TarBuilder:
        self.items.append(_Item(name, "char", devmajor=major, devminor=minor, **kw))
        return self

    def whiteout(self, path: str) -> TarBuilder:
        return self.file(whiteout.whiteout_of(path), mode=0o600)

    def opaque(self, directory: str) -> TarBuilder:
        return self.file(whiteout.opaque_of(directory), mode=0o600)

    def build(self, compression: str = "none") -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self.fmt) as tf:
            for it in self.items:
                ti = tarfile.TarInfo(it.name)
                ti.type = _TYPES[it.kind]
                ti.mode, ti.uid, ti.gid, ti.mtime = it.mode, it.uid, it.gid, it.mtime
                ti.uname = ti.gname = ""
                ti.linkname = it.linkname
                ti.devmajor, ti.devminor = it.devmajor, it.devminor
                if it.xattrs:
                    ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                      for k, v in it.xattrs.items()}
                if it.kind == "file":
                    ti.size = len(it.data)
                    tf.addfile(ti, io.BytesIO(it.data))
                else:
                    tf.addfile(ti)
        return compress(buf.getvalue(), compression)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        import gzip

        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    if compression == "xz":
        import lzma

        return lzma.compress(data)
    raise ValueError(compression)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tree_snapshot(root: str, *, times: bool = False) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree, keyed by relative path (never following symlinks)."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        extra = ("link", first)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                import xattr

                xs = tuple(sorted((k, xattr.getxattr(p, k, symlink=True)) for k in xattr.listxattr(p, symlink=True)
                                  if not k.startswith(("trusted.overlay.", "user.overlay."))))
            except OSError:
                xs = ()
            row: tuple[Any, ...] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, extra, xs)
            if times and not stat.S_ISDIR(st.st_mode):
                row += (st.st_mtime_ns // 1_000_000_000,)
            out[rel] = row
    return out

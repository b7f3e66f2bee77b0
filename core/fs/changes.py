"""Naive diffs: compare a layer's full tree with its parent's, and write the differences as a tar.

This is the generic fallback every driver can use (vfs always does; overlay when its native diff is
unsafe). Deletions become OCI whiteouts. Output is deterministic: entries sorted by path, times truncated
to whole seconds, no user or group names, whiteouts dated at the epoch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lamina.contract import Change
from lamina.fs.ops import DirStack, Root, lstat_at
from lamina.tar import whiteout

if TYPE_CHECKING:
    import tarfile

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SKIP_XATTR = ("trusted.overlay.", "user.overlay.")


def xattrs_of(dfd: int, name: str, st: os.stat_result) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        if stat.S_ISLNK(st.st_mode):
            import xattr

            p = f"/proc/self/fd/{dfd}/{name}"
            for n in xattr.listxattr(p, symlink=True):
                if not n.startswith(_SKIP_XATTR):
                    out[n] = xattr.getxattr(p, n, symlink=True)
        elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            flags = _DIR if stat.S_ISDIR(st.st_mode) else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dfd) if name else os.dup(dfd)
            try:
                for n in os.listxattr(fd):
                    if not n.startswith(_SKIP_XATTR):
                        out[n] = os.getxattr(fd, n)
            finally:
                os.close(fd)
        else:
            p = f"/proc/self/fd/{dfd}/{name}"
            import xattr

            for n in xattr.listxattr(p, symlink=True):
                if not n.startswith(_SKIP_XATTR):
                    out[n] = xattr.getxattr(p, n, symlink=True)
    except OSError:
        return out
    return out


def entry_differs(a: os.stat_result, afd: int, aname: str, b: os.stat_result, bfd: int, bname: str) -> bool:
    """Whether two entries differ as a layer diff sees it (directory times and sizes do not count)."""
    if a.st_mode != b.st_mode or a.st_uid != b.st_uid or a.st_gid != b.st_gid or a.st_rdev != b.st_rdev:
        return True
    if not stat.S_ISDIR(a.st_mode):
        if a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns:
            return True
        if stat.S_ISLNK(a.st_mode) and os.readlink(aname, dir_fd=afd) != os.readlink(bname, dir_fd=bfd):
            return True
    return xattrs_of(afd, aname, a) != xattrs_of(bfd, bname, b)


def _differs(a: os.stat_result | None, b: os.stat_result | None, afd: int, bfd: int, name: str) -> bool:
    if a is None or b is None:  # vanished while being compared
        return True
    return entry_differs(a, afd, name, b, bfd, name)


def tree_changes(layer_dir: str, parent_dir: str | None) -> list[Change]:
    """Changes of ``layer_dir`` against ``parent_dir`` (None: everything is added), sorted by path.

    Both trees are walked side by side, depth first without recursion, each through a
    :class:`~lamina.fs.ops.DirStack` (bounded fds, no path longer than a name), so any depth works.
    """
    out: list[Change] = []
    lfd = os.open(layer_dir, _DIR)
    try:
        if parent_dir is None:
            added_below(lfd, "", out)
        else:
            pfd = os.open(parent_dir, _DIR)
            try:
                _compare(lfd, pfd, out)
            finally:
                os.close(pfd)
    finally:
        os.close(lfd)
    out.sort(key=lambda c: c.path)
    return out


def added_below(fd: int, rel: str, out: list[Change], skip: Callable[[os.stat_result], bool] | None = None) -> None:
    """An ``A`` for everything below the directory ``fd`` (at ``rel``), but entries ``skip`` says to leave
    out (and, for directories, what they hold)."""
    with DirStack(fd) as stack:
        frames: list[tuple[str, list[str]]] = []  # per directory entered: its path, subdirectories to visit
        where, subdirs = rel, []
        while True:
            with os.scandir(stack.fd) as it:
                for e in it:
                    if skip is not None or not _plain(e):
                        st = _lstat(e)
                        if st is None or (skip is not None and skip(st)):
                            continue
                    out.append(Change(f"{where}/{e.name}", "A"))
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(e.name)
            while not subdirs and frames:
                stack.pop()
                where, subdirs = frames.pop()
            if not subdirs:
                return
            name = subdirs.pop()
            stack.push(name)
            frames.append((where, subdirs))
            where, subdirs = f"{where}/{name}", []


def _plain(e: os.DirEntry[str]) -> bool:
    """A file, directory or symlink by its directory entry (no stat needed)."""
    return e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False) or e.is_symlink()


def _lstat(e: os.DirEntry[str]) -> os.stat_result | None:
    try:
        return e.stat(follow_symlinks=False)
    except FileNotFoundError:  # gone, or an overlay whiteout its mount lists but does not show
        return None


def _added_dir(parent_fd: int, name: str, path: str, out: list[Change]) -> None:
    cfd = os.open(name, _DIR, dir_fd=parent_fd)
    try:
        added_below(cfd, path, out)
    finally:
        os.close(cfd)


@dataclass
class _Pair:
    """A directory present in both trees, being compared."""

    path: str
    differs: bool  # its own metadata
    start: int  # len(out) when it was entered: anything appended since is a change below it
    subdirs: list[str] = field(default_factory=list)  # directories of both trees, not yet compared


def _compare(lfd: int, pfd: int, out: list[Change]) -> None:
    """Append the changes below two directories; a directory counts as changed when its metadata differs
    or anything below it changed."""
    with DirStack(lfd) as mine, DirStack(pfd) as theirs:
        frames = [_Pair("", False, 0)]
        while True:
            top = frames[-1]
            _compare_entries(mine.fd, theirs.fd, top, out)
            while not top.subdirs:
                frames.pop()
                if not frames:
                    return
                if top.differs or len(out) > top.start:
                    out.append(Change(top.path, "C"))
                mine.pop()
                theirs.pop()
                top = frames[-1]
            name = top.subdirs.pop()
            differs = _differs(lstat_at(mine.fd, name), lstat_at(theirs.fd, name), mine.fd, theirs.fd, name)
            mine.push(name)
            theirs.push(name)
            frames.append(_Pair(f"{top.path}/{name}", differs, len(out)))


def _compare_entries(lfd: int, pfd: int, pair: _Pair, out: list[Change]) -> None:
    """The entries of one pair of directories: changes for everything but directories in both trees,
    which go to ``pair.subdirs``."""
    theirs = set(os.listdir(pfd))
    mine: set[str] = set()
    for name in os.listdir(lfd):
        path = f"{pair.path}/{name}"
        st = lstat_at(lfd, name)
        if st is None:
            continue  # gone, or an overlay whiteout its mount lists but does not show
        mine.add(name)
        old = lstat_at(pfd, name) if name in theirs else None
        if old is None:
            out.append(Change(path, "A"))
            if stat.S_ISDIR(st.st_mode):
                _added_dir(lfd, name, path, out)
            continue
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(old.st_mode):
            pair.subdirs.append(name)
            continue
        if stat.S_ISDIR(old.st_mode) != stat.S_ISDIR(st.st_mode):
            # Replaced by another kind: a deletion of the old subtree and a new entry.
            out.append(Change(path, "C"))
            if stat.S_ISDIR(st.st_mode):
                _added_dir(lfd, name, path, out)
            continue
        if _differs(st, old, lfd, pfd, name):
            out.append(Change(path, "C"))
    for name in theirs:
        if name not in mine and lstat_at(pfd, name) is not None:
            out.append(Change(f"{pair.path}/{name}", "D"))


# -- tar writing --------------------------------------------------------------------------------------


def _header(name: str, st: os.stat_result, linkname: str, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
    import tarfile  # (imported when a diff is made: listings do without it)

    ti = tarfile.TarInfo(name)
    mode = st.st_mode
    ti.mode = stat.S_IMODE(mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = st.st_mtime_ns // 1_000_000_000
    ti.size = 0
    if stat.S_ISREG(mode):
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
    elif stat.S_ISDIR(mode):
        ti.type = tarfile.DIRTYPE
        ti.name = name + "/"
    elif stat.S_ISLNK(mode):
        ti.type = tarfile.SYMTYPE
        ti.linkname = linkname
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
    if xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in sorted(xattrs.items())}
    return ti


def header_bytes(ti: tarfile.TarInfo) -> bytes:
    import tarfile  # (imported when a diff is made: listings do without it)

    data: bytes = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return data


def whiteout_header(path: str) -> bytes:
    import tarfile  # (imported when a diff is made: listings do without it)

    ti = tarfile.TarInfo(whiteout.whiteout_of(path))
    ti.mode = 0
    ti.mtime = 0
    ti.uname = ti.gname = ""
    return header_bytes(ti)


def diff_tar(layer_dir: str, changes: list[Change]) -> Iterator[bytes]:
    """Yield a tar stream carrying ``changes`` (as returned by :func:`tree_changes` on ``layer_dir``)."""
    import tarfile

    seen_inodes: dict[tuple[int, int], str] = {}
    with Root(layer_dir) as root:
        for ch in sorted(changes, key=lambda c: c.path):
            rel = ch.path.lstrip("/")
            if ch.kind == "D":
                yield whiteout_header(rel)
                continue
            try:
                pfd, base, _ = root.parent(rel)
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            linkname = os.readlink(base, dir_fd=pfd) if stat.S_ISLNK(st.st_mode) else ""
            ti = _header(rel, st, linkname, xattrs_of(pfd, base, st))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = seen_inodes.get(key)
                if first is not None:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = first
                    ti.size = 0
                    yield header_bytes(ti)
                    continue
                seen_inodes[key] = rel
            yield header_bytes(ti)
            if ti.type == tarfile.REGTYPE and ti.size:
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    left = ti.size
                    while left:
                        chunk = os.read(fd, min(left, 1 << 20))
                        if not chunk:
                            chunk = bytes(min(left, 1 << 20))  # file shrank while being read
                        left -= len(chunk)
                        yield chunk
                finally:
                    os.close(fd)
                pad = (512 - ti.size % 512) % 512
                if pad:
                    yield bytes(pad)
    yield bytes(1024)


def diff_size(layer_dir: str, changes: list[Change]) -> int:
    total = 0
    with Root(layer_dir) as root:
        for ch in changes:
            if ch.kind == "D":
                continue
            try:
                pfd, base, _ = root.parent(ch.path.lstrip("/"))
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total

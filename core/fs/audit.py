"""Compare a layer's files with the tar entries it was applied from (``lamina system check``).

The entries are the layer's own tar stream, read back from its record; the files are the driver's diff
root. Only what applying reproduces exactly is compared: each path's last entry in the layer against the
object at that path (its type, a regular file's size, a symlink's target, and, where lamina applied as
the real root, permission bits and owners). Paths the layer itself made unjudgeable are left alone
rather than guessed at: paths below a whiteout or opaque marker of the same layer, below an entry that is
not a directory (the final one, or a later one that replaced a directory the entry was written into),
or reached through a symlink (which apply resolves, possibly through lower layers); device nodes, which
apply skips where it may not make them. Modification times and extended attributes are not compared.

Everything goes through directory fds opened with ``O_NOFOLLOW``, one level at a time from the nearest
directory already open, so a tree of any depth is walked without recursion and without building long
paths.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from lamina.errors import UnsafePathError
from lamina.fs.ops import normalize
from lamina.tar import whiteout
from lamina.tar.format import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Entry

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KIND = {REG: stat.S_ISREG, DIR: stat.S_ISDIR, SYM: stat.S_ISLNK, CHR: stat.S_ISCHR, BLK: stat.S_ISBLK,
         FIFO: stat.S_ISFIFO}
_NAMES = {REG: "a regular file", DIR: "a directory", SYM: "a symlink", CHR: "a character device",
          BLK: "a block device", FIFO: "a FIFO", LNK: "a hard link"}


@dataclass(frozen=True, slots=True)
class Mismatch:
    path: str
    what: str

    def __str__(self) -> str:
        shown = self.path if len(self.path) <= 120 else self.path[:58] + "..." + self.path[-58:]
        return f"{shown}: {self.what}"


def real_root() -> bool:
    """Whether this process is root outside any user namespace (owners and set-id bits apply as given)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return True
    return fields[:3] == ["0", "0", "4294967295"]


def _kind_of(mode: int) -> str:
    for t, test in _KIND.items():
        if test(mode):
            return _NAMES[t]
    return "something else"


class _Want(NamedTuple):
    """What a path's last entry says (the few fields compared, so a layer of a million entries stays small)."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int  # a regular file's length (a sparse file's real size)
    linkname: str
    at: int  # its place in the stream


class _Dirs:
    """Directory fds by layer-relative path, opened without following symlinks, an LRU of a few hundred."""

    def __init__(self, root_fd: int, size: int = 256) -> None:
        self.root_fd = root_fd
        self._open: OrderedDict[str, int] = OrderedDict()
        self._size = size

    def get(self, path: str) -> int:
        """The fd of directory ``path``; OSError when it is missing, not a directory, or a symlink."""
        if path == "":
            return self.root_fd
        fd = self._open.get(path)
        if fd is not None:
            self._open.move_to_end(path)
            return fd
        # the nearest open ancestor, then down one level at a time
        todo: list[str] = []
        head = path
        base_fd = self.root_fd
        while head:
            head, _, name = head.rpartition("/")
            todo.append(name)
            if head and head in self._open:
                base_fd = self._open[head]
                break
        at = head
        for name in reversed(todo):
            fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
            at = f"{at}/{name}" if at else name
            self._keep(at, fd)
            base_fd = fd
        return base_fd

    def _keep(self, path: str, fd: int) -> None:
        old = self._open.pop(path, None)
        if old is not None:
            os.close(old)
        self._open[path] = fd
        if len(self._open) > self._size:
            _, evicted = self._open.popitem(last=False)
            os.close(evicted)

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _judgeable(entries: Iterable[Entry]) -> tuple[dict[str, _Want], set[str], set[str], dict[str, int]]:
    """Each path's last entry; the paths (whiteouts) and directories (opaque markers) the layer itself hid;
    and for each path the last place in the stream where something not a directory replaced it (what the
    layer wrote below it before then went with it)."""
    final: dict[str, _Want] = {}
    hidden: set[str] = set()
    opaque: set[str] = set()
    cut: dict[str, int] = {}
    for index, e in enumerate(entries):
        try:
            path = normalize(e.name)
        except UnsafePathError:
            continue
        head, _, base = path.rpartition("/")
        if whiteout.is_whiteout(base):
            if base == whiteout.OPAQUE:
                opaque.add(head)
            elif not base.startswith(whiteout.META_PREFIX):
                hidden.add(f"{head}/{base[len(whiteout.PREFIX):]}" if head else base[len(whiteout.PREFIX):])
            continue
        if path:
            final.pop(path, None)  # keep stream order of last entries
            final[path] = _Want(e.type, e.mode, e.uid, e.gid, e.apparent_size, e.linkname, index)
            if e.type != DIR:
                cut[path] = index
    return final, hidden, opaque, cut


def compare(
    root: str | os.PathLike[str], entries: Iterable[Entry], *, metadata: bool | None = None
) -> Iterator[Mismatch]:
    """Mismatches between the tree at ``root`` and the layer's ``entries`` (see the module's doc).
    ``metadata`` (default: :func:`real_root`) also compares permission bits and owners."""
    if metadata is None:
        metadata = real_root()
    final, hidden, opaque, cut = _judgeable(entries)
    # directory -> (whether paths below it cannot be judged, the last place where it or a directory above
    # it was replaced by something else: entries below it from before then were removed with it)
    skip: dict[str, tuple[bool, int]] = {"": (False, -1)}

    def skipped(head: str) -> tuple[bool, int]:
        chain: list[str] = []
        d = head
        while d not in skip:
            chain.append(d)
            d = d.rpartition("/")[0]
        verdict, last = skip[d]
        for d in reversed(chain):  # from the top down
            if not verdict:
                e = final.get(d)
                verdict = d in hidden or d in opaque or (e is not None and e.type != DIR)
            last = max(last, cut.get(d, -1))
            skip[d] = (verdict, last)
        return verdict, last

    root_fd = os.open(root, _DIR_FLAGS)
    dirs = _Dirs(root_fd)
    try:
        for path, e in final.items():
            head, _, base = path.rpartition("/")
            unjudgeable, replaced = skipped(head)
            if path in hidden or unjudgeable or replaced > e.at:
                continue
            try:
                pfd = dirs.get(head)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # its directory is reported on its own, or was reached through a symlink
                raise
            try:
                st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                if e.type in (CHR, BLK) or (e.type == FIFO and not metadata):
                    continue  # device nodes are skipped where lamina may not make them
                yield Mismatch(path, f"missing ({_NAMES.get(e.type, 'an entry')} in the layer)")
                continue
            if e.type == LNK:
                continue  # a hard link is whatever its target is
            test = _KIND.get(e.type)
            if test is None:
                continue
            if not test(st.st_mode):
                if e.type in (CHR, BLK, FIFO) and not metadata:
                    continue
                yield Mismatch(path, f"is {_kind_of(st.st_mode)}, the layer has {_NAMES[e.type]}")
                continue
            if e.type == REG and st.st_size != e.size:
                yield Mismatch(path, f"has {st.st_size} bytes, the layer has {e.size}")
            elif e.type == SYM:
                target = os.readlink(base, dir_fd=pfd)
                if target != e.linkname:
                    yield Mismatch(path, f"points to {target[:100]!r}, the layer has {e.linkname[:100]!r}")
            mode = stat.S_IMODE(st.st_mode)
            if metadata and e.type != SYM and mode != e.mode & 0o7777:
                yield Mismatch(path, f"has mode {mode:04o}, the layer has {e.mode & 0o7777:04o}")
            if metadata and (st.st_uid, st.st_gid) != (e.uid, e.gid):
                yield Mismatch(path, f"is owned by {st.st_uid}:{st.st_gid}, the layer has {e.uid}:{e.gid}")
    finally:
        dirs.close()
        os.close(root_fd)

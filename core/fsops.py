"""Directory-fd-relative filesystem operations confined to a root.

Every path handed to these helpers is a layer-relative name. Resolution walks it one component at a
time with ``openat(O_NOFOLLOW)``; a symlink met on the way is read and resolved *inside the root* (an
absolute target restarts at the root, ``..`` never climbs above it), exactly as if the root were ``/``.
The final component is never followed. Nothing here parses archive formats.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from lamina.errors import UnsafePathError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINK_HOPS = 40


def normalize(name: str) -> str:
    """Clean a layer-relative name; reject one that climbs out of the root.

    ``./a//b/`` → ``a/b``; ``/etc/passwd`` → ``etc/passwd``; ``a/../b`` → ``b``; ``../x`` → error.
    The root itself is ``""``.
    """
    parts: list[str] = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                raise UnsafePathError(f"entry {name!r} climbs out of the layer root")
            parts.pop()
            continue
        parts.append(c)
    return "/".join(parts)


class Root:
    """A directory tree addressed only through file descriptors."""

    def __init__(self, path: str | os.PathLike[str] | int, cache_size: int = 256) -> None:
        if isinstance(path, int):
            self.fd = os.dup(path)
        else:
            self.fd = os.open(path, _DIR_FLAGS)
        self._cache: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._cache_size = cache_size

    def close(self) -> None:
        self.invalidate()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invalidate(self) -> None:
        for fd, _ in self._cache.values():
            os.close(fd)
        self._cache.clear()

    # -- resolution ---------------------------------------------------------------------------------
    def dir(self, path: str, *, create: bool = False, mode: int = 0o755) -> tuple[int, str]:
        """An fd of directory ``path`` (resolved inside the root) and its real layer-relative path.

        The fd is owned by the cache: do not close it.
        """
        if path == "":
            return self.fd, ""
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        fd, real = self._walk(path, create, mode)
        self._cache[path] = (fd, real)
        if len(self._cache) > self._cache_size:
            _, (old, _) = self._cache.popitem(last=False)
            os.close(old)
        return fd, real

    def _walk(self, path: str, create: bool, mode: int) -> tuple[int, str]:
        todo = [c for c in path.split("/") if c not in ("", ".")]
        todo.reverse()
        stack: list[tuple[int, str]] = []  # opened dirs below the root, with their names
        hops = 0

        def cur() -> int:
            return stack[-1][0] if stack else self.fd

        try:
            while todo:
                c = todo.pop()
                if c == "..":
                    if stack:
                        os.close(stack.pop()[0])
                    continue
                try:
                    fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(c, mode, dir_fd=cur())
                    fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=cur(), follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        where = "/".join([n for _, n in stack] + [c])
                        raise NotADirectoryError(errno.ENOTDIR, "not a directory", where) from e
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links", path) from e
                    target = os.readlink(c, dir_fd=cur())
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[0])
                    parts = [p for p in target.split("/") if p not in ("", ".")]
                    todo.extend(reversed(parts))
                    continue
                stack.append((fd, c))
        except BaseException:
            for fd, _ in stack:
                os.close(fd)
            raise
        if not stack:
            return os.dup(self.fd), ""
        for fd, _ in stack[:-1]:
            os.close(fd)
        return stack[-1][0], "/".join(n for _, n in stack)

    def parent(self, path: str, *, create: bool = False) -> tuple[int, str, str]:
        """(fd of the parent directory, final component name, real path of the parent)."""
        head, _, base = path.rpartition("/")
        fd, real = self.dir(head, create=create)
        return fd, base, real

    def open_file(self, path: str) -> int:
        """Open a regular file for reading without following its final component."""
        pfd, base, _ = self.parent(path)
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", path)
        return fd


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _make_writable(
    func: Callable[..., Any], path: str, exc_info: tuple[type[BaseException], BaseException, TracebackType]
) -> None:
    """rmtree error handler: a read-only directory blocks removal when not root; open it up, retry."""
    exc = exc_info[1]
    if not isinstance(exc, PermissionError):
        raise exc
    parent = os.path.dirname(path) or "."
    os.chmod(parent, os.stat(parent, follow_symlinks=False).st_mode | stat.S_IRWXU)
    if func in (os.rmdir, os.unlink):
        func(path)
    else:
        shutil.rmtree(path, onerror=_make_writable)


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree even when it holds read-only directories (a non-root store's layers may)."""
    if os.geteuid() == 0:
        shutil.rmtree(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, os.stat(path, follow_symlinks=False).st_mode | stat.S_IRWXU)
    shutil.rmtree(path, onerror=_make_writable)


def remove_at(dir_fd: int, name: str, st: os.stat_result | None = None) -> bool:
    """Remove ``name`` below ``dir_fd`` whatever it is (directories recursively, symlink-safe).

    Returns True when something was removed.
    """
    if st is None:
        st = lstat_at(dir_fd, name)
        if st is None:
            return False
    if stat.S_ISDIR(st.st_mode):
        if os.geteuid() == 0:
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            rmtree(f"/proc/self/fd/{dir_fd}/{name}")
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def clear_dir(dir_fd: int, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Remove every child of an open directory except the names in ``keep``."""
    for name in os.listdir(dir_fd):
        if name not in keep:
            remove_at(dir_fd, name)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

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

    def __init__(
        self,
        path: str | os.PathLike[str] | int,
        cache_size: int = 256,
        on_denied: Callable[[int, str, str], None] | None = None,
        on_mkdir: Callable[[int, str, str], None] | None = None,
        defer_close: bool = False,
    ) -> None:
        """``on_denied(parent_fd, name, real_path)`` may open up a directory a walk was refused; the
        walk then retries once (used by non-root applies over read-only or unreadable directories).

        With ``defer_close``, fds evicted from the cache are closed only at :meth:`release` (a user that
        keeps one fd while resolving many other paths, as the apply engine does, needs that)."""
        self.on_denied = on_denied
        self.on_mkdir = on_mkdir  # creates a missing directory (parent fd, name, real path) instead of mkdir
        if isinstance(path, int):
            self.fd = os.dup(path)
        else:
            self.fd = os.open(path, _DIR_FLAGS)
        self._cache: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self._cache_size = cache_size
        self._stale: list[int] = []  # fds dropped from the cache that a caller may still be using
        self.defer_close = defer_close

    def close(self) -> None:
        self.invalidate()
        self.release()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invalidate(self) -> None:
        """Forget every resolved directory (after the tree changed under them). Their fds stay open until
        :meth:`release`: a caller may be working in one of them (the parent of what it just replaced)."""
        self._stale.extend(fd for fd, _ in self._cache.values())
        self._cache.clear()

    def release(self) -> None:
        """Close the fds :meth:`invalidate` and cache eviction set aside; call it where no fd handed out
        by :meth:`dir` or :meth:`parent` is in use any more."""
        stale, self._stale = self._stale, []
        for fd in stale:
            os.close(fd)

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
            if self.defer_close:
                self._stale.append(old)
            else:
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
                    try:
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                    except PermissionError:
                        if self.on_denied is None:
                            raise
                        self.on_denied(cur(), c, "/".join([n for _, n in stack] + [c]))
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        if self.on_mkdir is not None:
                            self.on_mkdir(cur(), c, "/".join([n for _, n in stack] + [c]))
                        else:
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


def _open_up(path: str) -> None:
    """Give the owner rwx on every directory of a tree, reaching unreadable ones through O_PATH."""
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            pfd = os.open(p, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
        try:
            mode = stat.S_IMODE(os.fstat(pfd).st_mode)
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(f"/proc/self/fd/{pfd}", mode | stat.S_IRWXU)
        finally:
            os.close(pfd)
        with contextlib.suppress(OSError), os.scandir(p) as it:
            stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree even when it holds read-only or unreadable directories (a non-root store's may)."""
    if os.geteuid() != 0:
        _open_up(os.fspath(path))
    shutil.rmtree(path)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False, mode: int = 0o644) -> bool:
    """Write a small file whole or not at all: a temporary file beside it, unique to this write (so
    processes writing the same file at once never share one), synced, then renamed over ``path``.

    With ``exclusive`` the file is only created, never replaced (``link`` instead of ``rename``): returns
    False when another writer created it first.
    """
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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

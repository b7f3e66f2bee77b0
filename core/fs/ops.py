"""Directory-fd-relative filesystem operations confined to a root.

Every path handed to these helpers is a layer-relative name. Resolution walks it one component at a
time with ``openat(O_NOFOLLOW)``; a symlink met on the way is read and resolved *inside the root* (an
absolute target restarts at the root, ``..`` never climbs above it), exactly as if the root were ``/``.
The final component is never followed. Nothing here parses archive formats.

Nothing here recurses on a tree's depth or holds a descriptor per level: trees thousands of levels deep
(far beyond ``PATH_MAX``) are walked with :class:`DirStack`, which keeps a bounded window of directory
fds open and reopens the others on the way back up.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable

from lamina.errors import UnsafePathError, shown

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINK_HOPS = 40
WINDOW = 16  # directory fds a walk keeps open at once, whatever the depth
_ANCESTORS = 64  # how far up Root.dir looks in its cache for a directory to start a walk from
_BATCH = 4096  # directory entries removed per scan of a directory


def normalize(name: str) -> str:
    """Clean a layer-relative name; reject one that climbs out of the root.

    ``./a//b/`` → ``a/b``; ``/etc/passwd`` → ``etc/passwd``; ``a/../b`` → ``b``; ``../x`` → error.
    The root itself is ``""``.
    """
    clean = name.strip("/")
    framed = f"/{clean}/"
    if "//" not in framed and "/./" not in framed and "/../" not in framed:
        return clean  # nothing to clean (found at C speed: a name can be thousands of levels deep)
    parts: list[str] = []
    for c in name.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                raise UnsafePathError(f"entry {shown(name)} climbs out of the layer root")
            parts.pop()
            continue
        parts.append(c)
    return "/".join(parts)


def follow(cur: str, target: str, todo: list[str]) -> str:
    """A walk by real path (``cur``, the names still to walk on ``todo``, the next last) meets a symlink to
    ``target``: its names go onto ``todo``; returns where the walk goes on (the root for an absolute
    target, ``..`` in it stopping there as the walk pops)."""
    todo.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
    return "" if target.startswith("/") else cur


class Root:
    """A directory tree addressed only through file descriptors."""

    def __init__(
        self,
        path: str | os.PathLike[str] | int,
        cache_size: int = 256,
        on_denied: Callable[[int, str, str], None] | None = None,
        on_mkdir: Callable[[int, str, str], None] | None = None,
        defer_close: bool = False,
        on_missing: Callable[[int, str, str], str | None] | None = None,
        on_notdir: Callable[[int, str, str, bool], bool] | None = None,
    ) -> None:
        """``on_denied(parent_fd, name, real_path)`` may open up a directory a walk was refused; the
        walk then retries once (used by non-root applies over read-only or unreadable directories).

        With ``defer_close``, fds evicted from the cache are closed only at :meth:`release` (a user that
        keeps one fd while resolving many other paths, as the apply engine does, needs that)."""
        self.on_denied = on_denied
        self.on_mkdir = on_mkdir  # creates a missing directory (parent fd, name, real path) instead of mkdir
        # For a tree that holds only the top of a stack (an overlay upper directory): a name the walk does
        # not find may be a symlink of the layers below, whose target (returned) the walk then follows.
        # A non-directory in the way (parent fd, name, real path, whether the walk creates) may be
        # replaced by a directory (True).
        self.on_missing = on_missing
        self.on_notdir = on_notdir
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

        The fd is owned by the cache: do not close it. The walk starts at the nearest directory above
        ``path`` the cache holds, so resolving the entries of a deep tree in order costs one ``openat``
        each, not one per level.
        """
        if path == "":
            return self.fd, ""
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        fd, real = self._walk(path, create, mode)
        self._remember(path, fd, real)
        return fd, real

    def _remember(self, path: str, fd: int, real: str) -> None:
        if path in self._cache:  # a caller may still use the fd cached first: keep that one
            os.close(fd)
            return
        self._cache[path] = (fd, real)
        while len(self._cache) > self._cache_size:
            _, (evicted, _) = self._cache.popitem(last=False)
            self._drop(evicted)

    def _drop(self, fd: int) -> None:
        if self.defer_close:
            self._stale.append(fd)
        else:
            os.close(fd)

    def _nearest(self, path: str) -> tuple[str, int, str] | None:
        """The closest directory above ``path`` in the cache: (its path, fd, real path)."""
        head = path
        for _ in range(_ANCESTORS):
            head = head.rpartition("/")[0]
            if not head:
                return None
            hit = self._cache.get(head)
            if hit is not None:
                self._cache.move_to_end(head)
                return head, hit[0], hit[1]
        return None

    def _walk(self, path: str, create: bool, mode: int) -> tuple[int, str]:
        head, rest = "", path
        base, base_fd = "", -1  # where the walk starts: real path and fd (owned; -1: the root)
        start = self._nearest(path)
        if start is not None:
            head, hfd, base = start
            rest = path[len(head) + 1 :]
            if base:
                base_fd = os.dup(hfd)
        names: list[str] = []  # directories entered below ``base``
        fds: list[int] = []  # their fds (-1: closed, reopened if needed)
        given = rest.split("/")
        todo = [c for c in given if c not in ("", ".")]
        todo.reverse()
        # While no symlink was met, the directories passed on the way are cached too (the last few):
        # walks back up a deep tree, deepest first, then find a start close by.
        keep = min(_ANCESTORS, self._cache_size // 4) if len(todo) == len(given) and ".." not in given else 0
        keep_from = len(given) - 1 - keep
        hops = 0
        step = 0

        def cur() -> int:
            if names:
                return fds[-1]
            return base_fd if base else self.fd

        def real(*more: str) -> str:
            return "/".join([*([base] if base else []), *names, *more])

        try:
            while todo:
                c = todo.pop()
                if c == "..":
                    if names:
                        names.pop()
                        old = fds.pop()
                        if old >= 0:
                            os.close(old)
                        if names and fds[-1] < 0:
                            fds[-1] = self._reopen(real())
                    elif base:
                        os.close(base_fd)
                        base, base_fd = base.rpartition("/")[0], -1
                        if base:
                            base_fd = self._reopen(base)
                    continue
                try:
                    try:
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                    except PermissionError:
                        if self.on_denied is None:
                            raise
                        self.on_denied(cur(), c, real(c))
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                except FileNotFoundError as e:
                    below = self.on_missing(cur(), c, real(c)) if self.on_missing is not None else None
                    if below is not None:
                        target = below
                    else:
                        if not create:
                            raise
                        with contextlib.suppress(FileExistsError):
                            if self.on_mkdir is not None:
                                self.on_mkdir(cur(), c, real(c))
                            else:
                                os.mkdir(c, mode, dir_fd=cur())
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                        target = None
                    if target is not None:
                        hops += 1
                        if hops > MAX_SYMLINK_HOPS:
                            raise OSError(errno.ELOOP, "too many levels of symbolic links", path) from e
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=cur(), follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if self.on_notdir is None or not self.on_notdir(cur(), c, real(c), create):
                            raise NotADirectoryError(errno.ENOTDIR, "not a directory", real(c)) from e
                        fd = os.open(c, _DIR_FLAGS, dir_fd=cur())
                        target = None
                    else:
                        target = os.readlink(c, dir_fd=cur())
                    if target is not None:
                        hops += 1
                        if hops > MAX_SYMLINK_HOPS:
                            raise OSError(errno.ELOOP, "too many levels of symbolic links", path) from e
                else:
                    target = None
                if target is not None:
                    if target.startswith("/"):
                        _close_all(fds)
                        names.clear()
                        if base:
                            os.close(base_fd)
                            base, base_fd = "", -1
                    parts = [p for p in target.split("/") if p not in ("", ".")]
                    todo.extend(reversed(parts))
                    continue
                names.append(c)
                fds.append(fd)
                if len(fds) > WINDOW and fds[-WINDOW - 1] >= 0:
                    os.close(fds[-WINDOW - 1])
                    fds[-WINDOW - 1] = -1
                if hops == 0:
                    if keep_from <= step < len(given) - 1:
                        prefix = "/".join(given[: step + 1])
                        self._remember(f"{head}/{prefix}" if head else prefix, os.dup(fd), real())
                    step += 1
        except BaseException:
            _close_all(fds)
            if base:
                os.close(base_fd)
            raise
        if not names:
            return (base_fd, base) if base else (os.dup(self.fd), "")
        if base:
            os.close(base_fd)
        fd = fds.pop()
        _close_all(fds)
        return fd, real()

    def _reopen(self, real: str) -> int:
        """Open the real directory ``real`` again from the root (it contains no symlink)."""
        return open_below(self.fd, real.split("/"))

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


class DirStack:
    """The directories from ``top`` down to the one being worked in, entered one name at a time.

    At most ``window`` of them stay open (``top``, borrowed, always does); one closed meanwhile is opened
    again on the way back up, through ``..`` checked to be the same directory (device and inode), or else by
    name from the nearest open one. A walk of a tree of any depth so holds a bounded number of fds and
    never builds a path longer than one name. Use it as a context manager (it closes what it opened).
    """

    def __init__(self, top: int, window: int = WINDOW) -> None:
        self._fds = [top]
        self._ids: list[tuple[int, int] | None] = [None]  # (st_dev, st_ino) of closed directories
        self.names: list[str] = []  # the name of each directory entered, below ``top``
        self.window = window

    def __enter__(self) -> DirStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        """The directory worked in (the last entered)."""
        return self._fds[-1]

    @property
    def depth(self) -> int:
        return len(self.names)

    def push(self, name: str, fd: int | None = None) -> int:
        """Enter the directory ``name`` of the current one (opened here unless ``fd``, opened by the caller,
        is given; it then belongs to the stack). Returns its fd."""
        if fd is None:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._fds[-1])
        self._fds.append(fd)
        self._ids.append(None)
        self.names.append(name)
        k = len(self._fds) - 1 - self.window
        if k >= 1 and self._fds[k] >= 0:
            st = os.fstat(self._fds[k])
            self._ids[k] = (st.st_dev, st.st_ino)
            os.close(self._fds[k])
            self._fds[k] = -1
        return fd

    def pop(self) -> None:
        """Leave the current directory for its parent."""
        if not self.names:
            raise ValueError("DirStack.pop at its top")
        child = self._fds.pop()
        self._ids.pop()
        self.names.pop()
        try:
            if self._fds[-1] < 0:
                self._fds[-1] = self._reopen(child)
        finally:
            os.close(child)

    def _reopen(self, child: int) -> int:
        k = len(self._fds) - 1
        want = self._ids[k]
        with contextlib.suppress(OSError):
            fd = os.open("..", _DIR_FLAGS, dir_fd=child)
            if _ident(fd) == want:
                return fd
            os.close(fd)
        j = k - 1
        while self._fds[j] < 0:
            j -= 1
        fd = open_below(self._fds[j], self.names[j:k])
        if _ident(fd) != want:
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "directory moved during the walk", "/".join(self.names))
        return fd

    def close(self) -> None:
        while len(self._fds) > 1:
            fd = self._fds.pop()
            if fd >= 0:
                os.close(fd)
        self._ids[1:] = []
        self.names.clear()


def open_below(dir_fd: int, names: Iterable[str]) -> int:
    """Open the directory reached from ``dir_fd`` through ``names``, one name at a time, following no
    symlink (a path of any length); the fd is the caller's."""
    fd = os.dup(dir_fd)
    try:
        for name in names:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_all(fds: list[int]) -> None:
    while fds:
        fd = fds.pop()
        if fd >= 0:
            os.close(fd)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _enter(parent_fd: int, name: str, is_root: bool) -> int:
    """Open a directory about to be emptied; without root, one its owner may not read, write or search
    is opened up first (directories only: files, which another layer may share, are never changed)."""
    if not is_root:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            mode = stat.S_IMODE(os.fstat(pfd).st_mode)
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(f"/proc/self/fd/{pfd}", mode | stat.S_IRWXU)
        finally:
            os.close(pfd)
    return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _sweep(fd: int) -> list[str]:
    """Unlink what is not a directory in the directory ``fd``, a batch of entries at a time, until a batch
    holds subdirectories: their names are returned. An empty list: the directory is empty."""
    while True:
        with os.scandir(fd) as it:
            batch = list(itertools.islice(it, _BATCH))
        if not batch:
            return []
        dirs = []
        for e in batch:
            if e.is_dir(follow_symlinks=False):
                dirs.append(e.name)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.name, dir_fd=fd)
        if dirs:
            return dirs


def _remove_dir(dir_fd: int, name: str) -> None:
    """Remove the directory ``name`` below ``dir_fd`` and everything in it, depth first, without
    recursion and with a bounded number of open fds."""
    is_root = os.geteuid() == 0
    with DirStack(dir_fd) as stack:
        stack.push(name, _enter(dir_fd, name, is_root))
        todo: list[list[str]] = [[]]  # per directory entered: subdirectories met, not yet removed
        while todo:
            subdirs = todo[-1]
            if not subdirs:
                subdirs += _sweep(stack.fd)
            if subdirs:
                sub = subdirs.pop()
                stack.push(sub, _enter(stack.fd, sub, is_root))
                todo.append([])
                continue
            todo.pop()
            done = stack.names[-1]
            stack.pop()
            os.rmdir(done, dir_fd=stack.fd)


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` and everything below it (a symlink itself, never what it points at), whatever its
    depth, even when it holds read-only or unreadable directories (a non-root store's may).
    :class:`FileNotFoundError` when there is nothing there."""
    head, base = os.path.split(os.path.abspath(os.fspath(path)))
    if not base:
        raise ValueError("rmtree of the root directory")
    pfd = os.open(head, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not remove_at(pfd, base):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(path))
    finally:
        os.close(pfd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False, mode: int = 0o644,
                 durable: bool = False) -> bool:
    """Write a small file whole or not at all: a temporary file beside it, unique to this write (so
    processes writing the same file at once never share one), synced, then renamed over ``path``.

    With ``exclusive`` the file is only created, never replaced (``link`` instead of ``rename``): returns
    False when another writer created it first. With ``durable`` the directory is synced too, so that the
    new name survives a power loss.
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
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if durable:
        dfd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def remove_at(dir_fd: int, name: str, st: os.stat_result | None = None) -> bool:
    """Remove ``name`` below ``dir_fd`` whatever it is (directories with everything in them, at any depth;
    a symlink itself). Returns True when something was removed.
    """
    if st is None:
        st = lstat_at(dir_fd, name)
        if st is None:
            return False
    if stat.S_ISDIR(st.st_mode):
        _remove_dir(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


def clear_dir(dir_fd: int, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Remove every child of an open directory except the names in ``keep``."""
    for name in os.listdir(dir_fd):
        if name not in keep:
            remove_at(dir_fd, name)

"""The safe apply engine: unpack a layer diff into a directory.

The tar stream is parsed by :mod:`lamina.tar.format`; every filesystem operation goes through
:class:`lamina.fs.ops.Root`, relative to directory fds, so no entry -- whatever its name, link target or the
symlinks already in the tree -- can write outside the layer root.

Rules, in the order a demanding user expects them:

- existing paths are unlinked and recreated; directories are merged;
- hard links may only point at files inside the tree being applied; a relative symlink may not lead
  above the root (absolute targets are read as relative to the root);
- ownership is numeric (names are ignored); ``chmod`` comes after ``chown`` so set-id bits survive;
- extended attributes are applied (``security.capability`` included) except overlay's private
  ``trusted.overlay.*``/``user.overlay.*``, which an archive may never set;
- a GNU sparse file is written segment by segment at its offsets and cut to its real size: holes stay
  holes, and the layer's size counts only its data;
- device nodes are skipped with a warning when the caller may not create them;
- modification times are set last, directories after their contents;
- OCI whiteouts are handed to the driver's :class:`WhiteoutStrategy`; malformed ones are rejected.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lamina.errors import ArchiveError, StoreError, UnsafePathError, shown, write_failure
from lamina.fs.ops import MAX_SYMLINK_HOPS, Root, follow, lstat_at, normalize, remove_at
from lamina.tar import whiteout
from lamina.tar.compression import DiffStream
from lamina.tar.format import BLK, CHR, DIR, FIFO, LNK, REG, SYM, Entry, Recorder, TarReader
from lamina.tar.split import RecordWriter

try:
    from lamina.fs import _native
except ImportError:  # built without a C compiler: the Python path does everything
    _native = None  # type: ignore[assignment]

_LOG_HEAD = struct.Struct("<BII")  # lamina.fs._native's log of applied entries: kind, F-operation index, path length
_LOG_FILE = ord("F")

_PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE}
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class WhiteoutStrategy(Protocol):
    """How a driver represents OCI whiteouts on disk.

    The apply engine calls it only where the layers below have something to hide, and never for what
    the layer itself wrote: whiteouts and opaque markers hide lower layers' entries only, wherever they
    stand in the stream."""

    def whiteout(self, parent_fd: int, name: str) -> None:
        """``name`` in the directory ``parent_fd``, which the layers below have, is deleted by this layer."""

    def opaque(self, dir_fd: int, keep: set[str]) -> None:
        """The directory ``dir_fd`` hides the lower layers' entries in it.

        ``keep`` holds the names this layer itself has put in the directory (a file, a directory it
        listed, or one holding such entries); they stay. The engine calls it again for each directory
        of the layer's own below, with its own ``keep``.
        """


class LowerLayers(Protocol):
    """What the layers below show, for a driver whose layer directory holds only the layer's own entries
    (overlay). Paths are layer-relative and already resolved (no symlink in their directories)."""

    def lookup(self, path: str) -> os.stat_result | None:
        """The lstat of ``path`` in the merged view of the layers below; None if they show nothing there."""

    def readlink(self, path: str) -> str:
        """The target of the symlink :meth:`lookup` found at ``path``."""

    def open(self, path: str) -> int:
        """A read-only fd (the caller's) of the regular file :meth:`lookup` found at ``path``."""


class DeleteWhiteouts:
    """Whiteouts for drivers whose layer directories hold the full tree (vfs): delete the paths."""

    def whiteout(self, parent_fd: int, name: str) -> None:
        remove_at(parent_fd, name)

    def opaque(self, dir_fd: int, keep: set[str]) -> None:
        from lamina.fs.ops import clear_dir

        clear_dir(dir_fd, keep)


@dataclass
class ApplyResult:
    size: int
    entries: int


def check_symlink(path: str, linkname: str, name: str) -> None:
    """Reject a relative symlink whose target climbs above the layer root.

    Absolute targets are fine: they are always interpreted inside the root. A relative one is joined
    with the link's directory and must stay inside, as container engines require.
    """
    if linkname.startswith("/"):
        return
    head = path.rpartition("/")[0]
    try:
        normalize(f"{head}/{linkname}" if head else linkname)
    except UnsafePathError:
        raise UnsafePathError(f"symlink {shown(name)} -> {shown(linkname)} leads out of the layer root") from None


def check_entry(e: Entry) -> str:
    """The layer-relative path of entry ``e``, once it passed the rules that need no tree: a name may not
    climb out of the root, a whiteout must name something, only a directory may stand for the root
    itself, a relative symlink may not lead out of the root from where the archive puts it, a hard link
    may not point at the root. The apply engine and the drivers that keep the stream as it is (tarball)
    judge entries alike through it."""
    path = normalize(e.name)
    base = path.rpartition("/")[2]
    if whiteout.is_whiteout(base):
        whiteout.target_of(base, e.name)  # refuses a malformed whiteout
    elif path == "" and e.type != DIR:
        raise UnsafePathError(f"entry {shown(e.name)} would replace the layer root")
    elif e.type == SYM:
        check_symlink(path, e.linkname, e.name)
    elif e.type == LNK and normalize(e.linkname) == "":
        raise UnsafePathError(f"hard link {shown(e.name)} points at the layer root")
    return path


class _Applier:
    def __init__(
        self,
        root: Root,
        whiteouts: WhiteoutStrategy,
        warn: Callable[[str], None],
        reader: TarReader,
        lower: LowerLayers | None = None,
    ) -> None:
        self.lower = lower
        self.root = root
        self.wo = whiteouts
        self.warn = warn
        self.reader = reader
        self.is_root = os.geteuid() == 0
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.sgid: dict[str, bool] = {}  # parent directory -> set-gid (new files take its group)
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.can_mknod = self.is_root
        self.dirs: list[tuple[str, Entry, tuple[int, int]]] = []  # directory metadata applied at the end
        self.opened: dict[str, int] = {}  # non-root: read-only dirs made writable, with their modes
        self.added: dict[str, set[str]] = {}  # real parent path -> names added by this layer
        self.files: set[str] = set()  # regular files written by this layer (real paths)
        self.listed: set[str] = set()  # directories this layer lists (real paths)
        # What this layer hides of the layers below (real paths): whited-out paths with everything below
        # them, and the directories whose lower entries an opaque marker hides.
        self.whited: set[str] = set()
        self.opaqued: set[str] = set()
        self.followed: set[str] = set()  # lower layers' symlinks that resolutions went through
        self.lower_only = False  # a walk may create only directories the layers below have
        # Files of the layers below that entries crossed as directories (real path -> entry): valid only if
        # the layer also whites them out, before or after, as whiteouts act on the layers below first.
        self.crossed: dict[str, str] = {}
        self.linked: dict[str, str] = {}  # lower layers' files hard links point at (real path -> entry)
        self.current = ""  # the name of the entry being applied
        self.fast = False  # the C fast path resolves a directory (an entry it may give back)
        self.replaced: dict[str, str] = {}  # lower layers' symlinks the layer's entries replaced -> targets
        self.size = 0
        self.warned_devices = False
        # Entries the C fast path applied, not yet in ``added``/``files``/the record's index (see sync_native).
        self.native_log = bytearray()

    def sync_native(self) -> None:
        """Bring ``added``, ``files`` and the record's path index up to date with what the C fast path
        applied. They are only read when an entry replaces or whites out something already there, so
        the log is read then (and never for a layer without such entries)."""
        log = self.native_log
        if not log:
            return
        note_file = getattr(self.reader.recorder, "note_file", None)
        pos = 0
        hid_link = False
        while pos < len(log):
            kind, index, n = _LOG_HEAD.unpack_from(log, pos)
            pos += _LOG_HEAD.size
            real = log[pos : pos + n].decode("utf-8", "surrogateescape")
            pos += n
            preal, _, base = real.rpartition("/")
            self._note(preal, base)
            hid_link = hid_link or real in self.followed
            if kind == _LOG_FILE:
                self.files.add(real)
                if note_file is not None:
                    note_file(real, index)
        log.clear()
        if hid_link:  # an entry now hides a lower layer's symlink that walks went through
            self._forget()

    def _writable(self, fd: int, real: str) -> None:
        """Without root, a read-only directory (a parent layer's 0555 /usr/lib) must be opened up to
        write into it; its mode is put back at the end unless this layer sets one."""
        if real in self.opened:
            return
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & stat.S_IRWXU != stat.S_IRWXU:
            self.opened[real] = mode
            os.fchmod(fd, mode | stat.S_IRWXU)

    def _denied(self, parent_fd: int, name: str, real: str) -> None:
        """Without root, walking into an unreadable directory: open it up for this apply."""
        if self.is_root or real in self.opened:
            raise PermissionError(13, "Permission denied", real)
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            mode = stat.S_IMODE(os.fstat(pfd).st_mode)
            os.chmod(f"/proc/self/fd/{pfd}", mode | stat.S_IRWXU)
        finally:
            os.close(pfd)
        self.opened[real] = mode

    def _below(self, real: str) -> os.stat_result | None:
        """What the layers below show at ``real`` and this layer does not hide (drivers that hold only
        the layer's own entries)."""
        if self.lower is None:
            return None
        if self.whited or self.opaqued:
            if real in self.whited:
                return None
            p = real
            while p:
                p = p.rpartition("/")[0]
                if p in self.whited or p in self.opaqued:
                    return None
        return self.lower.lookup(real)

    def _missing(self, parent_fd: int, name: str, real: str) -> str | None:
        """A name this layer does not have, in a walk: a symlink of the layers below is followed, as it
        would be in the mounted stack (its target, inside the root)."""
        st = self._below(real)
        if st is None or not stat.S_ISLNK(st.st_mode):
            return None
        assert self.lower is not None
        self.followed.add(real)
        return self.lower.readlink(real)

    def _lower_link(self, real: str) -> str | None:
        """The target of the symlink the layers below had at ``real`` where the layer replaced it or put
        its own entry; None if they had none there."""
        target = self.replaced.get(real)
        if target is None and self.lower is not None:
            st = self.lower.lookup(real)
            if st is not None and stat.S_ISLNK(st.st_mode):
                target = self.lower.readlink(real)
        return target

    def _notdir(self, parent_fd: int, name: str, real: str, create: bool) -> bool:
        """In a walk that creates, a non-directory stands in the way. The layer's own is an error; a path
        it deleted (overlay's record of a whiteout) becomes a directory that hides the layers below; a
        file of the layers below too, if the layer whites it out (see ``crossed``)."""
        if self.lower_only or self.fast or not create:
            return False  # (the fast path gives the entry back: the Python path knows its name)
        self.sync_native()  # which entries are the layer's own
        if self._own(real.rpartition("/")[0], name):
            return False
        if real not in self.whited:
            self.crossed.setdefault(real, self.current)
        remove_at(parent_fd, name)
        self._implicit_dir(parent_fd, name, real)
        return True

    def _implicit_dir(self, parent_fd: int, name: str, real: str) -> None:
        """A directory the archive needs but does not list: shaped like the one it shadows below, if any."""
        lower = self._below(real)
        if lower is not None and not stat.S_ISDIR(lower.st_mode):
            # a file of the layers below (their symlinks were followed before): the path crosses it
            if self.lower_only or self.fast:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", real)
            self.crossed.setdefault(real, self.current)
            lower = None
        if self.lower_only and lower is None:
            raise FileNotFoundError(errno.ENOENT, "not in the layers below", real)
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        if not self.lower_only:  # made for an entry: this layer's own, an opaque marker keeps it
            self._note(real.rpartition("/")[0], name)
        if lower is None:
            os.chmod(name, 0o755, dir_fd=parent_fd)  # explicit: the caller's umask must not shape layers
        else:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            e = Entry(name=real, type=DIR, mode=stat.S_IMODE(lower.st_mode), uid=lower.st_uid, gid=lower.st_gid,
                      size=0, mtime_ns=lower.st_mtime_ns)
            self.dirs.append((real, e, (st.st_dev, st.st_ino)))
        if real in self.whited:
            self._new_over_whiteout(parent_fd, name)

    def _new_over_whiteout(self, parent_fd: int, name: str) -> None:
        """A directory this layer made where it deleted the lower layers' path: it hides what they have."""
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            self.wo.opaque(fd, set())
        finally:
            os.close(fd)

    def _forget(self) -> None:
        """The tree changed above some resolved directories: drop what was learnt about them."""
        self.root.invalidate()
        self.sgid.clear()

    def _own(self, parent_real: str, name: str) -> bool:
        """Whether ``name`` in the directory at ``parent_real`` is this layer's (see :meth:`_note`)."""
        return name in self.added.get(parent_real, ())

    def _note(self, parent_real: str, name: str) -> None:
        """``name`` in ``parent_real`` is this layer's; so is each directory above it (it holds the
        layer's entries: whiteouts and opaque markers keep it)."""
        s = self.added.get(parent_real)
        if s is not None:
            s.add(name)
            return
        self.added[parent_real] = {name}
        while parent_real:
            parent_real, _, name = parent_real.rpartition("/")
            s = self.added.get(parent_real)
            if s is not None:
                s.add(name)
                return
            self.added[parent_real] = {name}

    def _clear(self, pfd: int, base: str, real: str, keep_dir: bool) -> None:
        self.sync_native()
        st = lstat_at(pfd, base)
        if st is None:
            return
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return
        if self.lower is not None and not stat.S_ISDIR(st.st_mode):
            self.whited.add(real)  # the layer's entry there hid the lower path: what replaces it does too
        if (stat.S_ISLNK(st.st_mode) and real not in self.replaced
                and not self._own(real.rpartition("/")[0], base)):
            self.replaced[real] = os.readlink(base, dir_fd=pfd)  # a lower layer's: whiteouts still go through
        self._supersede_below(pfd, base, real, st)
        remove_at(pfd, base, st)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            # Resolved paths may lead into what was removed (or through the removed symlink): forget them.
            # ``pfd``, the caller's, stays open until the next entry (Root.release).
            self._forget()

    def _supersede_below(self, pfd: int, base: str, real: str, st: os.stat_result | None) -> None:
        """Before ``real`` goes: keep the payloads of this layer's files at or below it."""
        if real in self.files:
            self._supersede(pfd, base, real)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self._supersede_under(real + "/")

    def _supersede_under(self, prefix: str) -> None:
        """Keep the payloads of this layer's files below ``prefix`` (a real path ending in ``/``)."""
        for f in sorted(p for p in self.files if p.startswith(prefix)):
            fpfd, fbase, _ = self.root.parent(f)
            self._supersede(fpfd, fbase, f)

    def _supersede(self, pfd: int, base: str, real: str) -> None:
        # A file this layer wrote earlier is being replaced: its payload must stay in the record.
        keep = getattr(self.reader.recorder, "supersede", None)  # optional: tarsplit.RecordWriter has it
        if keep is not None:
            fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    keep(real, f)
            finally:
                os.close(fd)
        self.files.discard(real)

    def _owner(self, e: Entry, name: str, pfd: int, fd: int | None) -> None:
        if not self.is_root:
            return
        try:
            if fd is not None:
                os.fchown(fd, e.uid, e.gid)
            else:
                os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise ArchiveError(f"{shown(e.name)}: owner {e.uid}:{e.gid} is not mapped here") from err
            raise
        except OverflowError as err:
            raise ArchiveError(f"{shown(e.name)}: owner {e.uid}:{e.gid} is out of range") from err

    def _xattrs(self, e: Entry, fd: int | None, pfd: int, name: str) -> None:
        for key, value in e.xattrs.items():
            if key.startswith(_PRIVATE_XATTR_PREFIXES):
                continue
            try:
                if fd is not None:
                    os.setxattr(fd, key, value)
                else:
                    import xattr

                    xattr.setxattr(f"/proc/self/fd/{pfd}/{name}", key, value, symlink=True)
            except OSError as err:
                if err.errno in (errno.ENOTSUP, errno.EPERM) and (
                        not key.startswith(("user.", "security."))
                        or (key.startswith("user.") and e.type not in (REG, DIR))):  # Linux has none there
                    self.warn(f"{shown(e.name)}: extended attribute {shown(key)} not applied ({err.strerror})")
                    continue
                if err.errno == errno.ENOSPC:  # the filesystem's room for one inode's attributes, mostly
                    raise StoreError(f"{shown(e.name)}: extended attribute {shown(key)} of {len(value)} bytes does "
                                     "not fit on the store's filesystem (or it is full)") from err
                if err.errno in (errno.EINVAL, errno.ERANGE, errno.E2BIG):
                    raise ArchiveError(f"{shown(e.name)}: the kernel refuses extended attribute {shown(key)} "
                                       f"({err.strerror})") from err
                raise

    def apply(self, e: Entry) -> None:
        self.root.release()  # no directory fd of the previous entry is in use any more
        self.current = e.name
        path = check_entry(e)
        head, _, base = path.rpartition("/")
        if whiteout.is_whiteout(base):
            self._whiteout(path, head, base, e)
            return
        if path == "":  # a directory (check_entry refused anything else)
            st = os.fstat(self.root.fd)
            self.dirs.append(("", e, (st.st_dev, st.st_ino)))
            return
        try:
            pfd, _, preal = self.root.parent(path, create=True)
        except NotADirectoryError as err:
            raise ArchiveError(f"cannot apply {shown(e.name)}: {shown(err.filename)} is not a directory") from err
        if not self.is_root:
            self._writable(pfd, preal)
        real = f"{preal}/{base}" if preal else base
        t = e.type
        # Create first; only when the name is taken, look at what is there (one syscall in the usual case).
        if t == DIR:
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
                made = True
            except FileExistsError:
                self._clear(pfd, base, real, keep_dir=True)
                made = lstat_at(pfd, base) is None
                if made:
                    os.mkdir(base, 0o700, dir_fd=pfd)
            if made and real in self.whited:
                self._new_over_whiteout(pfd, base)
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            self.dirs.append((real, e, (st.st_dev, st.st_ino)))
            self.listed.add(real)
        elif t == REG:
            self._write_file(e, pfd, base, real)
        elif t == SYM:
            check_symlink(real, e.linkname, e.name)  # where the link really is, after resolution
            try:
                os.symlink(e.linkname, base, dir_fd=pfd)
            except FileExistsError:
                self._clear(pfd, base, real, keep_dir=False)
                os.symlink(e.linkname, base, dir_fd=pfd)
            self._owner(e, base, pfd, None)
            self._xattrs(e, None, pfd, base)
            os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        elif t == LNK:
            self._hardlink(e, pfd, base, real)
        elif t in (CHR, BLK, FIFO) and not self._special(e, pfd, base, real):
            return
        self._note(preal, base)
        if real in self.followed:  # it now hides the lower layers' symlink that walks went through
            self._forget()

    def _write_file(self, e: Entry, pfd: int, base: str, real: str) -> None:
        # Created with its final mode when the umask leaves it alone and no set-id bit needs chown first.
        direct = e.mode & 0o7000 == 0 and e.mode & self.umask == 0
        create_mode = e.mode if direct else 0o600
        try:
            fd = os.open(base, _WRITE_FLAGS, create_mode, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base, real, keep_dir=False)
            fd = os.open(base, _WRITE_FLAGS, create_mode, dir_fd=pfd)
        try:
            if e.sparse is None:
                for chunk in self.reader.payload_chunks():
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            else:
                self._write_sparse(fd, e)
            self.reader.record_file(real, e.size, e.sparse)
            self.size += e.size  # a sparse file counts by its data, not its real size
            # A new file is ours already, unless a set-gid parent handed it its group.
            if e.uid != self.euid or e.gid != self.egid or self._sgid_dir(pfd, real.rpartition("/")[0]):
                self._owner(e, base, pfd, fd)
            if not direct:
                os.fchmod(fd, e.mode)
            if e.xattrs:
                self._xattrs(e, fd, pfd, base)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)
        self.files.add(real)

    def _write_sparse(self, fd: int, e: Entry) -> None:
        """A sparse file: each data segment written at its offset, holes left as holes (never written),
        the file then cut to its real size."""
        assert e.sparse is not None
        segments = iter(e.sparse)
        offset, left = 0, 0
        for chunk in self.reader.payload_chunks():  # the data segments, one after the other
            view = memoryview(chunk)
            while view:
                if not left:
                    offset, left = next(segments)  # the map's lengths add up to the payload (the reader checked)
                n = os.pwrite(fd, view[: min(left, len(view))], offset)
                view, offset, left = view[n:], offset + n, left - n
        os.ftruncate(fd, e.realsize)

    def _sgid_dir(self, pfd: int, parent: str) -> bool:
        """Whether the directory ``pfd`` (at ``parent``) is set-gid: new files then take its group."""
        known = self.sgid.get(parent)
        if known is None:
            known = self.sgid[parent] = bool(os.fstat(pfd).st_mode & stat.S_ISGID)
        return known

    def _link_target(self, target: str) -> tuple[int, str, os.stat_result, str] | None:
        """The target of a hard link (parent fd, name, lstat, real path); None if missing. On a driver that holds only
        the layer's own entries a file of the layers below is first copied up, as the kernel would."""
        self.sync_native()  # which entries are the layer's own
        try:
            tfd, tbase, treal = self.root.parent(target)
        except NotADirectoryError:
            return None
        except FileNotFoundError:
            if self.lower is None:
                return None
            self.lower_only = True
            try:
                tfd, tbase, treal = self.root.parent(target, create=True)
            except (FileNotFoundError, NotADirectoryError):
                return None
            finally:
                self.lower_only = False
        real = f"{treal}/{tbase}" if treal else tbase
        st = lstat_at(tfd, tbase)
        own = self._own(treal, tbase)
        if st is not None and real in self.whited and not own:
            return None  # overlay's record of a whiteout
        if st is None and self.lower is not None:
            lst = self._below(real)
            if lst is None:
                return None
            if stat.S_ISDIR(lst.st_mode):
                return tfd, tbase, lst, real  # refused by the caller
            self._copy_up(tfd, tbase, real, lst)
            st = lstat_at(tfd, tbase)
        if st is not None and not own:
            self.linked[real] = self.current  # a lower layer's file: a whiteout of it makes this link invalid
        return None if st is None else (tfd, tbase, st, real)

    def _copy_up(self, pfd: int, name: str, real: str, lst: os.stat_result) -> None:
        """Copy a non-directory of the layers below into the layer, with its owner, mode, times and
        extended attributes, so a hard link can be made to it."""
        assert self.lower is not None
        if stat.S_ISLNK(lst.st_mode):
            os.symlink(self.lower.readlink(real), name, dir_fd=pfd)
        elif stat.S_ISREG(lst.st_mode):
            src = self.lower.open(real)
            try:
                fd = os.open(name, _WRITE_FLAGS, 0o600, dir_fd=pfd)
                try:
                    from lamina.fs.treecopy import copy_data

                    copy_data(src, fd, lst)  # a sparse file keeps its holes
                    for key in os.listxattr(src):
                        if not key.startswith(_PRIVATE_XATTR_PREFIXES):
                            with contextlib.suppress(PermissionError):  # (security.* without privileges)
                                os.setxattr(fd, key, os.getxattr(src, key))
                finally:
                    os.close(fd)
            finally:
                os.close(src)
        else:
            os.mknod(name, stat.S_IFMT(lst.st_mode) | 0o600, lst.st_rdev, dir_fd=pfd)
        if self.is_root:
            os.chown(name, lst.st_uid, lst.st_gid, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(lst.st_mode):
            os.chmod(f"/proc/self/fd/{pfd}/{name}", stat.S_IMODE(lst.st_mode))
        os.utime(name, ns=(lst.st_atime_ns, lst.st_mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, e: Entry, pfd: int, base: str, real: str) -> None:
        target = normalize(e.linkname)  # not the root: check_entry refused that
        found = self._link_target(target)
        if found is None:
            raise ArchiveError(f"hard link {shown(e.name)} points at missing {shown(e.linkname)}")
        tfd, tbase, st, treal = found
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"hard link {shown(e.name)} points at a directory")
        if treal != real or lstat_at(pfd, base) is None:
            if treal.startswith(real + "/"):
                raise ArchiveError(f"hard link {shown(e.name)} points at missing {shown(e.linkname)}")
            self._clear(pfd, base, real, keep_dir=False)
            # _clear may have invalidated cached fds (and removed a symlink the name went through):
            # open the target again by its real path.
            tfd, tbase, _ = self.root.parent(treal)
            pfd, _, _ = self.root.parent(normalize(e.name))
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _special(self, e: Entry, pfd: int, base: str, real: str) -> bool:
        if e.type == FIFO:
            kind = stat.S_IFIFO
            dev = 0
        else:
            if not self.can_mknod:
                if not self.warned_devices:
                    self.warn(f"device nodes skipped: creating them needs privileges (first: {shown(e.name)})")
                    self.warned_devices = True
                return False
            kind = stat.S_IFCHR if e.type == CHR else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
        self._clear(pfd, base, real, keep_dir=False)
        try:
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except PermissionError:
            if kind == stat.S_IFIFO:
                raise
            self.can_mknod = False
            self.warn(f"device nodes skipped: not permitted here (first: {shown(e.name)})")
            self.warned_devices = True
            return False
        self._owner(e, base, pfd, None)
        self._chmod_special(e, pfd, base)
        self._xattrs(e, None, pfd, base)
        os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        return True

    def _chmod_special(self, e: Entry, pfd: int, base: str) -> None:
        # A device or FIFO cannot be opened safely for fchmod; chmod through the fd's /proc path after
        # checking it is still the node just created (no symlink can be there: we created it).
        os.chmod(f"/proc/self/fd/{pfd}/{base}", e.mode)

    def _whiteout(self, path: str, head: str, base: str, e: Entry) -> None:
        """Whiteouts and opaque markers hide what the layers below have, never what this layer writes,
        wherever they stand in the stream: a path it deleted and writes again, before or after the
        whiteout, shows only the layer's own entries; nothing is created for a path none of the layers
        below has."""
        self.sync_native()
        target = whiteout.target_of(base, e.name)
        if target is not None and base.startswith(whiteout.META_PREFIX):
            return  # other AUFS metadata: ignored
        found = self._hiding_dir(head)
        if found is None:
            return  # the layers below have nothing there
        dfd, dreal = found
        if not self.is_root:
            self._writable(dfd, dreal)
        if target is None:
            self._unlinked(f"{dreal}/" if dreal else "")
            self.opaqued.add(dreal)
            self._hide(dfd, dreal)
            self._forget()
            self._uncross(f"{dreal}/" if dreal else "")
            return
        real = f"{dreal}/{target}" if dreal else target
        self._unlinked(real + "/", real)
        self._uncross(real + "/", real)
        if self._own(dreal, target):
            st = lstat_at(dfd, target)
            self.whited.add(real)
            if st is not None and stat.S_ISDIR(st.st_mode):
                # A directory of this layer's own: what the layers below had in it goes, its own stays.
                xfd, _ = self.root.dir(real)
                if real not in self.listed:
                    self._plain(xfd, real)
                self._hide(xfd, real)
            # anything else of its own already replaces what the layers below had
        elif self.lower is not None:
            lst = self._below(real)
            if lst is not None:
                if stat.S_ISLNK(lst.st_mode):
                    self.replaced.setdefault(real, self.lower.readlink(real))
                self.whited.add(real)
                self.wo.whiteout(dfd, target)
        else:
            st = lstat_at(dfd, target)
            if st is not None:
                if stat.S_ISLNK(st.st_mode):  # later whiteouts still resolve through it
                    self.replaced.setdefault(real, os.readlink(target, dir_fd=dfd))
                self.whited.add(real)
                self.wo.whiteout(dfd, target)
        self._forget()

    def _unlinked(self, prefix: str, path: str | None = None) -> None:
        """Whiteouts act on the layers below before any entry: a hard link of the layer to what one hides
        points at nothing."""
        for p, name in self.linked.items():
            if p == path or p.startswith(prefix):
                raise ArchiveError(f"hard link {shown(name)} points at missing {shown(p)}")

    def _uncross(self, prefix: str, path: str | None = None) -> None:
        """A whiteout hides the lower files entries crossed at ``path`` or below ``prefix``: no error."""
        for p in [p for p in self.crossed if p == path or p.startswith(prefix)]:
            del self.crossed[p]

    def _hiding_dir(self, head: str) -> tuple[int, str] | None:
        """The directory a whiteout or an opaque marker acts in (fd, real path); None when the layers below
        have none there. It is resolved as the layers below show it: through their symlinks (also where
        this layer replaced one), not through the layer's own; a directory of the layer's own is entered
        (it merges with theirs). Where only the layers below have it, the layer's copy is made, as for an
        entry written there."""
        todo: list[str] = []
        cur = follow("", head, todo)
        hops = 0
        while todo:
            c = todo.pop()
            if c == "..":
                cur = cur.rpartition("/")[0]
                continue
            p = f"{cur}/{c}" if cur else c
            own = self._own(cur, c)
            target = self._lower_link(p) if own or p in self.replaced else None
            if target is None:
                st = self._tree_lstat(cur, c)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    cur = p
                    continue
                if own:
                    return None  # the layer's own file there: the layers below had no directory
                if st is not None and stat.S_ISLNK(st.st_mode) and p not in self.whited:
                    target = os.readlink(c, dir_fd=self.root.dir(cur)[0])
                elif st is None and self.lower is not None:
                    lst = self.lower.lookup(p)
                    if lst is None or not (stat.S_ISDIR(lst.st_mode) or stat.S_ISLNK(lst.st_mode)):
                        return None
                    if stat.S_ISDIR(lst.st_mode):
                        cur = p
                        continue
                    target = self.lower.readlink(p)
                else:
                    return None
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                return None
            cur = follow(cur, target, todo)
        self.lower_only = True
        try:
            return self.root.dir(cur, create=self.lower is not None)
        except OSError as err:  # not a directory after all (or gone): nothing below to hide
            if isinstance(err, (FileNotFoundError, NotADirectoryError)) or err.errno == errno.ELOOP:
                return None
            raise
        finally:
            self.lower_only = False

    def _tree_lstat(self, parent: str, name: str) -> os.stat_result | None:
        """The lstat of ``name`` in the directory at real path ``parent`` of the layer's tree, if there."""
        try:
            fd = self.root.dir(parent)[0]
        except (FileNotFoundError, NotADirectoryError):
            return None
        return lstat_at(fd, name)

    def _hide(self, dfd: int, dreal: str) -> None:
        """Hide the lower layers' entries in the directory ``dreal`` (and below): keep this layer's own.
        Directories kept only because they hold the layer's entries are then the layer's own, as if it
        had created them (mode 0755, the caller's, no extended attributes)."""
        todo = [(dfd, dreal, False)]  # (fd, real path, fd owned here)
        try:
            while todo:
                fd, real, owned = todo.pop()
                try:
                    keep = self.added.get(real, set())
                    if real != dreal and real not in self.listed:
                        self._plain(fd, real)
                    # (every file of this layer is under a kept name: nothing of its own goes)
                    self.wo.opaque(fd, keep)
                    for name in sorted(keep):
                        st = lstat_at(fd, name)
                        if st is not None and stat.S_ISDIR(st.st_mode):
                            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                            dir_fd=fd)
                            todo.append((child, f"{real}/{name}" if real else name, True))
                finally:
                    if owned:
                        os.close(fd)
        finally:
            for fd, _, owned in todo:
                if owned:
                    os.close(fd)

    def _plain(self, fd: int, real: str) -> None:
        """The directory ``real`` no longer shows a lower layer's: it takes the metadata of a directory this
        layer creates without listing it."""
        for key in os.listxattr(fd):
            if not key.startswith(_PRIVATE_XATTR_PREFIXES):
                with contextlib.suppress(OSError):
                    os.removexattr(fd, key)
        st = os.fstat(fd)
        e = Entry(name=real, type=DIR, mode=0o755, uid=self.euid, gid=self.egid, size=0, mtime_ns=st.st_mtime_ns)
        self.dirs.append((real, e, (st.st_dev, st.st_ino)))

    def finish(self) -> None:
        if self.crossed:
            real, name = min(self.crossed.items())
            raise ArchiveError(f"cannot apply {shown(name)}: {shown(real)} is not a directory")
        # Directories: ownership, mode, xattrs and times, deepest first so a parent's mtime is final.
        # A directory entry later replaced within the same layer (by a file, a symlink or a new
        # directory) no longer owns that path: its metadata is dropped, as if applied in order.
        done: set[str] = set()
        prev: tuple[str, int] | None = None  # the directory last finished and its fd (ours)
        try:
            for real, e, ident in reversed(self.dirs):
                self.root.release()  # the previous directory's fd is done with (bounded open fds)
                if real in done:
                    continue
                fd = self._same_dir(real, ident, prev)
                if prev is not None:
                    os.close(prev[1])
                    prev = None
                if fd is None:
                    continue
                prev = (real, fd)
                done.add(real)
                self.opened.pop(real, None)
                self._owner(e, "", fd, fd)
                os.fchmod(fd, e.mode)
                self._xattrs(e, fd, fd, "")
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            if prev is not None:
                os.close(prev[1])
        for real, mode in self.opened.items():
            self.root.release()
            with contextlib.suppress(OSError):
                os.fchmod(self.root.dir(real)[0], mode)

    def _same_dir(self, real: str, ident: tuple[int, int], prev: tuple[str, int] | None) -> int | None:
        """An fd (ours) of the directory at ``real`` if it is still the one created as ``ident``. After its
        child ``prev``, it is that child's ``..`` (a deep tree finishes in one step per directory)."""
        if prev is not None and prev[0] and prev[0].rpartition("/")[0] == real:
            with contextlib.suppress(OSError):
                fd = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=prev[1])
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == ident:
                    return fd
                os.close(fd)
        try:
            fd, resolved = self.root.dir(real)
        except OSError as err:  # gone, or replaced by a file or a symlink (maybe a loop)
            if isinstance(err, (FileNotFoundError, NotADirectoryError)) or err.errno == errno.ELOOP:
                return None
            raise
        st = os.fstat(fd)
        if resolved != real or (st.st_dev, st.st_ino) != ident:
            return None
        return os.dup(fd)


def native_enabled() -> bool:
    """Whether the C fast path (``lamina.fs._native``) is built and not turned off (``LAMINA_NATIVE=0``)."""
    return _native is not None and os.environ.get("LAMINA_NATIVE", "1") != "0"


@functools.cache
def _tune_malloc() -> None:
    """Keep the 1 MiB stream chunks in the heap between uses instead of mapping, faulting in and unmapping
    each one (glibc's default for blocks that size): a large layer otherwise pays a page fault per 4 KiB."""
    if _native is not None:
        _native.tune_malloc()


class _FastPath:
    """Hands runs of plain entries (regular files and symlinks of one directory, whole in the stream's
    buffer) to :func:`lamina.fs._native.run`, which applies and records them as :class:`_Applier` would.
    Anything else -- and anything the C code is unsure of -- comes back to the Python path, one entry
    at a time."""

    def __init__(self, ap: _Applier, reader: TarReader, stream: DiffStream, rec: RecordWriter | None) -> None:
        self.ap, self.reader, self.stream, self.rec = ap, reader, stream, rec
        self.head: bytes | None = None  # the directory (as named in the archive) of the last run

    def run(self) -> None:
        assert _native is not None
        ap, reader, stream, rec = self.ap, self.reader, self.stream, self.rec
        reader.finish_entry()
        while not reader.done and not reader.has_globals:
            ap.root.release()  # the previous run's directory fd is no longer in use
            head = self.head
            pfd, preal = -1, ""
            if head is not None:
                ap.fast = True
                try:
                    pfd, preal = ap.root.dir(head.decode("utf-8", "surrogateescape"), create=True)
                    if not ap.is_root:
                        ap._writable(pfd, preal)
                except OSError:
                    self.head = None  # the Python path resolves it again and reports the error
                    return
                finally:
                    ap.fast = False
            # (not from the cache: an entry given back may have replaced the directory since)
            sgid = head is not None and ap.is_root and bool(os.fstat(pfd).st_mode & stat.S_ISGID)
            limit = reader.max_entries - reader.entries if reader.max_entries else -1
            raw, ops, index = rec.native_state() if rec is not None else (None, None, 0)
            buf, pos = stream.buffer()
            status, pos, count, size, index, extra = _native.run(
                buf, pos, head, pfd, preal.encode("utf-8", "surrogateescape"), ap.is_root, ap.euid, ap.egid,
                sgid, ap.umask, limit, raw, ops, index, ap.native_log,
            )
            stream.consumed(pos)
            reader.entries += count
            ap.size += size
            if ap.followed:  # names resolved through lower symlinks: see whether an entry now hides one
                ap.sync_native()
            if rec is not None:
                rec.native_done(index)
            if status == _native.PARENT:
                assert isinstance(extra, bytes)
                self.head = extra
                continue
            if status == _native.OWNER:
                name, uid, gid = extra
                raise ArchiveError(f"{shown(name)}: owner {uid}:{gid} is not mapped here")
            # Given back: the Python path applies the next entry, which may change the directory this
            # run resolved (a whiteout of it, say). Resolve again only for an entry C takes.
            self.head = None
            return


def apply_recorded(
    stream: DiffStream,
    target: str | os.PathLike[str] | int,
    record: str | os.PathLike[str],
    *,
    whiteouts: WhiteoutStrategy | None = None,
    warn: Callable[[str], None] | None = None,
    lower: LowerLayers | None = None,
    max_entries: int = 0,
) -> ApplyResult:
    """:func:`apply_tar`, keeping a :mod:`lamina.tar.split` record at ``record`` for byte-exact export.

    The stream is read to its end (trailing bytes go into the record too); on failure the record is
    removed and the error propagates.
    """
    rec = RecordWriter(record)
    try:
        result = _apply(stream, target, whiteouts=whiteouts, recorder=rec, warn=warn, lower=lower,
                        max_entries=max_entries)
        stream.drain(rec.raw)
    except BaseException:
        rec.abort()
        raise
    rec.close()
    return result


def apply_tar(
    stream: DiffStream,
    target: str | os.PathLike[str] | int,
    *,
    whiteouts: WhiteoutStrategy | None = None,
    recorder: Recorder | None = None,
    max_entries: int = 0,
    warn: Callable[[str], None] | None = None,
    lower: LowerLayers | None = None,
) -> ApplyResult:
    """Apply the tar in ``stream`` to the directory ``target``; read the stream to its end.

    ``lower`` serves drivers whose layer directory holds only the layer's own entries (overlay): it
    shows the engine what the layers below have, so that names resolve as in the mounted stack (a
    lower layer's symlink in an entry's directories is followed, inside the root, and the entry lands
    where it leads), a directory the archive needs but does not list takes the owner, mode and time of
    the one it shadows below (as a copy-up would), and whiteouts are recorded only for paths the layers
    below have. Without it the target holds the whole tree (vfs), and such directories are 0755, owned
    by the caller.

    When the layer store asked for the stream's tar-split record (``stream.record``) and no ``recorder``
    is given, the record is kept there (:func:`apply_recorded`): that is what makes a tree driver's
    layers export byte for byte without any code of its own.

    Raises :class:`~lamina.errors.FormatError` subclasses for bad input; the caller owns cleanup of
    ``target`` on failure.
    """
    record = getattr(stream, "record", None)
    if recorder is None and record is not None:
        return apply_recorded(stream, target, record, whiteouts=whiteouts, warn=warn, lower=lower,
                              max_entries=max_entries)
    return _apply(stream, target, whiteouts=whiteouts, recorder=recorder, max_entries=max_entries, warn=warn,
                  lower=lower)


def _apply(
    stream: DiffStream,
    target: str | os.PathLike[str] | int,
    *,
    whiteouts: WhiteoutStrategy | None = None,
    recorder: Recorder | None = None,
    max_entries: int = 0,
    warn: Callable[[str], None] | None = None,
    lower: LowerLayers | None = None,
) -> ApplyResult:
    reader = TarReader(stream, recorder, max_entries=max_entries)
    with Root(target, defer_close=True) as root:
        ap = _Applier(root, whiteouts or DeleteWhiteouts(), warn or (lambda _m: None), reader, lower)
        root.on_denied = ap._denied
        root.on_mkdir = ap._implicit_dir
        root.on_notdir = ap._notdir
        if lower is not None:
            root.on_missing = ap._missing
        fast = None
        if native_enabled() and (recorder is None or isinstance(recorder, RecordWriter)):
            fast = _FastPath(ap, reader, stream, recorder)
            _tune_malloc()
        try:
            while True:
                if fast is not None:
                    fast.run()
                e = reader.next()
                if e is None:
                    break
                ap.apply(e)
            ap.finish()
        except OSError as err:
            where = f" ({shown(err.filename)})" if isinstance(err.filename, str) and err.filename else ""
            if err.errno in _STORE_ERRNOS:
                # the store's fault (full, read-only, not permitted), not the archive's
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise write_failure(err, "applying the layer") from err
                raise StoreError(f"cannot write the layer: {err.strerror or err}{where}") from err
            raise ArchiveError(f"cannot apply layer: {err.strerror or err}{where}") from err
    return ApplyResult(size=ap.size, entries=reader.entries)

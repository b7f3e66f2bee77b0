"""Copy a directory tree with all its metadata, fd-relative, cloning file data where the filesystem can.

Used by copy-based drivers (vfs) to create a snapshot on a parent. Hard links inside the tree stay hard
links; symlinks are copied, never followed; ownership, modes, extended attributes and nanosecond times
are kept (directory times are set after their contents).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from lamina.fs.kcopy import FileWriter, ShortSource, SourceError, Span
from lamina.fs.ops import DirStack, Root

FICLONE = 0x40049409
_RD = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class CopyStats:
    def __init__(self) -> None:
        self.method = "reflink"


def copy_data(src: int, dst: int, st: os.stat_result, stats: CopyStats | None = None) -> None:
    """Copy the bytes of the file ``src`` (whose stat is ``st``) into the empty file ``dst``: a reflink
    where the filesystem shares blocks, holes kept as holes, or a kernel copy (:class:`FileWriter`)."""
    if stats is None:
        stats = CopyStats()
    size = st.st_size
    if stats.method == "reflink":
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF):
                raise
            stats.method = "copy_file_range"
    if st.st_blocks * 512 < size and _copy_sparse(src, dst, size):
        return
    out = FileWriter(dst)
    out.method = stats.method  # what failed for an earlier file is not tried again
    try:
        out.copy(Span(src, 0, size, ""))
    except ShortSource:
        pass  # the file shrank while it was copied: what it had
    except SourceError as e:
        raise e.error from None
    stats.method = out.method


def _copy_sparse(src: int, dst: int, size: int) -> bool:
    """Copy a file with holes (fewer blocks than its size: a sparse file of a layer) as sparse: only its
    data ranges, found with SEEK_DATA/SEEK_HOLE, then the length. A 60 GB file of a few KB of data stays a
    few KB (copy_file_range without reflinks writes the holes out as zeros). False where the filesystem
    cannot tell data from holes."""
    try:
        pos = os.lseek(src, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data at all
            os.ftruncate(dst, size)
            return True
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    while pos < size:
        end = os.lseek(src, pos, os.SEEK_HOLE)
        while pos < end:
            buf = os.pread(src, min(end - pos, 1 << 20), pos)
            if not buf:
                break
            view = memoryview(buf)
            while view:
                n = os.pwrite(dst, view, pos)
                view, pos = view[n:], pos + n
        if pos < end:
            break  # the file shrank meanwhile
        try:
            pos = os.lseek(src, end, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            break
    os.ftruncate(dst, size)
    return True


def _xattrs(src: int | str, dst: int | str, *, src_dir: int | None = None, dst_dir: int | None = None) -> None:
    if isinstance(src, int):
        names = os.listxattr(src)
        for n in names:
            os.setxattr(dst, n, os.getxattr(src, n))
        return
    import xattr

    sp = f"/proc/self/fd/{src_dir}/{src}"
    dp = f"/proc/self/fd/{dst_dir}/{dst}"
    for n in xattr.listxattr(sp, symlink=True):
        try:
            xattr.setxattr(dp, n, xattr.getxattr(sp, n, symlink=True), symlink=True)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise


def _open_src_dir(name: str, dir_fd: int) -> tuple[int, int | None]:
    """Open a source directory; without root, one its owner cannot read is opened up for the copy.

    Returns the fd and the mode to restore (None when nothing was changed).
    """
    try:
        return os.open(name, _DIR, dir_fd=dir_fd), None
    except PermissionError:
        if os.geteuid() == 0:
            raise
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = stat.S_IMODE(os.fstat(pfd).st_mode)
        os.chmod(f"/proc/self/fd/{pfd}", mode | stat.S_IRUSR | stat.S_IXUSR)
        return os.open(name, _DIR, dir_fd=dir_fd), mode
    finally:
        os.close(pfd)


def copy_tree(src_path: str, dst_path: str) -> str:
    """Copy the contents of directory ``src_path`` into the existing directory ``dst_path``.

    Depth first without recursion, both trees through :class:`~lamina.fs.ops.DirStack` (bounded fds, no
    path longer than a name), so any depth works. Returns the data-copy method that was used
    (``reflink``, ``copy_file_range``, ``sendfile`` or ``read/write``).
    """
    stats = CopyStats()
    is_root = os.geteuid() == 0
    links: dict[tuple[int, int], tuple[str, str]] = {}  # (dev, ino) -> (dst dir path, name)
    sfd = os.open(src_path, _DIR)
    try:
        dfd = os.open(dst_path, _DIR)
        try:
            with Root(dfd) as dst_root, DirStack(sfd) as src, DirStack(dfd) as dst:
                frames: list[tuple[str, list[str], int | None]] = []  # (path, subdirs to copy, mode to restore)
                where, subdirs, restore = "", _copy_entries(src.fd, dst.fd, "", stats, is_root, links, dst_root), None
                while True:
                    while not subdirs and frames:
                        _finish_dir(src.fd, dst.fd, restore, is_root)
                        src.pop()
                        dst.pop()
                        where, subdirs, restore = frames.pop()
                    if not subdirs:
                        break
                    name = subdirs.pop()
                    os.mkdir(name, 0o700, dir_fd=dst.fd)
                    csfd, crestore = _open_src_dir(name, src.fd)
                    src.push(name, csfd)
                    dst.push(name)
                    frames.append((where, subdirs, restore))
                    where = f"{where}/{name}" if where else name
                    subdirs = _copy_entries(src.fd, dst.fd, where, stats, is_root, links, dst_root)
                    restore = crestore
            _meta_dir(sfd, dfd, is_root)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return stats.method


def _finish_dir(sfd: int, dfd: int, restore: int | None, is_root: bool) -> None:
    """A directory's contents are copied: its own metadata now (so its mtime stays)."""
    if restore is not None:
        os.fchmod(sfd, restore)
    _meta_dir(sfd, dfd, is_root)


def _meta_dir(sfd: int, dfd: int, is_root: bool) -> None:
    st = os.fstat(sfd)
    if is_root:
        os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    _xattrs(sfd, dfd)
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_entries(
    sfd: int,
    dfd: int,
    rel: str,
    stats: CopyStats,
    is_root: bool,
    links: dict[tuple[int, int], tuple[str, str]],
    dst_root: Root,
) -> list[str]:
    """Copy what one directory holds except its subdirectories, whose names are returned."""
    subdirs = []
    for name, st in _scan(sfd):
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            continue  # sockets are not layer content
        if stat.S_ISDIR(mode):
            subdirs.append(name)
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = links.get(key)
            if first is not None:
                lfd = dst_root.dir(first[0])[0]
                os.link(first[1], name, src_dir_fd=lfd, dst_dir_fd=dfd, follow_symlinks=False)
                continue
            links[key] = (rel, name)
        if stat.S_ISREG(mode):
            fs = os.open(name, _RD, dir_fd=sfd)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dfd)
                try:
                    if st.st_size:
                        copy_data(fs, fd, st, stats)
                    if is_root:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, stat.S_IMODE(mode))
                    _xattrs(fs, fd)
                    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fd)
            finally:
                os.close(fs)
            continue
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
        else:
            continue
        if is_root:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(f"/proc/self/fd/{dfd}/{name}", stat.S_IMODE(mode))
        _xattrs(name, name, src_dir=sfd, dst_dir=dfd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
    return subdirs


def _scan(fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of the directory ``fd`` with their lstat, read as they are used (a directory of a million
    entries never becomes a list of a million stats)."""
    with os.scandir(fd) as it:
        for e in it:
            yield e.name, e.stat(follow_symlinks=False)

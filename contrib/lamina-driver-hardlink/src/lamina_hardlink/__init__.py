"""hardlink: vfs-like layers whose unchanged regular files are hard links to the parent's.

Every layer directory holds the layer's complete root filesystem, as with vfs. A committed layer created
on a committed parent gets new directories, symlinks, FIFOs and device nodes, but its regular files are
hard links to the parent's inodes: creating a snapshot costs one directory entry per file, not a copy.

Why sharing inodes is safe here: the only code that writes into a committed layer is
:func:`lamina.driver.apply_tar`, and for anything that is not a directory it removes the existing path and
creates a new inode (``O_CREAT | O_EXCL``, ``symlink``, ``mknod``, ``link``); ownership, mode, xattrs and
times are only ever set on an inode it just created, or on a directory (and directories are never
shared). A diff that changes only the metadata of a file carries a full entry for that file, so the
layer gets its own copy and the parent's inode is not touched. Whiteouts unlink the layer's own name.

What is not safe, and so not done:

* read-write layers (``rw=True``) are handed to containers, which write files in place: they, and any
  layer created on top of one, get private copies (:func:`lamina.driver.copy_tree`, reflinks where the
  filesystem has them).
* A mounted committed layer is read-only by convention only. Writing *in place* through its path changes
  the parent and every other layer sharing the inode; :meth:`lamina.ImageService.export_layer` of each of
  them then fails its DiffID check.

On-disk layout under the driver's home::

    dir/<cache-id>/            the layer's complete root filesystem
    rw/<cache-id>              marker: a read-write layer (its files are private copies)

Changes, diffs, diff sizes and layer-id checks come from :class:`lamina.driver.TreeDriver`; lamina keeps
the tar-split record of each applied layer and assembles exact exports from the tree itself.

Options (``[storage.options.hardlink]``): ``copy_below`` (integer, bytes, default 0): regular files
smaller than this are copied instead of linked.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lamina.driver import (
    Capabilities,
    DeleteWhiteouts,
    DiffStream,
    DirStack,
    DriverRegistry,
    Root,
    TreeDriver,
    apply_tar,
    copy_tree,
    existing_ancestor,
    hookimpl,
    rmtree,
)
from lamina.errors import DriverError, DriverUnsupported, LayerNotFound

__all__ = ["HardlinkDriver", "lamina_register_drivers"]

log = logging.getLogger("lamina_hardlink")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
OPTIONS = {"copy_below": 0}


class SnapshotStats:
    """What one snapshot did: files linked to the parent's inodes and files copied."""

    def __init__(self, link_max: int) -> None:
        self.link_max = link_max
        self.linked = 0
        self.copied = 0


class HardlinkDriver(TreeDriver):
    name = "hardlink"
    description = "full trees; unchanged files hard-linked to the parent layer's (lamina-driver-hardlink)"

    def __init__(self, home: Path, runhome: Path, options: Mapping[str, Any]) -> None:
        super().__init__(home, runhome, options)
        self.copy_below = int(self.options.get("copy_below", OPTIONS["copy_below"]))
        self.dirs = home / "dir"
        self.rw_marks = home / "rw"
        for d in (self.dirs, self.rw_marks):
            d.mkdir(exist_ok=True)
        self.last: SnapshotStats | None = None

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise DriverUnsupported(f"unknown hardlink option(s): {', '.join(unknown)}")
        below = options.get("copy_below", 0)
        if not isinstance(below, int) or isinstance(below, bool) or below < 0:
            raise DriverUnsupported(f"hardlink option copy_below must be a non-negative integer, got {below!r}")
        base = existing_ancestor(home)
        if not os.access(base, os.W_OK):
            raise DriverUnsupported(f"{base} is not writable")
        try:
            probe_dir = tempfile.mkdtemp(prefix=".lamina-hardlink-probe-", dir=base)
        except OSError as e:
            raise DriverUnsupported(f"cannot create a probe directory in {base}: {e.strerror}") from e
        try:
            open(os.path.join(probe_dir, "a"), "xb").close()
            os.link(os.path.join(probe_dir, "a"), os.path.join(probe_dir, "b"))
        except OSError as e:
            raise DriverUnsupported(f"the filesystem of {base} has no hard links: {e.strerror}") from e
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)

    # -- paths ----------------------------------------------------------------------------------------
    def layer_dir(self, layer_id: str) -> Path:
        return self.dirs / layer_id

    def _dir(self, layer_id: str) -> Path:
        return self.layer_path(layer_id)

    def legacy_record(self, layer_id: str) -> Path | None:
        return self.home / "records" / f"{layer_id}.tsr"  # kept by the driver before lamina kept records

    def _rw_mark(self, layer_id: str) -> Path:
        return self.rw_marks / layer_id

    def _is_rw(self, layer_id: str) -> bool:
        return self._rw_mark(layer_id).exists()

    # -- description ----------------------------------------------------------------------------------
    @hookimpl
    def lamina_capabilities(self) -> Capabilities:
        return Capabilities(can_mount=True, native_diff=False, exact_tar=True, supports_rw_layers=True)

    @hookimpl
    def lamina_status(self) -> list[tuple[str, str]]:
        n = sum(1 for e in os.scandir(self.dirs) if not e.name.startswith("."))
        out = [("Layers on disk", str(n)), ("Copy files below", f"{self.copy_below} bytes")]
        if self.last is not None:
            out.append(("Last snapshot", f"{self.last.linked} linked, {self.last.copied} copied"))
        return out

    @hookimpl
    def lamina_metadata(self, layer_id: str) -> dict[str, str]:
        return {
            "dir": str(self._dir(layer_id)),
            "files": "private copies" if self._is_rw(layer_id) else "shared with parent",
        }

    # -- registration ---------------------------------------------------------------------------------
    @hookimpl
    def lamina_create(self, layer_id: str, parent: str | None, rw: bool) -> bool:
        d = self._dir(layer_id)
        if parent is not None and not self._dir(parent).is_dir():
            raise LayerNotFound(f"hardlink parent layer {parent} has no directory")
        if rw:
            self._rw_mark(layer_id).touch(exist_ok=False)
        d.mkdir(mode=0o755)
        if parent is None:
            return True
        try:
            if rw or self._is_rw(parent):
                # Whatever a container may write in place must not reach another layer: copy.
                copy_tree(str(self._dir(parent)), str(d))
            else:
                self.last = snapshot(self._dir(parent), d, self.copy_below)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise DriverError(f"cannot snapshot layer {parent} for {layer_id}: {e.strerror or e}{where}") from e
        return True

    @hookimpl
    def lamina_apply_diff(self, layer_id: str, parent: str | None, diff: DiffStream) -> int:
        # Unpacks safely; lamina keeps the tar-split record that makes the export byte-exact.
        return apply_tar(diff, self._dir(layer_id), whiteouts=DeleteWhiteouts(), warn=log.warning).size

    # -- mounting -------------------------------------------------------------------------------------
    @hookimpl
    def lamina_mount(self, layer_id: str, options: list[str]) -> str:
        d = self._dir(layer_id)
        if not d.is_dir():
            raise LayerNotFound(f"hardlink layer {layer_id} has no directory")
        return str(d)

    @hookimpl
    def lamina_unmount(self, layer_id: str) -> bool:
        return True

    # -- lifecycle ------------------------------------------------------------------------------------
    @hookimpl
    def lamina_exists(self, layer_id: str) -> bool:
        return self._dir(layer_id).exists() or self._rw_mark(layer_id).exists()

    @hookimpl
    def lamina_layers(self) -> list[str]:
        # what a removal left half-done counts too: lamina system check hands it back to lamina_remove
        ids = {e.name.removeprefix(".removing-") for e in os.scandir(self.dirs)
               if not e.name.startswith(".") or e.name.startswith(".removing-")}
        ids |= {e.name for e in os.scandir(self.rw_marks) if not e.name.startswith(".")}
        records = self.home / "records"
        if records.is_dir():
            ids |= {e.name.split(".", 1)[0] for e in os.scandir(records) if not e.name.startswith(".")}
        return sorted(ids)

    @hookimpl
    def lamina_remove(self, layer_id: str) -> bool:
        d = self._dir(layer_id)
        trash = self.dirs / f".removing-{layer_id}"
        if d.exists():
            # Rename first so a half-removed tree is never mistaken for a layer. Removing unlinks this
            # layer's names only: inodes shared with other layers live on through their links.
            os.replace(d, trash)
        if trash.exists():
            remove_tree(trash)
        self._rw_mark(layer_id).unlink(missing_ok=True)
        self.forget_legacy_record(layer_id)
        return True

    @hookimpl
    def lamina_cleanup(self) -> bool:
        return True


# --------------------------------------------------------------------------------------------------
# The snapshot: a new tree whose regular files are the parent's inodes.
# --------------------------------------------------------------------------------------------------


def snapshot(parent_dir: Path, layer_dir: Path, copy_below: int = 0) -> SnapshotStats:
    """Fill the empty directory ``layer_dir`` with the tree of ``parent_dir``, fd-relative.

    Directories, symlinks, FIFOs and device nodes are recreated with their metadata; regular files are
    hard-linked, except those smaller than ``copy_below`` bytes and those whose inode is too close to the
    filesystem's link limit, which are copied. Hard-link groups inside the parent stay groups. Both trees
    are walked depth first without recursion (:class:`lamina.driver.DirStack`), so any depth works.
    """
    is_root = os.geteuid() == 0
    groups: dict[tuple[int, int], str] = {}
    sfd = os.open(parent_dir, _DIR)
    try:
        dfd = os.open(layer_dir, _DIR)
        try:
            stats = SnapshotStats(os.fpathconf(dfd, "PC_LINK_MAX"))
            with Root(dfd) as root, DirStack(sfd) as src, DirStack(dfd) as dst:
                # per directory entered: its path, its stat, and its subdirectories not yet filled
                frames: list[tuple[str, os.stat_result, list[tuple[str, os.stat_result]]]] = []
                here = ("", os.fstat(sfd), _fill(sfd, dfd, "", root, groups, stats, copy_below, is_root))
                while True:
                    while not here[2] and frames:
                        _set_meta(src.fd, dst.fd, here[1], is_root)  # after the contents, so the mtime stays
                        src.pop()
                        dst.pop()
                        here = frames.pop()
                    if not here[2]:
                        break
                    name, st = here[2].pop()
                    os.mkdir(name, 0o700, dir_fd=dst.fd)
                    src.push(name)
                    dst.push(name)
                    frames.append(here)
                    path = f"{here[0]}/{name}" if here[0] else name
                    here = (path, st, _fill(src.fd, dst.fd, path, root, groups, stats, copy_below, is_root))
            _set_meta(sfd, dfd, os.fstat(sfd), is_root)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return stats


def _fill(
    sfd: int,
    dfd: int,
    rel: str,
    root: Root,
    groups: dict[tuple[int, int], str],
    stats: SnapshotStats,
    copy_below: int,
    is_root: bool,
) -> list[tuple[str, os.stat_result]]:
    """Recreate what one directory holds but its subdirectories, which are returned with their stats."""
    subdirs = []
    for name, st in _scan(sfd):
        mode = st.st_mode
        path = f"{rel}/{name}" if rel else name
        if stat.S_ISDIR(mode):
            subdirs.append((name, st))
            continue
        if stat.S_ISSOCK(mode):
            continue  # sockets are not layer content
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in groups:
            # Another name of an inode already placed in this layer: keep the group a group.
            gfd, gname, _ = root.parent(groups[key])
            os.link(gname, name, src_dir_fd=gfd, dst_dir_fd=dfd, follow_symlinks=False)
            continue
        if stat.S_ISREG(mode):
            # The new layer's links to this inode are at most as many as the parent's (<= st_nlink).
            share = st.st_size >= copy_below and 2 * st.st_nlink <= stats.link_max
            if share:
                try:
                    os.link(name, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                    stats.linked += 1
                except OSError as e:
                    if e.errno != errno.EMLINK:
                        raise
                    share = False  # another layer took the last links meanwhile
            if not share:
                _copy_file(sfd, dfd, name, st, is_root)
                stats.copied += 1
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            _set_meta_at(sfd, dfd, name, st, is_root)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            _set_meta_at(sfd, dfd, name, st, is_root)
        else:
            continue
        if st.st_nlink > 1:
            groups[key] = path
    return subdirs


def _copy_file(sfd: int, dfd: int, name: str, st: os.stat_result, is_root: bool) -> None:
    src = os.open(name, _READ, dir_fd=sfd)
    try:
        dst = os.open(name, _CREATE, 0o600, dir_fd=dfd)
        try:
            with open(src, "rb", closefd=False) as fin, open(dst, "wb", closefd=False) as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            _set_meta(src, dst, st, is_root)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _set_meta(src: int, dst: int, st: os.stat_result, is_root: bool) -> None:
    """Owner, mode, xattrs and times of ``st`` (the inode open as ``src``) onto the open ``dst``."""
    if is_root:
        os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for key in os.listxattr(src):
        _setxattr(dst, key, os.getxattr(src, key))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_meta_at(sfd: int, dfd: int, name: str, st: os.stat_result, is_root: bool) -> None:
    """The same for a symlink or a special file, which cannot be opened safely: by name, never followed."""
    if is_root:
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        # Just created by us, so not a symlink: chmod through the directory fd's /proc path.
        os.chmod(f"/proc/self/fd/{dfd}/{name}", stat.S_IMODE(st.st_mode))
    src, dst = f"/proc/self/fd/{sfd}/{name}", f"/proc/self/fd/{dfd}/{name}"
    for key in os.listxattr(src, follow_symlinks=False):
        _setxattr(dst, key, os.getxattr(src, key, follow_symlinks=False))
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _setxattr(target: int | str, key: str, value: bytes) -> None:
    try:
        if isinstance(target, int):
            os.setxattr(target, key, value)
        else:
            os.setxattr(target, key, value, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP):
            raise DriverError(f"cannot copy extended attribute {key}: {e.strerror}") from e
        log.warning("extended attribute %s not copied: %s", key, e.strerror)


def remove_tree(path: Path) -> None:
    """Remove a layer's tree; without root, directories we may not write, read or search are opened up
    first by ``lamina.driver.rmtree``, which changes directories only, never the (shared) files."""
    try:
        rmtree(path)
    except OSError as e:
        raise DriverError(f"cannot remove {e.filename or path}: {e.strerror}") from e


@hookimpl
def lamina_register_drivers(registry: DriverRegistry) -> None:
    registry.add(HardlinkDriver)


def _scan(fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of the directory ``fd`` with their lstat, read as they are used (a directory of a million
    entries never becomes a list of a million stats)."""
    with os.scandir(fd) as it:
        for e in it:
            yield e.name, e.stat(follow_symlinks=False)

"""What the hardlink driver adds to the kit: inode sharing, and that sharing never leaks a change."""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lamina.config import Config, Limits
from lamina.errors import DriverUnsupported, ExportError, LimitExceeded
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.store.layers import Layer
from lamina.testing import TarBuilder, tree_snapshot

from lamina_hardlink import HardlinkDriver


def base_tar() -> TarBuilder:
    return (TarBuilder().dir("etc").file("etc/passwd", b"root:x:0:0\n").file("etc/hostname", b"box\n")
            .dir("usr").dir("usr/bin").file("usr/bin/tool", b"#!/bin/sh\n" * 100, mode=0o755)
            .hardlink("usr/bin/tool2", "usr/bin/tool").symlink("bin", "usr/bin").fifo("pipe"))


def open_store(tmp_path: Path, **options: Any) -> ImageService:
    cfg = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="hardlink",
                 driver_options={"hardlink": options})
    return ImageService.open(cfg)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[ImageService]:
    s = open_store(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def add(svc: ImageService, data: bytes, parent: Layer | None = None) -> Layer:
    return svc.register_layer(io.BytesIO(data), parent.chain_id if parent else None)


def layer_dir(svc: ImageService, layer: Layer) -> Path:
    return Path(svc.layer_store.hook.lamina_metadata(layer_id=layer.cache_id)["dir"])


def export(svc: ImageService, layer: Layer) -> bytes:
    with svc.export_layer(layer.chain_id) as s:
        return s.read()


def ino(path: Path) -> int:
    return os.lstat(path).st_ino


def user_xattrs(where: Path) -> bool:
    try:
        os.setxattr(where, "user.lamina-probe", b"1")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    return True


def test_registered_through_its_entry_point() -> None:
    info = discover().drivers["hardlink"]
    assert info.cls is HardlinkDriver
    assert info.source == "lamina-driver-hardlink (entry point 'hardlink')"


def test_unchanged_files_share_the_parents_inodes(svc: ImageService) -> None:
    base_data = base_tar().build()
    base = add(svc, base_data)
    child = add(svc, TarBuilder().dir("etc").file("etc/hostname", b"other\n").build(), base)
    p, c = layer_dir(svc, base), layer_dir(svc, child)
    for shared in ("etc/passwd", "usr/bin/tool", "usr/bin/tool2"):
        assert ino(c / shared) == ino(p / shared)
    assert ino(c / "usr/bin/tool") == ino(c / "usr/bin/tool2")  # the parent's link group stays one
    for own in ("etc", "usr", "usr/bin", "bin", "pipe", "etc/hostname"):
        assert ino(c / own) != ino(p / own)
    assert (c / "etc/hostname").read_bytes() == b"other\n"
    assert (p / "etc/hostname").read_bytes() == b"box\n"
    assert export(svc, base) == base_data
    assert {(x.kind, x.path) for x in svc.layer_changes(child.chain_id)} == {("C", "/etc"), ("C", "/etc/hostname")}


def test_changes_in_the_child_never_reach_the_parent(svc: ImageService, tmp_path: Path) -> None:
    xattrs = user_xattrs(tmp_path)
    base_data = (base_tar().file("meta-mode", b"m").file("meta-time", b"t").file("meta-xattr", b"x")
                 .file("meta-owner", b"o").file("gone", b"g").dir("gonedir").file("gonedir/f", b"f")
                 .file("to-dir", b"d").build())
    base = add(svc, base_data)
    p = layer_dir(svc, base)
    before = tree_snapshot(str(p), times=True)
    tb = (TarBuilder().dir("etc").file("etc/passwd", b"rewritten\n")       # content
          .file("meta-mode", b"m", mode=0o600)                             # mode only
          .file("meta-time", b"t", mtime=1_600_000_000)                    # mtime only
          .file("meta-owner", b"o", uid=1234)        # owner only (applied when root)
          .whiteout("gone").whiteout("gonedir").dir("to-dir")               # deletions, kind change
          .dir("usr").opaque("usr").file("usr/new", b"n"))                  # opaque directory
    if xattrs:
        tb.file("meta-xattr", b"x", xattrs={"user.color": b"blue"})      # xattr only
    child = add(svc, tb.build(), base)
    c = layer_dir(svc, child)
    assert tree_snapshot(str(p), times=True) == before
    assert export(svc, base) == base_data
    for name in ("etc/passwd", "meta-mode", "meta-time", "meta-owner", *(["meta-xattr"] if xattrs else [])):
        assert ino(c / name) != ino(p / name), name
    assert os.stat(c / "meta-mode").st_mode & 0o777 == 0o600
    assert os.stat(c / "meta-time").st_mtime == 1_600_000_000
    assert not (c / "gone").exists() and not (c / "usr/bin").exists() and (c / "to-dir").is_dir()
    assert ino(c / "etc/hostname") == ino(p / "etc/hostname")  # untouched: still shared


def test_hard_link_entry_to_an_inherited_file(svc: ImageService) -> None:
    base_data = base_tar().build()
    base = add(svc, base_data)
    child = add(svc, TarBuilder().hardlink("passwd-link", "etc/passwd").build(), base)
    p, c = layer_dir(svc, base), layer_dir(svc, child)
    # The new name is one more link to the shared inode: content and metadata untouched.
    assert ino(c / "passwd-link") == ino(p / "etc/passwd")
    assert export(svc, base) == base_data
    # A grandchild rewriting the file gets its own inode; both ancestors keep theirs.
    grand = add(svc, TarBuilder().file("passwd-link", b"changed").build(), child)
    assert (layer_dir(svc, grand) / "passwd-link").read_bytes() == b"changed"
    assert (c / "passwd-link").read_bytes() == (p / "etc/passwd").read_bytes() == b"root:x:0:0\n"


def test_removing_a_layer_keeps_shared_files_of_others(svc: ImageService) -> None:
    base = add(svc, base_tar().build())
    a = add(svc, TarBuilder().file("a", b"a").build(), base)
    b = add(svc, TarBuilder().file("b", b"b").build(), base)
    svc.release_layer(a.chain_id)
    assert (layer_dir(svc, b) / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    assert (layer_dir(svc, base) / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    # below the store (which refuses to remove a parent first), the driver's layers do not depend on
    # their parent's directory at all
    svc.layer_store.hook.lamina_remove(layer_id=base.cache_id)
    assert (layer_dir(svc, b) / "etc/passwd").read_bytes() == b"root:x:0:0\n"


def test_layers_with_read_only_directories_are_removed(svc: ImageService) -> None:
    # As root this is plain rmtree; without privileges the driver makes the directories writable first.
    tb = (TarBuilder().dir("ro", mode=0o555).file("ro/f", b"f").dir("ro/none", mode=0o500)
          .file("ro/none/g", b"g").dir("ro/none/deeper", mode=0o500))
    base = add(svc, tb.build())
    child = add(svc, TarBuilder().file("x", b"x").build(), base)
    d = layer_dir(svc, child)
    assert svc.release_layer(child.chain_id) == [child.chain_id]
    assert not d.exists()
    svc.release_layer(base.chain_id)
    assert svc.layers() == []
    assert os.listdir(layer_dir(svc, base).parent) == []


def test_layers_with_unreadable_directories_are_removed(svc: ImageService, tmp_path: Path) -> None:
    # Without privileges, directories their owner may not read or search, the layer's root included, are
    # opened up before removal; a symlink to a directory outside the layer is never followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o555)
    tb = (TarBuilder().dir(".", mode=0o300).dir("none", mode=0o000).dir("wonly", mode=0o300)
          .file("wonly/f", b"f").dir("wonly/none", mode=0o000).file("wonly/none/g", b"g")
          .symlink("out", str(outside)))
    layer = add(svc, tb.build())
    d = layer_dir(svc, layer)
    assert svc.release_layer(layer.chain_id) == [layer.chain_id]
    assert not d.exists() and os.listdir(d.parent) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o555
    outside.chmod(0o755)


def test_child_writes_into_read_only_directories(svc: ImageService) -> None:
    # A child's directories keep the parent's modes; applying into a read-only one must work without
    # privileges too, give the child its own inode and leave the directory's mode as it was.
    base_data = TarBuilder().dir("ro", mode=0o555).file("ro/f", b"parent").build()
    base = add(svc, base_data)
    child = add(svc, TarBuilder().file("ro/f", b"child").file("ro/new", b"n").build(), base)
    p, c = layer_dir(svc, base), layer_dir(svc, child)
    assert (c / "ro/f").read_bytes() == b"child" and (c / "ro/new").read_bytes() == b"n"
    assert ino(c / "ro/f") != ino(p / "ro/f")
    assert (p / "ro/f").read_bytes() == b"parent" and not (p / "ro/new").exists()
    assert stat.S_IMODE(os.stat(c / "ro").st_mode) == stat.S_IMODE(os.stat(p / "ro").st_mode) == 0o555
    assert export(svc, base) == base_data
    for layer in (child, base):
        assert svc.release_layer(layer.chain_id) == [layer.chain_id]
    assert os.listdir(p.parent) == []


def test_the_stores_entry_limit_applies(tmp_path: Path) -> None:
    # storage.limits.max_layer_entries reaches apply_tar through the DiffStream: nothing to pass on.
    cfg = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="hardlink",
                 limits=Limits(max_layer_entries=3))
    with ImageService.open(cfg) as svc:
        add(svc, TarBuilder().dir("a").file("a/1").file("a/2").build())
        with pytest.raises(LimitExceeded, match="more than 3 entries"):
            add(svc, TarBuilder().dir("a").file("a/1").file("a/2").file("a/3").build())
        assert len(svc.layers()) == 1
        home = tmp_path / "root" / "hardlink"
        assert len(os.listdir(home / "dir")) == 1


def test_read_write_layers_get_private_copies(svc: ImageService) -> None:
    base = add(svc, base_tar().build())
    hook = svc.layer_store.hook
    hook.lamina_create(layer_id="c" * 64, parent=base.cache_id, rw=True)
    rw = Path(hook.lamina_metadata(layer_id="c" * 64)["dir"])
    p = layer_dir(svc, base)
    assert ino(rw / "etc/passwd") != ino(p / "etc/passwd")
    with open(rw / "etc/passwd", "r+b") as f:  # a container writing in place
        f.write(b"owned")
    assert (p / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    # a layer created on a read-write layer must not share what the container may still write
    hook.lamina_create(layer_id="d" * 64, parent="c" * 64, rw=False)
    d = Path(hook.lamina_metadata(layer_id="d" * 64)["dir"])
    assert ino(d / "etc/passwd") != ino(rw / "etc/passwd")
    assert hook.lamina_metadata(layer_id="c" * 64)["files"] == "private copies"
    for lid in ("d" * 64, "c" * 64):
        assert hook.lamina_remove(layer_id=lid)
        assert not hook.lamina_exists(layer_id=lid)


def test_in_place_write_through_a_mount_reaches_the_parent(svc: ImageService) -> None:
    """The documented trade-off: a mounted committed layer is read-only by convention only."""
    base = add(svc, base_tar().build())
    child = add(svc, TarBuilder().file("x", b"x").build(), base)
    with svc.mounted_layer(child.chain_id) as path, open(Path(path, "etc/passwd"), "r+b") as f:
        f.write(b"ROOT")
    assert (layer_dir(svc, base) / "etc/passwd").read_bytes().startswith(b"ROOT")
    with pytest.raises(ExportError):
        export(svc, base)


def test_copy_below_copies_small_files(tmp_path: Path) -> None:
    with open_store(tmp_path, copy_below=100) as svc:
        base = add(svc, base_tar().build())
        child = add(svc, TarBuilder().file("x", b"x").build(), base)
        p, c = layer_dir(svc, base), layer_dir(svc, child)
        assert ino(c / "etc/passwd") != ino(p / "etc/passwd")  # 11 bytes: copied
        assert ino(c / "usr/bin/tool") == ino(p / "usr/bin/tool")  # 1000 bytes: shared
        assert tree_snapshot(str(c / "etc")) == tree_snapshot(str(p / "etc"))
        assert ("Last snapshot", "1 linked, 2 copied") in svc.layer_store_status()


@pytest.mark.parametrize("options", [{"copy_below": -1}, {"copy_below": "1k"}, {"copy_below": True}, {"cpy": 1}])
def test_bad_options_are_rejected_by_the_probe(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(DriverUnsupported):
        HardlinkDriver.probe(tmp_path / "home", options)


def test_layers_recorded_by_the_driver_itself_still_export(svc: ImageService, tmp_path: Path) -> None:
    """Before lamina kept tar-split records, this driver kept them under records/: such layers export."""
    import hashlib

    base = add(svc, base_tar().build())
    store_record = tmp_path / "root" / "tar-split" / f"{base.cache_id}.tsr"
    legacy = tmp_path / "root" / "hardlink" / "records"
    legacy.mkdir()
    os.replace(store_record, legacy / store_record.name)
    with svc.export_layer(base.chain_id) as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == base.diff_id
    svc.release_layer(base.chain_id)
    assert list(legacy.iterdir()) == []

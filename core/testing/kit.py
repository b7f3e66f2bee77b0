"""The conformance suite: one class of checks, run against any driver by name.

Each check opens a fresh store in a temporary directory with the driver under test. A driver whose probe
says it cannot work here is skipped with the probe's reason.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lamina.driver import Capabilities
from lamina.errors import DriverUnsupported, FormatError, LaminaError, OperationUnsupported
from lamina.service import ImageService
from lamina.testing.helpers import TarBuilder, compress, require_root, sha256, tree_snapshot


def export_bytes(svc: ImageService, chain: str) -> bytes:
    with svc.export_layer(chain) as s:
        return s.read()


def listing(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


class DriverConformance:
    """Subclass with ``driver = "<name>"`` (and optionally ``driver_options``) to run the kit."""

    driver: ClassVar[str] = ""
    driver_options: ClassVar[dict[str, Any]] = {}

    # -- fixtures -------------------------------------------------------------------------------------
    @pytest.fixture
    def lamina_driver(self) -> str:
        if not self.driver:
            pytest.skip("no driver named for the conformance kit")
        return self.driver

    @pytest.fixture
    def store_dirs(self, tmp_path: Path) -> tuple[Path, Path]:
        return tmp_path / "root", tmp_path / "run"

    @pytest.fixture
    def svc(self, lamina_driver: str, store_dirs: tuple[Path, Path]) -> Iterator[ImageService]:
        from lamina.config import Config

        root, run = store_dirs
        cfg = Config(root=root, runroot=run, driver=lamina_driver,
                     driver_options={lamina_driver: dict(self.driver_options)})
        try:
            s = ImageService.open(cfg)
        except DriverUnsupported as e:
            pytest.skip(f"driver {lamina_driver} unsupported here: {e.message}")
        try:
            yield s
        finally:
            s.cleanup()

    @pytest.fixture
    def caps(self, svc: ImageService) -> Capabilities:
        return svc.capabilities()

    def need_mount(self, caps: Capabilities) -> None:
        if not caps.can_mount:
            pytest.skip("driver cannot mount")

    # -- helpers --------------------------------------------------------------------------------------
    def add(self, svc: ImageService, tb: TarBuilder | bytes, parent: str | None = None,
            compression: str = "none") -> Any:
        data = tb if isinstance(tb, bytes) else tb.build(compression)
        return svc.register_layer(io.BytesIO(data), parent)

    # -- checks ---------------------------------------------------------------------------------------
    def test_create_and_remove(self, svc: ImageService) -> None:
        layer = self.add(svc, TarBuilder().dir("etc").file("etc/hostname", b"box\n"))
        assert svc.layer_store.hook.lamina_exists(layer_id=layer.cache_id)
        assert [x.chain_id for x in svc.layers()] == [layer.chain_id]
        assert svc.release_layer(layer.chain_id) == [layer.chain_id]
        assert svc.layers() == []
        assert not svc.layer_store.hook.lamina_exists(layer_id=layer.cache_id)

    def test_layers_listing_names_what_the_driver_holds(self, svc: ImageService) -> None:
        """``lamina_layers`` (optional; ``system check`` finds leftovers with it) lists a layer while the
        driver holds it and forgets it once removed, and a store of sound layers checks clean."""
        driver = svc.layer_store.driver
        if not driver.implements("lamina_layers"):
            pytest.skip("driver does not list its layers")
        layer = self.add(svc, TarBuilder().dir("etc").file("etc/hostname", b"box\n"))
        assert layer.cache_id in (driver.layers() or [])
        assert svc.check().problems == []
        svc.release_layer(layer.chain_id)
        assert layer.cache_id not in (driver.layers() or [])

    def test_apply_and_read_back(self, svc: ImageService, caps: Capabilities) -> None:
        tb = (TarBuilder().dir("usr").dir("usr/bin").file("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755)
              .symlink("bin", "usr/bin").file("big", os.urandom(3 * 1024 * 1024 + 7)).dir("empty", mode=0o700)
              .fifo("pipe"))
        data = tb.build()
        layer = self.add(svc, data)
        assert layer.diff_id == sha256(data)
        if not caps.can_mount:
            names = set(listing(export_bytes(svc, layer.chain_id)))
            assert {"usr/bin/tool", "bin", "big", "empty", "pipe"} <= names
            return
        with svc.mounted_layer(layer.chain_id) as path:
            snap = tree_snapshot(path)
            assert snap["usr/bin/tool"][1] == 0o755
            assert Path(path, "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
            assert os.readlink(Path(path, "bin")) == "usr/bin"
            assert snap["empty"][1] == 0o700
            assert Path(path, "big").stat().st_size == 3 * 1024 * 1024 + 7
            assert Path(path, "pipe").is_fifo()
            assert Path(path, "big").stat().st_mtime == 1_700_000_000

    def test_whiteouts_and_opaque_dirs_across_layers(self, svc: ImageService, caps: Capabilities) -> None:
        self.need_mount(caps)
        base = self.add(svc, TarBuilder().dir("a").file("a/old1", b"1").dir("a/sub").file("a/sub/deep", b"2")
                        .file("gone", b"x").dir("gonedir").file("gonedir/f", b"y").file("keep", b"k"))
        child = self.add(svc, TarBuilder().dir("a").file("a/new", b"n").opaque("a").whiteout("gone")
                         .whiteout("gonedir"), parent=base.chain_id)
        with svc.mounted_layer(child.chain_id) as path:
            names = {str(p.relative_to(path)) for p in Path(path).rglob("*")}
            assert names == {"a", "a/new", "keep"}
        with svc.mounted_layer(base.chain_id) as path:
            assert Path(path, "a/sub/deep").read_bytes() == b"2"
            assert Path(path, "gone").exists()
        # the exported diff still carries the whiteouts exactly
        names = set(listing(export_bytes(svc, child.chain_id)))
        assert {"a/.wh..wh..opq", ".wh.gone", ".wh.gonedir", "a/new"} <= names

    def test_invalid_whiteouts_rejected(self, svc: ImageService) -> None:
        for bad in (".wh.", "d/.wh..", "d/.wh..."):
            with pytest.raises(FormatError):
                self.add(svc, TarBuilder().dir("d").file(bad))
        assert svc.layers() == []

    def test_hardlinks(self, svc: ImageService, caps: Capabilities) -> None:
        data = TarBuilder().dir("d").file("d/f", b"shared").hardlink("d/g", "d/f").hardlink("h", "d/f").build()
        layer = self.add(svc, data)
        assert export_bytes(svc, layer.chain_id) == data
        if not caps.can_mount:
            return
        with svc.mounted_layer(layer.chain_id) as path:
            a, b, c = (os.stat(Path(path, p)) for p in ("d/f", "d/g", "h"))
            assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3

    def test_hardlink_out_of_tree_rejected(self, svc: ImageService) -> None:
        with pytest.raises(FormatError):
            self.add(svc, TarBuilder().hardlink("h", "../../etc/passwd"))
        with pytest.raises(FormatError):
            self.add(svc, TarBuilder().hardlink("h", "missing"))
        assert svc.layers() == []

    def test_symlinks_resolve_inside_root(self, svc: ImageService, caps: Capabilities, tmp_path: Path) -> None:
        self.need_mount(caps)
        outside = tmp_path / "outside"
        outside.mkdir()
        tb = (TarBuilder().symlink("abs", str(outside)).dir("d").symlink("d/up", "../" + str(outside))
              .file("abs/escape1", b"1").file("d/up/escape2", b"2"))
        layer = self.add(svc, tb)
        assert list(outside.iterdir()) == []
        with svc.mounted_layer(layer.chain_id) as path:
            # the writes landed inside the layer, where the symlinks point when the root is "/"
            inside = Path(path) / str(outside).lstrip("/")
            assert (inside / "escape1").read_bytes() == b"1"
            assert (inside / "escape2").read_bytes() == b"2"

    def test_symlink_leading_out_of_root_rejected(self, svc: ImageService) -> None:
        for tb in (TarBuilder().symlink("out", "../x"),
                   TarBuilder().dir("a").symlink("a/out", "../../etc").file("a/out/passwd", b"x"),
                   TarBuilder().dir("a").dir("a/b").symlink("a/b/l", "../../../../../../../tmp")):
            with pytest.raises(FormatError, match="leads out of the layer root"):
                self.add(svc, tb)
        assert svc.layers() == []

    def test_traversal_rejected_store_unchanged(self, svc: ImageService) -> None:
        ok = self.add(svc, TarBuilder().file("ok", b"ok"))
        for tb in (TarBuilder().file("../evil", b"x"), TarBuilder().dir("a").file("a/../../evil", b"x")):
            with pytest.raises(FormatError):
                self.add(svc, tb)
        assert [x.chain_id for x in svc.layers()] == [ok.chain_id]

    def test_xattrs(self, svc: ImageService, caps: Capabilities, tmp_path: Path) -> None:
        try:
            os.setxattr(tmp_path, "user.lamina-probe", b"1")
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                pytest.skip("backing filesystem has no user xattrs")
            raise
        data = (TarBuilder().file("f", b"x", xattrs={"user.color": b"blue", "trusted.overlay.opaque": b"y"})
                .build())
        layer = self.add(svc, data)
        assert export_bytes(svc, layer.chain_id) == data
        if not caps.can_mount:
            return
        with svc.mounted_layer(layer.chain_id) as path:
            assert os.getxattr(Path(path, "f"), "user.color") == b"blue"
            if os.geteuid() == 0:
                assert "trusted.overlay.opaque" not in os.listxattr(Path(path, "f"))

    def test_ownership_and_modes(self, svc: ImageService, caps: Capabilities) -> None:
        require_root()
        self.need_mount(caps)
        tb = (TarBuilder().dir("home", uid=1000, gid=1000, mode=0o750)
              .file("home/suid", b"x", mode=0o4755, uid=1000, gid=1000)
              .file("home/sgid", b"y", mode=0o2711, uid=0, gid=50).symlink("home/l", "suid", uid=7, gid=8))
        layer = self.add(svc, tb)
        with svc.mounted_layer(layer.chain_id) as path:
            st = os.stat(Path(path, "home/suid"))
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o4755)
            st = os.stat(Path(path, "home/sgid"))
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 50, 0o2711)
            st = os.stat(Path(path, "home"))
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o750)
            st = os.lstat(Path(path, "home/l"))
            assert (st.st_uid, st.st_gid) == (7, 8)

    def test_deep_chain(self, svc: ImageService, caps: Capabilities) -> None:
        depth = 200
        parent = None
        chains = []
        for i in range(depth):
            tb = TarBuilder().file(f"layer{i}", str(i).encode())
            if i:
                tb.whiteout(f"layer{i - 1}")
            layer = self.add(svc, tb, parent)
            parent = layer.chain_id
            chains.append(layer)
        assert chains[-1].depth == depth
        assert len(svc.layers()) == depth
        if caps.can_mount:
            with svc.mounted_layer(chains[-1].chain_id) as path:
                assert sorted(os.listdir(path)) == [f"layer{depth - 1}"]
        for layer in (chains[0], chains[depth // 2], chains[-1]):
            assert sha256(export_bytes(svc, layer.chain_id)) == layer.diff_id

    def test_deep_directory_tree(self, svc: ImageService, caps: Capabilities) -> None:
        """A directory chain deeper than Python's recursion limit, with paths longer than PATH_MAX: the
        driver applies, diffs, exports, mounts and removes it (walk trees with lamina.driver.DirStack)."""
        depth = 1500
        tb = TarBuilder()
        path = ""
        for _ in range(depth):
            path = f"{path}/dd" if path else "dd"
            tb.dir(path)
        tb.file(f"{path}/bottom", b"deep")
        base = self.add(svc, tb)
        assert len(path) > os.pathconf("/", "PC_PATH_MAX")
        assert sha256(export_bytes(svc, base.chain_id)) == base.diff_id
        changes = svc.layer_changes(base.chain_id)
        assert len(changes) == depth + 1 and changes[-1].path == f"/{path}/bottom"
        top = self.add(svc, TarBuilder().whiteout("dd"), parent=base.chain_id)
        assert [(c.kind, c.path) for c in svc.layer_changes(top.chain_id)] == [("D", "/dd")]
        if caps.can_mount:
            with svc.mounted_layer(top.chain_id) as mounted:
                assert os.listdir(mounted) == []
        svc.release_layer(top.chain_id)
        svc.release_layer(base.chain_id)
        assert svc.layers() == []

    def test_changes(self, svc: ImageService) -> None:
        base = self.add(svc, TarBuilder().dir("etc").file("etc/a", b"1").file("etc/b", b"2").file("x", b"x"))
        child = self.add(svc, TarBuilder().dir("etc").file("etc/a", b"changed").whiteout("x")
                         .file("etc/new", b"n"), parent=base.chain_id)
        got = {(c.kind, c.path) for c in svc.layer_changes(child.chain_id)}
        assert {("C", "/etc/a"), ("A", "/etc/new"), ("D", "/x")} <= got
        assert not any(p in ("/etc/b",) for _, p in got)
        first = {(c.kind, c.path) for c in svc.layer_changes(base.chain_id)}
        assert ("A", "/etc/a") in first

    def test_apply_of_diff_reproduces_tree(self, svc: ImageService, caps: Capabilities) -> None:
        self.need_mount(caps)
        base = self.add(svc, TarBuilder().dir("d").file("d/a", b"a").file("d/b", b"b").symlink("s", "d/a"))
        child = self.add(svc, TarBuilder().dir("d", mode=0o700).file("d/a", b"AAA", mode=0o600).whiteout("d/b")
                         .file("n", b"new").hardlink("n2", "n"), parent=base.chain_id)
        st = svc.layer_store
        pcache = base.cache_id
        with st.hook.lamina_diff(layer_id=child.cache_id, parent=pcache) as diff:
            data = diff.read()
        again = svc.register_layer(io.BytesIO(data), base.chain_id)
        with svc.mounted_layer(child.chain_id) as p1, svc.mounted_layer(again.chain_id) as p2:
            assert tree_snapshot(p1, times=True) == tree_snapshot(p2, times=True)

    def test_exact_tar_round_trip_any_compression(self, svc: ImageService) -> None:
        tb = (TarBuilder(fmt=tarfile.GNU_FORMAT).dir("a").file("a/" + "long" * 40, os.urandom(1000))
              .symlink("a/" + "l" * 120, "x" * 150).file("z", b""))
        raw = tb.build() + bytes(4096)  # trailing zeros after the end marker are part of the stream
        chains = {self.add(svc, compress(raw, c)).chain_id for c in ("none", "gzip", "zstd", "xz")}
        assert len(chains) == 1
        chain = chains.pop()
        out = export_bytes(svc, chain)
        assert out == raw
        assert svc.get_layer(chain).refs == 4

    def test_truncated_and_corrupt_streams(self, svc: ImageService) -> None:
        data = TarBuilder().file("f", os.urandom(200_000)).build()
        gz = compress(data, "gzip")
        for bad in (gz[: len(gz) // 2], compress(data, "zstd")[:-9], data[:70_000], data[:1000] + b"\xff" * 512):
            with pytest.raises(FormatError):
                self.add(svc, bad)
        assert svc.layers() == []

    def test_mount_refcounts(self, svc: ImageService, caps: Capabilities) -> None:
        layer = self.add(svc, TarBuilder().file("f", b"x"))
        if not caps.can_mount:
            with pytest.raises(OperationUnsupported):
                svc.mount_layer(layer.chain_id)
            return
        p1 = svc.mount_layer(layer.chain_id)
        p2 = svc.mount_layer(layer.chain_id)
        assert p1 == p2 and Path(p1, "f").read_bytes() == b"x"
        assert svc.layer_mount_count(layer.chain_id) == 2
        assert svc.unmount_layer(layer.chain_id) == 1
        with pytest.raises(LaminaError):
            svc.release_layer(layer.chain_id)  # still mounted
        assert svc.unmount_layer(layer.chain_id) == 0
        assert svc.unmount_layer(layer.chain_id) == 0
        svc.release_layer(layer.chain_id)

    def test_dedupe_same_content(self, svc: ImageService) -> None:
        data = TarBuilder().file("f", b"same").build()
        a = self.add(svc, data)
        b = self.add(svc, compress(data, "gzip"))
        assert a.chain_id == b.chain_id and a.cache_id == b.cache_id
        assert svc.get_layer(a.chain_id).refs == 2
        assert len(svc.layers()) == 1
        svc.release_layer(a.chain_id)
        assert len(svc.layers()) == 1
        svc.release_layer(a.chain_id)
        assert svc.layers() == []

    def test_rw_layers_gated_by_capability(self, svc: ImageService, caps: Capabilities) -> None:
        hook = svc.layer_store.hook
        if caps.supports_rw_layers:
            assert hook.lamina_create(layer_id="f" * 64, parent=None, rw=True)
            assert hook.lamina_exists(layer_id="f" * 64)
            assert hook.lamina_remove(layer_id="f" * 64)
            assert not hook.lamina_exists(layer_id="f" * 64)
        else:
            with pytest.raises(OperationUnsupported):
                hook.lamina_create(layer_id="f" * 64, parent=None, rw=True)

    def test_export_detects_tampering(self, svc: ImageService, caps: Capabilities) -> None:
        self.need_mount(caps)
        layer = self.add(svc, TarBuilder().file("f", b"original"))
        with svc.mounted_layer(layer.chain_id) as path:
            Path(path, "f").write_bytes(b"tampered")
        with pytest.raises(LaminaError):
            export_bytes(svc, layer.chain_id)


    def test_image_layers_kept_apart_from_containers_layers(self, svc: ImageService, caps: Capabilities,
                                                            tmp_path: Path) -> None:
        """``keeps_images_apart`` (optional): with ``[storage] image_store``, image layers live under the
        driver's ``image_home`` and read-write layers under its ``home``; both export, mount and stack as in
        a store that keeps them together, and removing them leaves neither place holding a layer."""
        if not svc.layer_store.driver.info.cls.keeps_images_apart:
            pytest.skip("driver does not keep image layers apart")
        self.need_mount(caps)
        apart = tmp_path / "apart"
        cfg = dataclasses.replace(svc.config, root=apart / "root", runroot=apart / "run", image_store=apart / "images")
        base_tar = TarBuilder().dir("a").file("a/old", b"1").file("gone", b"x").build()
        child_tar = TarBuilder().dir("a").file("a/new", b"n").whiteout("gone").build()
        together = [self.add(svc, base_tar)]
        together.append(self.add(svc, child_tar, parent=together[0].chain_id))
        with ImageService.open(cfg) as other:
            home = other.layer_store.driver.instance.home
            image_home = other.layer_store.driver.instance.image_home
            assert image_home == apart / "images" / other.layer_store.driver.name
            base = self.add(other, base_tar)
            child = self.add(other, child_tar, parent=base.chain_id)
            assert [export_bytes(other, c.chain_id) for c in (base, child)] == \
                [export_bytes(svc, c.chain_id) for c in together]
            other.import_image(io.BytesIO(TarBuilder().dir("a").file("a/new", b"n").file("a/old", b"1").build()),
                               "example.com/apart:1")
            c = other.create_container("example.com/apart:1")
            path = other.mount(c.id)
            try:
                assert sorted(os.listdir(Path(path, "a"))) == ["new", "old"]
                Path(path, "written-by-the-container").write_bytes(b"w")
            finally:
                other.unmount(c.id)
            for where, mine in ((home, "written-by-the-container"), (image_home, "new")):
                assert [p for p in where.rglob(mine) if p.is_file()], f"{mine} is not under {where}"
            assert not list(image_home.rglob("written-by-the-container"))
            other.remove_container(c.id)
            other.image_delete("example.com/apart:1")
            assert other.check().problems == []
            assert [other.release_layer(c.chain_id) for c in (child, base)] == [[child.chain_id], [base.chain_id]]
            assert other.layers() == [] and (other.layer_store.driver.layers() or []) == []

    def test_adopted_layers_read_the_other_store_in_place(self, svc: ImageService, caps: Capabilities,
                                                           tmp_path: Path) -> None:
        """``lamina_adopt`` (optional): layers of another store of this driver, opened only to be read (an
        additional image store), used in place show the same tree and export the same bytes; removing them
        leaves that store as it was."""
        if not svc.layer_store.driver.implements("lamina_adopt"):
            pytest.skip("driver does not adopt other stores' layers")
        from lamina.config import Config
        from lamina.store.kernel import Store

        other_root = tmp_path / "other"
        cfg = dataclasses.replace(svc.config, root=other_root / "root", runroot=other_root / "run", image_store=None)
        with ImageService.open(cfg) as writer:
            base = self.add(writer, TarBuilder().dir("a").file("a/old", b"1").file("gone", b"x").file("keep", b"k"))
            child = self.add(writer, TarBuilder().dir("a").file("a/new", b"n").opaque("a").whiteout("gone"),
                             parent=base.chain_id)
            expected = [export_bytes(writer, c) for c in (base.chain_id, child.chain_id)]
        before = tree_snapshot(str(other_root / "root"))
        shared = ImageService(Store(Config(root=other_root / "root", runroot=tmp_path / "shared-run",
                                           driver=svc.config.driver, driver_options=svc.config.driver_options),
                                    shared=True))
        try:
            with svc.store.lease() as lease:
                adopted = [svc.layer_store.adopt(shared.layer_store, base.chain_id, None, lease)]
                if adopted[0] is None:
                    pytest.skip("driver declined to adopt its own kind of layer here")
                adopted.append(svc.layer_store.adopt(shared.layer_store, child.chain_id, base.chain_id, lease))
                if adopted[1] is None:
                    pytest.skip("driver declined to adopt a child layer here")
                assert [a.chain_id if a else None for a in adopted] == [base.chain_id, child.chain_id]
                assert [export_bytes(svc, c) for c in (base.chain_id, child.chain_id)] == expected
                if caps.can_mount:
                    with svc.mounted_layer(child.chain_id) as path:
                        names = {str(p.relative_to(path)) for p in Path(path).rglob("*")}
                        assert names == {"a", "a/new", "keep"}
                assert svc.check().problems == []
        finally:
            shared.cleanup()
        assert svc.layers() == []  # the lease held them; nothing else does
        assert tree_snapshot(str(other_root / "root")) == before

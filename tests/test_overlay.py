"""overlay-specific behaviour with real kernel mounts, a real rootless user namespace and fuse-overlayfs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import lamina_cli
from lamina.config import Config
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root, require_tool


def _overlay_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if " - overlay " in line or " - fuse.fuse-overlayfs " in line]


@pytest.fixture
def overlay_svc(tmp_path: Path) -> Iterator[ImageService]:
    require_root()
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="overlay")) as svc:
        yield svc
    assert not [m for m in _overlay_mounts() if m.startswith(str(tmp_path))], "mounts leaked"


def test_debian_rootfs_with_deletions_and_opaque_dir(overlay_svc: ImageService, debian_rootfs_tar: Path) -> None:
    svc = overlay_svc
    with open(debian_rootfs_tar, "rb") as f:
        base = svc.register_layer(f)
    top_tar = (TarBuilder().dir("etc").whiteout("etc/hostname").dir("etc/apt").opaque("etc/apt")
               .file("etc/apt/only-this", b"x").whiteout("usr/share/doc").file("etc/added", b"new").build())
    top = svc.register_layer(io.BytesIO(top_tar), base.chain_id)
    with svc.mounted_layer(top.chain_id) as path:
        assert path in _overlay_mounts()  # a real overlay mount, visible in the mount table
        root = Path(path)
        assert not (root / "etc/hostname").exists()
        assert not (root / "usr/share/doc").exists()
        assert os.listdir(root / "etc/apt") == ["only-this"]
        assert (root / "etc/added").read_bytes() == b"new"
        assert (root / "etc/os-release").read_text().startswith("PRETTY_NAME=\"Debian")
    assert path not in _overlay_mounts()
    for layer, raw in ((base, debian_rootfs_tar.read_bytes()), (top, top_tar)):
        with svc.export_layer(layer.chain_id) as s:
            assert s.read() == raw
    # the base layer is never mounted: its view is its own directory
    with svc.mounted_layer(base.chain_id) as path:
        assert path not in _overlay_mounts() and Path(path, "etc/hostname").exists()


def _edit(root: Path) -> None:
    """The same edits, with fixed times, so two drivers can be compared byte for byte."""
    (root / "etc/motd").write_text("hello\n")
    (root / "etc/passwd").unlink()
    os.chmod(root / "etc/shadow", 0o600)
    shutil.rmtree(root / "usr/share/doc")
    (root / "var/lib/new").mkdir(parents=True)
    (root / "var/lib/new/state").write_bytes(b"s" * 5000)
    shutil.rmtree(root / "etc/apt")
    (root / "etc/apt").mkdir()
    (root / "etc/apt/sources.list").write_text("deb x y z\n")
    for p in ("etc/motd", "var/lib/new/state", "etc/apt/sources.list", "var/lib/new", "etc/apt", "etc",
              "var/lib", "var", "usr/share", "usr", "etc/shadow"):
        os.utime(root / p, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9), follow_symlinks=False)


def test_same_edits_same_diff_on_vfs_and_overlay(tmp_path: Path, debian_rootfs_tar: Path) -> None:
    require_root()
    digests = {}
    listings = {}
    for driver in ("vfs", "overlay"):
        cfg = Config(root=tmp_path / driver / "root", runroot=tmp_path / driver / "run", driver=driver)
        with ImageService.open(cfg) as svc, open(debian_rootfs_tar, "rb") as f:
            base = svc.register_layer(f)
            hook = svc.layer_store.hook
            rw = "c" * 64
            hook.lamina_create(layer_id=rw, parent=base.cache_id, rw=True)
            path = hook.lamina_mount(layer_id=rw, options=[])
            try:
                _edit(Path(path))
                listings[driver] = [str(c) for c in hook.lamina_changes(layer_id=rw, parent=base.cache_id)]
                with hook.lamina_diff(layer_id=rw, parent=base.cache_id) as d:
                    digests[driver] = hashlib.sha256(d.read()).hexdigest()
            finally:
                hook.lamina_unmount(layer_id=rw)
                hook.lamina_remove(layer_id=rw)
            if driver == "overlay":
                assert svc.capabilities().native_diff  # the comparison exercised the native path
    assert listings["vfs"] == listings["overlay"]
    assert "D /etc/passwd" in listings["overlay"] and "A /var/lib/new/state" in listings["overlay"]
    assert "D /etc/apt/apt.conf.d" in listings["overlay"]  # the opaque directory, expanded
    assert digests["vfs"] == digests["overlay"]


def test_chain_of_250_layers_mounts(overlay_svc: ImageService) -> None:
    parent = None
    for i in range(250):
        tb = TarBuilder().file(f"f{i:03d}", str(i).encode())
        if i % 10 == 9:
            tb.whiteout(f"f{i - 1:03d}")
        layer = overlay_svc.register_layer(io.BytesIO(tb.build()), parent)
        parent = layer.chain_id
    assert layer.depth == 250
    with overlay_svc.mounted_layer(layer.chain_id) as path:
        names = os.listdir(path)
        assert len(names) == 250 - 25 and "f248" not in names and Path(path, "f000").read_bytes() == b"0"


def test_native_diff_matches_the_merged_views(overlay_svc: ImageService) -> None:
    """Each layer's native changes are what comparing its mounted view with its parent's gives: opaque
    directories (a whiteout inside one included), whiteouts of lower directories, directories that are
    files below, and a deep directory chain shadowing one of a lower layer."""
    from lamina.fs.changes import tree_changes

    svc = overlay_svc
    assert svc.capabilities().native_diff
    deep = "/".join(["d"] * 300)
    tars = [
        TarBuilder().dir("a").file("a/x", b"x").file("a/y", b"y").dir("a/sub").file("a/sub/z", b"z")
        .dir("b").file("b/f", b"f").file("c", b"c").dir(deep).file(f"{deep}/bottom", b"1"),
        TarBuilder().opaque("a").whiteout("a/x").file("a/new", b"n").whiteout("b").dir("c").file("c/in", b"i")
        .file(f"{deep}/bottom", b"22").file(f"{deep}/more", b"m"),
        TarBuilder().dir("a").file("a/y", b"back").opaque("a/sub").whiteout(deep.rpartition("/")[0])
        .file("b", b"now a file"),
        # overlayfs ignores an opaque marker on a lower layer's root: the driver whites out one by one
        TarBuilder().file("kept", b"k").opaque("").file("new", b"n"),
    ]
    parent = None
    for tb in tars:
        layer = svc.register_layer(io.BytesIO(tb.build()), parent)
        native = [str(c) for c in svc.layer_changes(layer.chain_id)]
        with svc.mounted_layer(layer.chain_id) as mine:
            if parent is None:
                views = [str(c) for c in tree_changes(mine, None)]
            else:
                with svc.mounted_layer(parent) as theirs:
                    views = [str(c) for c in tree_changes(mine, theirs)]
        assert native == views
        parent = layer.chain_id
    assert "D /a/x" in [str(c) for c in svc.layer_changes(svc.layers()[1].chain_id)]
    with svc.mounted_layer(parent) as top:
        assert sorted(os.listdir(top)) == ["kept", "new"]
    on_top = svc.register_layer(io.BytesIO(TarBuilder().file("later", b"l").build()), parent)
    with svc.mounted_layer(on_top.chain_id) as path:
        assert sorted(os.listdir(path)) == ["kept", "later", "new"]


_HOLDER = """
import sys, time
from lamina.service import ImageService
with ImageService.open(root=sys.argv[1], runroot=sys.argv[2]) as svc:
    with svc.mounted_layer(sys.argv[3]) as path:
        print(path, flush=True)
        time.sleep(600)
"""


def test_killed_between_mount_and_unmount(tmp_path: Path) -> None:
    require_root()
    root, run = tmp_path / "root", tmp_path / "run"
    with ImageService.open(Config(root=root, runroot=run, driver="overlay")) as svc:
        base = svc.register_layer(io.BytesIO(TarBuilder().file("a", b"a").build()))
        top = svc.register_layer(io.BytesIO(TarBuilder().file("b", b"b").build()), base.chain_id)
    # a process holding a scoped mount is killed: the next command reclaims it
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), str(run), top.chain_id],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    path = proc.stdout.readline().decode().strip()
    assert path in _overlay_mounts()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path in _overlay_mounts()  # the kernel mount outlives the process
    lamina_cli("layers", root=tmp_path)
    assert path not in _overlay_mounts()
    # a persistent mount taken by the CLI survives the CLI and goes with `layer umount`
    out = lamina_cli("layer", "mount", top.chain_id, root=tmp_path).stdout.decode().strip()
    assert out == path and path in _overlay_mounts()
    lamina_cli("layer", "mount", top.chain_id, root=tmp_path)
    lamina_cli("layer", "umount", top.chain_id, root=tmp_path)
    assert path in _overlay_mounts()
    lamina_cli("layer", "umount", top.chain_id, root=tmp_path)
    assert path not in _overlay_mounts()
    with ImageService.open(root=root, runroot=run) as svc:
        assert svc.layer_mount_count(top.chain_id) == 0
    # a mount that vanished behind lamina's back is re-established on the next get
    lamina_cli("layer", "mount", top.chain_id, root=tmp_path)
    subprocess.run(["umount", path], check=True)
    assert lamina_cli("layer", "mount", top.chain_id, root=tmp_path).stdout.decode().strip() == path
    assert path in _overlay_mounts()
    lamina_cli("layer", "umount", "--force", top.chain_id, root=tmp_path)
    assert path not in _overlay_mounts()


_ROOTLESS = """
import importlib, io, json, os, pkgutil, sys
import lamina, lamina.drivers
# Import everything while still root: this interpreter may live where an unprivileged user cannot read.
for m in pkgutil.walk_packages(lamina.__path__, "lamina."):
    if not m.name.endswith(("test_conformance", "__main__")):
        importlib.import_module(m.name)
import ctypes, json, secrets, shutil, sqlite3, subprocess, tempfile, psutil, xattr, isal.igzip, zstandard
from lamina.fs.mounts import libc
from lamina.config import Config
from lamina.service import ImageService
from lamina.testing import TarBuilder
c = libc()
# Become an ordinary user, then enter a new user and mount namespace as `unshare -rm` does.
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
c.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: changing uid made /proc/self root-owned
assert c.unshare(0x10000000 | 0x00020000) == 0, ctypes.get_errno()
open("/proc/self/setgroups", "w").write("deny")
open("/proc/self/uid_map", "w").write("0 65534 1")
open("/proc/self/gid_map", "w").write("0 65534 1")
os.environ["LAMINA_DISABLE_PLUGIN_AUTOLOAD"] = "1"
root = sys.argv[1]
out = {"outside_uid": open("/proc/self/uid_map").read().split()[1]}
with ImageService.open(Config(root=root + "/root", runroot=root + "/run", driver="overlay")) as svc:
    out["status"] = dict(svc.layer_store_status())
    base = svc.register_layer(io.BytesIO(TarBuilder().dir("d").file("d/a", b"a").file("gone", b"g").build()))
    top = svc.register_layer(io.BytesIO(TarBuilder().opaque("d").file("d/b", b"b").whiteout("gone").build()),
                             base.chain_id)
    with svc.mounted_layer(top.chain_id) as path:
        out["listing"] = sorted(os.listdir(path)) + sorted(os.listdir(path + "/d"))
        out["mounted"] = any(" - overlay " in l and path in l for l in open("/proc/self/mountinfo"))
        out["userxattr"] = any("userxattr" in l and path in l for l in open("/proc/self/mountinfo"))
    out["changes"] = [str(c) for c in svc.layer_changes(top.chain_id)]
print(json.dumps(out))
"""


def test_rootless_user_namespace() -> None:
    require_root()  # to become an unprivileged user for the test
    work = Path(tempfile.mkdtemp(prefix="lamina-rootless-", dir="/tmp"))
    try:
        os.chown(work, 65534, 65534)
        proc = subprocess.run([sys.executable, "-c", _ROOTLESS, str(work)], capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        assert out["outside_uid"] == "65534"
        assert out["status"]["Mount mode"] == "userxattr"
        assert out["mounted"] and out["userxattr"]
        assert out["listing"] == ["d", "b"]
        assert "D /gone" in out["changes"] and "D /d/a" in out["changes"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fuse_overlayfs_mount_program(tmp_path: Path) -> None:
    require_root()
    prog = require_tool("fuse-overlayfs")
    if not os.path.exists("/dev/fuse"):
        subprocess.run(["modprobe", "fuse"], check=False)
    cfg = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="overlay",
                 driver_options={"overlay": {"mount_program": prog}})
    with ImageService.open(cfg) as svc:
        status = dict(svc.layer_store_status())
        assert status["Mount mode"] == "fuse" and status["Mount program"] == prog
        base = svc.register_layer(io.BytesIO(TarBuilder().dir("d").file("d/a", b"a").file("x", b"x").build()))
        top = svc.register_layer(io.BytesIO(TarBuilder().whiteout("x").file("d/b", b"b").build()), base.chain_id)
        with svc.mounted_layer(top.chain_id) as path:
            with open("/proc/self/mountinfo") as f:
                assert any("fuse-overlayfs" in line and path in line for line in f)
            assert sorted(os.listdir(path)) == ["d"] and sorted(os.listdir(Path(path, "d"))) == ["a", "b"]
        time.sleep(0.1)
        assert path not in _overlay_mounts()


def test_probe_findings_and_nested_overlay_refused(tmp_path: Path) -> None:
    require_root()
    out = json.loads(lamina_cli("drivers", "--format", "json", root=tmp_path).stdout)
    overlay = next(r for r in out if r["name"] == "overlay")
    assert overlay["supported"] and overlay["details"]["kernel"] == os.uname().release
    assert overlay["details"]["mount mode"] == "kernel" and overlay["details"]["userxattr"] == "no"
    # a store whose root lies on an overlay mount is refused with a one-line reason
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
                    str(tmp_path / "merged")], check=True)
    try:
        proc = lamina_cli("--driver", "overlay", "layers", root=tmp_path / "merged", check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and err.count("\n") == 1 and "itself an overlay" in err and "vfs" in err
    finally:
        subprocess.run(["umount", str(tmp_path / "merged")], check=True)

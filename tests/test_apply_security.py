"""The safe apply engine on real directories: escapes, replacements, exact export, devices, limits, xattrs.

Stores are real vfs (and tarball) stores under ``tmp_path``. Escape attempts aim at a sentinel directory
outside the store, so a broken engine would damage the sentinel, never the host; the one test that
names the host's ``/etc`` literally runs in a private mount namespace with a tmpfs over ``/etc``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.config import Config, Limits
from lamina.errors import FormatError, LimitExceeded, UnsafePathError
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root, tree_snapshot


@pytest.fixture(scope="module")
def catalog() -> Any:
    return discover()


def open_store(tmp_path: Path, catalog: Any, driver: str = "vfs", **kw: Any) -> ImageService:
    return ImageService.open(Config(root=tmp_path / "store", runroot=tmp_path / "run", driver=driver, **kw),
                             catalog=catalog)


@pytest.fixture
def svc(tmp_path: Path, catalog: Any) -> Iterator[ImageService]:
    s = open_store(tmp_path, catalog)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_bytes(b"victim")
    (d / "secret").write_bytes(b"real secret")
    (d / "sub").mkdir()
    (d / "sub" / "keep").write_bytes(b"keep")
    (d / "sub2").mkdir()
    (d / "sub2" / "file").write_bytes(b"file")
    return d


def add(svc: ImageService, tb: TarBuilder | bytes, parent: str | None = None) -> Any:
    data = tb if isinstance(tb, bytes) else tb.build()
    return svc.register_layer(io.BytesIO(data), parent)


def export(svc: ImageService, chain: str) -> bytes:
    with svc.export_layer(chain) as s:
        return s.read()


def rel(p: Path) -> str:
    return str(p).lstrip("/")


def host_state(paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
            continue
        out[p] = (st.st_ino, st.st_nlink, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def store_layers(tmp_path: Path) -> list[str]:
    out = []
    for sub in ("vfs/dir", "vfs/records", "tarball/layers"):
        d = tmp_path / "store" / sub
        if d.is_dir():
            out += [f"{sub}/{n}" for n in sorted(os.listdir(d))]
    return out


# -- escapes through symlinks -------------------------------------------------------------------------------


def test_writes_through_symlinks_stay_inside(svc: ImageService, outside: Path, tmp_path: Path) -> None:
    before = tree_snapshot(str(outside), times=True)
    top_before = sorted(os.listdir(tmp_path))
    host_before = host_state(["/etc/passwd", "/etc/shadow"])
    s = rel(outside)
    parent = add(svc, TarBuilder()
                 .symlink("etc", "/")
                 .symlink("abs", str(outside))
                 .symlink("victimlink", str(outside / "victim"))
                 .dir("a").dir("a/b").dir("a/b/c").symlink("a/b/c/up", "../../..")
                 .file("shadow", b"layer shadow")
                 .file(f"{s}/secret", b"inside secret"))
    child = add(svc, TarBuilder()
                .file(f"etc/{s}/passwd", b"evil passwd")  # etc -> / : lands in the layer, not outside
                .file("abs/new", b"new")
                .file("abs/sub/keep", b"overwritten?")
                .file("a/b/c/up/x", b"x")
                .hardlink("h_shadow", "etc/shadow")
                .hardlink("h_secret", "abs/secret")
                .hardlink("h_secret2", f"etc/{s}/secret")
                .whiteout("abs/victim")
                .whiteout(f"etc/{s}/sub2")
                .file("victimlink", b"replaces the symlink, does not write through it"),
                parent.chain_id)

    assert tree_snapshot(str(outside), times=True) == before
    assert sorted(os.listdir(tmp_path)) == top_before
    assert host_state(["/etc/passwd", "/etc/shadow"]) == host_before
    with svc.mounted_layer(child.chain_id) as path:
        root = Path(path)
        inner = root / s
        assert (inner / "passwd").read_bytes() == b"evil passwd"
        assert (inner / "new").read_bytes() == b"new"
        assert (inner / "sub" / "keep").read_bytes() == b"overwritten?"
        assert (root / "x").read_bytes() == b"x"
        assert (root / "h_shadow").read_bytes() == b"layer shadow"
        assert os.stat(root / "h_shadow").st_ino == os.stat(root / "shadow").st_ino
        assert (root / "h_secret").read_bytes() == b"inside secret"
        assert os.stat(root / "h_secret").st_ino == os.stat(inner / "secret").st_ino
        assert os.stat(root / "h_secret2").st_ino == os.stat(inner / "secret").st_ino
        assert os.lstat(root / "victimlink").st_mode & stat.S_IFMT(0o170000) == stat.S_IFREG
        assert os.readlink(root / "etc") == "/"
        assert os.readlink(root / "abs") == str(outside)
    # the parent layer is untouched by its child
    with svc.mounted_layer(parent.chain_id) as path:
        assert not Path(path, "x").exists()
        assert not Path(path, s, "passwd").exists()
    assert "sha256:" + hashlib.sha256(export(svc, child.chain_id)).hexdigest() == child.diff_id


def test_hardlink_to_missing_target_through_symlink(svc: ImageService, outside: Path) -> None:
    before = tree_snapshot(str(outside), times=True)
    parent = add(svc, TarBuilder().symlink("abs", str(outside)).symlink("etc", "/"))
    for target in ("abs/secret", "abs/victim", "etc/shadow", "etc/passwd"):
        with pytest.raises(FormatError):
            add(svc, TarBuilder().hardlink("h", target), parent.chain_id)
    assert tree_snapshot(str(outside), times=True) == before
    assert [x.chain_id for x in svc.layers()] == [parent.chain_id]


def test_opaque_whiteout_through_symlink(svc: ImageService, outside: Path) -> None:
    before = tree_snapshot(str(outside), times=True)
    parent = add(svc, TarBuilder().symlink("abs", str(outside)).dir("d").symlink("d/l", "/"))
    data = TarBuilder().opaque("abs").opaque(f"d/l/{rel(outside)}").opaque("d/l").build()
    child = add(svc, data, parent.chain_id)
    assert tree_snapshot(str(outside), times=True) == before
    assert export(svc, child.chain_id) == data


def test_relative_symlink_leading_out_is_refused(svc: ImageService, outside: Path, tmp_path: Path) -> None:
    ok = add(svc, TarBuilder().file("ok", b"ok"))
    before = store_layers(tmp_path)
    for tb in (TarBuilder().symlink("up", "../../.."),
               TarBuilder().symlink("up", "../../../../../../../../../../" + rel(outside)),
               TarBuilder().dir("a").symlink("a/up", "../.."),
               TarBuilder().dir("a").symlink("a/up", "b/../../..")):
        with pytest.raises(UnsafePathError, match="leads out of the layer root"):
            add(svc, tb)
    assert [x.chain_id for x in svc.layers()] == [ok.chain_id]
    assert store_layers(tmp_path) == before


def test_relative_symlink_leading_out_refused_by_its_real_location(svc: ImageService) -> None:
    # "lnk" -> "/" makes "lnk/a/b/up" really live at "a/b/up", where "../../.." leads above the root.
    # Judging the target by the entry's *name* (lnk/a/b + ../../.. = "") lets it through.
    with pytest.raises(UnsafePathError, match="leads out of the layer root"):
        add(svc, TarBuilder().symlink("lnk", "/").symlink("lnk/a/b/up", "../../.."))
    assert svc.layers() == []


def test_relative_symlink_staying_inside_is_fine(svc: ImageService) -> None:
    layer = add(svc, TarBuilder().dir("a").dir("a/b").symlink("a/b/top", "../..").symlink("a/b/sib", "../x")
                .symlink("dot", ".").symlink("self", "self"))
    with svc.mounted_layer(layer.chain_id) as path:
        assert os.readlink(Path(path, "a/b/top")) == "../.."
        assert os.readlink(Path(path, "self")) == "self"


_NS_SCRIPT = textwrap.dedent("""
    import io, json, os, sys
    from pathlib import Path
    from lamina.config import Config
    from lamina.errors import FormatError
    from lamina.service import ImageService
    from lamina.testing import TarBuilder

    work = Path(sys.argv[1])
    for name, data in (("passwd", b"host passwd"), ("shadow", b"host shadow"), ("victim", b"v")):
        Path("/etc", name).write_bytes(data)
    def state():
        return {n: (os.lstat(f"/etc/{n}").st_ino, Path(f"/etc/{n}").read_bytes().decode())
                for n in sorted(os.listdir("/etc"))}
    before = state()
    out = {}
    with ImageService.open(Config(root=work / "store", runroot=work / "run", driver="vfs")) as svc:
        p = svc.register_layer(io.BytesIO(TarBuilder().symlink("etc", "/").file("shadow", b"layer").build()))
        c = svc.register_layer(io.BytesIO(TarBuilder().file("etc/passwd", b"evil").hardlink("h", "etc/shadow")
                                          .whiteout("etc/victim").file("etc/etc/new", b"n").build()), p.chain_id)
        try:
            svc.register_layer(io.BytesIO(TarBuilder().hardlink("h2", "etc/passwd").build()), p.chain_id)
            out["h2"] = "accepted"
        except FormatError as e:
            out["h2"] = "refused"
        with svc.mounted_layer(c.chain_id) as path:
            out["passwd"] = Path(path, "passwd").read_bytes().decode()
            out["h"] = Path(path, "h").read_bytes().decode()
            out["new"] = Path(path, "new").read_bytes().decode()
    out["unchanged"] = state() == before
    print(json.dumps(out))
""")


def test_literal_etc_escape_in_private_mount_namespace(tmp_path: Path) -> None:
    """``etc -> /`` then ``etc/passwd``, a hard link to ``etc/shadow`` and ``.wh.`` through ``etc``."""
    require_root()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): cannot isolate /etc")
    probe = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "escape.py"
    script.write_text(_NS_SCRIPT)
    cmd = f'mount -t tmpfs lamina-test-etc /etc && exec "{sys.executable}" "{script}" "{tmp_path}"'
    proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", cmd],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"h2": "refused", "passwd": "evil", "h": "layer", "new": "n", "unchanged": True}


# -- replacing one kind of entry by another -----------------------------------------------------------------


def test_dir_and_file_replace_each_other_across_layers(svc: ImageService) -> None:
    parent = add(svc, TarBuilder().dir("a").file("a/x", b"x").dir("a/sub").file("a/sub/y", b"y")
                 .file("b", b"b file").symlink("c", "a"))
    data = (TarBuilder().file("a", b"now a file").dir("b").file("b/inner", b"inner").dir("c").file("c/z", b"z")
            .build())
    child = add(svc, data, parent.chain_id)
    with svc.mounted_layer(child.chain_id) as path:
        assert Path(path, "a").read_bytes() == b"now a file"
        assert Path(path, "b").is_dir() and Path(path, "b/inner").read_bytes() == b"inner"
        assert not Path(path, "c").is_symlink() and Path(path, "c/z").read_bytes() == b"z"
    with svc.mounted_layer(parent.chain_id) as path:
        assert Path(path, "a/sub/y").read_bytes() == b"y"
        assert Path(path, "b").read_bytes() == b"b file"
        assert not Path(path, "a/z").exists()  # c/z was not written through the old symlink
    assert export(svc, child.chain_id) == data
    got = {(c.kind, c.path) for c in svc.layer_changes(child.chain_id)}
    assert {("C", "/a"), ("C", "/b"), ("A", "/b/inner")} <= got


def test_nested_dirs_replaced_across_layers(svc: ImageService) -> None:
    """Below the root too: the parent directory stays usable after the entry it holds is replaced."""
    parent = add(svc, TarBuilder().dir("usr").dir("usr/lib").dir("usr/lib/foo").file("usr/lib/foo/bar", b"bar")
                 .dir("usr/share").dir("usr/share/doc").file("usr/share/doc/README", b"doc")
                 .dir("usr/share/man").file("usr/share/man/x", b"x"))
    data = (TarBuilder().symlink("usr/lib/foo", "foo.d").file("usr/lib/after", b"after")
            .file("usr/share/doc", b"now a file").symlink("usr/share/man", "/usr/lib").file("usr/share/man/y", b"y")
            .build())
    child = add(svc, data, parent.chain_id)
    with svc.mounted_layer(child.chain_id) as path:
        assert os.readlink(Path(path, "usr/lib/foo")) == "foo.d"
        assert Path(path, "usr/lib/after").read_bytes() == b"after"
        assert Path(path, "usr/share/doc").read_bytes() == b"now a file"
        assert Path(path, "usr/lib/y").read_bytes() == b"y"  # written through the new symlink, inside the root
    assert export(svc, child.chain_id) == data


@pytest.mark.parametrize("native", ["1", "0"])
def test_many_directories_with_few_descriptors(svc: ImageService, monkeypatch: pytest.MonkeyPatch,
                                               native: str) -> None:
    """Directory fds the apply engine set aside are closed as it goes: a layer with far more directories
    than the process may open files applies under a low descriptor limit."""
    import resource

    monkeypatch.setenv("LAMINA_NATIVE", native)
    tb = TarBuilder()
    for i in range(1500):
        tb.dir(f"d{i}").file(f"d{i}/f", b"x")
    for i in range(1500):
        tb.file(f"implicit{i}/g", b"y")  # parents the archive does not list
    data = tb.build()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(700, hard), hard))
    try:
        layer = add(svc, data)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert export(svc, layer.chain_id) == data


def test_file_then_dir_of_same_name_in_one_layer(svc: ImageService) -> None:
    data = (TarBuilder().file("x", b"first a file" * 100).dir("x").file("x/y", b"then a dir")
            .symlink("s", "x").dir("s").file("s/t", b"t").build())
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        assert Path(path, "x").is_dir() and Path(path, "x/y").read_bytes() == b"then a dir"
        assert Path(path, "s").is_dir() and not Path(path, "s").is_symlink()
        assert sorted(os.listdir(path)) == ["s", "x"]
    assert export(svc, layer.chain_id) == data


def test_dir_then_file_of_same_name_in_one_layer(svc: ImageService) -> None:
    data = TarBuilder().dir("d").file("d/f", b"inside the dir" * 50).file("d", b"now a file").build()
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        assert Path(path, "d").read_bytes() == b"now a file"
    assert export(svc, layer.chain_id) == data


def test_dir_replaced_by_symlink_in_one_layer(svc: ImageService) -> None:
    data = TarBuilder().dir("d").file("d/f", b"payload" * 10).symlink("d", "elsewhere").build()
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        assert os.readlink(Path(path, "d")) == "elsewhere"
    assert export(svc, layer.chain_id) == data


def test_dir_replaced_by_symlink_does_not_misapply_its_metadata(svc: ImageService) -> None:
    # "d" is replaced by a symlink to "e": d's mode (and owner) must not end up on e
    data = (TarBuilder().dir("d", mode=0o755, uid=1, gid=1).dir("e", mode=0o700, uid=2, gid=2)
            .symlink("d", "e").build())
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        st = os.lstat(Path(path, "e"))
        assert stat.S_IMODE(st.st_mode) == 0o700
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (2, 2)
        assert os.readlink(Path(path, "d")) == "e"


def test_file_under_implicit_dir_then_file_of_dir_name(svc: ImageService) -> None:
    # no directory entry for "d": only the record is in play, not the directory metadata pass
    data = TarBuilder().file("d/f", b"inside" * 50).file("d", b"now a file").build()
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        assert Path(path, "d").read_bytes() == b"now a file"
    assert export(svc, layer.chain_id) == data


def test_whiteout_of_implicit_dir_written_by_same_layer(svc: ImageService) -> None:
    base = add(svc, TarBuilder().file("d/old", b"old"))
    data = TarBuilder().file("d/new", b"new payload" * 20).whiteout("d").build()
    layer = add(svc, data, base.chain_id)
    assert export(svc, layer.chain_id) == data


def test_whiteout_of_dir_written_by_same_layer(svc: ImageService) -> None:
    base = add(svc, TarBuilder().dir("d").file("d/old", b"old"))
    data = TarBuilder().dir("d").file("d/new", b"new payload" * 20).whiteout("d").build()
    layer = add(svc, data, base.chain_id)
    assert export(svc, layer.chain_id) == data


# -- duplicate entries: the record keeps superseded payloads ------------------------------------------------


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_duplicate_entries_export_exactly(tmp_path: Path, catalog: Any, driver: str) -> None:
    big = os.urandom(70_000)
    data = (TarBuilder().file("f", b"v1").file("g", big).file("f", b"")
            .file("f", b"version three, longer than the others")
            .dir("d").file("d/x", b"dx1").symlink("s", "d").file("s/x", b"dx2 through the symlink")
            .file("h", b"to be whited out").whiteout("h")
            .file("k", b"k1").file("k2", b"k2").hardlink("k", "k2")
            .file("g", b"g2")
            .build())
    with open_store(tmp_path, catalog, driver) as svc:
        layer = add(svc, data)
        assert export(svc, layer.chain_id) == data
        if driver == "vfs":
            with svc.mounted_layer(layer.chain_id) as path:
                assert Path(path, "f").read_bytes() == b"version three, longer than the others"
                assert Path(path, "g").read_bytes() == b"g2"
                assert Path(path, "d/x").read_bytes() == b"dx2 through the symlink"
                # a whiteout hides the layers below only: the layer's own h stays
                assert Path(path, "h").read_bytes() == b"to be whited out"
                assert os.stat(Path(path, "k")).st_ino == os.stat(Path(path, "k2")).st_ino
        # a second export gives the same bytes again
        assert export(svc, layer.chain_id) == data


def test_duplicate_entries_survive_reopen(tmp_path: Path, catalog: Any) -> None:
    data = TarBuilder().file("f", b"a" * 1000).file("f", b"b" * 10).build()
    with open_store(tmp_path, catalog) as svc:
        chain = add(svc, data).chain_id
    with open_store(tmp_path, catalog) as svc:
        assert export(svc, chain) == data


# -- device nodes -------------------------------------------------------------------------------------------


def _blk(name: str, major: int, minor: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.BLKTYPE
    ti.devmajor, ti.devminor = major, minor
    ti.mode = 0o660
    ti.gid = 6
    ti.mtime = 1_700_000_000
    return ti


def test_device_nodes_as_root(svc: ImageService) -> None:
    require_root()
    tb = (TarBuilder().dir("dev").char("dev/null", 1, 3, mode=0o666).char("dev/tty5", 4, 5, uid=0, gid=5, mode=0o620)
          .fifo("dev/pipe", mode=0o640, uid=7, gid=8))
    raw = tb.build()
    # append a block device before the end-of-archive blocks
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]  # type: ignore[union-attr]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m, _ in members:
            tf.addfile(m)
        tf.addfile(_blk("dev/sda1", 8, 1))
    data = buf.getvalue()
    layer = add(svc, data)
    with svc.mounted_layer(layer.chain_id) as path:
        st = os.lstat(Path(path, "dev/null"))
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        assert stat.S_IMODE(st.st_mode) == 0o666
        st = os.lstat(Path(path, "dev/tty5"))
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4, 5)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 5, 0o620)
        st = os.lstat(Path(path, "dev/sda1"))
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 1)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (6, 0o660)
        assert st.st_mtime_ns == 1_700_000_000 * 10**9
        st = os.lstat(Path(path, "dev/pipe"))
        assert stat.S_ISFIFO(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (7, 8, 0o640)
    assert export(svc, layer.chain_id) == data
    # a child layer copies the device nodes
    child = add(svc, TarBuilder().file("other", b"o"), layer.chain_id)
    with svc.mounted_layer(child.chain_id) as path:
        st = os.lstat(Path(path, "dev/null"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_device_node_replaces_existing_file(svc: ImageService) -> None:
    require_root()
    base = add(svc, TarBuilder().dir("dev").file("dev/null", b"not a device"))
    child = add(svc, TarBuilder().char("dev/null", 1, 3), base.chain_id)
    with svc.mounted_layer(child.chain_id) as path:
        assert stat.S_ISCHR(os.lstat(Path(path, "dev/null")).st_mode)


# -- decompression-bomb limits ------------------------------------------------------------------------------


def _zeros_layer(n: int) -> bytes:
    return TarBuilder().file("zeros", bytes(n)).build()


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_max_layer_bytes(tmp_path: Path, catalog: Any, driver: str) -> None:
    limit = 1 << 20
    bomb = gzip.compress(_zeros_layer(8 << 20))
    assert len(bomb) < limit // 10  # small on the wire, large unpacked
    with open_store(tmp_path, catalog, driver, limits=Limits(max_layer_bytes=limit)) as svc:
        ok = add(svc, TarBuilder().file("small", b"s"))
        before = store_layers(tmp_path)
        with pytest.raises(LimitExceeded) as ei:
            add(svc, bomb)
        assert isinstance(ei.value, FormatError)
        assert str(limit) in ei.value.message
        assert [x.chain_id for x in svc.layers()] == [ok.chain_id]
        assert store_layers(tmp_path) == before
        # exactly at the limit is fine
        exact = _zeros_layer(1000)
        with open_store(tmp_path / "exact", catalog, driver, limits=Limits(max_layer_bytes=len(exact))) as s2:
            add(s2, exact)
            with pytest.raises(LimitExceeded):
                add(s2, exact + bytes(512))


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_max_layer_entries(tmp_path: Path, catalog: Any, driver: str) -> None:
    tb = TarBuilder()
    for i in range(50):
        tb.file(f"f{i}", b"")
    many = tb.build()
    with open_store(tmp_path, catalog, driver, limits=Limits(max_layer_entries=10)) as svc:
        ok = add(svc, TarBuilder().file("small", b"s"))
        before = store_layers(tmp_path)
        with pytest.raises(LimitExceeded) as ei:
            add(svc, many)
        assert "10" in ei.value.message
        assert [x.chain_id for x in svc.layers()] == [ok.chain_id]
        assert store_layers(tmp_path) == before


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_max_layer_entries_at_the_limit(tmp_path: Path, catalog: Any, driver: str) -> None:
    tb = TarBuilder()
    for i in range(10):
        tb.file(f"f{i}", b"")
    with open_store(tmp_path, catalog, driver, limits=Limits(max_layer_entries=10)) as svc:
        add(svc, tb)
        assert len(svc.layers()) == 1


# -- overlay's private xattrs -------------------------------------------------------------------------------


def _user_xattrs_supported(p: Path) -> bool:
    try:
        os.setxattr(p, "user.lamina-probe", b"1")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    return True


def test_overlay_xattrs_never_applied(svc: ImageService, tmp_path: Path) -> None:
    require_root()
    if not _user_xattrs_supported(tmp_path):
        pytest.skip("backing filesystem has no user xattrs")
    private = {"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/etc",
               "trusted.overlay.origin": b"\x00\xfb", "user.overlay.opaque": b"y", "user.overlay.metacopy": b""}
    keep_file = {"user.keep": b"1", "trusted.keep": b"2"}
    data = (TarBuilder()
            .dir("d", xattrs={**private, "trusted.keep": b"dir"})
            .file("d/f", b"f", xattrs={**private, **keep_file})
            .symlink("l", "d", xattrs={"trusted.overlay.opaque": b"y", "trusted.keep": b"sym"})
            .build())
    layer = add(svc, data)
    import xattr

    with svc.mounted_layer(layer.chain_id) as path:
        f = Path(path, "d/f")
        names = set(os.listxattr(f))
        assert {"user.keep", "trusted.keep"} <= names
        assert not [n for n in names if ".overlay." in n]
        assert os.getxattr(f, "trusted.keep") == b"2"
        dnames = set(os.listxattr(Path(path, "d")))
        assert "trusted.keep" in dnames and not [n for n in dnames if ".overlay." in n]
        lnames = set(xattr.listxattr(str(Path(path, "l")), symlink=True))
        assert "trusted.keep" in lnames and not [n for n in lnames if ".overlay." in n]
    # ... yet the exported archive still carries them, byte for byte
    assert export(svc, layer.chain_id) == data


def test_overlay_xattrs_in_libarchive_form_never_applied(svc: ImageService) -> None:
    require_root()
    import base64

    ti = tarfile.TarInfo("f")
    ti.mtime = 1_700_000_000
    ti.pax_headers = {
        "LIBARCHIVE.xattr.trusted.overlay.opaque": base64.b64encode(b"y").decode(),
        "LIBARCHIVE.xattr.trusted%2Eoverlay%2Eredirect": base64.b64encode(b"/x").decode(),
        "LIBARCHIVE.xattr.trusted.fine": base64.b64encode(b"ok").decode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b""))
    layer = add(svc, buf.getvalue())
    with svc.mounted_layer(layer.chain_id) as path:
        names = set(os.listxattr(Path(path, "f")))
        assert "trusted.fine" in names
        assert not [n for n in names if ".overlay." in n]


def test_files_in_setgid_directories_keep_their_archived_group(tmp_path: Path) -> None:
    """A new file in a set-gid directory inherits its group; the archive's group must still win."""
    require_root()
    from lamina.config import Config
    from lamina.service import ImageService

    with ImageService.open(Config(root=tmp_path / "r", runroot=tmp_path / "run", driver="vfs")) as svc:
        base = svc.register_layer(io.BytesIO(TarBuilder().dir("var").dir("var/mail", mode=0o2775, gid=8).build()))
        child = svc.register_layer(io.BytesIO(
            TarBuilder().file("var/mail/root", b"x", uid=0, gid=0).file("var/mail/m", b"y", gid=8).build()),
            base.chain_id)
        with svc.mounted_layer(child.chain_id) as path:
            assert os.stat(Path(path, "var/mail")).st_mode & 0o7777 == 0o2775
            assert os.stat(Path(path, "var/mail/root")).st_gid == 0
            assert os.stat(Path(path, "var/mail/m")).st_gid == 8

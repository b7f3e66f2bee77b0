"""OCI whiteout rules in any entry order, on every driver: a whiteout or an opaque marker hides what the
layers below have, never what its own layer writes; nothing is created for a path no lower layer has; and
a layer that writes below a lower layer's symlink lands where the symlink leads.

Each case runs on real vfs and overlay stores (overlay: root, kernel overlayfs) and reads the merged tree
back through a mount; every layer must still export byte for byte. The tarball driver keeps streams as
they are and must accept the same layers.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.config import Config
from lamina.errors import ArchiveError
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root

DRIVERS = ["vfs", "overlay"]


@pytest.fixture(params=DRIVERS)
def svc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ImageService]:
    if request.param == "overlay":
        require_root()
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver=request.param)) as s:
        yield s


def _stack(svc: ImageService, *layers: TarBuilder) -> str:
    """Register the layers one on another; each exports exactly as given. The top ChainID."""
    parent: str | None = None
    for tb in layers:
        data = tb.build()
        layer = svc.register_layer(io.BytesIO(data), parent)
        with svc.export_layer(layer.chain_id) as out:
            assert hashlib.sha256(out.read()).hexdigest() == hashlib.sha256(data).hexdigest()
        parent = layer.chain_id
    assert parent is not None
    return parent


def _tree(svc: ImageService, chain: str) -> dict[str, str]:
    """path -> kind (and content or target) of the merged tree, as a process in the container sees it."""
    out: dict[str, str] = {}
    with svc.mounted_layer(chain) as root:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                st = os.lstat(full)  # every listed name must be there to stat
                if os.path.islink(full):
                    out[rel] = "-> " + os.readlink(full)
                elif os.path.isdir(full):
                    out[rel] = f"dir {oct(st.st_mode & 0o7777)}"
                else:
                    out[rel] = Path(full).read_bytes().decode()
    return out


def test_opaque_marker_after_the_layers_own_entries_hides_the_lower_ones(svc: ImageService) -> None:
    base = TarBuilder().dir("a").dir("a/b").dir("a/b/c").file("a/b/c/bar", b"lower").file("a/top", b"lower")
    upper = TarBuilder().dir("a").dir("a/b").dir("a/b/c").file("a/b/c/foo", b"own").opaque("a")
    tree = _tree(svc, _stack(svc, base, upper))
    assert tree == {"a": "dir 0o755", "a/b": "dir 0o755", "a/b/c": "dir 0o755", "a/b/c/foo": "own"}


def test_opaque_marker_keeps_unlisted_parents_of_the_layers_entries(svc: ImageService) -> None:
    base = TarBuilder().dir("a").dir("a/b", mode=0o700).file("a/b/bar", b"lower").file("a/x", b"lower")
    upper = TarBuilder().file("a/b/foo", b"own").opaque("a")
    tree = _tree(svc, _stack(svc, base, upper))
    # a/b was the lower layer's; hidden, it is now a directory the layer made for its file
    assert tree == {"a": "dir 0o755", "a/b": "dir 0o755", "a/b/foo": "own"}


def test_whiteout_of_a_file_of_the_same_layer_keeps_it(svc: ImageService) -> None:
    base = TarBuilder().file("foo", b"lower").file("other", b"lower")
    upper = TarBuilder().file("foo", b"own").whiteout("foo").whiteout("other")
    assert _tree(svc, _stack(svc, base, upper)) == {"foo": "own"}


def test_whiteout_of_a_directory_of_the_same_layer_keeps_only_its_own_entries(svc: ImageService) -> None:
    base = TarBuilder().dir("d").file("d/old", b"lower").dir("d/sub").file("d/sub/old", b"lower")
    upper = TarBuilder().dir("d", mode=0o750).file("d/new", b"own").file("d/sub/new", b"own").whiteout("d")
    assert _tree(svc, _stack(svc, base, upper)) == {
        "d": "dir 0o750", "d/new": "own", "d/sub": "dir 0o755", "d/sub/new": "own"}


def test_whiteout_before_the_layers_own_directory_hides_the_lower_one(svc: ImageService) -> None:
    base = TarBuilder().dir("d").file("d/old", b"lower").dir("e").file("e/old", b"lower")
    upper = TarBuilder().whiteout("d").dir("d").file("d/new", b"own").whiteout("e").file("e/new", b"own")
    assert _tree(svc, _stack(svc, base, upper)) == {
        "d": "dir 0o755", "d/new": "own", "e": "dir 0o755", "e/new": "own"}


def test_whiteout_of_a_path_no_lower_layer_has_creates_nothing(svc: ImageService) -> None:
    base = TarBuilder().dir("x").file("x/keep", b"lower")
    upper = TarBuilder().dir("a").dir("a/b").whiteout("a/b/c").whiteout("x/nothing").whiteout("y/z").opaque("q")
    chain = _stack(svc, base, upper)
    assert _tree(svc, chain) == {"a": "dir 0o755", "a/b": "dir 0o755", "x": "dir 0o755", "x/keep": "lower"}
    # and a single layer's whiteouts create nothing either
    alone = _stack(svc, TarBuilder().whiteout("gone").dir("d").whiteout("d/gone").opaque("d"))
    assert _tree(svc, alone) == {"d": "dir 0o755"}


def test_writes_below_a_lower_symlink_land_where_it_leads(svc: ImageService) -> None:
    base = (TarBuilder().dir("usr").dir("usr/lib").file("usr/lib/ld.so", b"loader").symlink("lib", "usr/lib")
            .dir("run").symlink("var/run", "/run").dir("etc").symlink("etc/alt", "../usr/lib"))
    upper = (TarBuilder().file("lib/systemd/a.service", b"unit").file("var/run/pid", b"1")
             .file("etc/alt/via-relative", b"r").whiteout("lib/ld.so"))
    tree = _tree(svc, _stack(svc, base, upper))
    assert tree["lib"] == "-> usr/lib"
    assert tree["var/run"] == "-> /run"
    assert tree["usr/lib/systemd/a.service"] == "unit"
    assert tree["run/pid"] == "1"
    assert tree["usr/lib/via-relative"] == "r"
    assert "usr/lib/ld.so" not in tree


def test_a_layer_that_replaces_a_lower_symlink_then_writes_below_it(svc: ImageService) -> None:
    base = TarBuilder().dir("usr").dir("usr/lib").symlink("lib", "usr/lib")
    upper = TarBuilder().file("lib/first", b"through").dir("lib").file("lib/second", b"own dir")
    tree = _tree(svc, _stack(svc, base, upper))
    assert tree["usr/lib/first"] == "through"
    assert tree["lib"] == "dir 0o755"
    assert tree["lib/second"] == "own dir"


def test_tarball_accepts_the_same_layers(tmp_path: Path) -> None:
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="tarball")) as svc:
        _stack(svc, TarBuilder().dir("a").file("a/x", b"lower").symlink("lib", "a"),
               TarBuilder().file("a/y", b"own").opaque("a").file("f", b"own").whiteout("f").whiteout("nothing")
               .file("lib/z", b"through"))


def test_a_path_through_a_lower_file_is_refused(svc: ImageService) -> None:
    base = _stack(svc, TarBuilder().file("a", b"file").dir("d").file("d/f", b"file"))
    for bad in (TarBuilder().file("a/x"), TarBuilder().dir("d/f/sub")):
        with pytest.raises(ArchiveError, match="is not a directory"):
            svc.register_layer(io.BytesIO(bad.build()), base)
    # a whiteout below a file hides nothing and is no error
    assert _tree(svc, _stack(svc, TarBuilder().file("a", b"file"), TarBuilder().whiteout("a/x"))) == {"a": "file"}


def test_a_whiteout_after_entries_below_the_lower_file_it_deletes(svc: ImageService) -> None:
    base = TarBuilder().file("a", b"file").dir("d").file("d/f", b"file")
    upper = TarBuilder().file("a/x", b"own").whiteout("a").dir("d/f/sub").opaque("d")
    assert _tree(svc, _stack(svc, base, upper)) == {"a": "dir 0o755", "a/x": "own", "d": "dir 0o755",
                                                   "d/f": "dir 0o755", "d/f/sub": "dir 0o755"}


def test_hard_links_to_lower_layers_files(svc: ImageService) -> None:
    base = TarBuilder().file("f", b"data", mode=0o600).dir("d").file("d/g", b"g").symlink("s", "d")
    chain = _stack(svc, base, TarBuilder().hardlink("h", "f").hardlink("d/h", "s/g"))
    tree = _tree(svc, chain)
    assert tree["h"] == tree["f"] == "data" and tree["d/h"] == "g"
    with svc.mounted_layer(chain) as root:
        assert os.stat(Path(root, "h")).st_ino == os.stat(Path(root, "f")).st_ino
        assert os.stat(Path(root, "f")).st_mode & 0o7777 == 0o600
    assert [(c.path, c.kind) for c in svc.layer_changes(chain)] == [("/d", "C"), ("/d/h", "A"), ("/h", "A")]
    # a whiteout of the target, before or after the link, comes first: the link points at nothing
    parent = svc.register_layer(io.BytesIO(base.build()), None).chain_id
    for bad in (TarBuilder().whiteout("f").hardlink("h", "f"), TarBuilder().hardlink("h", "f").whiteout("f"),
                TarBuilder().hardlink("h", "d/g").opaque("d")):
        with pytest.raises(ArchiveError, match="points at missing"):
            svc.register_layer(io.BytesIO(bad.build()), parent)


def test_a_directory_replacing_the_layers_own_file_hides_the_lower_directory(svc: ImageService) -> None:
    base = TarBuilder().dir("a").dir("a/a").file("a/a/x", b"lower")
    assert _tree(svc, _stack(svc, base, TarBuilder().file("a").dir("a"))) == {"a": "dir 0o755"}


def test_changes_below_a_directory_deleted_and_made_again(svc: ImageService) -> None:
    """Deleted lower entries below a re-made directory are changes (an exported diff must delete them)."""
    chain = _stack(svc, TarBuilder().dir("d").dir("d/sub").file("d/sub/x").file("d/y"),
                   TarBuilder().whiteout("d").dir("d").dir("d/sub"))
    assert [(c.path, c.kind) for c in svc.layer_changes(chain)] == [
        ("/d", "C"), ("/d/sub", "C"), ("/d/sub/x", "D"), ("/d/y", "D")]


def test_opaque_marker_and_whiteout_of_one_lower_directory(svc: ImageService) -> None:
    base = TarBuilder().dir("a").dir("b").file("b/x")
    assert _tree(svc, _stack(svc, base, TarBuilder().opaque("b").whiteout("b"))) == {"a": "dir 0o755"}
    assert _tree(svc, _stack(svc, base, TarBuilder().opaque("b").file("b/y", b"own"))) == {
        "a": "dir 0o755", "b": "dir 0o755", "b/y": "own"}


def test_a_lower_symlink_written_through_then_replaced_by_a_file(svc: ImageService) -> None:
    base = TarBuilder().dir("usr").dir("usr/lib").symlink("lib", "usr/lib")
    parent = svc.register_layer(io.BytesIO(base.build()), None).chain_id
    # lib/a goes through the symlink; then a file named lib hides it: lib/b would be below a file
    bad = TarBuilder().file("lib/a", b"through").file("lib", b"a file now").file("lib/b", b"below a file")
    with pytest.raises(ArchiveError, match="is not a directory"):
        svc.register_layer(io.BytesIO(bad.build()), parent)
    tree = _tree(svc, _stack(svc, base, TarBuilder().file("lib/a", b"through").file("lib", b"a file now")))
    assert tree["lib"] == "a file now" and tree["usr/lib/a"] == "through"


def test_a_hard_link_to_a_sparse_lower_file_keeps_its_holes(svc: ImageService) -> None:
    """overlay copies the file up to link it: holes stay holes (2 GiB of which 6 bytes are data)."""
    from test_tarformat import END, sparse_entry

    size = 2 << 30
    base = svc.register_layer(io.BytesIO(sparse_entry("1.0", "big", [(size - 6, 6)], size, b"sparse") + END))
    chain = svc.register_layer(io.BytesIO(TarBuilder().hardlink("link", "big").build()), base.chain_id).chain_id
    with svc.mounted_layer(chain) as root:
        st = os.stat(Path(root, "link"))
        assert st.st_size == size and st.st_blocks * 512 < 1 << 20
        assert st.st_ino == os.stat(Path(root, "big")).st_ino
        with open(Path(root, "link"), "rb") as f:
            f.seek(size - 6)
            assert f.read() == b"sparse"

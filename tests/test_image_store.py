"""``[storage] image_store`` (issue 15): image layers, blobs and exact-export records in a directory of
their own, containers' read-write layers and the database under the root; real vfs and kernel overlay,
real runc."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from fault_harness import kill_at
from store_invariants import check_store
from test_shared_store import _read_only_bind, _tree_digest

from conftest import lamina_cli
from image_fixtures import host_binaries_tar
from lamina import ImageService
from lamina.config import Config, load_config
from lamina.errors import ConfigError, DriverUnsupported, StoreError
from lamina.testing import TarBuilder, require_root


def _files_named(top: Path, name: str) -> list[Path]:
    return [p for p in top.rglob(name) if p.is_file()] if top.exists() else []


def _write_config(tmp: Path, images: Path | None, name: str = "lamina.toml") -> Path:
    path = tmp / name
    path.write_text("[storage]\n" + (f'image_store = "{images}"\n' if images else ""))
    return path


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_images_live_in_the_image_store_and_containers_under_the_root(tmp_path: Path, driver: str) -> None:
    require_root()
    base, images = tmp_path / "s", tmp_path / "images"
    root, run = base / "root", base / "run"
    cfg = _write_config(tmp_path, images)

    def cli(*args: str, check: bool = True) -> bytes:
        return lamina_cli("--config", str(cfg), "--driver", driver, *args, root=base, check=check).stdout

    host_binaries_tar(tmp_path / "host.tar")
    cli("import", str(tmp_path / "host.tar"), "example.com/app:1")
    [details] = json.loads(cli("inspect", "example.com/app:1"))
    config_blob = images / "content" / "blobs" / details["Id"].replace(":", "/", 1)
    assert config_blob.is_file() and not (root / "content").exists()
    assert _files_named(images / driver, "os-release") and not _files_named(root / driver, "os-release")
    assert not (root / "tar-split").exists() and any((images / "tar-split").iterdir())

    ran = cli("run", "--rm", "example.com/app:1", "/bin/cat", "/etc/os-release")
    assert ran == b'NAME="lamina host binaries"\nID=lamina-host\n'
    cli("create", "--name", "c", "example.com/app:1")
    mnt = cli("mount", "c").decode().strip()
    Path(mnt, "tmp", "made-in-the-container").write_bytes(b"mine")
    cli("umount", "c")
    # the container's own file is under the root, in no image layer
    assert _files_named(root / driver, "made-in-the-container")
    assert not _files_named(images, "made-in-the-container")
    assert "A /tmp/made-in-the-container" in cli("diff", "c").decode().splitlines()
    assert f"Image Store: {images}" in cli("info").decode().splitlines()
    assert check_store(root, run, driver, image_root=images) == []
    assert json.loads(cli("--format", "json", "system", "check"))["problems"] == []

    # a commit makes an image layer: it goes to the image store too
    cli("commit", "c", "example.com/app:2")
    assert _files_named(images / driver, "made-in-the-container")
    cli("save", "-o", str(tmp_path / "app.tar"), "example.com/app:2")
    with ImageService.open(Config(root=tmp_path / "plain", runroot=tmp_path / "plain-run", driver="vfs")) as plain:
        [loaded] = plain.load_image(tmp_path / "app.tar")
        assert loaded.image.id == json.loads(cli("inspect", "example.com/app:2"))[0]["Id"]

    # everything removed: neither place holds a layer any more
    cli("rm", "c")
    cli("rmi", "example.com/app:2", "example.com/app:1")
    assert check_store(root, run, driver, image_root=images) == []
    held = [p.name for h in (root / driver, images / driver) for p in (h / "dir" if driver == "vfs" else h).iterdir()
            if p.name not in {"l", "mode", ".probe-ok", "dir"}]
    assert held == []


def test_the_image_store_is_sticky_and_checked_when_the_store_opens(tmp_path: Path) -> None:
    images = tmp_path / "images"
    cfg = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs", image_store=images)
    with ImageService.open(cfg) as svc:
        img = svc.import_image(io.BytesIO(TarBuilder().file("f", b"one").build()), "example.com/one:1")
    # opened without naming it, the store uses the one it was made with
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run")) as svc:
        assert svc.store.image_root == images
        assert svc.get_image("example.com/one:1").id == img.id
        assert svc.check().problems == []
    with pytest.raises(StoreError, match=f"keeps its images in {images}, not"):
        ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", image_store=tmp_path / "other"))
    # an image store serves one store: another store naming it is refused before it writes anything there
    before = sorted(p.name for p in images.iterdir())
    with pytest.raises(StoreError, match=f"image store {images} belongs to the store at"):
        ImageService.open(Config(root=tmp_path / "second", runroot=tmp_path / "second-run", driver="vfs",
                                 image_store=images))
    assert sorted(p.name for p in images.iterdir()) == before and "lamina-image-store" in before
    # a store made without one keeps its images under its root for good
    plain = Config(root=tmp_path / "plain", runroot=tmp_path / "plain-run", driver="vfs")
    with ImageService.open(plain):
        pass
    with pytest.raises(StoreError, match="image_store is set when a store is made"):
        ImageService.open(Config(root=plain.root, runroot=plain.runroot, image_store=tmp_path / "later"))
    assert not (tmp_path / "later").exists()
    # an image store that lost its mark (a disk not mounted at its mount point) is refused, not taken over
    (images / "lamina-image-store").rename(tmp_path / "mark")
    with pytest.raises(StoreError, match="bears no mark of it"):
        ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run"))
    (tmp_path / "mark").rename(images / "lamina-image-store")
    with sqlite3.connect(tmp_path / "root" / "lamina.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='image_store'").fetchone() == (str(images),)
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("6",)  # older lamina refuse it
    with sqlite3.connect(plain.root / "lamina.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("5",)  # others stay readable
    # a mark naming this very root path but another token: another host's store at the same path
    (tmp_path / "shared-images").mkdir()
    (tmp_path / "shared-images" / "lamina-image-store").write_text(f"0123 {tmp_path / 'third'}\n")
    with pytest.raises(StoreError, match="belongs to the store at"):
        ImageService.open(Config(root=tmp_path / "third", runroot=tmp_path / "third-run", driver="vfs",
                                 image_store=tmp_path / "shared-images"))
    with sqlite3.connect(tmp_path / "third" / "lamina.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key IN ('driver', 'image_store')").fetchall() == []


def test_a_mark_left_by_a_kill_while_the_store_was_made_is_taken_over(tmp_path: Path) -> None:
    """Killed between marking the image store and the commit that records it: the store was not made; the
    next command makes it with the same token (committed before the mark), so the mark is its own."""
    images = tmp_path / "images"
    argv = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "--driver", "vfs",
            "--image-store", str(images), "images"]
    killed = kill_at("lamina.store.kernel:Store._claim_image_root", argv, when="return")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    mark = (images / "lamina-image-store").read_text()
    with sqlite3.connect(tmp_path / "root" / "lamina.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key IN ('driver', 'image_store')").fetchall() == []
    lamina_cli("--driver", "vfs", "--image-store", str(images), "import", "-", "example.com/t:1",
               input=TarBuilder().file("f", b"t").build(), root=tmp_path)
    assert (images / "lamina-image-store").read_text() == mark
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs", image_root=images) == []


def test_a_driver_that_cannot_keep_images_apart_and_bad_paths_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DriverUnsupported, match="cannot keep image layers apart"):
        ImageService.open(Config(root=tmp_path / "t", runroot=tmp_path / "t-run", driver="tarball",
                                 image_store=tmp_path / "t-images"))
    assert not (tmp_path / "t-images").exists()  # no mark, no directory: another driver may have it later
    with pytest.raises(StoreError, match="must lie apart from the store root"):
        ImageService.open(Config(root=tmp_path / "r", runroot=tmp_path / "r-run", driver="vfs",
                                 image_store=tmp_path / "r" / "images"))
    for value, message in ((tmp_path / "r" / "images", "must lie apart"), (tmp_path, "must lie apart"),
                           ("images", "not an absolute path"), (tmp_path / "r", "must lie apart")):
        path = tmp_path / "bad.toml"
        path.write_text(f'[storage]\nroot = "{tmp_path / "r"}"\nimage_store = "{value}"\n')
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    path.write_text(f'[storage]\nimage_store = "{tmp_path / "x"}"\nadditional_image_stores = ["{tmp_path / "x"}"]\n')
    with pytest.raises(ConfigError, match="also an additional image store"):
        load_config(path)
    # on the command line: one line, no traceback
    proc = lamina_cli("--config", str(_write_config(tmp_path, tmp_path / "ti")), "--driver", "tarball", "images",
                      root=tmp_path / "cli", check=False)
    assert proc.returncode != 0 and proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    assert b"cannot keep image layers apart" in proc.stderr


def test_migrate_with_an_image_store_killed_in_the_move_and_run_again(tmp_path: Path) -> None:
    """``system migrate`` of a store with an image store: the new driver's image layers go to the image
    store and its containers' layers under the root; killed while moving them into place, the next command
    finishes it, and the images, the container and its changes are as before."""
    require_root()
    base, images = tmp_path / "s", tmp_path / "images"
    root, run = base / "root", base / "run"
    cfg = _write_config(tmp_path, images)
    host_binaries_tar(tmp_path / "host.tar")

    def cli(*args: str) -> bytes:
        return lamina_cli("--config", str(cfg), *args, root=base).stdout

    cli("--driver", "vfs", "import", str(tmp_path / "host.tar"), "example.com/app:1")
    cli("create", "--name", "c", "example.com/app:1")
    mnt = cli("mount", "c").decode().strip()
    Path(mnt, "tmp", "kept").write_bytes(b"kept")
    cli("umount", "c")
    cli("save", "-o", str(tmp_path / "before.tar"), "example.com/app:1")
    argv = ["--root", str(root), "--runroot", str(run), "system", "migrate", "--driver", "overlay", "--containers"]
    killed = kill_at("lamina.store.migrate:_move_into_place", argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "A /tmp/kept" in cli("diff", "c").decode().splitlines()  # opening finished the move
    assert check_store(root, run, "overlay", image_root=images) == []
    assert not (images / "vfs").exists() and not (images / "migrate").exists() and not (root / "vfs").exists()
    cli("save", "-o", str(tmp_path / "after.tar"), "example.com/app:1")
    assert (tmp_path / "before.tar").read_bytes() == (tmp_path / "after.tar").read_bytes()
    ran = cli("run", "--rm", "example.com/app:1", "/bin/cat", "/etc/os-release")
    assert ran == b'NAME="lamina host binaries"\nID=lamina-host\n'
    assert _files_named(root / "overlay", "kept") and not _files_named(images, "kept")
    assert os.listdir(images / "overlay")


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_a_store_with_an_image_store_serves_as_an_additional_one_read_only(tmp_path: Path, driver: str) -> None:
    """Another store names such a store (and so, through its record, its image store) in
    ``additional_image_stores``, both mounted read-only: it lists and runs its image, writing to neither."""
    require_root()
    src, images = tmp_path / "src", tmp_path / "images"
    host_binaries_tar(tmp_path / "host.tar")
    made = Config(root=src / "root", runroot=src / "run", driver="overlay", image_store=images)
    with ImageService.open(made) as svc, open(tmp_path / "host.tar", "rb") as f:
        svc.import_image(f, "shared/app:1")
    shared = _read_only_bind(src / "root", tmp_path / "ro")
    at = next(shared)
    held = _read_only_bind(images, tmp_path / "images-ro")
    next(held)
    subprocess.run(["mount", "--bind", str(tmp_path / "images-ro"), str(images)], check=True)  # read-only there too
    try:
        before = (_tree_digest(at), _tree_digest(images))
        cfg = tmp_path / "other.toml"
        cfg.write_text(f'[storage]\nadditional_image_stores = ["{at}"]\n')
        out = lamina_cli("--config", str(cfg), "--driver", driver, "run", "--rm", "shared/app:1", "/bin/cat",
                         "/etc/os-release", root=tmp_path / "other").stdout
        assert out == b'NAME="lamina host binaries"\nID=lamina-host\n'
        assert (_tree_digest(at), _tree_digest(images)) == before
    finally:
        subprocess.run(["umount", str(images)], check=False)
        held.close()
        shared.close()


def test_the_image_store_flag_makes_a_store_that_keeps_it(tmp_path: Path) -> None:
    base = tmp_path / "s"
    tar = TarBuilder().dir("etc").file("etc/flagged", b"x").build()
    lamina_cli("--driver", "vfs", "--image-store", str(tmp_path / "imgs"), "import", "-", "example.com/t:1",
               input=tar, root=base)
    assert _files_named(tmp_path / "imgs" / "vfs", "flagged") and not _files_named(base, "flagged")
    info = lamina_cli("info", root=base).stdout.decode().splitlines()  # the flag is not needed any more
    assert f"Image Store: {tmp_path / 'imgs'}" in info
    other = lamina_cli("--image-store", str(tmp_path / "else"), "images", root=base, check=False)
    assert other.returncode != 0 and other.stderr.count(b"\n") == 1 and b"keeps its images in" in other.stderr


def test_an_additional_store_whose_image_store_is_gone_or_another_is_left_out(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    made = Config(root=tmp_path / "src", runroot=tmp_path / "src-run", driver="vfs", image_store=tmp_path / "imgs")
    with ImageService.open(made) as svc:
        svc.import_image(io.BytesIO(TarBuilder().file("f", b"s").build()), "shared/one:1")
    (tmp_path / "imgs").rename(tmp_path / "moved")
    cfg = Config(root=tmp_path / "own", runroot=tmp_path / "own-run", driver="vfs",
                 additional_image_stores=(tmp_path / "src",))
    with ImageService.open(cfg) as svc:
        assert svc.images() == []
    assert f"keeps its images in {tmp_path / 'imgs'}, which bears no mark of it" in caplog.text
    # a host whose own image store sits at the same path (another store's mark there): left out too
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "lamina-image-store").write_text("0123 /elsewhere/root\n")
    caplog.clear()
    with ImageService.open(cfg) as svc:
        assert svc.images() == []
    assert "which belongs to the store at '/elsewhere/root'" in caplog.text


@pytest.mark.parametrize("first_with_image_store", [False, True])
def test_two_first_commands_that_disagree_on_the_image_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             first_with_image_store: bool) -> None:
    """Two commands make the same new store at once, one naming an image store and one not: the one that
    commits second sees the store the other made and is refused in one line (no layer or blob goes to the
    wrong place); run again, it uses the store as made."""
    from lamina.store.kernel import Store

    apart = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs", image_store=tmp_path / "images")
    together = Config(root=apart.root, runroot=apart.runroot, driver="vfs")
    first, second = (apart, together) if first_with_image_store else (together, apart)
    original = Store._start_driver
    raced: list[bool] = []

    def racing(self: Store) -> object:
        if not raced:  # the other command makes the store while this one is about to
            raced.append(True)
            Store(first).close()
        return original(self)

    monkeypatch.setattr(Store, "_start_driver", racing)
    with pytest.raises(StoreError, match=r"was just made by another command.*run this one again"):
        Store(second)
    monkeypatch.setattr(Store, "_start_driver", original)
    with ImageService.open(Config(root=apart.root, runroot=apart.runroot)) as svc:
        assert svc.store.image_root == (apart.image_store if first_with_image_store else None)
        svc.import_image(io.BytesIO(TarBuilder().file("f", b"r").build()), "example.com/r:1")
        assert svc.check().problems == []


def test_a_stray_mount_of_an_image_layer_is_found_and_repaired(tmp_path: Path) -> None:
    """overlay mounts an image layer (one with a parent) under the image store: ``system check`` finds it
    there when nothing holds it, and its repair unmounts it."""
    require_root()
    from lamina.fs.mounts import is_mountpoint

    cfg = Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="overlay", image_store=tmp_path / "images")
    with ImageService.open(cfg) as svc:
        base = svc.register_layer(io.BytesIO(TarBuilder().file("a", b"a").build()), None)
        top = svc.register_layer(io.BytesIO(TarBuilder().file("b", b"b").build()), base.chain_id)
        target = svc.store.layers.mount(top.cache_id)
        assert target.startswith(str(tmp_path / "images" / "overlay")) and is_mountpoint(target)
    with sqlite3.connect(tmp_path / "run" / "mounts.db") as conn:
        conn.execute("DELETE FROM mount_refs")  # as if made by hand, or by a process that counted nothing
    with ImageService.open(cfg) as svc:
        assert any("mounted under the store, but no lamina process holds it" in str(p)
                   for p in svc.check(quick=True).problems)
        svc.check(repair=True)
        assert not is_mountpoint(target)
        assert svc.check().problems == []


def test_drivers_says_which_can_keep_images_apart(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path, tmp_path / "images")
    rows = {r["name"]: r for r in json.loads(lamina_cli("--config", str(cfg), "--format", "json", "drivers",
                                                          root=tmp_path / "s").stdout)}
    assert rows["vfs"]["supported"] and not rows["tarball"]["supported"]
    assert "cannot keep image layers apart" in rows["tarball"]["reason"]

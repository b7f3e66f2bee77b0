"""Additional image stores (issue 15): another lamina store, bind-mounted read-only, whose images a store
lists, inspects, saves, pushes and runs containers from, and never writes to."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import lamina_cli
from image_fixtures import host_binaries_tar
from lamina import ImageService
from lamina.config import Config
from lamina.errors import ImageConflict, ImageError, StoreError
from lamina.testing import TarBuilder, require_root


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file's, link's and directory's path with its content hash or target, mode and owner."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            what = f"{st.st_mode:o} {st.st_uid}:{st.st_gid}"
            if p.is_symlink():
                what += " -> " + os.readlink(p)
            elif p.is_file():
                what += " " + hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = what
    return out


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A vfs store with two images, bind-mounted read-only at ``tmp_path/ro``."""
    require_root()
    src = tmp_path / "src"
    host_binaries_tar(tmp_path / "host.tar")
    with ImageService.open(Config(root=src / "root", runroot=src / "run", driver="vfs")) as svc:
        with open(tmp_path / "host.tar", "rb") as f:
            svc.import_image(f, "shared/app:1")
        svc.import_image(io.BytesIO(TarBuilder().file("other", b"o").build()), "shared/other:1")
    yield from _read_only_bind(src / "root", tmp_path / "ro")


def _read_only_bind(source: Path, at: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``at`` (made) until the generator is closed."""
    at.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(at)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True)
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=False)


def _config(tmp: Path, shared: Path, driver: str = "vfs") -> Path:
    path = tmp / f"{driver}.toml"
    path.write_text(f'[storage]\nadditional_image_stores = ["{shared}"]\n')
    return path


def _cli(tmp: Path, cfg: Path, driver: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return lamina_cli("--config", str(cfg), "--driver", driver, *args, root=tmp / driver, check=check)


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_a_read_only_store_is_listed_inspected_saved_and_never_changed(tmp_path: Path, shared: Path,
                                                                       driver: str) -> None:
    before = _tree_digest(shared)
    cfg = _config(tmp_path, shared, driver)
    listing = json.loads(_cli(tmp_path, cfg, driver, "--format", "json", "images").stdout)
    assert sorted(i["RepoTags"][0] for i in listing) == ["shared/app:1", "shared/other:1"]
    assert {i["Store"] for i in listing} == {str(shared)}
    table = _cli(tmp_path, cfg, driver, "images").stdout.decode()
    assert "STORE" in table.splitlines()[0] and str(shared) in table
    [details] = json.loads(_cli(tmp_path, cfg, driver, "inspect", "shared/app:1").stdout)
    assert details["Store"] == str(shared) and details["Size"] > 10_000
    _cli(tmp_path, cfg, driver, "save", "-o", str(tmp_path / "app.tar"), "shared/app:1")
    with ImageService.open(Config(root=tmp_path / "check", runroot=tmp_path / "check-run", driver="vfs")) as svc:
        [loaded] = svc.load_image(tmp_path / "app.tar")
        assert loaded.image.id == details["Id"]
    refused = _cli(tmp_path, cfg, driver, "rmi", "shared/app:1", check=False)
    assert refused.returncode != 0 and b"additional image store" in refused.stderr
    assert b"Traceback" not in refused.stderr and refused.stderr.count(b"\n") == 1
    refused = _cli(tmp_path, cfg, driver, "tag", "shared/app:1", "mine:1", check=False)
    assert refused.returncode != 0 and b"only reads" in refused.stderr
    # pulling what the shared store has needs no registry (none runs at this address)
    pulled = _cli(tmp_path, cfg, driver, "--format", "json", "pull", "shared/app:1", check=False)
    assert pulled.returncode == 0, pulled.stderr
    # a container's layers live in this store: the image is copied here first, then it runs
    ran = _cli(tmp_path, cfg, driver, "run", "--rm", "shared/app:1", "/bin/cat", "/etc/os-release", check=False)
    assert ran.returncode == 0 and ran.stdout == b'NAME="lamina host binaries"\nID=lamina-host\n', ran.stderr
    listing = json.loads(_cli(tmp_path, cfg, driver, "--format", "json", "images").stdout)
    assert {i["RepoTags"][0]: i["Store"] for i in listing} == {"shared/app:1": "", "shared/other:1": str(shared)}
    assert _tree_digest(shared) == before


def test_images_of_the_store_itself_come_first_and_filters_span_both(tmp_path: Path, shared: Path) -> None:
    cfg = Config(root=tmp_path / "own", runroot=tmp_path / "own-run", driver="vfs",
                 additional_image_stores=(shared,))
    with ImageService.open(cfg) as svc:
        mine = svc.import_image(io.BytesIO(TarBuilder().file("m", b"m").build()), "mine:1").id
        listed = svc.images()
        assert listed[0].id == mine and listed[0].store == "" and {s.store for s in listed[1:]} == {str(shared)}
        assert [s.id for s in svc.images({"since": ["shared/other:1"]})] == [mine]
        with pytest.raises(ImageConflict, match="additional image store"):
            svc.image_delete("shared/other:1")
        svc.export_image(["shared/app:1", "shared/other:1"], tmp_path / "both.tar")
        with pytest.raises(ImageError, match="different stores"):
            svc.export_image(["mine:1", "shared/app:1"], tmp_path / "mixed.tar")


def test_a_schema_4_store_is_read_as_it_is(tmp_path: Path, shared: Path) -> None:
    """An additional store an older lamina wrote (schema 4: no recorded labels) is listed from its configs,
    and its containers run, without a write to it; an older schema still is refused in one line."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "src" / "root" / "lamina.db")
    with db:
        db.execute("ALTER TABLE images DROP COLUMN labels")
        db.execute("UPDATE meta SET value='4' WHERE key='schema'")
    db.close()
    before = _tree_digest(shared)
    cfg = Config(root=tmp_path / "own", runroot=tmp_path / "own-run", driver="vfs",
                 additional_image_stores=(shared,))
    with ImageService.open(cfg) as svc:
        listed = svc.images()
        assert sorted(s.repo_tags[0] for s in listed) == ["shared/app:1", "shared/other:1"]
        assert {s.store for s in listed} == {str(shared)} and all(s.labels == {} for s in listed)
        assert svc.inspect_image("shared/other:1")["Id"] in {s.id for s in listed}
        svc.create_container("shared/other:1", name="c")
        assert svc.images()[0].store == ""  # the container's image was copied here
    assert _tree_digest(shared) == before
    db = sqlite3.connect(tmp_path / "src" / "root" / "lamina.db")
    with db:
        db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.close()
    from lamina.store.kernel import Store

    with pytest.raises(StoreError, match="schema 3"):
        Store(dataclasses.replace(cfg, root=shared, runroot=tmp_path / "r3"), shared=True)
    with ImageService.open(cfg) as svc:
        assert [s.store for s in svc.images()] == [""]  # left out, with a warning


def test_a_missing_additional_store_is_left_out(tmp_path: Path) -> None:
    cfg = Config(root=tmp_path / "own", runroot=tmp_path / "own-run", driver="vfs",
                 additional_image_stores=(tmp_path / "absent",))
    with ImageService.open(cfg) as svc:
        assert svc.images() == [] and svc.shared_stores == []
    from lamina.store.kernel import Store

    with pytest.raises(StoreError, match="not a lamina store"):
        Store(Config(root=tmp_path / "absent", runroot=tmp_path / "r"), shared=True)


def test_config_validates_additional_stores(tmp_path: Path) -> None:
    from lamina.config import load_config
    from lamina.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text('[storage]\nadditional_image_stores = ["relative/path"]\n')
    with pytest.raises(ConfigError, match="not an absolute path"):
        load_config(bad)
    bad.write_text('[storage]\nroot = "/x"\nadditional_image_stores = ["/x"]\n')
    with pytest.raises(ConfigError, match="own root"):
        load_config(bad)


@pytest.fixture
def shared_overlay(tmp_path: Path) -> Iterator[Path]:
    """An overlay store with a base image and a child whose layer deletes a file (a whiteout) and
    replaces a directory (an opaque one), bind-mounted read-only at ``tmp_path/ro-overlay``."""
    require_root()
    src = tmp_path / "src-overlay"
    host_binaries_tar(tmp_path / "host.tar")
    with ImageService.open(Config(root=src / "root", runroot=src / "run", driver="overlay")) as svc:
        with open(tmp_path / "host.tar", "rb") as f:
            svc.import_image(f, "shared/app:1")
        c = svc.create_container("shared/app:1")
        with svc.perform_with_base_fs(c.id) as rootfs:
            root = Path(rootfs)
            (root / "etc/os-release").unlink()
            (root / "etc/child").write_text("from the child layer\n")
            for p in (root / "tmp").iterdir():
                p.unlink()
            (root / "tmp").rmdir()
            (root / "tmp").mkdir()
            (root / "tmp/new").write_text("new\n")
        svc.commit_image(c.id, "shared/child:1")
        svc.remove_container(c.id)
    yield from _read_only_bind(src / "root", tmp_path / "ro-overlay")


def test_overlay_runs_containers_on_the_shared_layers_in_place(tmp_path: Path, shared_overlay: Path) -> None:
    before = _tree_digest(shared_overlay)
    shared_home = shared_overlay / "overlay"
    cfg = Config(root=tmp_path / "main" / "root", runroot=tmp_path / "main" / "run", driver="overlay",
                 additional_image_stores=[shared_overlay])
    with ImageService.open(cfg) as svc:
        [theirs] = [s for s in svc.shared_stores]
        c = svc.create_container("shared/child:1")
        img = svc.get_image("shared/child:1")
        assert img.id == theirs.get_image("shared/child:1").id
        # every layer of the image reads the shared store's directories: nothing was copied
        for chain in img.chain:
            mine, other = svc.get_layer(chain), theirs.get_layer(chain)
            assert svc.store.driver.metadata(mine.cache_id)["diff"] == str(shared_home / other.cache_id / "diff")
            assert not (cfg.root / "overlay" / mine.cache_id / "diff").exists()
        copied = sum(f.stat().st_size for f in (cfg.root / "overlay").rglob("*") if f.is_file())
        assert copied < 10_000, copied  # link, lower and source files only
        with svc.perform_with_base_fs(c.id) as rootfs:
            root = Path(rootfs)
            assert (root / "etc/child").read_text() == "from the child layer\n"
            assert not (root / "etc/os-release").exists()  # the shared layer's whiteout hides it
            assert sorted(p.name for p in (root / "tmp").iterdir()) == ["new"]  # its opaque directory
            assert (root / "bin/cat").stat().st_size > 1000
            (root / "etc/mine").write_text("mine\n")
        assert svc.changes(c.id) and any(ch.path == "/etc/mine" for ch in svc.changes(c.id))
        committed = svc.commit_image(c.id, "local/committed:1")
        assert committed.chain[:-1] == img.chain
        # exports of the adopted layers are byte-exact: the same archive from here and from the store
        svc.export_image(["shared/child:1"], tmp_path / "here.tar")
        theirs.export_image(["shared/child:1"], tmp_path / "there.tar")
        assert (tmp_path / "here.tar").read_bytes() == (tmp_path / "there.tar").read_bytes()
        report = svc.check()
        assert report.sound, report.as_dict()
        svc.remove_container(c.id)
        svc.image_delete("local/committed:1")
        svc.image_delete(img.id, force=True)
        assert svc.layers() == []
        assert set(os.listdir(cfg.root / "overlay")) <= {"l", "mode", ".probe-ok"}
        assert os.listdir(cfg.root / "overlay" / "l") == []
    cli = lamina_cli("--config", str(_config(tmp_path, shared_overlay, "overlay")), "--driver", "overlay",
                     "run", "--rm", "shared/child:1", "/bin/cat", "/etc/child", root=tmp_path / "cli")
    assert cli.stdout == b"from the child layer\n"
    assert _tree_digest(shared_overlay) == before
    # the store that uses the layers in place names them while the shared store is away, and its repair
    # removes nothing for it: the image is back in use once the shared store is
    subprocess.run(["umount", str(shared_overlay)], check=True)
    checked = lamina_cli("--driver", "overlay", "system", "check", root=tmp_path / "cli", check=False)
    assert checked.returncode == 1 and b"cannot be reached" in checked.stdout, checked.stdout
    lamina_cli("--driver", "overlay", "system", "check", "--repair", root=tmp_path / "cli", check=False)
    images = lamina_cli("--driver", "overlay", "images", "--format", "json", root=tmp_path / "cli")
    assert [i["RepoTags"] for i in json.loads(images.stdout)] == [["shared/child:1"]]
    subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "src-overlay" / "root"), str(shared_overlay)],
                   check=True)
    lamina_cli("--driver", "overlay", "system", "check", root=tmp_path / "cli")
    again = lamina_cli("--driver", "overlay", "run", "--rm", "shared/child:1", "/bin/cat", "/etc/child",
                       root=tmp_path / "cli")
    assert again.stdout == b"from the child layer\n"


def test_copy_between_stores_never_uses_layers_in_place(tmp_path: Path, shared_overlay: Path) -> None:
    """``lamina copy`` makes a store of its own: its layers are copies even where adopting them could work."""
    lamina_cli("--driver", "overlay", "copy", str(shared_overlay), str(tmp_path / "dest" / "root"), "shared/child:1",
               root=tmp_path / "scratch")
    with ImageService.open(Config(root=tmp_path / "dest" / "root", runroot=tmp_path / "dest" / "run",
                                  driver="overlay")) as svc:
        img = svc.get_image("shared/child:1")
        for chain in img.chain:
            diff = svc.store.driver.metadata(svc.get_layer(chain).cache_id)["diff"]
            assert diff.startswith(str(tmp_path / "dest" / "root")), diff


def test_create_on_shared_layers_killed_at_random_instants_leaves_a_sound_store(tmp_path: Path,
                                                                                shared_overlay: Path) -> None:
    """``create`` of an additional store's image (which adopts its layers) SIGKILLed anywhere: the next
    command finishes it off, the store checks sound, and the shared store is untouched."""
    import random
    import signal
    import time

    from store_invariants import check_store

    before = _tree_digest(shared_overlay)
    cfg = _config(tmp_path, shared_overlay, "overlay")
    home = tmp_path / "overlay"
    argv = [sys.executable, "-m", "lamina", "--config", str(cfg), "--root", str(home / "root"),
            "--runroot", str(home / "run"), "--driver", "overlay"]
    t0 = time.perf_counter()
    subprocess.run([*argv, "create", "--name", "timed", "shared/child:1"], check=True, capture_output=True)
    duration = time.perf_counter() - t0
    subprocess.run([*argv, "rm", "timed"], check=True, capture_output=True)
    subprocess.run([*argv, "rmi", "shared/child:1"], check=True, capture_output=True)
    rng = random.Random(15)
    for k in range(8):
        proc = subprocess.Popen([*argv, "create", "--name", f"c{k}", "shared/child:1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.05, duration))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        listed = subprocess.run([*argv, "ps", "-a", "--format", "json"], capture_output=True)
        assert listed.returncode == 0, listed.stderr
        assert check_store(home / "root", home / "run", "overlay") == [], k
        checked = subprocess.run([*argv, "system", "check"], capture_output=True)
        assert checked.returncode == 0, checked.stdout
    ran = subprocess.run([*argv, "run", "--rm", "shared/child:1", "/bin/cat", "/etc/child"], capture_output=True)
    assert ran.stdout == b"from the child layer\n", ran.stderr
    assert _tree_digest(shared_overlay) == before

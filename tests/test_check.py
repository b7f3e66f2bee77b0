"""``lamina system check [--quick] [--repair] [--force]``: planted faults are found, repaired without touching
sound images, and a sound store (a real Debian root filesystem among others) checks clean."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config
from lamina.testing import TarBuilder, require_root

DRIVERS = ["vfs", "overlay"]


def _open(tmp: Path, driver: str | None = None, recover: bool = True) -> ImageService:
    if driver == "overlay":
        require_root()
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver=driver), recover=recover)


def _other_tar() -> bytes:
    tb = TarBuilder().dir("app").file("app/run.sh", b"#!/bin/sh\necho hi\n" * 50, mode=0o755)
    tb.file("app/data.bin", hashlib.sha256(b"data").digest() * 4096).symlink("app/current", "data.bin")
    return tb.build()


def _check(tmp: Path, *args: str) -> tuple[int, str]:
    proc = lamina_cli("system", "check", *args, root=tmp, check=False)
    assert proc.stderr == b"" or proc.returncode == 2, proc.stderr
    return proc.returncode, proc.stdout.decode()


def _exports_intact(svc: ImageService, ref: str) -> None:
    """The image is there and each of its layers exports to bytes whose sha256 is its DiffID."""
    img = svc.get_image(ref)
    for chain, diff_id in zip(img.chain, img.diff_ids, strict=True):
        with svc.export_layer(chain) as f:
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == diff_id


@pytest.fixture
def store(tmp_path: Path, request: pytest.FixtureRequest, umoci_small_image: ImageFacts) -> Iterator[Path]:
    """A store with small:1 (three layers, loaded) and other:1 (one layer, imported), checked clean."""
    driver = request.param
    with _open(tmp_path, driver) as svc:
        svc.load_image(umoci_small_image.path)
        svc.import_image(io.BytesIO(_other_tar()), "other:1")
    code, out = _check(tmp_path)
    assert (code, out) == (0, "No problems found\n")
    yield tmp_path


def _layer_dir(tmp: Path, ref: str) -> tuple[str, Path]:
    """The top layer's CacheID and the directory holding its files (vfs: the tree, overlay: the upper dir)."""
    with _open(tmp) as svc:
        img = svc.get_image(ref)
        layer = svc.get_layer(img.chain[-1])
        return layer.cache_id, Path(svc.layer_store.driver.diff_root(layer.cache_id) or "")


def _repair_leaves_small(tmp: Path, expect_other: bool) -> None:
    code, out = _check(tmp, "--repair")
    assert code == 0 and "none left after repair" in out, out
    _sound_after_repair(tmp, expect_other)


def _sound_after_repair(tmp: Path, expect_other: bool) -> None:
    assert _check(tmp) == (0, "No problems found\n")
    with _open(tmp) as svc:
        _exports_intact(svc, "small:1")
        names = {t for i in svc.images() for t in i.repo_tags}
        assert ("other:1" in names) == expect_other


# -- the planted faults of the issue ------------------------------------------------------------------------
@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_file_deleted_from_a_layer(store: Path) -> None:
    _, root = _layer_dir(store, "other:1")
    (root / "app" / "run.sh").unlink()
    code, out = _check(store)
    assert code == 1
    assert "Damaged layers:" in out and "app/run.sh" in out and "missing" in out
    assert _check(store, "--quick")[0] == 0  # --quick reads no contents: it cannot see this
    _repair_leaves_small(store, expect_other=False)


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_file_bytes_changed(store: Path) -> None:
    _, root = _layer_dir(store, "other:1")
    with open(root / "app" / "data.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    code, out = _check(store)
    assert code == 1 and "no longer matches its DiffID" in out
    _repair_leaves_small(store, expect_other=False)


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_mode_and_owner_changed(store: Path) -> None:
    require_root()
    _, root = _layer_dir(store, "other:1")
    os.chmod(root / "app" / "run.sh", 0o4755)
    code, out = _check(store)
    assert code == 1 and "app/run.sh: has mode 4755, the layer has 0755" in out
    os.chmod(root / "app" / "run.sh", 0o755)
    os.lchown(root / "app" / "current", 7, 7)
    code, out = _check(store)
    assert code == 1 and "app/current: is owned by 7:7, the layer has 0:0" in out
    _repair_leaves_small(store, expect_other=False)


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_content_blob_removed(store: Path, umoci_small_image: ImageFacts) -> None:
    blob = umoci_small_image.layer_digests[0]
    (store / "root" / "content" / "blobs" / "sha256" / blob.split(":")[1]).unlink()
    for quick in ((), ("--quick",)):
        code, out = _check(store, *quick)
        assert code == 1 and f"blob {blob.split(':')[1][:12]}: missing (recorded for image" in out
    _repair_leaves_small(store, expect_other=True)
    with _open(store) as svc:  # the image still saves: its manifest is made again
        svc.export_image(["small:1"], store / "small.tar")
    assert (store / "small.tar").stat().st_size > 1 << 20


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_blob_bytes_changed(store: Path, umoci_small_image: ImageFacts) -> None:
    blob = umoci_small_image.manifest_digest
    path = store / "root" / "content" / "blobs" / "sha256" / blob.split(":")[1]
    path.write_bytes(path.read_bytes().replace(b"{", b" {", 1))
    code, out = _check(store)
    assert code == 1 and "content does not match its digest" in out
    assert _check(store, "--quick")[0] == 0
    _repair_leaves_small(store, expect_other=True)
    assert not path.exists()


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_image_config_changed(store: Path) -> None:
    with _open(store) as svc:
        iid = svc.get_image("other:1").id
    path = store / "root" / "content" / "blobs" / "sha256" / iid.split(":")[1]
    path.write_bytes(path.read_bytes() + b" ")
    code, out = _check(store)
    assert code == 1 and "Damaged images:" in out and "config blob does not match the image ID" in out
    _repair_leaves_small(store, expect_other=False)


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_stray_directory_in_the_driver_area(store: Path) -> None:
    driver = "vfs" if (store / "root" / "vfs").exists() else "overlay"
    stray = store / "root" / driver / ("dir" if driver == "vfs" else "") / ("ab" * 32)
    (stray / "sub").mkdir(parents=True)
    (stray / "sub" / "f").write_bytes(b"x")
    for quick in ((), ("--quick",)):
        code, out = _check(store, *quick)
        assert code == 1 and "Orphaned data:" in out and f"{driver} layer abababababab" in out
    _repair_leaves_small(store, expect_other=True)
    assert not stray.exists()


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_record_removed(store: Path) -> None:
    cache, _ = _layer_dir(store, "other:1")
    (store / "root" / "tar-split" / f"{cache}.tsr").unlink()
    for quick in ((), ("--quick",)):
        code, out = _check(store, *quick)
        assert code == 1 and "exact-export record is missing" in out
    _repair_leaves_small(store, expect_other=False)


def _half_written_layer(tmp: Path) -> None:
    """A ``layer add`` killed while it applies: its row stays incomplete, its files half-written."""
    tb = TarBuilder()
    for i in range(300):
        tb.file(f"d{i % 10}/f{i}", hashlib.sha256(str(i).encode()).digest() * 2048)
    data = tb.build()
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"),
           "layer", "add", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    db = tmp / "root" / "lamina.db"
    deadline = time.time() + 30
    while time.time() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            if conn.execute("SELECT 1 FROM layers WHERE state='incomplete'").fetchone():
                break
        time.sleep(0.05)
    time.sleep(0.3)  # some files written
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_row_left_in_a_transient_state(store: Path) -> None:
    _half_written_layer(store)
    code, out = _check(store, "--quick")
    assert code == 1 and "Leftovers of interrupted operations:" in out and "left incomplete by process" in out
    code, out = _check(store, "--repair")
    assert code == 0 and "removed incomplete layer" in out
    _sound_after_repair(store, expect_other=True)


# -- containers, mounts, leases ------------------------------------------------------------------------------
@pytest.mark.parametrize("store", DRIVERS, indirect=True)
def test_container_on_a_damaged_layer_goes_only_with_force(store: Path) -> None:
    with _open(store) as svc:
        c = svc.create_container("other:1", name="web")
        path = svc.mount("web")  # mounted: a sound store with a mounted container checks clean
    assert _check(store) == (0, "No problems found\n")
    assert os.path.exists(os.path.join(path, "app", "run.sh"))
    with _open(store) as svc:
        svc.unmount("web")
    _, root = _layer_dir(store, "other:1")
    (root / "app" / "data.bin").write_bytes(b"short")
    code, out = _check(store, "--repair")
    assert code == 1 and "left container" in out and "--force" in out
    with _open(store) as svc:
        assert svc.get_container("web").id == c.id and svc.get_image("other:1")
    code, out = _check(store, "--repair", "--force")
    assert code == 0 and "removed container web" in out, out
    _sound_after_repair(store, expect_other=False)


def test_uncounted_mount_and_dead_lease_are_leftovers(tmp_path: Path) -> None:
    require_root()
    with _open(tmp_path, "overlay") as svc:
        svc.import_image(io.BytesIO(_other_tar()), "other:1")
        c = svc.create_container("other:1", name="c")
        target = svc.mount("c")
        svc.unmount("c")
        # a process that died holding a lease and a mount of the container's layer
        with svc.store.db.tx() as db:
            db.execute("INSERT INTO leases VALUES ('dead-lease', 999999999, 1.0, 0)")
        svc.store.layers.mount(c.rw_layer)
    with sqlite3.connect(tmp_path / "run" / "mounts.db") as conn:
        conn.execute("UPDATE mount_refs SET holder='pid:999999999:1.0'")
    from lamina.fs.mounts import is_mountpoint

    assert is_mountpoint(target)
    code, out = _check(tmp_path)
    assert code == 1
    assert "lease dead-lease: held by process 999999999, which is gone" in out
    assert "mount reference of process 999999999: the process is gone" in out
    with sqlite3.connect(tmp_path / "run" / "mounts.db") as conn:
        conn.execute("DELETE FROM mount_refs")
    code, out = _check(tmp_path, "--quick")
    assert code == 1 and "merged: mounted under the store, but no lamina process holds it" in out
    code, out = _check(tmp_path, "--repair")
    assert code == 0 and f"unmounted layer {c.rw_layer[:12]} (nothing held it)" in out
    assert not is_mountpoint(target)
    assert _check(tmp_path) == (0, "No problems found\n")


# -- output, exit codes, the library --------------------------------------------------------------------------
def test_json_report_and_library(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs") as svc:
        svc.import_image(io.BytesIO(_other_tar()), "other:1")
    (tmp_path / "root" / "tar-split" / ("cd" * 32 + ".tsr")).write_bytes(b"x")
    proc = lamina_cli("system", "check", "--format", "json", root=tmp_path, check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["sound"] is False and report["repaired"] is False
    assert report["problems"] == [{"kind": "orphan", "object": f"record {'cd' * 32}.tsr",
                                   "message": "no layer of that ID", "repairable": True}]
    with _open(tmp_path, recover=False) as svc:
        rep = svc.check(repair=True)
        assert rep.repaired and rep.sound and rep.removed == [f"removed record {'cd' * 32}.tsr (no layer)"]
        assert svc.check().problems == []


def test_check_that_cannot_run_exits_2(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs"):
        pass
    (tmp_path / "root" / "lamina.db").write_bytes(b"this is not a database" * 100)
    for name in ("lamina.db-wal", "lamina.db-shm"):
        (tmp_path / "root" / name).unlink(missing_ok=True)
    proc = lamina_cli("system", "check", root=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("Error: check failed:") and err.count("\n") == 1 and "Traceback" not in err
    assert lamina_cli("system", "check", "--force", root=tmp_path, check=False).returncode == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_debian_image_checks_clean_and_quick_is_fast(tmp_path: Path, driver: str, debian_rootfs_tar: Path) -> None:
    """A real root filesystem (set-id files, hard links, owners, device-free /dev, symlinks everywhere) has
    no false positives, with a container made on it; --quick reads no file contents (counted in bytes read
    by this process, not timed: the full check reads the whole layer back)."""
    with _open(tmp_path, driver) as svc:
        with open(debian_rootfs_tar, "rb") as f:
            svc.import_image(f, "debian:test")
        svc.create_container("debian:test", name="d")
    code, out = _check(tmp_path)
    assert (code, out) == (0, "No problems found\n")
    code, out = _check(tmp_path, "--quick")
    assert (code, out) == (0, "No problems found\n")
    size = debian_rootfs_tar.stat().st_size
    with _open(tmp_path, driver) as svc:
        read: dict[str, int] = {}
        for quick in (True, False):
            before = _bytes_read()
            assert svc.check(quick=quick).problems == []
            read["quick" if quick else "full"] = _bytes_read() - before
    assert read["full"] > size // 2, read  # what the count sees: the layer's files read back
    assert read["quick"] < size // 50, read


def _bytes_read() -> int:
    """Bytes this process has read through read(2) and the like (``rchar``), page cache included."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_directory_replaced_within_its_layer_is_sound(tmp_path: Path, driver: str) -> None:
    """x/, x/a, then x as a file, then x/ again and x/b: x/a went with the first x, which is no damage."""
    tb = TarBuilder().dir("x").file("x/a", b"a").file("x", b"file").dir("x").file("x/b", b"b")
    tb.file("y", b"1").file("y", b"22")
    with _open(tmp_path, driver) as svc:
        svc.import_image(io.BytesIO(tb.build()), "replaced:1")
    assert _check(tmp_path) == (0, "No problems found\n")


_CHURN = """
import io, sys, time
from lamina import ImageService
from lamina.testing import TarBuilder
root, run, deadline = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
i = 0
with ImageService.open(root=root, runroot=run) as svc:
    while time.time() < deadline:
        i += 1
        tb = TarBuilder().dir("d").file(f"d/f{i}", str(i).encode() * 5000)
        svc.import_image(io.BytesIO(tb.build()), f"churn:{i}")
        c = svc.create_container(f"churn:{i}")
        svc.changes(c.id)
        svc.remove_container(c.id)
        svc.image_delete(f"churn:{i}")
print(i)
"""


@pytest.mark.parametrize("driver", DRIVERS)
def test_check_while_another_process_works_reports_nothing(tmp_path: Path, driver: str) -> None:
    """Loads, containers and removals in another process are never problems (nor anything to repair)."""
    with _open(tmp_path, driver) as svc:
        svc.import_image(io.BytesIO(_other_tar()), "other:1")
    churn = subprocess.Popen([sys.executable, "-c", _CHURN, str(tmp_path / "root"), str(tmp_path / "run"), "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rounds = 0
        with _open(tmp_path, recover=False) as svc:
            while churn.poll() is None:
                for quick in (True, False):
                    report = svc.check(quick=quick)
                    assert report.problems == [], [str(p) for p in report.problems]
                rounds += 1
        out, err = churn.communicate()
        assert churn.returncode == 0, err.decode()[-2000:]
        assert int(out) > 3 and rounds > 3
    finally:
        if churn.poll() is None:
            churn.kill()
            churn.wait()
    assert _check(tmp_path) == (0, "No problems found\n")

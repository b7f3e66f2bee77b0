"""A full disk: the store's root and run root on a small real ext4 filesystem that fills up.

Each writing command (load of a docker-archive and of an OCI layout, pull, import, commit) is run with the
filesystem full at the points where it fails differently: no room to open the database at all, room to
open it but not to write a transaction, and room for part of the layer. Each time it must fail with one
line naming the lack of space, leave a consistent store (``check_store``) with exactly what it held before,
and, once the space is given back, succeed.
"""

from __future__ import annotations

import random
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from fault_fixtures import BIG, FaultImages, fill, loop_ext4
from store_invariants import check_store

from conftest import lamina_cli

DISK_MIB = 48
# Free bytes left: none (SQLite cannot even make its -shm file), enough to open the database but not to
# write a transaction, and part of the layer.
LEAVE = (0, 48 << 10, 3 << 20)


def _contents(disk: Path) -> dict[str, Any]:
    """What the store holds: images with their names, committed layers, containers (read-only SQL)."""
    with closing(sqlite3.connect(f"file:{disk / 'root' / 'lamina.db'}?mode=ro", uri=True)) as db:
        return {
            "images": sorted(db.execute("SELECT id, top_layer FROM images")),
            "names": sorted(db.execute("SELECT name, image_id FROM image_names")),
            "layers": sorted(db.execute(
                "SELECT id, COALESCE(chain_id, ''), refs FROM layers WHERE state='committed'"
            )),
            "containers": sorted(db.execute("SELECT id, name, state FROM containers")),
        }


def _command(kind: str, images: FaultImages) -> list[str]:
    return {
        "load-docker-archive": ["load", "-q", "-i", str(images.big_docker)],
        "load-oci-layout": ["load", "-q", "-i", str(images.big_oci)],
        "pull": ["pull", images.big_remote],
        "import": ["import", str(images.big_rootfs), "big:imported"],
        "commit": ["commit", "box", "big:committed"],
    }[kind]


@pytest.mark.parametrize("kind", ["load-docker-archive", "load-oci-layout", "pull", "import", "commit"])
def test_full_disk_fails_cleanly_and_succeeds_once_freed(
    tmp_path: Path, fault_images: FaultImages, kind: str
) -> None:
    with loop_ext4(tmp_path, DISK_MIB) as disk:
        lamina_cli("--driver", "vfs", "load", "-q", "-i", str(fault_images.keep), root=disk)
        if kind == "commit":
            lamina_cli("create", "--name", "box", "keep:1", root=disk)
            rootfs = Path(lamina_cli("mount", "box", root=disk).stdout.decode().strip())
            (rootfs / "big").write_bytes(random.Random(3).randbytes(BIG))
            lamina_cli("umount", "box", root=disk)
        before = _contents(disk)
        cmd = _command(kind, fault_images)
        for leave in LEAVE:
            filler = fill(disk, leave)
            proc = lamina_cli(*cmd, root=disk, check=False)
            err = proc.stderr.decode()
            assert proc.returncode == 1, (leave, err)
            assert err.startswith("Error: no space left on device while ") and err.count("\n") == 1, (leave, err)
            # reads still work on the full disk, and show what was there
            listed = lamina_cli("images", "-q", "--no-trunc", root=disk).stdout.decode().split()
            assert sorted(listed) == sorted(i for i, _ in before["images"])
            filler.unlink()
            assert _contents(disk) == before, leave
            assert check_store(disk / "root", disk / "run", "vfs") == [], leave
        lamina_cli(*cmd, root=disk)
        after = _contents(disk)
        assert len(after["images"]) == len(before["images"]) + 1
        assert set(before["images"]) <= set(after["images"])
        assert check_store(disk / "root", disk / "run", "vfs") == []


def test_database_full_is_one_line(tmp_path: Path, fault_images: FaultImages) -> None:
    """SQLite's own ENOSPC (SQLITE_FULL): room to open the database, none for the transaction's pages."""
    with loop_ext4(tmp_path, DISK_MIB) as disk:
        lamina_cli("--driver", "vfs", "load", "-q", "-i", str(fault_images.keep), root=disk)
        before = _contents(disk)
        messages = set()
        for leave in range(0, 160 << 10, 16 << 10):
            filler = fill(disk, leave)
            proc = lamina_cli("tag", "keep:1", f"keep:{leave}", root=disk, check=False)
            filler.unlink()
            if proc.returncode == 0:
                break
            err = proc.stderr.decode()
            assert proc.returncode == 1 and err.count("\n") == 1, err
            assert err.startswith("Error: no space left on device while "), err
            messages.add(err.split(" /")[0])
            assert _contents(disk) == before
        else:
            pytest.fail("the tag never succeeded")
        assert "Error: no space left on device while writing the store database" in messages, messages
        assert check_store(disk / "root", disk / "run", "vfs") == []

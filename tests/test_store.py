"""The store kernel in one process: its database wrapper, leases, reference counting and migration.

The races between processes are in tests/test_concurrency.py; these pin the rules each of them relies on.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest

from lamina import ImageService
from lamina.errors import LayerInUse, StoreError
from lamina.store.db import SCHEMA_VERSION, Database
from lamina.testing import TarBuilder


def _svc(tmp_path: Path) -> ImageService:
    return ImageService.open(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs")


def test_a_full_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "rr").mkdir()
    db = Database(tmp_path / "r", tmp_path / "rr")
    try:
        pages = db.one("PRAGMA page_count")[0]
        db.db.execute(f"PRAGMA max_page_count={pages + 2}")
        with pytest.raises(StoreError, match="database or disk is full"), db.tx() as conn:
            for i in range(200):
                conn.execute("INSERT INTO meta VALUES (?, ?)", (f"k{i}", "x" * 4000))
        assert not db.db.in_transaction
        assert db.one("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'")[0] == 0  # nothing half-written
    finally:
        db.close()


def test_a_read_only_database_is_not_reported_busy(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "rr").mkdir()
    Database(tmp_path / "r", tmp_path / "rr").close()
    db = Database(tmp_path / "r", tmp_path / "rr")
    try:
        db.db.execute("PRAGMA query_only=1")
        with pytest.raises(StoreError) as info, db.tx() as conn:
            conn.execute("INSERT INTO meta VALUES ('a', 'b')")
        assert "busy" not in info.value.message
    finally:
        db.close()


def test_layer_rm_leaves_references_of_images_and_containers(tmp_path: Path) -> None:
    tar = TarBuilder().dir("etc").file("etc/os-release", b"ID=test\n").build()
    with _svc(tmp_path) as svc:
        img = svc.import_image(io.BytesIO(tar), "example.com/a:1")
        layer = svc.get_layer(img.chain[-1])
        assert layer.refs == 1
        with pytest.raises(LayerInUse, match=r"used by image [0-9a-f]{12}"):
            svc.release_layer(layer.chain_id)
        svc.retain_layer(layer.chain_id)  # an explicit reference is the caller's to drop
        assert svc.release_layer(layer.chain_id) == []
        assert svc.get_layer(layer.chain_id).refs == 1
        c = svc.create_container("example.com/a:1", name="box")
        [init] = [x for x in svc.layers() if x.cache_id == c.init_layer]
        with pytest.raises(LayerInUse, match="used by container box"):
            svc.release_layer(init.chain_id)
        svc.remove_container("box")
        svc.image_delete("example.com/a:1")
        assert svc.layers() == []


def test_collection_keeps_a_layer_an_image_uses_even_with_a_wrong_count(tmp_path: Path) -> None:
    """A count that went wrong (a store written by an older lamina) never costs an image its layer."""
    tar = TarBuilder().file("a", b"1").build()
    with _svc(tmp_path) as svc:
        img = svc.import_image(io.BytesIO(tar), "example.com/a:1")
        top = svc.get_layer(img.chain[-1])
        svc.store.db.db.execute("UPDATE layers SET refs=0 WHERE id=?", (top.cache_id,))
    with _svc(tmp_path) as svc:  # the next open looks for layers nothing references
        assert [x.chain_id for x in svc.layers()] == [top.chain_id]
        svc.export_image(["example.com/a:1"], tmp_path / "out.tar")


def test_a_lease_ends_once_and_holds_nothing_after(tmp_path: Path) -> None:
    tar = TarBuilder().file("a", b"1").build()
    with _svc(tmp_path) as svc:
        store = svc.store
        with store.lease() as lease:
            layer = store.layers.register(io.BytesIO(tar), lease=lease)
            assert layer.refs == 0
            assert store.layers.users(layer.cache_id)["leases"] == [lease.id]
        assert svc.layers() == []  # only the lease kept it: collected when it ended
        lease.end()  # again: nothing happens
        with pytest.raises(StoreError, match="has ended"):
            lease.blob("sha256:" + "0" * 64)


def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    """Version 1 leased per process; its leases of processes that are gone end on the first open."""
    tar = TarBuilder().file("a", b"1").build()
    with _svc(tmp_path) as svc:
        layer = svc.register_layer(io.BytesIO(tar))
    db = sqlite3.connect(tmp_path / "root" / "lamina.db")
    with db:
        db.execute("DROP TABLE lease_layers")
        db.execute("DROP TABLE lease_blobs")
        db.execute("DROP TABLE leases")
        db.execute("CREATE TABLE layer_leases (id TEXT NOT NULL, owner_pid INTEGER NOT NULL, owner_start REAL,"
                   " PRIMARY KEY (id, owner_pid))")
        db.execute("CREATE TABLE content_leases (digest TEXT NOT NULL, owner_pid INTEGER NOT NULL,"
                   " owner_start REAL, PRIMARY KEY (digest, owner_pid))")
        db.execute("INSERT INTO layer_leases VALUES (?, 999999999, NULL)", (layer.cache_id,))
        db.execute("INSERT INTO content_leases VALUES ('sha256:' || ?, 999999999, NULL)", ("ab" * 32,))
        db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.close()
    with _svc(tmp_path) as svc:
        assert svc.store.db.get_meta("schema") == str(SCHEMA_VERSION)
        assert svc.store.db.query("SELECT * FROM leases") == []  # the dead process's lease ended
        assert [x.chain_id for x in svc.layers()] == [layer.chain_id]  # its reference kept it
        tables = {r[0] for r in svc.store.db.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert not {"layer_leases", "content_leases"} & tables


def test_exports_are_assembled_by_the_store_and_old_layers_still_export(tmp_path: Path) -> None:
    """A tree driver's layer exports from lamina's own record; a layer applied before lamina kept the
    records (its record where the driver kept it) exports through the driver."""
    import hashlib
    import os

    tar = TarBuilder().dir("d").file("d/f", b"x" * 5000).file("d/f", b"y" * 10).symlink("d/l", "f").build()
    with _svc(tmp_path) as svc:
        layer = svc.register_layer(io.BytesIO(tar))
        record = tmp_path / "root" / "tar-split" / f"{layer.cache_id}.tsr"
        assert record.is_file() and record.with_name(record.name + ".sup").is_file()  # f was replaced
        with svc.export_layer(layer.chain_id) as f:
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layer.diff_id
        legacy = tmp_path / "root" / "vfs" / "records"
        legacy.mkdir(exist_ok=True)
        os.replace(record, legacy / record.name)
        os.replace(str(record) + ".sup", str(legacy / record.name) + ".sup")
        with svc.export_layer(layer.chain_id) as f:
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layer.diff_id
        # copied into a file: the driver's stream hands its spans on to the store's, which verifies them
        with svc.layer_store.export_exact(layer.chain_id) as s, open(tmp_path / "copy.tar", "w+b") as out:
            assert s.copy_to(out.fileno()) == len(tar)
        assert (tmp_path / "copy.tar").read_bytes() == tar
        svc.release_layer(layer.chain_id)
        assert not list(legacy.iterdir()) and not list((tmp_path / "root" / "tar-split").iterdir())


def test_a_layer_without_any_record_says_so_on_export(tmp_path: Path) -> None:
    from lamina.errors import ExportError

    with _svc(tmp_path) as svc:
        layer = svc.register_layer(io.BytesIO(TarBuilder().file("a", b"1").build()))
        (tmp_path / "root" / "tar-split" / f"{layer.cache_id}.tsr").unlink()
        with pytest.raises(ExportError, match=r"vfs layer [0-9a-f]{12} has no tar-split record"), \
                svc.export_layer(layer.chain_id) as f:
            f.read()


@pytest.mark.parametrize("cut", [3, 30, 60])
def test_a_truncated_record_fails_the_export_read_or_copied(tmp_path: Path, cut: int) -> None:
    import gzip

    from lamina.errors import ExportError

    with _svc(tmp_path) as svc:
        layer = svc.register_layer(io.BytesIO(TarBuilder().dir("d").file("d/a", b"1" * 700).build()))
        record = tmp_path / "root" / "tar-split" / f"{layer.cache_id}.tsr"
        ops = gzip.decompress(record.read_bytes())
        record.write_bytes(gzip.compress(ops[:len(ops) * cut // 100]))
        with pytest.raises(ExportError, match=r"truncated|corrupt|not a lamina layer record"), \
                svc.export_layer(layer.chain_id) as f:
            f.read()
        with pytest.raises(ExportError, match=r"truncated|corrupt|not a lamina layer record"), \
                svc.layer_store.export_exact(layer.chain_id) as s, open(tmp_path / "out", "w+b") as out:
            s.copy_to(out.fileno())


def test_a_tree_driver_hook_overridden_without_the_marker_is_refused() -> None:
    from lamina.driver import Change, TreeDriver
    from lamina.errors import PluginError
    from lamina.plugins.discovery import validate_impls

    class Forgetful(TreeDriver):
        name = "forgetful"

        def lamina_changes(self, layer_id: str, parent: str | None) -> list[Change]:
            return []

    with pytest.raises(PluginError, match="lamina_changes overrides the hook of TreeDriver without @hookimpl"):
        validate_impls(Forgetful, "test")


def test_an_image_deletion_refused_in_its_transaction_leaves_the_image_whole(tmp_path: Path) -> None:
    """The last check of an image deletion runs in the transaction that deletes it (a container created a
    moment before wins): a refusal there leaves the image with its names."""
    from lamina.errors import ImageConflict

    with _svc(tmp_path) as svc:
        img = svc.import_image(io.BytesIO(TarBuilder().file("a", b"1").build()), "example.com/a:1")
        svc.tag_image("example.com/a:1", "example.com/b:1")
        svc.create_container(img.id, name="box")
        names: list[str] = []
        with pytest.raises(ImageConflict, match="used by container"):
            svc.image_store.delete(img.id, names_out=names)
        assert names == []
        assert set(svc.get_image(img.id).record.names) == {"example.com/a:1", "example.com/b:1"}
        svc.remove_container("box")
        assert [e for e in svc.image_delete(img.id, force=True) if "Deleted" in e] == [{"Deleted": img.id}]


def test_a_commit_whose_parent_image_went_meanwhile_stands_alone(tmp_path: Path) -> None:
    from lamina.store.images import NewImage

    with _svc(tmp_path) as svc:
        img = svc.import_image(io.BytesIO(TarBuilder().file("a", b"1").build()), "example.com/a:1")
        store = svc.image_store
        with svc.store.lease() as lease:
            rec, _ = store.create(NewImage(id="sha256:" + "e" * 64, diff_ids=img.diff_ids, created=None,
                                           origin="test", parent="sha256:" + "f" * 64), lease)
        assert rec.parent is None

"""Disk usage from the store's records (``system df``, ``info``) and pruning (``image prune``, ``system
prune``), with the last-use times they keep (issue 14)."""

from __future__ import annotations

import io
import json
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.cli.app import human
from lamina.config import Config
from lamina.errors import BadTime, ImageError
from lamina.store.db import SCHEMA_VERSION
from lamina.testing import TarBuilder
from lamina.timespec import parse_duration, parse_time


def _open(tmp: Path, driver: str = "vfs") -> ImageService:
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver=driver))


def _import(svc: ImageService, name: str | None, content: bytes, **kw: Any) -> str:
    return svc.import_image(io.BytesIO(TarBuilder().file("f", content).build()), name, **kw).id


def _df(tmp: Path, *args: str) -> dict[str, Any]:
    out = json.loads(lamina_cli("--driver", "vfs", "--format", "json", "system", "df", *args, root=tmp).stdout)
    out["rows"] = {r["Type"]: r for r in out["Summary"]}
    return dict(out)


def _hide_layer_contents(tmp: Path) -> None:
    """Replace every layer directory of the vfs store by an empty one: what reads a layer's files now sees
    nothing (root reads past permissions, so making them unreadable would prove nothing here)."""
    base = tmp / "root" / "vfs" / "dir"
    for d in base.iterdir():
        d.rename(tmp / f"aside-{d.name}")
        d.mkdir()


# -- system df ------------------------------------------------------------------------------------------
def test_df_counts_images_shared_and_unique_from_the_records(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        base = svc.register_layer(io.BytesIO(TarBuilder().file("base", b"b" * 5000).build()))
        one = _import(svc, "one:1", b"1" * 1000)
        two = _import(svc, None, b"2" * 2000)
        used = _import(svc, "used:1", b"3" * 3000)
        svc.create_container("used:1", name="c")
        sizes = {s.id: s.size for s in svc.images()}
        assert sizes == {one: 1000, two: 2000, used: 3000}
        # the summary alone (df's table, info) comes from aggregate queries: the same figures
        assert svc.usage_summary().rows == svc.disk_usage().rows
    df = _df(tmp_path)
    rows = df["rows"]
    assert rows["Images"] == {"Type": "Images", "TotalCount": 3, "Active": 1, "Size": 6000, "Reclaimable": 3000}
    assert rows["Containers"]["TotalCount"] == 1 and rows["Containers"]["Size"] is None  # not measured
    # the layer add holds a layer no image uses: the layers' own reclaimable
    assert rows["Layers"]["TotalCount"] == 5  # three images, the layer add's, the container's init layer
    assert rows["Layers"]["Size"] == 11000 and rows["Layers"]["Reclaimable"] == 5000
    # three configs (imports keep no manifest), one of them needed by the container's image
    assert rows["Content"]["TotalCount"] == 3 and rows["Content"]["Active"] == 1
    config_bytes = sum((tmp_path / "root" / "content" / "blobs" / "sha256" / i[7:]).stat().st_size
                       for i in (one, two, used))
    assert rows["Content"]["Size"] == config_bytes
    assert df["Total"] == rows["Layers"]["Size"] + rows["Content"]["Size"]
    by_id = {i["Id"]: i for i in df["Images"]}
    assert by_id[used]["Containers"] == 1 and by_id[one]["UniqueSize"] == 1000
    # the figures do not come from the layers' files
    _hide_layer_contents(tmp_path)
    again = _df(tmp_path)
    assert again["Summary"] == df["Summary"] and again["Images"] == df["Images"]
    info = json.loads(lamina_cli("--driver", "vfs", "--format", "json", "info", root=tmp_path).stdout)
    assert info["disk_usage"] == df["Total"]
    assert base.chain_id


def test_df_shared_layers_and_read_write_layers_with_verbose(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        parent = _import(svc, "parent:1", b"p" * 4000)
        c = svc.create_container("parent:1", name="w")
        with svc.perform_with_base_fs(c.id) as root:
            Path(root, "new").write_bytes(b"n" * 700)
        child = svc.commit_image(c.id, "child:1").id
        svc.remove_container(c.id)
        svc.create_container("child:1", name="w2")
        usage = svc.disk_usage(verbose=True)
        assert [c.size_rw for c in usage.containers] == [0]
        with svc.perform_with_base_fs("w2") as root:
            Path(root, "more").write_bytes(b"m" * 300)
        usage = svc.disk_usage(verbose=True)
        assert svc.usage_summary().rows == svc.disk_usage().rows  # a shared layer, a container on the child
        svc.create_container("parent:1", name="w3")
        assert svc.usage_summary().rows == svc.disk_usage().rows
    by_id = {i.id: i for i in usage.images}
    assert by_id[parent].size == 4000 and by_id[parent].shared_size == 4000 and by_id[parent].unique_size == 0
    assert by_id[child].size == 4700 and by_id[child].shared_size == 4000 and by_id[child].unique_size == 700
    assert [c.size_rw for c in usage.containers] == [300]
    rows = {r.kind: r for r in usage.rows}
    assert rows["Images"].size == 4700 and rows["Images"].reclaimable == 0  # the container needs both
    assert rows["Containers"].size == 300 and rows["Containers"].reclaimable == 300
    out = lamina_cli("--driver", "vfs", "system", "df", "-v", root=tmp_path).stdout.decode()
    assert "UNIQUE SIZE" in out and "child" in out and "300B" in out


def test_df_and_info_stay_flat_with_a_thousand_images(tmp_path: Path, debian_image_oci: ImageFacts) -> None:
    """``system df`` and ``info`` on the Debian image and 1,000 small ones: the figures hold after the
    layers' contents are hidden, and the commands take at most twice their time on a 10-image store."""
    small, big = tmp_path / "small", tmp_path / "big"
    for store, count in ((small, 10), (big, 1000)):
        with _open(store) as svc:
            if store == big:
                svc.load_image(debian_image_oci.path)
            for i in range(count):
                _import(svc, f"img{i}:1", str(i).encode())

    def timed(store: Path, verb: tuple[str, ...]) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            lamina_cli("--driver", "vfs", "--format", "json", *verb, root=store)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    before = _df(big)
    assert before["rows"]["Images"]["TotalCount"] == 1001
    assert before["rows"]["Images"]["Size"] > 50_000_000  # the Debian layer counts, by its record
    _hide_layer_contents(big)
    assert _df(big)["Summary"] == before["Summary"]
    for verb in (("system", "df"), ("info",)):
        ratio = timed(big, verb) / timed(small, verb)
        assert ratio <= 2.0, f"{' '.join(verb)}: {ratio:.2f}x the time on a 10-image store"


# -- image prune ----------------------------------------------------------------------------------------
def test_image_prune_removes_dangling_then_unused_and_reports_what_df_loses(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        dangling = _import(svc, None, b"d" * 1500)
        tagged = _import(svc, "tagged:1", b"t" * 2500)
        used = _import(svc, None, b"u" * 3500)
        svc.create_container(used, name="keeps")
    before = _df(tmp_path)["Total"]
    out = json.loads(lamina_cli("--driver", "vfs", "--format", "json", "image", "prune", root=tmp_path).stdout)
    assert out["ImagesDeleted"] == [{"Deleted": dangling}]
    after = _df(tmp_path)["Total"]
    assert out["SpaceReclaimed"] == before - after and out["SpaceReclaimed"] >= 1500
    text = lamina_cli("--driver", "vfs", "image", "prune", "-a", root=tmp_path).stdout.decode()
    assert "untagged: tagged:1" in text and f"deleted: {tagged}" in text
    lost = after - _df(tmp_path)["Total"]
    assert 2500 < lost < 3000 and f"Total reclaimed space: {human(lost)}" in text  # the layer and the config
    with _open(tmp_path) as svc:
        assert [s.id for s in svc.images()] == [used]  # a container uses it
        report = svc.images_prune({"dangling": ["false"]})
        assert report.deleted == [] and report.reclaimed == 0


def test_image_prune_of_a_committed_chain_takes_the_untagged_parents(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        base = _import(svc, None, b"b")
        c = svc.create_container(base)
        mid = svc.commit_image(c.id).id
        svc.remove_container(c.id)
        c = svc.create_container(mid)
        top = svc.commit_image(c.id).id
        svc.remove_container(c.id)
        assert svc.image_store.get(top).parent == mid and svc.image_store.get(mid).parent == base
        report = svc.images_prune()
        assert report.deleted == [{"Deleted": top}, {"Deleted": mid}, {"Deleted": base}]
        assert svc.images(all=True) == [] and svc.layers() == []


def test_image_prune_filters(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        old = _import(svc, "old:1", b"o")
        new = _import(svc, "new:1", b"n")
        labelled = svc.import_image(io.BytesIO(TarBuilder().file("f", b"l").build()), "lab:1",
                                    changes=["LABEL tier=web"]).id
        other = svc.import_image(io.BytesIO(TarBuilder().file("f", b"m").build()), "lab:2",
                                 changes=["LABEL tier=db"]).id
        db = sqlite3.connect(tmp_path / "root" / "lamina.db")
        with db:  # created a day ago: until is about when the image was created
            db.execute("UPDATE images SET created=? WHERE id=?", (time.time() - 86400, old))
        db.close()
        report = svc.images_prune({"dangling": ["false"], "until": ["12h"]})
        assert report.deleted == [{"Untagged": "old:1"}, {"Deleted": old}]
        report = svc.images_prune({"dangling": ["false"], "label": ["tier=web"]})
        assert [e for e in report.deleted if "Deleted" in e] == [{"Deleted": labelled}]
        report = svc.images_prune({"dangling": ["false"], "label!": ["tier"]})
        assert [e for e in report.deleted if "Deleted" in e] == [{"Deleted": new}]
        assert [s.id for s in svc.images()] == [other]
        with pytest.raises(ImageError, match="prune filters are"):
            svc.images_prune({"reference": ["x"]})
        with pytest.raises(BadTime, match="invalid"):
            svc.images_prune({"until": ["yesterday"]})
    err = lamina_cli("--driver", "vfs", "image", "prune", "--filter", "until=soon", root=tmp_path, check=False)
    assert err.returncode != 0 and err.stderr.decode().count("\n") == 1 and b"Traceback" not in err.stderr


def test_prune_leaves_an_image_tagged_after_it_was_chosen(tmp_path: Path) -> None:
    """The transaction that deletes an image checks its names again: one tagged meanwhile stays."""
    with _open(tmp_path) as svc:
        image_id = _import(svc, None, b"x")
        rec = svc.image_store.get(image_id)
        svc.tag_image(image_id, "late:1")
        assert svc.image_store.delete(image_id, names_seen=rec.names) is None
        assert svc.get_image("late:1").id == image_id


# -- system prune ---------------------------------------------------------------------------------------
def test_system_prune_removes_stopped_containers_then_images_then_what_nothing_references(
        tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        img = _import(svc, "app:1", b"a" * 1000)
        c = svc.create_container("app:1", name="stopped")
        with svc.perform_with_base_fs(c.id) as root:
            Path(root, "scratch").write_bytes(b"s" * 400)
        orphan = svc.image_store.content
        stray = b"not needed by any image"
        import hashlib

        digest = "sha256:" + hashlib.sha256(stray).hexdigest()
        orphan.put(stray, digest)
        orphan.partial.mkdir()
        cut = "sha256:" + "ab" * 32
        (orphan.partial / cut.replace(":", "-")).write_bytes(b"p" * 100)  # a download killed mid-way
        before = svc.disk_usage().total
    out = json.loads(lamina_cli("--driver", "vfs", "--format", "json", "system", "prune", "-a",
                                root=tmp_path).stdout)
    assert out["ContainersDeleted"] == [c.id]
    assert {"Deleted": img} in out["ImagesDeleted"] and digest in out["BlobsDeleted"]
    # the read-write layer's 400 bytes, the image's recorded bytes, the stray blob and the partial download
    assert out["PartialDownloadsDeleted"] == [cut]
    assert out["SpaceReclaimed"] == 400 + before + len(stray) + 100
    with _open(tmp_path) as svc:
        assert svc.containers() == [] and svc.images() == [] and svc.layers() == []
        assert not svc.image_store.content.exists(digest)


# -- last use -------------------------------------------------------------------------------------------
def test_last_use_is_recorded_for_images_and_their_layers(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        img = _import(svc, "app:1", b"a")
        first = svc.inspect_image(img)["LastUsed"]
        time.sleep(0.02)
        svc.create_container("app:1")
        used = svc.inspect_image(img)["LastUsed"]
        assert used > first
        layer_used = svc.store.db.one("SELECT last_used FROM layers WHERE chain_id=?", (svc.get_image(img).chain[-1],))
        assert layer_used[0] >= used
        time.sleep(0.02)
        svc.export_image(["app:1"], tmp_path / "out.tar")
        assert svc.inspect_image(img)["LastUsed"] > used


def test_a_version_3_store_gains_the_new_columns(tmp_path: Path) -> None:
    with _open(tmp_path) as svc:
        img = _import(svc, "app:1", b"a" * 100)
        total = svc.disk_usage().total
    db = sqlite3.connect(tmp_path / "root" / "lamina.db")
    with db:
        db.execute("DROP INDEX image_blobs_sizes")  # (version 5's)
        db.execute("ALTER TABLE images DROP COLUMN last_used")
        db.execute("ALTER TABLE layers DROP COLUMN last_used")
        db.execute("ALTER TABLE image_blobs DROP COLUMN size")
        db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.close()
    with _open(tmp_path) as svc:
        assert svc.store.db.get_meta("schema") == str(SCHEMA_VERSION)
        assert svc.disk_usage().total == total  # blob sizes not recorded yet are read from the files
        assert svc.usage_summary().rows == svc.disk_usage().rows
        assert svc.layer_disk_usage() == total
        assert svc.inspect_image(img)["LastUsed"] == svc.image_store.get(img).loaded


def test_time_values() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("1.5s") == 1.5 and parse_duration("250ms") == 0.25
    assert parse_time("10m", now=1000.0) == 400.0
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2026-12-01T00:00:00Z") == 1796083200.0
    assert parse_time("2026-12-01T01:00:00+01:00") == 1796083200.0
    assert abs(parse_time("2026-12-01") - time.mktime((2026, 12, 1, 0, 0, 0, 0, 0, -1))) < 1
    for bad in ("", "10", "-1h", "1d", "soon", "2026-13-01"):
        if bad == "10":
            assert parse_time(bad) == 10.0  # a Unix time
            continue
        with pytest.raises(BadTime):
            parse_time(bad)

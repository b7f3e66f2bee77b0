"""What keeps a large store fast, held structurally (issue 16; the timings are bench/scale.py's): listings and
totals read no file per image or layer, every lookup of the image and container verbs uses an index, and
the helpers that replaced per-row work give the same results as the code they stand in for."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from lamina import ImageService
from lamina.cli.app import json_text
from lamina.config import Config
from lamina.formats.reference import familiar_stored, parse_normalized
from lamina.store.db import SCHEMA_VERSION

_OPENS: list[str] = []
_WATCH: list[str] = []  # the directory whose opens are recorded, while a block of _opens_under runs


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(_WATCH[0]):
            _OPENS.append(path)


sys.addaudithook(_audit)  # (audit hooks stay for the process: this one records only inside _opens_under)


@contextmanager
def _opens_under(root: Path) -> Iterator[list[str]]:
    """The files opened under ``root`` in the block (the store's databases aside, which stay open)."""
    _OPENS.clear()
    _WATCH.append(str(root))
    got: list[str] = []
    try:
        yield got
    finally:
        _WATCH.clear()
        got.extend(p for p in _OPENS if not re.search(r"\.db(-wal|-shm)?$", p))


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _archive(path: Path, count: int, start: int = 0) -> None:
    """A docker-archive of ``count`` images of two layers each, with a label; every fourth also has a digest name
    stored later, every tenth no name."""
    members: dict[str, bytes] = {}
    manifest = []
    for i in range(start, start + count):
        layers = [_tar({f"{k}": f"{i} {k}\n".encode()}) for k in ("base", "top")]
        diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                             "config": {"Labels": {"n": str(i)}}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
                             "history": [{"created_by": k} for k in ("base", "top")]}).encode()
        cname = hashlib.sha256(config).hexdigest() + ".json"
        members[cname] = config
        names = []
        for t in layers:
            members[hashlib.sha256(t).hexdigest() + "/layer.tar"] = t
            names.append(hashlib.sha256(t).hexdigest() + "/layer.tar")
        manifest.append({"Config": cname, "RepoTags": [] if i % 10 == 9 else [f"example.com/app{i}:1"],
                         "Layers": names})
    members["manifest.json"] = json.dumps(manifest).encode()
    path.write_bytes(_tar(members))


def _store(tmp: Path, name: str, count: int) -> Config:
    config = Config(root=tmp / name / "root", runroot=tmp / name / "run", driver="vfs")
    with ImageService.open(config) as svc:
        _archive(tmp / f"{name}.tar", count)
        svc.load_image(tmp / f"{name}.tar")
        svc.create_container("example.com/app0:1", name="c")
    return config


def _cli(config: Config, *args: str) -> str:
    from lamina.cli.entry import cli  # (with every command registered)

    r = CliRunner().invoke(cli, ["--root", str(config.root), "--runroot", str(config.runroot), "--driver", "vfs",
                                 *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_listings_and_totals_read_no_file_per_image(tmp_path: Path) -> None:
    """``images``, ``layers``, ``system df`` and ``info`` open the same files (none of an image's or a layer's)
    on a store of 3 images and one of 200: they come from the database alone."""
    opened: dict[int, list[str]] = {}
    for count in (3, 200):
        config = _store(tmp_path, f"s{count}", count)
        with ImageService.open(config) as svc, _opens_under(tmp_path) as got:
            listed = svc.images()
            assert len(svc.layers()) == 2 * count + 1  # and the container's init layer
            svc.usage_summary()
            assert len(svc.images(filters={"label": ["n=1"]})) == 1
        assert sorted(int(s.labels["n"]) for s in listed) == list(range(count))
        assert {s.layers for s in listed} == {2} and {s.size for s in listed} >= {13}
        assert got == [], f"opened: {got[:5]}"
        with _opens_under(tmp_path) as got:
            for args in (["images"], ["images", "--format", "json"], ["layers", "--format", "json"],
                         ["system", "df"], ["info"]):
                _cli(config, *args)
        opened[count] = got
    assert len(opened[200]) == len(opened[3]), opened[200][:10]
    assert not [p for p in opened[200] if "/content/" in p or "/vfs/" in p]


# The tables that grow with the store (leases and mount references hold what operations running now use, and
# are read whole, as they may be)
_TABLES = {"images", "layers", "image_names", "image_manifests", "image_blobs", "containers", "events"}


def _full_scans(conns: list[sqlite3.Connection], sql: str) -> list[str]:
    """The tables ``sql`` reads in full (SQLite's plan says SCAN of a table, not of a WITH query)."""
    aliases = {m[1] or m[0]: m[0] for m in re.findall(r"(?:FROM|JOIN)\s+(\w+)(?:\s+(?:AS\s+)?(?!ON\b|WHERE\b)(\w+))?",
                                                       sql, re.IGNORECASE)}
    for conn in conns:
        try:
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        except sqlite3.Error:  # a statement of the other database
            continue
        partial = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND sql LIKE '% WHERE %'")}
        scans = [re.match(r"SCAN (\w+)(?: USING (?:COVERING )?INDEX (\w+))?", row[3]) for row in plan]
        return [m[1] for m in scans if m and aliases.get(m[1], m[1]) in _TABLES and m[2] not in partial]
    return []


# The one full read left in every command: recovery's search for layers nothing holds (a process killed between
# dropping a layer's last reference and removing it leaves one); about 13 ms per 20,000 layers (issue 16).
_KNOWN_SCANS = ("SELECT id FROM layers l WHERE state='committed' AND rw=0 AND refs=0",)


def test_every_lookup_of_the_image_and_container_verbs_uses_an_index(tmp_path: Path) -> None:
    config = _store(tmp_path, "s", 30)
    _archive(tmp_path / "more.tar", 1, start=1000)
    statements: dict[str, str] = {}
    with ImageService.open(config) as svc:
        doing = [""]

        def trace(sql: str) -> None:
            statements.setdefault(sql, doing[0])

        db = svc.store.db
        for conn in (db.db, db.mdb):
            conn.set_trace_callback(trace)
        for doing[0], act in (
            ("open", svc.store.recover),  # what opening the store reads when nothing is unfinished
            ("inspect", lambda: svc.inspect_image("example.com/app5:1")),
            ("tag", lambda: svc.tag_image("example.com/app5:1", "example.com/other:2")),
            ("untag", lambda: svc.untag_image("example.com/app5:1", "example.com/other:2")),
            ("create", lambda: svc.create_container("example.com/app5:1", name="web")),
            ("rm", lambda: svc.remove_container("web")),
            ("load", lambda: svc.load_image(tmp_path / "more.tar")),
            ("rmi", lambda: svc.image_delete("example.com/app1000:1")),
        ):
            act()
        for conn in (db.db, db.mdb):
            conn.set_trace_callback(None)
        scans = {sql: (verb, found) for sql, verb in statements.items()
                 if sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "DELETE", "INSERT"))
                 and not sql.lstrip().startswith(_KNOWN_SCANS) and (found := _full_scans([db.db, db.mdb], sql))}
    assert len(statements) > 20
    assert not scans, "\n".join(f"{verb}: {sql[:200]} -> {found}" for sql, (verb, found) in scans.items())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json_values)
def test_json_text_is_json_dumps(value: Any) -> None:
    assert json_text(value) == json.dumps(value, indent=2, sort_keys=True)
    rows = [{"Id": "x", "Created": 1.5, "Labels": value, "Tags": [value]}, {"a": None, "b": True}]
    assert json_text(rows) == json.dumps(rows, indent=2, sort_keys=True)


def test_json_text_leaves_other_values_to_json_dumps() -> None:
    class Size(int):
        pass

    for value in ({"a": Size(3)}, {1: "a"}, ("x", float("nan"), float("-inf"))):
        assert json_text(value) == json.dumps(value, indent=2, sort_keys=True)


def test_familiar_stored_is_the_parsed_familiar_name() -> None:
    names = ["busybox", "busybox:1", "library/busybox:latest", "user/app:2", "docker.io/user/app", "index.docker.io/x",
             "example.com/a/b:3", "localhost/app:1", "localhost:5000/app", "registry:5000/x/y:z",
             "docker.io/library/" + "a" * 64 + ":1", "docker.io/example.com/x:1",
             "busybox@sha256:" + "1" * 64, "quay.io/x/y:1@sha256:" + "2" * 64]
    for n in names:
        stored = str(parse_normalized(n))
        assert familiar_stored(stored) == parse_normalized(stored).familiar(), n


def test_a_version_4_store_gets_its_labels_recorded(tmp_path: Path) -> None:
    config = _store(tmp_path, "s", 3)
    db = sqlite3.connect(config.root / "lamina.db")
    with db:
        db.execute("ALTER TABLE images DROP COLUMN labels")
        db.execute("UPDATE meta SET value='4' WHERE key='schema'")
    db.close()
    from lamina.store.kernel import Store

    store = Store(config)  # migrated by the store alone (killed before the image layer's turn, say)
    try:
        assert store.db.get_meta("schema") == str(SCHEMA_VERSION) and store.db.get_meta("labels_pending") == "1"
        assert {r[0] for r in store.db.query("SELECT labels FROM images")} == {None}
    finally:
        store.close()
    with ImageService.open(config) as svc:  # the labels are recorded now, once
        assert svc.store.db.get_meta("labels_pending") is None and not svc.store.db.labels_pending
        assert {r[0] for r in svc.store.db.query("SELECT labels FROM images")} == {
            '{"n": "0"}', '{"n": "1"}', '{"n": "2"}'}
        with _opens_under(tmp_path) as got:
            assert sorted(s.labels["n"] for s in svc.images()) == ["0", "1", "2"]
    assert got == []


def test_unreadable_recorded_labels_fall_back_to_the_config_and_are_recorded_again(tmp_path: Path) -> None:
    config = _store(tmp_path, "s", 2)
    db = sqlite3.connect(config.root / "lamina.db")
    with db:
        db.execute("UPDATE images SET labels='{not json'")
    db.close()
    with ImageService.open(config) as svc:
        assert sorted(s.labels["n"] for s in svc.images()) == ["0", "1"]
        with svc.store.db.tx() as tx:
            tx.execute("UPDATE images SET labels=NULL")
        svc.load_image(tmp_path / "s.tar")  # the same images again: their labels are recorded now
        assert {r[0] for r in svc.store.db.query("SELECT labels FROM images")} == {'{"n": "0"}', '{"n": "1"}'}

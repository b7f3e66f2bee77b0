"""The image store: images, their names and manifests, in the store database beside the layers.

An image is its config, stored byte-exact in the content store; its ID is the config's sha256 digest.
The config's ``rootfs.diff_ids`` give the layer chain, and an image holds one reference on its top
layer (ChainID), which keeps every layer below it alive. Names are full normalized references, either
tagged (``docker.io/library/busybox:latest``) or digested (``docker.io/library/busybox@sha256:...``);
a name belongs to at most one image, so tagging moves it. Each image records the manifests it was
loaded with (digest and media type) and every blob it needs (``image_blobs``), which is what keeps
blobs out of the content store's garbage collection.

Creating an image is one transaction: the image row, its names, manifests and blob references, the
reference on its top layer, and the end of the loading process's layer and blob leases.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lamina.digest import ChainID, DiffID, chain_ids, parse_digest
from lamina.errors import AmbiguousImage, ImageNotFound, InvalidReference
from lamina.store.content import ContentStore
from lamina.store.layers import LayerStore, _owner_alive

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    top_layer TEXT,
    parent TEXT,
    created REAL,
    loaded REAL NOT NULL,
    last_updated REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS images_parent ON images(parent);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    added REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS image_names_image ON image_names(image_id);
CREATE TABLE IF NOT EXISTS image_manifests (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    added REAL NOT NULL,
    PRIMARY KEY (image_id, digest)
);
CREATE TABLE IF NOT EXISTS image_blobs (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (image_id, digest)
);
CREATE INDEX IF NOT EXISTS image_blobs_digest ON image_blobs(digest);
CREATE TABLE IF NOT EXISTS content_leases (
    digest TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start REAL,
    PRIMARY KEY (digest, owner_pid)
);
"""


@dataclass(frozen=True)
class ManifestRecord:
    digest: str
    media_type: str


@dataclass(frozen=True)
class ImageRecord:
    id: str
    top_layer: ChainID | None
    parent: str | None
    created: float | None
    loaded: float
    last_updated: float
    origin: str
    names: tuple[str, ...] = ()
    manifests: tuple[ManifestRecord, ...] = field(default=())

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if "@" not in n)

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if "@" in n)


@dataclass
class NewImage:
    """Everything one transaction needs to create (or update) an image."""

    id: str
    diff_ids: Sequence[DiffID]
    created: float | None
    origin: str
    names: Sequence[str] = ()
    manifests: Sequence[ManifestRecord] = ()
    blobs: Iterable[str] = ()
    parent: str | None = None


class ImageStore:
    def __init__(self, layers: LayerStore) -> None:
        self.layers = layers
        self._db = layers._db
        self.content = ContentStore(layers.root)
        with layers._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        self.recover()

    # -- recovery and garbage collection ----------------------------------------------------------------
    def recover(self) -> None:
        rows = self._db.execute("SELECT DISTINCT owner_pid, owner_start FROM content_leases").fetchall()
        dead = [pid for pid, start in rows if not _owner_alive(pid, start)]
        if dead:
            with self.layers._tx() as db:
                for pid in dead:
                    db.execute("DELETE FROM content_leases WHERE owner_pid=?", (pid,))
            self.gc()
        self.content.clean_ingest(lambda pid: _owner_alive(pid, None))

    def lease_blob(self, digest: str) -> None:
        """Protect a blob this process is about to write from garbage collection until its image commits."""
        me = self.layers._me
        with self.layers._tx() as db:
            db.execute("INSERT OR IGNORE INTO content_leases VALUES (?, ?, ?)", (digest, me[0], me[1]))

    def end_blob_leases(self, db: sqlite3.Connection) -> None:
        db.execute("DELETE FROM content_leases WHERE owner_pid=?", (self.layers._me[0],))

    def gc(self) -> list[str]:
        """Remove blobs no image refers to and no live process leases.

        The blob files are listed first, then the live set is read and the dead files unlinked inside one
        write transaction, so a process that leases a blob (a write transaction too) and then writes it
        cannot lose it to a collection running at the same time.
        """
        files = list(self.content.walk())
        with self.layers._tx() as db:
            alive = {r[0] for r in db.execute("SELECT digest FROM image_blobs")}
            alive |= {r[0] for r in db.execute("SELECT digest FROM content_leases")}
            return self.content.gc(alive, files)

    def abandon(self) -> None:
        """After a failed load: drop this process's leases and whatever only they kept."""
        with self.layers._tx() as db:
            self.end_blob_leases(db)
        self.layers.end_leases()
        self.gc()

    # -- queries ----------------------------------------------------------------------------------------
    _COLS = "id, top_layer, parent, created, loaded, last_updated, origin"

    def _record(self, row: tuple[Any, ...]) -> ImageRecord:
        iid = row[0]
        names = tuple(r[0] for r in self._db.execute(
            "SELECT name FROM image_names WHERE image_id=? ORDER BY added, name", (iid,)
        ))
        manifests = tuple(ManifestRecord(r[0], r[1]) for r in self._db.execute(
            "SELECT digest, media_type FROM image_manifests WHERE image_id=? ORDER BY added, digest", (iid,)
        ))
        return ImageRecord(
            iid, ChainID(row[1]) if row[1] else None, row[2], row[3], row[4], row[5], row[6], names, manifests
        )

    def get(self, image_id: str) -> ImageRecord:
        row = self._db.execute(f"SELECT {self._COLS} FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            raise ImageNotFound(f"image {image_id} not found")
        return self._record(row)

    def exists(self, image_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is not None

    def all(self) -> list[ImageRecord]:
        return [self._record(r) for r in self._db.execute(f"SELECT {self._COLS} FROM images ORDER BY loaded")]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def by_name(self, name: str) -> ImageRecord | None:
        row = self._db.execute("SELECT image_id FROM image_names WHERE name=?", (name,)).fetchone()
        return self.get(row[0]) if row else None

    def by_prefix(self, prefix: str) -> ImageRecord | None:
        """An image by a hex prefix of its ID; :class:`AmbiguousImage` lists the candidates."""
        rows = self._db.execute(
            "SELECT id FROM images WHERE id LIKE ? ORDER BY id LIMIT 11", (f"sha256:{prefix}%",)
        ).fetchall()
        if not rows:
            return None
        if len(rows) > 1:
            shown = ", ".join(r[0].split(":")[1][:12] for r in rows[:10])
            raise AmbiguousImage(f"image ID prefix {prefix!r} is ambiguous: it matches {shown}")
        return self.get(rows[0][0])

    def by_manifest(self, digest: str) -> list[ImageRecord]:
        rows = self._db.execute("SELECT DISTINCT image_id FROM image_manifests WHERE digest=?", (digest,))
        return [self.get(r[0]) for r in rows.fetchall()]

    def heads(self) -> list[str]:
        """Images no other image names as its parent (Docker's image store Heads)."""
        return [r[0] for r in self._db.execute(
            "SELECT id FROM images i WHERE NOT EXISTS (SELECT 1 FROM images c WHERE c.parent=i.id) ORDER BY loaded"
        )]

    def children(self, image_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM images WHERE parent=? ORDER BY loaded", (image_id,))]

    def images_on(self, chain: str) -> list[str]:
        """The images whose top layer is ``chain`` (each holds one reference on it)."""
        return [r[0] for r in self._db.execute("SELECT id FROM images WHERE top_layer=?", (chain,))]

    def blobs(self, image_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT digest FROM image_blobs WHERE image_id=?", (image_id,))]

    def config_bytes(self, image_id: str) -> bytes:
        return self.content.read(image_id)

    # -- changes ----------------------------------------------------------------------------------------
    def create(self, new: NewImage) -> tuple[ImageRecord, list[str]]:
        """Commit an image (or add names/manifests to an existing one) in one transaction.

        Returns the record and the names that moved here from other images.
        """
        parse_digest(new.id)
        chains = chain_ids(new.diff_ids)
        top = chains[-1] if chains else None
        now = time.time()
        moved: list[str] = []
        with self.layers._tx() as db:
            exists = db.execute("SELECT 1 FROM images WHERE id=?", (new.id,)).fetchone() is not None
            if not exists:
                if top is not None:
                    self.layers.reference(db, top)
                db.execute(
                    "INSERT INTO images (id, top_layer, parent, created, loaded, last_updated, origin)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (new.id, top, new.parent, new.created, now, now, new.origin),
                )
                db.execute("INSERT OR IGNORE INTO image_blobs VALUES (?, ?)", (new.id, new.id))
            else:
                db.execute("UPDATE images SET last_updated=? WHERE id=?", (now, new.id))
            for m in new.manifests:
                db.execute(
                    "INSERT OR IGNORE INTO image_manifests VALUES (?, ?, ?, ?)", (new.id, m.digest, m.media_type, now)
                )
            for b in new.blobs:
                db.execute("INSERT OR IGNORE INTO image_blobs VALUES (?, ?)", (new.id, b))
            for name in new.names:
                if self._set_name(db, name, new.id, now):
                    moved.append(name)
            self.end_blob_leases(db)
            leased = self.layers.clear_leases(db)
        self.layers.collect(leased)
        return self.get(new.id), moved

    def _set_name(self, db: sqlite3.Connection, name: str, image_id: str, now: float) -> bool:
        row = db.execute("SELECT image_id FROM image_names WHERE name=?", (name,)).fetchone()
        if row is not None and row[0] == image_id:
            return False
        db.execute(
            "INSERT INTO image_names VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET image_id=excluded.image_id,"
            " added=excluded.added",
            (name, image_id, now),
        )
        db.execute("UPDATE images SET last_updated=? WHERE id=?", (now, image_id))
        return row is not None

    def add_manifest(self, image_id: str, manifest: ManifestRecord, blobs: Iterable[str]) -> bool:
        """Record another manifest (and the blobs it needs) for an existing image; False if the image is gone."""
        with self.layers._tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                return False
            db.execute(
                "INSERT OR IGNORE INTO image_manifests VALUES (?, ?, ?, ?)",
                (image_id, manifest.digest, manifest.media_type, time.time()),
            )
            for b in blobs:
                db.execute("INSERT OR IGNORE INTO image_blobs VALUES (?, ?)", (image_id, b))
            self.end_blob_leases(db)
            return True

    def add_name(self, image_id: str, name: str) -> bool:
        """Give ``image_id`` the name ``name`` (moving it from another image); True when it moved."""
        with self.layers._tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                raise ImageNotFound(f"image {image_id} not found")
            return self._set_name(db, name, image_id, time.time())

    def remove_name(self, name: str) -> str:
        """Remove a name; returns the image it belonged to."""
        with self.layers._tx() as db:
            row = db.execute("SELECT image_id FROM image_names WHERE name=?", (name,)).fetchone()
            if row is None:
                raise InvalidReference(f"no image is named {name}")
            db.execute("DELETE FROM image_names WHERE name=?", (name,))
            db.execute("UPDATE images SET last_updated=? WHERE id=?", (time.time(), row[0]))
            return str(row[0])

    def delete(self, image_id: str) -> list[ChainID]:
        """Remove an image row with its names, manifests and blob references; release its layers.

        Returns the layers removed as a result. Callers decide about conflicts first.
        """
        with self.layers._tx() as db:
            row = db.execute("SELECT top_layer FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                raise ImageNotFound(f"image {image_id} not found")
            db.execute("UPDATE images SET parent=NULL WHERE parent=?", (image_id,))
            db.execute("DELETE FROM images WHERE id=?", (image_id,))
            top = self.layers.unreference(db, row[0]) if row[0] else None
        removed = self.layers.collect([top]) if top else []
        self.gc()
        return removed

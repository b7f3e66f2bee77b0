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

import json
import json.scanner
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from lamina.digest import ChainID, DiffID, chain_ids, parse_digest
from lamina.errors import AmbiguousImage, ImageConflict, ImageNotFound, InvalidReference
from lamina.store.content import ContentStore
from lamina.store.db import owner_alive

if TYPE_CHECKING:
    from lamina.store.kernel import Store
    from lamina.store.leases import Lease


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
    last_used: float | None = None  # a container was made from it, or it was saved, pushed or stored again
    labels: dict[str, str] | None = None  # its config's labels as recorded; None: not recorded (read the config)

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if "@" not in n)

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if "@" in n)


class ListedImage(NamedTuple):
    """An image as a listing needs it (:meth:`ImageStore.listing`)."""

    id: str
    top_layer: ChainID | None
    parent: str | None
    created: float  # the config's ``created``, else when the image was stored (``created_time``)
    names: list[str]
    labels: dict[str, str] | None  # None: not recorded (read the config)


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
    labels: Mapping[str, str] | None = None  # its config's labels, recorded for listings (None: not known)


class ImageStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.layers = store.layers
        self.content = ContentStore(store.image_root or store.root, read_only=store.read_only)
        if not store.db.labels_recorded:  # an additional image store of schema 4: its configs say
            self._COLS = self._COLS.replace("labels", "NULL AS labels")
            self._labels = "NULL"
        if store.recovers:  # (system check opens without recovery: it reports partial writes instead)
            self.content.clean_ingest(lambda pid: owner_alive(pid, None))

    # -- leases and garbage collection ----------------------------------------------------------------
    def lease_image(self, lease: Lease, image_id: str) -> ImageRecord:
        """Hold an image's blobs and layers in ``lease`` (for a save or push that reads them while another
        process may delete the image); :class:`ImageNotFound` if it is gone."""
        with self.db.tx() as db:
            row = db.execute("SELECT top_layer FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None:
                raise ImageNotFound(f"image {image_id} not found")
            for (digest,) in db.execute("SELECT digest FROM image_blobs WHERE image_id=?", (image_id,)).fetchall():
                lease.add_blob(db, digest)
            if row[0]:
                top = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (row[0],)).fetchone()
                if top is not None:
                    lease.add_layer(db, top[0])
        return self.get(image_id)

    def gc(self, ignoring: Collection[str] = (), candidates: Collection[str] | None = None) -> list[str]:
        """Remove blobs no image refers to and no lease holds (but the leases ``ignoring``, which are being
        ended: :func:`~lamina.store.leases.end_leases`); only those of ``candidates`` when given (the blobs
        of the leases being ended: an indexed lookup each, not a walk of the content store).

        The blob files are listed first, then the live set is read and the dead files unlinked inside one
        write transaction, so a process that leases a blob (a write transaction too) and then writes it
        cannot lose it to a collection running at the same time.
        """
        if candidates is not None:
            marks = ",".join("?" * len(ignoring))
            with self.db.tx() as db:
                dead = [d for d in candidates if db.execute(
                    "SELECT 1 FROM image_blobs WHERE digest=? UNION ALL SELECT 1 FROM lease_blobs WHERE digest=?"
                    f" AND lease NOT IN ({marks}) LIMIT 1", (d, d, *ignoring)).fetchone() is None]
                return self.content.gc((), dead)
        files = list(self.content.walk())
        with self.db.tx() as db:
            alive = {r[0] for r in db.execute("SELECT digest FROM image_blobs")}
            alive |= {r[1] for r in db.execute("SELECT lease, digest FROM lease_blobs") if r[0] not in ignoring}
            return self.content.gc(alive, files)

    def unreferenced_blobs(self) -> dict[str, int]:
        """The blobs in the content store that no image names (a lease may hold them), with their sizes."""
        named = {r[0] for r in self.db.query("SELECT DISTINCT digest FROM image_blobs")}
        out: dict[str, int] = {}
        for d in self.content.walk():  # (a file whose name is no digest has no size: system check reports it)
            if d not in named and (size := self.content.stored_size(d)) is not None:
                out[str(d)] = size
        return out

    # -- queries ----------------------------------------------------------------------------------------
    _COLS = "id, top_layer, parent, created, loaded, last_updated, origin, last_used, labels"
    _labels = "labels"

    def _record(self, row: tuple[Any, ...]) -> ImageRecord:
        iid = row[0]
        names = tuple(r[0] for r in self.db.query(
            "SELECT name FROM image_names WHERE image_id=? ORDER BY added, name", (iid,)
        ))
        manifests = tuple(ManifestRecord(r[0], r[1]) for r in self.db.query(
            "SELECT digest, media_type FROM image_manifests WHERE image_id=? ORDER BY added, digest", (iid,)
        ))
        return self._make(row, names, manifests)

    @staticmethod
    def _make(row: tuple[Any, ...], names: tuple[str, ...], manifests: tuple[ManifestRecord, ...]) -> ImageRecord:
        return ImageRecord(
            row[0], ChainID(row[1]) if row[1] else None, row[2], row[3], row[4], row[5], row[6], names, manifests,
            last_used=row[7] if row[7] is not None else row[4],  # a store from before version 4: when loaded
            labels=_load_labels(row[8]),  # None before version 5 (not recorded): read from the config
        )

    def get(self, image_id: str) -> ImageRecord:
        row = self.db.one(f"SELECT {self._COLS} FROM images WHERE id=?", (image_id,))
        if row is None:
            raise ImageNotFound(f"image {image_id} not found")
        return self._record(row)

    def exists(self, image_id: str) -> bool:
        return self.db.one("SELECT 1 FROM images WHERE id=?", (image_id,)) is not None

    def all(self) -> list[ImageRecord]:
        """Every image, oldest first: three queries in one snapshot, whatever the number of images."""
        names: dict[str, list[str]] = {}
        manifests: dict[str, list[ManifestRecord]] = {}
        with self.db.read() as db:
            rows = db.execute(f"SELECT {self._COLS} FROM images ORDER BY loaded").fetchall()
            for iid, name in db.execute("SELECT image_id, name FROM image_names ORDER BY added, name"):
                names.setdefault(iid, []).append(name)
            for iid, digest, media_type in db.execute(
                "SELECT image_id, digest, media_type FROM image_manifests ORDER BY added, digest"
            ):
                manifests.setdefault(iid, []).append(ManifestRecord(digest, media_type))
        return [self._make(r, tuple(names.get(r[0], ())), tuple(manifests.get(r[0], ()))) for r in rows]

    def count(self) -> int:
        return int(self.db.one("SELECT COUNT(*) FROM images")[0])

    def listing(self) -> list[ListedImage]:
        """What ``images`` shows of every image, oldest first, in two queries (one snapshot) and without
        making an :class:`ImageRecord` per image."""
        names: dict[str, list[str]] = {}
        with self.db.read() as db:
            rows = db.execute(
                f"SELECT id, top_layer, parent, COALESCE(created, loaded), {self._labels} FROM images ORDER BY loaded"
            ).fetchall()
            for iid, name in db.execute("SELECT image_id, name FROM image_names ORDER BY added, name"):
                names.setdefault(iid, []).append(name)
        return [ListedImage(iid, top, parent, created, names.get(iid, []),
                            _load_labels(labels))
                for iid, top, parent, created, labels in rows]

    def by_name(self, name: str) -> ImageRecord | None:
        row = self.db.one("SELECT image_id FROM image_names WHERE name=?", (name,))
        if row is None:
            return None
        try:
            return self.get(row[0])
        except ImageNotFound:
            return None  # removed between the two reads

    def repository_tags(self, repository: str) -> list[tuple[str, str]]:
        """``(name, image ID)`` of every tag of ``repository`` (``domain/path``), oldest first."""
        prefix = repository + ":"
        return [(r[0], r[1]) for r in self.db.query(
            "SELECT name, image_id FROM image_names WHERE substr(name, 1, ?) = ? AND instr(name, '@') = 0"
            " ORDER BY added, name", (len(prefix), prefix),
        )]

    def by_prefix(self, prefix: str) -> ImageRecord | None:
        """An image by a hex prefix of its ID; :class:`AmbiguousImage` lists the candidates."""
        rows = self.db.query("SELECT id FROM images WHERE id LIKE ? ORDER BY id LIMIT 11", (f"sha256:{prefix}%",))
        if not rows:
            return None
        if len(rows) > 1:
            shown = ", ".join(r[0].split(":")[1][:12] for r in rows[:10])
            raise AmbiguousImage(f"image ID prefix {prefix!r} is ambiguous: it matches {shown}")
        return self.get(rows[0][0])

    def by_manifest(self, digest: str) -> list[ImageRecord]:
        rows = self.db.query("SELECT DISTINCT image_id FROM image_manifests WHERE digest=?", (digest,))
        return [self.get(r[0]) for r in rows]

    def heads(self) -> list[str]:
        """Images no other image names as its parent (Docker's image store Heads)."""
        return [r[0] for r in self.db.query(
            "SELECT id FROM images i WHERE NOT EXISTS (SELECT 1 FROM images c WHERE c.parent=i.id) ORDER BY loaded"
        )]

    def children(self, image_id: str) -> list[str]:
        return [r[0] for r in self.db.query("SELECT id FROM images WHERE parent=? ORDER BY loaded", (image_id,))]

    def roots(self) -> list[str]:
        """Images that name no parent, oldest first (the build cache's candidates on ``scratch``)."""
        return [r[0] for r in self.db.query("SELECT id FROM images WHERE parent IS NULL ORDER BY loaded")]

    def container_counts(self) -> dict[str, int]:
        """How many containers (those ``ps -a`` lists) each image has, by image ID; images without any are absent."""
        return {r[0]: int(r[1]) for r in self.db.query(
            "SELECT image_id, COUNT(*) FROM containers WHERE state='created' GROUP BY image_id"
        )}

    def blobs(self, image_id: str) -> list[str]:
        return [r[0] for r in self.db.query("SELECT digest FROM image_blobs WHERE image_id=?", (image_id,))]

    def config_bytes(self, image_id: str) -> bytes:
        return self.content.read(image_id)

    # -- changes ----------------------------------------------------------------------------------------
    def create(self, new: NewImage, lease: Lease | None = None) -> tuple[ImageRecord, list[str]]:
        """Commit an image (or add names/manifests to an existing one) in one transaction, which also ends
        ``lease`` (the one its layers and blobs were held by while they were written).

        Returns the record and the names that moved here from other images.
        """
        parse_digest(new.id)
        chains = chain_ids(new.diff_ids)
        top = chains[-1] if chains else None
        now = time.time()
        moved: list[str] = []
        leased: list[str] = []
        with self.db.tx() as db:
            exists = db.execute("SELECT 1 FROM images WHERE id=?", (new.id,)).fetchone() is not None
            if not exists:
                if top is not None:
                    self.layers.reference(db, top)
                parent = new.parent
                if parent is not None and db.execute("SELECT 1 FROM images WHERE id=?", (parent,)).fetchone() is None:
                    parent = None  # removed meanwhile: the new image stands on its own layers all the same
                db.execute(
                    "INSERT INTO images (id, top_layer, parent, created, loaded, last_updated, origin, last_used,"
                    " labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (new.id, top, parent, new.created, now, now, new.origin, now, _dump_labels(new.labels)),
                )
                self._add_blob(db, new.id, new.id)
            else:
                db.execute("UPDATE images SET last_updated=?, last_used=? WHERE id=?", (now, now, new.id))
                if new.labels is not None:  # not recorded when the image came (an older lamina's): recorded now
                    db.execute("UPDATE images SET labels=? WHERE id=? AND labels IS NULL",
                               (_dump_labels(new.labels), new.id))
            for m in new.manifests:
                db.execute(
                    "INSERT OR IGNORE INTO image_manifests VALUES (?, ?, ?, ?)", (new.id, m.digest, m.media_type, now)
                )
            for b in new.blobs:
                self._add_blob(db, new.id, b)
            for name in new.names:
                if self._set_name(db, name, new.id, now):
                    moved.append(name)
            if lease is not None:
                leased = lease.end_in(db)
        if lease is not None:
            lease.ended = True
        if leased:
            self.layers.collect(leased)
        return self.get(new.id), moved

    def record_labels(self, labels_of: Callable[[bytes], Mapping[str, str]]) -> int:
        """Record the labels of the images stored without them (by a lamina before schema 5), which
        ``labels_of`` reads from an image's config, so that listings read no config; ends the migration's
        pending mark. An image whose config cannot be read keeps none recorded (a listing then tries it
        itself). Returns how many were recorded."""
        from lamina.errors import LaminaError

        found: list[tuple[str, str]] = []
        for (image_id,) in self.db.query("SELECT id FROM images WHERE labels IS NULL"):
            try:
                found.append((json.dumps(dict(labels_of(self.content.read(image_id)))), image_id))
            except (OSError, LaminaError):
                continue
        with self.db.tx() as db:
            db.executemany("UPDATE images SET labels=? WHERE id=? AND labels IS NULL", found)
            db.execute("DELETE FROM meta WHERE key='labels_pending'")
        self.db.labels_pending = False
        return len(found)

    def _add_blob(self, db: sqlite3.Connection, image_id: str, digest: str) -> None:
        """Record that an image needs a blob, with the blob's size for the disk-usage accounting."""
        size = self.content.stored_size(digest)  # None: not kept (or gone), counts as nothing
        db.execute("INSERT OR IGNORE INTO image_blobs (image_id, digest, size) VALUES (?, ?, ?)",
                   (image_id, digest, size))

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
        with self.db.tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                return False
            db.execute(
                "INSERT OR IGNORE INTO image_manifests VALUES (?, ?, ?, ?)",
                (image_id, manifest.digest, manifest.media_type, time.time()),
            )
            for b in blobs:
                self._add_blob(db, image_id, b)
            return True

    def adopt(self, image_id: str, parent: str) -> bool:
        """Record ``parent`` as the parent of ``image_id`` when it has none (docker's SetParent, for an image
        the build cache found by its history). False when either is gone, it has a parent already, or
        ``parent`` descends from it (a cycle)."""
        with self.db.tx() as db:
            row = db.execute("SELECT parent FROM images WHERE id=?", (image_id,)).fetchone()
            if row is None or row[0] is not None:
                return False
            if db.execute("SELECT 1 FROM images WHERE id=?", (parent,)).fetchone() is None:
                return False
            cur: str | None = parent
            while cur is not None:  # up from the new parent: the image must not be among its ancestors
                if cur == image_id:
                    return False
                up = db.execute("SELECT parent FROM images WHERE id=?", (cur,)).fetchone()
                cur = up[0] if up else None
            db.execute("UPDATE images SET parent=? WHERE id=?", (parent, image_id))
            return True

    def add_name(self, image_id: str, name: str) -> bool:
        """Give ``image_id`` the name ``name`` (moving it from another image); True when it moved."""
        return bool(self.add_names(image_id, [name]))

    def add_names(self, image_id: str, names: Sequence[str]) -> list[str]:
        """Give ``image_id`` every name of ``names`` in one transaction; returns those moved from other images."""
        with self.db.tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                raise ImageNotFound(f"image {image_id} not found")
            now = time.time()
            return [n for n in names if self._set_name(db, n, image_id, now)]

    def remove_name(self, name: str, image_id: str | None = None) -> str:
        """Remove a name (only if it still names ``image_id``, when given); returns the image it belonged to."""
        with self.db.tx() as db:
            row = db.execute("SELECT image_id FROM image_names WHERE name=?", (name,)).fetchone()
            if row is None or (image_id is not None and row[0] != image_id):
                raise InvalidReference(f"no image is named {name}")
            db.execute("DELETE FROM image_names WHERE name=?", (name,))
            db.execute("UPDATE images SET last_updated=? WHERE id=?", (time.time(), row[0]))
            return str(row[0])

    def mark_used(self, db: sqlite3.Connection, image_id: str, now: float) -> None:
        """Record, in the caller's transaction, that an image and the layers under it were used now."""
        row = db.execute("SELECT top_layer FROM images WHERE id=?", (image_id,)).fetchone()
        db.execute("UPDATE images SET last_used=? WHERE id=?", (now, image_id))
        if row is not None and row[0]:
            db.execute(
                "WITH RECURSIVE chain(id) AS (SELECT id FROM layers WHERE chain_id=?"
                " UNION ALL SELECT l.parent FROM layers l JOIN chain c ON l.id = c.id WHERE l.parent IS NOT NULL)"
                " UPDATE layers SET last_used=? WHERE id IN chain",
                (row[0], now),
            )

    def touch(self, image_ids: Iterable[str]) -> None:
        """Record that images were used (saved, pushed); a store that takes no writes records nothing."""
        if self.store.read_only:
            return
        with self.db.tx() as db:
            now = time.time()
            for image_id in image_ids:
                self.mark_used(db, image_id, now)

    def chain_length(self, image_id: str) -> int:
        """How many layers the image stands on (0 when it has none, or they are gone)."""
        row = self.db.one(
            "SELECT l.depth FROM images i JOIN layers l ON l.chain_id = i.top_layer WHERE i.id=?", (image_id,)
        )
        return int(row[0]) if row else 0

    def forget_blob(self, name: str) -> bool:
        """A blob that is missing or does not match its digest (``system check --repair``): images stop
        recording it (a manifest that needs it is then made again when the image is saved or pushed) and
        its file goes. An image's config is not forgotten this way: the image itself is damaged."""
        with self.db.tx() as db:
            if db.execute("SELECT 1 FROM images WHERE id=?", (name,)).fetchone() is not None:
                return False
            db.execute("DELETE FROM image_blobs WHERE digest=?", (name,))
            db.execute("DELETE FROM image_manifests WHERE digest=?", (name,))
            db.execute("DELETE FROM lease_blobs WHERE digest=?", (name,))
        self.content.discard(name)
        return True

    def containers_of(self, db: sqlite3.Connection, image_id: str) -> list[str]:
        return [r[0] for r in db.execute(
            "SELECT id FROM containers WHERE image_id=? AND state != 'removing'", (image_id,)
        )]

    def delete(
        self, image_id: str, *, if_unused: bool = False, names_out: list[str] | None = None, damaged: bool = False,
        untag: Sequence[str] = (), names_seen: Collection[str] | None = None,
    ) -> list[ChainID] | None:
        """Remove an image row with its names, manifests and blob references; release its layers.

        Checked in the same transaction: child images and containers are a conflict
        (:class:`ImageConflict`); with ``if_unused`` an image that has names, children or containers is
        left alone and None returned (the caller's view of it was out of date). The image's names go with it.
        ``untag``: names removed first, in the same transaction, whether the image then goes or not (the
        first must still name the image, :class:`InvalidReference` otherwise; the others go if they do), so
        that removing an image's last name and the image is one step. ``names_out`` lists every name removed.
        Returns the layers removed. ``names_seen`` (a prune): the image goes, with its names, only if those
        are still exactly its names and nothing else needs it; otherwise it stays and None is returned.

        A ``damaged`` image (``system check --repair``) goes even with child images (they keep their own
        layers and lose only the parent link) and without its top layer.

        The image's blobs are held by a lease from the transaction that deletes it until they are collected,
        so that a process killed in between leaves their collection to the next one (its recovery ends the
        lease).
        """
        with self.store.lease() as lease:
            with self.db.tx() as db:
                row = db.execute("SELECT top_layer FROM images WHERE id=?", (image_id,)).fetchone()
                if untag:
                    owner = db.execute("SELECT image_id FROM image_names WHERE name=?", (untag[0],)).fetchone()
                    if row is None or owner is None or owner[0] != image_id:
                        raise InvalidReference(f"no image is named {untag[0]}")
                    for name in untag:
                        gone = db.execute("DELETE FROM image_names WHERE name=? AND image_id=?", (name, image_id))
                        if gone.rowcount and names_out is not None:
                            names_out.append(name)
                    db.execute("UPDATE images SET last_updated=? WHERE id=?", (time.time(), image_id))
                if row is None:
                    if if_unused:
                        return None
                    raise ImageNotFound(f"image {image_id} not found")
                children = [r[0] for r in db.execute("SELECT id FROM images WHERE parent=?", (image_id,))]
                containers = self.containers_of(db, image_id)
                if if_unused and (children or containers or db.execute(
                    "SELECT 1 FROM image_names WHERE image_id=?", (image_id,)
                ).fetchone()):
                    return None
                if names_seen is not None and (children or containers or set(names_seen) != {
                    r[0] for r in db.execute("SELECT name FROM image_names WHERE image_id=?", (image_id,))
                }):
                    return None
                short = image_id.split(":", 1)[-1][:12]
                if containers:
                    raise ImageConflict(f"unable to delete {short}: image is used by container {containers[0][:12]}")
                if children and not damaged:
                    shown = ", ".join(c.split(":")[-1][:12] for c in children[:3])
                    raise ImageConflict(f"image {short} has dependent child images ({shown})")
                db.execute("UPDATE images SET parent=NULL WHERE parent=?", (image_id,))
                if names_out is not None:
                    names_out.extend(r[0] for r in db.execute(
                        "SELECT name FROM image_names WHERE image_id=? ORDER BY added, name", (image_id,)
                    ))
                for (digest,) in db.execute("SELECT digest FROM image_blobs WHERE image_id=?", (image_id,)).fetchall():
                    lease.add_blob(db, digest)
                db.execute("DELETE FROM images WHERE id=?", (image_id,))
                top = None
                if row[0] and not (damaged and db.execute(
                    "SELECT 1 FROM layers WHERE chain_id=? AND state='committed'", (row[0],)
                ).fetchone() is None):
                    top = self.layers.unreference(db, row[0])
            return self.layers.collect([top]) if top else []  # its layers go before the lease ends


_SCAN = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # the C scanner itself: one call per value


def _load_labels(text: str | None) -> dict[str, str] | None:
    """The ``labels`` column as written by :func:`_dump_labels` (``json.dumps``: no surrounding blanks),
    decoded by the C scanner directly (``json.loads`` costs three times as much, once per image listed).
    None when not recorded, or not readable: the image's config says then."""
    if text is None:
        return None
    if text == "{}":
        return {}
    try:
        value, end = _SCAN(text, 0)
    except ValueError:
        return None
    if end != len(text) or not isinstance(value, dict):
        return None
    return value


def _dump_labels(labels: Mapping[str, str] | None) -> str | None:
    """The ``labels`` column of an image: its config's labels as a JSON object (``{}`` without any), or None
    when not known."""
    return None if labels is None else json.dumps(dict(labels))

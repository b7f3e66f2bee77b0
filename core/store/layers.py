"""The layer store: layer rows in the store database, content in the active driver.

Layers are keyed by a driver-owned *CacheID* (random hex) and, once committed, by their *ChainID*
(unique). Every multi-step change is crash-safe through an explicit state machine:

``incomplete`` (row written and committed *before* the driver works; owner pid + start time recorded)
→ ``committed`` (one transaction, after the driver finished) or → ``removing`` → row deleted.

A committed layer's users are: images whose top layer it is (one reference each), containers whose init
layer it is (one reference each), explicit retains (``layer add``: one reference each), layers above it
(rows whose parent it is), mount references and leases. Releasing a reference counts every one of them in
the transaction that drops it, and a layer leaves ``committed`` only in a transaction that saw none.

Rows left ``incomplete`` or ``removing`` by a process that no longer exists are finished off by the next
process (:meth:`LayerStore.recover`); rows of live processes are left alone, so several lamina processes
can share one store. A ``removing`` row gives up its ChainID to a layer registered meanwhile.

Mount reference counts live in the runroot's database (volatile, like the mounts themselves), and every
first-mount/last-unmount runs under an ``fcntl`` lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lamina.contract import ByteStream, Change
from lamina.digest import ChainID, DiffID, chain_id, parse_digest
from lamina.errors import (
    DriverError,
    ExportError,
    LayerInUse,
    LayerLimitExceeded,
    LayerNotFound,
    SharedLayerUnavailable,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
    write_failure,
)
from lamina.fs.ops import write_atomic
from lamina.store.db import BUSY_TIMEOUT_S, owner_alive

if TYPE_CHECKING:
    from lamina.fs.kcopy import Segment
    from lamina.plugins.active import ActiveDriver
    from lamina.store.kernel import Store
    from lamina.store.leases import Lease
    from lamina.tar.compression import Readable
    from lamina.tar.split import ExactTarStream

log = logging.getLogger("lamina.store.layers")
MAX_DEPTH = 1000


@dataclass(frozen=True)
class Layer:
    cache_id: str
    chain_id: ChainID
    diff_id: DiffID
    parent: ChainID | None
    size: int
    tar_size: int
    compressed_digest: str | None
    compression: str | None
    refs: int
    depth: int
    created: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "diff_id": self.diff_id,
            "parent": self.parent,
            "cache_id": self.cache_id,
            "size": self.size,
            "tar_size": self.tar_size,
            "compressed_digest": self.compressed_digest,
            "compression": self.compression,
            "references": self.refs,
            "depth": self.depth,
            "created": self.created,
        }


class LayerStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.config = store.config
        self.root = store.root
        self.runroot = store.runroot
        self.db = store.db
        # the exact-export records of tree drivers' layers (image data: with the image store when there is one)
        self.records = (store.image_root or store.root) / "tar-split"
        if not store.read_only:
            try:
                self.records.mkdir(exist_ok=True, mode=0o700)
            except OSError as e:
                raise write_failure(e, f"creating {self.records}") from e

    @property
    def driver(self) -> ActiveDriver:
        """The store's driver (started on first use)."""
        return self.store.driver

    @property
    def hook(self) -> Any:
        """The driver's hook relay (tests and tools); the store itself calls :attr:`driver`."""
        return self.driver.hook

    # -- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish off layer operations of dead processes; return the CacheIDs cleaned."""
        rows = self.db.query("SELECT id, owner_pid, owner_start FROM layers WHERE state != 'committed'")
        cleaned = []
        for lid, pid, start in rows:
            if owner_alive(pid, start):
                continue
            if not self.db.claim("layers", lid, (pid, start), "state != 'committed'", state="removing"):
                continue  # another process is finishing it off
            try:
                self._remove_content(lid)
            except Exception as e:
                # Left claimed by this process: the next process after it tries again; the store stays usable.
                log.warning("could not yet remove the leftovers of layer %s: %s", lid[:12], e)
                continue
            self._drop_row(lid)
            cleaned.append(lid)
        return cleaned

    def collect_orphans(self) -> list[ChainID]:
        """Layers a killed process had released (no reference) but not yet removed: nothing keeps them."""
        orphans = [r[0] for r in self.db.query(
            "SELECT id FROM layers l WHERE state='committed' AND rw=0 AND refs=0"
            " AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM lease_layers k WHERE k.layer=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM images i WHERE i.top_layer=l.chain_id)"
            " AND NOT EXISTS (SELECT 1 FROM containers n WHERE n.init_layer=l.id)"
        )]
        return self.collect(orphans) if orphans else []

    def reclaim_mounts(self) -> int:
        """Drop mount references of processes that are gone; unmount what nobody holds any more. Returns
        how many holders (or vanished layers) lost their references."""
        rows = self.db.query("SELECT DISTINCT holder FROM mount_refs WHERE holder LIKE 'pid:%'", runroot=True)
        dead = []
        for (holder,) in rows:
            _, pid, start = holder.split(":", 2)
            if not owner_alive(int(pid), float(start) if start != "None" else None):
                dead.append(holder)
        gone = [
            r[0] for r in self.db.query("SELECT DISTINCT id FROM mount_refs", runroot=True)
            if self.db.one("SELECT 1 FROM layers WHERE id=?", (r[0],)) is None
        ]
        if not dead and not gone:
            return 0
        self.driver  # noqa: B018  (started before references are dropped: a driver that cannot start leaves them)
        with self.mount_lock():
            affected = set()
            with self.db.tx(runroot=True) as mdb:
                for holder in dead:
                    affected |= {r[0] for r in mdb.execute("SELECT id FROM mount_refs WHERE holder=?", (holder,))}
                    mdb.execute("DELETE FROM mount_refs WHERE holder=?", (holder,))
                for lid in gone:
                    mdb.execute("DELETE FROM mount_refs WHERE id=?", (lid,))
                unheld = [lid for lid in sorted(affected - set(gone)) if self._take_last(mdb, lid)]
            self._unmount_taken(unheld)
        return len(dead) + len(gone)

    # -- queries --------------------------------------------------------------------------------------
    _SELECT = (
        "SELECT l.id, l.chain_id, l.diff_id, p.chain_id, l.size, l.tar_size, l.compressed_digest, l.compression,"
        " l.refs, l.depth, l.created FROM layers l LEFT JOIN layers p ON p.id = l.parent"
    )

    @staticmethod
    def _layer(row: tuple[Any, ...]) -> Layer:
        return Layer(row[0], ChainID(row[1]), DiffID(row[2]), ChainID(row[3]) if row[3] else None, *row[4:])

    def get(self, chain: str) -> Layer:
        parse_digest(chain)
        row = self.db.one(f"{self._SELECT} WHERE l.chain_id=? AND l.state='committed'", (chain,))
        if row is None:
            raise LayerNotFound(f"layer {chain} not found")
        return self._layer(row)

    def exists(self, chain: str) -> bool:
        """Whether a committed layer has this ChainID."""
        return self.db.one("SELECT 1 FROM layers WHERE chain_id=? AND state='committed'", (chain,)) is not None

    def find(self, ref: str) -> Layer:
        """A layer by full ChainID, or by a unique prefix of its hex (at least 3 characters)."""
        if ":" in ref:
            return self.get(ref)
        if len(ref) < 3 or any(c not in "0123456789abcdef" for c in ref):
            shown = ref if len(ref) <= 80 else ref[:77] + "..."
            raise LayerNotFound(f"layer {shown!r} not found: give a ChainID or at least 3 hex characters of one")
        rows = self.db.query(
            f"{self._SELECT} WHERE l.state='committed' AND l.chain_id LIKE ? LIMIT 11", (f"sha256:{ref}%",)
        )
        if not rows:
            raise LayerNotFound(f"layer {ref!r} not found")
        if len(rows) > 1:
            raise LayerNotFound(f"layer prefix {ref!r} is ambiguous: " + ", ".join(r[1][:19] for r in rows[:10]))
        return self._layer(rows[0])

    def all(self) -> list[Layer]:
        rows = self.db.query(f"{self._SELECT} WHERE l.state='committed' AND l.rw=0 ORDER BY l.depth, l.created")
        return [self._layer(r) for r in rows]

    def chain_index(self) -> dict[ChainID, tuple[ChainID | None, int, int]]:
        """Every layer :meth:`all` lists, by ChainID: its parent's ChainID, its size and its depth (for listings,
        which need no more of a layer than this)."""
        return {r[0]: (r[1], r[2], r[3]) for r in self.db.query(
            "SELECT l.chain_id, p.chain_id, l.size, l.depth FROM layers l LEFT JOIN layers p ON p.id = l.parent"
            " WHERE l.state='committed' AND l.rw=0"
        )}

    def sizes(self, chains: list[ChainID]) -> dict[ChainID, int]:
        """The sizes of those of ``chains`` that :meth:`all` lists, by ChainID (one indexed lookup each)."""
        out: dict[ChainID, int] = {}
        for start in range(0, len(chains), 500):  # (SQLite's limit on a statement's parameters)
            part = chains[start:start + 500]
            out.update((ChainID(r[0]), int(r[1])) for r in self.db.query(
                f"SELECT chain_id, size FROM layers WHERE chain_id IN ({','.join('?' * len(part))})"
                " AND state='committed' AND rw=0", tuple(part)))
        return out

    def count(self) -> int:
        """How many layers :meth:`all` lists."""
        return int(self.db.one("SELECT COUNT(*) FROM layers WHERE state='committed' AND rw=0")[0])

    def children(self, cache_id: str) -> list[str]:
        return [r[0] for r in self.db.query("SELECT id FROM layers WHERE parent=?", (cache_id,))]

    def parent_of(self, cache_id: str) -> str | None:
        row = self.db.one("SELECT parent FROM layers WHERE id=?", (cache_id,))
        return str(row[0]) if row and row[0] else None

    def users(self, cache_id: str) -> dict[str, list[str]]:
        """Who uses a layer: images (top layer), containers (init layer), child layers, leases."""
        with self.db.tx() as db:  # one consistent view of every table
            return _users(db, cache_id)

    # -- registration ---------------------------------------------------------------------------------
    def register(
        self,
        src: Readable | BinaryIO,
        parent: str | None = None,
        *,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
        lease: Lease | None = None,
    ) -> Layer:
        """Apply a (possibly compressed) layer tar on ``parent`` and commit it; one new reference.

        With ``lease`` the layer gets no reference but is held by the lease instead: image loads stack
        leased layers and then reference the top one, in the transaction that commits the image.
        """
        from lamina.tar.compression import DiffStream, verify

        parent_row = self.get(parent) if parent else None
        stream = DiffStream(
            src,
            max_bytes=self.config.limits.max_layer_bytes,
            max_entries=self.config.limits.max_layer_entries,
            hash_compressed=expected_digest is not None,
        )
        pcache = parent_row.cache_id if parent_row else None
        try:
            lid = self._begin(parent_row)
        except BaseException:
            stream.close()
            raise
        if not self.driver.capabilities().keeps_stream:
            stream.record = str(self._record(lid))  # kept by lamina.fs.apply.apply_tar as the driver applies
        try:
            self.driver.create(lid, pcache, rw=False)
            size = self.driver.apply_diff(lid, pcache, stream)
            stream.drain()
            if stream.record is not None and not os.path.exists(stream.record) \
                    and not self.driver.implements("lamina_tar_stream"):
                raise DriverError(
                    f"driver {self.driver.name!r} applied the layer without lamina.driver.apply_tar, so no exact "
                    "export of it could be kept"
                )
            diff_id = stream.diff_id
            verify(diff_id, expected_diff_id, "layer DiffID")
            if expected_digest is not None:
                verify(str(stream.compressed_digest), expected_digest, "layer blob")
            chain = chain_id(parent_row.chain_id if parent_row else None, diff_id)
            existing = self._commit(lid, chain, diff_id, size, stream.size, stream.compression,
                                    stream.compressed_digest, lease)
        except BaseException:
            stream.close()
            self._discard(lid)
            raise
        stream.close()
        if existing is not None:
            self._discard(lid)  # same content already stored: the loser's work goes
        return self.get(chain)

    def _begin(self, parent_row: Layer | None) -> str:
        """A new layer's row, ``incomplete`` and owned by this process; its CacheID."""
        depth = parent_row.depth + 1 if parent_row else 1
        if depth > MAX_DEPTH:
            raise LayerLimitExceeded(f"layer chain deeper than {MAX_DEPTH} layers")
        lid = os.urandom(32).hex()
        pcache = parent_row.cache_id if parent_row else None
        me = self.db.me
        driver = self.driver.name  # started (if it was not) before the write transaction, not inside it
        with self.db.tx() as db:
            _same_driver(db, driver)
            if pcache is not None and db.execute(
                "SELECT 1 FROM layers WHERE id=? AND state='committed'", (pcache,)
            ).fetchone() is None:
                raise LayerNotFound(f"parent layer {parent_row.chain_id if parent_row else ''} was removed")
            db.execute(
                "INSERT INTO layers (id, parent, state, owner_pid, owner_start, depth, created)"
                " VALUES (?, ?, 'incomplete', ?, ?, ?, ?)",
                (lid, pcache, me[0], me[1], depth, time.time()),
            )
        return lid

    def _commit(self, lid: str, chain: ChainID, diff_id: str, size: int, tar_size: int, compression: str | None,
                compressed_digest: str | None, lease: Lease | None) -> str | None:
        """Commit the layer ``lid`` as ``chain`` (one reference, or held by ``lease``); when a committed
        layer already has that ChainID, that one gets the reference and ``lid`` is marked for removal: its
        CacheID is returned."""
        with self.db.tx() as db:
            existing = db.execute(
                "SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)
            ).fetchone()
            if existing is None:
                # a row on its way out may still hold the ChainID: it gives it up (its remover works
                # by CacheID) and this layer takes over
                db.execute("UPDATE layers SET chain_id=NULL WHERE chain_id=? AND state != 'committed'", (chain,))
                db.execute(
                    "UPDATE layers SET state='committed', chain_id=?, diff_id=?, size=?, tar_size=?,"
                    " compression=?, compressed_digest=?, refs=?, owner_pid=NULL, owner_start=NULL,"
                    " last_used=? WHERE id=?",
                    (chain, diff_id, size, tar_size, compression, compressed_digest, 0 if lease else 1,
                     time.time(), lid),
                )
                if lease is not None:
                    lease.add_layer(db, lid)
                return None
            if lease is not None:
                lease.add_layer(db, existing[0])
            else:
                db.execute("UPDATE layers SET refs=refs+1 WHERE id=?", (existing[0],))
            db.execute("UPDATE layers SET last_used=? WHERE id=?", (time.time(), existing[0]))
            db.execute("UPDATE layers SET state='removing' WHERE id=?", (lid,))
            return str(existing[0])

    def adopt(self, src: LayerStore, chain: str, parent: str | None, lease: Lease) -> Layer | None:
        """Register ``src``'s layer ``chain`` (``src`` is a store lamina only reads: an additional image
        store) on ``parent`` here with its content used in place, when this driver can
        (``lamina_adopt``): the same ChainID, DiffID and sizes, and a copy of its exact-export record.
        None when it cannot; the caller then copies the layer. Held by ``lease``, as :meth:`register`'s.

        Nothing is read back: the shared layer is trusted as this store's own layers are, and
        ``lamina system check`` verifies it like them."""
        if not self.driver.implements("lamina_adopt") or self.driver.capabilities().keeps_stream:
            return None
        theirs = src.get(chain)
        record = src._record(theirs.cache_id)
        source = src.driver.diff_root(theirs.cache_id) if record.exists() else None
        if source is None:
            return None
        parent_row = self.get(parent) if parent else None
        if chain_id(parent_row.chain_id if parent_row else None, theirs.diff_id) != chain:
            raise LayerNotFound(f"layer {_short(chain)} does not stand on {_short(parent or '')} in its store")
        lid = self._begin(parent_row)
        pcache = parent_row.cache_id if parent_row else None
        try:
            if not self.driver.adopt(lid, pcache, source, src.driver.name):
                self._discard(lid)
                return None
            sup = src.records / f"{theirs.cache_id}.tsr.sup"
            try:
                kept = record.read_bytes(), sup.read_bytes() if sup.exists() else None
            except OSError as e:
                raise SharedLayerUnavailable(
                    f"cannot read the record of layer {_short(chain)} in {src.root}: {e.strerror or e}") from e
            try:
                write_atomic(self._record(lid), kept[0], mode=0o600)
                if kept[1] is not None:
                    write_atomic(self.records / f"{lid}.tsr.sup", kept[1], mode=0o600)
            except OSError as e:
                raise write_failure(e, f"copying the record of layer {_short(chain)}") from e
            existing = self._commit(lid, ChainID(chain), theirs.diff_id, theirs.size, theirs.tar_size,
                                    theirs.compression, theirs.compressed_digest, lease)
        except BaseException:
            self._discard(lid)
            raise
        if existing is not None:
            self._discard(lid)
        return self.get(chain)

    def _discard(self, lid: str) -> None:
        """Remove a layer this process created and did not commit. If the driver cannot remove it now, the
        row stays ``removing`` under this process and the next process after it finishes the job."""
        try:
            self._remove_content(lid)
        except Exception as e:
            log.warning("could not yet remove the leftovers of layer %s: %s", lid[:12], e)
            me = self.db.me
            with self.db.tx() as db:
                db.execute(
                    "UPDATE layers SET state='removing', owner_pid=?, owner_start=?"
                    " WHERE id=? AND state != 'committed'",
                    (me[0], me[1], lid),
                )
            return
        with self.db.tx() as db:
            db.execute("DELETE FROM layers WHERE id=? AND state != 'committed'", (lid,))

    # -- read-write layers (containers) ---------------------------------------------------------------
    def create_rw(self, parent: str) -> str:
        """Create a read-write layer on committed layer ``parent`` (a CacheID); returns its CacheID.

        The row stays ``incomplete`` (owned by this process) until the container store commits it
        (:meth:`commit_rw`) in the transaction that records its container.
        """
        lid = os.urandom(32).hex()
        me = self.db.me
        driver = self.driver.name  # started before the write transaction
        with self.db.tx() as db:
            _same_driver(db, driver)
            prow = db.execute("SELECT depth FROM layers WHERE id=? AND state='committed'", (parent,)).fetchone()
            if prow is None:
                raise LayerNotFound(f"layer {parent[:12]} was removed")
            if prow[0] + 1 > MAX_DEPTH:
                raise LayerLimitExceeded(f"layer chain deeper than {MAX_DEPTH} layers")
            db.execute(
                "INSERT INTO layers (id, parent, state, rw, owner_pid, owner_start, depth, created)"
                " VALUES (?, ?, 'incomplete', 1, ?, ?, ?, ?)",
                (lid, parent, me[0], me[1], prow[0] + 1, time.time()),
            )
        try:
            self.driver.create(lid, parent, rw=True)
        except BaseException:
            self._discard(lid)
            raise
        return lid

    @staticmethod
    def commit_rw(db: sqlite3.Connection, lid: str) -> None:
        db.execute(
            "UPDATE layers SET state='committed', owner_pid=NULL, owner_start=NULL WHERE id=? AND rw=1", (lid,)
        )

    def remove_rw(self, lid: str) -> None:
        """Unmount (every holder) and remove a read-write layer."""
        me = self.db.me
        with self.mount_lock(), self.db.tx() as db:
            db.execute(
                "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=? AND rw=1",
                (me[0], me[1], lid),
            )
        if self.mount_count(lid):
            self.unmount(lid, force=True)
        self.driver.unmount(lid)
        self.driver.remove(lid)
        with self.db.tx() as db:
            db.execute("DELETE FROM layers WHERE id=?", (lid,))

    # A driver may mount a layer to compare it (overlay without a native diff): the comparisons below hold
    # a mount reference on both sides meanwhile, so such a mount is always counted (system check reports a
    # mount nothing counts as a leak).
    @contextlib.contextmanager
    def _viewed(self, cache_id: str, parent: str | None) -> Iterator[None]:
        if not self.driver.capabilities().can_mount:
            yield
            return
        with contextlib.ExitStack() as held:
            for lid in (cache_id, parent):
                if lid is not None:
                    held.enter_context(self.mounted(lid))
            yield

    def changes_of(self, cache_id: str, parent: str | None) -> list[Change]:
        """Changes of a layer (committed or read-write) against ``parent`` (a CacheID, not necessarily the
        direct parent; None: everything)."""
        with self._viewed(cache_id, parent):
            return self.driver.changes(cache_id, parent)

    def diff_of(self, cache_id: str, parent: str | None) -> ByteStream:
        from lamina.tar.split import ExactTarStream

        def chunks() -> Iterator[Segment]:
            with self._viewed(cache_id, parent):
                yield from _pieces(self.driver.diff(cache_id, parent))

        return ExactTarStream(chunks(), None)

    def diff_size_of(self, cache_id: str, parent: str | None) -> int:
        with self._viewed(cache_id, parent):
            return self.driver.diff_size(cache_id, parent)

    # -- leases ---------------------------------------------------------------------------------------
    def lease(self, chain: str, lease: Lease) -> Layer:
        """Hold an existing layer in ``lease`` (no reference); :class:`LayerNotFound` if it is gone."""
        with self.db.tx() as db:
            row = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)).fetchone()
            if row is None:
                raise LayerNotFound(f"layer {chain} not found")
            lease.add_layer(db, row[0])
        return self.get(chain)

    def _leased(self, db: sqlite3.Connection, lid: str) -> bool:
        rows = db.execute(
            "SELECT e.owner_pid, e.owner_start FROM lease_layers k JOIN leases e ON e.id = k.lease WHERE k.layer=?",
            (lid,),
        ).fetchall()
        return any(owner_alive(pid, start) for pid, start in rows)

    # -- collection -----------------------------------------------------------------------------------
    def collect(self, cache_ids: list[str]) -> list[ChainID]:
        """Remove those of ``cache_ids`` (and then their parents) that nothing uses any more."""
        removed: list[ChainID] = []
        for lid in cache_ids:
            removed += self._remove_unused(lid)
        return removed

    def _remove_unused(self, lid: str | None) -> list[ChainID]:
        removed: list[ChainID] = []
        me = self.db.me
        while lid is not None:
            # under the mount lock, so that no mount reference is taken between the check and the mark
            with self.mount_lock(), self.db.tx() as db:
                row = db.execute(
                    "SELECT refs, parent, chain_id FROM layers WHERE id=? AND state='committed' AND rw=0", (lid,)
                ).fetchone()
                if row is None or row[0] > 0:
                    break
                users = _users(db, lid, leases=False)
                if users["layers"]:
                    break
                if users["images"] or users["containers"]:
                    log.warning("layer %s has no reference but is used by %s; kept", _short(row[2]), _describe(users))
                    break
                if self.mount_count(lid) or self._leased(db, lid):
                    break
                db.execute(
                    "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=?", (me[0], me[1], lid)
                )
            self._destroy(lid)
            removed.append(ChainID(row[2]))
            lid = row[1]
        return removed

    def _destroy(self, lid: str) -> None:
        """The content and row of a layer this process has marked ``removing``."""
        self._remove_content(lid)
        self._drop_row(lid)

    def _remove_content(self, lid: str) -> None:
        """Everything kept for a layer but its row: the driver's files (unmounted first) and the record."""
        self.driver.unmount(lid)
        self.driver.remove(lid)
        self._forget_record(lid)

    def _drop_row(self, lid: str) -> None:
        with self.db.tx() as db:
            db.execute("DELETE FROM layers WHERE id=?", (lid,))
            db.execute("DELETE FROM lease_layers WHERE layer=?", (lid,))

    # -- repair (``lamina system check --repair``) -----------------------------------------------------
    _ABOVE = "WITH RECURSIVE d(id) AS (SELECT ? UNION SELECT l.id FROM layers l JOIN d ON l.parent = d.id) "

    def images_on(self, cache_id: str) -> list[str]:
        """Images whose chain contains the layer (their top layer is it or one above it)."""
        return [r[0] for r in self.db.query(
            self._ABOVE + "SELECT i.id FROM images i JOIN layers l ON l.chain_id = i.top_layer WHERE l.id IN d",
            (cache_id,),
        )]

    def containers_on(self, cache_id: str) -> list[str]:
        """Containers whose layers stand on the layer."""
        return [r[0] for r in self.db.query(
            self._ABOVE + "SELECT c.id FROM containers c WHERE c.init_layer IN d OR c.rw_layer IN d", (cache_id,)
        )]

    def remove_damaged(self, cache_id: str) -> list[ChainID]:
        """Remove a damaged layer with every layer above it, whatever references they hold, once no image,
        container, live lease or mount uses any of them (:class:`LayerInUse` names what does); then the
        layers below that nothing uses any more. Returns the ChainIDs removed."""
        me = self.db.me
        with self.mount_lock(), self.db.tx() as db:
            rows = db.execute(
                self._ABOVE + "SELECT l.id, l.chain_id, l.depth, l.state FROM layers l WHERE l.id IN d", (cache_id,)
            ).fetchall()
            if not any(r[0] == cache_id and r[3] == "committed" for r in rows):
                return []  # gone, or on its way out already
            if any(r[3] != "committed" for r in rows):
                raise LayerInUse(f"layer {cache_id[:12]} has a layer being added or removed above it")
            for lid, chain, _, _ in rows:
                users = _users(db, lid)
                users["containers"] += [r[0] for r in db.execute(
                    "SELECT COALESCE(name, id) FROM containers WHERE rw_layer=?", (lid,)
                )]
                if users["images"] or users["containers"]:
                    raise LayerInUse(f"layer {_short(chain or lid)} is used by {_describe(users)}")
                if self.mount_count(lid):
                    raise LayerInUse(f"layer {_short(chain or lid)} is mounted")
                if self._leased(db, lid):
                    raise LayerInUse(f"layer {_short(chain or lid)} is in use by a running operation")
            parent = db.execute("SELECT parent FROM layers WHERE id=?", (cache_id,)).fetchone()[0]
            db.execute(
                self._ABOVE + "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id IN d",
                (cache_id, me[0], me[1]),
            )
        removed: list[ChainID] = []
        for lid, chain, _, _ in sorted(rows, key=lambda r: -int(r[2])):  # the top first
            self._destroy(lid)
            if chain:
                removed.append(ChainID(chain))
        return removed + (self._remove_unused(parent) if parent else [])

    def remove_orphan_rw(self, cache_id: str) -> bool:
        """Remove a committed read-write layer no container uses (and the init layer below it, if unused)."""
        me = self.db.me
        with self.mount_lock(), self.db.tx() as db:
            if db.execute("SELECT 1 FROM containers WHERE rw_layer=?", (cache_id,)).fetchone() is not None:
                return False
            row = db.execute(
                "SELECT parent FROM layers WHERE id=? AND rw=1 AND state='committed'", (cache_id,)
            ).fetchone()
            if row is None:
                return False
            db.execute("UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=?",
                       (me[0], me[1], cache_id))
        self._mount_refs_gone(cache_id)
        self._destroy(cache_id)
        if row[0]:
            self._remove_unused(row[0])
        return True

    def _mount_refs_gone(self, cache_id: str) -> None:
        with self.db.tx(runroot=True) as mdb:
            mdb.execute("DELETE FROM mount_refs WHERE id=?", (cache_id,))

    def remove_orphan(self, cache_id: str) -> bool:
        """Remove what the driver holds for a layer ID the store has no row of."""
        if self.db.one("SELECT 1 FROM layers WHERE id=?", (cache_id,)) is not None:
            return False
        self._remove_content(cache_id)
        return True

    def remove_orphan_record(self, name: str) -> bool:
        """Remove a file of the records' directory whose layer has no row."""
        if "/" in name or name.startswith(".") or \
                self.db.one("SELECT 1 FROM layers WHERE id=?", (name.split(".", 1)[0],)) is not None:
            return False
        (self.records / name).unlink(missing_ok=True)
        return True

    def uncounted_mounts(self) -> list[tuple[str, str]]:
        """(CacheID, mount point) of each mount of a layer under the driver's area while no mount reference
        of that layer exists: a leak of a process killed between mounting and counting (or a mount made by
        hand). Paths are compared resolved; a mount below another one (a container's /proc) is that one's."""
        from lamina.fs.mounts import mountinfo

        areas = [os.path.realpath(home) + "/" for home in self._driver_homes()]
        points = sorted(m.mountpoint for m in mountinfo() if any(m.mountpoint.startswith(a) for a in areas))
        if not points:
            return []
        out: list[tuple[str, str]] = []
        with self.mount_lock() if os.access(self.runroot, os.W_OK) else contextlib.nullcontext():
            counted = {r[0] for r in self.db.query("SELECT DISTINCT id FROM mount_refs", runroot=True)}
            seen: list[str] = []
            for point in points:
                if any(point.startswith(p + "/") for p in seen):
                    continue  # below a mount already judged: it goes (or stays) with that one
                seen.append(point)
                area = next(a for a in areas if point.startswith(a))
                lid = point[len(area):].split("/", 1)[0]
                if lid in counted or lid.startswith(".") \
                        or self.db.one("SELECT 1 FROM layers WHERE id=?", (lid,)) is None:
                    continue  # counted, a driver's own work area, or not a layer's
                out.append((lid, point))
        return out

    def unmount_stray(self, cache_id: str) -> bool:
        """Unmount a layer that no mount reference names (``system check --repair``), and what was mounted
        below it."""
        from lamina.fs.mounts import mountinfo, umount

        with self.mount_lock():
            if self.mount_count(cache_id):
                return False
            self.driver.unmount(cache_id)
            bases = [os.path.realpath(home / cache_id) + "/" for home in self._driver_homes()]
            for point in sorted((m.mountpoint for m in mountinfo() if any(m.mountpoint.startswith(b) for b in bases)),
                                reverse=True):
                with contextlib.suppress(OSError):
                    umount(point)
        return True

    def _driver_homes(self) -> list[Path]:
        """The driver's areas: its home under the root, and under the image store when there is one."""
        name = self.driver.name
        return [self.root / name] + ([] if self.store.image_root is None else [self.store.image_root / name])

    # -- references and removal -----------------------------------------------------------------------
    def retain(self, chain: str) -> Layer:
        with self.db.tx() as db:
            if db.execute(
                "UPDATE layers SET refs=refs+1 WHERE chain_id=? AND state='committed'", (chain,)
            ).rowcount != 1:
                raise LayerNotFound(f"layer {chain} not found")
        return self.get(chain)

    def release(self, chain: str) -> list[ChainID]:
        """Drop one explicit reference (``layer rm``); delete the layer, and parents nothing needs, when
        nothing uses it any more.

        Every user is counted in the transaction that drops the reference: references held by images and
        containers are not the caller's to drop, and a layer with child layers or mounts keeps its last one.
        """
        me = self.db.me
        with self.mount_lock(), self.db.tx() as db:
            row = db.execute(
                "SELECT id, refs, parent FROM layers WHERE chain_id=? AND state='committed' AND rw=0", (chain,)
            ).fetchone()
            if row is None:
                raise LayerNotFound(f"layer {chain} not found")
            lid, refs, parent = row
            users = _users(db, lid)
            held = len(users["images"]) + len(users["containers"])
            if refs <= held:
                if not held:
                    raise LayerInUse(f"layer {_short(chain)} is in use by an operation and holds no reference to drop")
                raise LayerInUse(f"layer {_short(chain)} is used by {_describe(users)}; remove those first")
            if refs == 1 and users["layers"]:
                raise LayerInUse(
                    f"layer {_short(chain)} has child layers ({_describe({'layers': users['layers']})}); "
                    "remove them first"
                )
            if self.mount_count(lid):
                raise LayerInUse(f"layer {_short(chain)} is mounted")
            db.execute("UPDATE layers SET refs=refs-1 WHERE id=?", (lid,))
            gone = refs == 1 and not users["leases"]
            if gone:
                db.execute(
                    "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=?", (me[0], me[1], lid)
                )
        if not gone:
            return []
        self._destroy(lid)
        return [ChainID(chain)] + (self._remove_unused(parent) if parent else [])

    def unreference(self, db: sqlite3.Connection, chain: str) -> str:
        """Inside a caller's transaction: drop one reference without removing anything; returns the CacheID
        to hand to :meth:`collect` once the transaction is committed."""
        row = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)).fetchone()
        if row is None:
            raise LayerNotFound(f"layer {chain} not found")
        db.execute("UPDATE layers SET refs=MAX(refs-1, 0) WHERE id=?", (row[0],))
        return str(row[0])

    @staticmethod
    def reference(db: sqlite3.Connection, chain: str) -> str:
        """Inside a caller's transaction: take one reference on a committed layer; returns its CacheID."""
        row = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)).fetchone()
        if row is None:
            raise LayerNotFound(f"layer {chain} was removed")
        db.execute("UPDATE layers SET refs=refs+1 WHERE id=?", (row[0],))
        return str(row[0])

    # -- content --------------------------------------------------------------------------------------
    def _record(self, cache_id: str) -> Path:
        return self.records / f"{cache_id}.tsr"

    def _forget_record(self, cache_id: str) -> None:
        for p in (self._record(cache_id), self.records / f"{cache_id}.tsr.sup"):
            p.unlink(missing_ok=True)

    def export_exact(self, chain: str, *, verify: bool = True) -> ExactTarStream:
        """The exact tar stream of a layer, checked against its DiffID as it is read: an
        :class:`~lamina.errors.ExportError` at its end if the layer no longer matches.

        A tree driver's layer is assembled here, from the tar-split record kept while it was applied and
        the files under the driver's diff root; a driver that keeps streams (or a layer applied before
        lamina kept records) hands over its own stream."""
        from lamina.tar.split import ExactTarStream, assemble_segments

        layer = self.get(chain)
        expected = layer.diff_id if verify else None
        record = self._record(layer.cache_id)
        root = self.driver.diff_root(layer.cache_id) if record.exists() else None
        if root is not None:
            return ExactTarStream(assemble_segments(record, root), expected)
        return ExactTarStream(_pieces(self.driver.tar_stream(layer.cache_id)), expected)

    def has_record(self, cache_id: str) -> bool:
        """Whether lamina keeps the exact-export record of a layer (a tree driver's, applied by this lamina)."""
        return self._record(cache_id).exists()

    def audit(self, chain: str) -> list[str]:
        """Read a layer back whole (``lamina system check``): its exact stream must hash to its DiffID
        (:class:`ExportError` otherwise, or when it cannot be read), and a tree driver's files must be what
        the stream's entries say (:func:`lamina.fs.audit.compare`). Returns those differences."""
        from lamina.fs.audit import compare, real_root
        from lamina.tar.compression import DiffStream
        from lamina.tar.format import TarReader

        layer = self.get(chain)
        root = None if self.driver.capabilities().keeps_stream else self.driver.diff_root(layer.cache_id)
        # Owners and modes are compared only where they were applied as given: a store that real root owns
        # (not one made by another user, or inside a user namespace, where lamina cannot chown), and not
        # by a driver that keeps modes in extended attributes (overlay's force_mask).
        metadata = real_root() and os.stat(self.root).st_uid == 0 \
            and not self.config.options_for(self.driver.name).get("force_mask")
        raw = self.export_exact(chain, verify=False)
        stream = DiffStream(raw)
        try:
            reader = TarReader(stream)
            entries = iter(reader.next, None)
            if root is None:
                found = []
                for _ in entries:
                    pass
            else:
                found = [str(m) for m in compare(root, entries, metadata=metadata)]
            stream.drain()
            actual = stream.diff_id
        finally:
            stream.close()
            raw.close()
        if not found and actual != layer.diff_id:
            raise ExportError(f"its content no longer matches its DiffID (it reads back as {_short(actual)})")
        return found

    def changes(self, chain: str) -> list[Change]:
        layer = self.get(chain)
        parent = self.get(layer.parent).cache_id if layer.parent else None
        return self.changes_of(layer.cache_id, parent)

    # -- mounts ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def mount_lock(self) -> Iterator[None]:
        """Serializes mount references against the decisions that need none to exist (removals).
        Taken before any database transaction, never inside one."""
        try:
            fd = os.open(self.runroot / "mounts.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            refused = self.db.refused() or self.db.refused(runroot=True)  # the store's reason comes first
            raise refused or write_failure(e, "locking the store's mounts") from e
        try:
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreLocked(
                            f"store {self.root} is busy: another process has held its mount lock for "
                            f"{BUSY_TIMEOUT_S:.0f} s"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield
        finally:
            os.close(fd)

    def _holder(self, scoped: bool) -> str:
        return f"pid:{self.db.me[0]}:{self.db.me[1]}" if scoped else "user"

    def mount(self, cache_id: str, options: list[str] | None = None, *, scoped: bool = False) -> str:
        """Take a mount reference; ``scoped`` ones die with this process, others last until unmount.

        The reference is recorded as this process's before the driver mounts, and becomes a lasting one
        after: a process killed in between leaves a reference of its own, which the next process reclaims
        (unmounting), never a mount that nothing counts."""
        mine = self._holder(True)
        driver = self.driver  # started before the mount lock is taken
        with self.mount_lock():
            row = self.db.one("SELECT rw FROM layers WHERE id=? AND state='committed'", (cache_id,))
            if row is None:
                raise LayerNotFound(f"layer {cache_id[:12]} was removed")
            refused = self.db.refused() if row[0] else None
            if refused is not None:
                raise refused  # a read-write layer that cannot be written
            with self.db.tx(runroot=True) as mdb:
                _add_ref(mdb, cache_id, mine, "")
            try:
                # Drivers mount idempotently, so a mount that vanished behind lamina's back comes back here.
                path = driver.mount(cache_id, list(options or []))
            except BaseException:
                with self.db.tx(runroot=True) as mdb:
                    _drop_ref(mdb, cache_id, mine)
                raise
            with self.db.tx(runroot=True) as mdb:
                if not scoped:
                    _drop_ref(mdb, cache_id, mine)
                _add_ref(mdb, cache_id, self._holder(scoped), path, count=0 if scoped else 1)
            return path

    def unmount(self, cache_id: str, force: bool = False, *, scoped: bool = False) -> int:
        """Drop one mount reference (every holder's with ``force``); return the count left."""
        holder = self._holder(scoped)
        self.driver  # noqa: B018  (started before the mount lock: an unmount may follow)
        with self.mount_lock():
            with self.db.tx(runroot=True) as mdb:
                if force:
                    mdb.execute("DELETE FROM mount_refs WHERE id=?", (cache_id,))
                else:
                    row = mdb.execute(
                        "SELECT count FROM mount_refs WHERE id=? AND holder=?", (cache_id, holder)
                    ).fetchone()
                    if row is None and not scoped:
                        # an unscoped unmount may release a reference of any holder (the CLI's view)
                        row = mdb.execute(
                            "SELECT count, holder FROM mount_refs WHERE id=? ORDER BY holder DESC LIMIT 1",
                            (cache_id,),
                        ).fetchone()
                        if row is not None:
                            holder = row[1]
                    if row is not None:
                        _drop_ref(mdb, cache_id, holder)
                last = self._take_last(mdb, cache_id)
            if last:
                self._unmount_taken([cache_id])
                return 0
            return self.mount_count(cache_id)

    def _take_last(self, mdb: sqlite3.Connection, cache_id: str) -> bool:
        """Inside a transaction on mounts.db, under the mount lock: when no reference to the layer is left,
        take one for this process until :meth:`_unmount_taken` has unmounted it (True), so that a process
        killed in between leaves the unmount to the next one, never a mount that nothing counts."""
        row = mdb.execute("SELECT SUM(count) FROM mount_refs WHERE id=?", (cache_id,)).fetchone()
        if row[0]:
            return False
        _add_ref(mdb, cache_id, self._holder(True), "")
        return True

    def _unmount_taken(self, cache_ids: list[str]) -> None:
        """Under the mount lock: unmount the layers :meth:`_take_last` took, then drop its references."""
        for lid in cache_ids:
            try:
                self.driver.unmount(lid)
            finally:
                with self.db.tx(runroot=True) as mdb:
                    _drop_ref(mdb, lid, self._holder(True))

    def mount_count(self, cache_id: str) -> int:
        row = self.db.one("SELECT SUM(count) FROM mount_refs WHERE id=?", (cache_id,), runroot=True)
        return int(row[0]) if row and row[0] is not None else 0

    @contextlib.contextmanager
    def mounted(self, cache_id: str) -> Iterator[str]:
        """A mount reference of this process for the block."""
        path = self.mount(cache_id, scoped=True)
        try:
            yield path
        finally:
            self.unmount(cache_id, scoped=True)

    # -- status ---------------------------------------------------------------------------------------
    def recorded_timings(self) -> dict[str, dict[str, Any]]:
        """Per-operation timings accumulated by every process since the runroot was created."""
        self.save_timings()
        rows = self.db.query("SELECT hook, calls, errors, total_s, max_s FROM timings ORDER BY hook", runroot=True)
        return {
            r[0]: {"calls": r[1], "errors": r[2], "total_ms": round(r[3] * 1000, 3), "max_ms": round(r[4] * 1000, 3)}
            for r in rows
        }

    def save_timings(self) -> None:
        """Add this process's hook timings to the run root's; statistics, so a run root that takes no writes
        (read-only, or full) keeps them out rather than failing the command."""
        stats = self.store.timings
        if not stats or self.db.run_refusal is not None:
            return
        try:
            with self.db.tx(runroot=True) as mdb:
                for hook, st in stats.items():
                    mdb.execute(
                        "INSERT INTO timings VALUES (?, ?, ?, ?, ?) ON CONFLICT(hook) DO UPDATE SET"
                        " calls=calls+excluded.calls, errors=errors+excluded.errors,"
                        " total_s=total_s+excluded.total_s, max_s=MAX(max_s, excluded.max_s)",
                        (hook, st.calls, st.errors, st.total_s, st.max_s),
                    )
        except (StoreFull, StoreReadOnly) as e:
            log.debug("hook timings not saved: %s", e)
            return
        stats.clear()


def _pieces(stream: ByteStream) -> Iterator[Segment]:
    """A driver's stream in pieces (an exact stream's as it makes them, file bodies as spans), closed at
    the end."""
    try:
        spans = getattr(stream, "segments", None)
        if spans is not None and not getattr(stream, "verified", False):
            yield from spans()
            return
        direct = getattr(stream, "chunks", None)
        if direct is not None:
            yield from direct()
            return
        while chunk := stream.read(1 << 20):
            yield chunk
    finally:
        stream.close()


def _add_ref(mdb: sqlite3.Connection, cache_id: str, holder: str, path: str, count: int = 1) -> None:
    """Inside a transaction on mounts.db: ``count`` more mount references of ``holder`` (0: set the path)."""
    mdb.execute(
        "INSERT INTO mount_refs VALUES (?, ?, ?, ?) ON CONFLICT(id, holder) DO UPDATE SET"
        " count=count+excluded.count, path=COALESCE(NULLIF(excluded.path, ''), path)",
        (cache_id, holder, count, path),
    )


def _drop_ref(mdb: sqlite3.Connection, cache_id: str, holder: str) -> None:
    """Inside a transaction on mounts.db: one mount reference of ``holder`` fewer (the row goes at zero)."""
    mdb.execute("UPDATE mount_refs SET count=count-1 WHERE id=? AND holder=?", (cache_id, holder))
    mdb.execute("DELETE FROM mount_refs WHERE id=? AND holder=? AND count <= 0", (cache_id, holder))


def _same_driver(db: sqlite3.Connection, name: str) -> None:
    """Inside the transaction that starts a layer: the store still runs on this process's driver (``system
    migrate`` may have switched it since the process opened the store)."""
    row = db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()
    if row is not None and row[0] != name:
        raise StoreError(f"the store was switched to driver {row[0]!r} meanwhile; run the command again")


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _users(db: sqlite3.Connection, lid: str, *, leases: bool = True) -> dict[str, list[str]]:
    """Inside a transaction (or a read): every user of layer ``lid`` but mounts."""
    chain = db.execute("SELECT chain_id FROM layers WHERE id=?", (lid,)).fetchone()
    out: dict[str, list[str]] = {
        "images": [r[0] for r in db.execute("SELECT id FROM images WHERE top_layer=?", (chain[0],))]
        if chain and chain[0] else [],
        "containers": [r[0] for r in db.execute(
            "SELECT COALESCE(name, id) FROM containers WHERE init_layer=?", (lid,)
        )],
        "layers": [r[0] for r in db.execute("SELECT COALESCE(chain_id, id) FROM layers WHERE parent=?", (lid,))],
        "leases": [r[0] for r in db.execute("SELECT lease FROM lease_layers WHERE layer=?", (lid,))] if leases else [],
    }
    return out


def _describe(users: dict[str, list[str]]) -> str:
    parts = []
    for kind, singular in (("images", "image"), ("containers", "container"), ("layers", "layer")):
        names = users.get(kind, [])
        if names:
            shown = ", ".join(_short(n) if n.startswith("sha256:") or len(n) == 64 else n for n in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{singular}{'s' if len(names) > 1 else ''} {shown}{more}")
    return " and ".join(parts) or "another user"

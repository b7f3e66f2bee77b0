"""The layer store: layer metadata in SQLite, content in the active driver.

Layers are keyed by a driver-owned *CacheID* (random hex) and, once committed, by their *ChainID*
(unique). Every multi-step change is crash-safe through an explicit state machine:

``incomplete`` (row written and committed *before* the driver works; owner pid + start time recorded)
→ ``committed`` (one transaction, after the driver finished) or → ``removing`` → row deleted.

When a store is opened, rows left ``incomplete`` or ``removing`` by a process that no longer exists are
finished off: the driver's content is removed and the row deleted. Rows of live processes are left alone,
so several lamina processes can share one store. SQLite runs in WAL mode; write transactions are
``BEGIN IMMEDIATE`` with a busy timeout.

Mount reference counts live under the runroot (volatile, like the mounts themselves) in their own
SQLite file, and every first-mount/last-unmount runs under an ``fcntl`` lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lamina.config import Config
from lamina.digest import ChainID, DiffID, chain_id, parse_digest
from lamina.driver import ByteStream, Capabilities, Change, Driver, DriverInfo
from lamina.errors import (
    DriverConflict,
    DriverUnsupported,
    LaminaError,
    LayerInUse,
    LayerLimitExceeded,
    LayerNotFound,
    OperationUnsupported,
    StoreError,
    StoreLocked,
)
from lamina.plugins.discovery import DriverCatalog, activate, discover, lookup
from lamina.tar.compression import DiffStream, Readable, verify

log = logging.getLogger("lamina.store.layers")
SCHEMA_VERSION = 1
MAX_DEPTH = 1000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    chain_id TEXT UNIQUE,
    diff_id TEXT,
    parent TEXT REFERENCES layers(id),
    state TEXT NOT NULL CHECK (state IN ('incomplete', 'committed', 'removing')),
    rw INTEGER NOT NULL DEFAULT 0,
    owner_pid INTEGER,
    owner_start REAL,
    size INTEGER NOT NULL DEFAULT 0,
    tar_size INTEGER NOT NULL DEFAULT 0,
    compressed_digest TEXT,
    compression TEXT,
    refs INTEGER NOT NULL DEFAULT 0,
    depth INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS layer_leases (
    id TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    owner_start REAL,
    PRIMARY KEY (id, owner_pid)
);
"""


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


_BOOT_TIME: list[float] = []


def _proc_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if it is gone or a zombie.

    Read from /proc directly on Linux (the same arithmetic psutil does, without importing it on every
    command); psutil elsewhere.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        if not _BOOT_TIME:
            with open("/proc/stat", "rb") as f:
                _BOOT_TIME.append(float(next(ln for ln in f if ln.startswith(b"btime")).split()[1]))
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] == b"Z":
            return None
        return _BOOT_TIME[0] + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _owner_alive(pid: int | None, start: float | None) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return True
    actual = _proc_start(pid)
    return actual is not None and (start is None or abs(actual - start) < 1.0)


class LayerStore:
    def __init__(self, config: Config, *, catalog: DriverCatalog | None = None) -> None:
        self.config = config
        self.root = config.root
        self.runroot = config.runroot
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.runroot.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreError(f"cannot create store directories under {e.filename}: {e.strerror}") from e
        self._tx_lock = threading.RLock()
        self._db = self._connect(self.root / "lamina.db")
        self._mdb = self._connect(self.runroot / "mounts.db")
        self._mdb.execute(
            "CREATE TABLE IF NOT EXISTS timings (hook TEXT PRIMARY KEY, calls INTEGER, errors INTEGER,"
            " total_s REAL, max_s REAL)"
        )
        self._mdb.execute(
            "CREATE TABLE IF NOT EXISTS mount_refs (id TEXT NOT NULL, holder TEXT NOT NULL,"
            " count INTEGER NOT NULL, path TEXT NOT NULL, PRIMARY KEY (id, holder))"
        )
        try:
            self._init_schema()
            self.catalog = catalog if catalog is not None else discover()
            self.info, self.driver = self._select_driver()
            self.pm, self.observer = activate(self.info, self.driver, self.catalog.observers)
            self._me = (os.getpid(), _proc_start(os.getpid()))
            self.recover()
        except BaseException:
            self._db.close()
            self._mdb.close()
            raise

    # -- setup ----------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store database {path}: {e}") from e
        return db

    @contextlib.contextmanager
    def _tx(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        db = db or self._db
        with self._tx_lock:  # a connection is shared by this process's threads (concurrent pulls)
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreLocked(f"store {self.root} is busy: {e}") from e
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"store {self.root} was written by a newer lamina (schema {row[0]})")

    def stored_driver(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()
        return str(row[0]) if row else None

    def _probe(self, info: DriverInfo) -> None:
        info.cls.probe(self.root / info.cls.name, self.config.options_for(info.cls.name))

    def _select_driver(self) -> tuple[DriverInfo, Driver]:
        existing = self.stored_driver()
        wanted = self.config.driver
        if wanted and existing and wanted != existing:
            raise DriverConflict(
                f"store {self.root} was created with driver {existing!r}, not {wanted!r}; "
                f"use --driver {existing} or another --root"
            )
        name = wanted or existing
        if name:
            info = lookup(self.catalog, name)
            try:
                self._probe(info)
            except DriverUnsupported as e:
                others = [n for n in self.config.driver_priority if n != name and n in self.catalog.drivers]
                hint = f"; try --driver {others[0]}" if others and not existing else ""
                raise DriverUnsupported(f"driver {name!r} is not supported here: {e.message}{hint}") from e
        else:
            reasons: list[str] = []
            found: DriverInfo | None = None
            for cand in self.config.driver_priority:
                ci = self.catalog.drivers.get(cand)
                if ci is None:
                    reasons.append(f"{cand}: not installed")
                    continue
                try:
                    self._probe(ci)
                except DriverUnsupported as e:
                    reasons.append(f"{cand}: {e.message}")
                    continue
                found = ci
                break
            if found is None:
                raise DriverUnsupported("no storage driver in driver_priority works here: " + "; ".join(reasons))
            info = found
        name = info.cls.name
        home = self.root / name
        runhome = self.runroot / name
        home.mkdir(exist_ok=True, mode=0o700)
        runhome.mkdir(exist_ok=True, mode=0o700)
        try:
            driver = info.cls(home, runhome, self.config.options_for(name))
        except LaminaError:
            raise
        except Exception as e:
            raise DriverUnsupported(f"driver {name!r} from {info.source} failed to start: {e}") from e
        if existing is None:
            with self._tx() as db:
                row = db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('driver', ?)", (name,))
                elif row[0] != name:
                    raise DriverConflict(f"store {self.root} was just created with driver {row[0]!r}")
        return info, driver

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def capabilities(self) -> Capabilities:
        caps = self.hook.lamina_capabilities()
        assert isinstance(caps, Capabilities)
        return caps

    # -- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish off operations of dead processes (and drop their leases); return the CacheIDs cleaned."""
        rows = self._db.execute(
            "SELECT id, owner_pid, owner_start FROM layers WHERE state != 'committed'"
        ).fetchall()
        cleaned = []
        for lid, pid, start in rows:
            if _owner_alive(pid, start):
                continue
            try:
                self.hook.lamina_remove(layer_id=lid)
            except Exception as e:
                # Leave the row for a later attempt; the store stays usable meanwhile.
                log.warning("could not yet remove the leftovers of layer %s: %s", lid[:12], e)
                continue
            with self._tx() as db:
                db.execute(
                    "DELETE FROM layers WHERE id=? AND state != 'committed' AND owner_pid IS ?", (lid, pid)
                )
            cleaned.append(lid)
        dead = {
            pid for pid, start in self._db.execute(
                "SELECT DISTINCT owner_pid, owner_start FROM layer_leases"
            ).fetchall() if not _owner_alive(pid, start)
        }
        for pid in sorted(dead):
            with self._tx() as db:
                ids = self.clear_leases(db, pid)
            self.collect(ids)
        # Layers a killed process had just released (refs 0) but not yet removed: nothing keeps them.
        orphans = [r[0] for r in self._db.execute(
            "SELECT id FROM layers l WHERE state='committed' AND rw=0 AND refs=0"
            " AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM layer_leases k WHERE k.id=l.id)"
        ).fetchall()]
        if orphans:
            self.collect(orphans)
        self._reclaim_mounts()
        return cleaned

    def _reclaim_mounts(self) -> None:
        """Drop mount references of processes that are gone; unmount what nobody holds any more."""
        rows = self._mdb.execute("SELECT DISTINCT holder FROM mount_refs WHERE holder LIKE 'pid:%'").fetchall()
        dead = []
        for (holder,) in rows:
            _, pid, start = holder.split(":", 2)
            if not _owner_alive(int(pid), float(start) if start != "None" else None):
                dead.append(holder)
        gone = [
            r[0] for r in self._mdb.execute("SELECT DISTINCT id FROM mount_refs").fetchall()
            if self._db.execute("SELECT 1 FROM layers WHERE id=?", (r[0],)).fetchone() is None
        ]
        if not dead and not gone:
            return
        with self._mount_lock():
            affected = set()
            with self._tx(self._mdb) as mdb:
                for holder in dead:
                    affected |= {r[0] for r in mdb.execute("SELECT id FROM mount_refs WHERE holder=?", (holder,))}
                    mdb.execute("DELETE FROM mount_refs WHERE holder=?", (holder,))
                for lid in gone:
                    mdb.execute("DELETE FROM mount_refs WHERE id=?", (lid,))
            for lid in sorted(affected - set(gone)):
                if self.mount_count(lid) == 0:
                    self.hook.lamina_unmount(layer_id=lid)

    # -- queries --------------------------------------------------------------------------------------
    _COLS = "id, chain_id, diff_id, parent, size, tar_size, compressed_digest, compression, refs, depth, created"

    def _layer(self, row: tuple[Any, ...]) -> Layer:
        parent_chain = None
        if row[3] is not None:
            p = self._db.execute("SELECT chain_id FROM layers WHERE id=?", (row[3],)).fetchone()
            parent_chain = ChainID(p[0]) if p else None
        return Layer(row[0], ChainID(row[1]), DiffID(row[2]), parent_chain, *row[4:])

    def get(self, chain: str) -> Layer:
        parse_digest(chain)
        row = self._db.execute(
            f"SELECT {self._COLS} FROM layers WHERE chain_id=? AND state='committed'", (chain,)
        ).fetchone()
        if row is None:
            raise LayerNotFound(f"layer {chain} not found")
        return self._layer(row)

    def find(self, ref: str) -> Layer:
        """A layer by full ChainID, or by a unique prefix of its hex (at least 3 characters)."""
        if ":" in ref:
            return self.get(ref)
        if len(ref) < 3 or any(c not in "0123456789abcdef" for c in ref):
            raise LayerNotFound(f"layer {ref!r} not found: give a ChainID or at least 3 hex characters of one")
        rows = self._db.execute(
            f"SELECT {self._COLS} FROM layers WHERE state='committed' AND chain_id LIKE ?",
            (f"sha256:{ref}%",),
        ).fetchall()
        if not rows:
            raise LayerNotFound(f"layer {ref!r} not found")
        if len(rows) > 1:
            raise LayerNotFound(f"layer prefix {ref!r} is ambiguous: " + ", ".join(r[1] for r in rows))
        return self._layer(rows[0])

    def all(self) -> list[Layer]:
        rows = self._db.execute(
            f"SELECT {self._COLS} FROM layers WHERE state='committed' AND rw=0 ORDER BY depth, created"
        ).fetchall()
        return [self._layer(r) for r in rows]

    def children(self, cache_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM layers WHERE parent=?", (cache_id,))]

    # -- registration ---------------------------------------------------------------------------------
    def register(
        self,
        src: Readable | BinaryIO,
        parent: str | None = None,
        *,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
        lease: bool = False,
    ) -> Layer:
        """Apply a (possibly compressed) layer tar on ``parent`` and commit it; one new reference.

        With ``lease`` the layer gets no reference but a lease held by this process instead (see
        :meth:`end_leases`): image loads stack leased layers and then reference the top one, in the
        same transaction that commits the image.
        """
        parent_row = self.get(parent) if parent else None
        depth = parent_row.depth + 1 if parent_row else 1
        if depth > MAX_DEPTH:
            raise LayerLimitExceeded(f"layer chain deeper than {MAX_DEPTH} layers")
        stream = DiffStream(
            src,
            max_bytes=self.config.limits.max_layer_bytes,
            max_entries=self.config.limits.max_layer_entries,
            hash_compressed=expected_digest is not None,
        )
        lid = os.urandom(32).hex()
        pcache = parent_row.cache_id if parent_row else None
        with self._tx() as db:
            if pcache is not None and db.execute(
                "SELECT 1 FROM layers WHERE id=? AND state='committed'", (pcache,)
            ).fetchone() is None:
                raise LayerNotFound(f"parent layer {parent} was removed")
            db.execute(
                "INSERT INTO layers (id, parent, state, owner_pid, owner_start, depth, created)"
                " VALUES (?, ?, 'incomplete', ?, ?, ?, ?)",
                (lid, pcache, self._me[0], self._me[1], depth, time.time()),
            )
        try:
            self.hook.lamina_create(layer_id=lid, parent=pcache, rw=False)
            size = self.hook.lamina_apply_diff(layer_id=lid, parent=pcache, diff=stream)
            stream.drain()
            diff_id = stream.diff_id
            verify(diff_id, expected_diff_id, "layer DiffID")
            if expected_digest is not None:
                verify(str(stream.compressed_digest), expected_digest, "layer blob")
            chain = chain_id(parent_row.chain_id if parent_row else None, diff_id)
            with self._tx() as db:
                existing = db.execute(
                    "SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)
                ).fetchone()
                if existing is None:
                    db.execute(
                        "UPDATE layers SET state='committed', chain_id=?, diff_id=?, size=?, tar_size=?,"
                        " compression=?, compressed_digest=?, refs=?, owner_pid=NULL, owner_start=NULL"
                        " WHERE id=?",
                        (chain, diff_id, int(size or 0), stream.size, stream.compression,
                         stream.compressed_digest, 0 if lease else 1, lid),
                    )
                    if lease:
                        self._lease(db, lid)
                elif lease:
                    self._lease(db, existing[0])
                    db.execute("UPDATE layers SET state='removing' WHERE id=?", (lid,))
                else:
                    db.execute("UPDATE layers SET refs=refs+1 WHERE id=?", (existing[0],))
                    db.execute("UPDATE layers SET state='removing' WHERE id=?", (lid,))
        except BaseException:
            stream.close()
            self._discard(lid)
            raise
        stream.close()
        if existing is not None:
            self._discard(lid)  # same content already stored: the loser's work goes
        return self.get(chain)

    def _discard(self, lid: str) -> None:
        try:
            self.hook.lamina_remove(layer_id=lid)
        finally:
            with self._tx() as db:
                db.execute("DELETE FROM layers WHERE id=? AND state != 'committed'", (lid,))

    # -- read-write layers (containers) ---------------------------------------------------------------
    def create_rw(self, parent: str) -> str:
        """Create a read-write layer on committed layer ``parent`` (a ChainID); returns its CacheID.

        The row stays ``incomplete`` (owned by this process) until the caller commits it with
        :meth:`commit_rw` inside the transaction that records its owner (a container).
        """
        if not self.capabilities().supports_rw_layers:
            raise OperationUnsupported(f"driver {self.info.cls.name!r} has no read-write layers; use vfs or overlay")
        prow = self.get(parent)
        if prow.depth + 1 > MAX_DEPTH:
            raise LayerLimitExceeded(f"layer chain deeper than {MAX_DEPTH} layers")
        lid = os.urandom(32).hex()
        with self._tx() as db:
            db.execute(
                "INSERT INTO layers (id, parent, state, rw, owner_pid, owner_start, depth, created)"
                " VALUES (?, ?, 'incomplete', 1, ?, ?, ?, ?)",
                (lid, prow.cache_id, self._me[0], self._me[1], prow.depth + 1, time.time()),
            )
        try:
            self.hook.lamina_create(layer_id=lid, parent=prow.cache_id, rw=True)
        except BaseException:
            self._discard(lid)
            raise
        return lid

    def commit_rw(self, db: sqlite3.Connection, lid: str) -> None:
        db.execute(
            "UPDATE layers SET state='committed', owner_pid=NULL, owner_start=NULL WHERE id=? AND rw=1", (lid,)
        )

    def remove_rw(self, lid: str) -> None:
        """Unmount (every holder) and remove a read-write layer."""
        with self._tx() as db:
            db.execute(
                "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=? AND rw=1",
                (self._me[0], self._me[1], lid),
            )
        if self.mount_count(lid):
            self.unmount(lid, force=True)
        self.hook.lamina_unmount(layer_id=lid)
        self.hook.lamina_remove(layer_id=lid)
        with self._tx() as db:
            db.execute("DELETE FROM layers WHERE id=?", (lid,))

    def parent_of(self, cache_id: str) -> str | None:
        row = self._db.execute("SELECT parent FROM layers WHERE id=?", (cache_id,)).fetchone()
        return str(row[0]) if row and row[0] else None

    def changes_of(self, cache_id: str, parent: str | None) -> list[Change]:
        """Changes of a layer (committed or read-write) against ``parent`` (a CacheID, not necessarily the
        direct parent; None: everything)."""
        changes = self.hook.lamina_changes(layer_id=cache_id, parent=parent)
        if changes is None:
            raise OperationUnsupported(f"driver {self.info.cls.name!r} cannot list changes")
        return list(changes)

    def diff_of(self, cache_id: str, parent: str | None) -> ByteStream:
        stream: ByteStream | None = self.hook.lamina_diff(layer_id=cache_id, parent=parent)
        if stream is None:
            raise OperationUnsupported(f"driver {self.info.cls.name!r} cannot produce diffs")
        return stream

    def diff_size_of(self, cache_id: str, parent: str | None) -> int:
        return int(self.hook.lamina_diff_size(layer_id=cache_id, parent=parent) or 0)

    # -- leases ---------------------------------------------------------------------------------------
    def _lease(self, db: sqlite3.Connection, lid: str) -> None:
        db.execute("INSERT OR IGNORE INTO layer_leases VALUES (?, ?, ?)", (lid, self._me[0], self._me[1]))

    def lease(self, chain: str) -> Layer:
        """Keep an existing layer alive for this process until :meth:`end_leases`, without a reference.

        Leases are per process (several may lease one layer); a layer with a live lease is never collected.
        """
        layer = self.get(chain)
        with self._tx() as db:
            self._lease(db, layer.cache_id)
        return layer

    def clear_leases(self, db: sqlite3.Connection, pid: int | None = None) -> list[str]:
        """Inside a caller's transaction: drop the leases of ``pid`` (this process by default).

        Returns the CacheIDs that were leased; :meth:`collect` removes those nothing keeps any more.
        """
        pid = self._me[0] if pid is None else pid
        rows = db.execute("SELECT id FROM layer_leases WHERE owner_pid=?", (pid,)).fetchall()
        db.execute("DELETE FROM layer_leases WHERE owner_pid=?", (pid,))
        return [r[0] for r in rows]

    def _leased(self, lid: str) -> bool:
        rows = self._db.execute("SELECT owner_pid, owner_start FROM layer_leases WHERE id=?", (lid,)).fetchall()
        return any(_owner_alive(pid, start) for pid, start in rows)

    def end_leases(self) -> list[ChainID]:
        """Drop this process's leases and remove the layers nothing else keeps."""
        with self._tx() as db:
            ids = self.clear_leases(db)
        return self.collect(ids)

    def collect(self, cache_ids: list[str]) -> list[ChainID]:
        """Remove those of ``cache_ids`` (and then their parents) that have no reference, child or live lease."""
        removed: list[ChainID] = []
        for lid in cache_ids:
            row = self._db.execute(
                "SELECT chain_id FROM layers WHERE id=? AND state='committed'", (lid,)
            ).fetchone()
            if row is not None:
                removed += self._remove_unused(self.get(row[0]))
        return removed

    def _remove_unused(self, layer: Layer | None) -> list[ChainID]:
        removed: list[ChainID] = []
        cur = layer
        while cur is not None:
            with self._tx() as db:
                row = db.execute(
                    "SELECT refs, parent, owner_pid, owner_start FROM layers WHERE id=? AND state='committed'",
                    (cur.cache_id,),
                ).fetchone()
                if row is None or row[0] > 0 or self.children(cur.cache_id) or self.mount_count(cur.cache_id):
                    break
                if self._leased(cur.cache_id):
                    break
                db.execute(
                    "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=?",
                    (self._me[0], self._me[1], cur.cache_id),
                )
            self.hook.lamina_remove(layer_id=cur.cache_id)
            with self._tx() as db:
                db.execute("DELETE FROM layers WHERE id=?", (cur.cache_id,))
                db.execute("DELETE FROM layer_leases WHERE id=?", (cur.cache_id,))
            removed.append(cur.chain_id)
            cur = self.get(cur.parent) if cur.parent else None
        return removed

    # -- references and removal -----------------------------------------------------------------------
    def retain(self, chain: str) -> Layer:
        layer = self.get(chain)
        with self._tx() as db:
            db.execute("UPDATE layers SET refs=refs+1 WHERE id=?", (layer.cache_id,))
        return self.get(chain)

    def release(self, chain: str) -> list[ChainID]:
        """Drop one reference; delete the layer (and parents nobody needs) when none remain."""
        layer = self.get(chain)
        with self._tx() as db:
            if layer.refs <= 1 and self.children(layer.cache_id):
                raise LayerInUse(f"layer {chain} has child layers; remove them first")
            if self.mount_count(layer.cache_id):
                raise LayerInUse(f"layer {chain} is mounted")
            db.execute("UPDATE layers SET refs=MAX(refs-1, 0) WHERE id=?", (layer.cache_id,))
        return self._remove_unused(layer)

    def unreference(self, db: sqlite3.Connection, chain: str) -> str:
        """Inside a caller's transaction: drop one reference without removing anything; returns the CacheID
        to hand to :meth:`collect` once the transaction is committed."""
        row = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)).fetchone()
        if row is None:
            raise LayerNotFound(f"layer {chain} not found")
        db.execute("UPDATE layers SET refs=MAX(refs-1, 0) WHERE id=?", (row[0],))
        return str(row[0])

    def reference(self, db: sqlite3.Connection, chain: str) -> None:
        """Inside a caller's transaction: take one reference on a committed layer."""
        cur = db.execute("UPDATE layers SET refs=refs+1 WHERE chain_id=? AND state='committed'", (chain,))
        if cur.rowcount != 1:
            raise LayerNotFound(f"layer {chain} was removed")

    # -- content --------------------------------------------------------------------------------------
    def export(self, chain: str) -> ByteStream:
        layer = self.get(chain)
        stream: ByteStream | None = self.hook.lamina_tar_stream(layer_id=layer.cache_id)
        if stream is None:
            raise OperationUnsupported(f"driver {self.info.cls.name!r} cannot stream layers")
        return stream

    def changes(self, chain: str) -> list[Change]:
        layer = self.get(chain)
        parent = self.get(layer.parent).cache_id if layer.parent else None
        changes = self.hook.lamina_changes(layer_id=layer.cache_id, parent=parent)
        if changes is None:
            raise OperationUnsupported(f"driver {self.info.cls.name!r} cannot list changes")
        return list(changes)

    # -- mounts ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mount_lock(self) -> Iterator[None]:
        fd = os.open(self.runroot / "mounts.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _holder(self, scoped: bool) -> str:
        return f"pid:{self._me[0]}:{self._me[1]}" if scoped else "user"

    def mount(self, cache_id: str, options: list[str] | None = None, *, scoped: bool = False) -> str:
        """Take a mount reference; ``scoped`` ones die with this process, others last until unmount."""
        caps = self.capabilities()
        if not caps.can_mount:
            raise OperationUnsupported(
                f"{self.info.cls.name} driver cannot mount; use a driver that can (vfs or overlay)"
            )
        holder = self._holder(scoped)
        with self._mount_lock():
            # Drivers mount idempotently, so a mount that vanished behind lamina's back comes back here.
            path = str(self.hook.lamina_mount(layer_id=cache_id, options=list(options or [])))
            with self._tx(self._mdb) as mdb:
                mdb.execute(
                    "INSERT INTO mount_refs VALUES (?, ?, 1, ?) ON CONFLICT(id, holder) DO UPDATE SET"
                    " count=count+1, path=excluded.path",
                    (cache_id, holder, path),
                )
            return path

    def unmount(self, cache_id: str, force: bool = False, *, scoped: bool = False) -> int:
        """Drop one mount reference (every holder's with ``force``); return the count left."""
        holder = self._holder(scoped)
        with self._mount_lock():
            with self._tx(self._mdb) as mdb:
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
                        if int(row[0]) <= 1:
                            mdb.execute("DELETE FROM mount_refs WHERE id=? AND holder=?", (cache_id, holder))
                        else:
                            mdb.execute(
                                "UPDATE mount_refs SET count=count-1 WHERE id=? AND holder=?", (cache_id, holder)
                            )
            left = self.mount_count(cache_id)
            if left == 0:
                self.hook.lamina_unmount(layer_id=cache_id)
            return left

    def mount_count(self, cache_id: str) -> int:
        row = self._mdb.execute("SELECT SUM(count) FROM mount_refs WHERE id=?", (cache_id,)).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # -- status ---------------------------------------------------------------------------------------
    def disk_usage(self) -> int:
        total = 0
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.root / self.info.cls.name):
            for n in filenames + dirnames:
                try:
                    st = os.lstat(os.path.join(dirpath, n))
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total

    def recorded_timings(self) -> dict[str, dict[str, Any]]:
        """Per-operation timings accumulated by every process since the runroot was created."""
        self._save_timings()
        rows = self._mdb.execute("SELECT hook, calls, errors, total_s, max_s FROM timings ORDER BY hook")
        return {
            r[0]: {"calls": r[1], "errors": r[2], "total_ms": round(r[3] * 1000, 3), "max_ms": round(r[4] * 1000, 3)}
            for r in rows
        }

    def _save_timings(self) -> None:
        stats = self.observer.stats
        if not stats:
            return
        with self._tx(self._mdb) as mdb:
            for hook, st in stats.items():
                mdb.execute(
                    "INSERT INTO timings VALUES (?, ?, ?, ?, ?) ON CONFLICT(hook) DO UPDATE SET"
                    " calls=calls+excluded.calls, errors=errors+excluded.errors,"
                    " total_s=total_s+excluded.total_s, max_s=MAX(max_s, excluded.max_s)",
                    (hook, st.calls, st.errors, st.total_s, st.max_s),
                )
        stats.clear()

    def close(self) -> None:
        try:
            self.hook.lamina_cleanup()
            self._save_timings()
        finally:
            self._db.close()
            self._mdb.close()

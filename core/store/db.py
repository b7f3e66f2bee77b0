"""The store's database: connections, the schema and its migrations, transactions, process identity.

Two SQLite files: ``root/lamina.db`` (layers, images, names, containers, leases: what must survive a
reboot) and ``runroot/mounts.db`` (mount references, timings and the event log: as volatile as the
mounts). Both run in WAL mode; every write is a ``BEGIN IMMEDIATE`` transaction with a busy timeout, so
a check and the act it decides happen under one write lock, whichever process runs them.

No ``sqlite3`` exception leaves this module's callers: opening maps them to :class:`StoreError`, a busy
store to :class:`StoreLocked`, a full disk (SQLITE_FULL) to :class:`StoreFull`, a read-only one to
:class:`StoreReadOnly`, and a transaction that fails on a constraint to :class:`StoreError` naming the
statement's table (a bug in lamina, never a user's mistake, but still one line).

A database whose filesystem is mounted read-only is opened read-only, and so is one that cannot even be
opened for writing because its filesystem is full (SQLite needs room for its ``-shm`` and ``-wal`` files):
reads work, and every transaction that writes fails with the reason (:attr:`Database.refusal`). Without
its ``-wal`` file such a database is opened ``immutable`` (nothing can change it while its filesystem takes
no writes); a read-only run root without ``mounts.db`` gets an empty one in memory (nothing is mounted).

A row that a process owns while it works (an incomplete layer, a container being created, a lease) records
the owner's pid and start time; :func:`owner_alive` tells whether that process still runs, so the next
process can finish off what a killed one left.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lamina.errors import StoreError, StoreFull, StoreLocked, StoreReadOnly

SCHEMA_VERSION = 5  # see _SCHEMA: an older lamina must not open a store whose records it would not keep
IMAGE_STORE_SCHEMA = 6  # the same tables; only a store made with an image store has it (see _SCHEMA)
BUSY_TIMEOUT_S = 60.0
# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode, extended codes masked)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 5, 6, 8, 10, 13, 14
# An I/O error opening a database on a filesystem with less room than this is the full disk's doing
_ROOM_TO_OPEN = 1 << 20

# One place for every table of lamina.db. Version 1 kept leases per process (layer_leases, content_leases);
# version 2 has lease objects that own layers and blobs; version 3 has the same tables, and the exact-export
# records of tree drivers' layers under <root>/tar-split, which an older lamina would not know to keep;
# version 4 adds when each image and layer was last used (``last_used``, for prune policies) and the size
# of each blob an image needs (``image_blobs.size``, for the disk-usage accounting); version 5 records each
# image's config labels (``images.labels``, JSON), so that listing images reads no config file, and an index
# that covers the content store's totals (``image_blobs_sizes``), with partial indexes that find unfinished
# layers and containers (every command's recovery check) without reading every row. Version 6 has the same
# tables and is given only to a store made with an image store (``meta.image_store``: its image layers, blobs
# and records are there, where an older lamina would not look for them); every other store stays at 5.
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
    created REAL NOT NULL,
    last_used REAL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE INDEX IF NOT EXISTS layers_unfinished ON layers(state) WHERE state != 'committed';
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    owner_pid INTEGER NOT NULL,
    owner_start REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_layers (
    lease TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
    layer TEXT NOT NULL,
    PRIMARY KEY (lease, layer)
);
CREATE INDEX IF NOT EXISTS lease_layers_layer ON lease_layers(layer);
CREATE TABLE IF NOT EXISTS lease_blobs (
    lease TEXT NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    PRIMARY KEY (lease, digest)
);
CREATE INDEX IF NOT EXISTS lease_blobs_digest ON lease_blobs(digest);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    top_layer TEXT,
    parent TEXT,
    created REAL,
    loaded REAL NOT NULL,
    last_updated REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT '',
    last_used REAL,
    labels TEXT
);
CREATE INDEX IF NOT EXISTS images_parent ON images(parent);
CREATE INDEX IF NOT EXISTS images_top_layer ON images(top_layer);
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
    size INTEGER,
    PRIMARY KEY (image_id, digest)
);
CREATE INDEX IF NOT EXISTS image_blobs_digest ON image_blobs(digest);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE,
    image_id TEXT NOT NULL,
    init_layer TEXT,
    rw_layer TEXT,
    created REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL CHECK (state IN ('creating', 'created', 'removing')),
    status TEXT NOT NULL DEFAULT 'created',
    exit_code INTEGER,
    run_pid INTEGER,
    run_start REAL,
    owner_pid INTEGER,
    owner_start REAL
);
CREATE INDEX IF NOT EXISTS containers_image ON containers(image_id);
CREATE INDEX IF NOT EXISTS containers_init ON containers(init_layer);
CREATE INDEX IF NOT EXISTS containers_unfinished ON containers(state) WHERE state != 'created';
"""

_RUN_SCHEMA = """
CREATE TABLE IF NOT EXISTS timings (hook TEXT PRIMARY KEY, calls INTEGER, errors INTEGER, total_s REAL,
    max_s REAL);
CREATE TABLE IF NOT EXISTS mount_refs (id TEXT NOT NULL, holder TEXT NOT NULL, count INTEGER NOT NULL,
    path TEXT NOT NULL, PRIMARY KEY (id, holder));
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, time_ns INTEGER NOT NULL,
    type TEXT NOT NULL, action TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, attrs TEXT NOT NULL);
"""
_RUN_TABLES = ("timings", "mount_refs", "events")

_BOOT_TIME: list[float] = []


def proc_start(pid: int) -> float | None:
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


_GONE: list[bool] = []  # non-empty within counted_as_gone()


@contextlib.contextmanager
def counted_as_gone() -> Iterator[None]:
    """Within the block this process counts as gone to :func:`owner_alive`: what it owns is anyone's to
    finish off (a process stopped by a signal cleans up after itself as the next process would)."""
    _GONE.append(True)
    try:
        yield
    finally:
        _GONE.pop()


def owner_alive(pid: int | None, start: float | None) -> bool:
    """Whether the process that recorded (``pid``, ``start``) still runs (pids are reused: compare starts)."""
    if pid is None:
        return False
    if pid == os.getpid():
        return not _GONE
    actual = proc_start(pid)
    return actual is not None and (start is None or abs(actual - start) < 1.0)


def _code(e: sqlite3.Error) -> int:
    return int(getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


def _statvfs(path: Path) -> os.statvfs_result | None:
    try:
        return os.statvfs(path)
    except OSError:
        return None


def _fs_read_only(path: Path) -> bool:
    st = _statvfs(path)
    return st is not None and bool(st.f_flag & os.ST_RDONLY)


def _fs_full(path: Path) -> bool:
    st = _statvfs(path)
    return st is not None and st.f_bavail * st.f_frsize < _ROOM_TO_OPEN


def _connect_read_only(path: Path, *, run: bool) -> sqlite3.Connection:
    """Open ``path`` for reading only, on a filesystem that takes no writes (see the module's docstring)."""
    if not path.exists():
        if not run:
            raise StoreReadOnly(f"no store at {path.parent}, and its file system takes no writes to create one")
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        db.executescript(_RUN_SCHEMA)
    else:
        wal = path.with_name(path.name + "-wal")
        mode = "mode=ro" if wal.exists() and wal.stat().st_size else "mode=ro&immutable=1"
        uri = f"file:{urllib.parse.quote(str(path.absolute()))}?{mode}"  # (not urllib.request: its import is slow)
        try:
            db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open store database {path} read-only: {e}") from e
    db.execute("PRAGMA query_only=ON")  # a write fails with SQLITE_READONLY, mapped to the refusal
    return db


def _open(path: Path, what: str, *, run: bool) -> tuple[sqlite3.Connection, StoreError | None]:
    """A connection to ``path``, and why it takes no writes (None when it does)."""
    if _fs_read_only(path.parent):
        refusal: StoreError = StoreReadOnly(f"{what} is read-only: its file system is mounted read-only")
        return _connect_read_only(path, run=run), refusal
    try:
        return _connect(path), None
    except StoreFull as e:
        return _connect_read_only(path, run=run), e


def _connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` in WAL mode. A database another process is creating at this instant can refuse the
    switch to WAL with "locked" without waiting on the busy timeout, so that step is retried."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.002
    while True:
        db = None
        try:
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            return db
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            busy = "locked" in str(e) or "busy" in str(e)
            if busy and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
                continue
            if _code(e) in (_SQLITE_FULL, _SQLITE_IOERR, _SQLITE_CANTOPEN) and _fs_full(path.parent):
                raise StoreFull(f"no space left on device while opening the store database {path}") from e
            raise StoreError(f"cannot open store database {path}: {e}") from e


class Database:
    """Both of a store's SQLite files, with this process's identity for the rows it owns."""

    def __init__(self, root: Path, runroot: Path, *, shared: bool = False) -> None:
        """``shared``: another store's database, used read-only whatever its file system allows (an
        additional image store); its run root is this process's memory."""
        self.root = root
        self.runroot = runroot
        self.me: tuple[int, float | None] = (os.getpid(), proc_start(os.getpid()))
        self._lock = threading.RLock()  # one connection per file, shared by this process's threads
        # images stored before schema 5 whose labels are not recorded yet (ImageStore.record_labels)
        self.labels_pending = False
        self.labels_recorded = True  # False: an additional image store of schema 4, without images.labels
        # Why lamina.db (refusal) or mounts.db (run_refusal) takes no writes now: None, or the error to raise
        if shared:
            self.db = _connect_read_only(root / "lamina.db", run=False)
            self.refusal: StoreError | None = StoreReadOnly(
                f"{root} is an additional image store: lamina only reads it")
            self.mdb = _connect_read_only(Path("/nonexistent/mounts.db"), run=True)
            self.run_refusal: StoreError | None = None
            try:
                self._check_shared_schema()
            except BaseException:
                self.close()
                raise
            return
        self.db, self.refusal = _open(root / "lamina.db", f"store {root}", run=False)
        try:
            self.mdb, self.run_refusal = _open(runroot / "mounts.db", f"run root {runroot}", run=True)
        except BaseException:
            self.db.close()
            raise
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    # -- transactions and queries -----------------------------------------------------------------------
    @contextlib.contextmanager
    def tx(self, *, runroot: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``) on lamina.db, or on mounts.db with ``runroot``.

        On a database that takes no writes (:attr:`refusal`) it is a read transaction, and the first
        statement that writes raises the refusal."""
        db = self.mdb if runroot else self.db
        refused = self.run_refusal if runroot else self.refusal
        with self._lock:
            try:
                db.execute("BEGIN" if refused else "BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._error(e, runroot, "cannot start a transaction") from e
            try:
                yield db
            except sqlite3.Error as e:
                self._rollback(db)
                raise self._error(e, runroot) from e
            except BaseException:
                self._rollback(db)
                raise
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    self._rollback(db)
                    raise self._error(e, runroot) from e

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction on lamina.db: every statement in it sees the same snapshot."""
        with self._lock:
            try:
                self.db.execute("BEGIN")
            except sqlite3.Error as e:
                raise self._error(e, False, "cannot start a transaction") from e
            try:
                yield self.db
            except sqlite3.Error as e:
                raise self._error(e, False) from e
            finally:
                self._rollback(self.db)

    def _error(self, e: sqlite3.Error, runroot: bool, doing: str = "store database error") -> StoreError:
        """The one-line error for a failed statement."""
        code = _code(e)
        path = self.runroot / "mounts.db" if runroot else self.root / "lamina.db"
        if code == _SQLITE_READONLY:
            return self.refused(runroot=runroot) or StoreReadOnly(f"store database {path} is read-only: {e}")
        if code == _SQLITE_FULL:
            return StoreFull(f"no space left on device while writing the store database {path} ({e})")
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(e) or "busy" in str(e):
            return StoreLocked(f"store {self.root} is busy: {e}")
        return StoreError(f"{doing}: {type(e).__name__}: {e}")

    def refused(self, *, runroot: bool = False) -> StoreError | None:
        """Why lamina.db (mounts.db with ``runroot``) takes no writes, as an error to raise; None if it does."""
        refusal = self.run_refusal if runroot else self.refusal
        return None if refusal is None else type(refusal)(refusal.message)

    def rollback(self) -> None:
        """Roll back a transaction an interrupt left open on either database."""
        with self._lock:
            self._rollback(self.db)
            self._rollback(self.mdb)

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        """Roll back what is left: after a full disk or an I/O error SQLite may have done it already."""
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def query(self, sql: str, params: tuple[Any, ...] = (), *, runroot: bool = False) -> list[Any]:
        """Rows of a read (a consistent snapshot of its own; inside :meth:`tx`, that transaction's view)."""
        with self._lock:
            try:
                return (self.mdb if runroot else self.db).execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise self._error(e, runroot) from e

    def one(self, sql: str, params: tuple[Any, ...] = (), *, runroot: bool = False) -> Any:
        rows = self.query(sql, params, runroot=runroot)
        return rows[0] if rows else None

    # -- schema -----------------------------------------------------------------------------------------
    def _init_schema(self) -> None:
        """Create or migrate the schema. Cheap when the version matches: one read, no write lock."""
        row = self._version()
        if row is not None and int(row) > IMAGE_STORE_SCHEMA:
            raise StoreError(f"store {self.root} was written by a newer lamina (schema {row})")
        if row is not None and int(row) < SCHEMA_VERSION and self.refusal is not None:
            raise StoreError(f"store {self.root} has schema {row}, this lamina needs {SCHEMA_VERSION}, and it takes "
                             f"no writes now ({self.refusal.message}): open it once where it can be written")
        if row is None or int(row) < SCHEMA_VERSION:
            self._create_schema()
        missing = self._run_missing()
        # a new run root (after a reboot) beside an existing store; one that takes no writes may lack the
        # event log (of an older lamina), which then records nothing
        if missing and (self.run_refusal is None or missing != {"events"}):
            with self.tx(runroot=True) as mdb:
                for statement in _RUN_SCHEMA.split(";"):
                    if statement.strip():
                        mdb.execute(statement)

    def _check_shared_schema(self) -> None:
        """An additional image store is read as it is, which this lamina may not migrate there: the present
        schema (5, or 6 with an image store), or version 4 (whose images have no recorded labels: its
        listings read the configs)."""
        version = self._version()
        if version is not None and int(version) == 4:
            self.labels_recorded = False
            return
        if version is None or int(version) not in (SCHEMA_VERSION, IMAGE_STORE_SCHEMA):
            newer = version is not None and int(version) > IMAGE_STORE_SCHEMA
            raise StoreError(
                f"additional image store {self.root} has schema {version or 'none'}, this lamina reads "
                f"4 to {IMAGE_STORE_SCHEMA}: "
                + ("update lamina" if newer else "open it once with this lamina where it is writable")
            )

    def _create_schema(self) -> None:
        with self.tx() as db:
            version = self._version()
            if version is not None and int(version) > IMAGE_STORE_SCHEMA:
                raise StoreError(f"store {self.root} was written by a newer lamina (schema {version})")
            if version is not None and int(version) >= SCHEMA_VERSION:
                return  # another process made or migrated it meanwhile (6 must not become 5 again)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version is not None and int(version) < 2:
                _migrate_v1_leases(db)
            for table, column in (("layers", "last_used REAL"), ("images", "last_used REAL"),
                                  ("image_blobs", "size INTEGER"),  # version 4
                                  ("images", "labels TEXT")):  # version 5
                if column.split()[0] not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            # (after the columns: a version 3 store gains image_blobs.size just above)
            db.execute("CREATE INDEX IF NOT EXISTS image_blobs_sizes ON image_blobs(digest, size, image_id)")
            if version is not None and int(version) < 5:
                # version 5: the labels of the images already stored are read from their configs by the
                # image layer (ImageStore.record_labels), which ends this mark; listings read configs meanwhile
                db.execute("INSERT OR REPLACE INTO meta VALUES ('labels_pending', '1')")
                self.labels_pending = True
            db.execute(
                "INSERT INTO meta VALUES ('schema', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def _version(self) -> str | None:
        """The schema version (None for a new database); also notes whether labels are still to be recorded."""
        try:
            rows = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN ('schema', 'labels_pending')"))
        except sqlite3.OperationalError:
            return None  # a new database: no meta table yet
        self.labels_pending = "labels_pending" in rows
        return str(rows["schema"]) if "schema" in rows else None

    def _run_missing(self) -> set[str]:
        try:
            found = {r[0] for r in self.mdb.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error:
            found = set()
        return set(_RUN_TABLES) - found

    def claim(self, table: str, row_id: str, owner: tuple[int | None, float | None], where: str,
              state: str | None = None) -> bool:
        """Take over a row that a process no longer running owned (``owner``), so that of several processes
        finishing off its work exactly one does; ``where`` narrows the row's states, ``state`` sets a new one.
        True when this process now owns it."""
        me = self.me
        sets = "owner_pid=?, owner_start=?" + (", state=?" if state else "")
        params: tuple[Any, ...] = (me[0], me[1], *((state,) if state else ()), row_id, owner[0], owner[1])
        with self.tx() as db:
            return db.execute(
                f"UPDATE {table} SET {sets} WHERE id=? AND {where} AND owner_pid IS ? AND owner_start IS ?", params
            ).rowcount == 1

    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key=?", (key,))
        return str(row[0]) if row else None

    def get_metas(self, *keys: str) -> dict[str, str]:
        """Those of ``keys`` the store records, in one read."""
        marks = ", ".join("?" * len(keys))
        return {str(k): str(v) for k, v in self.query(f"SELECT key, value FROM meta WHERE key IN ({marks})", keys)}

    def close(self) -> None:
        self.db.close()
        self.mdb.close()


def _migrate_v1_leases(db: sqlite3.Connection) -> None:
    """Version 1 leased per process; each process's leases become one lease object."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    now = time.time()
    if "layer_leases" in tables:
        for lid, pid, start in db.execute("SELECT id, owner_pid, owner_start FROM layer_leases").fetchall():
            db.execute("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, ?)", (f"pid-{pid}", pid, start, now))
            db.execute("INSERT OR IGNORE INTO lease_layers VALUES (?, ?)", (f"pid-{pid}", lid))
        db.execute("DROP TABLE layer_leases")
    if "content_leases" in tables:
        for digest, pid, start in db.execute("SELECT digest, owner_pid, owner_start FROM content_leases").fetchall():
            db.execute("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, ?)", (f"pid-{pid}", pid, start, now))
            db.execute("INSERT OR IGNORE INTO lease_blobs VALUES (?, ?)", (f"pid-{pid}", digest))
        db.execute("DROP TABLE content_leases")

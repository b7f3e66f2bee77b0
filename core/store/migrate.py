"""Moving a store to another storage driver in place (``lamina system migrate``).

Images are not touched at all: their IDs, names, manifests and blobs stay in ``lamina.db`` and the content
store as they are. What changes are the layers (every committed layer is made again by the new driver from
the old one's exact tar stream, under the same ChainID and checked against the same DiffID) and, with
``--containers``, each container's read-write layer (its changes against its init layer, read from the old
driver as a diff and applied by the new one on a copy of the init layer; the container keeps its ID, name,
labels and state). A store with containers is refused without ``--containers``.

The new driver's layers are made in a *staging store*: an ordinary lamina store at ``<root>/migrate``
(run root ``<runroot>/migrate``) that holds nothing but layers and containers, with ``state.json`` naming
the driver migrated from and to. The states, and what a kill in each leaves:

A. No ``<root>/migrate``: an ordinary store on the old driver.
B. *Copying*: ``<root>/migrate`` exists and ``meta.driver`` in ``lamina.db`` is still the old driver. The
   store works as before on the old driver (every other command goes on meanwhile); the staging store is
   brought up to date with it, layer by layer and container by container. A kill leaves half-made layers
   in the staging store, which its own recovery removes when the next ``system migrate`` opens it; that run
   copies only what is still missing (or has changed: a container that ran meanwhile is copied again).
C. *Switch*: one write transaction on ``lamina.db``, taken under the store's mount lock, checks that the
   staging store has exactly the store's layers (ChainIDs and DiffIDs) and containers, and that nothing is
   in flight (no lease, no layer or container half-made, nothing mounted, no container running); if so it
   replaces every layer row by the staging store's (CacheIDs of the new driver; references, sizes of the
   blobs and times kept), points each container at its new layers and sets ``meta.driver`` to the new
   driver. SQLite makes it all or nothing: killed before its commit the store is still in B (on the old
   driver), after it in D. When the store changed since the copy, the copy is brought up to date and the
   switch tried again.
D. *Moving*: ``meta.driver`` is the new driver and ``<root>/migrate/<new>`` (the new driver's home) still
   exists. The staging store's tar-split records are renamed into ``<root>/tar-split``, then its driver home
   into ``<root>/<new>``. Whichever process opens the store next does this (:class:`~lamina.store.kernel.Store`
   calls :func:`finish_switch` before it starts the driver), under the lock file ``<root>/migrate/lock``;
   every step can be repeated, so a kill in D is finished by the next command.
E. *Cleanup*, right after D by the same process: the records of the old layers, the old driver's home and
   run home, then the staging store (``<root>/migrate``, ``<runroot>/migrate``, ``state.json`` last) are
   removed. A kill leaves ``state.json`` naming the store's driver as the target, and the next process to
   open the store carries on with the cleanup. The records go first, so that a store in E has no file a
   check would count as an orphan but the old driver's home (which is no driver's of the store any more).

A store that keeps its images apart (``image_store``) has its staging store keep them at
``<image store>/migrate``: in D the staging image layers' home is renamed into ``<image store>/<new>``
first (the records into ``<image store>/tar-split``), and E also removes ``<image store>/<old>`` and
``<image store>/migrate``.

A process that opened the store before the switch and still runs after it would make layers with the old
driver: the layer store refuses to (it checks ``meta.driver`` in the transaction that starts a layer), so
such a command fails with a one-line error and works when run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import DriverConflict, LaminaError, LayerNotFound, StoreError, StoreLocked, write_failure
from lamina.tar.compression import DiffStream

if TYPE_CHECKING:
    from lamina.store.db import Database
    from lamina.store.kernel import Store

log = logging.getLogger("lamina.store.migrate")
STAGING = "migrate"
ATTEMPTS = 8  # switches tried while other commands keep changing the store


class MigrationRefused(StoreError):
    """The store cannot be migrated as it is (containers without ``--containers``, a mount, a running
    container)."""


Progress = Callable[[str], None]


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


# -- files ------------------------------------------------------------------------------------------------
def _remove_tree(path: Path) -> None:
    """Remove a directory tree, unmounting whatever is mounted below it first."""
    from lamina.fs.mounts import mountinfo, umount

    if not path.exists() and not path.is_symlink():
        return
    base = os.path.realpath(path) + "/"
    for point in sorted((m.mountpoint for m in mountinfo() if m.mountpoint.startswith(base)), reverse=True):
        with contextlib.suppress(OSError):
            umount(point)
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    shutil.rmtree(path)


def _read_state(root: Path) -> dict[str, str] | None:
    try:
        data = json.loads((root / STAGING / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(root: Path, state: dict[str, str]) -> None:
    tmp = root / STAGING / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, root / STAGING / "state.json")


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False (not locked) when it does not exist or, without
    ``wait``, when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# -- D and E: finishing the switch ----------------------------------------------------------------------
def finish_switch(root: Path, runroot: Path, db: Database, driver: str, image_root: Path | None = None) -> None:
    """States D and E: move the new driver's layers into place, then remove what the old driver kept.
    Called on opening a store that has a staging store; does nothing unless the switch to ``driver`` (the
    store's driver now) was made (in state B, while the copy is under way, a read of ``state.json``)."""
    staging = root / STAGING
    state = _read_state(root)
    if state is None or state.get("to") != driver:
        return
    with _flock(staging / "lock", wait=True) as locked:
        if not locked:
            return  # the staging store is gone: another process finished
        if (staging / driver).is_dir():
            _move_into_place(root, driver, image_root)
        cleanup(root, runroot, db, driver, image_root)


def _move_into_place(root: Path, driver: str, image_root: Path | None) -> None:
    """State D: the staging store's records, its image layers' home (with an image store), then its driver
    home, become the store's."""
    staging = root / STAGING
    try:
        if image_root is not None and (image_root / STAGING / driver).is_dir():
            _remove_tree(image_root / driver)
            os.rename(image_root / STAGING / driver, image_root / driver)
        records = (staging if image_root is None else image_root / STAGING) / "tar-split"
        dest = (image_root or root) / "tar-split"
        dest.mkdir(exist_ok=True, mode=0o700)
        if records.is_dir():
            for name in os.listdir(records):
                os.replace(records / name, dest / name)
        target = root / driver
        _remove_tree(target)  # the real home is still the staged one: anything here is a probe's
        os.rename(staging / driver, target)
    except OSError as e:
        raise write_failure(e, f"finishing the switch of {root} to driver {driver!r}") from e


def cleanup(root: Path, runroot: Path, db: Database, driver: str, image_root: Path | None = None) -> bool:
    """State E: remove the old driver's home, records no layer owns and the staging store. Returns whether
    there was a staging store. Failures are logged; what is left is removed by the next call."""
    staging = root / STAGING
    if not staging.exists():
        return False
    state = _read_state(root) or {}
    old = state.get("from")
    try:
        ids = {r[0] for r in db.query("SELECT id FROM layers")}
        records = (image_root or root) / "tar-split"
        for name in os.listdir(records) if records.is_dir() else []:
            if not name.startswith(".") and name.split(".", 1)[0] not in ids:
                (records / name).unlink(missing_ok=True)
        if old and old != driver and "/" not in old and not old.startswith("."):
            _remove_tree(root / old)
            _remove_tree(runroot / old)
            if image_root is not None:
                _remove_tree(image_root / old)
        _remove_tree(runroot / STAGING)
        if image_root is not None:
            _remove_tree(image_root / STAGING)
        for entry in list(staging.iterdir()):
            if entry.name not in ("state.json", "lock"):
                _remove_tree(entry)
        (staging / "state.json").unlink(missing_ok=True)
        _remove_tree(staging)
    except OSError as e:
        log.warning("could not yet remove what the migration from %s left: %s", old, e)
    return True


# -- B: the staging store -------------------------------------------------------------------------------
def _open_staging(main: Store, driver: str) -> Store:
    root = main.root / STAGING
    state = _read_state(main.root)
    if root.exists() and (state is None or state.get("to") != driver or state.get("from") != main.driver.name):
        _remove_tree(main.runroot / STAGING)
        _remove_tree(root)  # an abandoned migration to another driver
        if main.image_root is not None:
            _remove_tree(main.image_root / STAGING)
    try:
        root.mkdir(exist_ok=True, mode=0o700)
        _write_state(main.root, {"from": main.driver.name, "to": driver})
        _remove_tree(main.root / driver)  # not this store's: left by a probe or an earlier migration
        if main.image_root is not None:
            _remove_tree(main.image_root / driver)
    except OSError as e:
        raise write_failure(e, f"creating the staging store {root}") from e
    config = dataclasses.replace(main.config, root=root, runroot=main.runroot / STAGING, driver=driver,
                                 image_store=None if main.image_root is None else main.image_root / STAGING,
                                 additional_image_stores=())
    opened = type(main)  # the kernel's Store, which imports this module
    try:
        return opened(config)
    except DriverConflict:  # a staging store made for another driver and not yet marked
        _remove_tree(root)
        if main.image_root is not None:
            _remove_tree(main.image_root / STAGING)
        root.mkdir(mode=0o700)
        _write_state(main.root, {"from": main.driver.name, "to": driver})
        return opened(config)


_CONTAINER_COLS = "id, name, image_id, init_layer, rw_layer, created, labels, status, exit_code, run_start"


def _fingerprint(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """What tells whether a container changed since it was copied (a run, a restart)."""
    return (row[1], row[2], row[5], row[6], row[7], row[8], row[9])


def _sync_containers_out(main: Store, staging: Store) -> None:
    """Drop the staging store's containers that the store no longer has, or that changed since."""
    current = {r[0]: _fingerprint(r) for r in main.db.query(
        f"SELECT {_CONTAINER_COLS} FROM containers WHERE state='created'")}
    for row in staging.db.query(f"SELECT {_CONTAINER_COLS} FROM containers"):
        if current.get(row[0]) != _fingerprint(row):
            c = staging.containers.by_id(row[0])
            if c is not None:
                staging.containers.remove(c, force=True)


def _sync_layers(main: Store, staging: Store, progress: Progress) -> int:
    """Make in the staging store every committed layer of the store it lacks (and drop those the store no
    longer has); returns how many were made."""
    wanted = main.layers.all()  # parents first
    chains = {layer.chain_id for layer in wanted}
    for extra in reversed(staging.layers.all()):
        if extra.chain_id not in chains:
            staging.layers.release(extra.chain_id)
    have = {layer.chain_id for layer in staging.layers.all()}
    made = 0
    for layer in wanted:
        if layer.chain_id in have:
            continue
        with main.lease(reading=True) as lease:
            try:
                main.layers.lease(layer.chain_id, lease)
            except LayerNotFound:
                continue  # removed meanwhile
            stream = main.layers.export_exact(layer.chain_id)
            try:
                staging.layers.register(stream, layer.parent, expected_diff_id=layer.diff_id)
            except LayerNotFound:
                continue  # its parent was removed meanwhile
            finally:
                stream.close()
        made += 1
        progress(f"copied layer {_short(layer.chain_id)} ({made})")
    return made


def _sync_containers(main: Store, staging: Store, progress: Progress) -> int:
    """Copy each container the staging store lacks (or has an outdated copy of); returns how many."""
    _sync_containers_out(main, staging)
    staged = {r[0] for r in staging.db.query("SELECT id FROM containers")}
    done = 0
    for row in main.db.query(f"SELECT {_CONTAINER_COLS} FROM containers WHERE state='created' ORDER BY created"):
        cid, init, rw = row[0], row[3], row[4]
        if cid in staged:
            continue
        chain = main.db.one("SELECT chain_id FROM layers WHERE id=? AND state='committed'", (init,))
        if chain is None or not staging.layers.exists(chain[0]):
            continue  # removed meanwhile (the switch sees it)
        base = staging.layers.get(chain[0]).cache_id
        new_rw = staging.layers.create_rw(base)
        try:
            diff = main.layers.diff_of(rw, init)
            stream = DiffStream(diff)
            try:
                staging.driver.apply_diff(new_rw, base, stream)
                stream.drain()
            finally:
                stream.close()
                diff.close()
            with staging.db.tx() as db:
                staging.layers.reference(db, chain[0])
                staging.layers.commit_rw(db, new_rw)
                db.execute(
                    "INSERT INTO containers (id, name, image_id, init_layer, rw_layer, created, labels, state, status,"
                    " exit_code, run_start) VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?, ?, ?)",
                    (cid, row[1], row[2], base, new_rw, row[5], row[6], row[7], row[8], row[9]),
                )
        except LaminaError as e:
            with contextlib.suppress(Exception):
                staging.layers.remove_rw(new_rw)
            if main.containers.by_id(cid) is None:
                continue  # removed meanwhile
            raise StoreError(f"cannot copy container {row[1] or cid[:12]}: {e.message}") from e
        except BaseException:
            with contextlib.suppress(Exception):
                staging.layers.remove_rw(new_rw)
            raise
        done += 1
        progress(f"copied container {row[1] or cid[:12]}")
    return done


# -- C: the switch --------------------------------------------------------------------------------------
def _switch(main: Store, staging: Store, driver: str, containers: bool) -> str:
    """One transaction: ``done``, or ``busy`` (something is in flight), or ``behind`` (the staging store
    lacks something the store has now)."""
    from lamina.store.db import owner_alive

    s_layers = staging.db.query(
        "SELECT id, chain_id, diff_id, parent, rw, size, tar_size, depth FROM layers WHERE state='committed'"
        " ORDER BY depth")
    s_containers = {r[0]: r for r in staging.db.query(
        f"SELECT {_CONTAINER_COLS} FROM containers WHERE state='created'")}
    if staging.db.one("SELECT 1 FROM layers WHERE state != 'committed' LIMIT 1"):
        return "behind"
    with main.layers.mount_lock():
        if main.db.one("SELECT 1 FROM mount_refs LIMIT 1", runroot=True):
            raise MigrationRefused("a layer or container of the store is mounted; unmount it first (lamina umount)")
        with main.db.tx() as db:
            current = db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()
            if current is None or current[0] != main.driver.name:
                raise StoreError(f"the store was switched to driver {current[0] if current else '?'!r} meanwhile")
            if db.execute("SELECT 1 FROM leases LIMIT 1").fetchone() \
                    or db.execute("SELECT 1 FROM layers WHERE state != 'committed' LIMIT 1").fetchone() \
                    or db.execute("SELECT 1 FROM containers WHERE state != 'created' LIMIT 1").fetchone():
                return "busy"
            m_containers = {r[0]: r for r in db.execute(
                f"SELECT {_CONTAINER_COLS}, run_pid FROM containers WHERE state='created'")}
            for r in m_containers.values():
                if r[7] == "running" and owner_alive(r[10], r[9]):
                    raise MigrationRefused(f"container {r[1] or r[0][:12]} is running; stop it first")
            if m_containers and not containers:
                raise MigrationRefused(_containers_refusal(len(m_containers)))
            m_layers = {r[0]: r for r in db.execute(
                "SELECT chain_id, diff_id, refs, compressed_digest, compression, created, last_used FROM layers"
                " WHERE state='committed' AND rw=0")}
            s_chains = {r[1]: r for r in s_layers if not r[4]}
            if set(m_layers) != set(s_chains) or any(m_layers[c][1] != s_chains[c][2] for c in m_layers):
                return "behind"
            if set(m_containers) != set(s_containers) or any(
                    _fingerprint(m_containers[c][:10]) != _fingerprint(s_containers[c]) for c in m_containers):
                return "behind"
            rw_times = {r[0]: (r[1], r[2]) for r in db.execute(
                "SELECT l.id, l.created, l.last_used FROM layers l WHERE l.rw=1 AND l.state='committed'")}
            staged_rw = {s_containers[c][4]: m_containers[c][4] for c in s_containers}
            db.execute("DELETE FROM layers")
            for sid, chain, diff_id, parent, rw, size, tar_size, depth in s_layers:
                if rw:
                    if sid not in staged_rw:
                        continue  # a leftover no container uses (its files go with the staging store)
                    created, last_used = rw_times.get(staged_rw[sid], (time.time(), None))
                    refs, digest, compression = 0, None, None
                else:
                    _, _, refs, digest, compression, created, last_used = m_layers[chain]
                db.execute(
                    "INSERT INTO layers (id, chain_id, diff_id, parent, state, rw, size, tar_size, compressed_digest,"
                    " compression, refs, depth, created, last_used) VALUES (?, ?, ?, ?, 'committed', ?, ?, ?, ?, ?, ?,"
                    " ?, ?, ?)",
                    (sid, chain, diff_id, parent, rw, size, tar_size, digest, compression, refs, depth, created,
                     last_used),
                )
            for cid, r in s_containers.items():
                db.execute("UPDATE containers SET init_layer=?, rw_layer=? WHERE id=?", (r[3], r[4], cid))
            db.execute("UPDATE meta SET value=? WHERE key='driver'", (driver,))
    return "done"


def _containers_refusal(n: int) -> str:
    them = "them" if n > 1 else "it"
    return f"the store has {n} container{'s' if n > 1 else ''}: migrate {them} with --containers or remove {them}"


def migrate(main: Store, driver: str, *, containers: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Move the store to ``driver`` (states B to E above) and close it. Returns what was done."""
    say: Progress = progress or (lambda _msg: None)
    refused = main.db.refused()
    if refused is not None:
        raise refused
    old = main.driver.name
    result: dict[str, Any] = {"from": old, "to": driver, "layers": 0, "containers": 0,
                              "images": main.images.count(), "migrated": False}
    if old == driver:
        with _flock(main.root / STAGING / "run.lock", wait=False) as locked:
            if locked and cleanup(main.root, main.runroot, main.db, driver, main.image_root):  # not another migration's
                say("removed what an earlier migration left")
        main.close()
        return result
    n = int(main.db.one("SELECT COUNT(*) FROM containers")[0])
    if n and not containers:
        raise MigrationRefused(_containers_refusal(n))
    from lamina.plugins.discovery import discover, lookup

    lookup(discover(), driver)  # an unknown driver is an error (naming those there are) before anything is made
    (main.root / STAGING).mkdir(exist_ok=True, mode=0o700)
    with _flock(main.root / STAGING / "run.lock", wait=False) as locked:
        if not locked:
            raise StoreLocked(f"another lamina system migrate is running on {main.root}")
        staging = _open_staging(main, driver)
        try:
            for attempt in range(ATTEMPTS):
                main.recover()
                _sync_containers_out(main, staging)
                result["layers"] += _sync_layers(main, staging, say)
                if containers:
                    result["containers"] += _sync_containers(main, staging, say)
                outcome = _switch(main, staging, driver, containers)
                if outcome == "done":
                    break
                if outcome == "busy":
                    time.sleep(min(0.2 * 2 ** attempt, 3.0))
            else:
                raise StoreLocked(f"store {main.root} kept changing during the migration; run it again")
        finally:
            staging.close()
    say(f"switched the store to driver {driver}")
    main.close()
    config = dataclasses.replace(main.config, driver=None)
    type(main)(config).close()  # opening finishes the switch (states D and E)
    result["migrated"] = True
    return result

"""Leases: what keeps layers and blobs alive while an operation builds on them, without a reference.

An image load applies its layers before the image exists, a save reads blobs an ``rmi`` could collect, a
container's init layer is applied before the container commits. Each of them works inside a lease::

    with store.lease() as lease:
        layer = store.layers.register(stream, parent, lease=lease)   # leased, no reference
        store.images.create(new_image, lease=lease)                   # ends the lease in its transaction

A lease is a row owned by the creating process (pid and start time). Leasing a layer or blob is part of
the transaction that looks it up, so a collector running at the same moment either sees the lease or ran
first (and the lookup then fails cleanly). The lease ends itself when its block exits, whether the
operation succeeded or not, and what only it kept is collected; a killed process's leases are ended by the
next process that opens the store.
"""

from __future__ import annotations

import os
import sqlite3
import time
from types import TracebackType
from typing import TYPE_CHECKING

from lamina.errors import StoreError

if TYPE_CHECKING:
    from lamina.store.kernel import Store


class Lease:
    """``inert``: a lease of a reader in a read-only store, where nothing can be removed; it holds nothing."""

    def __init__(self, store: Store, *, inert: bool = False) -> None:
        self._store = store
        self.id = os.urandom(16).hex()
        self.inert = inert
        self.ended = False
        if inert:
            return
        me = store.db.me
        with store.db.tx() as db:
            db.execute("INSERT INTO leases VALUES (?, ?, ?, ?)", (self.id, me[0], me[1], time.time()))

    # -- inside a caller's transaction ----------------------------------------------------------------
    def add_layer(self, db: sqlite3.Connection, cache_id: str) -> None:
        self._check_open()
        if self.inert:
            return
        db.execute("INSERT OR IGNORE INTO lease_layers VALUES (?, ?)", (self.id, cache_id))

    def add_blob(self, db: sqlite3.Connection, digest: str) -> None:
        self._check_open()
        if self.inert:
            return
        db.execute("INSERT OR IGNORE INTO lease_blobs VALUES (?, ?)", (self.id, digest))

    def _check_open(self) -> None:
        if self.ended:
            raise StoreError(f"lease {self.id[:12]} has ended; nothing more can be held by it")

    def end_in(self, db: sqlite3.Connection) -> list[str]:
        """End the lease inside a caller's transaction that makes every blob it holds an image's (the image's
        creation); returns the layers it held, for collection once that transaction commits
        (:meth:`Store.collect`)."""
        if self.inert:
            return []
        return end_lease(db, self.id)  # the caller marks the lease ended once its transaction has committed

    # -- own transactions -----------------------------------------------------------------------------
    def blob(self, digest: str) -> None:
        """Protect a blob (present or about to be written) from collection while the lease lasts."""
        if self.inert:
            return
        with self._store.db.tx() as db:
            self.add_blob(db, digest)

    def end(self) -> None:
        """End the lease (if the operation has not already) and collect what only it kept."""
        if self.ended:
            return
        if not self.inert:
            end_leases(self._store, [self.id])
        self.ended = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.end()


def end_leases(store: Store, lease_ids: list[str]) -> list[str]:
    """End leases (this process's, or dead processes' in recovery) and collect what only they kept; returns
    the ChainIDs of the layers removed.

    The blobs go first, while the leases still record them: a process killed before the leases are ended
    leaves them to the next one, which collects again. Then the leases, then the layers they held (a layer
    left without any user by a kill just before is one that recovery's orphan collection finds)."""
    marks = ",".join("?" * len(lease_ids))
    candidates = [r[0] for r in store.db.query(
        f"SELECT DISTINCT digest FROM lease_blobs b WHERE lease IN ({marks}) AND NOT EXISTS"
        " (SELECT 1 FROM image_blobs i WHERE i.digest = b.digest)",
        tuple(lease_ids),
    )]
    if candidates:  # only these can have lost their last holder: no walk of the whole content store
        store.images.gc(ignoring=lease_ids, candidates=candidates)
    layers: list[str] = []
    with store.db.tx() as db:
        for lease_id in lease_ids:
            layers += end_lease(db, lease_id)
    return store.collect(layers)


def end_lease(db: sqlite3.Connection, lease_id: str) -> list[str]:
    """Inside a caller's transaction: delete lease ``lease_id``. Returns the layers it held, for collection
    once the transaction commits (blobs it held are the caller's to collect first: :func:`end_leases`)."""
    layers = [r[0] for r in db.execute("SELECT layer FROM lease_layers WHERE lease=?", (lease_id,))]
    db.execute("DELETE FROM leases WHERE id=?", (lease_id,))
    return layers

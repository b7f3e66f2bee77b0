"""``lamina system check``: is the store sound, and what would repair remove.

:func:`check` looks at the store from its rows down, reporting each problem on one line that names the
object and what is wrong with it:

- both databases' integrity (SQLite's own check, and foreign keys);
- every committed layer's content present in the driver, and its exact-export record present;
  without ``quick``: every layer read back whole, its stream hashed against its DiffID and its files
  compared with the entries it was applied from (:mod:`lamina.fs.audit`), and every content-store blob
  hashed against its digest;
- every image's config present (and, without ``quick``, a JSON document whose ``rootfs.diff_ids`` give
  the image's layer chain), every layer of its chain and every blob it records present;
- every container's image, init layer and read-write layer present;
- orphans: what the driver holds, records and blobs with no row or image naming them;
- leftovers: rows that processes which no longer run left in transient states, their leases, mount
  references and staging files, mounts under the store that nothing counts.

``quick`` reads no file contents: its cost grows with the rows, not with the bytes. The full check reads
each stored byte once.

The check changes nothing (it opens the store without recovery, so it sees what killed processes left).
:func:`repair` removes orphans and leftovers, and each damaged layer together with the layers and images
built on it; containers that need a damaged layer or image go only with ``force``. Every removal is
reported; nothing sound is removed (a damaged layer an operation is using right now is left, and named).

Problems are found without locking the store against other processes. Listings of files are taken
before the rows they are compared with (a layer's row exists before its files do and goes after them),
and each layer is held in a lease while it is read back. Other processes are caught between steps all the
same (a blob whose image went a moment ago and that their collection is about to unlink, a row they just
finished): every problem carries a check of whether it still holds, run again a moment after the pass
(:data:`SETTLE_S`) and once more by repair before it acts, so only what lasts is reported or removed.
Repair's removals check again in their own transactions (nothing in use goes, whatever the report said).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.digest import chain_id, chain_ids
from lamina.errors import DigestError, ExportUnreadable, LaminaError, LayerNotFound, StoreError
from lamina.store.db import owner_alive

if TYPE_CHECKING:
    from lamina.store.kernel import Store
    from lamina.store.leases import Lease

log = logging.getLogger("lamina.store.check")

# What repair does about a problem; the key names the object.
FIX_LAYER = "layer"  # a damaged layer: it goes with the layers, images (and with force, containers) on it
FIX_IMAGE = "image"  # a damaged image: it goes (and with force, its containers)
FIX_CONTAINER = "container"  # a damaged container: it goes with force
FIX_BLOB = "blob"  # a blob missing or not matching its digest: the file goes, and images forget it
FIX_DRIVER = "driver"  # what the driver holds for a layer with no row
FIX_RECORD = "record"  # an exact-export record with no layer
FIX_RW = "rw"  # a read-write layer no container uses
FIX_UNUSED = "unused"  # a committed layer nothing uses
FIX_RECOVER = "recover"  # rows, leases and mount references of processes that no longer run
FIX_GC = "gc"  # blobs nothing names
FIX_INGEST = "ingest"  # partial blob writes of processes that no longer run
FIX_UNMOUNT = "unmount"  # a mount of a layer that nothing counts

# How long a problem must last to be reported: what a concurrent operation was in the middle of (the moment
# between its transaction and its files) is over by then. Every problem is checked again after it.
SETTLE_S = 0.2


@dataclass(frozen=True)
class Problem:
    kind: str  # database, layer, image, container, blob, orphan, leftover
    object: str
    message: str
    fix: str | None = None  # one of the FIX_ values; None: repair cannot do anything about it
    key: str = ""
    # whether the problem is still there (a concurrent operation may have been in the middle of something)
    verify: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.object}: {self.message}"

    def still(self) -> bool:
        return self.verify is None or self.verify()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "message": self.message,
                "repairable": self.fix is not None}


@dataclass
class CheckReport:
    problems: list[Problem]
    removed: list[str]  # with repair: one line per thing removed
    left: list[Problem]  # with repair: what a check after it still found; else the problems
    repaired: bool = False

    @property
    def sound(self) -> bool:
        return not self.left

    def as_dict(self) -> dict[str, Any]:
        return {"sound": self.sound, "problems": [p.as_dict() for p in self.problems],
                "repaired": self.repaired, "removed": self.removed, "left": [p.as_dict() for p in self.left]}


def _short(digest: str | None) -> str:
    return (digest or "").split(":", 1)[-1][:12]


def _bounded(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit // 2 - 2] + "..." + text[-(limit // 2 - 2):]


class _Checker:
    def __init__(self, store: Store, quick: bool) -> None:
        self.store = store
        self.db = store.db
        self.layers = store.layers
        self.images = store.images
        self.driver = store.driver
        self.quick = quick
        self.problems: list[Problem] = []
        self.lease: Lease | None = None

    def add(self, kind: str, obj: str, message: str, fix: str | None = None, key: str = "",
            verify: Callable[[], bool] | None = None) -> None:
        self.problems.append(Problem(kind, _bounded(obj, 120), _bounded(message), fix, key, verify))

    def run(self) -> list[Problem]:
        if not self.quick:
            # holds each layer while it is read back; a store this process cannot write to (read-only) is
            # read without one
            with contextlib.suppress(StoreError):
                self.lease = self.store.lease()
        try:
            found = self._run()
        finally:
            if self.lease is not None:
                self._end_lease()
        if any(p.verify is not None for p in found):
            # What another process was in the middle of (a removal between its transaction and its files,
            # a row it just finished) is gone a moment later; what is left is a problem.
            time.sleep(SETTLE_S)
            found = [p for p in found if p.still()]
        return found

    def _end_lease(self) -> None:
        """A layer another process let go of while this check held it is collected here, as that process
        would have; one the check reports unused stays for repair to remove (a check changes nothing)."""
        assert self.lease is not None
        with self.db.tx() as db:
            held = self.lease.end_in(db)
        self.lease.ended = True
        reported = {p.key for p in self.problems if p.fix == FIX_UNUSED}
        self.store.collect([lid for lid in held if lid not in reported])

    def _run(self) -> list[Problem]:
        # listings of files first, the rows they are compared with after (see the module's doc)
        held = self.driver.layers()
        records = sorted(n for n in os.listdir(self.layers.records) if not n.startswith("."))
        blobs = [str(d) for d in self.images.content.walk()]
        ingest = sorted(os.listdir(self.images.content.ingest))
        if not self._database():
            return self.problems  # nothing read from a damaged database can be trusted
        rows = self._layer_rows()
        self._orphans(held, records, rows)
        self._images()
        self._containers(rows)
        self._blobs(blobs)
        self._leftovers(ingest)
        self._mounts()
        return self.problems

    # -- the databases ----------------------------------------------------------------------------------
    def _database(self) -> bool:
        ok = True
        pragma = "PRAGMA quick_check" if self.quick else "PRAGMA integrity_check"
        for name, runroot in (("lamina.db", False), ("mounts.db", True)):
            where = f"database {self.store.runroot / name if runroot else self.store.root / name}"
            found = [str(r[0]) for r in self.db.query(pragma, runroot=runroot)]  # unreadable: the check fails
            keys = self.db.query("PRAGMA foreign_key_check", runroot=runroot)
            if found != ["ok"]:
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                self.add("database", where, "; ".join(found[:3]) + more)
                ok = False
            for table, rowid, parent, _ in keys[:10]:
                self.add("database", where, f"row {rowid} of {table} names a missing row of {parent}")
                ok = False
        return ok

    # -- layers ---------------------------------------------------------------------------------------
    def _committed(self, lid: str) -> bool:
        return self.db.one("SELECT 1 FROM layers WHERE id=? AND state='committed'", (lid,)) is not None

    def _left_by(self, lid: str, state: str, pid: int | None, start: float | None) -> bool:
        row = self.db.one("SELECT state, owner_pid, owner_start FROM layers WHERE id=?", (lid,))
        return row is not None and tuple(row) == (state, pid, start) and not owner_alive(pid, start)

    def _layer_rows(self) -> dict[str, tuple[Any, ...]]:
        rows = {r[0]: r for r in self.db.query(
            "SELECT id, chain_id, diff_id, parent, state, rw, owner_pid, owner_start FROM layers"
        )}
        containers_rw = dict(self.db.query(
            "SELECT rw_layer, COALESCE(name, id) FROM containers WHERE rw_layer IS NOT NULL"
        ))
        keeps_stream = self.driver.capabilities().keeps_stream
        exists = self.driver.exists
        for lid, chain, diff_id, parent, state, rw, pid, start in rows.values():
            if state != "committed":
                if not owner_alive(pid, start):
                    self.add("leftover", f"layer {lid[:12]}", f"left {state} by process {pid}, which is gone",
                             FIX_RECOVER, verify=functools.partial(self._left_by, lid, state, pid, start))
                continue
            if rw:
                owner = containers_rw.get(lid)
                if owner is None:
                    self.add("orphan", f"read-write layer {lid[:12]}", "no container uses it", FIX_RW, lid,
                             verify=functools.partial(self._orphan_rw, lid))
                elif not exists(lid) and self._container_id(lid):
                    self.add("container", f"container {owner[:64]}",
                             f"its read-write layer {lid[:12]} is missing from the {self.driver.name} driver",
                             FIX_CONTAINER, self._container_id(lid),
                             verify=functools.partial(self._content_gone, lid))
                continue
            what = f"layer {_short(chain)}"
            if self._unused(lid, chain):
                self.add("leftover", what, "nothing uses it (no image, container, child layer or reference)",
                         FIX_UNUSED, lid, verify=functools.partial(self._unused, lid, chain))
            if not exists(lid):
                self.add("layer", what, f"its content is missing from the {self.driver.name} driver", FIX_LAYER,
                         lid, verify=functools.partial(self._content_gone, lid))
                continue
            pchain = rows[parent][1] if parent in rows else None
            if chain != chain_id(pchain, diff_id):
                self.add("layer", what, "its ChainID does not follow from its parent and DiffID", FIX_LAYER, lid,
                         verify=functools.partial(self._committed, lid))
                continue
            if not keeps_stream and not self._has_record(lid):
                self.add("layer", what, "its exact-export record is missing", FIX_LAYER, lid,
                         verify=functools.partial(self._record_gone, lid))
                continue
            if not self.quick:
                self._read_back(lid, chain, what)
        return rows

    # -- checks run again (Problem.verify) ------------------------------------------------------------
    def _content_gone(self, lid: str) -> bool:
        return self._committed(lid) and not self.driver.exists(lid)

    def _record_gone(self, lid: str) -> bool:
        return self._committed(lid) and not self._has_record(lid)

    def _orphan_file(self, lid: str, path: Path) -> bool:
        return self._no_row(lid) and path.exists()

    @staticmethod
    def _same(find: Callable[[str], str | None], key: str, why: str) -> bool:
        return find(key) == why

    def _row_there(self, table: str, key: str) -> bool:
        return self.db.one(f"SELECT 1 FROM {table} WHERE id=?", (key,)) is not None

    def _container_left_by(self, cid: str, state: str, pid: int | None, start: float | None) -> bool:
        row = self.db.one("SELECT state, owner_pid, owner_start FROM containers WHERE id=?", (cid,))
        return row is not None and tuple(row) == (state, pid, start) and not owner_alive(pid, start)

    def _uncounted(self, lid: str) -> bool:
        return any(m[0] == lid for m in self.layers.uncounted_mounts())

    def _orphan_rw(self, lid: str) -> bool:
        return self._committed(lid) and self.db.one("SELECT 1 FROM containers WHERE rw_layer=?", (lid,)) is None

    def _container_id(self, rw: str) -> str:
        row = self.db.one("SELECT id FROM containers WHERE rw_layer=?", (rw,))
        return str(row[0]) if row else ""

    def _has_record(self, lid: str) -> bool:
        if self.layers.has_record(lid):
            return True
        if not self.driver.implements("lamina_tar_stream"):
            return False
        try:  # a record the driver kept itself (a layer applied before lamina kept them)
            self.driver.tar_stream(lid).close()
        except LaminaError:
            return False
        return True

    def _unused(self, lid: str, chain: str) -> bool:
        lease = self.lease.id if self.lease is not None else ""
        return self.db.one(
            "SELECT 1 FROM layers l WHERE id=? AND state='committed' AND refs=0"
            " AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM lease_layers k WHERE k.layer=l.id AND k.lease != ?)"
            " AND NOT EXISTS (SELECT 1 FROM images i WHERE i.top_layer=?)"
            " AND NOT EXISTS (SELECT 1 FROM containers n WHERE n.init_layer=l.id)",
            (lid, lease, chain),
        ) is not None

    def _read_back(self, lid: str, chain: str, what: str) -> None:
        """The layer's exact stream, hashed against its DiffID, and its files against its entries.

        A layer just reported unused is read without the lease: the process that let go of it a moment ago
        may be about to collect it, and the lease would stop it (the check keeps layers it reported, so the
        report would then last); if it goes while being read, the problems found are checked again."""
        if self.lease is not None and not any(p.key == lid and p.fix == FIX_UNUSED for p in self.problems):
            try:
                self.layers.lease(chain, self.lease)
            except LayerNotFound:
                return  # removed meanwhile
        try:
            found = self.layers.audit(chain)
        except ExportUnreadable as e:
            self.add("layer", what, f"cannot be read back: {e.message}",
                     verify=functools.partial(self._committed, lid))
            return
        except OSError as e:
            self.add("layer", what, f"cannot be read back: {e.strerror or e}",
                     verify=functools.partial(self._committed, lid))
            return
        except LaminaError as e:
            if self._committed(lid):
                self.add("layer", what, e.message, FIX_LAYER, lid, verify=functools.partial(self._committed, lid))
            return
        if found:
            more = f" (and {len(found) - 1} more difference{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
            self.add("layer", what, f"{found[0]}{more}", FIX_LAYER, lid, verify=functools.partial(self._committed, lid))

    # -- orphans --------------------------------------------------------------------------------------
    def _no_row(self, lid: str) -> bool:
        return self.db.one("SELECT 1 FROM layers WHERE id=?", (lid,)) is None

    def _orphans(self, held: list[str] | None, records: list[str], rows: dict[str, tuple[Any, ...]]) -> None:
        driver = self.driver

        def still_held(lid: str) -> bool:
            return self._no_row(lid) and lid in (driver.layers() or [])

        for lid in held or []:
            if lid not in rows:
                self.add("orphan", f"{driver.name} layer {lid[:12]}",
                         "the driver holds it but the store has no layer of that ID", FIX_DRIVER, lid,
                         verify=functools.partial(still_held, lid))
        for name in records:
            lid = name.split(".", 1)[0]
            path = self.layers.records / name
            if lid not in rows:
                self.add("orphan", f"record {name[:70]}", "no layer of that ID", FIX_RECORD, name,
                         verify=functools.partial(self._orphan_file, lid, path))

    # -- images ---------------------------------------------------------------------------------------
    def _image_problem(self, iid: str) -> str | None:
        """What is wrong with an image as a whole (None: nothing, or it is gone)."""
        row = self.db.one("SELECT top_layer FROM images WHERE id=?", (iid,))
        if row is None:
            return None
        top = row[0]
        if not self.images.content.exists(iid):
            return "its config blob is missing"
        if top and self.db.one("SELECT 1 FROM layers WHERE chain_id=? AND state='committed'", (top,)) is None:
            return f"its top layer {_short(top)} is missing"
        return None if self.quick else self._config_problem(iid, top)

    def _images(self) -> None:
        content = self.images.content
        for (iid,) in self.db.query("SELECT id FROM images"):
            what = f"image {_short(iid)}"
            why = self._image_problem(iid)
            if why:
                self.add("image", what, why, FIX_IMAGE, iid,
                         verify=functools.partial(self._same, self._image_problem, iid, why))
                continue
            for (digest,) in self.db.query("SELECT digest FROM image_blobs WHERE image_id=? AND digest != ?",
                                           (iid, iid)):
                if not content.exists(digest):
                    self.add("blob", f"blob {_short(digest)}", f"missing (recorded for image {_short(iid)})",
                             FIX_BLOB, digest, verify=functools.partial(self._blob_missing, digest))

    def _blob_missing(self, digest: str) -> bool:
        named = self.db.one("SELECT 1 FROM image_blobs WHERE digest=?", (digest,)) is not None
        return named and not self.images.content.exists(digest)

    def _config_problem(self, iid: str, top: str | None) -> str | None:
        """Why the config is not this image's (its layers are the chain of its ``rootfs.diff_ids``)."""
        try:
            raw = self.images.content.read(iid)
            if "sha256:" + hashlib.sha256(raw).hexdigest() != iid:
                return "its config blob does not match the image ID"
            diff_ids = json.loads(raw)["rootfs"]["diff_ids"]
            chains = chain_ids(diff_ids)
        except (LaminaError, ValueError, KeyError, TypeError) as e:
            return f"its config is not a valid image config ({type(e).__name__})"
        if (chains[-1] if chains else None) != top:
            return "its config's layers do not end at its top layer"
        return None

    # -- containers -----------------------------------------------------------------------------------
    def _container_problem(self, cid: str) -> str | None:
        row = self.db.one("SELECT image_id, init_layer, rw_layer FROM containers WHERE id=? AND state='created'",
                          (cid,))
        if row is None:
            return None
        image, init, rw = row
        if not self.images.exists(image):
            return f"its image {_short(image)} is missing"
        for layer, role in ((init, "init"), (rw, "read-write")):
            if not layer or not self._committed(layer):
                return f"its {role} layer is missing"
        return None

    def _containers(self, rows: dict[str, tuple[Any, ...]]) -> None:
        for cid, name, state, pid, start in self.db.query(
            "SELECT id, name, state, owner_pid, owner_start FROM containers"
        ):
            what = f"container {(name or cid[:12])[:64]}"
            if state != "created":
                if not owner_alive(pid, start):
                    self.add("leftover", what, f"left {state} by process {pid}, which is gone", FIX_RECOVER,
                             verify=functools.partial(self._container_left_by, cid, state, pid, start))
                continue
            why = self._container_problem(cid)
            if why:
                self.add("container", what, why, FIX_CONTAINER, cid,
                         verify=functools.partial(self._same, self._container_problem, cid, why))

    # -- blobs ----------------------------------------------------------------------------------------
    def _alive_blobs(self) -> set[str]:
        alive = {r[0] for r in self.db.query("SELECT digest FROM image_blobs")}
        return alive | {r[0] for r in self.db.query("SELECT digest FROM lease_blobs")}

    def _blobs(self, files: list[str]) -> None:
        content = self.images.content
        alive = self._alive_blobs()
        images = {r[0] for r in self.db.query("SELECT id FROM images")}

        def unnamed(digest: str) -> bool:
            return content.exists(digest) and digest not in self._alive_blobs()

        def mismatched(digest: str) -> bool:
            return content.path(digest).exists() and not content.matches(digest)

        for digest in files:
            what = f"blob {_short(digest)}"
            try:
                path = content.path(digest)
            except DigestError:
                self.add("orphan", f"content file {digest[:80]}", "not named by a digest", FIX_BLOB, digest)
                continue
            if digest not in alive:
                self.add("orphan", what, "no image names it", FIX_GC, verify=functools.partial(unnamed, digest))
                continue
            if self.quick or digest in images or not path.exists() or content.matches(digest):
                continue  # an image's config is checked with the image
            self.add("blob", what, "its content does not match its digest", FIX_BLOB, digest,
                     verify=functools.partial(mismatched, digest))

    # -- leftovers ------------------------------------------------------------------------------------
    def _leftovers(self, ingest: list[str]) -> None:
        for lid, pid, start in self.db.query("SELECT id, owner_pid, owner_start FROM leases"):
            if not owner_alive(pid, start):
                self.add("leftover", f"lease {lid[:12]}", f"held by process {pid}, which is gone", FIX_RECOVER,
                         verify=functools.partial(self._row_there, "leases", lid))
        for (holder,) in self.db.query("SELECT DISTINCT holder FROM mount_refs WHERE holder LIKE 'pid:%'",
                                       runroot=True):
            _, pid, start = holder.split(":", 2)
            if not owner_alive(int(pid), float(start) if start != "None" else None):
                self.add("leftover", f"mount reference of process {pid}", "the process is gone", FIX_RECOVER)
        for (lid,) in self.db.query("SELECT DISTINCT id FROM mount_refs", runroot=True):
            if self._no_row(lid):
                self.add("leftover", f"mount reference of layer {lid[:12]}", "no layer of that ID", FIX_RECOVER)
        for name in ingest:
            pid = name.split("-", 1)[0]
            if not pid.isdigit() or not owner_alive(int(pid), None):
                path = self.images.content.ingest / name
                self.add("leftover", f"partial blob {name[:70]}", "its writer is gone", FIX_INGEST,
                         verify=path.exists)

    def _mounts(self) -> None:
        """Mounts of a layer under the driver's area while nothing counts a mount of it (compared by layer
        ID, on resolved paths; mounts inside a counted mount, such as a container's /proc, are its)."""
        for lid, path in self.layers.uncounted_mounts():
            self.add("leftover", f"mount {_bounded(path, 100)}", "mounted under the store, but no lamina process "
                     "holds it", FIX_UNMOUNT, lid,
                     verify=functools.partial(self._uncounted, lid))


def check(store: Store, *, quick: bool = False) -> list[Problem]:
    return _Checker(store, quick).run()


# -- repair -------------------------------------------------------------------------------------------
def repair(store: Store, problems: list[Problem], *, force: bool = False) -> list[str]:
    """Remove what ``problems`` found, each checked again first; returns one line per removal (and per
    thing left, and why)."""
    out: list[str] = []
    fixes: dict[str, list[str]] = {}
    for p in problems:
        if p.fix is not None and p.key not in fixes.get(p.fix, []) and p.still():
            fixes.setdefault(p.fix, []).append(p.key)

    def attempt(what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except LaminaError as e:
            out.append(f"left {what}: {e.message}")
        except OSError as e:
            out.append(f"left {what}: {e.strerror or e}")
        return None

    if FIX_RECOVER in fixes:
        out += attempt("leftovers of processes that are gone", store.recover) or []
    doomed_images: list[str] = list(fixes.get(FIX_IMAGE, []))
    doomed_layers: list[str] = list(fixes.get(FIX_LAYER, []))
    for lid in doomed_layers:
        doomed_images += [i for i in attempt(f"layer {lid[:12]}", store.layers.images_on, lid) or []
                          if i not in doomed_images]
    containers = list(fixes.get(FIX_CONTAINER, []))
    for iid in doomed_images:
        containers += [c.id for c in attempt(f"image {_short(iid)}", store.containers.using_image, iid) or []
                       if c.id not in containers]
    for lid in doomed_layers:
        containers += [c for c in attempt(f"layer {lid[:12]}", store.layers.containers_on, lid) or []
                       if c not in containers]
    if containers and not force:
        for cid in containers:
            out.append(f"left container {cid[:12]}: it needs a damaged layer or image; --force removes it")
    else:
        for cid in containers:
            attempt(f"container {cid[:12]}", _remove_container, store, cid, out)
    # children before parents: deepest chains first; an image a container still uses stays (and says so)
    depth = {iid: attempt(f"image {_short(iid)}", store.images.chain_length, iid) or 0 for iid in doomed_images}
    for iid in sorted(doomed_images, key=lambda i: -depth[i]):
        attempt(f"image {_short(iid)}", _remove_image, store, iid, out)
    for lid in doomed_layers:
        removed = attempt(f"layer {lid[:12]}", store.layers.remove_damaged, lid)
        out += [f"removed layer {_short(c)}" for c in removed or []]
    driver = store.driver.name
    one_by_one = (  # (fix, what it is, how it goes, what was done); the key goes where {} is
        (FIX_BLOB, "blob {}", store.images.forget_blob, "removed blob {}"),
        (FIX_RW, "read-write layer {}", store.layers.remove_orphan_rw, "removed read-write layer {}"),
        (FIX_DRIVER, f"{driver} layer {{}}", store.layers.remove_orphan, f"removed {driver} layer {{}} (no row)"),
        (FIX_RECORD, "record {}", store.layers.remove_orphan_record, "removed record {} (no layer)"),
        (FIX_UNMOUNT, "mount of layer {}", store.layers.unmount_stray, "unmounted layer {} (nothing held it)"),
    )
    for fix, what, remove, done in one_by_one:
        for key in fixes.get(fix, []):
            shown = key[:70] if fix == FIX_RECORD else _short(key)
            if attempt(what.format(shown), remove, key):
                out.append(done.format(shown))
    if FIX_UNUSED in fixes:
        removed = attempt("unused layers", store.layers.collect, fixes[FIX_UNUSED])
        out += [f"removed unused layer {_short(c)}" for c in removed or []]
    if FIX_GC in fixes or FIX_BLOB in fixes or doomed_images:
        out += [f"removed unnamed blob {_short(d)}" for d in attempt("unnamed blobs", store.images.gc) or []]
    if FIX_INGEST in fixes:
        n = attempt("partial blobs", store.images.content.clean_ingest, lambda pid: owner_alive(pid, None))
        if n:
            out.append(f"removed {n} partial blob write{'s' if n != 1 else ''}")
    return out


def _remove_container(store: Store, cid: str, out: list[str]) -> None:
    """A container that needs something damaged: removed unless it is running or mounted (then it is left,
    with why)."""
    c = store.containers.by_id(cid)
    if c is None:
        return
    store.containers.remove(c, force=False)
    out.append(f"removed container {c.name or c.short_id}")


def _remove_image(store: Store, iid: str, out: list[str]) -> None:
    names: list[str] = []
    removed = store.images.delete(iid, names_out=names, damaged=True)
    if removed is None:
        return
    shown = f" ({', '.join(n[:80] for n in names[:3])}{' and more' if len(names) > 3 else ''})" if names else ""
    out.append(f"removed image {_short(iid)}{shown}")
    out += [f"removed layer {_short(c)}" for c in removed]


def run(store: Store, *, quick: bool = False, repair_it: bool = False, force: bool = False) -> CheckReport:
    problems = check(store, quick=quick)
    if not repair_it or not problems:
        return CheckReport(problems, [], problems)
    if any(p.kind == "database" for p in problems):
        note = ["left everything: the store's database is damaged, and repair works through it"]
        return CheckReport(problems, note, problems, repaired=True)
    removed = repair(store, problems, force=force)
    try:
        left = check(store, quick=quick)
    except LaminaError as e:
        removed.append(f"could not check again: {e.message}")
        left = problems
    return CheckReport(problems, removed, left, repaired=True)


__all__ = ["CheckReport", "Problem", "check", "repair", "run"]

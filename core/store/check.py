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

Problems are found without locking the store against other processes: listings of files are taken
before the rows they are compared with (a row always exists before its files do, and goes after them),
and each layer is held in a lease while it is read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lamina.digest import chain_id, chain_ids
from lamina.errors import DigestError, LaminaError, LayerNotFound, StoreError
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
FIX_UNMOUNT = "unmount"  # a mount under the store that nothing counts


@dataclass(frozen=True)
class Problem:
    kind: str  # database, layer, image, container, blob, orphan, leftover
    object: str
    message: str
    fix: str | None = None  # one of the FIX_ values; None: repair cannot do anything about it
    key: str = ""

    def __str__(self) -> str:
        return f"{self.object}: {self.message}"

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


class _Checker:
    def __init__(self, store: Store, quick: bool) -> None:
        self.store = store
        self.db = store.db
        self.layers = store.layers
        self.images = store.images
        self.driver = store.driver
        self.quick = quick
        self.problems: list[Problem] = []

    def add(self, kind: str, obj: str, message: str, fix: str | None = None, key: str = "") -> None:
        self.problems.append(Problem(kind, obj, message, fix, key))

    def run(self) -> list[Problem]:
        self.lease: Lease | None = None
        if not self.quick:
            # holds each layer while it is read back; a store this process cannot write to (read-only) is
            # read without one
            with contextlib.suppress(StoreError):
                self.lease = self.store.lease()
        try:
            return self._run()
        finally:
            if self.lease is not None:
                self.lease.end(collect=False)  # a check changes nothing

    def _run(self) -> list[Problem]:
        # listings of files first, the rows they are compared with after (see the module's doc)
        held = self.driver.layers()
        records = sorted(os.listdir(self.layers.records))
        blobs = [str(d) for d in self.images.content.walk()]
        ingest = sorted(os.listdir(self.images.content.ingest))
        mounts = self._mounts_uncounted()
        if not self._database():
            return self.problems  # nothing read from a damaged database can be trusted
        rows = self._layer_rows()
        self._orphans(held, records, rows)
        self._images()
        self._containers(rows)
        self._blobs(blobs)
        self._leftovers(ingest, mounts)
        return self.problems

    # -- the databases ----------------------------------------------------------------------------------
    def _database(self) -> bool:
        ok = True
        pragma = "PRAGMA quick_check" if self.quick else "PRAGMA integrity_check"
        for name, runroot in (("lamina.db", False), ("mounts.db", True)):
            where = f"database {self.store.runroot / name if runroot else self.store.root / name}"
            try:
                found = [str(r[0]) for r in self.db.query(pragma, runroot=runroot)]
                keys = self.db.query("PRAGMA foreign_key_check", runroot=runroot)
            except StoreError as e:
                self.add("database", where, e.message)
                ok = False
                continue
            if found != ["ok"]:
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                self.add("database", where, "; ".join(found[:3]) + more)
                ok = False
            for table, rowid, parent, _ in keys[:10]:
                self.add("database", where, f"row {rowid} of {table} names a missing row of {parent}")
                ok = False
        return ok

    # -- layers ---------------------------------------------------------------------------------------
    def _layer_rows(self) -> dict[str, tuple[Any, ...]]:
        rows = {r[0]: r for r in self.db.query(
            "SELECT id, chain_id, diff_id, parent, state, rw, owner_pid, owner_start FROM layers"
        )}
        containers_rw = dict(self.db.query(
            "SELECT rw_layer, COALESCE(name, id) FROM containers WHERE rw_layer IS NOT NULL"
        ))
        keeps_stream = self.driver.capabilities().keeps_stream
        for lid, chain, diff_id, parent, state, rw, pid, start in rows.values():
            if state != "committed":
                if not owner_alive(pid, start):
                    self.add("leftover", f"layer {lid[:12]}", f"left {state} by process {pid}, which is gone",
                             FIX_RECOVER)
                continue
            if rw:
                owner = containers_rw.get(lid)
                if owner is None:
                    self.add("orphan", f"read-write layer {lid[:12]}", "no container uses it", FIX_RW, lid)
                elif not self.driver.exists(lid):
                    self.add("container", f"container {owner[:64]}",
                             f"its read-write layer {lid[:12]} is missing from the {self.driver.name} driver",
                             FIX_CONTAINER, self._container_id(lid))
                continue
            what = f"layer {_short(chain)}"
            if not self.driver.exists(lid):
                self.add("layer", what, f"its content is missing from the {self.driver.name} driver", FIX_LAYER, lid)
                continue
            pchain = rows[parent][1] if parent in rows else None
            if chain != chain_id(pchain, diff_id):
                self.add("layer", what, "its ChainID does not follow from its parent and DiffID", FIX_LAYER, lid)
                continue
            if not keeps_stream and not self._has_record(lid):
                self.add("layer", what, "its exact-export record is missing", FIX_LAYER, lid)
                continue
            if not self.quick:
                self._read_back(lid, chain, what)
            if self._unused(lid, chain):
                self.add("leftover", what, "nothing uses it (no image, container, child layer or reference)",
                         FIX_UNUSED, lid)
        return rows

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
        return self.db.one(
            "SELECT 1 FROM layers l WHERE id=? AND refs=0"
            " AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM lease_layers k WHERE k.layer=l.id)"
            " AND NOT EXISTS (SELECT 1 FROM images i WHERE i.top_layer=?)"
            " AND NOT EXISTS (SELECT 1 FROM containers n WHERE n.init_layer=l.id)",
            (lid, chain),
        ) is not None

    def _read_back(self, lid: str, chain: str, what: str) -> None:
        """The layer's exact stream, hashed against its DiffID, and its files against its entries."""
        if self.lease is not None:
            try:
                self.layers.lease(chain, self.lease)
            except LayerNotFound:
                return  # removed meanwhile
        try:
            found = self.layers.audit(chain)
        except LaminaError as e:
            if self.db.one("SELECT 1 FROM layers WHERE id=? AND state='committed'", (lid,)) is None:
                return  # removed meanwhile
            self.add("layer", what, e.message, FIX_LAYER, lid)
            return
        if found:
            more = f" (and {len(found) - 1} more difference{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
            self.add("layer", what, f"{found[0]}{more}", FIX_LAYER, lid)

    # -- orphans --------------------------------------------------------------------------------------
    def _orphans(self, held: list[str] | None, records: list[str], rows: dict[str, tuple[Any, ...]]) -> None:
        for lid in held or []:
            if lid not in rows:
                self.add("orphan", f"{self.driver.name} layer {lid[:12]}",
                         "the driver holds it but the store has no layer of that ID", FIX_DRIVER, lid)
        for name in records:
            lid = name.split(".", 1)[0]
            if lid not in rows and not name.startswith("."):
                self.add("orphan", f"record {name[:70]}", "no layer of that ID", FIX_RECORD, lid)

    # -- images ---------------------------------------------------------------------------------------
    def _images(self) -> None:
        content = self.images.content
        for iid, top in self.db.query("SELECT id, top_layer FROM images"):
            what = f"image {_short(iid)}"
            if not content.exists(iid):
                self.add("image", what, "its config blob is missing", FIX_IMAGE, iid)
                continue
            if top and self.db.one("SELECT 1 FROM layers WHERE chain_id=? AND state='committed'", (top,)) is None:
                self.add("image", what, f"its top layer {_short(top)} is missing", FIX_IMAGE, iid)
                continue
            if not self.quick:
                why = self._config_problem(iid, top)
                if why:
                    self.add("image", what, why, FIX_IMAGE, iid)
                    continue
            for (digest,) in self.db.query("SELECT digest FROM image_blobs WHERE image_id=? AND digest != ?",
                                           (iid, iid)):
                if not content.exists(digest):
                    self.add("blob", f"blob {_short(digest)}", f"missing (recorded for image {_short(iid)})",
                             FIX_BLOB, digest)

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
    def _containers(self, rows: dict[str, tuple[Any, ...]]) -> None:
        for cid, name, image, init, rw, state, pid, start in self.db.query(
            "SELECT id, name, image_id, init_layer, rw_layer, state, owner_pid, owner_start FROM containers"
        ):
            what = f"container {(name or cid[:12])[:64]}"
            if state != "created":
                if not owner_alive(pid, start):
                    self.add("leftover", what, f"left {state} by process {pid}, which is gone", FIX_RECOVER)
                continue
            if not self.images.exists(image):
                self.add("container", what, f"its image {_short(image)} is missing", FIX_CONTAINER, cid)
            for layer, role in ((init, "init"), (rw, "read-write")):
                row = rows.get(layer or "")
                if row is None:  # made after the layers were read?
                    row = self.db.one("SELECT id, chain_id, diff_id, parent, state FROM layers WHERE id=?", (layer,))
                if row is None or row[4] != "committed":
                    self.add("container", what, f"its {role} layer is missing", FIX_CONTAINER, cid)
                    break

    # -- blobs ----------------------------------------------------------------------------------------
    def _blobs(self, files: list[str]) -> None:
        content = self.images.content
        alive = {r[0] for r in self.db.query("SELECT digest FROM image_blobs")}
        alive |= {r[0] for r in self.db.query("SELECT digest FROM lease_blobs")}
        images = {r[0] for r in self.db.query("SELECT id FROM images")}
        for digest in files:
            what = f"blob {_short(digest)}"
            try:
                content.path(digest)
            except DigestError:
                self.add("orphan", f"content file {digest[:80]}", "not named by a digest", FIX_BLOB, digest)
                continue
            if digest not in alive:
                self.add("orphan", what, "no image names it", FIX_GC)
                continue
            if self.quick or digest in images or content.matches(digest):
                continue  # an image's config is checked with the image
            self.add("blob", what, "its content does not match its digest", FIX_BLOB, digest)

    # -- leftovers ------------------------------------------------------------------------------------
    def _leftovers(self, ingest: list[str], uncounted: list[str]) -> None:
        for lid, pid, start in self.db.query("SELECT id, owner_pid, owner_start FROM leases"):
            if not owner_alive(pid, start):
                self.add("leftover", f"lease {lid[:12]}", f"held by process {pid}, which is gone", FIX_RECOVER)
        for (holder,) in self.db.query("SELECT DISTINCT holder FROM mount_refs WHERE holder LIKE 'pid:%'",
                                       runroot=True):
            _, pid, start = holder.split(":", 2)
            if not owner_alive(int(pid), float(start) if start != "None" else None):
                self.add("leftover", f"mount reference of process {pid}", "the process is gone", FIX_RECOVER)
        for (lid,) in self.db.query("SELECT DISTINCT id FROM mount_refs", runroot=True):
            if self.db.one("SELECT 1 FROM layers WHERE id=?", (lid,)) is None:
                self.add("leftover", f"mount reference of layer {lid[:12]}", "no layer of that ID", FIX_RECOVER)
        for name in ingest:
            pid = name.split("-", 1)[0]
            if not pid.isdigit() or not owner_alive(int(pid), None):
                self.add("leftover", f"partial blob {name[:70]}", "its writer is gone", FIX_INGEST)
        for path in uncounted:
            self.add("leftover", f"mount {path}", "mounted under the store, but no lamina process holds it",
                     FIX_UNMOUNT, path)

    def _mounts_uncounted(self) -> list[str]:
        """Mount points under the driver's area that no mount reference names (read under the mount lock,
        so a mount being taken is either finished and counted, or not there yet)."""
        from lamina.fs.mounts import mountinfo

        area = os.path.realpath(self.store.root / self.driver.name) + "/"
        lock = self.layers.mount_lock() if os.access(self.store.runroot, os.W_OK) else contextlib.nullcontext()
        with lock:
            points = [m.mountpoint for m in mountinfo() if m.mountpoint.startswith(area)]
            if not points:
                return []
            counted = {r[0] for r in self.db.query("SELECT path FROM mount_refs", runroot=True)}
        return sorted(p for p in points if p not in counted)


def check(store: Store, *, quick: bool = False) -> list[Problem]:
    return _Checker(store, quick).run()


# -- repair -------------------------------------------------------------------------------------------
def repair(store: Store, problems: list[Problem], *, force: bool = False) -> list[str]:
    """Remove what ``problems`` found; returns one line per removal (and per thing left, and why)."""
    out: list[str] = []
    fixes: dict[str, list[str]] = {}
    for p in problems:
        if p.fix is not None:
            fixes.setdefault(p.fix, [])
            if p.key not in fixes[p.fix]:
                fixes[p.fix].append(p.key)

    def attempt(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except LaminaError as e:
            out.append(f"left {what}: {e.message}")
        except OSError as e:
            out.append(f"left {what}: {e.strerror or e}")
        return None

    if FIX_RECOVER in fixes:
        out += store.recover()
    doomed_images: list[str] = list(fixes.get(FIX_IMAGE, []))
    doomed_layers: list[str] = []
    for lid in fixes.get(FIX_LAYER, []):
        doomed_layers.append(lid)
        doomed_images += [i for i in store.layers.images_on(lid) if i not in doomed_images]
    containers = list(fixes.get(FIX_CONTAINER, []))
    for iid in doomed_images:
        containers += [c.id for c in store.containers.using_image(iid) if c.id not in containers]
    for lid in doomed_layers:
        containers += [c for c in store.layers.containers_on(lid) if c not in containers]
    kept_images: set[str] = set()
    if containers and not force:
        for cid in containers:
            out.append(f"left container {cid[:12]}: it needs a damaged layer or image; --force removes it")
        for iid in doomed_images:
            if store.containers.using_image(iid):
                kept_images.add(iid)
    else:
        for cid in containers:
            attempt(f"container {cid[:12]}", _remove_container, store, cid, out)
    # children before parents: deepest chains first
    for iid in sorted(doomed_images, key=lambda i: -store.images.chain_length(i)):
        if iid not in kept_images:
            attempt(f"image {_short(iid)}", _remove_image, store, iid, out)
    for lid in doomed_layers:
        removed = attempt(f"layer {lid[:12]}", store.layers.remove_damaged, lid)
        out += [f"removed layer {_short(c)}" for c in removed or []]
    driver = store.driver.name
    one_by_one = (  # (fix, what it is, how it goes, what was done); the key goes where {} is
        (FIX_BLOB, "blob {}", store.images.forget_blob, "removed blob {}"),
        (FIX_RW, "read-write layer {}", store.layers.remove_orphan_rw, "removed read-write layer {}"),
        (FIX_DRIVER, f"{driver} layer {{}}", store.layers.remove_orphan, f"removed {driver} layer {{}} (no row)"),
        (FIX_RECORD, "record of {}", store.layers.remove_orphan_record, "removed record {}.tsr (no layer)"),
    )
    for fix, what, remove, done in one_by_one:
        for key in fixes.get(fix, []):
            if attempt(what.format(_short(key)), remove, key):
                out.append(done.format(_short(key)))
    if FIX_UNUSED in fixes:
        removed = attempt("unused layers", store.layers.collect, fixes[FIX_UNUSED])
        out += [f"removed unused layer {_short(c)}" for c in removed or []]
    if FIX_GC in fixes or FIX_BLOB in fixes or doomed_images:
        out += [f"removed unnamed blob {_short(d)}" for d in attempt("unnamed blobs", store.images.gc) or []]
    if FIX_INGEST in fixes:
        n = attempt("partial blobs", store.images.content.clean_ingest, lambda pid: owner_alive(pid, None))
        out.append(f"removed {n} partial blob write{'s' if n != 1 else ''}")
    for path in fixes.get(FIX_UNMOUNT, []):
        if attempt(f"mount {path}", store.layers.unmount_stray, path):
            out.append(f"unmounted {path}")
    return out


def _remove_container(store: Store, cid: str, out: list[str]) -> None:
    c = store.containers.by_id(cid)
    if c is None:
        return
    store.containers.remove(c, force=True)
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
    left = check(store, quick=quick)
    return CheckReport(problems, removed, left, repaired=True)


__all__ = ["CheckReport", "Problem", "check", "repair", "run"]

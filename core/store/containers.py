"""Containers: a writable layer on an image, with an init layer between them.

A container is an ID (64 hex), an optional unique name, the image it was created from, labels, and two
layers: the *init layer*, a committed layer on the image's top layer holding the placeholders a runtime
expects (``/proc``, ``/sys``, ``/dev/pts``, ``/dev/shm``, ``/dev/console``, ``/etc/hosts``,
``/etc/hostname``, ``/etc/resolv.conf``, ``/etc/mtab -> /proc/mounts``; only those the image lacks), and
the *read-write layer* on top of it. Diffs, changes and commits are taken against the init layer, so the
placeholders never reach an image. Init layers are ordinary content-addressed layers, so containers of
one image share one.

Creation is crash-safe: the container row is written ``creating`` (with its owner's pid) before any
layer work, the init layer is leased, the read-write layer row stays ``incomplete``, and one transaction
makes all of it real. Removal marks the row ``removing`` first; the next command finishes off the work of
a killed process either way.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.digest import ChainID
from lamina.errors import ContainerNotFound, ImageError, ImageNotFound, InvalidReference, LayerInUse
from lamina.store.db import owner_alive

if TYPE_CHECKING:
    from lamina.store.kernel import Store
    from lamina.store.leases import Lease


log = logging.getLogger("lamina.store.containers")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

# (path, kind, target): moby's initlayer placeholders
INIT_ENTRIES: tuple[tuple[str, str, str], ...] = (
    ("dev", "dir", ""),
    ("dev/pts", "dir", ""),
    ("dev/shm", "dir", ""),
    ("proc", "dir", ""),
    ("sys", "dir", ""),
    ("etc", "dir", ""),
    ("etc/hosts", "file", ""),
    ("etc/hostname", "file", ""),
    ("etc/resolv.conf", "file", ""),
    ("dev/console", "file", ""),
    ("etc/mtab", "symlink", "/proc/mounts"),
)


@dataclass(frozen=True)
class Container:
    id: str
    name: str | None
    image_id: str
    init_layer: str
    rw_layer: str
    created: float
    labels: dict[str, str] = field(default_factory=dict)
    status: str = "created"
    exit_code: int | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def as_dict(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Name": self.name,
            "Image": self.image_id,
            "Created": self.created,
            "Labels": self.labels,
            "Status": self.status,
            "ExitCode": self.exit_code,
            "InitLayer": self.init_layer,
            "RWLayer": self.rw_layer,
        }


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or re.fullmatch(r"[0-9a-f]{64}", name):
        shown = name if isinstance(name, str) and len(name) <= 80 else str(name)[:77] + "..."
        raise InvalidReference(f"invalid container name {shown!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128")
    return name


def init_tar(exists: Any) -> bytes:
    """The init layer's tar: the placeholders ``exists(path)`` says the image lacks (deterministic bytes)."""
    import tarfile  # only when a container is made: listings do without it

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, kind, target in INIT_ENTRIES:
            if exists(path):
                continue
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uname = info.gname = ""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = target
                info.mode = 0o777
                t.addfile(info)
            else:
                info.mode = 0o755
                t.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


class ContainerStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.layers = store.layers

    # -- rows -----------------------------------------------------------------------------------------
    _COLS = "id, name, image_id, init_layer, rw_layer, created, labels, status, exit_code, run_pid, run_start"

    def _row(self, r: tuple[Any, ...]) -> Container:
        status = r[7]
        if status == "running" and not owner_alive(r[9], r[10]):
            status = "exited"
        return Container(r[0], r[1], r[2], r[3] or "", r[4] or "", r[5], json.loads(r[6]), status, r[8])

    def all(self) -> list[Container]:
        rows = self.db.query(f"SELECT {self._COLS} FROM containers WHERE state='created' ORDER BY created DESC")
        return [self._row(r) for r in rows]

    def find(self, ref: str) -> Container:
        """By full ID, unique ID prefix (≥ 3 hex characters) or name."""
        if not isinstance(ref, str) or not ref:
            raise ContainerNotFound("no container given")
        row = self.db.one(
            f"SELECT {self._COLS} FROM containers WHERE state='created' AND (id=? OR name=?)", (ref, ref)
        )
        if row is not None:
            return self._row(row)
        if re.fullmatch(r"[0-9a-f]{3,63}", ref):
            rows = self.db.query(
                f"SELECT {self._COLS} FROM containers WHERE state='created' AND id LIKE ? LIMIT 11", (ref + "%",)
            )
            if len(rows) == 1:
                return self._row(rows[0])
            if len(rows) > 1:
                raise ContainerNotFound(
                    f"container ID prefix {ref!r} is ambiguous: " + ", ".join(r[0][:12] for r in rows[:10])
                )
        shown = ref if len(ref) <= 80 else ref[:77] + "..."
        raise ContainerNotFound(f"no container {shown!r}")

    def by_id(self, cid: str) -> Container | None:
        row = self.db.one(f"SELECT {self._COLS} FROM containers WHERE id=? AND state='created'", (cid,))
        return None if row is None else self._row(row)

    def exists(self, cid: str) -> bool:
        """Whether the container with this full ID exists (and is not being removed)."""
        return self.db.one("SELECT 1 FROM containers WHERE id=? AND state='created'", (cid,)) is not None

    def using_image(self, image_id: str) -> list[Container]:
        rows = self.db.query(
            f"SELECT {self._COLS} FROM containers WHERE image_id=? AND state != 'removing'", (image_id,)
        )
        return [self._row(r) for r in rows]

    # -- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish off containers that processes which no longer run were creating or removing; returns
        their IDs."""
        done: list[str] = []
        rows = self.db.query(
            "SELECT id, state, rw_layer, init_layer, owner_pid, owner_start FROM containers"
            " WHERE state != 'created'"
        )
        for cid, state, rw, init, pid, start in rows:
            if owner_alive(pid, start):
                continue
            if state == "creating":
                with self.db.tx() as db:
                    if db.execute(
                        "DELETE FROM containers WHERE id=? AND state='creating' AND owner_pid IS ?", (cid, pid)
                    ).rowcount:
                        done.append(cid)
                continue
            if not self.db.claim("containers", cid, (pid, start), "state='removing'"):
                continue  # another process is finishing it off
            try:
                self._finish_remove(cid, rw, init)
            except Exception as e:
                # Left claimed by this process: the next process after it tries again; the store stays usable.
                log.warning("could not yet finish removing container %s: %s", cid[:12], e)
                continue
            done.append(cid)
        return done

    # -- create / remove ------------------------------------------------------------------------------
    def create(
        self, image_id: str, top: ChainID | None, name: str | None, labels: dict[str, str], exists: Any,
        lease: Lease,
    ) -> Container:
        """``exists(path)`` tells whether the image's tree has ``path`` (for the init layer); ``lease``
        holds the image's top layer (and now the init layer) until the container commits."""
        if name is not None:
            check_name(name)
        if top is None:
            raise ImageError(f"image {image_id} has no layers; a container needs at least one")
        cid = os.urandom(32).hex()
        me = self.db.me
        now = time.time()
        with self.db.tx() as db:
            if name is not None and db.execute("SELECT 1 FROM containers WHERE name=?", (name,)).fetchone():
                raise InvalidReference(f"the container name {name!r} is already in use")
            db.execute(
                "INSERT INTO containers (id, name, image_id, created, labels, state, owner_pid, owner_start)"
                " VALUES (?, ?, ?, ?, ?, 'creating', ?, ?)",
                (cid, name, image_id, now, json.dumps(labels, sort_keys=True), me[0], me[1]),
            )
        rw = None
        try:
            init = self.layers.register(io.BytesIO(init_tar(exists)), top, lease=lease)
            rw = self.layers.create_rw(init.cache_id)
            with self.db.tx() as db:
                if db.execute("SELECT 1 FROM images WHERE id=?", (image_id,)).fetchone() is None:
                    raise ImageNotFound(f"image {image_id.split(':')[-1][:12]} was removed")
                init_id = self.layers.reference(db, init.chain_id)
                self.layers.commit_rw(db, rw)
                self.store.images.mark_used(db, image_id, time.time())
                db.execute(
                    "UPDATE containers SET state='created', init_layer=?, rw_layer=?, owner_pid=NULL,"
                    " owner_start=NULL WHERE id=?",
                    (init_id, rw, cid),
                )
        except BaseException:
            if rw is not None:
                with contextlib.suppress(Exception):  # recovery finishes it; the original error matters
                    self.layers.remove_rw(rw)
            with self.db.tx() as db:
                db.execute("DELETE FROM containers WHERE id=? AND state='creating'", (cid,))
            raise
        return self.find(cid)

    def remove(self, c: Container, force: bool = False) -> None:
        """Remove a container; mounted or running is a conflict unless ``force``. The checks and the mark
        that starts the removal are one step under the mount lock, so a mount (a ``commit`` reading the
        container, a ``lamina mount``) taken meanwhile either came first and is seen, or finds the
        container's layer on its way out."""
        me = self.db.me
        with self.layers.mount_lock(), self.db.tx() as db:
            row = db.execute(
                "SELECT status, run_pid, run_start FROM containers WHERE id=? AND state='created'", (c.id,)
            ).fetchone()
            if row is None:
                raise ContainerNotFound(f"no container {c.name or c.short_id!r}")
            if not force and self.layers.mount_count(c.rw_layer):
                raise LayerInUse(f"container {c.name or c.short_id} is mounted; unmount it first or use --force")
            if not force and row[0] == "running" and owner_alive(row[1], row[2]):
                raise LayerInUse(f"container {c.name or c.short_id} is running; stop it first or use --force")
            db.execute(
                "UPDATE containers SET state='removing', owner_pid=?, owner_start=? WHERE id=?", (me[0], me[1], c.id)
            )
            db.execute(
                "UPDATE layers SET state='removing', owner_pid=?, owner_start=? WHERE id=? AND rw=1",
                (me[0], me[1], c.rw_layer),
            )
        self._finish_remove(c.id, c.rw_layer, c.init_layer)

    def _finish_remove(self, cid: str, rw: str | None, init: str | None) -> None:
        if rw and self.db.one("SELECT 1 FROM layers WHERE id=?", (rw,)):
            self.layers.remove_rw(rw)
        init_id = None
        with self.db.tx() as db:
            gone = db.execute("DELETE FROM containers WHERE id=?", (cid,)).rowcount
            if init and gone:  # only the process that removed the row drops its reference
                row = db.execute("SELECT chain_id FROM layers WHERE id=? AND state='committed'", (init,)).fetchone()
                if row is not None:
                    init_id = self.layers.unreference(db, row[0])
        if init_id:
            self.layers.collect([init_id])

    # -- run state ------------------------------------------------------------------------------------
    def set_running(self, cid: str) -> None:
        me = self.db.me
        with self.db.tx() as db:
            db.execute(
                "UPDATE containers SET status='running', run_pid=?, run_start=?, exit_code=NULL WHERE id=?",
                (me[0], me[1], cid),
            )

    def set_exited(self, cid: str, code: int | None) -> None:
        with self.db.tx() as db:
            db.execute(
                "UPDATE containers SET status='exited', exit_code=?, run_pid=NULL WHERE id=?", (code, cid)
            )


def exists_in(root: str) -> Any:
    """A predicate: does ``path`` exist inside the tree at ``root``? Never follows a symlink; a path that
    crosses one counts as existing (the init layer then leaves it alone)."""
    import os

    def exists(path: str) -> bool:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = path.split("/")
            for comp in parts[:-1]:
                try:
                    nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    return False
                except OSError:
                    return True  # a symlink or a file where a directory should be
                os.close(fd)
                fd = nfd
            try:
                os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            return True
        finally:
            os.close(fd)

    return exists


__all__ = ["Container", "ContainerStore", "check_name", "exists_in", "init_tar"]

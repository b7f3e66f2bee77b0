"""Disk-usage accounting (``lamina system df``, ``lamina info``, prune reports) from the store's records.

Every committed layer's size is recorded when it is committed (the bytes of its diff's file contents, as
the driver applied them), and every blob's when an image comes to need it, so the figures come from the
database alone: no committed layer's files are read, however many there are. A
container's read-write layer has no recorded size; it is measured by its driver only when asked
(``verbose``).

The same bytes are seen from two sides: *images* count the layers their chains stand on (a layer shared by
several images once, as their shared size), *layers* count every committed layer, including containers'
init layers and layers only ``lamina layer add`` holds. Reclaimable: for images, what removing every image
no container uses would free (``image prune -a``); for layers, what nothing but such explicit references
holds (``lamina layer rm``); for containers, the read-write layers of those not running; for the content
store, the blobs that only images no container uses name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.store.db import owner_alive

if TYPE_CHECKING:
    from lamina.store.kernel import Store


@dataclass
class ImageUsage:
    id: str
    names: list[str]
    created: float
    size: int
    shared_size: int
    containers: int

    @property
    def unique_size(self) -> int:
        return self.size - self.shared_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "Id": self.id, "Names": self.names, "Created": int(self.created), "Size": self.size,
            "SharedSize": self.shared_size, "UniqueSize": self.unique_size, "Containers": self.containers,
        }


@dataclass
class ContainerUsage:
    id: str
    name: str | None
    image_id: str
    status: str
    size_rw: int | None  # measured only when asked

    def as_dict(self) -> dict[str, Any]:
        return {"Id": self.id, "Name": self.name, "Image": self.image_id, "Status": self.status,
                "SizeRw": self.size_rw}


@dataclass
class UsageRow:
    kind: str
    total: int
    active: int
    size: int | None
    reclaimable: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"Type": self.kind, "TotalCount": self.total, "Active": self.active, "Size": self.size,
                "Reclaimable": self.reclaimable}


@dataclass
class DiskUsage:
    rows: list[UsageRow]
    images: list[ImageUsage] = field(default_factory=list)
    containers: list[ContainerUsage] = field(default_factory=list)
    layers_size: int = 0
    content_size: int = 0

    @property
    def total(self) -> int:
        """The store's recorded bytes: committed layers and the content store (read-write layers aside)."""
        return self.layers_size + self.content_size

    def as_dict(self) -> dict[str, Any]:
        return {
            "Summary": [r.as_dict() for r in self.rows],
            "Images": [i.as_dict() for i in self.images],
            "Containers": [c.as_dict() for c in self.containers],
            "Total": self.total,
        }


_LIVE = "state='committed' AND rw=0"
_USED = "SELECT image_id FROM containers WHERE state='created'"
# Each blob once: its recorded size (NULL when none is: a version 3 store's, read from the file) and whether
# an image some container uses needs it.
_BLOBS = f"""
SELECT COUNT(*), COALESCE(SUM(active), 0), COALESCE(SUM(size), 0),
  COALESCE(SUM(CASE WHEN active THEN 0 ELSE size END), 0), COALESCE(SUM(size IS NULL), 0)
FROM (SELECT MAX(size) AS size, MAX(image_id IN ({_USED})) AS active
      FROM image_blobs GROUP BY digest)
"""
_UNSIZED_BLOBS = f"""
SELECT digest, MAX(image_id IN ({_USED}))
FROM image_blobs GROUP BY digest HAVING MAX(size) IS NULL
"""


def usage_total(store: Store) -> int:
    """:attr:`DiskUsage.total` alone (``info``): two aggregate queries."""
    with store.db.read() as conn:
        (layers_size,) = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM layers WHERE {_LIVE}").fetchone()
        _n, _active, content_size, _reclaimable, n_unsized = conn.execute(_BLOBS).fetchone()
        unsized = conn.execute(_UNSIZED_BLOBS).fetchall() if n_unsized else []
    return int(layers_size) + int(content_size) + sum(store.images.content.stored_size(d) or 0 for d, _ in unsized)


def usage_summary(store: Store) -> DiskUsage:
    """:func:`disk_usage` without the per-image and per-container lists and without measuring read-write
    layers: the same rows and totals (``system df``'s table, ``info``'s total) from aggregate queries and one
    walk down the layers' parents that visits each layer at most once per kind of user (SQLite's recursive
    queries took twice as long for it), with no object made per image or layer."""
    with store.db.read() as conn:
        n_images, active_images = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM(id IN ({_USED})), 0) FROM images").fetchone()
        parent: dict[str, str | None] = {}
        size: dict[str, int] = {}
        by_chain: dict[str, str] = {}
        for lid, chain, up, n in conn.execute(f"SELECT id, chain_id, parent, size FROM layers WHERE {_LIVE}"):
            parent[lid] = up
            size[lid] = n
            by_chain[chain] = lid
        tops = conn.execute(f"SELECT top_layer, id IN ({_USED}) FROM images WHERE top_layer IS NOT NULL").fetchall()
        container_rows = conn.execute(
            "SELECT init_layer, status, run_pid, run_start FROM containers WHERE state='created'").fetchall()
        n_blobs, active_blobs, content_size, content_reclaimable, n_unsized = conn.execute(_BLOBS).fetchone()
        unsized = conn.execute(_UNSIZED_BLOBS).fetchall() if n_unsized else []
    image_layers: set[str] = set()  # under an image no container uses
    busy_layers: set[str] = set()  # under an image a container uses
    container_layers: set[str] = set()  # under a container's init layer
    starts = [(by_chain.get(top), busy_layers if used else image_layers) for top, used in tops]
    starts += [(init, container_layers) for init, *_ in container_rows]
    for lid, seen in starts:
        while lid in size and lid not in seen:
            seen.add(lid)
            lid = parent[lid]
    under_images = image_layers | busy_layers
    held = under_images | container_layers
    for digest, active in unsized:
        blob = store.images.content.stored_size(digest) or 0
        content_size += blob
        content_reclaimable += 0 if active else blob
    layers_size = sum(size.values())
    running = sum(1 for _init, status, pid, start in container_rows
                  if status == "running" and owner_alive(pid, start))
    sized = size.__getitem__
    rows = [
        UsageRow("Images", n_images, active_images, sum(map(sized, under_images)),
                 sum(map(sized, under_images - busy_layers))),
        UsageRow("Containers", len(container_rows), running, None, None),
        UsageRow("Layers", len(size), len(held), layers_size, layers_size - sum(map(sized, held))),
        UsageRow("Content", n_blobs, active_blobs, content_size, content_reclaimable),
    ]
    return DiskUsage(rows, layers_size=layers_size, content_size=content_size)


def disk_usage(store: Store, *, measure_rw: Callable[[str, str], int | None] | None = None) -> DiskUsage:
    """The store's usage from its records; ``measure_rw(rw_layer, init_layer)`` sizes containers' read-write layers
    (none are measured without it). Read in one transaction, so the figures agree with each other."""
    db = store.db
    with db.read() as conn:
        layer_rows = conn.execute(
            "SELECT id, parent, size FROM layers WHERE state='committed' AND rw=0"
        ).fetchall()
        image_rows = conn.execute(
            "SELECT i.id, l.id, COALESCE(i.created, i.loaded) FROM images i"
            " LEFT JOIN layers l ON l.chain_id = i.top_layer AND l.state='committed'"
        ).fetchall()
        name_rows = conn.execute("SELECT image_id, name FROM image_names ORDER BY added, name").fetchall()
        blob_rows = conn.execute("SELECT image_id, digest, size FROM image_blobs").fetchall()
        container_rows = conn.execute(
            "SELECT id, name, image_id, init_layer, rw_layer, status, run_pid, run_start FROM containers"
            " WHERE state='created'"
        ).fetchall()
    parent = {r[0]: r[1] for r in layer_rows}
    size = {r[0]: int(r[2]) for r in layer_rows}
    chains: dict[str, frozenset[str]] = {}

    def chain(lid: str | None) -> frozenset[str]:
        """The layer and those below it, memoized; iterative, so a deep stack needs no deep recursion."""
        todo: list[str] = []
        while lid is not None and lid in size and lid not in chains:
            todo.append(lid)
            lid = parent.get(lid)
        below = chains.get(lid, frozenset()) if lid is not None else frozenset()
        for t in reversed(todo):
            below = chains[t] = below | {t}
        return below

    names: dict[str, list[str]] = {}
    for iid, name in name_rows:
        names.setdefault(iid, []).append(name)
    used_by: dict[str, int] = {}
    containers: list[ContainerUsage] = []
    container_layers: set[str] = set()
    for cid, cname, iid, init, rw, status, pid, start in container_rows:
        used_by[iid] = used_by.get(iid, 0) + 1
        container_layers |= chain(init)
        running = status == "running" and owner_alive(pid, start)
        measured = measure_rw(rw, init) if measure_rw is not None and rw else None
        containers.append(ContainerUsage(cid, cname, iid, "running" if running else
                                         ("exited" if status == "running" else status), measured))

    image_chain = {r[0]: chain(r[1]) for r in image_rows}
    users: dict[str, int] = {}
    for c in image_chain.values():
        for lid in c:
            users[lid] = users.get(lid, 0) + 1
    images = []
    for iid, _top, created in image_rows:
        c = image_chain[iid]
        images.append(ImageUsage(
            iid, names.get(iid, []), float(created), sum(size[x] for x in c),
            sum(size[x] for x in c if users[x] > 1), used_by.get(iid, 0),
        ))
    images.sort(key=lambda i: i.created, reverse=True)

    in_use = set().union(*(image_chain[i] for i in image_chain if used_by.get(i))) if used_by else set()
    image_layers = set(users)
    blobs_of: dict[str, set[str]] = {}
    blob_sizes: dict[str, int] = {}
    for iid, digest, recorded in blob_rows:
        blobs_of.setdefault(digest, set()).add(iid)
        if recorded is not None:
            blob_sizes[digest] = recorded
    for digest in blobs_of.keys() - blob_sizes.keys():  # recorded before sizes were (a version 3 store)
        blob_sizes[digest] = store.images.content.stored_size(digest) or 0
    content_size = sum(blob_sizes.values())
    active_blobs = {d for d, owners in blobs_of.items() if any(used_by.get(i) for i in owners)}
    held = image_layers | container_layers
    layers_size = sum(size.values())
    rw_sizes = [c.size_rw for c in containers if c.size_rw is not None]
    rows = [
        UsageRow("Images", len(images), sum(1 for i in images if i.containers),
                 sum(size[x] for x in image_layers), sum(size[x] for x in image_layers - in_use)),
        UsageRow("Containers", len(containers), sum(1 for c in containers if c.status == "running"),
                 sum(rw_sizes) if measure_rw is not None else None,
                 sum(c.size_rw or 0 for c in containers if c.status != "running") if measure_rw is not None else None),
        UsageRow("Layers", len(size), len(held & size.keys()), layers_size,
                 sum(size[x] for x in size.keys() - held)),
        UsageRow("Content", len(blobs_of), len(active_blobs), content_size,
                 sum(blob_sizes[d] for d in blobs_of.keys() - active_blobs)),
    ]
    return DiskUsage(rows, images, containers, layers_size, content_size)

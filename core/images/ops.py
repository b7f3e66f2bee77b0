"""Image-level operations behind :class:`~lamina.service.ImageService`: lookup, listing and filters,
history, tagging, untagging and deletion (Docker's ImageDelete rules), save and import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

from lamina.digest import ChainID, DiffID, chain_ids, parse_digest, sha256_digest
from lamina.errors import (
    BlobNotFound,
    DigestError,
    ImageConflict,
    ImageError,
    ImageNotFound,
    InvalidReference,
    LaminaError,
)
from lamina.formats import oci
from lamina.formats.reference import (
    Reference,
    familiar_match,
    familiar_stored,
    looks_like_id_prefix,
    parse_normalized,
)
from lamina.store.images import ImageRecord, ImageStore, NewImage

if TYPE_CHECKING:
    from lamina.store.leases import Lease
    from lamina.tar.compression import Readable

FILTERS = ("dangling", "label", "before", "since", "reference")
# sha256 of a tar of no entries (1024 zero bytes): what an unchanged container's diff is
EMPTY_TAR_DIFF_ID = DiffID("sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef")
log = logging.getLogger("lamina.images.ops")


@dataclass(frozen=True)
class Image:
    record: ImageRecord
    config: oci.ImageConfig

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def short_id(self) -> str:
        return self.record.id.split(":", 1)[1][:12]

    @property
    def diff_ids(self) -> list[DiffID]:
        return [DiffID(d) for d in self.config.diff_ids]

    @cached_property
    def chain(self) -> list[ChainID]:
        return chain_ids(self.diff_ids)

    @property
    def repo_tags(self) -> list[str]:
        return [parse_normalized(n).familiar() for n in self.record.tags]

    @property
    def repo_digests(self) -> list[str]:
        return [parse_normalized(n).familiar() for n in self.record.digests]


@dataclass
class ImageSummary:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    created: float  # see created_time
    size: int
    shared_size: int
    labels: dict[str, str]
    parent: str | None
    layers: int
    containers: int = 0  # containers created from the image (what `ps -a` lists)
    chain: list[ChainID] = field(default_factory=list, repr=False)
    store: str = ""  # "" in the store itself, else the additional image store's root

    def as_dict(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "ParentId": self.parent or "",
            "RepoTags": self.repo_tags,
            "RepoDigests": self.repo_digests,
            "Created": int(self.created),
            "Size": self.size,
            "SharedSize": self.shared_size,
            "Labels": self.labels,
            "Layers": self.layers,
            "Containers": self.containers,
            "Store": self.store,
        }


def load(store: ImageStore, record: ImageRecord) -> Image:
    try:
        raw = store.config_bytes(record.id)
    except BlobNotFound:
        if not store.exists(record.id):  # removed by another process since it was looked up
            raise ImageNotFound(f"image {record.id.split(':', 1)[-1][:12]} was removed meanwhile") from None
        raise
    return Image(record, oci.parse_config(raw))


# -- lookup ---------------------------------------------------------------------------------------------
def _name_key(ref: Reference) -> str:
    return str(ref if ref.digest else ref.with_default_tag())


def find(store: ImageStore, ref: str) -> ImageRecord:
    if not isinstance(ref, str) or not ref:
        raise ImageNotFound("no image given")
    text = ref
    if text.startswith("sha256:"):
        hexpart = text[7:]
        if len(hexpart) == 64:
            try:
                parse_digest(text)
            except DigestError:
                raise ImageNotFound(f"image {ref!r} not found: not a valid image ID") from None
            if store.exists(text):
                return store.get(text)
            raise ImageNotFound(f"image {text} not found")
        text = hexpart
        if not looks_like_id_prefix(text):
            raise ImageNotFound(f"image {ref!r} not found: not a valid image ID prefix")
    elif len(text) == 64 and looks_like_id_prefix(text):
        full = "sha256:" + text
        if store.exists(full):
            return store.get(full)
        raise ImageNotFound(f"image {text} not found")
    else:
        try:
            named = parse_normalized(text)
        except InvalidReference:
            named = None
        if named is not None:
            rec = store.by_name(_name_key(named))
            if rec is not None:
                return rec
        if not looks_like_id_prefix(text):
            raise ImageNotFound(f"image {ref!r} not found")
    rec = store.by_prefix(text)
    if rec is None:
        raise ImageNotFound(f"image {ref!r} not found")
    return rec


def get_image(store: ImageStore, ref: str) -> Image:
    return load(store, find(store, ref))


# -- listing --------------------------------------------------------------------------------------------
def _check_filters(store: ImageStore, filters: dict[str, list[str]]) -> None:
    for key, values in filters.items():
        if key not in FILTERS:
            raise ImageError(f"invalid filter {key!r}; filters are {', '.join(FILTERS)}")
        if key == "dangling" and any(v not in ("true", "false", "1", "0") for v in values):
            raise ImageError(f"invalid filter 'dangling={values[0]}': use true or false")


def _labels_match(labels: dict[str, str], wanted: list[str]) -> bool:
    for w in wanted:
        key, eq, value = w.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


def created_time(rec: ImageRecord) -> float:
    """When an image was created: its config's ``created``, or, for a config without one, when the image
    entered the store (podman's rule), so listings order it and ``before``/``since`` compare with it."""
    return rec.created if rec.created is not None else rec.loaded


def _recorded_chain(top: ChainID | None,
                    layers: dict[ChainID, tuple[ChainID | None, int, int]]) -> tuple[list[ChainID], int] | None:
    """An image's ChainIDs, base first, from its top layer down through the layers' parents, and the sum of
    their sizes; None when a layer of it is not here (the config's DiffIDs then give them)."""
    if top is None:
        return [], 0
    chain: list[ChainID] = []
    size = 0
    cur: ChainID | None = top
    while cur is not None:
        entry = layers.get(cur)
        if entry is None:
            return None
        chain.append(cur)
        size += entry[1]
        cur = entry[0]
    if len(chain) != layers[top][2]:  # a parent that is not committed: the walk stopped short
        return None
    chain.reverse()
    return chain, size


def list_images(store: ImageStore, filters: dict[str, list[str]], all_images: bool,
                created_of: Callable[[str], float] | None = None) -> list[ImageSummary]:
    """``created_of(ref)``: when the image ``before=``/``since=`` name was created (default: looked up here)."""
    _check_filters(store, filters)
    dangling: bool | None = None
    if "dangling" in filters:
        dangling = filters["dangling"][-1] in ("true", "1")
    when = created_of or (lambda ref: created_time(find(store, ref)))
    before = when(filters["before"][-1]) if "before" in filters else None
    since = when(filters["since"][-1]) if "since" in filters else None
    patterns = filters.get("reference", [])
    layers = store.layers.chain_index()  # chain -> (parent chain, size, depth)
    containers = store.container_counts()
    out: list[ImageSummary] = []
    refcount: dict[ChainID, int] = {}
    records = store.listing()
    by_label = "label" in filters
    parents = {rec.parent for rec in records if rec.parent is not None}
    for rec in records:
        created = rec.created
        if before is not None and created >= before:
            continue
        if since is not None and created <= since:
            continue
        # From the records alone (no config is read): the labels as recorded and the chain from the top
        # layer down; the config only for an image whose labels were not recorded or whose layers are not all
        # here, which then lists as before.
        recorded = _recorded_chain(rec.top_layer, layers)
        labels = rec.labels
        if recorded is None or labels is None:
            try:
                img = load(store, store.get(rec.id))
            except LaminaError as e:  # one damaged image must not hide the others
                log.warning("skipping image %s: %s", rec.id, e.message)
                continue
            chain, labels = img.chain, img.config.labels
            size = sum(layers[c][1] for c in chain if c in layers)
        else:
            chain, size = recorded
        if by_label and not _labels_match(labels, filters["label"]):
            continue
        tags: list[str] = []
        digests: list[str] = []
        for n in rec.names:
            if patterns:
                r = parse_normalized(n)
                if not any(familiar_match(p, r) for p in patterns):
                    continue
                (digests if r.digest else tags).append(r.familiar())
            else:
                (digests if "@" in n else tags).append(familiar_stored(n))
        if not tags and not digests:
            if patterns or dangling is False:
                continue
            if not all_images and rec.id in parents:
                continue  # an intermediate image
        elif dangling is True and tags:
            continue
        for c in chain:
            refcount[c] = refcount.get(c, 0) + 1
        out.append(ImageSummary(
            rec.id, tags, digests, created, size, 0, labels, rec.parent, len(chain),
            containers=containers.get(rec.id, 0), chain=chain,
        ))
    shared = {c for c, n in refcount.items() if n > 1 and c in layers}
    if shared:
        for s in out:
            s.shared_size = sum(layers[c][1] for c in s.chain if c in shared)
    out.sort(key=lambda s: s.created, reverse=True)
    return out


def inspect(store: ImageStore, img: Image) -> dict[str, Any]:
    rec = img.record
    cfg = img.config
    size = sum(store.layers.sizes(img.chain).values())
    manifest_layers: list[str] = []
    if rec.manifests and store.content.exists(rec.manifests[0].digest):
        m = oci.parse_manifest(store.content.read(rec.manifests[0].digest), rec.manifests[0].media_type)
        manifest_layers = [d.digest for d in m.layers]
    return {
        "Id": rec.id,
        "Digest": rec.manifests[0].digest if rec.manifests else None,
        "RepoTags": img.repo_tags,
        "RepoDigests": img.repo_digests,
        "Names": list(rec.names),
        "Parent": rec.parent or "",
        "Created": cfg.created,
        "Author": cfg.author or "",
        "Architecture": cfg.architecture,
        "Os": cfg.os,
        "Variant": cfg.variant or "",
        "Config": cfg.config,
        "Labels": cfg.labels,
        "RootFS": {"Type": "layers", "Layers": list(cfg.diff_ids)},
        "ChainIDs": list(img.chain),
        "TopLayer": rec.top_layer,
        "Layers": manifest_layers,
        "Manifests": [{"digest": m.digest, "mediaType": m.media_type} for m in rec.manifests],
        "Size": size,
        "VirtualSize": size,
        "History": list(cfg.history),
        "Origin": rec.origin,
        "Loaded": rec.loaded,
        "LastUpdated": rec.last_updated,
        "LastUsed": rec.last_used,
    }


def history(store: ImageStore, img: Image) -> list[dict[str, Any]]:
    """Newest first, like ``docker history``: the newest entry of the image and of each local ancestor (the
    parents commits record) carries that image's ID and tags, every other entry ``<missing>``."""
    sizes = []
    for c in img.chain:
        try:
            sizes.append(store.layers.get(c).size)
        except Exception:
            sizes.append(0)
    entries = list(img.config.history) or [{} for _ in img.chain]
    out = []
    layer_i = 0
    for h in entries:
        empty = bool(h.get("empty_layer", False))
        size = 0
        if not empty and layer_i < len(sizes):
            size = sizes[layer_i]
            layer_i += 1
        out.append({
            "Id": "<missing>",
            "Created": h.get("created"),
            "CreatedBy": h.get("created_by", ""),
            "Comment": h.get("comment", ""),
            "Author": h.get("author", ""),
            "EmptyLayer": empty,
            "Size": size,
            "Tags": [],
        })
    for owner, count in _history_owners(store, img, entries):
        if out[count - 1]["Id"] == "<missing>":  # the newer image keeps a row they would share
            out[count - 1].update(Id=owner.id, Tags=owner.repo_tags)
    out.reverse()
    return out


def _history_owners(store: ImageStore, img: Image, entries: list[dict[str, Any]]) -> list[tuple[Image, int]]:
    """The image and each local ancestor whose history begins ``entries``, with how many entries are theirs:
    the walk up the parents stops at one that is gone or whose history is not a prefix of the image's."""
    owners = [(img, len(entries))] if entries else []
    seen = {img.id}
    parent = img.record.parent
    while parent and parent not in seen:
        seen.add(parent)
        try:
            ancestor = load(store, store.get(parent))
        except LaminaError:  # removed meanwhile, or damaged: the rest of the history stays <missing>
            break
        own = list(ancestor.config.history)
        if not own or own != entries[: len(own)]:
            break
        owners.append((ancestor, len(own)))
        parent = ancestor.record.parent
    return owners


# -- names ----------------------------------------------------------------------------------------------
def tag(store: ImageStore, img: Image, new_name: str) -> str:
    """Name an image; when its manifest digest is known, the new repository gets ``NAME@DIGEST`` too (cri-o's
    makeRepoDigests), so the name can be pushed, saved and looked up by digest like the ones it came with."""
    ref = parse_normalized(new_name)
    if ref.digest is not None:
        raise InvalidReference(f"cannot tag with a digest reference {new_name!r}; give name[:tag]")
    name = str(ref.with_default_tag())
    names = [name]
    if img.record.manifests:
        names.append(f"{ref.name}@{img.record.manifests[0].digest}")
    store.add_names(img.id, names)
    return name


def untag(store: ImageStore, img: Image, name: str, users: UsersOf | None = None) -> list[dict[str, str]]:
    ref = parse_normalized(name)
    key = _name_key(ref)
    if key not in img.record.names:
        raise InvalidReference(f"image {img.short_id} has no name {ref.familiar()}")
    out, deleted = _remove_name(store, img.record, ref)
    if deleted:
        out.append({"Deleted": img.id})
    return out


def _remove_name(store: ImageStore, rec: ImageRecord, named: Reference) -> tuple[list[dict[str, str]], bool]:
    """Remove a name from an image. A tag that was the last of its repository on the image takes that
    repository's digest names with it (docker's rule). The image goes too when that leaves it no name,
    child or container, in the same transaction: a process killed midway leaves the image as it was or no
    image, never a nameless one. Returns the names removed (as ``Untagged`` entries) and whether it went."""
    key = _name_key(named)
    names = [key]
    if named.digest is None and not any(parse_normalized(t).name == named.name for t in rec.tags if t != key):
        names += [n for n in rec.digests if parse_normalized(n).name == named.name]
    removed: list[str] = []
    deleted = store.delete(rec.id, if_unused=True, untag=names, names_out=removed) is not None
    return [{"Untagged": parse_normalized(n).familiar()} for n in removed], deleted


def _is_id_ref(store: ImageStore, ref: str) -> bool:
    if ref.startswith("sha256:"):
        return True
    try:
        named = parse_normalized(ref)
    except InvalidReference:
        return looks_like_id_prefix(ref)
    if store.by_name(_name_key(named)) is not None:
        return False
    return looks_like_id_prefix(ref)


class ImageUser(NamedTuple):
    """A container created from an image, and whether it runs."""

    container_id: str
    running: bool


UsersOf = Callable[[str], list[ImageUser]]


def _no_users(image_id: str) -> list[ImageUser]:
    return []


def delete(
    store: ImageStore, ref: str, *, force: bool = False, prune: bool = True, users: UsersOf = _no_users
) -> list[dict[str, str]]:
    """Docker's ImageDelete. ``users(image_id)`` names the containers created from an image. Deleting the
    image while one of them runs is a hard conflict, even with ``force``; stopped ones are a conflict unless
    ``force``, and then only the image's names go (the containers keep the image). A name alone goes with
    ``force`` whatever its image's containers do, as with docker."""
    rec = find(store, ref)
    out: list[dict[str, str]] = []
    short = rec.id.split(":", 1)[1][:12]
    if not _is_id_ref(store, ref):
        named = parse_normalized(ref)
        in_use = users(rec.id)
        if in_use and len(rec.tags) <= 1 and not force:
            raise ImageConflict(
                f"unable to remove {named.familiar()}: image {short} is used by container {in_use[0].container_id[:12]}"
            )
        out, deleted = _remove_name(store, rec, named)
        if deleted:
            out.append({"Deleted": rec.id})
            _prune_parents(store, rec.parent, out, prune)
        return out
    in_use = users(rec.id)
    running = [u.container_id for u in in_use if u.running]
    if running:  # a hard conflict: --force does not override it
        raise ImageConflict(f"unable to delete {short}: image is used by running container {running[0][:12]}")
    if in_use and not force:
        raise ImageConflict(
            f"unable to delete {short}: image is used by stopped container {in_use[0].container_id[:12]} "
            "(--force removes only its names)"
        )
    children = store.children(rec.id)
    if children:
        short = ", ".join(c.split(":")[1][:12] for c in children)
        raise ImageConflict(f"image {rec.id.split(':')[1][:12]} has dependent child images ({short})")
    repos = {parse_normalized(n).name for n in rec.names}
    if len(repos) > 1 and not force:
        raise ImageConflict(
            f"image {rec.id.split(':')[1][:12]} is referenced in multiple repositories "
            f"({', '.join(sorted(parse_normalized(n).familiar_name() for n in rec.names))}); "
            "remove them by name or use --force"
        )
    if in_use:  # forced: the containers keep the (now nameless) image
        for n in rec.names:
            store.remove_name(n, rec.id)
            out.append({"Untagged": parse_normalized(n).familiar()})
        return out
    # The names go with the image, in the transaction that checks for children and containers once more:
    # a refusal there leaves the image as it was.
    parent = rec.parent
    names: list[str] = []
    store.delete(rec.id, names_out=names)
    out.extend({"Untagged": parse_normalized(n).familiar()} for n in names)
    out.append({"Deleted": rec.id})
    _prune_parents(store, parent, out, prune)
    return out


def _prune_parents(store: ImageStore, parent: str | None, out: list[dict[str, str]], prune: bool) -> None:
    """Delete the parents that nothing names or uses any more, nearest first."""
    while prune and parent and store.exists(parent):
        nxt = store.get(parent).parent
        if store.delete(parent, if_unused=True) is None:
            break
        out.append({"Deleted": parent})
        parent = nxt


# -- prune ----------------------------------------------------------------------------------------------
PRUNE_FILTERS = ("dangling", "until", "label", "label!")


@dataclass
class PruneReport:
    """What a prune removed, as docker reports it, and the bytes that went (by the store's accounting:
    ``system df``'s total drops by as much)."""

    deleted: list[dict[str, str]] = field(default_factory=list)
    reclaimed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"ImagesDeleted": self.deleted, "SpaceReclaimed": self.reclaimed}


def _prune_matcher(filters: dict[str, list[str]]) -> tuple[bool, Callable[[ImageStore, ImageRecord], bool]]:
    """(whether tagged images go too, whether a record passes the ``until`` and label filters)."""
    from lamina.timespec import parse_time

    for key, values in filters.items():
        if key not in PRUNE_FILTERS:
            raise ImageError(f"invalid filter {key!r}; prune filters are {', '.join(PRUNE_FILTERS)}")
        if key == "dangling" and any(v not in ("true", "false", "1", "0") for v in values):
            raise ImageError(f"invalid filter 'dangling={values[0]}': use true or false")
    every = "dangling" in filters and filters["dangling"][-1] in ("false", "0")
    until = min(parse_time(v) for v in filters["until"]) if filters.get("until") else None
    wanted, unwanted = filters.get("label", []), filters.get("label!", [])

    def matches(store: ImageStore, rec: ImageRecord) -> bool:
        if until is not None and created_time(rec) >= until:
            return False
        if wanted or unwanted:
            labels = load(store, rec).config.labels
            if not _labels_match(labels, wanted):
                return False
            if any(_labels_match(labels, [u]) for u in unwanted):
                return False
        return True

    return every, matches


def prune(store: ImageStore, filters: dict[str, list[str]]) -> PruneReport:
    """Docker's ImagesPrune: remove the images without a tag (with ``dangling=false``, every image) that no
    container uses and no other image stands on, matching ``until`` (created before) and ``label``/``label!``;
    a removed image's parents that are then left without names or users go as well, as they do with rmi.
    Each image goes in one transaction that checks once more that its names are still those it was chosen
    with and that nothing needs it, so an image tagged or used meanwhile stays."""
    every, matches = _prune_matcher(filters)
    sizes = {layer.chain_id: layer.size for layer in store.layers.all()}
    report = PruneReport()
    seen: set[str] = set()

    def remove(rec: ImageRecord, names: tuple[str, ...] | None) -> bool:
        blobs = {d: store.content.stored_size(d) or 0 for d in store.blobs(rec.id)}
        removed: list[str] = []
        try:
            layers = store.delete(rec.id, names_seen=rec.names if names is None else names, names_out=removed)
        except ImageNotFound:
            return False
        if layers is None:
            return False
        report.deleted.extend({"Untagged": parse_normalized(n).familiar()} for n in removed)
        report.deleted.append({"Deleted": rec.id})
        report.reclaimed += sum(sizes.get(c, 0) for c in layers)
        report.reclaimed += sum(n for d, n in blobs.items() if not store.content.exists(d))
        return True

    progress = True
    while progress:
        progress = False
        records = store.all()
        used = store.container_counts()
        parents = {r.parent for r in records if r.parent}
        for rec in records:
            if rec.id in seen or rec.id in parents or rec.id in used or (rec.tags and not every):
                continue
            seen.add(rec.id)
            try:
                if not matches(store, rec) or not remove(rec, None):
                    continue
            except (ImageNotFound, BlobNotFound):  # another process removed it meanwhile
                continue
            progress = True
            parent = rec.parent
            while parent:  # intermediate images left without names or users
                try:
                    prec = store.get(parent)
                except ImageNotFound:  # removed meanwhile
                    break
                if prec.names or not remove(prec, ()):
                    break
                seen.add(parent)
                parent = prec.parent
    return report


# -- save -----------------------------------------------------------------------------------------------
def save(store: ImageStore, refs: list[str], path: str | os.PathLike[str], fmt: str, keep_layer_blobs: bool) -> None:
    from lamina.formats.archives import WRITERS
    from lamina.images import transfer

    if fmt not in WRITERS:
        raise ImageError(f"unknown format {fmt!r}; use one of {', '.join(WRITERS)}")
    if not refs:
        raise ImageError("no image to save")
    chosen: dict[str, tuple[ImageRecord, list[str]]] = {}
    for ref in refs:
        for rec, names in _to_save(store, ref):
            rec_names = chosen.setdefault(rec.id, (rec, []))[1]
            rec_names.extend(n for n in names if n not in rec_names)

    transfer.save(store, list(chosen.values()), path, fmt, store.layers.export_exact, keep_layer_blobs)
    store.touch(chosen)


def save_set(store: ImageStore, ref: str) -> list[str]:
    """The IDs of the images a save of ``ref`` takes (:class:`ImageNotFound` when this store has none)."""
    return [rec.id for rec, _ in _to_save(store, ref)]


def _to_save(store: ImageStore, ref: str) -> list[tuple[ImageRecord, list[str]]]:
    """The images ``ref`` names for a save, each with the names to save it under: a repository without tag
    or digest means every tagged image of it (``docker save repo``); an ID, the image with all its tags."""
    try:
        named: Reference | None = parse_normalized(ref)
    except InvalidReference:
        named = None
    if named is not None and named.tag is None and named.digest is None:
        by_image: dict[str, list[str]] = {}
        for name, image_id in store.repository_tags(named.name):
            by_image.setdefault(image_id, []).append(name)
        if by_image:
            return [(store.get(image_id), names) for image_id, names in by_image.items()]
    rec = find(store, ref)
    return [(rec, list(rec.tags) if _is_id_ref(store, ref) else [_name_key(parse_normalized(ref))])]


# -- import ---------------------------------------------------------------------------------------------
def import_rootfs(
    store: ImageStore,
    stream: Readable,
    ref: str | None,
    changes: list[str],
    message: str,
    platform: oci.Platform | None,
) -> Image:
    from lamina.formats.imageconfig import apply_changes
    from lamina.images import transfer

    name = None
    if ref:
        named = parse_normalized(ref)
        if named.digest is not None:
            raise InvalidReference(f"cannot import to a digest reference {ref!r}")
        name = str(named.with_default_tag())
    apply_changes({}, changes)  # bad --change instructions fail before any layer is written
    with store.store.lease() as lease:
        layer = store.layers.register(stream, None, lease=lease)
        config = transfer.new_config(
            [layer.diff_id], platform or oci.host_platform(), changes, message, created_by="lamina import"
        )
        image_id = sha256_digest(config)
        lease.blob(image_id)
        store.content.put(config, image_id)
        parsed = oci.parse_config(config)
        rec, _ = store.create(NewImage(
            id=image_id, diff_ids=[layer.diff_id], created=transfer.parse_time(parsed.created),
            origin="import", names=[name] if name else [], blobs=[image_id], labels=parsed.labels,
        ), lease)
    return load(store, rec)


# -- commit and squash ----------------------------------------------------------------------------------
def _child_config(img: Image, diff_ids: list[str], history: list[dict[str, Any]], **top: Any) -> bytes:
    import json

    doc = dict(img.config.doc)
    for own in ("container", "container_config"):  # what the parent's own build step ran with is not the child's
        doc.pop(own, None)
    doc.update({k: v for k, v in top.items() if v is not None})
    rootfs = dict(doc.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = list(diff_ids)
    doc["rootfs"] = rootfs
    doc["history"] = history
    return json.dumps(doc, separators=(",", ":")).encode()


def _store_image(
    store: ImageStore, lease: Lease, raw: bytes, name: str | None, parent: str | None, origin: str
) -> Image:
    from lamina.images import transfer

    cfg = oci.parse_config(raw)
    image_id = sha256_digest(raw)
    lease.blob(image_id)
    store.content.put(raw, image_id)
    rec, _ = store.create(NewImage(
        id=image_id, diff_ids=[DiffID(d) for d in cfg.diff_ids], created=transfer.parse_time(cfg.created),
        origin=origin, names=[name] if name else [], blobs=[image_id], parent=parent, labels=cfg.labels,
    ), lease)
    return load(store, rec)


def _target_name(ref: str | None) -> str | None:
    if not ref:
        return None
    named = parse_normalized(ref)
    if named.digest is not None:
        raise InvalidReference(f"cannot name an image with a digest reference {ref!r}")
    return str(named.with_default_tag())


def commit(
    store: ImageStore,
    img: Image,
    diff: Readable,
    ref: str | None,
    *,
    author: str = "",
    message: str = "",
    changes: list[str] | None = None,
    config: dict[str, Any] | None = None,
    container_config: dict[str, Any] | None = None,
) -> Image:
    """A new image: ``img`` plus one layer made of ``diff`` (a container's changes), with a history entry.

    ``config`` replaces the image's runtime config (before ``changes`` apply). A build step passes the
    ``container_config`` it ran with (docker's ContainerConfig): it is recorded in the new image's config,
    its ``Cmd`` becomes the history entry's ``created_by``, and the image's origin is ``build``, which is what
    the build cache (:mod:`lamina.images.cache`) looks for; a build step that changed no file adds no layer
    (its history entry is an ``empty_layer`` one, as with docker's builder). A plain commit records no step
    config (nor inherits one) and always adds its layer.
    """
    from lamina.formats.imageconfig import apply_changes
    from lamina.images import transfer

    name = _target_name(ref)
    if container_config is not None:
        container_config = oci.check_container_config(container_config, "container_config")
    base = oci.check_container_config(config, "config") if config is not None else img.config.config
    runtime = apply_changes(dict(base), changes or [])
    with store.store.lease() as lease:
        layer = store.layers.register(diff, img.chain[-1] if img.chain else None, lease=lease)
        now = transfer.utc_now_rfc3339()
        created_by = "lamina commit"
        if container_config is not None:
            created_by = " ".join(container_config.get("Cmd") or [])
        entry: dict[str, Any] = {"created": now, "created_by": created_by}
        if author:
            entry["author"] = author
        if message:
            entry["comment"] = message
        diff_ids = [*img.config.diff_ids, layer.diff_id]
        if container_config is not None and layer.diff_id == EMPTY_TAR_DIFF_ID and img.chain:
            entry["empty_layer"] = True  # the leased empty layer goes when the image commits
            diff_ids.pop()
        raw = _child_config(
            img, diff_ids, [*img.config.history, entry],
            created=now, author=author or None, config=runtime, container_config=container_config,
        )
        return _store_image(store, lease, raw, name, img.id, "commit" if container_config is None else "build")


def squash(store: ImageStore, img: Image, parent: Image | None, diff: Readable) -> Image:
    """Docker's SquashImage: ``parent``'s layers plus one layer holding ``diff`` (the image's tree against
    the parent's, or the whole tree); history entries past the parent's are marked empty."""
    from lamina.images import transfer

    if parent is not None and img.diff_ids[: len(parent.diff_ids)] != parent.diff_ids:
        raise ImageError(f"image {parent.short_id} is not an ancestor of {img.short_id}")
    base = parent.chain[-1] if parent and parent.chain else None
    with store.store.lease() as lease:
        layer = store.layers.register(diff, base, lease=lease)
        keep = len(parent.config.history) if parent else 0
        history = [dict(h) if i < keep else {**h, "empty_layer": True} for i, h in enumerate(img.config.history)]
        now = transfer.utc_now_rfc3339()
        comment = f"merge {img.id} to {parent.id}" if parent else f"create new from {img.id}"
        history.append({"created": now, "comment": comment})
        diff_ids = [*(parent.config.diff_ids if parent else ()), layer.diff_id]
        raw = _child_config(img, diff_ids, history, created=now)
        return _store_image(store, lease, raw, None, None, "squash")

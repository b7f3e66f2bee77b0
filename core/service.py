"""``ImageService``: the public entry point to a lamina store.

Method names follow Docker's ImageService in snake_case. It covers the layer store and the image store
(load, save, import, names, listing, deletion); containers and registries build on it.

    >>> from lamina import ImageService
    >>> with ImageService.open(root="/tmp/store", driver="vfs") as svc:      # doctest: +SKIP
    ...     layer = svc.register_layer(open("rootfs.tar.gz", "rb"))
    ...     print(layer.chain_id, svc.storage_driver())
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, Concatenate, ParamSpec, TypeVar

from lamina.config import Config, load_config
from lamina.contract import Capabilities, Change
from lamina.errors import ContainerNotFound, ImageConflict, ImageError, ImageNotFound, LaminaError, LayerNotFound
from lamina.plugins import OpStats
from lamina.store.kernel import Store, probe
from lamina.store.layers import Layer, LayerStore

if TYPE_CHECKING:
    from lamina.formats.oci import Platform
    from lamina.images.cache import ImageCache, ReleasableLayer
    from lamina.images.graph import ContentGraph
    from lamina.images.ops import Image, ImageSummary, ImageUser, PruneReport
    from lamina.images.transfer import Copied, Loaded, ProgressFn
    from lamina.plugins.discovery import DriverCatalog
    from lamina.store.check import CheckReport
    from lamina.store.containers import Container, ContainerStore
    from lamina.store.events import Event
    from lamina.store.images import ImageRecord, ImageStore
    from lamina.store.usage import DiskUsage
    from lamina.tar.compression import Readable

log = logging.getLogger("lamina.service")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _timed(op: str) -> Callable[[Callable[Concatenate[ImageService, _P], _R]],
                                 Callable[Concatenate[ImageService, _P], _R]]:
    """Count an ImageService method's calls, errors and wall time as operation ``op`` (``image.pull``), kept
    with the driver's hook timings (the run root's ``timings``; ``lamina info``)."""

    def wrap(f: Callable[Concatenate[ImageService, _P], _R]) -> Callable[Concatenate[ImageService, _P], _R]:
        @functools.wraps(f)
        def timed(self: ImageService, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            t0 = time.perf_counter()
            failed = True
            try:
                out = f(self, *args, **kwargs)
                failed = False
                return out
            finally:
                dt = time.perf_counter() - t0
                st = self.store.timings.setdefault(op, OpStats())
                st.calls += 1
                st.errors += failed
                st.total_s += dt
                st.max_s = max(st.max_s, dt)

        return timed

    return wrap


class ImageService:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._layers = store.layers
        self._shared: list[ImageService] | None = None
        if store.db.labels_pending and not store.read_only:  # a store that schema 5 migrated: once
            from lamina.formats.oci import parse_config

            try:
                store.images.record_labels(lambda raw: parse_config(raw).labels)
            except LaminaError as e:  # (a full disk, a busy store): listings read the configs until next time
                log.debug("labels not recorded yet: %s", e.message)

    # -- additional image stores ----------------------------------------------------------------------
    @property
    def shared_stores(self) -> list[ImageService]:
        """The additional image stores (``[storage] additional_image_stores``), opened on first use and only
        ever read. One that cannot be opened is left out with a warning, so that a shared filesystem that is
        not mounted stops no local work."""
        if self._shared is None:
            import dataclasses
            import hashlib

            self._shared = []
            for path in self.config.additional_image_stores:
                tag = hashlib.sha256(str(path).encode()).hexdigest()[:16]
                cfg = dataclasses.replace(self.config, root=path, runroot=self.config.runroot / "shared" / tag,
                                          driver=None, additional_image_stores=(), image_store=None)
                try:
                    self._shared.append(ImageService(Store(cfg, shared=True)))
                except LaminaError as e:
                    log.warning("additional image store %s left out: %s", path, e.message)
                except OSError as e:  # not readable by this user, say
                    log.warning("additional image store %s left out: %s", path, e.strerror or e)
        return self._shared

    @property
    def location(self) -> str:
        """Where this service's images live: ``""`` for a store of its own, the root of an additional one."""
        return str(self.store.root) if self.store.shared else ""

    def _owner(self, ref: str) -> tuple[ImageService, Image]:
        """The store holding the image ``ref`` names (this one first, then the additional stores)."""
        try:
            return self, self.get_image(ref)
        except ImageNotFound as missing:
            for other in self.shared_stores:
                try:
                    return other, other.get_image(ref)
                except ImageNotFound:
                    continue
            raise missing

    def _only_here(self, ref: str) -> None:
        """Refuse to change an image that lives in an additional image store (it is only read)."""
        if not self.config.additional_image_stores:
            return
        try:
            self.get_image(ref)
        except ImageNotFound:
            other, img = self._owner(ref)
            if other is not self:  # (another process may have made it here meanwhile: then it is this store's)
                raise ImageConflict(f"image {img.short_id} is in the additional image store {other.location}, "
                                    "which lamina only reads") from None

    @property
    def container_store(self) -> ContainerStore:
        return self.store.containers

    @property
    def image_store(self) -> ImageStore:
        """The image store (created on first use, so layer-only commands stay lean)."""
        return self.store.images

    @classmethod
    def open(
        cls,
        config: Config | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        driver: str | None = None,
        root: str | os.PathLike[str] | None = None,
        runroot: str | os.PathLike[str] | None = None,
        image_store: str | os.PathLike[str] | None = None,
        catalog: DriverCatalog | None = None,
        recover: bool = True,
    ) -> ImageService:
        """Open (creating if needed) the store the configuration describes.

        ``config`` wins when given; otherwise the configuration file is looked up and ``driver``,
        ``root``, ``runroot`` and ``image_store`` override it. With ``recover=False`` what killed processes left is not
        finished off on opening (for :meth:`check`, which reports it).
        """
        if config is None:
            config = load_config(config_path, driver=driver, root=root, runroot=runroot, image_store=image_store)
        return cls(Store(config, catalog=catalog, recover=recover))

    @staticmethod
    def available_drivers(config: Config | None = None) -> list[dict[str, Any]]:
        """Every storage driver installed (built-in and third-party, and broken plugins with why), whether
        it works here and what its probe found; needs no store (``lamina drivers``)."""
        from lamina.errors import DriverUnsupported
        from lamina.plugins.discovery import discover

        cfg = config or load_config()
        cat = discover()
        rows: list[dict[str, Any]] = []
        for name, info in sorted(cat.drivers.items()):
            reason = ""
            details: list[tuple[str, str]] = []
            try:
                probe(info.cls, cfg.root, cfg.image_store, cfg.options_for(name))
                ok = True
                details = info.cls.probe_details(cfg.root / name, cfg.runroot / name, cfg.options_for(name))
            except DriverUnsupported as e:
                ok, reason = False, e.message
            rows.append({"name": name, "source": info.source, "supported": ok, "reason": reason,
                         "description": info.cls.description, "details": dict(details)})
        for b in cat.broken:
            rows.append({"name": ",".join(b.names) or "?", "source": b.source, "supported": False,
                         "reason": b.error, "description": "broken plugin"})
        return rows

    def __enter__(self) -> ImageService:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        self._close_shared()
        self.store.close(abandon=isinstance(e, KeyboardInterrupt))

    def cleanup(self) -> None:
        """Release the driver and close the store's databases."""
        self._close_shared()
        self.store.close()

    def _close_shared(self) -> None:
        for other in self._shared or []:
            other.cleanup()
        self._shared = None

    # -- store ----------------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._layers.config

    def storage_driver(self) -> str:
        return self.store.driver.name

    def capabilities(self) -> Capabilities:
        return self.store.driver.capabilities()

    def layer_store_status(self) -> list[tuple[str, str]]:
        st = self._layers
        out = [
            ("Storage Driver", st.driver.name),
            ("Driver Source", st.driver.source),
            ("Root", str(st.root)),
            ("Run Root", str(st.runroot)),
            *([("Image Store", str(self.store.image_root))] if self.store.image_root is not None else []),
            ("Layers", str(st.count())),
            ("Images", str(self.count_images())),
        ]
        out.extend(st.driver.status())
        return out

    def check(self, *, quick: bool = False, repair: bool = False, force: bool = False) -> CheckReport:
        """Whether the store is sound (``lamina system check``): every problem found, one per object.
        ``quick`` reads no file contents. With ``repair``, orphans and leftovers are removed, and each
        damaged layer or image with the images that need it (and, with ``force``, the containers); the
        report then also says what was removed and what a second check still finds."""
        return self.store.check(quick=quick, repair=repair, force=force)

    def layer_disk_usage(self) -> int:
        """The store's bytes as recorded: committed layers and the content store (``system df``'s total)."""
        from lamina.store.usage import usage_total

        return usage_total(self.store)

    def usage_summary(self) -> DiskUsage:
        """:meth:`disk_usage`'s rows and total alone (no per-image or per-container list), from aggregate
        queries: as fast for ten thousand images as for ten."""
        from lamina.store.usage import usage_summary

        return usage_summary(self.store)

    def disk_usage(self, verbose: bool = False) -> DiskUsage:
        """``lamina system df``: images, containers, layers and the content store (count, active, size,
        reclaimable) and each image's shared and unique size, from the sizes recorded when layers were
        committed; containers' read-write layers are measured only when ``verbose``."""
        from lamina.store.usage import disk_usage

        def measure(rw: str, init: str) -> int | None:
            try:
                return self._layers.diff_size_of(rw, init)
            except LaminaError:  # removed meanwhile
                return None

        return disk_usage(self.store, measure_rw=measure if verbose else None)

    def recorded_timings(self) -> dict[str, dict[str, Any]]:
        """Per-hook timings accumulated by every process since the runroot was created (``lamina info``)."""
        return self._layers.recorded_timings()

    def timings(self) -> dict[str, dict[str, Any]]:
        return {k: v.as_dict() for k, v in sorted(self.store.timings.items())}

    # -- events ---------------------------------------------------------------------------------------
    def events(
        self,
        since: str | float | None = None,
        until: str | float | None = None,
        filters: dict[str, list[str]] | list[str] | None = None,
        follow: bool = False,
    ) -> Iterator[Event]:
        """The events of every process using the store, oldest first (``lamina events``).

        ``since``/``until``: Unix seconds, or as ``docker events`` reads them, an RFC 3339 time or a
        duration before now (``10m``). ``filters``: ``type`` (image, container, layer), ``event`` (the
        action), ``image``, ``container``, ``layer`` (ID, ID prefix or name). Without ``since``, all the
        events kept, or only new ones when following without ``until``; ``follow`` waits for more until
        ``until`` has passed (forever without it: stop iterating to end)."""
        from lamina.formats.reference import parse_normalized
        from lamina.store.events import parse_filters
        from lamina.timespec import parse_time

        wanted = parse_filters(filters)
        for i, value in enumerate(wanted.get("image", [])):
            with contextlib.suppress(LaminaError):  # not a name: an ID or ID prefix
                wanted["image"][i] = parse_normalized(value).familiar()
        now = time.time()

        def ns(t: str | float | None) -> int | None:
            return None if t is None else int((t if isinstance(t, (int, float)) else parse_time(t, now)) * 1e9)

        since_ns, until_ns = ns(since), ns(until)
        return self.store.events.read(since_ns=since_ns, until_ns=until_ns, filters=wanted, follow=follow)

    def _event(self, type: str, action: str, id: str, name: str = "", **attrs: str) -> None:
        """Record that ``action`` was done to an image, container or layer; call it once the action has
        succeeded. Never fails (an event that cannot be written is dropped)."""
        self.store.events.append(type, action, id, name, attrs)

    @staticmethod
    def _name_of(record: ImageRecord | None, name: str | None = None) -> str:
        """An image's name as events show it: ``name`` if given, else its first tag (familiar), else none."""
        from lamina.formats.reference import parse_normalized

        chosen = name or (record.tags[0] if record is not None and record.tags else "")
        try:
            return parse_normalized(chosen).familiar() if chosen else ""
        except LaminaError:
            return chosen  # an ID or ID prefix

    # -- layers ---------------------------------------------------------------------------------------
    @_timed("layer.create")
    def register_layer(
        self,
        stream: BinaryIO | Readable,
        parent: str | None = None,
        *,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
    ) -> Layer:
        """Apply a layer tar (gzip, zstd, xz, bzip2 or plain) on ``parent`` (a ChainID).

        The caller holds one reference on the returned layer until :meth:`release_layer`.
        """
        layer = self._layers.register(
            stream, parent, expected_diff_id=expected_diff_id, expected_digest=expected_digest
        )
        self._event("layer", "create", layer.chain_id, **({"parent": parent} if parent else {}))
        return layer

    def get_layer(self, ref: str) -> Layer:
        """A layer by ChainID or unique ChainID hex prefix."""
        return self._layers.find(ref)

    def layers(self) -> list[Layer]:
        return self._layers.all()

    def retain_layer(self, chain: str) -> Layer:
        return self._layers.retain(chain)

    @_timed("layer.remove")
    def release_layer(self, ref: str) -> list[str]:
        """Drop one reference taken by :meth:`register_layer` or :meth:`retain_layer`; returns the ChainIDs
        removed as a result. References that images and containers hold are not the caller's to drop: a
        layer they use is refused (:class:`LayerInUse` names them), and so is one with child layers."""
        removed = [str(c) for c in self._layers.release(self._layers.find(ref).chain_id)]
        for chain in removed:
            self._event("layer", "remove", chain)
        return removed

    def export_layer(self, ref: str) -> BinaryIO:
        """The exact tar stream of a layer; raises ExportError at its end if it no longer matches."""
        return self._layers.export_exact(self._layers.find(ref).chain_id)  # type: ignore[return-value]

    def layer_changes(self, ref: str) -> list[Change]:
        return self._layers.changes(self._layers.find(ref).chain_id)

    @contextmanager
    def mounted_layer(self, ref: str) -> Iterator[str]:
        """Mount a layer's full tree read-only-by-convention for the duration of the block."""
        with self._layers.mounted(self._layers.find(ref).cache_id) as path:
            yield path

    @_timed("layer.mount")
    def mount_layer(self, ref: str) -> str:
        """Take a mount reference that outlives this process (``lamina mount``); see unmount_layer."""
        layer = self._layers.find(ref)
        path = self._layers.mount(layer.cache_id)
        self._event("layer", "mount", layer.chain_id)
        return path

    @_timed("layer.unmount")
    def unmount_layer(self, ref: str, force: bool = False) -> int:
        layer = self._layers.find(ref)
        left = self._layers.unmount(layer.cache_id, force=force)
        self._event("layer", "unmount", layer.chain_id)
        return left

    def layer_mount_count(self, ref: str) -> int:
        return self._layers.mount_count(self._layers.find(ref).cache_id)

    @property
    def layer_store(self) -> LayerStore:
        return self._layers

    # -- images ---------------------------------------------------------------------------------------
    def get_image(self, ref: str) -> Image:
        """An image by name (``busybox``, ``host/repo:tag``, ``repo@sha256:...``), ID or ID prefix (≥ 3 hex)."""
        from lamina.images import ops as images

        return images.get_image(self.image_store, ref)

    def images(self, filters: dict[str, list[str]] | None = None, all: bool = False) -> list[ImageSummary]:
        """Image summaries, newest first; filters ``dangling``, ``label``, ``before``, ``since``, ``reference``.
        Images of the additional image stores follow (``store`` says where), but for those this store has."""
        from lamina.images import ops as images

        def created(ref: str) -> float:
            return images.created_time(self._owner(ref)[1].record)

        out = images.list_images(self.image_store, filters or {}, all, created_of=created)
        if not self.config.additional_image_stores:
            return out
        seen = {s.id for s in out}
        for other in self.shared_stores:
            more = [s for s in images.list_images(other.image_store, filters or {}, all, created_of=created)
                    if s.id not in seen]
            for s in more:
                s.store = other.location
            seen.update(s.id for s in more)
            out += more  # after the store's own, each store's newest first
        return out

    def count_images(self) -> int:
        return self.image_store.count()

    def children(self, ref: str) -> list[str]:
        """IDs of the images whose parent is ``ref`` (commits record their parent)."""
        return self.image_store.children(self.get_image(ref).id)

    def heads(self) -> list[str]:
        """IDs of the images that are no other image's parent."""
        return self.image_store.heads()

    def inspect_image(self, ref: str) -> dict[str, Any]:
        """Docker-inspect-like details of an image."""
        from lamina.images import ops as images

        other, img = self._owner(ref)
        return {**images.inspect(other.image_store, img), "Store": other.location}

    def get_image_manifest(self, ref: str) -> dict[str, Any] | None:
        """The descriptor of the manifest an image was loaded with (None when it came without one)."""
        other, img = self._owner(ref)
        if not img.record.manifests:
            return None
        m = img.record.manifests[0]
        return {"mediaType": m.media_type, "digest": m.digest, "size": other.image_store.content.size(m.digest)}

    def image_history(self, ref: str) -> list[dict[str, Any]]:
        from lamina.images import ops as images

        other, img = self._owner(ref)
        return images.history(other.image_store, img)

    @_timed("image.tag")
    def tag_image(self, ref: str, new_name: str) -> str:
        """Give an image another name; returns the normalized name."""
        from lamina.images import ops as images

        self._only_here(ref)
        img = self.get_image(ref)
        name = images.tag(self.image_store, img, new_name)
        self._event("image", "tag", img.id, self._name_of(None, name))
        return name

    @_timed("image.untag")
    def untag_image(self, ref: str, name: str) -> list[dict[str, str]]:
        """Remove one name; an image left with no name and no children is deleted (cri-o's UntagImage)."""
        from lamina.images import ops as images

        self._only_here(ref)
        img = self.get_image(ref)
        out = images.untag(self.image_store, img, name, self._image_users)
        self._removal_events(img.id, out)
        return out

    def _removal_events(self, image_id: str | None, entries: list[dict[str, str]]) -> None:
        """``untag`` and ``delete`` events for the ``Untagged``/``Deleted`` entries of an untag, delete or prune;
        without ``image_id`` a name belongs to the image deleted next (a prune lists each image so)."""
        for i, entry in enumerate(entries):
            if "Untagged" in entry:
                owner = image_id or next((e["Deleted"] for e in entries[i:] if "Deleted" in e), "")
                self._event("image", "untag", owner, entry["Untagged"])
            else:
                self._event("image", "delete", entry["Deleted"])

    @_timed("image.delete")
    def image_delete(self, ref: str, force: bool = False, prune: bool = True) -> list[dict[str, str]]:
        """Docker's ImageDelete: untag by name, delete by ID; returns ``Untagged``/``Deleted`` entries.

        Child images and running containers are a hard conflict; stopped containers using the image are one
        unless ``force``, which then removes only the image's names.
        """
        from lamina.images import ops as images

        self._only_here(ref)
        image_id = self.get_image(ref).id
        out = images.delete(self.image_store, ref, force=force, prune=prune, users=self._image_users)
        self._removal_events(image_id, out)
        return out

    @_timed("image.prune")
    def images_prune(self, filters: dict[str, list[str]] | None = None) -> PruneReport:
        """Docker's ImagesPrune: remove images without a tag (``dangling=false``: every image) that no container
        uses, filtered by ``until`` (created before: a duration such as ``24h``, a Unix time or a date) and
        ``label``/``label!`` (``KEY`` or ``KEY=VALUE``); returns what went and the bytes reclaimed."""
        from lamina.images import ops as images

        report = images.prune(self.image_store, filters or {})
        self._removal_events(None, report.deleted)
        self._event("image", "prune", "", reclaimed=str(report.reclaimed))
        return report

    @_timed("system.prune")
    def system_prune(self, all: bool = False) -> dict[str, Any]:
        """``lamina system prune``: stopped containers, then images without a tag (``all``: every image no
        container uses), then layers and blobs nothing references and partial downloads no pull carries on.
        Returns what went and the bytes reclaimed."""
        start = self._layers.all()  # (what is removed below was there at the start)
        stray = self.image_store.unreferenced_blobs()  # ending a removal's lease may collect them on the way
        containers: list[str] = []
        reclaimed = 0
        init_layers: set[str] = set()
        for c in self.containers():
            if c.status == "running":
                continue
            try:
                rw = self._layers.diff_size_of(c.rw_layer, c.init_layer)
                self.container_store.remove(c)
            except (ContainerNotFound, LayerNotFound):
                continue  # removed meanwhile
            except LaminaError as e:  # mounted, or started meanwhile: it stays
                log.info("container %s stays: %s", c.short_id, e.message)
                continue
            containers.append(c.id)
            self._container_event(c, "remove")
            init_layers.add(c.init_layer)
            reclaimed += rw
        left = {layer.cache_id for layer in self._layers.all()}
        reclaimed += sum(layer.size for layer in start if layer.cache_id in init_layers - left)
        report = self.images_prune({"dangling": ["false" if all else "true"]})
        reclaimed += report.reclaimed
        layers = [str(c) for c in self._layers.collect_orphans()]
        reclaimed += sum(layer.size for layer in start if layer.chain_id in layers)
        for chain in layers:
            self._event("layer", "remove", chain)
        self.image_store.gc()
        content = self.image_store.content
        blobs = {d: n for d, n in stray.items() if not content.exists(d)}
        partials = content.drop_partials()  # downloads cut short that no pull carried on
        reclaimed += sum(blobs.values()) + sum(partials.values())
        return {
            "ContainersDeleted": containers,
            "ImagesDeleted": report.deleted,
            "LayersDeleted": layers,
            "BlobsDeleted": sorted(blobs),
            "PartialDownloadsDeleted": sorted(partials),
            "SpaceReclaimed": reclaimed,
        }

    def _image_users(self, image_id: str) -> list[ImageUser]:
        """The containers created from an image, running or not (a conflict for deleting it)."""
        from lamina.images.ops import ImageUser

        return [ImageUser(c.id, c.status == "running") for c in self.container_store.using_image(image_id)]

    @_timed("image.load")
    def load_image(
        self, path: str | os.PathLike[str], *, platform: Platform | None = None, progress: ProgressFn | None = None
    ) -> list[Loaded]:
        """Load every image of a docker-archive or OCI layout (directory or tar)."""
        from lamina.images import transfer

        loaded = transfer.load(
            self.image_store, path, platform=platform, keep_layer_blobs=self.config.keep_layer_blobs,
            progress=progress,
        )
        for item in loaded:
            self._event("image", "load", item.image.id, self._name_of(item.image, next(iter(item.names), None)))
        return loaded

    @_timed("image.save")
    def export_image(self, refs: list[str], path: str | os.PathLike[str], format: str = "docker-archive") -> None:
        """Save images as ``docker-archive``, ``oci-dir`` or ``oci-archive`` at ``path``; a repository without
        tag or digest among ``refs`` means each of its tagged images (``docker save repo``)."""
        from lamina.images import ops as images

        owners: dict[int, ImageService] = {}
        for ref in refs:
            try:
                images.save_set(self.image_store, ref)
                owners[id(self)] = self
            except ImageNotFound:
                other = self._owner(ref)[0]
                owners[id(other)] = other
        if len(owners) > 1:
            raise ImageError("these images live in different stores (this one and an additional image store); "
                             "save them to separate archives")
        owner = next(iter(owners.values()), self)
        images.save(owner.image_store, refs, path, format, owner.config.keep_layer_blobs)
        for ref in refs:
            try:
                image_id = owner.get_image(ref).id
            except LaminaError:
                image_id = ""  # a repository: each of its tagged images went
            self._event("image", "save", image_id, self._name_of(None, ref), format=format)

    def copy_images(
        self, dest: ImageService, refs: list[str] | None = None, *, progress: ProgressFn | None = None,
        in_place: bool = False,
    ) -> list[Copied]:
        """Copy images (every one when ``refs`` is None or empty) from this store into ``dest``, another
        store, with no archive between: the same IDs, names, parents, manifests and blobs (byte-exact);
        layers ``dest`` has are not applied again, the others come from this store's exact tar streams.
        Each store keeps its own driver. This store is only read (and leases what is being copied).

        With ``in_place``, layers are used where they are when ``dest``'s driver can stack on them (overlay
        on overlay): nothing of their files is copied, and ``dest`` needs this store to keep them. Creating
        a container on an additional image store's image does this; ``lamina copy`` never does."""
        from lamina.images import transfer

        if os.path.realpath(dest.store.root) == os.path.realpath(self.store.root):
            raise ImageError("the source and destination are the same store")
        store = self.image_store
        wanted = [self.get_image(r).id for r in refs] if refs else [r.id for r in store.all()]
        out = []
        with self.store.lease(reading=True) as lease:  # an rmi meanwhile cannot take away what is being read
            for image_id in dict.fromkeys(wanted):
                held = store.lease_image(lease, image_id)
                copied = transfer.copy_image(store, dest.image_store, held, progress=progress, in_place=in_place)
                dest._event("image", "copy", copied.image.id, self._name_of(copied.image), source=str(self.store.root))
                out.append(copied)
        return out

    def migrate_driver(self, driver: str, *, containers: bool = False,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``lamina system migrate``: move every layer (images keep their IDs, names, manifests and blobs)
        and, with ``containers``, every container to ``driver``, in place; see :mod:`lamina.store.migrate`.
        The store is closed on return (open it again: it then runs on the new driver)."""
        from lamina.store.migrate import migrate

        return migrate(self.store, driver, containers=containers, progress=progress)

    @_timed("image.import")
    def import_image(
        self,
        stream: BinaryIO | Readable,
        ref: str | None = None,
        *,
        changes: list[str] | None = None,
        message: str = "",
        platform: Platform | None = None,
    ) -> Image:
        """A one-layer image from a root filesystem tar (any compression lamina reads)."""
        from lamina.images import ops as images

        img = images.import_rootfs(self.image_store, stream, ref, changes or [], message, platform)
        self._event("image", "import", img.id, self._name_of(img.record))
        return img

    # -- containers -----------------------------------------------------------------------------------
    @_timed("container.create")
    def create_container(
        self, image_ref: str, name: str | None = None, labels: dict[str, str] | None = None
    ) -> Container:
        """A container from an image: an init layer (runtime placeholders) and a read-write layer on it. An
        image of an additional image store is copied into this store first (its names and blobs; its layers
        are used in place where the driver can stack on them, as overlay does, and copied otherwise): a
        container's own layers live here."""
        from lamina.store.containers import exists_in

        try:
            img = self.get_image(image_ref)
        except ImageNotFound:
            other, shared = self._owner(image_ref)
            other.copy_images(self, [shared.id], in_place=True)
            img = self.get_image(shared.id)
        top = img.chain[-1] if img.chain else None
        if top is None:
            raise ImageError(f"image {img.short_id} has no layers")
        with self.store.lease() as lease:
            try:
                layer = self._layers.lease(top, lease)  # an rmi meanwhile cannot take the layer away now
            except LayerNotFound:
                raise ImageNotFound(f"image {img.short_id} was removed") from None
            with self._layers.mounted(layer.cache_id) as path:
                c = self.container_store.create(img.id, top, name, dict(labels or {}), exists_in(path), lease)
        self._container_event(c, "create")
        return c

    def _container_event(self, c: Container, action: str, **attrs: str) -> None:
        """An event about a container; its image is named (docker's ``image`` attribute) and given by ID."""
        tags = self.image_tags(c.image_id)
        image = self._name_of(None, tags[0]) if tags else c.image_id
        self._event("container", action, c.id, c.name or "", image=image, imageID=c.image_id, **attrs)

    create_layer = create_container

    def containers(self) -> list[Container]:
        return self.container_store.all()

    def get_container(self, ref: str) -> Container:
        """By ID, unique ID prefix (≥ 3 hex) or name."""
        return self.container_store.find(ref)

    def image_tags(self, image_id: str) -> tuple[str, ...]:
        """The tags of an image by its full ID; none for an image that is gone (a container keeps its ID)."""
        try:
            return self.image_store.get(image_id).tags
        except ImageNotFound:
            return ()

    @_timed("container.mount")
    def mount(self, ref: str) -> str:
        """Mount a container's root filesystem until :meth:`unmount` (refcounted); returns the path."""
        c = self.get_container(ref)
        path = self._mount_container(c, ref, scoped=False)
        self._container_event(c, "mount")
        return path

    def _mount_container(self, c: Container, ref: str, *, scoped: bool) -> str:
        try:
            return self._layers.mount(c.rw_layer, scoped=scoped)
        except LayerNotFound:  # its read-write layer is on its way out with it
            raise ContainerNotFound(f"no container {ref!r}: it was removed") from None

    @_timed("container.unmount")
    def unmount(self, ref: str, force: bool = False) -> int:
        c = self.get_container(ref)
        left = self._layers.unmount(c.rw_layer, force=force)
        self._container_event(c, "unmount")
        return left

    @contextmanager
    def perform_with_base_fs(self, ref: str) -> Iterator[str]:
        """The container's root filesystem, mounted for the block (and for this process only)."""
        c = self.get_container(ref)
        path = self._mount_container(c, ref, scoped=True)
        try:
            yield path
        finally:
            self._layers.unmount(c.rw_layer, scoped=True)

    def changes(self, ref: str) -> list[Change]:
        """What the container changed (A/C/D), against its image (the init layer is not counted)."""
        c = self.get_container(ref)
        return self._layers.changes_of(c.rw_layer, c.init_layer)

    def get_container_layer_size(self, ref: str) -> tuple[int, int]:
        """(size of the read-write layer's changes, that plus the image's size)."""
        c = self.get_container(ref)
        rw = self._layers.diff_size_of(c.rw_layer, c.init_layer)
        img = self.get_image(c.image_id)
        layers = {layer.chain_id: layer for layer in self._layers.all()}
        return rw, rw + sum(layers[ch].size for ch in img.chain if ch in layers)

    def get_layer_folders(self, ref: str) -> list[str]:
        """The CacheIDs of the container's layers, base first, read-write last."""
        c = self.get_container(ref)
        out = [c.rw_layer]
        cur = self._layers.parent_of(c.rw_layer)
        while cur:
            out.append(cur)
            cur = self._layers.parent_of(cur)
        return out[::-1]

    @_timed("container.remove")
    def remove_container(self, ref: str, force: bool = False) -> str:
        """Remove a container and its layers; a mounted one only with ``force`` (it is unmounted)."""
        c = self.get_container(ref)
        self.container_store.remove(c, force=force)
        self._container_event(c, "remove")
        return c.id

    @_timed("image.commit")
    def commit_image(
        self,
        ref: str,
        new_name: str | None = None,
        *,
        author: str = "",
        message: str = "",
        changes: list[str] | None = None,
        config: dict[str, Any] | None = None,
        container_config: dict[str, Any] | None = None,
    ) -> Image:
        """Docker's CommitImage: the container's changes become a layer on its image, in a new image.
        ``config`` replaces the image's runtime config; ``container_config``: see :meth:`commit_build_step`."""
        from lamina.images import ops as images

        c = self.get_container(ref)
        img = self.get_image(c.image_id)
        with self.perform_with_base_fs(c.id):  # a concurrent rm without --force is refused meanwhile
            diff = self._layers.diff_of(c.rw_layer, c.init_layer)
            try:
                new = images.commit(self.image_store, img, diff, new_name, author=author, message=message,
                                    changes=changes, config=config, container_config=container_config)
            except LaminaError:
                if self.container_store.exists(c.id):
                    raise
                # an rm --force took the container away while its changes were read
                raise ContainerNotFound(f"container {c.name or c.short_id} was removed during the commit") from None
            finally:
                diff.close()
        self._container_event(c, "commit", imageRef=self._name_of(new.record), committedID=new.id)
        return new

    # -- builder hooks (docker's builder backend) ------------------------------------------------------
    def commit_build_step(
        self,
        container: str,
        container_config: dict[str, Any],
        *,
        config: dict[str, Any] | None = None,
        author: str = "",
        comment: str = "",
        parent_image_id: str | None = None,
        new_name: str | None = None,
    ) -> Image:
        """Docker's CommitBuildStep: :meth:`commit_image` for a builder. The new image records its parent
        (the container's image; ``parent_image_id``, when given, must be that image) and
        ``container_config``, the config the step ran with (docker's ContainerConfig; its ``Cmd`` becomes the
        history's ``created_by``), so :meth:`make_image_cache` finds it for the same step next time.
        ``config`` is the new image's runtime config (default: the parent's)."""
        c = self.get_container(container)
        if parent_image_id and self.get_image(parent_image_id).id != c.image_id:
            raise ImageError(f"container {c.name or c.short_id} was not created from image {parent_image_id}")
        return self.commit_image(c.id, new_name, author=author, message=comment, config=config,
                                 container_config=container_config)

    def make_image_cache(self, source_refs: list[str] | None = None) -> ImageCache:
        """Docker's MakeImageCache: the build cache. Without ``source_refs`` it finds a build step's image
        among the children of its parent (:meth:`ImageCache.get_cache`); with them (``--cache-from``), the
        images named there (those that exist) are the sources, matched by history."""
        from lamina.images.cache import ImageCache

        sources = []
        for ref in source_refs or []:
            try:
                sources.append(self.get_image(ref))
            except ImageNotFound:  # docker skips a source it does not have
                continue
        return ImageCache(self.image_store, sources, local_only=not source_refs)

    def _exists(self, ref: str) -> bool:
        try:
            self.get_image(ref)
        except ImageNotFound:
            return False
        return True

    def get_image_and_releasable_layer(
        self, ref: str, *, pull_option: str = "no-pull", platform: Platform | None = None
    ) -> tuple[Image | None, ReleasableLayer]:
        """Docker's GetImageAndReleasableLayer: the image and its top layer mounted (read-only by convention)
        until :meth:`ReleasableLayer.release` (or the end of a ``with`` block). An empty ref (``scratch``, as
        docker passes it) gives no image and an empty layer. ``pull_option``: ``no-pull`` (a local image only),
        ``prefer-local`` (pull one that is missing) or ``force-pull``.

        The layer is held by a lease and a mount reference of this process: an ``rmi`` meanwhile leaves it
        in place until the release, and a killed process's are reclaimed by the next one to open the store."""
        from lamina.images.cache import ReleasableLayer

        if not ref or ref == "scratch":
            return None, ReleasableLayer.empty()
        if pull_option not in ("no-pull", "prefer-local", "force-pull"):
            raise ImageError(f"unknown pull option {pull_option!r}: use no-pull, prefer-local or force-pull")
        if pull_option == "force-pull" or (pull_option == "prefer-local" and not self._exists(ref)):
            self.pull_image(ref, platform=platform)
        img = self.get_image(ref)
        if not img.chain:
            return img, ReleasableLayer.empty()
        lease = self.store.lease()
        try:
            try:
                layer = self._layers.lease(img.chain[-1], lease)
            except LayerNotFound:
                raise ImageNotFound(f"image {img.short_id} was removed") from None
            path = self._layers.mount(layer.cache_id, scoped=True)
        except BaseException:
            lease.end()
            raise
        return img, ReleasableLayer(self._layers, layer, path, lease)

    @property
    def graph(self) -> ContentGraph:
        """The content graph of the stored images (containerd's images package: check, children, walk,
        platforms); see :mod:`lamina.images.graph`."""
        from lamina.images.graph import ContentGraph

        return ContentGraph(self.image_store)

    @_timed("image.squash")
    def squash_image(self, ref: str, parent: str | None = None) -> Image:
        """Docker's SquashImage: one new layer with the image's tree against ``parent`` (or all of it)."""
        from lamina.images import ops as images

        img = self.get_image(ref)
        pimg = self.get_image(parent) if parent else None
        top = self._layers.get(img.chain[-1]).cache_id
        base = self._layers.get(pimg.chain[-1]).cache_id if pimg and pimg.chain else None
        diff = self._layers.diff_of(top, base)
        try:
            new = images.squash(self.image_store, img, pimg, diff)
        finally:
            diff.close()
        self._event("image", "squash", new.id, self._name_of(new.record), source=img.id,
                    **({"parent": pimg.id} if pimg else {}))
        return new

    # -- running --------------------------------------------------------------------------------------
    def _spec(self, c: Container, rootfs: str, opts: dict[str, Any]) -> dict[str, Any]:
        from lamina.runtime import build_spec, rootless_user_namespace

        img = self.get_image(c.image_id)
        if "userns" not in opts:  # not root (or root only in a user namespace): a rootless spec
            opts = {**opts, "userns": rootless_user_namespace()}
        return build_spec(rootfs, img.config.config, hostname=c.id[:12], **opts)

    def bundle(self, ref: str, bundle_dir: str | os.PathLike[str], **opts: Any) -> dict[str, Any]:
        """Write an OCI runtime bundle (``config.json``) for a container, for any runtime.

        The container is mounted (a lasting reference, like :meth:`mount`) and ``root.path`` points at
        its root filesystem; :meth:`unmount` it when the runtime is done. ``opts`` are
        :func:`lamina.runtime.build_spec`'s keywords (args, env, workdir, user, network, ...).
        """
        from lamina.runtime import write_bundle

        c = self.get_container(ref)
        rootfs = self.mount(c.id)
        try:
            spec = self._spec(c, rootfs, opts)
            write_bundle(str(bundle_dir), spec)
        except BaseException:
            self.unmount(c.id)
            raise
        return spec

    @_timed("container.run")
    def run_container(
        self,
        /,
        image_ref: str,
        args: list[str] | None = None,
        *,
        name: str | None = None,
        remove: bool = False,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        **opts: Any,
    ) -> tuple[Container, int]:
        """Create a container, mount it, run it with the configured OCI runtime, unmount it.

        Returns the container and its exit code (128+N for a signal). With ``remove`` the container is
        removed afterwards; a container whose process never started is always removed.
        """
        import shutil

        from lamina.runtime import run_bundle, write_bundle

        c = self.create_container(image_ref, name=name)
        started = False
        code: int | None = None
        bundle_dir = self._layers.runroot / "bundles" / c.id
        try:
            with self.perform_with_base_fs(c.id) as rootfs:
                spec = self._spec(c, rootfs, {"args": args, **opts})
                bundle_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_bundle(str(bundle_dir), spec)
                self.container_store.set_running(c.id)
                started = True
                self._container_event(c, "start")
                code = run_bundle(
                    str(bundle_dir), c.id, runtime=self.config.runtime,
                    runtime_root=str(self._layers.runroot / "runtime"), stdin=stdin, stdout=stdout, stderr=stderr,
                )
        except BaseException as e:
            from lamina.errors import RuntimeFailure

            shutil.rmtree(bundle_dir, ignore_errors=True)
            if started and not remove and not isinstance(e, RuntimeFailure):
                self.container_store.set_exited(c.id, code)  # it ran (and was interrupted): keep it, as docker does
                self._container_event(c, "exit")
            else:
                self.container_store.remove(self.get_container(c.id), force=True)
                self._container_event(c, "remove")
            raise
        shutil.rmtree(bundle_dir, ignore_errors=True)
        self.container_store.set_exited(c.id, code)
        self._container_event(c, "exit", exitCode=str(code))
        final = self.get_container(c.id)
        if remove:
            self.container_store.remove(final, force=True)
            self._container_event(c, "remove")
        return final, int(code)

    # -- registries -----------------------------------------------------------------------------------
    @_timed("image.pull")
    def pull_image(
        self,
        name: str,
        *,
        platform: Platform | None = None,
        tls_verify: bool | None = None,
        creds: tuple[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> Image:
        """Pull an image. A truncated ID of a local image is that image (nothing is pulled); an unqualified
        name is tried on each of ``[images] registries`` in turn; a pull by digest verifies the manifest."""
        from lamina.formats.reference import looks_like_id_prefix, resolve_names
        from lamina.images import ops as images
        from lamina.registry import remote

        if looks_like_id_prefix(name) and len(name.removeprefix("sha256:")) < 64:
            rec = self.image_store.by_prefix(name.removeprefix("sha256:"))
            if rec is not None:
                return images.load(self.image_store, rec)
        candidates = resolve_names(name, self.config.registry.registries)
        for other in self.shared_stores:  # an additional image store's image is there already: no network
            for ref in candidates:
                rec = other.image_store.by_name(str(ref if ref.digest else ref.with_default_tag()))
                if rec is not None:
                    return images.load(other.image_store, rec)
        pulled = remote.pull(
            self.image_store,
            self.config,
            candidates,
            platform=platform,
            tls_verify=tls_verify,
            creds=creds,
            progress=progress,
        )
        self._event("image", "pull", pulled.loaded.image.id, self._name_of(None, pulled.reference))
        return images.load(self.image_store, pulled.loaded.image)

    @_timed("image.push")
    def push_image(
        self,
        ref: str,
        dest: str | None = None,
        *,
        tls_verify: bool | None = None,
        creds: tuple[str, str] | None = None,
        progress: ProgressFn | None = None,
    ) -> str:
        """Push an image to ``dest`` (default: the name it was given); returns the manifest digest."""
        from lamina.formats.reference import parse_normalized
        from lamina.images import transfer
        from lamina.registry import remote

        owner, img = self._owner(ref)
        if owner is not self:
            return owner.push_image(ref, dest, tls_verify=tls_verify, creds=creds, progress=progress)
        if dest is None:
            named = parse_normalized(ref)
            if not img.record.tags or ref.removeprefix("sha256:") in img.id:
                raise ImageError(f"give a destination: {ref} is not a name")
            dest = str(named if named.digest else named.with_default_tag())
        target = remote.parse_destination(dest)
        store = self.image_store
        same_registry = [
            parse_normalized(n).path for n in img.record.names if parse_normalized(n).domain == target.domain
        ]
        with self.store.lease(reading=True) as lease:
            record = store.lease_image(lease, img.id)
            export = transfer.export_for(
                store, record, [str(target)], "oci-dir", self._layers.export_exact, self.config.keep_layer_blobs,
                lease,
            )
            digest = remote.push(
                store,
                self.config,
                export,
                target,
                tls_verify=tls_verify,
                creds=creds,
                progress=progress,
                mount_from=same_registry,
            )
        store.touch([img.id])
        self._event("image", "push", img.id, self._name_of(None, str(target)), digest=digest)
        return digest

    def login(self, host: str, user: str, password: str, *, tls_verify: bool | None = None) -> None:
        """Check the credentials against the registry, then keep them: with the credential helper the user's
        auth files name for the registry, else in lamina's auth file."""
        from lamina.registry import auth, remote

        with remote.make_client(host, self.config, tls_verify=tls_verify, creds=(user, password)) as client:
            client.ping()
        auth.save_login(host, user, password)

    @staticmethod
    def logout(host: str) -> None:
        """Forget the credentials lamina stored for a registry (in its auth file or the credential helper);
        :class:`LaminaError` if there were none."""
        from lamina.errors import LaminaError
        from lamina.registry import auth

        if not auth.logout(host):
            raise LaminaError(f"not logged in to {host}")

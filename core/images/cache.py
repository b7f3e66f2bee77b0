"""What a builder needs of the image store (docker's builder backend): the build cache and releasable layers.

A builder runs each step of a build in a container made from the previous step's image and commits it
(:meth:`~lamina.service.ImageService.commit_build_step`); the image so made records its parent and the
container config the step ran with (``container_config``). Before running a step, the builder asks the
cache (:meth:`ImageCache.get_cache`) for an image that step already made:

* the local cache looks among the parent's children (images whose parent link names it; on ``scratch``,
  the images without a parent) for one a build step made (origin ``build``) whose ``container_config``
  matches the step's config (:func:`same_config`); the newest match wins;
* with cache sources (docker's ``--cache-from``), a local match counts only when it is an ancestor of a
  source; otherwise a source matches when the parent's history and layers are a prefix of its own and its
  next history entry was made by the step's ``Cmd`` (``created_by``). When that entry is the source's last,
  the source itself is the answer (and gets the parent link, when it has none); otherwise the image of that
  step is made again from the source's config, history and layers (no layer is applied: they are the
  source's), with the parent link, and the cache follows that source only from then on.

:class:`ReleasableLayer` is an image's top layer mounted for a builder (``FROM``), until released.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lamina.digest import DiffID, chain_ids
from lamina.errors import ImageNotFound, LaminaError
from lamina.formats import oci
from lamina.images.ops import Image, get_image, load

if TYPE_CHECKING:
    from types import TracebackType

    from lamina.store.images import ImageStore
    from lamina.store.layers import Layer, LayerStore
    from lamina.store.leases import Lease

#: Members compared in order (a missing one is an empty list).
_LISTS = ("Cmd", "Entrypoint", "Env", "Shell", "OnBuild")
#: Members whose keys are compared (``{"80/tcp": {}}``).
_KEY_SETS = ("ExposedPorts", "Volumes")
#: Members compared as values, with the value a missing one has.
_VALUES: dict[str, Any] = {
    "User": "", "WorkingDir": "", "StopSignal": "", "StopTimeout": None, "Healthcheck": None,
    "AttachStdin": False, "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
    "StdinOnce": False, "NetworkDisabled": False, "ArgsEscaped": False,
}
BUILD_ORIGIN = "build"


def same_config(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two container configs make the same build step (docker's cache ``compare``): ``Cmd``,
    ``Entrypoint``, ``Env``, ``Shell`` and ``OnBuild`` equal in order, ``Labels`` equal, the same keys in
    ``ExposedPorts`` and ``Volumes``, and the same ``User``, ``WorkingDir``, ``StopSignal``, ``StopTimeout``,
    ``Healthcheck`` and stream flags. What belongs to one container only (``Hostname``, ``Domainname``,
    ``Image``, ``MacAddress``) is not compared. A missing member equals an empty one; no config matches none."""
    if a is None or b is None:
        return False
    for key in _LISTS:
        if list(a.get(key) or []) != list(b.get(key) or []):
            return False
    for key in _KEY_SETS:
        if set(a.get(key) or {}) != set(b.get(key) or {}):
            return False
    if dict(a.get("Labels") or {}) != dict(b.get("Labels") or {}):
        return False
    for key, missing in _VALUES.items():
        va = a.get(key)
        vb = b.get(key)
        if (missing if va is None else va) != (missing if vb is None else vb):
            return False
    return True


def _container_config(img: Image) -> dict[str, Any] | None:
    value = img.config.doc.get("container_config")
    return value if isinstance(value, dict) else None


def _created_by(config: dict[str, Any]) -> str:
    return " ".join(config.get("Cmd") or [])


class ImageCache:
    """A build cache over an image store (made by :meth:`~lamina.service.ImageService.make_image_cache`).
    It keeps state between steps, like docker's: after a source has served a step, only it is followed."""

    def __init__(self, store: ImageStore, sources: list[Image], *, local_only: bool = True) -> None:
        self.store = store
        self.sources = list(sources)
        self.local_only = local_only

    def get_cache(
        self, parent_id: str, config: dict[str, Any], platform: oci.Platform | None = None
    ) -> str | None:
        """The ID of an image that the build step ``config`` (a container config, docker's JSON members) made
        on the image ``parent_id`` (an ID, or any reference; ``""``: scratch), or None. ``platform``: the
        image's must match. :class:`ImageNotFound` when there is no such parent."""
        config = oci.check_container_config(config)
        parent = get_image(self.store, parent_id) if parent_id else None
        found = self._local(parent, config, platform)
        if self.local_only:
            return found
        if found is not None and any(self._is_ancestor(found, s.id) for s in self.sources):
            return found
        return self._from_sources(parent, config)

    # -- the local cache: children of the parent -------------------------------------------------------
    def _local(self, parent: Image | None, config: dict[str, Any], platform: oci.Platform | None) -> str | None:
        ids = self.store.children(parent.id) if parent is not None else self.store.roots()
        best: Image | None = None
        best_time = -1.0
        for image_id in ids:
            img = self._get(image_id)
            if img is None or img.record.origin != BUILD_ORIGIN:
                continue
            if platform is not None and not oci.PlatformMatcher(platform).match(img.config.platform):
                continue
            if not same_config(_container_config(img), config):
                continue
            when = img.record.created if img.record.created is not None else img.record.loaded
            if when > best_time:  # the newest match
                best, best_time = img, when
        return best.id if best is not None else None

    def _get(self, image_id: str) -> Image | None:
        try:
            return load(self.store, self.store.get(image_id))
        except LaminaError:  # removed meanwhile, or damaged
            return None

    def _is_ancestor(self, image_id: str, of: str) -> bool:
        """Whether ``image_id`` is a (strict) ancestor of ``of`` by the parent links."""
        seen = {of}
        cur = self._parent(of)
        while cur is not None and cur not in seen:
            if cur == image_id:
                return True
            seen.add(cur)
            cur = self._parent(cur)
        return False

    def _parent(self, image_id: str) -> str | None:
        try:
            return self.store.get(image_id).parent
        except ImageNotFound:
            return None

    # -- cache sources: matched by history --------------------------------------------------------------
    def _from_sources(self, parent: Image | None, config: dict[str, Any]) -> str | None:
        done = len(parent.config.history) if parent is not None else 0
        for target in self.sources:
            history = target.config.history
            if not _valid_parent(target, parent) or _created_by(config) != history[done].get("created_by", ""):
                continue
            if len(history) - 1 == done:  # the source's last step: the source itself
                if parent is not None:
                    self.store.adopt(target.id, parent.id)
                return target.id
            made = self._restore(parent, target, config)
            self.sources = [target]  # from here on, follow this source only (docker's choice, for safety)
            return made
        return None

    def _restore(self, parent: Image | None, target: Image, config: dict[str, Any]) -> str:
        """The image of the source's step after ``parent``, made again from the source's documents."""
        from lamina.images.ops import _store_image

        done = len(parent.config.history) if parent is not None else 0
        history = [*(parent.config.history if parent else ()), target.config.history[done]]
        diff_ids = list(parent.config.diff_ids) if parent is not None else []
        layer = _layer_at(target, done)
        if layer is not None:
            diff_ids.append(layer)
        doc: dict[str, Any] = {}
        for key in ("architecture", "os", "variant", "os.version", "os.features", "author"):
            if target.config.doc.get(key):
                doc[key] = target.config.doc[key]
        created = history[-1].get("created")
        if created:
            doc["created"] = created
        doc["config"] = config
        doc["container_config"] = config
        doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        doc["history"] = history
        raw = json.dumps(doc, separators=(",", ":")).encode()
        chains = chain_ids([DiffID(d) for d in diff_ids])
        with self.store.store.lease() as lease:
            if chains:
                self.store.layers.lease(chains[-1], lease)  # the source's layer, held until the image has it
            img = _store_image(self.store, lease, raw, None, parent.id if parent else None, BUILD_ORIGIN)
        return img.id


def _valid_parent(target: Image, parent: Image | None) -> bool:
    """Whether ``parent``'s history and layers begin ``target``'s, with at least one step more in ``target``."""
    history = target.config.history
    if not history:
        return False
    if parent is None or (not parent.config.history and not parent.config.diff_ids):
        return True
    if len(parent.config.history) >= len(history) or len(parent.config.diff_ids) > len(target.config.diff_ids):
        return False
    return list(parent.config.history) == list(history[: len(parent.config.history)]) and \
        list(parent.config.diff_ids) == list(target.config.diff_ids[: len(parent.config.diff_ids)])


def _layer_at(img: Image, index: int) -> str | None:
    """The DiffID of the layer history entry ``index`` made (None for an empty-layer entry)."""
    layer = 0
    for i, entry in enumerate(img.config.history):
        if i == index:
            if entry.get("empty_layer"):
                return None
            break
        if not entry.get("empty_layer"):
            layer += 1
    return img.config.diff_ids[layer] if layer < len(img.config.diff_ids) else None


class ReleasableLayer:
    """An image's top layer, mounted and held for a builder until :meth:`release` (docker's ROLayer); also
    a context manager. ``path`` is the mounted tree (None for the empty layer of ``scratch``); it is
    read-only by convention (a driver may hand out its own directory). Held by a lease and a mount reference
    of this process, both of which the next process reclaims if this one is killed."""

    def __init__(self, layers: LayerStore | None, layer: Layer | None, path: str | None, lease: Lease | None) -> None:
        self._layers = layers
        self.layer = layer
        self.path = path
        self._lease = lease
        self.released = False

    @classmethod
    def empty(cls) -> ReleasableLayer:
        return cls(None, None, None, None)

    @property
    def chain_id(self) -> str | None:
        return self.layer.chain_id if self.layer else None

    @property
    def diff_id(self) -> str | None:
        return self.layer.diff_id if self.layer else None

    def release(self) -> None:
        """Unmount and let the layer go (idempotent)."""
        if self.released:
            return
        self.released = True
        try:
            if self._layers is not None and self.layer is not None:
                self._layers.unmount(self.layer.cache_id, scoped=True)
        finally:
            if self._lease is not None:
                self._lease.end()

    def __enter__(self) -> ReleasableLayer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else self.path
        return f"ReleasableLayer({self.chain_id or 'scratch'}, {state})"

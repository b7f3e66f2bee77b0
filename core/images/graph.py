"""The content graph of stored images, in the words of containerd's images package: ``check``,
``children``, ``walk`` and ``platforms``.

An image's graph starts at its *target*: the index it was selected from, when the content store keeps one
(an OCI layout's or a registry's index, stored among the image's blobs), otherwise the manifest the image
was loaded or pulled with. An index points at manifests (and nested indexes), a manifest at its config and
layer blobs. Images made here (commit, import) and those loaded from a docker-archive have no manifest
until a save or push makes one: their graph is their config alone. The target belongs to the image (its
config's digest), not to a name: an image loaded once from an index keeps that index whatever name it is
looked up by.

Every document is read from the content store (:mod:`lamina.store.content`) and parsed by
:mod:`lamina.formats.oci`; nothing here touches the database beyond the image store's queries.

*Present* means what containerd means: the blob is in the content store. A layer can be unpacked (a
committed layer) without its blob being kept -- with ``keep_layer_blobs = false``, or for a layer that
came without one -- and is then *missing* from the graph all the same, although the image runs; a save
or push makes such blobs again. Presence is a file's existence: ``lamina system check`` verifies digests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from lamina.errors import BlobNotFound, ImageError, InvalidDocument, LaminaError
from lamina.formats import oci
from lamina.images.ops import Image, get_image
from lamina.store.images import ImageStore

#: ``walk``'s handler: given a descriptor, the children to descend into (None or empty: none).
Handler = Callable[[oci.Descriptor], Iterable[oci.Descriptor] | None]
DescriptorLike = oci.Descriptor | Mapping[str, Any]


class CheckResult(NamedTuple):
    """What :meth:`ContentGraph.check` found. ``available``: the image's manifest could be read, so
    ``required`` is all the image needs (containerd's meaning: blobs may still be ``missing``)."""

    available: bool
    required: list[oci.Descriptor]
    present: list[oci.Descriptor]
    missing: list[oci.Descriptor]

    @property
    def complete(self) -> bool:
        """Every required blob is in the content store."""
        return self.available and not self.missing


def as_descriptor(value: DescriptorLike) -> oci.Descriptor:
    """A descriptor, or its JSON object (``mediaType``, ``digest``, ``size``...) made one."""
    if isinstance(value, oci.Descriptor):
        return value
    return oci.Descriptor.from_json(dict(value))


class ContentGraph:
    """The graph of the images in one image store (``ImageService.graph``)."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self.content = store.content

    # -- reading ------------------------------------------------------------------------------------------
    def read(self, desc: DescriptorLike) -> bytes:
        """A document's stored bytes (a manifest, index or config): :class:`BlobNotFound` when it is not in
        the content store, :class:`InvalidDocument` when it is larger than a document may be."""
        d = as_descriptor(desc)
        size = self.content.size(d.digest)
        if size > oci.MAX_DOCUMENT_BYTES:
            raise InvalidDocument(f"blob {d.digest} is {size} bytes: too large for a document")
        return self.content.read(d.digest)

    def children(self, desc: DescriptorLike) -> list[oci.Descriptor]:
        """containerd's Children: an index's manifests, a manifest's config and layers, nothing for any other
        blob; the document is read from the content store (:class:`BlobNotFound` if it is not there)."""
        d = as_descriptor(desc)
        if oci.is_index_type(d.media_type):
            return list(oci.parse_index(self.read(d), d.media_type).manifests)
        if oci.is_manifest_type(d.media_type):
            m = oci.parse_manifest(self.read(d), d.media_type)
            return [m.config, *m.layers]
        return []

    # -- an image's target ---------------------------------------------------------------------------------
    def _manifest(self, img: Image) -> oci.Descriptor | None:
        if not img.record.manifests:
            return None
        m = img.record.manifests[0]
        try:
            size = self.content.size(m.digest)
        except BlobNotFound:
            size = 0  # gone: check reports it missing
        return oci.Descriptor(m.media_type, m.digest, size)

    def _index_path(self, img: Image, manifest: oci.Descriptor) -> list[oci.Descriptor]:
        """The stored indexes from the image's top index down to the one listing its manifest (empty when it
        came without an index). Only the image's own small blobs that parse as indexes are considered."""
        known = {img.id, *(m.digest for m in img.record.manifests)}
        indexes: dict[str, tuple[oci.Descriptor, oci.Index]] = {}
        for digest in sorted(self.store.blobs(img.id)):
            if digest in known:
                continue
            try:
                size = self.content.size(digest)
                if size > oci.MAX_DOCUMENT_BYTES:
                    continue
                with self.content.open(digest) as f:
                    if f.read(1) != b"{":  # not JSON: a layer blob
                        continue
                doc = oci.parse_document(self.content.read(digest))
            except LaminaError:
                continue
            if isinstance(doc, oci.Index):
                indexes[digest] = (oci.Descriptor(doc.media_type, digest, size), doc)

        def path_from(digest: str, seen: frozenset[str]) -> list[oci.Descriptor] | None:
            desc, index = indexes[digest]
            for entry in index.manifests:
                if entry.digest == manifest.digest:
                    return [desc]
                if entry.digest in indexes and entry.digest not in seen:
                    below = path_from(entry.digest, seen | {entry.digest})
                    if below is not None:
                        return [desc, *below]
            return None

        nested = {e.digest for _, index in indexes.values() for e in index.manifests}
        for digest in indexes:
            if digest not in nested:
                found = path_from(digest, frozenset({digest}))
                if found is not None:
                    return found
        return []

    def target(self, ref: str) -> oci.Descriptor | None:
        """The root of an image's graph: the stored index it was selected from, else its manifest; None for
        an image that has no manifest (committed, imported, or loaded from a docker-archive)."""
        img = get_image(self.store, ref)
        manifest = self._manifest(img)
        if manifest is None:
            return None
        path = self._index_path(img, manifest)
        return path[0] if path else manifest

    def target_bytes(self, ref: str) -> bytes:
        """The stored bytes of :meth:`target` (``lamina manifest inspect``); :class:`ImageError` when the
        image has no manifest."""
        target = self.target(ref)
        if target is None:
            raise ImageError(
                f"image {ref} has no stored manifest (it was made here or loaded from a docker-archive); "
                "'lamina save' or 'lamina push' makes one"
            )
        return self.content.read(target.digest)

    # -- check ---------------------------------------------------------------------------------------------
    def check(self, ref: str) -> CheckResult:
        """containerd's Check for an image: ``required`` is its target, the indexes down to its manifest,
        the manifest, the config and the layer blobs; ``present`` those the content store has, ``missing``
        the others. An image without a manifest requires its config only and is not ``available``; neither
        is one whose manifest is missing."""
        img = get_image(self.store, ref)
        manifest = self._manifest(img)
        if manifest is None:
            config = oci.Descriptor(oci.MEDIA_TYPE_CONFIG, img.id, len(img.config.raw))
            return self._sort(False, [config])
        required = [*self._index_path(img, manifest), manifest]
        try:
            children = self.children(manifest)
        except BlobNotFound:
            return self._sort(False, required)
        return self._sort(True, required + children)

    def _sort(self, available: bool, required: list[oci.Descriptor]) -> CheckResult:
        present = [d for d in required if self.content.exists(d.digest)]
        missing = [d for d in required if not self.content.exists(d.digest)]
        return CheckResult(available, required, present, missing)

    # -- walk ----------------------------------------------------------------------------------------------
    @staticmethod
    def walk(handler: Handler, descriptors: Iterable[DescriptorLike], *, limit: int = 4) -> None:
        """containerd's Dispatch: call ``handler`` on each descriptor, then on the children it returns, and so
        on; at most ``limit`` handlers run at once (a thread pool). Siblings run in any order, a child only
        after its parent's handler has returned. The first exception a handler raises stops the walk (no new
        handler starts; those running finish) and is raised here."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LaminaError(f"walk limit must be a positive number, got {limit!r}")
        start = [as_descriptor(d) for d in descriptors]
        if not start:
            return
        lock = threading.Lock()
        finished = threading.Event()
        errors: list[BaseException] = []
        pending = 1  # the loop below holds one until it has submitted every start: none may end the walk early
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="lamina-walk") as pool:

            def submit(desc: oci.Descriptor) -> None:
                nonlocal pending
                with lock:
                    if errors:
                        return
                    pending += 1
                pool.submit(run, desc)

            def done() -> None:
                nonlocal pending
                with lock:
                    pending -= 1
                    if pending == 0:
                        finished.set()

            def run(desc: oci.Descriptor) -> None:
                try:
                    with lock:
                        if errors:  # a handler failed: no other starts
                            return
                    for child in handler(desc) or ():
                        submit(as_descriptor(child))
                except BaseException as e:  # handed to the caller
                    with lock:
                        errors.append(e)
                finally:
                    done()

            for d in start:
                submit(d)
            done()
            finished.wait()
        if errors:
            raise errors[0]

    # -- platforms -----------------------------------------------------------------------------------------
    def platforms(self, target: str | DescriptorLike) -> list[oci.Platform]:
        """containerd's Platforms: the platforms an image (by reference) or a stored index or manifest (by
        descriptor) provides, in order and each once. An index entry's declared platform counts as is; an
        entry without one is followed into the stored documents (a manifest's config says its platform);
        what the store does not keep is left out, and so are attestation manifests. An image without an
        index provides its config's platform."""
        if isinstance(target, str):
            img = get_image(self.store, target)
            manifest = self._manifest(img)
            path = self._index_path(img, manifest) if manifest is not None else []
            if not path:
                return [img.config.platform]
            start = path[0]
        else:
            start = as_descriptor(target)
        out: list[oci.Platform] = []
        self._platforms(start, out, set())
        return out

    def _platforms(self, desc: oci.Descriptor, out: list[oci.Platform], seen: set[str]) -> None:
        if desc.digest in seen:
            return
        seen.add(desc.digest)
        if oci.is_attestation(desc):
            return
        if desc.platform is not None:
            if desc.platform not in out:
                out.append(desc.platform)
            return
        if oci.is_config_type(desc.media_type):
            try:
                platform = oci.parse_config(self.read(desc)).platform
            except BlobNotFound:
                return
            if platform not in out:
                out.append(platform)
            return
        try:
            children = self.children(desc)
        except BlobNotFound:
            return
        for child in children:
            if not oci.is_layer_type(child.media_type):
                self._platforms(child, out, seen)

"""OCI image layout: ``oci-layout``, ``index.json`` and ``blobs/<alg>/<hex>``, as a directory or a tar.

Reading follows every top-level descriptor of ``index.json``: a manifest is taken as is, an index is
resolved to the manifest of the wanted platform. Every document is size-bounded, digest-checked and
validated for its media type before it is parsed further; layer blobs are opened lazily and verified by
whoever streams them. Names come from ``io.containerd.image.name`` (a full reference) or, failing that,
``org.opencontainers.image.ref.name`` when it is a full reference; a bare tag there names nothing.

Writing puts every blob once under its digest, then ``index.json`` with one descriptor per name.
"""

from __future__ import annotations

import functools
import json

from lamina.digest import DiffID, parse_digest
from lamina.errors import ArchiveError, FormatError, InvalidDocument, InvalidReference
from lamina.formats import oci
from lamina.formats.archivefs import Sink, Source, read_member
from lamina.formats.imagemodel import BlobRef, ImageExport, ImageSource, LayerSource
from lamina.formats.reference import parse_normalized
from lamina.tar.compression import read_verified

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def blob_path(digest: str) -> str:
    algo, hexpart = parse_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexpart}"


def is_layout(src: Source) -> bool:
    return src.exists(LAYOUT_FILE) and src.exists(INDEX_FILE)


def _blob(src: Source, ref: oci.Descriptor | BlobRef, what: str) -> bytes:
    return read_verified(src.open(blob_path(ref.digest)), ref.digest, ref.size, what, oci.MAX_DOCUMENT_BYTES)


def _document(src: Source, ref: oci.Descriptor) -> bytes:
    return _blob(src, ref, f"blob {ref.digest}")


def _name_of(desc: oci.Descriptor) -> str | None:
    ann = desc.annotations
    for key in (CONTAINERD_NAME, REF_NAME):
        value = ann.get(key)
        if not value:
            continue
        if key == REF_NAME and not any(c in value for c in "/:@"):
            continue  # a bare tag: no repository to attach it to
        try:
            ref = parse_normalized(value).with_default_tag()
        except InvalidReference as e:
            raise InvalidReference(f"index.json: bad image name annotation: {e.message}") from None
        return str(ref)
    return None


def read_layout(src: Source, platform: oci.Platform | None = None) -> list[ImageSource]:
    try:
        layout = json.loads(read_member(src, LAYOUT_FILE, 4096))
    except (ValueError, UnicodeDecodeError):
        raise InvalidDocument(f"{src.description}: oci-layout is not JSON") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise InvalidDocument(f"{src.description}: oci-layout has no imageLayoutVersion")
    index = oci.parse_index(read_member(src, INDEX_FILE, oci.MAX_DOCUMENT_BYTES))
    found: dict[str, ImageSource] = {}
    order: list[str] = []
    for desc in index.manifests:
        extra: dict[str, bytes] = {}
        mdesc = desc
        if oci.is_index_type(desc.media_type):
            raw = _blob(src, desc, f"index {desc.digest}")
            nested = oci.parse_index(raw, desc.media_type)
            extra[desc.digest] = raw
            mdesc = oci.select_manifest(nested, platform, read=functools.partial(_document, src))
        elif desc.media_type in oci.SCHEMA1_TYPES:
            raise InvalidDocument(f"index.json: {desc.digest}: schema1 manifests are not supported")
        elif not oci.is_manifest_type(desc.media_type):
            continue  # artifacts and other documents are not images
        name = _name_of(desc)
        if mdesc.digest in found:
            img = found[mdesc.digest]
            if name and name not in img.names:
                img.names.append(name)
            img.extra_blobs.update(extra)
            continue
        img = _read_image(src, mdesc)
        img.extra_blobs.update(extra)
        if name:
            img.names.append(name)
        found[mdesc.digest] = img
        order.append(mdesc.digest)
    if not found:
        raise FormatError(f"{src.description}: index.json lists no image manifests")
    return [found[d] for d in order]


def _read_image(src: Source, mdesc: oci.Descriptor) -> ImageSource:
    raw = _blob(src, mdesc, f"manifest {mdesc.digest}")
    manifest = oci.parse_manifest(raw, mdesc.media_type)
    config_raw = _blob(src, manifest.config, f"config {manifest.config.digest}")
    config = oci.parse_config(config_raw)
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidDocument(
            f"manifest {mdesc.digest} lists {len(manifest.layers)} layers but its config has "
            f"{len(config.diff_ids)} diff_ids"
        )
    layers = []
    for i, (ldesc, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
        path = blob_path(ldesc.digest)
        if not src.exists(path):
            raise ArchiveError(f"{src.description}: layer blob {ldesc.digest} is missing")
        layers.append(LayerSource(
            DiffID(diff_id),
            functools.partial(src.open, path),
            BlobRef(ldesc.media_type, ldesc.digest, ldesc.size),
            what=f"layer {i + 1} ({ldesc.digest})",
        ))
    return ImageSource(
        config=config_raw,
        config_digest=manifest.config.digest,
        layers=layers,
        manifest=raw,
        manifest_ref=BlobRef(mdesc.media_type, mdesc.digest, mdesc.size),
        origin="oci",
    )


def write_layout(sink: Sink, images: list[ImageExport]) -> None:
    """Write the images' blobs and an index with one entry per name (or one unnamed entry)."""
    entries = []
    for img in images:
        assert img.manifest is not None and img.manifest_ref is not None
        for layer in img.layers:
            path = blob_path(layer.digest)
            if not sink.has(path):
                sink.add_blob(path, layer)
        cpath = blob_path(img.image_id)
        if not sink.has(cpath):
            sink.add_bytes(cpath, img.config)
        mpath = blob_path(img.manifest_ref.digest)
        if not sink.has(mpath):
            sink.add_bytes(mpath, img.manifest)
        base = {
            "mediaType": img.manifest_ref.media_type,
            "digest": img.manifest_ref.digest,
            "size": img.manifest_ref.size,
        }
        tagged = [n for n in img.names if "@" not in n]
        if not tagged:
            entries.append(base)
        for name in tagged:
            ref = parse_normalized(name)
            entries.append({**base, "annotations": {CONTAINERD_NAME: name, REF_NAME: ref.tag or "latest"}})
    sink.add_bytes(LAYOUT_FILE, b'{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_INDEX, "manifests": entries}
    sink.add_bytes(INDEX_FILE, json.dumps(index, separators=(",", ":")).encode())

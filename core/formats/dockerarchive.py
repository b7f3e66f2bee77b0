"""docker-archive: the ``docker save`` format, as a tar or an unpacked directory.

``manifest.json`` is a list of ``{"Config": path, "RepoTags": [...], "Layers": [path, ...]}``. Config and
layer paths may be anything relative inside the archive: legacy per-layer directories
(``<id>/layer.tar``), ``<hex>.tar`` as written by some tools, or ``blobs/sha256/<hex>``. There is no
manifest with blob digests, so a layer is verified by its DiffID (the config's ``rootfs.diff_ids``) while it
is applied, and a config file named after a digest must hash to it.

Writing produces ``<config-hex>.json``, ``<diffid-hex>.tar`` per layer (uncompressed, exact) and
``manifest.json`` with the familiar names as ``RepoTags``.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from lamina.digest import DiffID, sha256_digest
from lamina.errors import ArchiveError, DigestMismatch, InvalidDocument, InvalidReference
from lamina.formats import oci
from lamina.formats.archivefs import Sink, Source, check_member_name, read_member
from lamina.formats.imagemodel import ImageExport, ImageSource, LayerSource
from lamina.formats.reference import parse_normalized

MANIFEST_FILE = "manifest.json"
MAX_CONFIG_BYTES = 16 << 20
_HEX64 = re.compile(r"(?:^|/)([a-f0-9]{64})(?:\.json)?$")


def is_docker_archive(src: Source) -> bool:
    return src.exists(MANIFEST_FILE)


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDocument(f"manifest.json: {what} must be a list of strings")
    return list(value)


def read_archive(src: Source) -> list[ImageSource]:
    try:
        doc = json.loads(read_member(src, MANIFEST_FILE, oci.MAX_DOCUMENT_BYTES))
    except (ValueError, UnicodeDecodeError):
        raise InvalidDocument(f"{src.description}: manifest.json is not valid JSON") from None
    if not isinstance(doc, list) or not doc:
        raise InvalidDocument(f"{src.description}: manifest.json must be a non-empty list of images")
    entries = []
    for n, entry in enumerate(doc, 1):
        if not isinstance(entry, dict):
            raise InvalidDocument(f"manifest.json: entry {n} is not an object")
        config_path = entry.get("Config")
        if not isinstance(config_path, str):
            raise InvalidDocument(f"manifest.json: entry {n} has no Config path")
        layers = _str_list(entry.get("Layers"), f"entry {n} Layers")
        names = []
        for tag in _str_list(entry.get("RepoTags"), f"entry {n} RepoTags"):
            try:
                ref = parse_normalized(tag)
            except InvalidReference as e:
                raise InvalidReference(f"manifest.json: bad RepoTags entry: {e.message}") from None
            if ref.tag is None or ref.digest is not None:
                raise InvalidReference(f"manifest.json: RepoTags entry {tag!r} must be name:tag")
            names.append(str(ref))
        entries.append((check_member_name(config_path, "Config"),
                        [src.resolve_layer(check_member_name(p, "layer")) for p in layers], names))
    images = []
    for config_path, layer_paths, names in entries:
        config_raw = read_member(src, config_path, MAX_CONFIG_BYTES)
        digest = sha256_digest(config_raw)
        m = _HEX64.search(config_path)
        if m and m.group(1) != digest.split(":", 1)[1]:
            raise DigestMismatch(f"{config_path} does not match the digest in its name (it is {digest})")
        config = oci.parse_config(config_raw)
        if len(layer_paths) != len(config.diff_ids):
            raise InvalidDocument(
                f"manifest.json: {config_path} has {len(config.diff_ids)} diff_ids but {len(layer_paths)} layers"
            )
        sources = []
        for i, (path, diff_id) in enumerate(zip(layer_paths, config.diff_ids, strict=True)):
            if not src.exists(path):
                raise ArchiveError(f"{src.description}: layer {path} is missing or not a regular file")
            opener = functools.partial(src.open, path)
            sources.append(LayerSource(DiffID(diff_id), opener, None, f"layer {i + 1} ({path})"))
        images.append(ImageSource(config_raw, digest, sources, names, origin="docker-archive"))
    return images


def write_archive(sink: Sink, images: list[ImageExport]) -> None:
    manifest = []
    for img in images:
        hexid = img.image_id.split(":", 1)[1]
        config_name = f"{hexid}.json"
        if not sink.has(config_name):
            sink.add_bytes(config_name, img.config)
        paths = []
        for layer in img.layers:
            path = f"{layer.digest.split(':', 1)[1]}.tar"
            if not sink.has(path):
                sink.add_blob(path, layer)
            paths.append(path)
        tags = [parse_normalized(n).familiar() for n in img.names if "@" not in n]
        manifest.append({"Config": config_name, "RepoTags": tags or None, "Layers": paths})
    sink.add_bytes(MANIFEST_FILE, json.dumps(manifest, separators=(",", ":")).encode())

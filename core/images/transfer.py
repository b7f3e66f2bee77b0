"""Moving images in and out of a store: load, save and import.

Loading reads an archive through a format module into :class:`~lamina.formats.imagemodel.ImageSource` objects,
then, per image: stores the config and manifest byte-exact, applies every layer not already present (on
its parent, leased, each blob's size and digest verified as it streams and its DiffID checked before the
layer is committed) while copying the blob into the content store, and finally commits the image in one
transaction. All of it happens inside one lease, which ends with the load whatever its outcome, so
nothing half-loaded stays behind.

Saving turns stored images into :class:`~lamina.formats.imagemodel.ImageExport` objects: the kept manifest and
blobs when the content store has them all (every digest reproduced), otherwise a manifest made anew with
layers recompressed deterministically from the driver's exact tar streams.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.digest import ChainID, DiffID, chain_ids, sha256_digest
from lamina.errors import BlobNotFound, ExportError, FormatError, LayerNotFound
from lamina.formats import oci
from lamina.formats.archivefs import DirSink, Sink, TarSink, open_source
from lamina.formats.imagemodel import BlobRef, BlobSource, ImageExport, ImageSource
from lamina.store.images import ImageRecord, ImageStore, ManifestRecord, NewImage
from lamina.store.leases import Lease
from lamina.tar.compression import CHUNK, Readable, VerifyingReader, deterministic_gzip

if TYPE_CHECKING:
    from lamina.formats.archives import Writer
    from lamina.store.content import Download

ProgressFn = Callable[[dict[str, Any]], None]


def parse_time(value: object) -> float | None:
    """Seconds since the epoch of an RFC 3339 timestamp (nanoseconds allowed), or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat()


def utc_now_rfc3339() -> str:
    now = time.time_ns()
    secs, ns = divmod(now, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


class _Counting:
    def __init__(self, src: Readable, report: Callable[[int], None]) -> None:
        self._src = src
        self._report = report
        self.done = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        if data:
            self.done += len(data)
            self._report(self.done)
        return data


@dataclass(frozen=True)
class Loaded:
    image: ImageRecord
    moved: list[str]  # names taken from other images
    names: tuple[str, ...] = ()  # the names the archive gave it


# -- load -----------------------------------------------------------------------------------------------
def read_sources(path: str | os.PathLike[str], platform: oci.Platform | None = None) -> tuple[Any, list[ImageSource]]:
    from lamina.formats.archives import READERS

    src = open_source(path)
    try:
        for reader in READERS:
            if reader.detect(src):
                return src, reader.read(src, platform)
    except BaseException:
        src.close()
        raise
    src.close()
    raise FormatError(f"{path} is neither " + " nor ".join(r.what for r in READERS))


def load(
    store: ImageStore,
    path: str | os.PathLike[str],
    *,
    platform: oci.Platform | None = None,
    keep_layer_blobs: bool = True,
    progress: ProgressFn | None = None,
) -> list[Loaded]:
    src, sources = read_sources(path, platform)
    out = []
    try:
        for img in sources:
            with store.store.lease() as lease:
                out.append(load_source(store, img, lease, keep_layer_blobs=keep_layer_blobs, progress=progress))
    finally:
        src.close()
    return out


def load_source(
    store: ImageStore, img: ImageSource, lease: Lease, *, keep_layer_blobs: bool = True,
    progress: ProgressFn | None = None,
) -> Loaded:
    """Store one image whose documents the format reader has verified; apply the layers it lacks. The
    layers and blobs are held by ``lease`` until the image commits (which ends it)."""
    config = oci.parse_config(img.config)
    diff_ids = [DiffID(d) for d in config.diff_ids]
    chains = chain_ids(diff_ids)
    content = store.content
    blobs: list[str] = []

    def keep_doc(digest: str, data: bytes) -> None:
        lease.blob(digest)
        content.put(data, digest)
        blobs.append(digest)

    keep_doc(img.config_digest, img.config)
    manifests = []
    names = list(img.names)
    if img.manifest is not None and img.manifest_ref is not None:
        keep_doc(img.manifest_ref.digest, img.manifest)
        manifests.append(ManifestRecord(img.manifest_ref.digest, img.manifest_ref.media_type))
        for n in img.names:
            names.append(n.rsplit(":", 1)[0] + "@" + img.manifest_ref.digest if _tagged(n) else n)
    for digest, data in img.extra_blobs.items():
        keep_doc(digest, data)
    parent: ChainID | None = None
    for i, layer in enumerate(img.layers):
        chain = chains[i]
        keep = keep_layer_blobs and layer.blob is not None
        event = {"event": "layer", "index": i + 1, "count": len(img.layers), "diff_id": layer.diff_id,
                 "size": layer.blob.size if layer.blob else None}
        if keep and layer.blob is not None:
            lease.blob(layer.blob.digest)  # before looking: a collection cannot take it from now on
        while True:
            with contextlib.ExitStack() as stack:
                download = None
                if layer.open_at is not None and layer.blob is not None and not content.exists(layer.blob.digest) \
                        and not store.layers.exists(chain):
                    # Another process fetching the same blob finishes (blob stored, layer committed) before
                    # this one looks again; one that was cut short left a partial download to carry on from.
                    download = stack.enter_context(
                        content.download(layer.blob.digest, layer.blob.size, layer.what, layer.open_at))
                try:
                    store.layers.lease(chain, lease)
                    present = True
                except LayerNotFound:
                    present = False
                try:
                    if present:
                        if keep and layer.blob is not None and not content.exists(layer.blob.digest):
                            if download is not None:
                                download.fetch()
                            else:
                                content.copy_in(layer.open(), layer.blob.digest, layer.blob.size, layer.what)
                        if progress:
                            progress({**event, "status": "exists"})
                    else:
                        _apply(store, lease, layer, parent, keep, progress, event, download)
                except FormatError as e:
                    if download is not None:
                        download.drop()  # bytes that do not apply or verify: the next pull starts over
                    if _fetch_again(layer, download, e):
                        continue
                    raise
            break
        if keep and layer.blob is not None:
            blobs.append(layer.blob.digest)
        parent = chain
    record, moved = store.create(NewImage(
        id=img.config_digest,
        diff_ids=diff_ids,
        created=parse_time(config.created),
        origin=img.origin,
        names=_unique(names),
        manifests=manifests,
        blobs=blobs,
        labels=config.labels,
    ), lease)
    return Loaded(record, moved, tuple(img.names))


def _fetch_again(layer: Any, download: Download | None, error: FormatError) -> bool:
    """Whether a layer whose blob failed (to verify, or to apply from bytes not yet verified) is fetched again
    whole: from the same place when the failed bytes were partly a resumed download's, else from the next
    endpoint its source has (a registry mirror that served wrong bytes). Bytes that hashed right failed on
    their own merit: not again."""
    if download is not None and download.complete:
        return False
    if download is not None and download.resumed_at:
        return True
    return layer.reject is not None and bool(layer.reject(error))


def _tagged(name: str) -> bool:
    return "@" not in name and ":" in name.rsplit("/", 1)[-1]


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _apply(
    store: ImageStore, lease: Lease, layer: Any, parent: ChainID | None, keep: bool, progress: ProgressFn | None,
    event: dict[str, Any], download: Download | None = None,
) -> None:
    """Apply one layer; from ``download`` (which verifies and stores its blob) when one is given."""
    blob: BlobRef | None = layer.blob
    with contextlib.ExitStack() as stack:
        writer = None
        verifying = None
        raw: Readable
        if download is not None:
            raw = download
        else:
            if keep and blob is not None and not store.content.exists(blob.digest):
                lease.blob(blob.digest)
                writer = stack.enter_context(store.content.writer(blob.digest))
            raw = layer.open()
            close = getattr(raw, "close", None)
            if close is not None:
                stack.callback(close)  # also when applying fails half-way
            if blob is not None:
                verifying = VerifyingReader(
                    raw, blob.digest, blob.size, layer.what, tee=writer.file if writer else None)
                raw = verifying
        if progress:
            last = [0.0]

            def report(done: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 0.1:
                    last[0] = now
                    progress({**event, "status": "applying", "done": done})

            raw = _Counting(raw, report)
        store.layers.register(raw, parent, expected_diff_id=layer.diff_id, lease=lease)
        if verifying is not None:
            verifying.finish()
        if download is not None:
            download.fetch()  # bytes after the tar's end, if any: the blob is whole and checked
        if writer is not None:
            writer.commit()
    if progress:
        progress({**event, "status": "done"})


# -- copy -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Copied:
    image: ImageRecord
    moved: list[str]  # names taken from other images of the destination
    applied: int  # layers applied in the destination (the others it had)


def copy_image(
    src: ImageStore, dest: ImageStore, record: ImageRecord, *, progress: ProgressFn | None = None,
    in_place: bool = False,
) -> Copied:
    """Copy one image, which a lease of the caller holds in ``src``, into another store: the same ID, names,
    parent, manifests and blobs (byte-exact, each verified as it streams), and the layers ``dest`` lacks,
    applied from the source's exact tar streams and checked against their DiffIDs. With ``in_place`` (a
    container's image from an additional image store) they are used in place instead where ``dest``'s driver
    can (:meth:`LayerStore.adopt`): ``dest`` then depends on ``src`` keeping them. Nothing of it is
    written to ``src``; in ``dest`` it all happens inside one lease, which the image's commit ends."""
    config = oci.parse_config(src.config_bytes(record.id))
    diff_ids = [DiffID(d) for d in config.diff_ids]
    chains = chain_ids(diff_ids)
    wanted = _unique([record.id, *src.blobs(record.id)])
    applied = 0
    with dest.store.lease() as lease:
        kept = []
        for digest in wanted:
            if not src.content.exists(digest):
                continue  # not kept there (a layer blob with keep_layer_blobs = false): not here either
            lease.blob(digest)
            if not dest.content.exists(digest):
                with src.content.open(digest) as f:
                    dest.content.copy_in(f, digest, src.content.size(digest), f"blob {digest}")
            kept.append(digest)
        parent: ChainID | None = None
        for i, (chain, diff_id) in enumerate(zip(chains, diff_ids, strict=True)):
            event = {"event": "layer", "index": i + 1, "count": len(chains), "diff_id": diff_id}
            try:
                dest.layers.lease(chain, lease)
                status = "exists"
            except LayerNotFound:
                if in_place and dest.layers.adopt(src.layers, chain, parent, lease) is not None:
                    status = "adopted"
                else:
                    stream = src.layers.export_exact(chain)
                    try:
                        dest.layers.register(stream, parent, expected_diff_id=diff_id, lease=lease)
                    finally:
                        stream.close()
                    applied += 1
                    status = "done"
            if progress:
                progress({**event, "status": status})
            parent = chain
        image, moved = dest.create(NewImage(
            id=record.id, diff_ids=diff_ids, created=record.created, origin=record.origin, names=list(record.names),
            manifests=list(record.manifests), blobs=kept, parent=record.parent,
            labels=config.labels,
        ), lease)
    return Copied(image, moved, applied)


# -- save -----------------------------------------------------------------------------------------------
ExportLayer = Callable[[ChainID], Readable]


def _stream_chunks(open_: Callable[[], Readable]) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        f = open_()
        try:
            direct = getattr(f, "chunks", None)  # exact tar streams hand out their pieces as made
            if direct is not None:
                yield from direct()
                return
            while c := f.read(CHUNK):
                yield c
        finally:
            close = getattr(f, "close", None)
            if close is not None:
                close()

    return chunks


def _stream_copy(open_: Callable[[], Readable]) -> Callable[[int], int]:
    """A blob's ``copy_to``: an exact tar stream copies itself (verified against its DiffID), a blob of the
    content store is copied whole as it is stored; anything else is read and written."""
    from lamina.fs.kcopy import FileWriter, copy_file

    def copy_to(fd: int) -> int:
        f = open_()
        try:
            direct = getattr(f, "copy_to", None)
            if direct is not None:
                return int(direct(fd))
            fileno = getattr(f, "fileno", None)
            if fileno is not None:
                return copy_file(fileno(), fd, getattr(f, "name", "blob"))
            out = FileWriter(fd)
            while c := f.read(CHUNK):
                out.write(c)
            return out.written
        finally:
            close = getattr(f, "close", None)
            if close is not None:
                close()

    return copy_to


def _kept_manifest(store: ImageStore, record: ImageRecord) -> tuple[bytes, ManifestRecord] | None:
    """The first recorded manifest whose every blob is still in the content store."""
    for m in record.manifests:
        try:
            raw = store.content.read(m.digest)
        except BlobNotFound:
            continue
        manifest = oci.parse_manifest(raw, m.media_type)
        if all(store.content.exists(d.digest) for d in manifest.layers) and store.content.exists(
            manifest.config.digest
        ):
            return raw, m
    return None


def export_for(
    store: ImageStore,
    record: ImageRecord,
    names: list[str],
    fmt: str,
    export_layer: ExportLayer,
    keep_layer_blobs: bool,
    lease: Lease,
) -> ImageExport:
    """What a save or push writes of one image; ``lease`` holds the image (see ImageStore.lease_image) and
    any blob made here."""
    config_raw = store.config_bytes(record.id)
    config = oci.parse_config(config_raw)
    diff_ids = [DiffID(d) for d in config.diff_ids]
    chains = chain_ids(diff_ids)
    if not _writer(fmt).manifest:
        layers = []
        for chain, diff_id in zip(chains, diff_ids, strict=True):
            size = store.layers.get(chain).tar_size
            if store.content.exists(diff_id):  # a kept uncompressed blob is the exact stream
                opener: Callable[[], Readable] = functools.partial(store.content.open, diff_id)
            else:
                opener = functools.partial(export_layer, chain)
            layers.append(BlobSource(diff_id, size, _stream_chunks(opener), _stream_copy(opener)))
        return ImageExport(record.id, config_raw, names, layers)
    kept = _kept_manifest(store, record)
    made: dict[str, Callable[[], Iterator[bytes]]] = {}  # layer blobs made anew and not stored
    if kept is None:
        kept = _remake_manifest(store, record, config_raw, chains, export_layer, keep_layer_blobs, lease, made)
    raw, mrec = kept
    manifest = oci.parse_manifest(raw, mrec.media_type)
    layers = []
    for d in manifest.layers:
        if d.digest in made:
            layers.append(BlobSource(d.digest, d.size, made[d.digest]))
        else:
            opener = functools.partial(store.content.open, d.digest)
            layers.append(BlobSource(d.digest, d.size, _stream_chunks(opener), _stream_copy(opener)))
    return ImageExport(record.id, config_raw, names, layers, raw, BlobRef(mrec.media_type, mrec.digest, len(raw)))


def _remake_manifest(
    store: ImageStore,
    record: ImageRecord,
    config_raw: bytes,
    chains: list[ChainID],
    export_layer: ExportLayer,
    keep_layer_blobs: bool,
    lease: Lease,
    made: dict[str, Callable[[], Iterator[bytes]]],
) -> tuple[bytes, ManifestRecord]:
    """An OCI manifest with every layer recompressed deterministically from the driver's exact tar.

    The blobs go to the content store; a read-only one keeps nothing, so each layer is compressed twice
    instead, to hash it and then to write it (the same bytes both times), and ``made`` gets its chunks."""
    descs = []
    for chain in chains:
        def gzipped(chain: ChainID = chain) -> Iterator[bytes]:
            return deterministic_gzip(_stream_chunks(functools.partial(export_layer, chain))())

        if store.content.read_only:
            h = hashlib.sha256()
            size = 0
            for c in gzipped():
                h.update(c)
                size += len(c)
            digest = "sha256:" + h.hexdigest()
            made[digest] = gzipped
        else:
            digest, size = store.content.put_stream(gzipped(), lease.blob)
        descs.append(oci.Descriptor(oci.MEDIA_TYPE_LAYER_GZIP, digest, size))
    config_desc = oci.Descriptor(oci.MEDIA_TYPE_CONFIG, record.id, len(config_raw))
    raw = oci.build_manifest(config_desc, descs)
    digest = sha256_digest(raw)
    mrec = ManifestRecord(digest, oci.MEDIA_TYPE_MANIFEST)
    if store.content.read_only:
        return raw, mrec
    lease.blob(digest)
    store.content.put(raw, digest)
    if keep_layer_blobs:
        store.add_manifest(record.id, mrec, [digest, *(d.digest for d in descs)])
    return raw, mrec


def _writer(fmt: str) -> Writer:
    from lamina.formats.archives import WRITERS

    writer = WRITERS.get(fmt)
    if writer is None:
        raise ExportError(f"unknown save format {fmt!r}; use one of {', '.join(WRITERS)}")
    return writer


def save(
    store: ImageStore,
    exports: list[tuple[ImageRecord, list[str]]],
    dest: str | os.PathLike[str],
    fmt: str,
    export_layer: ExportLayer,
    keep_layer_blobs: bool = True,
) -> None:
    writer = _writer(fmt)
    path = Path(dest)
    sink: Sink = DirSink(path) if writer.directory else TarSink(path)
    try:  # from the sink's first file on: whatever stops the save (an interrupt too) leaves no partial output
        with store.store.lease(reading=True) as lease:  # an rmi meanwhile cannot take away what is being written
            items = []
            for rec, names in exports:
                held = store.lease_image(lease, rec.id)
                items.append(export_for(store, held, names, fmt, export_layer, keep_layer_blobs, lease))
            writer.write(sink, items)
            sink.commit()
    except OSError as e:
        sink.abort()
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        sink.abort()
        raise


# -- import ---------------------------------------------------------------------------------------------
def new_config(
    diff_ids: list[DiffID],
    platform: oci.Platform,
    changes: Sequence[str] = (),
    message: str = "",
    created_by: str = "lamina import",
    base: dict[str, Any] | None = None,
) -> bytes:
    from lamina.formats.imageconfig import apply_changes

    created = utc_now_rfc3339()
    doc: dict[str, Any] = {
        "created": created,
        "architecture": platform.architecture,
        "os": platform.os,
    }
    if platform.variant:
        doc["variant"] = platform.variant
    doc["config"] = apply_changes(dict(base or {}), changes)
    doc["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    entry: dict[str, Any] = {"created": created, "created_by": created_by}
    if message:
        entry["comment"] = message
    doc["history"] = [entry]
    return json.dumps(doc, separators=(",", ":")).encode()

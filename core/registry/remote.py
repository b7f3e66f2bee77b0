"""Pull and push: images between a store and registries, over :mod:`lamina.registry.client`'s client.

Pulling reads a manifest (an index is resolved to the wanted platform), the config and the layer
descriptors into an :class:`~lamina.formats.imagemodel.ImageSource`, exactly like the archive formats do, and
hands it to :func:`lamina.images.transfer.load_source`: layers already stored are not fetched at all, the first
missing layer streams straight from the registry into the driver while later ones are fetched into the
content store concurrently (``max_concurrent_downloads``), every blob is verified as it streams, and the
image commits in one transaction. A pull by digest verifies the manifest against it. Which registries a
reference is pulled from (mirrors, then its location) and pushed to is :mod:`lamina.registry.endpoints`'s
business.

Pushing sends the image as it was pulled or loaded (the kept manifest and blobs, so every digest is
reproduced), or a manifest made anew when blobs were dropped; blobs the registry has are skipped, blobs
another repository of the same registry has are mounted, the rest are uploaded concurrently
(``max_concurrent_uploads``), then the manifest is put by tag.
"""

from __future__ import annotations

import concurrent.futures
import functools
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lamina.config import Config
from lamina.digest import DiffID
from lamina.errors import DigestError, ImageNotFound, InvalidDocument, LaminaError, LimitExceeded
from lamina.formats import oci
from lamina.formats.imagemodel import BlobRef, ImageSource, LayerSource
from lamina.formats.reference import Reference, parse_normalized
from lamina.images.transfer import Loaded, ProgressFn, load_source
from lamina.store.images import ImageStore
from lamina.store.leases import Lease
from lamina.tar.compression import CHUNK, Readable, VerifyingReader, read_verified

Creds = tuple[str, str]


def is_insecure(host: str, insecure: tuple[str, ...] | list[str]) -> bool:
    """Loopback registries are always insecure (plain HTTP allowed); others when listed by ``host:port``,
    host, or a CIDR their address falls in."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if host in insecure or name in insecure or name == "localhost":
        return True
    addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        addrs = [ipaddress.ip_address(name)]
    except ValueError:
        if any("/" in entry for entry in insecure):
            try:
                addrs = [ipaddress.ip_address(str(info[4][0])) for info in socket.getaddrinfo(name, None)]
            except (OSError, ValueError):
                addrs = []
    for addr in addrs:
        if addr.is_loopback:
            return True
        for entry in insecure:
            if "/" in entry:
                try:
                    if addr in ipaddress.ip_network(entry, strict=False):
                        return True
                except ValueError:
                    continue
    return False


def make_client(
    host: str, config: Config, *, tls_verify: bool | None = None, creds: Creds | None = None, insecure: bool = False,
    max_attempts: int | None = None,
) -> Any:
    """A client for ``host``. ``insecure``: the configuration's table for this endpoint allows plain HTTP;
    ``tls_verify`` (the command line's) beats it and ``insecure_registries``."""
    from lamina.registry.auth import find_credentials, normalize_host
    from lamina.registry.client import RegistryClient, RegistryOptions

    if tls_verify is None:
        insecure = insecure or is_insecure(host, config.registry.insecure_registries)
    else:
        insecure = not tls_verify
    attempts = config.registry.max_download_attempts
    options = RegistryOptions(
        insecure=insecure,
        max_attempts=attempts if max_attempts is None else max(1, min(attempts, max_attempts)),
        allow_foreign_urls=config.registry.allow_foreign_urls,
    )

    wanted = normalize_host(host) or host

    def credentials(h: str) -> Creds | None:
        if creds is not None and (normalize_host(h) or h) == wanted:
            return creds
        return find_credentials(h)

    return RegistryClient(host, options, credentials)


# -- pull -----------------------------------------------------------------------------------------------
def read_remote(client: Any, ref: Reference, platform: oci.Platform | None, what_name: str) -> ImageSource:
    repo = ref.path
    data, media_type, digest = client.get_manifest(repo, ref.digest or ref.tag or "latest")
    doc = oci.parse_document(data, media_type)
    extra: dict[str, bytes] = {}
    top_digest = digest
    read = functools.partial(_document, client, repo)
    if isinstance(doc, oci.Index):
        extra[digest] = data
        desc = oci.select_manifest(doc, platform, read=read)
        data, media_type, digest = _manifest(client, repo, desc)
        doc = oci.parse_manifest(data, media_type)
    if not isinstance(doc, oci.Manifest):
        raise InvalidDocument(f"{what_name}: not an image manifest")
    manifest = doc
    config_raw = read(manifest.config)
    config = oci.parse_config(config_raw)
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidDocument(
            f"{what_name}: the manifest lists {len(manifest.layers)} layers, the config {len(config.diff_ids)}"
        )
    layers = []
    for i, (d, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
        at: Callable[[int], Readable] | None = None
        reject: Callable[[LaminaError], bool] | None = None
        if d.urls:
            opener: Callable[[], Readable] = functools.partial(client.open_blob_urls, d)
        else:
            opener = functools.partial(client.open_blob, repo, d.digest, d.size)
            at = functools.partial(client.open_blob_at, repo, d.digest, d.size)
            reject = _rejecter(client, d.digest)
        layers.append(
            LayerSource(
                DiffID(diff_id), opener, BlobRef(d.media_type, d.digest, d.size), what=f"layer {i + 1} ({d.digest})",
                open_at=at, reject=reject,
            )
        )
    names = []
    if ref.tag is not None and ref.digest is None:
        names.append(str(ref))
    names.append(f"{ref.name}@{top_digest}")
    return ImageSource(
        config=config_raw,
        config_digest=manifest.config.digest,
        layers=layers,
        names=names,
        manifest=data,
        manifest_ref=BlobRef(media_type, digest, len(data)),
        extra_blobs=extra,
        origin=f"registry {ref.domain}",
    )


def _manifest(client: Any, repo: str, desc: oci.Descriptor) -> tuple[bytes, str, str]:
    """The manifest an index entry names, checked against the entry's digest and size."""
    data, media_type, digest = client.get_manifest(repo, desc.digest)
    if len(data) != desc.size:
        raise InvalidDocument(f"manifest {desc.digest} is {len(data)} bytes, its descriptor says {desc.size}")
    return data, media_type, digest


def _rejecter(client: Any, digest: str) -> Callable[[LaminaError], bool] | None:
    """Where the client is an endpoint chain: a blob's bytes that do not verify send it to the next endpoint."""
    reject = getattr(client, "reject_blob", None)
    return None if reject is None else functools.partial(reject, digest)


def _document(client: Any, repo: str, desc: oci.Descriptor) -> bytes:
    """A manifest or a config, by its descriptor, verified (a config whose bytes do not is fetched again from
    the next endpoint, if any)."""
    if oci.is_manifest_type(desc.media_type):
        return _manifest(client, repo, desc)[0]
    what = f"config {desc.digest}"
    if desc.size > oci.MAX_DOCUMENT_BYTES:
        raise LimitExceeded(f"{what} is {desc.size} bytes; documents are limited to {oci.MAX_DOCUMENT_BYTES}")
    reject = _rejecter(client, desc.digest)
    while True:
        try:
            return read_verified(client.open_blob(repo, desc.digest, desc.size), desc.digest, desc.size, what,
                                 oci.MAX_DOCUMENT_BYTES)
        except DigestError as e:
            if reject is None or not reject(e):
                raise


def _prefetch(
    store: ImageStore, lease: Lease, img: ImageSource, workers: int, progress: ProgressFn | None,
    cancel: threading.Event,
) -> list[Any]:
    """Fetch layers 2..n into the content store concurrently; their sources then read from it.

    Setting ``cancel`` stops the downloads at their next chunk (a failed or interrupted pull does not wait
    for whole layers to arrive)."""
    from lamina.digest import chain_ids

    chains = chain_ids([la.diff_id for la in img.layers])
    have = {layer.chain_id for layer in store.layers.all()}
    futures: list[Any] = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lamina-pull")
    lock = threading.Lock()

    def fetch(layer: LayerSource) -> None:
        blob = layer.blob
        assert blob is not None
        lease.blob(blob.digest)
        if store.content.exists(blob.digest):
            return
        if layer.open_at is not None:  # once, whoever else wants it; resumed from what a cut fetch left
            while True:
                download = store.content.download(blob.digest, blob.size, layer.what, layer.open_at)
                if not download.acquire(cancel):
                    return
                if download.complete:  # another process stored it meanwhile
                    download.close()
                    return
                try:
                    with download:
                        while download.read(CHUNK):
                            if cancel.is_set():
                                return
                    return
                except DigestError as e:  # the partial file is gone; a resumed one is fetched again whole
                    if not (download.resumed_at or (layer.reject is not None and layer.reject(e))):
                        raise
        with store.content.writer(blob.digest) as w:
            src = layer.open()
            try:
                reader = VerifyingReader(src, blob.digest, blob.size, layer.what, tee=w.file)
                while reader.read(CHUNK):
                    if cancel.is_set():
                        return
                reader.finish()
                w.commit()
            finally:
                close = getattr(src, "close", None)
                if close is not None:
                    close()

    first_missing = True
    for idx, (layer, chain) in enumerate(zip(img.layers, chains, strict=True)):
        if chain in have or layer.blob is None:
            continue
        if first_missing:  # this one streams straight into the driver
            first_missing = False
            continue
        fut = pool.submit(fetch, layer)
        futures.append(fut)
        blob = layer.blob

        def from_store(f: Any = fut, digest: str = blob.digest) -> Readable:
            f.result()  # raises the download's error here, in the applying thread
            with lock:
                return store.content.open(digest)

        img.layers[idx] = LayerSource(layer.diff_id, from_store, layer.blob, layer.what)  # no open_at: in the store
    pool.shutdown(wait=False)
    return futures


@dataclass(frozen=True)
class Pulled:
    loaded: Loaded
    reference: str


def pull(
    store: ImageStore,
    config: Config,
    candidates: list[Reference],
    *,
    platform: oci.Platform | None = None,
    tls_verify: bool | None = None,
    creds: Creds | None = None,
    progress: ProgressFn | None = None,
) -> Pulled:
    """Pull the first of ``candidates`` (see :func:`lamina.formats.reference.resolve_names`) a registry has,
    each from its mirrors or its location as the ``[[registry]]`` tables say (:mod:`lamina.registry.endpoints`)."""
    from lamina.registry.client import RegistryError

    errors: list[str] = []
    for ref in candidates:
        try:
            chain = open_chain(config, ref, tls_verify=tls_verify, creds=creds)
        except RegistryError as e:  # blocked, or a location that makes no valid name
            if len(candidates) == 1:
                raise
            errors.append(f"{ref}: {e.message}")
            continue
        with chain:
            try:
                img = read_remote(chain, ref, platform, str(ref))
            except RegistryError as e:
                if len(candidates) == 1:
                    raise
                errors.append(f"{ref}: {e.message}")
                continue
            return _pull_source(store, config, img, ref, progress)
    raise ImageNotFound("no registry has the image: " + "; ".join(errors))


def open_chain(config: Config, ref: Reference, *, tls_verify: bool | None = None, creds: Creds | None = None) -> Any:
    """The :class:`~lamina.registry.endpoints.EndpointChain` a pull of ``ref`` reads from: clients made on
    first use, mirrors with fewer attempts (a failing mirror hands over to the next endpoint quickly), the
    given credentials for the location only."""
    from lamina.registry import endpoints

    def connect(endpoint: endpoints.Endpoint) -> Any:
        return make_client(
            endpoint.host, config, tls_verify=tls_verify, creds=None if endpoint.mirror else creds,
            insecure=endpoint.insecure, max_attempts=endpoints.MIRROR_ATTEMPTS if endpoint.mirror else None,
        )

    return endpoints.EndpointChain(ref, endpoints.pull_endpoints(config, ref), connect)


def _pull_source(store: ImageStore, config: Config, img: ImageSource, ref: Reference,
                 progress: ProgressFn | None) -> Pulled:
    cancel = threading.Event()
    with store.store.lease() as lease:
        futures = _prefetch(store, lease, img, config.registry.max_concurrent_downloads - 1, progress, cancel)
        try:
            loaded = load_source(store, img, lease, keep_layer_blobs=config.keep_layer_blobs, progress=progress)
        finally:
            # Downloads nobody waited for (their layer turned up meanwhile) stop too: none may outlive the
            # lease its blobs are held by.
            cancel.set()
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)
    if not config.keep_layer_blobs:
        store.gc()
    return Pulled(loaded, str(ref))


# -- push -----------------------------------------------------------------------------------------------
def push(
    store: ImageStore,
    config: Config,
    export: Any,
    dest: Reference,
    *,
    tls_verify: bool | None = None,
    creds: Creds | None = None,
    progress: ProgressFn | None = None,
    mount_from: list[str] | None = None,
) -> str:
    """Push an :class:`~lamina.formats.imagemodel.ImageExport` (with a manifest) to ``dest``; returns the manifest
    digest. ``dest`` goes to its ``[[registry]]`` location (never a mirror); ``mount_from`` names repositories of
    ``dest``'s registry."""
    from lamina.registry import endpoints

    endpoint = endpoints.push_endpoint(config, dest)
    mounts = endpoints.mount_sources(config, endpoint.host, dest.domain, mount_from or [])
    with make_client(endpoint.host, config, tls_verify=tls_verify, creds=creds, insecure=endpoint.insecure) as client:
        return _push_with(client, config, export, endpoint.ref, progress, mounts)


def _push_with(client: Any, config: Config, export: Any, dest: Reference, progress: ProgressFn | None,
               mount_from: list[str] | None) -> str:
    client.ping()  # settles the scheme (HTTPS, or HTTP for an insecure registry) once, before the uploaders
    repo = dest.path
    blobs = [(b.digest, b.size, b.chunks) for b in export.layers]
    blobs.append((export.image_id, len(export.config), lambda: iter([export.config])))

    def send(item: tuple[str, int, Callable[[], Any]]) -> None:
        digest, size, chunks = item
        if client.blob_exists(repo, digest):
            if progress:
                progress({"event": "blob", "digest": digest, "status": "exists"})
            return
        for other in mount_from or []:
            if other != repo and client.mount_blob(repo, digest, other):
                if progress:
                    progress({"event": "blob", "digest": digest, "status": "mounted"})
                return
        client.upload_blob(repo, digest, size, chunks)
        if progress:
            progress({"event": "blob", "digest": digest, "status": "pushed"})

    with concurrent.futures.ThreadPoolExecutor(max_workers=config.registry.max_concurrent_uploads) as pool:
        for f in [pool.submit(send, item) for item in blobs]:
            f.result()
    assert export.manifest is not None and export.manifest_ref is not None
    reference = dest.tag or (dest.digest or "latest")
    digest = str(client.put_manifest(repo, reference, export.manifest, export.manifest_ref.media_type))
    if digest != export.manifest_ref.digest:
        raise LaminaError(f"the registry stored the manifest as {digest}, expected {export.manifest_ref.digest}")
    return digest


def parse_destination(text: str) -> Reference:
    ref = parse_normalized(text)
    return ref if ref.digest else ref.with_default_tag()


__all__ = ["Pulled", "is_insecure", "make_client", "open_chain", "parse_destination", "pull", "push"]

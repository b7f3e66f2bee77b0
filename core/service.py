"""``ImageService``: the public entry point to a lamina store.

Method names follow Docker's ImageService in snake_case. This module covers the layer store; images,
containers and registries build on it.

    >>> from lamina import ImageService
    >>> with ImageService.open(root="/tmp/store", driver="vfs") as svc:      # doctest: +SKIP
    ...     layer = svc.register_layer(open("rootfs.tar.gz", "rb"))
    ...     print(layer.chain_id, svc.storage_driver())
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from lamina.compression import Readable
from lamina.config import Config, load_config
from lamina.driver import Capabilities, Change
from lamina.layerstore import Layer, LayerStore
from lamina.plugins import DriverCatalog


class ImageService:
    def __init__(self, store: LayerStore) -> None:
        self._layers = store

    @classmethod
    def open(
        cls,
        config: Config | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        driver: str | None = None,
        root: str | os.PathLike[str] | None = None,
        runroot: str | os.PathLike[str] | None = None,
        catalog: DriverCatalog | None = None,
    ) -> ImageService:
        """Open (creating if needed) the store the configuration describes.

        ``config`` wins when given; otherwise the configuration file is looked up and ``driver``,
        ``root`` and ``runroot`` override it.
        """
        if config is None:
            config = load_config(config_path, driver=driver, root=root, runroot=runroot)
        return cls(LayerStore(config, catalog=catalog))

    def __enter__(self) -> ImageService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Release the driver and close the store's databases."""
        self._layers.close()

    # -- store ----------------------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._layers.config

    def storage_driver(self) -> str:
        return self._layers.info.cls.name

    def capabilities(self) -> Capabilities:
        return self._layers.capabilities()

    def layer_store_status(self) -> list[tuple[str, str]]:
        st = self._layers
        out = [
            ("Storage Driver", st.info.cls.name),
            ("Driver Source", st.info.source),
            ("Root", str(st.root)),
            ("Run Root", str(st.runroot)),
            ("Layers", str(len(st.all()))),
        ]
        out.extend(st.hook.lamina_status() or [])
        return out

    def layer_disk_usage(self) -> int:
        return self._layers.disk_usage()

    def timings(self) -> dict[str, dict[str, Any]]:
        return {k: v.as_dict() for k, v in sorted(self._layers.observer.stats.items())}

    # -- layers ---------------------------------------------------------------------------------------
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
        return self._layers.register(
            stream, parent, expected_diff_id=expected_diff_id, expected_digest=expected_digest
        )

    def get_layer(self, ref: str) -> Layer:
        """A layer by ChainID or unique ChainID hex prefix."""
        return self._layers.find(ref)

    def layers(self) -> list[Layer]:
        return self._layers.all()

    def retain_layer(self, chain: str) -> Layer:
        return self._layers.retain(chain)

    def release_layer(self, ref: str) -> list[str]:
        """Drop one reference; returns the ChainIDs removed as a result."""
        layer = self._layers.find(ref)
        return list(self._layers.release(layer.chain_id))

    def export_layer(self, ref: str) -> BinaryIO:
        """The exact tar stream of a layer; raises ExportError at its end if it no longer matches."""
        from lamina.tarsplit import ExactTarStream

        layer = self._layers.find(ref)
        raw = self._layers.export(layer.chain_id)

        def chunks() -> Iterator[bytes]:
            try:
                while chunk := raw.read(1 << 20):
                    yield chunk
            finally:
                raw.close()

        return ExactTarStream(chunks(), layer.diff_id)  # type: ignore[return-value]

    def layer_changes(self, ref: str) -> list[Change]:
        return self._layers.changes(self._layers.find(ref).chain_id)

    @contextmanager
    def mounted_layer(self, ref: str) -> Iterator[str]:
        """Mount a layer's full tree read-only-by-convention for the duration of the block."""
        layer = self._layers.find(ref)
        path = self._layers.mount(layer.cache_id, scoped=True)
        try:
            yield path
        finally:
            self._layers.unmount(layer.cache_id, scoped=True)

    def mount_layer(self, ref: str) -> str:
        """Take a mount reference that outlives this process (``lamina mount``); see unmount_layer."""
        return self._layers.mount(self._layers.find(ref).cache_id)

    def unmount_layer(self, ref: str, force: bool = False) -> int:
        return self._layers.unmount(self._layers.find(ref).cache_id, force=force)

    def layer_mount_count(self, ref: str) -> int:
        return self._layers.mount_count(self._layers.find(ref).cache_id)

    @property
    def layer_store(self) -> LayerStore:
        return self._layers

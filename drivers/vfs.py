"""vfs: every layer is a full copy of its parent's tree plus its own diff.

On-disk layout under the driver's home::

    dir/<cache-id>/            the layer's complete root filesystem
    records/<cache-id>.tsr     tar-split record of a layer applied before lamina kept these records itself

With an image store (``image_home``), image layers are ``dir/<cache-id>/`` under it instead, and only
containers' read-write layers stay under the home.

Snapshots clone file data with FICLONE where the backing filesystem supports reflinks (btrfs, xfs),
otherwise ``copy_file_range``. Mounting returns the directory. Diffs compare trees (naive diff, from
:class:`lamina.driver.TreeDriver`); lamina assembles exact exports from the tree. Works anywhere, as any
user; costs disk and creation time proportional to the image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lamina.driver import (
    Capabilities,
    DeleteWhiteouts,
    DiffStream,
    DriverRegistry,
    TreeDriver,
    apply_tar,
    check_layer_id,
    copy_tree,
    existing_ancestor,
    hookimpl,
    rmtree,
)
from lamina.errors import DriverUnsupported, LayerNotFound

log = logging.getLogger("lamina.drivers.vfs")


class VfsDriver(TreeDriver):
    name = "vfs"
    description = "full copies of every layer (reflink when available); works everywhere"
    keeps_images_apart = True

    def __init__(self, home: Path, runhome: Path, options: Mapping[str, Any]) -> None:
        super().__init__(home, runhome, options)
        self.dirs = home / "dir"
        self.records = home / "records"
        # where image layers go: the image store's directory, else the same as containers' layers
        self.image_dirs = self.dirs if self.image_home is None else self.image_home / "dir"
        if not self.read_only:
            self.dirs.mkdir(exist_ok=True)
            self.image_dirs.mkdir(exist_ok=True)
        self.copy_method = "unknown"

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options))
        if unknown:
            raise DriverUnsupported(f"unknown vfs option(s): {', '.join(unknown)}")
        base = existing_ancestor(home)
        if not os.access(base, os.W_OK):
            raise DriverUnsupported(f"{base} is not writable")

    def layer_dir(self, layer_id: str) -> Path:
        if self.image_dirs is not self.dirs:
            mine = self.image_dirs / layer_id
            if os.path.lexists(mine):
                return mine
        return self.dirs / layer_id

    def _homes(self) -> list[Path]:
        return [self.dirs] if self.image_dirs is self.dirs else [self.dirs, self.image_dirs]

    def _dir(self, layer_id: str) -> Path:
        return self.layer_path(layer_id)

    def legacy_record(self, layer_id: str) -> Path | None:
        return self.records / f"{layer_id}.tsr"

    @hookimpl
    def lamina_capabilities(self) -> Capabilities:
        return Capabilities(can_mount=True, native_diff=False, exact_tar=True, supports_rw_layers=True)

    @hookimpl
    def lamina_status(self) -> list[tuple[str, str]]:
        n = sum(1 for d in self._homes() for _ in os.scandir(d))
        return [("Layers on disk", str(n)), ("Snapshot copy", self.copy_method)]

    @hookimpl
    def lamina_metadata(self, layer_id: str) -> dict[str, str]:
        return {"dir": str(self._dir(layer_id))}

    @hookimpl
    def lamina_create(self, layer_id: str, parent: str | None, rw: bool) -> bool:
        d = (self.dirs if rw else self.image_dirs) / check_layer_id(layer_id, self.name)
        d.mkdir(mode=0o755)
        if parent is not None:
            self.copy_method = copy_tree(str(self._dir(parent)), str(d))
        return True

    @hookimpl
    def lamina_apply_diff(self, layer_id: str, parent: str | None, diff: DiffStream) -> int:
        return apply_tar(diff, self._dir(layer_id), whiteouts=DeleteWhiteouts(), warn=log.warning).size

    @hookimpl
    def lamina_mount(self, layer_id: str, options: list[str]) -> str:
        d = self._dir(layer_id)
        if not d.is_dir():
            raise LayerNotFound(f"vfs layer {layer_id} has no directory")
        return str(d)

    @hookimpl
    def lamina_unmount(self, layer_id: str) -> bool:
        return True

    @hookimpl
    def lamina_exists(self, layer_id: str) -> bool:
        return self._dir(layer_id).exists()

    @hookimpl
    def lamina_layers(self) -> list[str]:
        ids = {e.name.removeprefix(".removing-") for d in self._homes() for e in os.scandir(d)
               if not e.name.startswith(".") or e.name.startswith(".removing-")}
        if self.records.is_dir():
            ids |= {e.name.split(".", 1)[0] for e in os.scandir(self.records) if not e.name.startswith(".")}
        return sorted(ids)

    @hookimpl
    def lamina_remove(self, layer_id: str) -> bool:
        d = self._dir(layer_id)
        if d.exists():
            os.replace(d, d.parent / f".removing-{layer_id}")  # first: a half-removed tree is never a layer
        for home in self._homes():
            trash = home / f".removing-{layer_id}"
            if trash.exists():
                rmtree(trash)
        self.forget_legacy_record(layer_id)
        return True

    @hookimpl
    def lamina_cleanup(self) -> bool:
        return True


@hookimpl
def lamina_register_drivers(registry: DriverRegistry) -> None:
    registry.add(VfsDriver)

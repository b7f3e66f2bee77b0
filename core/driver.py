"""What a driver author imports: the contract's types, the hook marker, the safe apply engine, tree
helpers, and :class:`TreeDriver`, the base class of drivers that keep layers as directory trees.

Everything a driver needs is here, so a driver package depends on this one module (see plugins.md)::

    from lamina.driver import Capabilities, DriverRegistry, TreeDriver, apply_tar, hookimpl

Exact export is lamina's, not the driver's: while a tree driver applies a layer with :func:`apply_tar`,
lamina records the stream's headers and padding (the tar-split record, which lamina stores and removes
itself), and it assembles the layer's exact tar from that record and the files under the driver's
``lamina_diff_root``. A driver that keeps the stream itself says so (``Capabilities.keeps_stream``) and
implements ``lamina_tar_stream``; an :class:`ExactTarStream` it returns may hold :class:`Span` s (ranges of
open files) besides bytes, which a save into a file copies in the kernel.
"""

from __future__ import annotations

from pathlib import Path

from lamina.contract import (
    ByteStream,
    Capabilities,
    Change,
    ChangeKind,
    DiffStream,
    Driver,
    DriverInfo,
    DriverRegistry,
    existing_ancestor,
)
from lamina.errors import ExportError, LayerNotFound
from lamina.fs.apply import ApplyResult, DeleteWhiteouts, WhiteoutStrategy, apply_tar
from lamina.fs.changes import diff_size, diff_tar, tree_changes
from lamina.fs.kcopy import Span
from lamina.fs.ops import DirStack, Root, rmtree
from lamina.fs.treecopy import copy_tree
from lamina.plugins.hookspecs import hookimpl
from lamina.tar.split import ExactTarStream, assemble_segments

__all__ = [
    "ApplyResult",
    "ByteStream",
    "Capabilities",
    "Change",
    "ChangeKind",
    "DeleteWhiteouts",
    "DiffStream",
    "DirStack",
    "Driver",
    "DriverInfo",
    "DriverRegistry",
    "ExactTarStream",
    "Root",
    "Span",
    "TreeDriver",
    "WhiteoutStrategy",
    "apply_tar",
    "check_layer_id",
    "copy_tree",
    "diff_size",
    "diff_tar",
    "existing_ancestor",
    "hookimpl",
    "rmtree",
    "tree_changes",
]


def check_layer_id(layer_id: str, driver: str) -> str:
    """A CacheID is a plain name: no separator, not hidden, not empty (it becomes a path component)."""
    if not isinstance(layer_id, str) or not layer_id or "/" in layer_id or "\0" in layer_id \
            or layer_id.startswith("."):
        shown = repr(layer_id)[:40]
        raise LayerNotFound(f"{driver}: bad layer id {shown}")
    return layer_id


class TreeDriver(Driver):
    """Base class for drivers whose every layer is a complete directory tree (containers/storage's
    naive-diff drivers): vfs, the contrib hardlink driver, and third parties.

    A subclass implements :meth:`layer_dir` (where a layer's tree lives), ``lamina_create``,
    ``lamina_apply_diff`` (with :func:`apply_tar`), ``lamina_remove`` and the rest of its lifecycle; it
    gets changes, diffs and diff sizes by comparing trees, the directory lamina assembles exact exports
    from, and layer-id validation (:meth:`layer_path`). A driver that kept tar-split records itself before
    lamina did names them in :meth:`legacy_record`, so those layers still export.
    """

    def layer_dir(self, layer_id: str) -> Path:
        """The directory holding the full tree of ``layer_id`` (a validated CacheID)."""
        raise NotImplementedError

    def layer_path(self, layer_id: str) -> Path:
        """:meth:`layer_dir` of a CacheID checked to be a plain name."""
        return self.layer_dir(check_layer_id(layer_id, self.name))

    @hookimpl
    def lamina_changes(self, layer_id: str, parent: str | None) -> list[Change]:
        return tree_changes(str(self.layer_path(layer_id)), str(self.layer_path(parent)) if parent else None)

    @hookimpl
    def lamina_diff(self, layer_id: str, parent: str | None) -> ByteStream:
        return ExactTarStream(diff_tar(str(self.layer_path(layer_id)), self.lamina_changes(layer_id, parent)), None)

    @hookimpl
    def lamina_diff_size(self, layer_id: str, parent: str | None) -> int:
        return diff_size(str(self.layer_path(layer_id)), self.lamina_changes(layer_id, parent))

    @hookimpl
    def lamina_diff_root(self, layer_id: str) -> str:
        return str(self.layer_path(layer_id))

    # -- layers from before lamina kept the records ---------------------------------------------------
    def legacy_record(self, layer_id: str) -> Path | None:
        """Where this driver kept a layer's tar-split record itself, before lamina kept them (None: it never
        did). lamina asks for the stream of a layer it holds no record of; :meth:`lamina_tar_stream`
        answers from this record, and :meth:`forget_legacy_record` removes it with the layer."""
        return None

    @hookimpl
    def lamina_tar_stream(self, layer_id: str) -> ByteStream:
        record = self.legacy_record(check_layer_id(layer_id, self.name))
        if record is None or not record.exists():
            raise ExportError(
                f"{self.name} layer {layer_id[:12]} has no tar-split record, so it cannot be exported exactly; "
                "load or pull its image again"
            )
        return ExactTarStream(assemble_segments(record, self.layer_path(layer_id)), None)

    def forget_legacy_record(self, layer_id: str) -> None:
        """Call from ``lamina_remove``: the legacy record (and its kept payloads) go with the layer."""
        record = self.legacy_record(check_layer_id(layer_id, self.name))
        if record is not None:
            for p in (record, record.with_name(record.name + ".sup")):
                p.unlink(missing_ok=True)

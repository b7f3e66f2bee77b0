"""The lamina driver contract, as pluggy hook specifications.

There are two kinds of hooks.

**Registration** -- implemented by *plugin modules* (built-in drivers and third-party packages found
through the ``lamina.drivers`` entry-point group):

* :func:`lamina_register_drivers` -- add driver classes to the registry by name.

**Operations** -- implemented by *driver instances*. When a store starts its driver (a new store as it
opens, an existing one when a command first needs the driver), lamina instantiates exactly one
driver class and registers the instance with the store's plugin manager, so each operation hook has one
implementation: the active driver's. Every operation hook is ``firstresult``. A plugin module (built-in or
from the entry-point group) may wrap operation hooks with module-level ``@hookimpl(wrapper=True)``
functions to observe them, as the built-in timing observer does; lamina registers such modules with every
driver it starts.

Vocabulary: ``layer_id`` is the driver-owned *CacheID* of a layer (a random hex name); ``parent`` is the
parent layer's CacheID or ``None`` for a base layer. Layers are either *committed* (read-only; created by
applying a diff) or *read-write* (containers' layers, created with ``rw=True``).

All paths lamina hands over are absolute; every error a driver raises on purpose should be a
:class:`lamina.errors.LaminaError` subclass. See ``plugins.md`` for a walk-through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lamina.contract import ByteStream, Capabilities, Change, DriverRegistry
    from lamina.tar.compression import DiffStream

hookspec = pluggy.HookspecMarker("lamina")
hookimpl = pluggy.HookimplMarker("lamina")

# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


@hookspec
def lamina_register_drivers(registry: DriverRegistry) -> None:
    """Add driver classes: ``registry.add(MyDriver)``. Called each time lamina discovers drivers.

    A name registered twice is an error naming both sources. A driver class must implement at least
    the hooks in :data:`lamina.plugins.discovery.REQUIRED_HOOKS`, or the plugin is reported as broken.
    """


# --------------------------------------------------------------------------------------------------
# Operations: description
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lamina_capabilities() -> Capabilities:
    """What the driver can do (see :class:`lamina.contract.Capabilities`)."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_status() -> list[tuple[str, str]]:
    """Human-readable key/value facts about the driver and its backing store (``lamina info``)."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_metadata(layer_id: str) -> dict[str, str]:
    """Driver-specific facts about one layer (paths, mount state...)."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Operations: layer registration
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lamina_create(layer_id: str, parent: str | None, rw: bool) -> bool:
    """Create an empty snapshot ``layer_id`` on ``parent``; ``rw`` for a container's writable layer.

    Return True. Raise :class:`lamina.errors.OperationUnsupported` if ``rw`` is not supported.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_adopt(layer_id: str, parent: str | None, source: str, source_driver: str) -> bool:
    """Optional. Create the committed layer ``layer_id`` on ``parent`` whose own content is ``source``, the
    :func:`lamina_diff_root` of a layer of another store's ``source_driver`` driver, in place: no copy.

    lamina asks this only for a store it reads and never writes (an additional image store), when a
    container is created on one of its images. Return True when the layer now reads ``source`` (never
    writing it) and False when this driver cannot use it so (another driver's layout, another way of
    marking whiteouts): lamina then applies the layer's exact tar instead. Removing the layer never
    touches ``source``.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_apply_diff(layer_id: str, parent: str | None, diff: DiffStream) -> int:
    """Apply an uncompressed tar diff to the freshly created ``layer_id``; return the content size.

    ``diff`` computes the DiffID as it is read. Use :func:`lamina.fs.apply.apply_tar` to unpack it safely
    (it also captures a record for exact re-export); never extract with ``tarfile``. The driver need
    not read the stream to its end: lamina drains it afterwards.
    """
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Operations: mounting. lamina keeps the reference counts; lamina_mount runs on every get (so a mount that
# vanished is re-established: it must be idempotent) and lamina_unmount on the last put and when lamina
# reclaims the mounts of processes that died (it must be idempotent too).
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lamina_mount(layer_id: str, options: list[str]) -> str:
    """Make the full filesystem of ``layer_id`` available; return its absolute path.

    Called for every mount reference taken: when it is already mounted, return the same path.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_unmount(layer_id: str) -> bool:
    """Undo :func:`lamina_mount`; a no-op when not mounted. Return True."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Operations: diffs and tar streams
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lamina_changes(layer_id: str, parent: str | None) -> list[Change]:
    """What ``layer_id`` adds, changes and deletes relative to ``parent``, sorted by path."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_diff(layer_id: str, parent: str | None) -> ByteStream:
    """A tar stream of the differences, with OCI whiteouts for deletions (for RW layers and commits)."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_diff_size(layer_id: str, parent: str | None) -> int:
    """Bytes of file content the diff against ``parent`` carries."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_diff_root(layer_id: str) -> str:
    """The directory holding the files a committed layer's diff wrote, under the names it wrote them (a
    full-copy driver's layer tree, overlay's upper directory). lamina assembles the layer's exact tar
    stream from this directory and the tar-split record it kept while the layer was applied."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_tar_stream(layer_id: str) -> ByteStream:
    """The exact tar stream a committed layer was applied from (its sha256 is the DiffID), for drivers
    that keep the stream themselves (``Capabilities.keeps_stream``). lamina asks a tree driver only for a
    layer it holds no tar-split record of (one applied before lamina kept the records)."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Operations: lifecycle
# --------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lamina_exists(layer_id: str) -> bool:
    """Whether the driver holds anything for ``layer_id``."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_layers() -> list[str]:
    """Optional: the ID of every layer the driver holds anything for, including what is left of a layer
    it was creating or removing when its process died. ``lamina system check`` compares these with the
    store's rows to find leftovers (and ``--repair`` hands each to ``lamina_remove``); a driver without
    this hook is not searched for them."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_remove(layer_id: str) -> bool:
    """Delete ``layer_id`` and everything the driver keeps for it; idempotent. Return True."""
    raise NotImplementedError


@hookspec(firstresult=True)
def lamina_cleanup() -> bool:
    """The store is closing: release resources (unmount nothing lamina still counts). Return True."""
    raise NotImplementedError


OPERATION_HOOKS = (
    "lamina_capabilities",
    "lamina_status",
    "lamina_metadata",
    "lamina_create",
    "lamina_apply_diff",
    "lamina_mount",
    "lamina_unmount",
    "lamina_changes",
    "lamina_diff",
    "lamina_diff_size",
    "lamina_diff_root",
    "lamina_tar_stream",
    "lamina_exists",
    "lamina_layers",
    "lamina_remove",
    "lamina_cleanup",
)

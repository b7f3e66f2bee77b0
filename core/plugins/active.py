"""The active driver: one typed object in front of the plugin manager's operation hooks.

The store calls the driver only through :class:`ActiveDriver`. Each method calls one hook (so observers
that wrap hooks, the timing observer among them, see every call) and turns a hook nobody implements into
:class:`OperationUnsupported`, in one place, naming the driver and what it cannot do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pluggy

from lamina.contract import ByteStream, Capabilities, Change, Driver, DriverInfo
from lamina.errors import OperationUnsupported, write_failure
from lamina.plugins.discovery import TimingObserver
from lamina.tar.compression import DiffStream


class ActiveDriver:
    def __init__(self, info: DriverInfo, driver: Driver, pm: pluggy.PluginManager, observer: TimingObserver) -> None:
        self.info = info
        self.name = info.cls.name
        self.source = info.source
        self.instance = driver
        self.pm = pm
        self.observer = observer
        self._caps: Capabilities | None = None

    @property
    def hook(self) -> Any:
        """The plugin manager's hook relay, for tests and tools that call a hook by name."""
        return self.pm.hook

    def implements(self, hook: str) -> bool:
        """Whether the driver itself (not only an observer wrapping it) implements ``hook``."""
        return any(not impl.hookwrapper and not impl.wrapper for impl in getattr(self.pm.hook, hook).get_hookimpls())

    def _unsupported(self, what: str) -> OperationUnsupported:
        return OperationUnsupported(f"driver {self.name!r} cannot {what}")

    @staticmethod
    @contextlib.contextmanager
    def _calling(doing: str) -> Iterator[None]:
        """A system call of the driver that failed (a full disk, a read-only filesystem, a mount the kernel
        refused, an I/O error) is one line naming what the driver was doing."""
        try:
            yield
        except OSError as e:
            raise write_failure(e, doing) from e

    # -- facts ----------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            caps = self.pm.hook.lamina_capabilities()
            if not isinstance(caps, Capabilities):
                raise self._unsupported("say what it supports (lamina_capabilities)")
            self._caps = caps
        return self._caps

    def status(self) -> list[tuple[str, str]]:
        return list(self.pm.hook.lamina_status() or [])

    def metadata(self, layer_id: str) -> dict[str, str]:
        return dict(self.pm.hook.lamina_metadata(layer_id=layer_id) or {})

    def exists(self, layer_id: str) -> bool:
        return bool(self.pm.hook.lamina_exists(layer_id=layer_id))

    def layers(self) -> list[str] | None:
        """Every layer ID the driver holds anything for, or None if it cannot say."""
        ids = self.pm.hook.lamina_layers()
        return None if ids is None else [str(i) for i in ids]

    # -- layers ---------------------------------------------------------------------------------------
    def create(self, layer_id: str, parent: str | None, rw: bool) -> None:
        if rw and not self.capabilities().supports_rw_layers:
            raise OperationUnsupported(f"driver {self.name!r} has no read-write layers; use vfs or overlay")
        with self._calling(f"creating layer {layer_id[:12]} ({self.name})"):
            self.pm.hook.lamina_create(layer_id=layer_id, parent=parent, rw=rw)

    def adopt(self, layer_id: str, parent: str | None, source: str, source_driver: str) -> bool:
        """Whether the driver made ``layer_id`` use ``source`` in place (False: it cannot, or has no such hook)."""
        if not self.implements("lamina_adopt"):
            return False
        with self._calling(f"adopting layer {layer_id[:12]} ({self.name})"):
            return bool(self.pm.hook.lamina_adopt(
                layer_id=layer_id, parent=parent, source=source, source_driver=source_driver))

    def apply_diff(self, layer_id: str, parent: str | None, diff: DiffStream) -> int:
        with self._calling(f"applying layer {layer_id[:12]} ({self.name})"):
            return int(self.pm.hook.lamina_apply_diff(layer_id=layer_id, parent=parent, diff=diff) or 0)

    def remove(self, layer_id: str) -> None:
        with self._calling(f"removing layer {layer_id[:12]} ({self.name})"):
            self.pm.hook.lamina_remove(layer_id=layer_id)

    def cleanup(self) -> None:
        self.pm.hook.lamina_cleanup()

    # -- mounts ---------------------------------------------------------------------------------------
    def mount(self, layer_id: str, options: list[str]) -> str:
        if not self.capabilities().can_mount:
            raise OperationUnsupported(f"{self.name} driver cannot mount; use a driver that can (vfs or overlay)")
        with self._calling(f"mounting layer {layer_id[:12]} ({self.name})"):
            path = self.pm.hook.lamina_mount(layer_id=layer_id, options=options)
        if path is None:
            raise self._unsupported("mount layers")
        return str(path)

    def unmount(self, layer_id: str) -> None:
        """Undo any mount of the layer (nothing to do for a driver that cannot mount)."""
        if self.capabilities().can_mount:
            self.pm.hook.lamina_unmount(layer_id=layer_id)

    # -- content --------------------------------------------------------------------------------------
    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        with self._calling(f"listing the changes of layer {layer_id[:12]} ({self.name})"):
            changes = self.pm.hook.lamina_changes(layer_id=layer_id, parent=parent)
        if changes is None:
            raise self._unsupported("list changes")
        return list(changes)

    def diff(self, layer_id: str, parent: str | None) -> ByteStream:
        with self._calling(f"reading the changes of layer {layer_id[:12]} ({self.name})"):
            stream: ByteStream | None = self.pm.hook.lamina_diff(layer_id=layer_id, parent=parent)
        if stream is None:
            raise self._unsupported("produce diffs")
        return stream

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        with self._calling(f"sizing the changes of layer {layer_id[:12]} ({self.name})"):
            return int(self.pm.hook.lamina_diff_size(layer_id=layer_id, parent=parent) or 0)

    def diff_root(self, layer_id: str) -> str | None:
        """Where the files of a layer's diff are (for assembling its exact export), or None if the driver
        does not say (it keeps the stream itself)."""
        root = self.pm.hook.lamina_diff_root(layer_id=layer_id)
        return None if root is None else str(root)

    def tar_stream(self, layer_id: str) -> ByteStream:
        stream: ByteStream | None = self.pm.hook.lamina_tar_stream(layer_id=layer_id)
        if stream is None:
            raise self._unsupported("stream layers")
        return stream

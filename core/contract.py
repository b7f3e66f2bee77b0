"""The types of the driver contract: the driver base class, capabilities, changes, the registry.

A leaf module, so that every part of lamina can name these types; driver authors import them, with
everything else they need, from :mod:`lamina.driver`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from lamina.errors import DriverError

if TYPE_CHECKING:
    from lamina.tar.compression import DiffStream

__all__ = ["ByteStream", "Capabilities", "Change", "DiffStream", "Driver", "DriverRegistry"]


def __getattr__(name: str) -> Any:
    """``DiffStream`` is imported when asked for: naming the contract's types costs no tar machinery."""
    if name == "DiffStream":
        from lamina.tar.compression import DiffStream

        return DiffStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ByteStream(Protocol):
    """What stream-returning hooks return: a readable, closable byte stream (a file, an ExactTarStream)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Capabilities:
    can_mount: bool
    native_diff: bool
    exact_tar: bool
    supports_rw_layers: bool
    # The driver keeps each layer's tar stream itself and exports it (lamina_tar_stream), so lamina keeps
    # no tar-split record for it. Tree drivers leave this False: lamina records the stream's headers while
    # they apply it and assembles exports from their files (lamina_diff_root).
    keeps_stream: bool = False

    def as_dict(self) -> dict[str, bool]:
        return {
            "can_mount": self.can_mount,
            "native_diff": self.native_diff,
            "exact_tar": self.exact_tar,
            "supports_rw_layers": self.supports_rw_layers,
            "keeps_stream": self.keeps_stream,
        }


ChangeKind = Literal["A", "C", "D"]


@dataclass(frozen=True, order=True)
class Change:
    """One change of a layer against its parent: ``A``dded, ``C``hanged or ``D``eleted ``/path``."""

    path: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


class Driver:
    """Base class for storage drivers.

    Subclasses set :attr:`name`, may override :meth:`probe`, and implement the operation hooks of
    :mod:`lamina.plugins.hookspecs` as methods decorated with ``@hookimpl``. lamina creates one instance per open
    store with ``home`` (a directory under the store root the driver owns), ``runhome`` (the same under
    the runroot, for volatile state) and the ``[storage.options.<name>]`` table.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # True (set before __init__ runs) when the store is only read: an additional image store, which the
    # driver must not write to, whatever its filesystem allows (no stamps, probes or caches under ``home``;
    # ``runhome`` is this process's own)
    read_only: bool = False
    # A driver that can keep image layers apart from containers' (``[storage] image_store``) says so here.
    # lamina then sets ``image_home`` (before __init__ runs) to a directory of its own under the image
    # store: layers created with ``rw=False`` (and adopted ones) go there, read-write layers under ``home``,
    # and every hook finds a layer in either. ``image_home`` is None when the store keeps them together.
    keeps_images_apart: ClassVar[bool] = False
    image_home: Path | None = None

    def __init__(self, home: Path, runhome: Path, options: Mapping[str, Any]) -> None:
        self.home = home
        self.runhome = runhome
        self.options = dict(options)

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, Any]) -> None:
        """Raise :class:`lamina.errors.DriverUnsupported` (saying why) if the driver cannot work here.

        ``home`` may not exist yet; probe its nearest existing ancestor for filesystem features.
        """

    @classmethod
    def probe_details(cls, home: Path, runhome: Path, options: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Facts the probe found, for ``lamina drivers`` (kernel features, modes...). Must not create
        anything; may read what an open store cached under ``runhome``."""
        return []


def existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass
class DriverInfo:
    cls: type[Driver]
    source: str  # distribution name or module that registered it


class DriverRegistry:
    """Handed to :func:`lamina.plugins.hookspecs.lamina_register_drivers`; collects driver classes by name."""

    def __init__(self) -> None:
        self.drivers: dict[str, DriverInfo] = {}
        self._current_source = "lamina"

    def add(self, cls: type[Driver]) -> None:
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise DriverError(f"driver class {cls.__qualname__} from {self._current_source} has no valid name")
        if not (isinstance(cls, type) and issubclass(cls, Driver)):
            raise DriverError(f"{cls!r} from {self._current_source} is not a lamina.driver.Driver subclass")
        if name in self.drivers:
            prev = self.drivers[name].source
            raise DriverError(
                f"driver name {name!r} registered twice: by {prev} and by {self._current_source}"
            )
        self.drivers[name] = DriverInfo(cls, self._current_source)


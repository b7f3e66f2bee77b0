"""The lamina exception tree.

Every error lamina raises on purpose derives from :class:`LaminaError` and carries a one-line message
meant for the user. The CLI prints ``Error: <message>`` and exits non-zero; ``--debug`` adds the
traceback.

::

    LaminaError
    ├── ConfigError                 bad or unreadable configuration
    ├── BadTime                     a time or duration (a filter's until=, --since) that cannot be read
    ├── DriverError                 a storage driver failed
    │   ├── DriverNotFound          no driver registered under that name
    │   ├── DriverUnsupported       the driver's probe says it cannot work here
    │   ├── DriverConflict          the store was created by another driver
    │   ├── PluginError             a third-party plugin failed to load or is malformed
    │   └── OperationUnsupported    the active driver lacks a capability (mount, RW layers, ...)
    ├── StoreError                  the layer store itself
    │   ├── LayerNotFound
    │   ├── LayerInUse              removal refused: references or children remain
    │   ├── StoreLocked             could not take the store lock in time
    │   ├── StoreFull               no space left on the store's filesystem (or quota exceeded)
    │   ├── StoreReadOnly           the store is on a read-only filesystem: only reads work
    │   ├── LayerLimitExceeded      parent chain too deep
    │   └── BlobNotFound            the content store lacks a blob
    ├── FormatError                 bad input data
    │   ├── ArchiveError            tar or compression stream is corrupt, truncated or hostile
    │   ├── UnsafePathError         a name escapes the layer root or is otherwise unacceptable
    │   ├── LimitExceeded           decompression bomb guard tripped
    │   ├── DigestError             malformed digest
    │   │   └── DigestMismatch      content does not hash to the expected digest
    │   └── InvalidDocument         malformed, mistyped or oversized manifest/index/config
    ├── ContainerError              containers and running them
    │   ├── ContainerNotFound
    │   └── RuntimeFailure          the OCI runtime is missing or failed to start a container
    ├── ImageError                  images and their names
    │   ├── InvalidReference        a name that breaks the reference grammar
    │   ├── InvalidChange           a --change instruction that cannot be applied
    │   ├── ImageNotFound
    │   │   └── AmbiguousImage      a truncated ID matching several images
    │   ├── ImageConflict           removal refused: something still needs the image
    │   └── PlatformNotFound        no manifest for the requested platform
    └── ExportError                 a layer's stored content no longer reproduces its DiffID
"""

from __future__ import annotations

import errno

MAX_MESSAGE = 400  # characters of an error message at most: the rest of a longer one is cut from its middle
NAME_SHOWN = 120  # characters of a name (path, link target, key) an error message quotes at most


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut in the middle to at most ``limit`` characters, saying how many went."""
    if len(text) <= limit:
        return text
    marker = ""
    for _ in range(3):  # the marker's length depends on the number it holds
        keep = max(limit - len(marker), 2)
        marker = f" ...[{len(text) - keep} characters]... "
    keep = max(limit - len(marker), 2)
    head = keep * 2 // 3
    return text[:head] + marker + text[len(text) - (keep - head) :]


def shown(name: str | bytes, limit: int = NAME_SHOWN) -> str:
    """A name as an error message quotes it: its ``repr``, cut in the middle when long (an archive may
    hold names of megabytes)."""
    if len(name) <= limit:
        return shorten(repr(name), limit)
    head, tail = name[: limit // 2], name[len(name) - limit // 4 :]
    return shorten(f"{head!r}...[{len(name) - len(head) - len(tail)} more]...{tail!r}", limit)


class LaminaError(Exception):
    """Root of every error lamina raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints it as is; and short, whatever the input it names.
        super().__init__(shorten(" ".join(str(message).split())))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(LaminaError):
    pass


class BadTime(LaminaError):
    pass


class DriverError(LaminaError):
    pass


class DriverNotFound(DriverError):
    pass


class DriverUnsupported(DriverError):
    """Raised by a driver's probe: the driver cannot work on this host or backing filesystem."""


class DriverConflict(DriverError):
    pass


class PluginError(DriverError):
    pass


class OperationUnsupported(DriverError):
    pass


class StoreError(LaminaError):
    pass


class LayerNotFound(StoreError):
    pass


class LayerInUse(StoreError):
    pass


class StoreLocked(StoreError):
    pass


class LayerLimitExceeded(StoreError):
    pass


class StoreFull(StoreError):
    """The filesystem holding the store (or its run root) has no space left, or the quota is exceeded."""


class StoreReadOnly(StoreError):
    """The store (or its run root) is on a read-only filesystem: reads work, writes are refused."""


def write_failure(err: OSError, doing: str) -> StoreError:
    """The one-line error for ``err``, met while ``doing`` something to the store ("applying layer ...").

    A full disk or an exceeded quota is a :class:`StoreFull`, a read-only filesystem a
    :class:`StoreReadOnly`; anything else a :class:`StoreError` naming the system's reason."""
    if err.errno == errno.ENOSPC:
        return StoreFull(f"no space left on device while {doing}")
    if err.errno == errno.EDQUOT:
        return StoreFull(f"disk quota exceeded while {doing}")
    if err.errno == errno.EROFS:
        return StoreReadOnly(f"read-only file system: cannot finish {doing}")
    where = f" ({shown(err.filename)})" if isinstance(err.filename, str) and err.filename else ""
    return StoreError(f"{err.strerror or err} while {doing}{where}")


class FormatError(LaminaError):
    pass


class ArchiveError(FormatError):
    pass


class UnsafePathError(FormatError):
    pass


class LimitExceeded(FormatError):
    pass


class DigestError(FormatError):
    pass


class DigestMismatch(DigestError):
    pass


class ExportError(LaminaError):
    pass


class ExportUnreadable(ExportError):
    """A layer's files could not be read back for a reason other than their being gone or changed (no
    permission, no file descriptors left, an I/O error): not evidence that the layer is damaged."""


class SharedLayerUnavailable(DriverError, ExportUnreadable):
    """A layer used in place from another store (an additional image store) whose directory there cannot
    be reached now (the shared filesystem is not mounted, or not readable): nothing here is damaged."""


class InvalidDocument(FormatError):
    """A manifest, index or config that is malformed, of the wrong media type, or too large."""


class ImageError(LaminaError):
    pass


class InvalidReference(ImageError):
    """A name, tag or digest reference that does not follow the reference grammar."""


class InvalidChange(ImageError):
    """A ``--change`` instruction lamina cannot apply to an image config."""


class ImageNotFound(ImageError):
    pass


class AmbiguousImage(ImageNotFound):
    """A truncated ID that matches more than one image."""


class ImageConflict(ImageError):
    """An image cannot be removed or untagged because something still needs it."""


class PlatformNotFound(ImageError):
    """No manifest in an index matches the requested platform."""


class BlobNotFound(StoreError):
    """The content store has no blob with the requested digest."""


class ContainerError(LaminaError):
    pass


class ContainerNotFound(ContainerError):
    pass


class RuntimeFailure(ContainerError):
    """The OCI runtime (runc, crun) is missing or could not start the container."""

"""The lamina exception tree.

Every error lamina raises on purpose derives from :class:`LaminaError` and carries a one-line message
meant for the user. The CLI prints ``Error: <message>`` and exits non-zero; ``--debug`` adds the
traceback.

::

    LaminaError
    ├── ConfigError                 bad or unreadable configuration
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
    │   └── LayerLimitExceeded      parent chain too deep
    ├── FormatError                 bad input data
    │   ├── ArchiveError            tar or compression stream is corrupt, truncated or hostile
    │   ├── UnsafePathError         a name escapes the layer root or is otherwise unacceptable
    │   ├── LimitExceeded           decompression bomb guard tripped
    │   └── DigestError             malformed digest
    │       └── DigestMismatch      content does not hash to the expected digest
    └── ExportError                 a layer's stored content no longer reproduces its DiffID
"""

from __future__ import annotations


class LaminaError(Exception):
    """Root of every error lamina raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(LaminaError):
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

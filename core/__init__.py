"""lamina: daemonless container image and layer storage with pluggable storage drivers.

The public names are imported lazily so that ``lamina --version`` and ``import lamina`` stay cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing's: importing typing would double the cost of ``lamina --version``
if TYPE_CHECKING:
    from typing import Any

    from lamina.errors import LaminaError
    from lamina.service import ImageService

__all__ = ["ImageService", "LaminaError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "ImageService":
        from lamina.service import ImageService

        return ImageService
    if name == "LaminaError":
        from lamina.errors import LaminaError

        return LaminaError
    raise AttributeError(f"module 'lamina' has no attribute {name!r}")

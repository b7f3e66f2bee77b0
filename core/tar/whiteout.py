"""OCI whiteouts, spelled in one place for the whole project.

A layer deletes a path of the layers below it with an empty entry named ``.wh.<name>`` beside it, and
hides everything below a directory with the marker ``<dir>/.wh..wh..opq``. Other names starting with
``.wh..wh.`` are reserved (AUFS metadata) and carry no meaning for a layer's tree. (The C fast path,
``lamina.fs._native``, gives every entry whose basename starts with ``.wh.`` back to Python.)
"""

from __future__ import annotations

from lamina.errors import UnsafePathError, shown

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE = ".wh..wh..opq"


def is_whiteout(base: str) -> bool:
    """Whether a basename is a whiteout, the opaque marker or reserved metadata."""
    return base.startswith(PREFIX)


def target_of(base: str, full: str) -> str | None:
    """For a basename starting with ``.wh.``: the whited-out name, or None for the opaque marker.

    :class:`UnsafePathError` for a whiteout of nothing, of ``.`` or ``..``, or of a path."""
    if base == OPAQUE:
        return None
    target = base[len(PREFIX):]
    if target in ("", ".", "..") or "/" in target:
        raise UnsafePathError(f"invalid whiteout entry {shown(full)}")
    return target


def whiteout_of(path: str) -> str:
    """The entry name that deletes ``path`` (``a/b`` → ``a/.wh.b``)."""
    head, _, base = path.rstrip("/").rpartition("/")
    return (head + "/" if head else "") + PREFIX + base


def opaque_of(directory: str) -> str:
    """The opaque marker's entry name for ``directory``."""
    d = directory.rstrip("/")
    return (d + "/" if d else "") + OPAQUE

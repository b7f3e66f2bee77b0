"""The model the image formats read into and write from.

A format reader (OCI layout, docker-archive, later a registry) produces :class:`ImageSource` objects: the
verified config bytes, the manifest it came with (if the format has one), the names it carries, and one
:class:`LayerSource` per layer. A layer is known by its *DiffID* (uncompressed) and, when the format
describes the blob, by its *descriptor* (the digest and size of the blob as stored, usually compressed).
Layer data is reached through a re-callable ``open``, so nothing is read before it is needed.

Writers take :class:`ImageExport` objects, whose blobs come from the content store or from the driver's
exact tar stream, as :class:`BlobSource` values: bytes for a stream, or a copy the kernel makes into a
file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from lamina.digest import DiffID
from lamina.errors import LaminaError
from lamina.tar.compression import Readable


@dataclass(frozen=True)
class BlobRef:
    """What a descriptor says of a blob: its media type, digest and size."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class LayerSource:
    diff_id: DiffID
    open: Callable[[], Readable]
    blob: BlobRef | None = None  # None: the format does not describe the blob (docker-archive)
    what: str = "layer"
    # the blob's raw bytes from an offset on, unverified (a registry's Range): such a layer is fetched once
    # however many pulls want it at the same time, and resumed after an interruption (content.Download)
    open_at: Callable[[int], Readable] | None = None
    # the bytes last fetched did not verify, with this error: True when another source is left to fetch the
    # blob from, whole (the next open or open_at asks it); a registry pull's mirrors, then its source
    reject: Callable[[LaminaError], bool] | None = None


@dataclass
class ImageSource:
    config: bytes  # verified against config_digest by the reader
    config_digest: str
    layers: list[LayerSource]
    names: list[str] = field(default_factory=list)  # normalized full references
    manifest: bytes | None = None  # verified against manifest_ref.digest by the reader
    manifest_ref: BlobRef | None = None
    extra_blobs: dict[str, bytes] = field(default_factory=dict)  # indexes the manifest was selected from
    origin: str = ""


@dataclass(frozen=True)
class BlobSource:
    digest: str
    size: int
    chunks: Callable[[], Iterator[bytes]]
    # writes the blob at the position of a file descriptor (a regular file open for reading and writing),
    # its file bodies copied by the kernel, checked as ``chunks`` would be; returns the bytes written
    copy_to: Callable[[int], int] | None = None


@dataclass
class ImageExport:
    image_id: str
    config: bytes
    names: list[str]  # full references; the writer decides how to spell them
    layers: list[BlobSource]  # in the format's form (compressed for OCI, uncompressed for docker-archive)
    manifest: bytes | None = None
    manifest_ref: BlobRef | None = None

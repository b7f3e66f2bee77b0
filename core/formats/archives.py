"""The image archive formats lamina reads and writes, as one table.

Loading tries each :data:`READERS` entry's ``detect`` on the opened source (a directory or a tar, told
apart by :mod:`lamina.formats.archivefs`) and reads with the first that claims it; saving looks the
format's name up in :data:`WRITERS`, which says whether it is written as a directory or a tar and whether
its layers are the manifest's blobs or the uncompressed tar streams. A new format is a new row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lamina.formats import dockerarchive, ocilayout
from lamina.formats.archivefs import Sink, Source
from lamina.formats.imagemodel import ImageExport, ImageSource
from lamina.formats.oci import Platform


@dataclass(frozen=True)
class Reader:
    name: str
    what: str  # how an error describes it: what makes a source one of these
    detect: Callable[[Source], bool]
    read: Callable[[Source, Platform | None], list[ImageSource]]


@dataclass(frozen=True)
class Writer:
    name: str
    directory: bool  # written as a directory tree, not a tar
    manifest: bool  # layers are the manifest's (compressed) blobs, not the uncompressed tar streams
    write: Callable[[Sink, list[ImageExport]], None]


READERS: tuple[Reader, ...] = (
    Reader("oci-layout", "an OCI image layout (oci-layout + index.json)", ocilayout.is_layout, ocilayout.read_layout),
    Reader("docker-archive", "a docker-archive (manifest.json)", dockerarchive.is_docker_archive,
           lambda src, _platform: dockerarchive.read_archive(src)),
)

WRITERS: dict[str, Writer] = {
    w.name: w for w in (
        Writer("docker-archive", directory=False, manifest=False, write=dockerarchive.write_archive),
        Writer("oci-dir", directory=True, manifest=True, write=ocilayout.write_layout),
        Writer("oci-archive", directory=False, manifest=True, write=ocilayout.write_layout),
    )
}

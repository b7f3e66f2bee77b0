"""Tar dialects real tools write, on every driver: archives that end without end-of-archive blocks, GNU long
names with a NUL inside, Solaris ``X`` extended headers.

Each archive is registered on vfs, overlay and tarball through :class:`ImageService`; the tree is checked
where the driver has one, and the export must be the input, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tarformat import END, ext_header, info, pax_record, plain

from lamina.config import Config
from lamina.errors import ArchiveError
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.store.layers import Layer
from lamina.testing import require_root

DRIVERS = ["vfs", "overlay", "tarball"]
BLOCK = 512


@pytest.fixture(scope="module")
def catalog() -> Any:
    return discover()


@pytest.fixture(params=DRIVERS)
def svc(request: pytest.FixtureRequest, tmp_path: Path, catalog: Any) -> Iterator[ImageService]:
    driver = request.param
    if driver == "overlay":
        require_root()
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver=driver),
                           catalog=catalog) as s:
        yield s


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register_exact(svc: ImageService, data: bytes, parent: str | None = None) -> Layer:
    """Register ``data``; its export must be ``data`` again, and ``system check`` must find the layer sound."""
    layer = svc.register_layer(io.BytesIO(data), parent)
    assert layer.diff_id == "sha256:" + _sha(data)
    with svc.export_layer(layer.chain_id) as s:
        assert _sha(s.read()) == _sha(data)
    assert svc.layer_store.audit(layer.chain_id) == []
    return layer


def files(svc: ImageService, layer: Layer) -> dict[str, bytes | str | None] | None:
    """The layer's merged tree: regular files' contents, symlinks' targets, None for directories (None on
    the tarball driver, which has no tree)."""
    if not svc.capabilities().can_mount:
        return None
    out: dict[str, bytes | str | None] = {}
    with svc.mounted_layer(layer.chain_id) as root:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                rel = os.path.relpath(p, root)
                if os.path.islink(p):
                    out[rel] = os.readlink(p)
                elif os.path.isfile(p):
                    out[rel] = Path(p).read_bytes()
                else:
                    out[rel] = None
    return out


def changed(svc: ImageService, layer: Layer) -> list[tuple[str, str]]:
    return [(c.path, c.kind) for c in svc.layer_changes(layer.chain_id)]


# -- archives without end-of-archive blocks -----------------------------------------------------------------


BODY = (plain(info("d", tarfile.DIRTYPE, mode=0o755))
        + plain(info("d/a"), b"a" * 700)
        + ext_header(pax_record("path", "d/" + "long" * 40))
        + plain(info("ignored"), b"b" * BLOCK)  # a payload of whole blocks: no padding before the end
        + plain(info("d/s", tarfile.SYMTYPE, linkname="a")))


@pytest.mark.parametrize("ends", [0, 1], ids=["no-end-block", "one-end-block"])
def test_archive_without_end_blocks_registers_and_exports_as_received(svc: ImageService, ends: int) -> None:
    data = BODY + bytes(ends * BLOCK)
    layer = register_exact(svc, data)
    tree = files(svc, layer)
    if tree is not None:
        assert tree == {"d": None, "d/a": b"a" * 700, "d/" + "long" * 40: b"b" * BLOCK, "d/s": "a"}
    assert sorted(p for p, _ in changed(svc, layer)) == ["/d", "/d/a", "/d/" + "long" * 40, "/d/s"]
    # and a layer on top of it (its tree is read back from the first)
    child = register_exact(svc, plain(info("d/a"), b"new"), layer.chain_id)
    assert ("/d/a", "C") in changed(svc, child)


@pytest.mark.parametrize("cut", [len(BODY) - BLOCK + 100, len(BODY) - BLOCK - 100, 100],
                         ids=["inside-last-header", "inside-payload", "inside-first-header"])
def test_archive_cut_inside_an_entry_is_refused(svc: ImageService, cut: int) -> None:
    with pytest.raises(ArchiveError, match="truncated"):
        svc.register_layer(io.BytesIO(BODY[:cut]))
    assert svc.layers() == []


def test_archive_ending_after_an_extended_header_is_refused(svc: ImageService) -> None:
    with pytest.raises(ArchiveError, match="extended header"):
        svc.register_layer(io.BytesIO(plain(info("f"), b"x") + ext_header(pax_record("path", "g"))))
    assert svc.layers() == []


# -- GNU long names with a NUL inside; Solaris X headers ----------------------------------------------------


def test_gnu_long_name_with_a_nul_is_cut_there(svc: ImageService) -> None:
    name = "dir/" + "n" * 150
    long_name = ext_header(name.encode() + b"\0tail that every reader ignores\0", tarfile.GNUTYPE_LONGNAME,
                           "././@LongLink")
    long_link = ext_header(name.encode() + b"\0\0\0junk", tarfile.GNUTYPE_LONGLINK, "././@LongLink")
    data = (plain(info("dir", tarfile.DIRTYPE)) + long_name + plain(info("dir/short"), b"content")
            + long_link + plain(info("dir/link", tarfile.SYMTYPE, linkname="x")) + END)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # as Python's tarfile reads it
        assert [m.name for m in tf] == ["dir", name, "dir/link"]
    layer = register_exact(svc, data)
    tree = files(svc, layer)
    if tree is not None:
        assert tree[name] == b"content" and tree["dir/link"] == name and "dir/short" not in tree
    assert sorted(p for p, _ in changed(svc, layer)) == ["/dir", "/dir/link", "/" + name]


def test_solaris_x_header_is_read_as_pax(svc: ImageService) -> None:
    records = pax_record("path", "solaris/" + "s" * 120) + pax_record("mtime", "1600000000.25")
    data = plain(info("solaris", tarfile.DIRTYPE)) + ext_header(records, b"X") + plain(info("ignored"), b"x") + END
    layer = register_exact(svc, data)
    tree = files(svc, layer)
    if tree is not None:
        assert tree == {"solaris": None, "solaris/" + "s" * 120: b"x"}
        with svc.mounted_layer(layer.chain_id) as root:
            assert os.lstat(Path(root, "solaris", "s" * 120)).st_mtime_ns == 1_600_000_000_250_000_000
    assert sorted(p for p, _ in changed(svc, layer)) == ["/solaris", "/solaris/" + "s" * 120]

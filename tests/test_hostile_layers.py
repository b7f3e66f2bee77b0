"""Hostile layer archives: refused alike by every driver, with one short line, leaving nothing behind.

Names of a megabyte, NUL bytes and oversized extended attributes, PAX global records that leave entries
without a name, numbers no kernel call takes: each is an error of the one tar reader
(``lamina.tar.format``) or of the entry rules every driver applies (``lamina.fs.apply.check_entry``),
so vfs, overlay and tarball (which keeps the stream as it is) agree. A hypothesis test mutates the
headers of small valid archives and feeds them to the store: each must register or raise a
``LaminaError``, and a refused one must leave no layer row and no driver files.
"""

from __future__ import annotations

import base64
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tarformat import END, ext_header, info, pax_record, plain

from conftest import lamina_cli
from lamina.config import Config
from lamina.errors import MAX_MESSAGE, FormatError
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root

DRIVERS = ["vfs", "overlay", "tarball"]
MIB = 1 << 20


def _gnu(ti: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A header in GNU format (base-256 numbers, long names) and its payload."""
    ti.size = len(data) if ti.isreg() else 0
    return ti.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


def _pax_file(records: bytes, name: str = "f", kind: bytes = tarfile.XHDTYPE) -> bytes:
    return ext_header(records, kind) + plain(info(name), b"data") + END


HOSTILE: dict[str, tuple[bytes, str]] = {
    "PAX name of 1 MiB": (_pax_file(pax_record("path", "n" * MIB)), "longer than 255 bytes"),
    "GNU long name of 1 MiB": (_gnu(info("n" * MIB), b"x") + END, "longer than 255 bytes"),
    "name component of 256 bytes": (_pax_file(pax_record("path", "d/" + "c" * 256)), "longer than 255 bytes"),
    "long link target": (ext_header(pax_record("linkpath", "t" * 5000)) + plain(info("s", tarfile.SYMTYPE))
                         + END, "target must be"),
    "empty symlink target": (plain(info("s", tarfile.SYMTYPE, linkname="")) + END, "target must be"),
    "NUL in an xattr name": (_pax_file(pax_record("SCHILY.xattr.user.a\0b", "v")), "extended attribute"),
    "empty xattr name": (_pax_file(pax_record("SCHILY.xattr.", "v")), "extended attribute"),
    "xattr name of 300 bytes": (_pax_file(pax_record("SCHILY.xattr.user." + "k" * 300, "v")),
                                "extended attribute"),
    "xattr value of 70 KiB": (_pax_file(pax_record("SCHILY.xattr.user.big", "v" * 70_000)), "larger than"),
    "NUL in a LIBARCHIVE xattr name": (_pax_file(pax_record("LIBARCHIVE.xattr.user.a%00b",
                                                            base64.b64encode(b"v"))), "extended attribute"),
    "global path leaving entries without a name": (_pax_file(pax_record("path", ""), kind=tarfile.XGLTYPE),
                                                   "without a name"),
    "global path naming the root": (_pax_file(pax_record("path", "./"), kind=tarfile.XGLTYPE),
                                    "would replace the layer root"),
    "uid -1 as 32 bits": (_pax_file(pax_record("uid", "4294967295")), "out of range"),
    "negative uid": (_gnu(info("f", uid=-5), b"x") + END, "out of range"),
    "mtime beyond time_t": (_gnu(info("f", mtime=2**80), b"x") + END, "out of range"),
    "PAX mtime beyond time_t": (_pax_file(pax_record("mtime", "9" * 40)), "out of range"),
    "device major beyond 12 bits": (_gnu(info("c", tarfile.CHRTYPE, devmajor=2**31, devminor=1)) + END,
                                    "out of range"),
    "hard link to the root": (plain(info("h", tarfile.LNKTYPE, linkname="./")) + END, "layer root"),
}


@pytest.fixture(scope="module")
def catalog() -> Any:
    return discover()


def _open(root: Path, driver: str, catalog: Any) -> ImageService:
    if driver == "overlay":
        require_root()
    return ImageService.open(Config(root=root / "root", runroot=root / "run", driver=driver), catalog=catalog)


def _layer_rows(svc: ImageService) -> int:
    return int(svc.store.db.db.execute("SELECT count(*) FROM layers").fetchone()[0])


def _driver_files(root: Path, driver: str) -> list[str]:
    """Layer files a driver (and lamina's tar-split records) keep under the store root."""
    where = {"vfs": ["vfs/dir"], "tarball": ["tarball/layers"], "overlay": ["overlay/l"]}[driver]
    out = [f"{w}/{n}" for w in [*where, "tar-split"] for n in os.listdir(root / "root" / w)]
    if driver == "overlay":
        home = root / "root" / "overlay"
        out += [n for n in os.listdir(home) if n not in ("l", "mode", ".probe-ok") and not n.startswith(".lamina-")]
    return sorted(out)


@pytest.fixture
def stores(tmp_path: Path, catalog: Any) -> Iterator[dict[str, ImageService]]:
    opened = {d: _open(tmp_path / d, d, catalog) for d in DRIVERS}
    try:
        yield opened
    finally:
        for svc in opened.values():
            svc.cleanup()


def test_hostile_archives_are_refused_alike_on_every_driver(stores: dict[str, ImageService], tmp_path: Path) -> None:
    outcomes: dict[str, dict[str, str]] = {}
    for driver, svc in stores.items():
        got = outcomes[driver] = {}
        for label, (data, words) in HOSTILE.items():
            with pytest.raises(FormatError) as ei:
                svc.register_layer(io.BytesIO(data))
            msg = ei.value.message
            assert words in msg and len(msg) <= MAX_MESSAGE and "\n" not in msg, (driver, label, msg[:500])
            got[label] = type(ei.value).__name__
            assert _layer_rows(svc) == 0 and _driver_files(tmp_path / driver, driver) == [], (driver, label)
    assert outcomes["overlay"] == outcomes["vfs"] and outcomes["tarball"] == outcomes["vfs"]


def test_what_the_rules_allow_still_registers(stores: dict[str, ImageService]) -> None:
    """The limits are the kernel's, not lower: 255-byte components, 4095-byte symlink targets, a whiteout
    of a 255-byte name, the largest uid, device numbers of 12 and 20 bits. (An xattr value may be up to
    64 KiB, but ext4 keeps only about 4 KiB per inode: that is the filesystem's refusal, not the archive's.)"""
    name = "n" * 255
    tb = (TarBuilder().dir(name).file(f"{name}/{name}", b"x", uid=4294967294, gid=4294967294)
          .symlink("s", "t" * 4095).file("x", b"v", xattrs={"user.big": b"v" * 3000}))
    base = tb.build()
    over = TarBuilder().whiteout(f"{name}/{name}").build()
    dev = TarBuilder().char("c", 4095, 1048575).build()
    for svc in stores.values():
        layer = svc.register_layer(io.BytesIO(base))
        svc.register_layer(io.BytesIO(over), layer.chain_id)
        svc.register_layer(io.BytesIO(dev))


def test_cli_names_a_megabyte_name_in_one_short_line(tmp_path: Path) -> None:
    tar = tmp_path / "long.tar"
    tar.write_bytes(_pax_file(pax_record("path", "dir/" + "n" * MIB)))
    for driver in DRIVERS:
        if driver == "overlay":
            require_root()
        proc = lamina_cli("--driver", driver, "layer", "add", str(tar), root=tmp_path / driver, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1, (driver, err[:500])
        assert err.startswith("Error: ") and "internal error" not in err and "Traceback" not in err, err[:500]
        assert len(err.strip().splitlines()) == 1 and len(err) <= MAX_MESSAGE + 20, (driver, len(err))
        assert "longer than 255 bytes" in err and "more]" in err  # the name is quoted, cut in its middle

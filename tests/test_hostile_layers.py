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
import struct
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tarformat import END, ext_header, info, old_gnu_sparse, pax_record, pax_sparse, plain

from conftest import lamina_cli
from lamina.config import Config
from lamina.errors import MAX_MESSAGE, FormatError, LaminaError
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root

DRIVERS = ["vfs", "overlay", "tarball"]
MIB = 1 << 20
CAP_NET_BIND_SERVICE = struct.pack("<5I", 0x02000000, 1 << 10, 0, 0, 0)  # a file capability set, revision 2


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
    "capability of revision 1": (_pax_file(pax_record("SCHILY.xattr.security.capability",
                                                      struct.pack("<3I", 0x01000000, 1 << 10, 0))), "capability"),
    "sparse map beyond the real size": (pax_sparse("1.0", "s", [(5, 10)], 10, b"x" * 10) + END, "beyond its real size"),
    "sparse map out of order": (old_gnu_sparse("s", [(50, 1), (10, 1)], 100, b"xy") + END, "out of order"),
    "sparse real size of 1 EiB": (pax_sparse("0.1", "s", [(0, 1)], 1 << 60, b"x") + END, "real size"),
    "sparse map of a million segments": (
        ext_header(pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                   + pax_record("GNU.sparse.realsize", "10"))
        + plain(info("s"), b"1000000\n0\n1\n".ljust(512, b"\0") + b"x") + END, "more than"),
    "capability of 4 bytes": (_pax_file(pax_record("SCHILY.xattr.security.capability", b"\x01\0\0\x02")),
                              "capability"),
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
    of a 255-byte name, the largest uid, device numbers of 12 and 20 bits; a user.* attribute on a FIFO
    is skipped with a warning, as other attributes the kernel will not keep. (An xattr value may be up to
    64 KiB, but ext4 keeps only about 4 KiB per inode: that is the filesystem's refusal, not the archive's.)"""
    name = "n" * 255
    tb = (TarBuilder().dir(name).file(f"{name}/{name}", b"x", uid=4294967294, gid=4294967294)
          .fifo("p", xattrs={"user.k": b"v"})  # Linux keeps user.* attributes on files and directories only
          .file("cap", b"c", xattrs={"security.capability": CAP_NET_BIND_SERVICE})
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


# -- fuzzing: any input registers or is refused cleanly -------------------------------------------------------

_FIELDS = {  # ustar header fields: offset, length
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12),
    "type": (156, 1), "linkname": (157, 100), "magic": (257, 8), "devmajor": (329, 8), "devminor": (337, 8),
    "prefix": (345, 155),
}
_BYTES = st.one_of(
    st.sampled_from([b"\0", b" ", b"0", b"7", b"9", b"\x80", b"\xff", b"\xff" * 8, b"/", b".", b"..", b"../",
                     b".wh.", b".wh..wh..opq", b"=", b"\n", b"x", b"\xc3", b"-", b"77777777777", b"7" * 12,
                     b"ustar\x00", b"ustar  ", b"L", b"K", b"x", b"g", b"S", b"V", b"1", b"2", b"3", b"5",
                     b"SCHILY.xattr.", b"path=", b"size=", b"99 "]),
    st.binary(min_size=1, max_size=6),
)
_PAX_KEYS = st.sampled_from([
    "path", "linkpath", "size", "uid", "gid", "mtime", "atime", "uname", "gname", "comment", "hdrcharset",
    "GNU.sparse.size", "SCHILY.xattr.user.k", "SCHILY.xattr.", "SCHILY.xattr.user.a\0b", "SCHILY.xattr.x",
    "SCHILY.xattr.trusted.overlay.opaque", "SCHILY.xattr.security.capability", "SCHILY.xattr.user." + "k" * 300,
    "LIBARCHIVE.xattr.user.k", "LIBARCHIVE.xattr.user.%00", "LIBARCHIVE.xattr.%ZZ",
])
_PAX_VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"-1", b"1.5", b"-5.5", b"4294967295", b"4294967294", b"1e3", b" 12", b"9" * 40,
                     b"a" * 300, b"d/" * 150, b"../x", b"/abs", b".", b"./", b".wh..wh..opq", b"a\0b", b"\xff\xfe",
                     b"v" * 70_000, b"dGVzdA", b"====", b"x=y\n"]),
    st.binary(max_size=12),
)
_NAMES = st.sampled_from(["f", "d", "d/f", "./", ".", "", "..", "../f", "/abs", "d/../f", ".wh.f", "d/.wh..wh..opq",
                          ".wh..wh.meta", "s", "s/f", "a" * 300, "caf\udce9", "d/" * 60 + "f"])
_TYPES = st.sampled_from([b"0", b"\0", b"5", b"2", b"1", b"3", b"4", b"6", b"7", b"V", b"S", b"Z", b"K", b"L"])


class Archive(bytes):
    """An input, shown by its start and length (hypothesis prints the failing one)."""

    def __repr__(self) -> str:
        return f"Archive({bytes(self[:1536])!r}... {len(self)} bytes)"


@st.composite
def _structured(draw: st.DrawFn) -> Archive:
    """1 to 4 entries of any type and name, with PAX records (local or global) and GNU long names of any
    content in front of them, in valid framing."""
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            records = b"".join(pax_record(k, v) for k, v in draw(st.lists(st.tuples(_PAX_KEYS, _PAX_VALUES),
                                                                          min_size=1, max_size=3)))
            out += ext_header(records, draw(st.sampled_from([tarfile.XHDTYPE, tarfile.XGLTYPE])))
        if draw(st.integers(0, 4)) == 0:
            longname = draw(st.sampled_from([b"", b"\0", b"x" * 300, b"d/" * 300, b"../up", b"n\0m", b"/"]))
            ti = tarfile.TarInfo("././@LongLink")
            ti.type = draw(st.sampled_from([tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]))
            out += plain(ti, longname)
        ti = info(draw(_NAMES).encode("utf-8", "surrogateescape").decode("latin-1")[:100])
        ti.type = draw(_TYPES)
        ti.linkname = draw(st.sampled_from(["", "f", "d", "d/f", "..", "../../x", "/", "s", "a" * 99]))
        ti.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0, 0o7777]))
        data = draw(st.sampled_from([b"", b"x", b"y" * 600]))
        try:
            out += ti.tobuf(tarfile.USTAR_FORMAT, "latin-1") + (data + bytes(-len(data) % 512) if ti.isreg() else b"")
        except ValueError:
            continue  # not expressible in a ustar header
        if not ti.isreg() and data and draw(st.booleans()):  # a size field on a type without data
            out = out[:-512] + _with_size(out[-512:], len(data))
    return Archive(out + END + draw(st.sampled_from([b"", b"trailing", bytes(512)])))


def _with_size(block: bytes, size: int) -> bytes:
    b = bytearray(block)
    b[124:136] = b"%011o\0" % size
    _rechecksum(b)
    return bytes(b)


def _rechecksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _seeds() -> list[bytes]:
    """Small valid archives in every format lamina reads: every entry type, PAX records with xattrs, GNU
    long names, a ustar prefix, whiteouts."""
    out = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        tb = (TarBuilder(fmt).dir("d").file("d/f", b"data" * 200, uid=1000, gid=1000)
              .symlink("d/s", "f").hardlink("d/h", "d/f").fifo("p").whiteout("gone")
              .file("dir-with-a-long-name/" * 6 + "file", b"long"))
        if fmt != tarfile.USTAR_FORMAT:
            tb.file("x", b"x", xattrs={"user.k": b"v", "security.capability": CAP_NET_BIND_SERVICE})
            tb.file("n" * 150, b"gnu or pax long name")
        out.append(tb.build())
    return out


SEEDS = _seeds()


def _headers(data: bytes) -> list[int]:
    """Offsets of the header blocks of a valid archive (PAX and GNU records included)."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos : pos + 512] != bytes(512):
        out.append(pos)
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0] or b"0", 8)
        pos += 512 + (size + 511) // 512 * 512 * (data[pos + 156 : pos + 157] in b"0\0xgLK7")
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> Archive:
    """A seed with a few header fields or record bytes overwritten, the checksum mostly fixed after (so
    the damage reaches past the checksum), sometimes cut short."""
    seed = draw(st.sampled_from(range(len(SEEDS))))
    raw = bytearray(SEEDS[seed])
    heads = _headers(SEEDS[seed])
    for _ in range(draw(st.integers(1, 3))):
        start = heads[draw(st.integers(0, len(heads) - 1))]
        if draw(st.integers(0, 3)) == 0 and raw[start + 156] in b"xgLK":  # inside a PAX or GNU record
            at = start + 512 + draw(st.integers(0, 511))
        else:
            off, length = _FIELDS[draw(st.sampled_from(sorted(_FIELDS)))]
            at = start + off + draw(st.integers(0, length - 1))
        value = draw(_BYTES)
        raw[at : at + len(value)] = value
        if draw(st.integers(0, 4)) != 0:
            block = raw[start : start + 512]
            _rechecksum(block)
            raw[start : start + 512] = block
    if draw(st.integers(0, 9)) == 0:
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    return Archive(raw)


@pytest.mark.parametrize("how", ["structured", "mutated"])
def test_any_archive_registers_or_is_refused_cleanly(stores: dict[str, ImageService], tmp_path: Path,
                                                     how: str) -> None:
    """Every input either becomes a layer (which exports to its DiffID) or raises a LaminaError of one
    short line, leaving no layer row and no driver file behind; never another exception."""
    strategy = _structured() if how == "structured" else _mutated()

    examples = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "120"))  # more for a longer hunt
    seen: Counter[str] = Counter()  # outcomes, printed: most inputs must get past the checksum

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=strategy)
    def check(data: Archive) -> None:
        for driver, svc in stores.items():
            try:
                layer = svc.register_layer(io.BytesIO(data))
            except LaminaError as e:
                seen[f"{driver}: {type(e).__name__}"] += 1
                assert "\n" not in e.message and len(e.message) <= MAX_MESSAGE
                assert _layer_rows(svc) == 0, (driver, e.message)
                assert _driver_files(tmp_path / driver, driver) == [], (driver, e.message)
                continue
            seen[f"{driver}: registered"] += 1
            with svc.export_layer(layer.chain_id) as s:  # checked against the DiffID as it is read
                while s.read(1 << 20):
                    pass
            svc.release_layer(layer.chain_id)
            assert _layer_rows(svc) == 0 and _driver_files(tmp_path / driver, driver) == [], driver

    check()
    print(how, dict(sorted(seen.items())))
    assert all(seen[f"{d}: registered"] for d in stores), "no input registered: the generator is broken"

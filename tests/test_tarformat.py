"""The streaming tar reader (lamina.tar.format) and exact round trips through a real vfs store."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.config import Config
from lamina.errors import ArchiveError, FormatError
from lamina.plugins.discovery import discover
from lamina.service import ImageService
from lamina.tar.compression import DiffStream
from lamina.tar.format import DIR, LNK, REG, SYM, Entry, TarReader, parse_pax
from lamina.testing import TarBuilder

BLOCK = 512
MTIME = 1_700_000_000


# -- helpers ------------------------------------------------------------------------------------------------


class Rec:
    """A recorder that keeps the raw bytes in order and notes stored payloads."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, Any]] = []

    def raw(self, data: bytes | memoryview) -> None:
        self.parts.append(("raw", bytes(data)))

    def file(self, path: str, size: int) -> None:
        self.parts.append(("file", (path, size)))

    def raw_bytes(self) -> bytes:
        return b"".join(p for k, p in self.parts if k == "raw")


def read_entries(data: bytes, *, consume: bool = True) -> tuple[list[tuple[Entry, bytes]], Rec]:
    """All entries with their payloads; payloads consumed via payload_chunks() unless ``consume`` is False."""
    rec = Rec()
    reader = TarReader(DiffStream(io.BytesIO(data)), rec)
    out: list[tuple[Entry, bytes]] = []
    while (e := reader.next()) is not None:
        payload = b""
        if consume and e.type == REG:
            payload = b"".join(reader.payload_chunks())
            rec.parts.append(("payload", payload))
            reader.record_file(e.name, e.size)
        out.append((e, payload))
    return out, rec


def one(data: bytes) -> Entry:
    entries, _ = read_entries(data)
    assert len(entries) == 1, [e.name for e, _ in entries]
    return entries[0][0]


def tar_of(*infos: tuple[tarfile.TarInfo, bytes], fmt: int = tarfile.PAX_FORMAT,
           pax_headers: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers) as tf:
        for ti, data in infos:
            if ti.isreg():
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = MTIME
    ti.uname = ti.gname = ""
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def pad(data: bytes) -> bytes:
    return data + bytes((BLOCK - len(data) % BLOCK) % BLOCK)


def pax_record(key: str, value: bytes | str) -> bytes:
    v = value.encode() if isinstance(value, str) else value
    body = f" {key}=".encode() + v + b"\n"
    length = len(body) + 1
    while length != len(body) + len(str(length)):
        length = len(body) + len(str(length))
    return str(length).encode() + body


def ext_header(records: bytes, kind: bytes = tarfile.XHDTYPE, name: str = "PaxHeader") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(records)
    return ti.tobuf(tarfile.USTAR_FORMAT) + pad(records)


def plain(ti: tarfile.TarInfo, data: bytes = b"", fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    ti.size = len(data) if ti.isreg() else 0
    return ti.tobuf(fmt) + pad(data)


END = bytes(2 * BLOCK)


def test_pax_record_helper() -> None:
    for v in ("x", "y" * 5, "z" * 90, "w" * 995):
        assert parse_pax(pax_record("path", v)) == {"path": v.encode()}


# -- names, links, numbers ----------------------------------------------------------------------------------


LONG = "/".join(["directory-with-a-long-name"] * 8) + "/file-ü-" + "n" * 150  # > 255 bytes, non-ASCII


def test_pax_long_names_and_linknames() -> None:
    data = tar_of(
        (info(LONG + "-dir", tarfile.DIRTYPE, mode=0o750), b""),
        (info(LONG, mode=0o640), b"payload"),
        (info(LONG + "-sym", tarfile.SYMTYPE, linkname="../" + "t" * 300), b""),
        (info(LONG + "-hard", tarfile.LNKTYPE, linkname=LONG), b""),
    )
    entries, _ = read_entries(data)
    (d, _), (f, payload), (s, _), (h, _) = entries
    assert (d.name.rstrip("/"), d.type, d.mode) == (LONG + "-dir", DIR, 0o750)
    assert (f.name, f.type, f.size, f.mode, payload) == (LONG, REG, 7, 0o640, b"payload")
    assert (s.name, s.type, s.linkname) == (LONG + "-sym", SYM, "../" + "t" * 300)
    assert (h.name, h.type, h.linkname, h.size) == (LONG + "-hard", LNK, LONG, 0)


def test_gnu_longname_and_longlink() -> None:
    data = tar_of(
        (info(LONG, mode=0o600), b"gnu"),
        (info(LONG + "-sym", tarfile.SYMTYPE, linkname="/" + "k" * 200), b""),
        (info("short", tarfile.LNKTYPE, linkname=LONG), b""),
        fmt=tarfile.GNU_FORMAT,
    )
    assert b"././@LongLink" in data
    entries, _ = read_entries(data)
    assert [(e.name, e.type, e.linkname, p) for e, p in entries] == [
        (LONG, REG, "", b"gnu"),
        (LONG + "-sym", SYM, "/" + "k" * 200, b""),
        ("short", LNK, LONG, b""),
    ]


def test_ustar_prefix() -> None:
    name = "/".join(["p" * 30] * 5) + "/leaf-file"  # 165 bytes: needs the prefix field
    data = tar_of((info(name), b"x"), fmt=tarfile.USTAR_FORMAT)
    assert data[345:350] == b"ppppp"  # it really went into the prefix field
    assert b"PaxHeader" not in data and b"LongLink" not in data
    e = one(data)
    assert e.name == name


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_large_ids(fmt: int) -> None:
    data = tar_of((info("f", uid=10_000_000, gid=2**31 - 5), b""), fmt=fmt)
    if fmt == tarfile.GNU_FORMAT:
        assert data[108] & 0x80 and data[116] & 0x80  # base-256 encoded numbers
    e = one(data)
    assert (e.uid, e.gid) == (10_000_000, 2**31 - 5)


def test_base256_size_and_mtime_in_gnu_header() -> None:
    ti = info("big-time", mtime=2**36 + 3)  # beyond 11 octal digits: base-256
    data = tar_of((ti, b"abc"), fmt=tarfile.GNU_FORMAT)
    assert data[136] & 0x80
    e = one(data)
    assert e.mtime_ns == (2**36 + 3) * 1_000_000_000
    assert e.size == 3


def test_names_fields() -> None:
    data = tar_of((info("own", uid=12, gid=34, uname="alice", gname="staff"), b""))
    e = one(data)
    assert (e.uid, e.gid, e.uname, e.gname) == (12, 34, "alice", "staff")


def test_devices_and_fifos() -> None:
    data = tar_of((info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
                  (info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
                  (info("pipe", tarfile.FIFOTYPE), b""))
    got = [(e.name, e.type, e.devmajor, e.devminor) for e, _ in read_entries(data)[0]]
    assert got == [("dev/null", "3", 1, 3), ("dev/sda", "4", 8, 0), ("pipe", "6", 0, 0)]


# -- extended attributes and PAX headers -------------------------------------------------------------------


def test_schily_and_libarchive_xattrs() -> None:
    raw = bytes([0, 1, 2, 255, 254, 10, 13])
    cap = bytes([0, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)  # revision 2: CAP_NET_BIND_SERVICE, permitted
    ti = info("f")
    ti.pax_headers = {
        "SCHILY.xattr.user.plain": "value",
        "LIBARCHIVE.xattr.user.with%20space": base64.b64encode(b"spaced").decode().rstrip("="),
        "LIBARCHIVE.xattr.user.binary": base64.b64encode(raw).decode(),
        "LIBARCHIVE.xattr.security.capability": base64.b64encode(cap).decode(),
    }
    e = one(tar_of((ti, b"")))
    assert e.xattrs == {
        "user.plain": b"value",
        "user.with space": b"spaced",
        "user.binary": raw,
        "security.capability": cap,
    }


def test_libarchive_xattr_unpadded_lengths() -> None:
    for value in (b"a", b"ab", b"abc", b"abcd", b"abcde"):
        ti = info("f")
        ti.pax_headers = {"LIBARCHIVE.xattr.user.v": base64.b64encode(value).decode().rstrip("=")}
        assert one(tar_of((ti, b""))).xattrs == {"user.v": value}


def test_global_pax_headers() -> None:
    # written by tarfile: one global header before everything
    data = tar_of((info("a"), b"1"), (info("b", uid=3_000_000), b"2"),
                  pax_headers={"uid": "4242", "gname": "global-group", "comment": "hello"})
    assert data[156:157] == tarfile.XGLTYPE
    entries, _ = read_entries(data)
    (a, _), (b, _) = entries
    assert (a.uid, a.gname) == (4242, "global-group")
    assert b.uid == 3_000_000  # a per-entry header beats the global one
    assert b.gname == "global-group"


def test_global_pax_header_applies_only_after_it() -> None:
    data = (plain(info("before", uid=1), b"x")
            + ext_header(pax_record("uid", "777") + pax_record("mtime", "12.5"), tarfile.XGLTYPE)
            + plain(info("after1", uid=1), b"y")
            + ext_header(pax_record("uid", "888"))
            + plain(info("after2", uid=1))
            + plain(info("after3", uid=1))
            + END)
    got = [(e.name, e.uid, e.mtime_ns) for e, _ in read_entries(data)[0]]
    assert got == [
        ("before", 1, MTIME * 10**9),
        ("after1", 777, 12_500_000_000),
        ("after2", 888, 12_500_000_000),  # the x header lasts one entry only
        ("after3", 777, 12_500_000_000),
    ]


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1700000000.5", 1_700_000_000_500_000_000),
        ("1700000000.123456789", 1_700_000_000_123_456_789),
        ("1700000000.1234567891234", 1_700_000_000_123_456_789),  # beyond ns: truncated
        ("1700000000.000000001", 1_700_000_000_000_000_001),
        ("1700000000", 1_700_000_000_000_000_000),
        ("1700000000.", 1_700_000_000_000_000_000),
        ("0.25", 250_000_000),
        ("-1.5", -1_500_000_000),
    ],
)
def test_pax_mtime_with_fractions(text: str, ns: int) -> None:
    data = ext_header(pax_record("mtime", text)) + plain(info("f"), b"z") + END
    assert one(data).mtime_ns == ns


def test_pax_mtime_from_tarfile_float() -> None:
    e = one(tar_of((info("f", mtime=1_600_000_000.75), b"")))
    assert e.mtime_ns == 1_600_000_000_750_000_000


def test_pax_size_overrides_header_size() -> None:
    ti = info("f")
    ti.size = 0
    data = ext_header(pax_record("size", "5")) + ti.tobuf(tarfile.USTAR_FORMAT) + pad(b"hello") + END
    entries, _ = read_entries(data)
    assert [(e.name, e.size, p) for e, p in entries] == [("f", 5, b"hello")]


def test_pax_records_with_binary_and_newlines_in_values() -> None:
    value = b"line1\nline2=still\x00value"
    data = ext_header(pax_record("SCHILY.xattr.user.x", value)) + plain(info("f")) + END
    assert one(data).xattrs == {"user.x": value}


def test_volume_label_is_skipped() -> None:
    v = info("MY VOLUME", b"V")
    data = tar_of((info("f"), b"x"), fmt=tarfile.GNU_FORMAT)
    data = v.tobuf(tarfile.GNU_FORMAT) + data
    assert [e.name for e, _ in read_entries(data)[0]] == ["f"]


def test_old_style_directory_with_trailing_slash() -> None:
    ti = info("olddir/", tarfile.AREGTYPE)
    e = one(plain(ti) + END)
    assert e.type == DIR


def test_every_byte_is_recorded_when_payloads_are_not_stored() -> None:
    data = tar_of((info(LONG), os.urandom(1000)), (info("d", tarfile.DIRTYPE), b""),
                  (info("e"), b""), pax_headers={"comment": "g"}) + bytes(3000)
    _, rec = read_entries(data, consume=False)
    assert rec.raw_bytes() == data


def test_every_byte_is_accounted_for_when_payloads_are_stored() -> None:
    payloads = [os.urandom(n) for n in (0, 1, 511, 512, 513, 70_000)]
    data = tar_of(*[(info(f"f{i}"), p) for i, p in enumerate(payloads)], fmt=tarfile.GNU_FORMAT) + b"trailing junk"
    entries, rec = read_entries(data)
    assert [p for _, p in entries] == payloads
    rebuilt = b"".join(p for k, p in rec.parts if k in ("raw", "payload"))
    assert rebuilt == data
    assert [p for k, p in rec.parts if k == "file"] == [(f"f{i}", len(p)) for i, p in enumerate(payloads)]


def test_no_entries() -> None:
    assert read_entries(END)[0] == []


# -- rejections ---------------------------------------------------------------------------------------------


def _reject(data: bytes, match: str | None = None) -> ArchiveError:
    with pytest.raises(ArchiveError) as ei:
        read_entries(data)
    assert isinstance(ei.value, FormatError)
    if match:
        assert match in ei.value.message
    assert "\n" not in ei.value.message
    return ei.value


# -- GNU sparse files -----------------------------------------------------------------------------------------


def _octal12(n: int) -> bytes:
    """A 12-byte number field as GNU tar writes it: octal, or base-256 when too large."""
    return b"%011o\0" % n if n < 8**11 else b"\x80" + n.to_bytes(11, "big")


def _rechecksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def old_gnu_sparse(name: str, segments: list[tuple[int, int]], realsize: int, data: bytes) -> bytes:
    """An old GNU sparse entry: type S, 4 map slots in the header, 21 in each extension block."""
    ti = info(name, tarfile.GNUTYPE_SPARSE)
    ti.size = len(data)
    head = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    slots = [_octal12(o) + _octal12(n) for o, n in segments]
    head[386 : 386 + 24 * min(4, len(slots))] = b"".join(slots[:4])
    head[482] = 1 if len(slots) > 4 else 0
    head[483:495] = _octal12(realsize)
    _rechecksum(head)
    out = bytes(head)
    rest = slots[4:]
    while rest:
        block = bytearray(BLOCK)
        chunk, rest = rest[:21], rest[21:]
        block[: 24 * len(chunk)] = b"".join(chunk)
        block[504] = 1 if rest else 0
        out += bytes(block)
    return out + pad(data)


def pax_sparse(version: str, name: str, segments: list[tuple[int, int]], realsize: int, data: bytes,
               extra: dict[str, str] | None = None) -> bytes:
    """A PAX sparse entry of GNU format 0.0, 0.1 or 1.0."""
    records = b""
    body = data
    header_name = "GNUSparseFile.0/" + name
    if version == "0.0":
        header_name = name
        records += pax_record("GNU.sparse.size", str(realsize)) + pax_record("GNU.sparse.numblocks", str(len(segments)))
        for o, n in segments:
            records += pax_record("GNU.sparse.offset", str(o)) + pax_record("GNU.sparse.numbytes", str(n))
    elif version == "0.1":
        records += (pax_record("GNU.sparse.size", str(realsize))
                    + pax_record("GNU.sparse.numblocks", str(len(segments)))
                    + pax_record("GNU.sparse.name", name)
                    + pax_record("GNU.sparse.map", ",".join(f"{o},{n}" for o, n in segments)))
    else:
        records += (pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                    + pax_record("GNU.sparse.name", name) + pax_record("GNU.sparse.realsize", str(realsize)))
        body = pad("".join(f"{x}\n" for x in [len(segments), *[v for s in segments for v in s]]).encode()) + data
    for k, v in (extra or {}).items():
        records += pax_record(k, v)
    return ext_header(records) + plain(info(header_name), body)


def sparse_entry(encoding: str, name: str, segments: list[tuple[int, int]], realsize: int, data: bytes,
                 extra: dict[str, str] | None = None) -> bytes:
    if encoding == "old-gnu":
        return old_gnu_sparse(name, segments, realsize, data)
    return pax_sparse(encoding, name, segments, realsize, data, extra)


ENCODINGS = ["old-gnu", "0.0", "0.1", "1.0"]
SEGMENTS = [(0, 3), (5000, 10), (1 << 33, 4)]  # at the start, in the middle, 8 GiB in


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("count", [3, 60], ids=["short-map", "long-map"])  # 60: extension blocks, a 1.0 map of 2
def test_sparse_entry(encoding: str, count: int) -> None:
    segments = SEGMENTS if count == 3 else [(i * 10_000, 7) for i in range(count)]
    realsize = (1 << 34) if count == 3 else 700_000
    data = bytes(range(256)) * 2
    data = data[: sum(n for _, n in segments)]
    archive = (sparse_entry(encoding, "dir/sparse", [*segments, (realsize, 0)], realsize, data)
               + plain(info("next"), b"n") + END)
    entries, rec = read_entries(archive)
    (e, payload), (after, _) = entries
    assert (e.name, e.type, e.size, e.realsize, e.apparent_size) == ("dir/sparse", REG, len(data), realsize, realsize)
    assert e.sparse == tuple(segments)  # the empty closing segment dropped
    assert payload == data and after.name == "next"
    assert b"".join(p for k, p in rec.parts if k in ("raw", "payload")) == archive  # every byte accounted for
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:  # as Python's tarfile reads it
        theirs = tf.next()
        assert theirs is not None and (theirs.name, theirs.size) == (e.name, e.realsize)
        assert [s for s in theirs.sparse or [] if s[1]] == list(e.sparse)


def test_sparse_file_of_holes_only() -> None:
    for encoding in ENCODINGS:
        e = one(sparse_entry(encoding, "h", [(1 << 40, 0)], 1 << 40, b"") + END)
        assert (e.size, e.realsize, e.sparse) == (0, 1 << 40, ())


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("segments", "realsize", "data", "words"),
    [
        ([(100, 5), (50, 5)], 1000, b"x" * 10, "overlap or are out of order"),
        ([(100, 50), (120, 5)], 1000, b"x" * 55, "overlap or are out of order"),
        ([(100, 5), (998, 5)], 1000, b"x" * 10, "beyond its real size"),
        ([(100, 5)], 1000, b"x" * 6, "its map holds 5 bytes, its data 6"),
        ([(100, 5)], (1 << 44) + 1, b"x" * 5, "real size"),
    ],
    ids=["descending", "overlapping", "beyond-real-size", "data-longer-than-map", "real-size-too-large"],
)
def test_rejects_bad_sparse_map(encoding: str, segments: list[tuple[int, int]], realsize: int, data: bytes,
                                words: str) -> None:
    err = _reject(sparse_entry(encoding, "s", segments, realsize, data) + END, "sparse file")
    assert words in err.message


@pytest.mark.parametrize(
    ("archive", "words"),
    [
        (pax_sparse("0.1", "s", [(0, 1)], 10, b"x", {"GNU.sparse.map": "0,1,5"}), "odd count"),
        (pax_sparse("0.1", "s", [(0, 1)], 10, b"x", {"GNU.sparse.map": "0,x1"}), "bad number"),
        (pax_sparse("0.1", "s", [(0, 1)], 10, b"x", {"GNU.sparse.map": "0,-1"}), "bad number"),
        (pax_sparse("0.1", "s", [(0, 1)], 10, b"x", {"GNU.sparse.numblocks": "2"}), "number of segments"),
        (pax_sparse("0.0", "s", [(0, 1)], 10, b"x", {"GNU.sparse.offset": "3"}), "do not pair up"),
        (pax_sparse("0.0", "s", [(0, 1)], 10, b"x", {"GNU.sparse.size": "1e3"}), "bad number"),
        (pax_sparse("1.0", "s", [(0, 1)], 10, b"x", {"GNU.sparse.major": "2"}), "unknown GNU sparse format"),
        (ext_header(pax_record("GNU.sparse.map", "0,1")) + plain(info("s"), b"x"), "no real size"),
        (ext_header(pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                    + pax_record("GNU.sparse.realsize", "10")) + plain(info("s"), b"1\n0\n1\n"),
         "runs past its data"),
        (ext_header(pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                    + pax_record("GNU.sparse.realsize", "10")) + plain(info("s"), pad(b"999999999\n")),
         "more than"),
        (ext_header(pax_record("GNU.sparse.major", "1") + pax_record("GNU.sparse.minor", "0")
                    + pax_record("GNU.sparse.realsize", "10")) + plain(info("s"), pad(b"1\n0\nten\n")),
         "bad number"),
        (ext_header(pax_record("GNU.sparse.size", "10") + pax_record("GNU.sparse.map", "0,0"))
         + plain(info("d", tarfile.DIRTYPE)), "not a file"),
        (ext_header(pax_record("GNU.sparse.size", "10"), tarfile.XGLTYPE) + plain(info("s"), b""), "global"),
        (ext_header(pax_record("GNU.sparse.size", "10") + pax_record("GNU.sparse.map", "0,1"))
         + old_gnu_sparse("s", [(0, 1)], 10, b"x"), "both"),
    ],
    ids=["odd-map", "bad-map-number", "negative-map-number", "numblocks", "unpaired-0.0", "bad-real-size",
         "version-2", "no-real-size", "1.0-map-past-data", "1.0-too-many-segments", "1.0-bad-number",
         "on-a-directory", "in-a-global-header", "old-gnu-and-pax"],
)
def test_rejects_malformed_sparse_headers(archive: bytes, words: str) -> None:
    err = _reject(archive + END)
    assert words in err.message, err.message


def test_rejects_old_gnu_sparse_map_cut_short() -> None:
    archive = old_gnu_sparse("s", [(i * 10, 1) for i in range(30)], 1000, b"x" * 30)
    err = _reject(archive[: 2 * BLOCK - 10], "truncated")
    assert "sparse map" in err.message
    negative = bytearray(old_gnu_sparse("s", [(0, 1)], 10, b"x")[:BLOCK])
    negative[398:410] = b"\xff" * 12  # a base-256 length of -1
    _rechecksum(negative)
    _reject(bytes(negative) + pad(b"x") + END, "overlap or are out of order")


def test_rejects_bad_checksum() -> None:
    data = bytearray(plain(info("f"), b"abc") + END)
    data[0] ^= 0x01
    _reject(bytes(data), "checksum")


def test_rejects_bad_checksum_in_later_header() -> None:
    first = plain(info("ok"), b"fine")
    data = bytearray(first + plain(info("f"), b"abc") + END)
    data[len(first) + 100] ^= 0x04  # the mode field of the second header
    _reject(bytes(data))


def test_rejects_bad_checksum_in_pax_header() -> None:
    hdr = bytearray(ext_header(pax_record("path", "x" * 200)))
    hdr[1] ^= 0x20
    _reject(bytes(hdr) + plain(info("f")) + END)


SAMPLE = (plain(info("first"), b"A" * 700) + ext_header(pax_record("path", "p/" * 149 + "pp"))  # 300 bytes
          + plain(info("second"), b"B" * 100) + END)


@pytest.mark.parametrize(
    "cut",
    [
        100,  # inside the first header
        BLOCK + 300,  # inside the first payload
        BLOCK + 700 + 100,  # inside its padding
        3 * BLOCK + 10,  # inside the PAX header block
        4 * BLOCK + 100,  # inside the PAX records
        5 * BLOCK + 200,  # inside the header the PAX records belong to
        6 * BLOCK + 50,  # inside the second payload
        6 * BLOCK + 100,  # inside the second payload's padding
        2 * BLOCK + 100,  # inside the first payload's last block
        4 * BLOCK,  # after the PAX header block, before its records
        5 * BLOCK,  # after the PAX records, before the header they belong to
    ],
)
def test_rejects_truncation(cut: int) -> None:
    assert read_entries(SAMPLE)[0]  # the whole thing is fine
    err = _reject(SAMPLE[:cut])
    assert "truncated" in err.message


@pytest.mark.parametrize("ends", [0, 1], ids=["no-end-block", "one-end-block"])
@pytest.mark.parametrize("cut", [3 * BLOCK, 7 * BLOCK], ids=["after-first", "after-second"])
def test_stream_ending_on_a_header_boundary(cut: int, ends: int) -> None:
    """What real producers write: no end-of-archive blocks, or one. The raw record is what was received."""
    data = SAMPLE[:cut] + bytes(ends * BLOCK)
    entries, rec = read_entries(data)
    assert [(e.name, p) for e, p in entries][: 1 + (cut > 3 * BLOCK)] == [
        ("first", b"A" * 700), ("p/" * 149 + "pp", b"B" * 100)][: 1 + (cut > 3 * BLOCK)]
    assert len(entries) == 1 + (cut > 3 * BLOCK)
    raw = [p for k, p in rec.parts if k in ("raw", "payload")]
    assert b"".join(raw) == data  # nothing added, nothing lost


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, b"X"])
def test_rejects_stream_ending_after_an_extended_header(kind: bytes) -> None:
    records = pax_record("path", "x") if kind in (tarfile.XHDTYPE, b"X") else b"name"
    err = _reject(plain(info("f"), b"a") + ext_header(records, kind), "truncated")
    assert "extended header" in err.message


def test_stream_ending_after_a_global_header() -> None:
    """A PAX global header is an entry of its own: the stream may end after it."""
    entries, _ = read_entries(plain(info("f"), b"a") + ext_header(pax_record("uid", "7"), tarfile.XGLTYPE))
    assert [e.name for e, _ in entries] == ["f"]


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_gnu_long_name_is_cut_at_its_first_nul(kind: bytes) -> None:
    """As GNU tar, Go's archive/tar and Python's tarfile read it."""
    long = b"d/" + b"n" * 120 + b"\0garbage after the NUL\0\0"
    ti = info("short", tarfile.SYMTYPE if kind == tarfile.GNUTYPE_LONGLINK else tarfile.REGTYPE,
              linkname="t")
    e = one(ext_header(long, kind, "././@LongLink") + plain(ti, b"x" if ti.isreg() else b"") + END)
    if kind == tarfile.GNUTYPE_LONGNAME:
        assert e.name == "d/" + "n" * 120
    else:
        assert (e.name, e.linkname) == ("short", "d/" + "n" * 120)
    with tarfile.open(fileobj=io.BytesIO(ext_header(long, kind, "././@LongLink") + plain(ti) + END)) as tf:
        theirs = tf.next()
    assert theirs is not None and (e.name, e.linkname) == (theirs.name, theirs.linkname)


def test_solaris_extended_header_is_read_as_pax() -> None:
    records = pax_record("path", "from-x-header") + pax_record("SCHILY.xattr.user.k", "v") + pax_record("uid", "42")
    e = one(ext_header(records, b"X") + plain(info("ignored"), b"data") + END)
    assert (e.name, e.uid, e.xattrs) == ("from-x-header", 42, {"user.k": b"v"})


def test_truncation_inside_gnu_longname() -> None:
    data = tar_of((info(LONG), b"x"), fmt=tarfile.GNU_FORMAT)
    _reject(data[: BLOCK + 100], "truncated")


@pytest.mark.parametrize(
    "records",
    [
        b"abc path=x\n",  # length not a number
        b"99 path=x\n",  # length beyond the data
        b"5 path=x\n",  # length shorter than the record
        b"12 path=xy\n",  # length one too long
        b"10 path=x",  # no newline at the end
        b"10 path=xx",  # length matches but the record does not end in a newline
        b"8 pathx\n",  # no '='
        b"6 =xy\n",  # empty key
        b"path=x\n",  # no length
        b"0 \n",  # zero length
        b"-5 path=x\n",
        pax_record("path", "ok") + b"garbage",
    ],
)
def test_rejects_malformed_pax_records(records: bytes) -> None:
    _reject(ext_header(records) + plain(info("f")) + END, "PAX")


@pytest.mark.parametrize(
    ("key", "value"),
    [("mtime", "yesterday"), ("mtime", "1.2.3"), ("uid", "x"), ("gid", ""), ("size", "ten"), ("uid", "-5"),
     ("LIBARCHIVE.xattr.user.x", "a")],
)
def test_rejects_bad_pax_values(key: str, value: str) -> None:
    _reject(ext_header(pax_record(key, value)) + plain(info("f")) + END)


def test_rejects_malformed_global_header() -> None:
    _reject(ext_header(b"12 uid=1\n", tarfile.XGLTYPE) + plain(info("f")) + END, "PAX")


def test_rejects_nul_in_pax_path() -> None:
    _reject(ext_header(pax_record("path", b"a\x00b")) + plain(info("f")) + END, "NUL")


def test_rejects_garbage() -> None:
    _reject(b"this is not a tar archive at all" * 20)


def test_rejects_empty_stream() -> None:
    _reject(b"", "truncated")


# -- through a real store -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> Any:
    return discover()


def leftovers(root: Path) -> list[str]:
    out = []
    for sub in ("vfs/dir", "vfs/records", "tarball/layers"):
        d = root / sub
        if d.is_dir():
            out += [f"{sub}/{n}" for n in os.listdir(d)]
    return out


REJECTED = {
    "sparse-map-beyond-real-size": (lambda: pax_sparse("1.0", "s", [(5, 10)], 10, b"x" * 10) + END),
    "checksum": (lambda: bytes([plain(info("f"), b"abc")[0] ^ 1]) + plain(info("f"), b"abc")[1:] + END),
    "truncated-payload": (lambda: SAMPLE[: BLOCK + 300]),
    "truncated-header": (lambda: SAMPLE[:100]),
    "no-end-marker-inside-padding": (lambda: SAMPLE[: 6 * BLOCK + 100]),
    "malformed-pax": (lambda: ext_header(b"99 path=x\n") + plain(info("f")) + END),
}


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_store_rejects_and_stays_unchanged(tmp_path: Path, catalog: Any, driver: str, case: str) -> None:
    root = tmp_path / "root"
    with ImageService.open(Config(root=root, runroot=tmp_path / "run", driver=driver), catalog=catalog) as svc:
        ok = svc.register_layer(io.BytesIO(TarBuilder().file("keep", b"k").build()))
        before = leftovers(root)
        with pytest.raises(ArchiveError):
            svc.register_layer(io.BytesIO(REJECTED[case]()))
        assert [x.chain_id for x in svc.layers()] == [ok.chain_id]
        assert leftovers(root) == before


def test_fractional_mtime_reaches_the_tree(tmp_path: Path, catalog: Any) -> None:
    data = (ext_header(pax_record("mtime", "1700000000.123456789")) + plain(info("f"), b"z")
            + ext_header(pax_record("mtime", "1600000000.5")) + plain(info("l", tarfile.SYMTYPE, linkname="f"))
            + END)
    with ImageService.open(Config(root=tmp_path / "r", runroot=tmp_path / "x", driver="vfs"),
                           catalog=catalog) as svc:
        layer = svc.register_layer(io.BytesIO(data))
        with svc.mounted_layer(layer.chain_id) as path:
            assert os.lstat(Path(path, "f")).st_mtime_ns == 1_700_000_000_123_456_789
            assert os.lstat(Path(path, "l")).st_mtime_ns == 1_600_000_000_500_000_000
        with svc.export_layer(layer.chain_id) as s:
            assert s.read() == data


def test_libarchive_xattr_reaches_the_tree(tmp_path: Path, catalog: Any) -> None:
    ti = info("f")
    ti.pax_headers = {"LIBARCHIVE.xattr.user.with%3Dequals": base64.b64encode(b"\x00bin").decode().rstrip("=")}
    data = tar_of((ti, b"data"))
    with ImageService.open(Config(root=tmp_path / "r", runroot=tmp_path / "x", driver="vfs"),
                           catalog=catalog) as svc:
        layer = svc.register_layer(io.BytesIO(data))
        with svc.mounted_layer(layer.chain_id) as path:
            assert os.getxattr(Path(path, "f"), "user.with=equals") == b"\x00bin"
        with svc.export_layer(layer.chain_id) as s:
            assert s.read() == data


# -- property: random trees round-trip byte-exactly and unpack faithfully -----------------------------------

FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
FILE_MODES = [0o644, 0o600, 0o755, 0o700, 0o444, 0o4755, 0o2711, 0o640]
DIR_MODES = [0o755, 0o700, 0o750, 0o1777, 0o2775]
IDS = [0, 1, 1000, 65534]


def climbs_out(head: str, target: str) -> bool:
    if target.startswith("/"):
        return False
    depth = 0
    for c in (head.split("/") if head else []) + target.split("/"):
        if c in ("", "."):
            continue
        depth += -1 if c == ".." else 1
        if depth < 0:
            return True
    return False


@st.composite
def trees(draw: st.DrawFn, fmt: str) -> list[dict[str, Any]]:
    """Entries in archive order: parents before children, hard links after their targets."""
    short = fmt == "ustar"
    alphabet = st.sampled_from([*"abcdefxyz0123456789_-.", "é", "ß", " "])
    component = st.text(alphabet, min_size=1, max_size=8 if short else 12).filter(
        lambda s: s not in (".", "..") and not s.startswith(".wh."))
    if not short:
        # now and then a very long component (> 100 bytes): PAX/GNU long-name records; at most 127 characters,
        # so that one of two-byte characters stays within a filesystem's 255-byte name limit
        component = st.one_of(component, component.map(lambda s: (s * 60)[:127]))
    ids = st.sampled_from(IDS + ([] if short else [3_000_000]))
    mtimes = st.integers(0, 2**33 - 1)
    dirs = [""]
    files: list[str] = []
    taken: set[str] = {""}
    out: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 14))):
        kinds = ["dir", "file", "file", "symlink"] + (["hardlink"] if files else [])
        kind = draw(st.sampled_from(kinds))
        parents = [d for d in dirs if d.count("/") < (2 if short else 3)]
        parent = draw(st.sampled_from(parents))
        name = draw(component)
        path = f"{parent}/{name}" if parent else name
        if path in taken or path.casefold() in {t.casefold() for t in taken}:
            continue
        taken.add(path)
        item: dict[str, Any] = {"path": path, "kind": kind, "uid": draw(ids), "gid": draw(ids),
                                "mtime": draw(mtimes)}
        if kind == "dir":
            item["mode"] = draw(st.sampled_from(DIR_MODES))
            dirs.append(path)
        elif kind == "file":
            item["mode"] = draw(st.sampled_from(FILE_MODES))
            item["data"] = draw(st.one_of(st.binary(max_size=600), st.binary(min_size=1000, max_size=5000)))
            files.append(path)
        elif kind == "symlink":
            target = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                                  min_size=1, max_size=60 if short else 200))
            if short and len(target.encode()) > 100:
                target = target[:20]
            if climbs_out(parent, target):
                target = "/" + target  # relative targets leading above the root are refused (README)
            item["target"] = target
        else:
            item["target"] = draw(st.sampled_from(files))
        out.append(item)
    return out


def build(items: list[dict[str, Any]], fmt: str) -> bytes:
    tb = TarBuilder(fmt=FORMATS[fmt])
    for it in items:
        kw = {"uid": it["uid"], "gid": it["gid"], "mtime": it["mtime"]}
        if it["kind"] == "dir":
            tb.dir(it["path"], mode=it["mode"], **kw)
        elif it["kind"] == "file":
            tb.file(it["path"], it["data"], mode=it["mode"], **kw)
        elif it["kind"] == "symlink":
            tb.symlink(it["path"], it["target"], **kw)
        else:
            tb.hardlink(it["path"], it["target"], **kw)
    return tb.build()


def expected_tree(items: list[dict[str, Any]]) -> tuple[dict[str, tuple[Any, ...]], set[frozenset[str]]]:
    as_root = os.geteuid() == 0
    out: dict[str, tuple[Any, ...]] = {}
    groups: dict[str, set[str]] = {}
    by_path = {it["path"]: it for it in items}
    for it in items:
        p, kind = it["path"], it["kind"]
        owner = (it["uid"], it["gid"]) if as_root else None
        if kind == "dir":
            out[p] = ("dir", it["mode"], owner, None, it["mtime"])
        elif kind == "file":
            out[p] = ("file", it["mode"], owner, it["data"], it["mtime"])
            groups.setdefault(p, {p})
        elif kind == "symlink":
            out[p] = ("symlink", None, owner, it["target"], it["mtime"])
        else:
            src = by_path[it["target"]]
            out[p] = out[src["path"]]
            groups[src["path"]].add(p)
    return out, {frozenset(g) for g in groups.values() if len(g) > 1}


def actual_tree(root: str) -> tuple[dict[str, tuple[Any, ...]], set[frozenset[str]]]:
    as_root = os.geteuid() == 0
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            owner = (st_.st_uid, st_.st_gid) if as_root else None
            mtime = st_.st_mtime_ns // 10**9
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), owner, None, mtime)
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), owner, Path(full).read_bytes(), mtime)
                inodes.setdefault(st_.st_ino, set()).add(rel)
            elif stat.S_ISLNK(st_.st_mode):
                out[rel] = ("symlink", None, owner, os.readlink(full), mtime)
            else:
                out[rel] = ("other", st_.st_mode, owner, None, mtime)
    return out, {frozenset(g) for g in inodes.values() if len(g) > 1}


@contextlib.contextmanager
def scratch_store(catalog: Any) -> Iterator[ImageService]:
    d = tempfile.mkdtemp(prefix="lamina-prop-")
    try:
        with ImageService.open(Config(root=Path(d, "root"), runroot=Path(d, "run"), driver="vfs"),
                               catalog=catalog) as svc:
            yield svc
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_random_trees_round_trip(fmt: str, catalog: Any) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(items=trees(fmt))
    def check(items: list[dict[str, Any]]) -> None:
        data = build(items, fmt)
        with scratch_store(catalog) as svc:
            layer = svc.register_layer(io.BytesIO(data))
            with svc.export_layer(layer.chain_id) as s:
                assert s.read() == data
            with svc.mounted_layer(layer.chain_id) as path:
                assert actual_tree(path) == expected_tree(items)

    check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 600_000), max_size=12), st.integers(0, 2**32))
def test_background_hash_matches_sha256_whatever_the_pieces(sizes: list[int], seed: int) -> None:
    """Small pieces are batched, large ones passed through: the digest is the stream's sha256 all the same."""
    import hashlib
    import random

    from lamina.tar.compression import BackgroundHash

    data = random.Random(seed).randbytes(sum(sizes))
    bg = BackgroundHash()
    pos = 0
    for n in sizes:
        piece = data[pos : pos + n]
        bg.update(memoryview(piece) if n % 2 else piece)
        pos += n
    assert bg.hexdigest() == hashlib.sha256(data).hexdigest()


def test_background_hash_takes_empty_pieces() -> None:
    """An empty piece (an empty file's kept payload, say) is data like any other, not the end of the stream."""
    import hashlib

    from lamina.tar.compression import BackgroundHash

    big = bytes(range(256)) * 2048  # large enough to be handed over unbatched
    bg = BackgroundHash()
    for piece in (b"a", b"", big, b"", big, b"z"):
        bg.update(piece)
    assert bg.hexdigest() == hashlib.sha256(b"a" + big + big + b"z").hexdigest()

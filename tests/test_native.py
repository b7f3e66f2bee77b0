"""The C fast path of the apply engine (lamina.fs._native) against the Python path it stands in for.

Every test applies the same stream twice, once with ``LAMINA_NATIVE=1`` and once with ``LAMINA_NATIVE=0``,
and requires the same outcome: the same tree (modes, owners, times, contents, link targets, hard-link
counts, xattrs), the same size and entry count, a record that re-exports the stream byte for byte -- or
the same error. Streams are fed in pieces of varying size so entries straddle the decoder's chunks.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.errors import LaminaError
from lamina.fs import apply as apply_mod
from lamina.fs.apply import apply_recorded, native_enabled
from lamina.tar.compression import DiffStream
from lamina.tar.split import assemble

MTIME = 1_700_000_000


class Pieces(io.RawIOBase):
    """A source that returns at most ``piece`` bytes per read."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._piece = piece

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        take = self._piece if n < 0 else min(n, self._piece)
        out = bytes(self._data[self._pos : self._pos + take])
        self._pos += len(out)
        return out


def dump(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = p.lstat()
            if stat.S_ISLNK(st_.st_mode):
                body: Any = os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = None
            xattrs = sorted((k, os.getxattr(p, k, follow_symlinks=False))
                            for k in os.listxattr(p, follow_symlinks=False))
            nlink = 0 if stat.S_ISDIR(st_.st_mode) else st_.st_nlink
            mtime: int | str = st_.st_mtime_ns
            if stat.S_ISDIR(st_.st_mode) and abs(st_.st_mtime_ns - time.time_ns()) < 3600 * 10**9:
                mtime = "now"  # a directory the archive needed but did not list: made during the apply
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_uid, st_.st_gid, mtime, nlink, body, xattrs)
    return out


def outcome(data: bytes, where: Path, native: bool, piece: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("LAMINA_NATIVE", "1" if native else "0")
    tree = where / ("native" if native else "python")
    tree.mkdir()
    record = where / (tree.name + ".rec")
    try:
        result = apply_recorded(DiffStream(Pieces(data, piece)), tree, record)
    except LaminaError as e:
        return ("error", type(e).__name__, str(e))
    exported = b"".join(assemble(record, tree))
    return ("ok", result.size, result.entries, exported == data, dump(tree))


def same_outcome(data: bytes, where: Path, monkeypatch: pytest.MonkeyPatch, piece: int = 1 << 20) -> Any:
    fast = outcome(data, where, True, piece, monkeypatch)
    slow = outcome(data, where, False, piece, monkeypatch)
    assert fast == slow
    if fast[0] == "ok":
        assert fast[3], "the record does not reproduce the stream"
    return fast


needs_native = pytest.mark.skipif(apply_mod._native is None, reason="lamina.fs._native is not built (no C compiler)")


def test_native_module_is_built_in_ci() -> None:
    if apply_mod._native is None:
        if os.environ.get("CI") == "true":
            pytest.fail("lamina.fs._native was not built: CI must exercise the C fast path")
        pytest.skip("lamina.fs._native is not built (no C compiler)")
    assert native_enabled() or os.environ.get("LAMINA_NATIVE") == "0"


def add(tf: tarfile.TarFile, name: str, kind: str = "file", data: bytes = b"", **kw: Any) -> None:
    ti = tarfile.TarInfo(name)
    ti.mtime = kw.pop("mtime", MTIME)
    ti.mode = kw.pop("mode", 0o644 if kind == "file" else 0o755)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind == "file":
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    else:
        tf.addfile(ti)


def build(entries: list[tuple[str, str, bytes, dict[str, Any]]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, data, kw in entries:
            add(tf, name, kind, data, **kw)
    return buf.getvalue()


@needs_native
def test_plain_tree_takes_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries: list[tuple[str, str, bytes, dict[str, Any]]] = [("d", "dir", b"", {})]
    entries += [(f"d/f{i}", "file", os.urandom(i * 37), {"uid": i % 3, "gid": i % 5}) for i in range(200)]
    entries += [(f"d/l{i}", "symlink", b"", {"linkname": f"f{i}"}) for i in range(50)]
    data = build(entries)
    calls = []
    real_run = apply_mod._native.run  # type: ignore[union-attr]

    def counting(*a: Any, **kw: Any) -> Any:
        result = real_run(*a, **kw)
        calls.append(result[2])
        return result

    monkeypatch.setattr(apply_mod._native, "run", counting)
    kind, size, count, exact, _tree = same_outcome(data, tmp_path, monkeypatch)
    assert kind == "ok" and exact and count == 251
    assert sum(calls) >= 240, "the fast path applied too few of the plain entries"
    assert size == sum(len(d) for _, k, d, _ in entries if k == "file")


@needs_native
@pytest.mark.parametrize("piece", [1 << 20, 700, 512, 4097])
def test_entries_straddling_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    entries = [(f"f{i}", "file", os.urandom((i * 311) % 3000), {"mode": 0o4755 if i % 7 == 0 else 0o640})
               for i in range(60)]
    kind, *_ = same_outcome(build(entries), tmp_path, monkeypatch, piece)
    assert kind == "ok"


@needs_native
@pytest.mark.parametrize(
    ("label", "entries"),
    [
        ("symlink out of the root", [("a/l", "symlink", b"", {"linkname": "../../etc"})]),
        ("symlink up but inside", [("a/b/l", "symlink", b"", {"linkname": "../../x"})]),
        ("absolute symlink", [("l", "symlink", b"", {"linkname": "/etc/passwd"})]),
        ("dot-dot name", [("a/../../x", "file", b"x", {})]),
        ("dot-dot inside", [("a/../x", "file", b"x", {})]),
        ("whiteout", [("a", "file", b"1", {}), (".wh.a", "file", b"", {})]),
        ("bad whiteout", [(".wh..", "file", b"", {})]),
        ("file replaced", [("a", "file", b"1", {}), ("a", "file", b"22", {})]),
        ("symlink replaced by file", [("a", "symlink", b"", {"linkname": "x"}), ("a", "file", b"2", {})]),
        ("file through symlinked dir", [("d", "dir", b"", {}), ("s", "symlink", b"", {"linkname": "/d"}),
                                        ("s/f", "file", b"in d", {})]),
        ("file over dir", [("a/b", "file", b"1", {}), ("a", "file", b"2", {})]),
        ("hard link", [("a", "file", b"1", {}), ("b", "hardlink", b"", {"linkname": "a"})]),
        ("leading slash and dots", [("/./x//y/./z", "file", b"1", {})]),
        ("fractional mtime", [("f", "file", b"1", {"pax_headers": {"mtime": "1700000000.123456789"}})]),
        ("negative mtime", [("f", "file", b"1", {"pax_headers": {"mtime": "-5.5"}})]),
        ("xattr", [("f", "file", b"1", {"pax_headers": {"SCHILY.xattr.user.k": "v"}})]),
        ("overlay xattr", [("f", "file", b"1", {"pax_headers": {"SCHILY.xattr.trusted.overlay.opaque": "y"}})]),
        ("pax size", [("f", "file", b"12345", {"pax_headers": {"size": "5"}})]),
        ("pax uid", [("f", "file", b"1", {"pax_headers": {"uid": "123456789", "gid": "7"}})]),
        ("long name", [("d/" + "n" * 200, "file", b"1", {})]),
        ("long link", [("l", "symlink", b"", {"linkname": "t" * 300})]),
        ("non-utf8", [("caf\udce9", "file", b"1", {})]),
        ("trailing slash file", [("f/", "file", b"1", {})]),
        ("empty symlink", [("l", "symlink", b"", {"linkname": ""})]),
        ("fifo", [("p", "fifo", b"", {})]),
        ("set-id", [("s", "file", b"1", {"mode": 0o6755, "uid": 1, "gid": 2})]),
        ("opaque marker after an implicit dir", [("a/f", "file", b"1", {}), (".wh..wh..opq", "file", b"", {})]),
        ("opaque marker after a file", [("d", "dir", b"", {}), ("d/f", "file", b"1", {}), ("x", "file", b"2", {}),
                                        ("d/.wh..wh..opq", "file", b"", {})]),
        ("whiteout of the directory just written", [("d/f", "file", b"1", {}), (".wh.d", "file", b"", {}),
                                                    ("e", "file", b"2", {})]),
        ("nested whiteout", [("p/q/f", "file", b"1", {}), ("p/.wh.q", "file", b"", {}), ("p/r", "file", b"2", {})]),
        ("symlink over a directory by a dotted name", [("a", "file", b"1", {}),
                                                       ("d/s", "symlink", b"", {"linkname": "a"}),
                                                       ("x/../d", "symlink", b"", {"linkname": "x/y"}),
                                                       ("d2", "file", b"2", {})]),
        ("file replaces a nested directory", [("x", "dir", b"", {}), ("x/a", "dir", b"", {}),
                                              ("x/a/f", "file", b"1", {}), ("x/a", "file", b"2", {})]),
        ("symlink replaces a nested directory", [("x", "dir", b"", {}), ("x/a", "dir", b"", {}),
                                                 ("x/a/f", "file", b"1", {}),
                                                 ("x/a", "symlink", b"", {"linkname": "f2"}),
                                                 ("x/g", "file", b"3", {})]),
        ("writes through a symlink that replaced a directory", [("d/f", "file", b"1", {}), ("y", "dir", b"", {}),
                                                               ("x/y", "dir", b"", {}),
                                                               ("d", "symlink", b"", {"linkname": "x/y"}),
                                                               ("d/g", "file", b"2", {})]),
        ("mtime past 2286", [("m", "file", b"1", {"mtime": 10_000_000_000})]),
        ("mtime past 2603", [("m", "file", b"1", {"mtime": 20_000_000_000})]),
        ("pax mtime past 2603", [("m", "file", b"1", {"pax_headers": {"mtime": "20000000000"}})]),
        ("uid beyond 32 bits", [("f", "file", b"1", {"pax_headers": {"uid": "4294967301"}})]),
        ("uid -1 as 32 bits", [("f", "file", b"1", {"pax_headers": {"uid": "4294967295", "gid": "7"}})]),
        ("sticky dir then files", [("t", "dir", b"", {"mode": 0o1777}), ("t/f", "file", b"1", {"mode": 0o600})]),
        ("name component of 256 bytes", [("d/" + "c" * 256, "file", b"1", {})]),
        ("symlink target of 4096 bytes", [("s", "symlink", b"", {"linkname": "t" * 4096})]),
        ("symlink target of 4095 bytes", [("s", "symlink", b"", {"linkname": "t" * 4095})]),
    ],
)
def test_edge_cases_match(label: str, entries: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        try:
            data = build(entries, fmt)
        except ValueError:
            continue  # not expressible in this format
        where = tmp_path / str(fmt)
        where.mkdir()
        same_outcome(data, where, monkeypatch)


def _rechecksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


_names = st.lists(st.sampled_from(["a", "b", "c", ".", "..", "", ".wh.a", ".wh..wh..opq", "caf\udce9"]),
                  min_size=1, max_size=3).map("/".join)
_entry = st.tuples(
    _names,
    st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink"]),
    st.sampled_from([b"", b"x", b"y" * 511, b"z" * 512, b"w" * 1500]),
    st.fixed_dictionaries({
        "mode": st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000]),
        "uid": st.sampled_from([0, 0, 1000]),
        "gid": st.sampled_from([0, 0, 1000]),
        "linkname": st.sampled_from(["a", "b/c", "/a", "../a", "../../a", ""]),
    }),
)


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(_entry, min_size=1, max_size=12),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    piece=st.sampled_from([1 << 20, 512, 1000, 3]),
    mutation=st.none() | st.tuples(st.integers(0, 11), st.integers(0, 511), st.integers(0, 255)),
)
def test_random_streams_match(entries: list[Any], fmt: int, piece: int, mutation: Any, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Random entries (collisions, whiteouts, links, odd names) and damaged headers: same outcome both ways."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        offsets = []
        for name, kind, data, kw in entries:
            if not name:
                continue
            offsets.append(buf.tell())
            kw = dict(kw)
            if kind not in ("symlink", "hardlink"):
                kw.pop("linkname")
            add(tf, name, kind, data, **kw)
    raw = bytearray(buf.getvalue())
    if mutation is not None and offsets:
        which, at, value = mutation
        start = offsets[which % len(offsets)]
        if not 148 <= at < 156:
            raw[start + at] = value
            block = raw[start : start + 512]
            _rechecksum(block)
            raw[start : start + 512] = block
    where = tmp_path / os.urandom(6).hex()
    where.mkdir()
    try:
        same_outcome(bytes(raw), where, monkeypatch, piece)
    finally:
        shutil.rmtree(where)


@needs_native
def test_setgid_directory_replaced_during_the_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A set-gid directory's group goes to new files; once the layer replaced the directory, it no longer does."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    data = build([("d/x", "file", b"1", {"uid": 1000, "gid": 1000}), ("e/z", "file", b"2", {}),
                  (".wh.d", "file", b"", {}), ("d", "dir", b"", {}), ("d/y", "file", b"3", {"uid": 0, "gid": 0})])
    results = []
    for native in (True, False):
        monkeypatch.setenv("LAMINA_NATIVE", "1" if native else "0")
        tree = tmp_path / ("native" if native else "python")
        tree.mkdir()
        os.chown(tree, 0, 1234)
        os.chmod(tree, 0o2755)
        (tree / "d").mkdir()  # a plain directory (it would inherit set-gid from the root: cleared)
        os.chown(tree / "d", 0, 0)
        os.chmod(tree / "d", 0o755)
        apply_recorded(DiffStream(io.BytesIO(data)), tree, tmp_path / f"{tree.name}.rec")
        results.append(dump(tree))
        assert (tree / "d" / "y").stat().st_gid == 0
    assert results[0] == results[1]

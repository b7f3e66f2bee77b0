"""Kernel copies of file ranges (lamina.fs.kcopy): every fallback the kernel forces gives the same bytes, and
the hash of a written file taken from its mapping is its sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lamina.fs.kcopy import FileWriter, MappedHash, ShortSource, Span, copy_file

DATA = os.urandom(3 << 20) + b"tail"


def _source(where: Path) -> int:
    p = where / "src"
    p.write_bytes(DATA)
    return os.open(p, os.O_RDONLY)


def _write(w: FileWriter, src: int) -> None:
    w.write(b"head:")
    w.put(Span(src, 5, 100, "src"))
    w.put(b"|")
    w.put(Span(src, 1 << 20, len(DATA) - (1 << 20), "src"))  # to the end
    w.put(Span(src, 0, 0, "src"))


EXPECTED = b"head:" + DATA[5:105] + b"|" + DATA[1 << 20:]


@pytest.mark.parametrize(("dest", "method"), [
    ("same", "copy_file_range"),  # a file on the source's filesystem
    ("append", "read/write"),  # O_APPEND: copy_file_range says EBADF, sendfile EINVAL
])
def test_spans_are_copied_exactly(tmp_path: Path, dest: str, method: str) -> None:
    src = _source(tmp_path)
    flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if dest == "append" else 0)
    out = os.open(tmp_path / "out", flags, 0o600)
    try:
        w = FileWriter(out)
        _write(w, src)
        assert w.method == method
        assert w.written == len(EXPECTED)
    finally:
        os.close(out)
        os.close(src)
    assert (tmp_path / "out").read_bytes() == EXPECTED


def test_another_filesystem_falls_back_to_sendfile(tmp_path: Path) -> None:
    shm = Path("/dev/shm")  # tmpfs, where the tests' temporary directories are on disk
    src = _source(tmp_path)
    out = shm / f"lamina-kcopy-{os.getpid()}"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = FileWriter(fd)
        _write(w, src)
        assert w.method in ("sendfile", "copy_file_range")  # copy_file_range where the kernel allows it
        assert out.read_bytes() == EXPECTED
    finally:
        os.close(fd)
        os.close(src)
        out.unlink()


def test_a_pipe_gets_the_bytes_by_sendfile(tmp_path: Path) -> None:
    src = _source(tmp_path)
    r, wfd = os.pipe()
    try:
        w = FileWriter(wfd)
        w.put(Span(src, 7, 1000, "src"))
        assert w.method == "sendfile"
        assert os.read(r, 2000) == DATA[7:1007]
    finally:
        for fd in (r, wfd, src):
            os.close(fd)


def test_a_short_source_is_reported(tmp_path: Path) -> None:
    src = _source(tmp_path)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = FileWriter(out)
        with pytest.raises(ShortSource) as e:
            w.copy(Span(src, len(DATA) - 10, 20, "src"))
        assert e.value.copied == 10 and w.written == 10
        assert copy_file(src, out, "src") == len(DATA)
    finally:
        os.close(out)
        os.close(src)
    assert (tmp_path / "out").read_bytes() == DATA[-10:] + DATA


@pytest.mark.parametrize("start", [0, 5, 4096 + 7])
def test_mapped_hash_is_the_sha256_of_what_was_written(tmp_path: Path, start: int) -> None:
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * start)
        h = MappedHash(fd, start)
        h.WINDOW = 64 << 10  # many windows, none of them aligned
        w = FileWriter(fd)
        for i in range(0, len(DATA), 100_003):
            w.write(DATA[i:i + 100_003])
            h.advance(start + w.written)
        assert h.hexdigest(start + w.written) == hashlib.sha256(DATA).hexdigest()
        h.close()
        empty = MappedHash(fd, start + w.written)
        assert empty.hexdigest(start + w.written) == hashlib.sha256().hexdigest()
        stopped = MappedHash(fd, 0)  # a failed copy: the thread stops without finishing
        stopped.advance(len(DATA))
        stopped.close()
    finally:
        os.close(fd)


def test_mapped_hash_needs_a_readable_file(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data")
        h = MappedHash(fd, 0)
        with pytest.raises(PermissionError):
            h.hexdigest(4)
    finally:
        os.close(fd)


def test_mapped_hash_reads_back_where_files_cannot_be_mapped() -> None:
    with open("/proc/version", "rb") as f:  # procfs: no mapping (its files' sizes are 0)
        data = f.read()
        h = MappedHash(f.fileno(), 0)
        assert h.hexdigest(len(data)) == hashlib.sha256(data).hexdigest()


def test_a_source_that_cannot_be_read_is_told_from_the_output(tmp_path: Path) -> None:
    """A span whose file cannot be read (here: a directory) fails as the source's error, not the output's;
    an exact stream then says which layer file it could not read."""
    from lamina.errors import ExportError
    from lamina.fs.kcopy import SourceError
    from lamina.tar.split import ExactTarStream

    src = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(SourceError):
            FileWriter(out).copy(Span(src, 0, 10, "a-dir"))
        stream = ExactTarStream(iter([b"head", Span(src, 0, 10, "etc/a-dir")]), None)
        with pytest.raises(ExportError, match="cannot read 'etc/a-dir' back from the layer"):
            stream.copy_to(out)
    finally:
        os.close(out)
        os.close(src)


def test_tree_copies_use_the_kernel_copy_and_its_fallbacks(tmp_path: Path) -> None:
    """vfs's tree copy (lamina.fs.treecopy) copies file bodies through FileWriter: the same bytes whatever the
    method, holes kept, and a method that failed for one file not tried for the next."""
    from lamina.fs.treecopy import CopyStats, copy_data, copy_tree

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(DATA)
    (src / "empty").write_bytes(b"")
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"x")
    (tmp_path / "dst").mkdir()
    method = copy_tree(str(src), str(tmp_path / "dst"))
    assert method in ("reflink", "copy_file_range", "sendfile", "read/write")
    for name in ("big", "empty", "sparse"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes(), name
    assert os.stat(tmp_path / "dst" / "sparse").st_blocks * 512 < 1 << 20
    stats = CopyStats()
    stats.method = "copy_file_range"
    with open(src / "big", "rb") as s, open(tmp_path / "append", "ab") as d:  # O_APPEND: reads and writes
        copy_data(s.fileno(), d.fileno(), os.fstat(s.fileno()), stats)
    assert stats.method == "read/write" and (tmp_path / "append").read_bytes() == DATA

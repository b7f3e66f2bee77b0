"""Layers far deeper or wider than usual, taken through a whole store: apply, exact export, changes, a
whiteout by the next layer, a container edited deep inside the tree, its commit, and removal.

Shared by ``tests/test_big_trees.py`` (CI sizes: a 5,000-level directory chain, tens of thousands of
entries) and ``bench/wide.py`` (full sizes: a million entries). Everything is checked against what the
tree must be, so the same code is the test and the benchmark; each step's time is returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lamina.fs.ops import normalize, open_below
from lamina.service import ImageService
from lamina.tar.compression import DiffStream
from lamina.tar.format import REG, TarReader

MTIME = 1_700_000_000
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Shape:
    """A layer's tar (written by :func:`chain_tar` or :func:`wide_tar`) and what it must hold."""

    tar: Path
    sha256: str
    paths: list[str]  # every entry, layer-relative
    top: str  # the top-level directory holding everything
    edit_dir: list[str]  # the directory a container edits, as names from the root
    gone: str  # a file of edit_dir the container deletes
    rewritten: str  # one it rewrites


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self.tf = tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.paths: list[str] = []

    def dir(self, path: str) -> None:
        self._add(path, tarfile.DIRTYPE, b"", 0o755)

    def file(self, path: str, data: bytes) -> None:
        self._add(path, tarfile.REGTYPE, data, 0o644)

    def _add(self, path: str, kind: bytes, data: bytes, mode: int) -> None:
        ti = tarfile.TarInfo(path)
        ti.type = kind
        ti.mode = mode
        ti.mtime = MTIME
        ti.uname = ti.gname = ""
        ti.size = len(data)
        self.tf.addfile(ti, _Bytes(data) if data else None)
        self.paths.append(path)

    def close(self) -> None:
        self.tf.close()


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out


def _shape(tar: Path, w: _Writer, top: str, edit_dir: list[str], gone: str, rewritten: str) -> Shape:
    w.close()
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Shape(tar, h.hexdigest(), w.paths, top, edit_dir, gone, rewritten)


def chain_tar(tar: Path, depth: int) -> Shape:
    """A chain of ``depth`` directories ``d/d/.../d`` with two files at the bottom: paths ~2 x ``depth``
    bytes long, far beyond PATH_MAX for 5,000 levels."""
    with open(tar, "wb") as out:
        w = _Writer(out)
        path = ""
        for _ in range(depth):
            path = f"{path}/d" if path else "d"
            w.dir(path)
        w.file(f"{path}/f", b"bottom f\n")
        w.file(f"{path}/g", b"bottom g\n")
        return _shape(tar, w, "d", ["d"] * depth, "f", "g")


def wide_tar(tar: Path, entries: int, width: int = 0) -> Shape:
    """``entries`` entries under ``w/``: empty files (width, not data, is what counts here) in directories
    of ``width`` files (0: all of them in ``w`` itself)."""
    with open(tar, "wb") as out:
        w = _Writer(out)
        w.dir("w")
        left = entries - 1
        sub = 0
        while left > 0:
            here = "w"
            if width and left > 0:
                here = f"w/s{sub:05d}"
                w.dir(here)
                left -= 1
                sub += 1
            n = min(left, width) if width else left
            for i in range(n):
                w.file(f"{here}/f{i:07d}", b"")
            left -= n
        edit = ["w"] if not width else ["w", "s00000"]
        return _shape(tar, w, "w", edit, "f0000000", "f0000001")


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        self.steps[name] = round(time.monotonic() - t, 2)


def descend(root: str, names: list[str]) -> int:
    """An fd of the directory ``names`` below ``root``, opened one name at a time (no long path)."""
    fd = os.open(root, _DIR)
    try:
        return open_below(fd, names)
    finally:
        os.close(fd)


def export_sha256(svc: ImageService, chain: str) -> str:
    h = hashlib.sha256()
    with svc.export_layer(chain) as s:
        while chunk := s.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def exported_names(svc: ImageService, chain: str) -> set[str]:
    """The (normalized) entry names of a layer's export, read with lamina's own tar parser."""
    with svc.export_layer(chain) as s:
        reader = TarReader(DiffStream(s))
        names = set()
        while (e := reader.next()) is not None:
            names.add(normalize(e.name))
            if e.type == REG:
                for _ in reader.payload_chunks():
                    pass
    return names


def _tar_of(entries: list[tuple[str, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    w = _Writer(buf)
    for name, data in entries:
        w.file(name, data)
    w.close()
    return buf.getvalue()


def exercise(svc: ImageService, shape: Shape, containers: bool = True) -> dict[str, float]:
    """Take ``shape`` through the store ``svc`` and check every result; returns each step's seconds."""
    import io

    t = Timings()
    with t.step("apply"), open(shape.tar, "rb") as f:
        img = svc.import_image(f, "big:1")
    chain = img.chain[-1]
    layer = svc.get_layer(chain)
    assert layer.diff_id == f"sha256:{shape.sha256}", "the DiffID is not the tar's sha256"
    with t.step("export"):
        assert export_sha256(svc, chain) == shape.sha256, "the export is not the original tar"
    with t.step("changes"):
        got = svc.layer_changes(chain)
        want = sorted("/" + p for p in shape.paths)
        assert [c.kind for c in got] == ["A"] * len(want), "a base layer's changes are all additions"
        assert [c.path for c in got] == want, "the changes do not list the layer's entries"
    with t.step("whiteout"):
        # the next layer deletes everything: a whiteout of the top directory
        wo = svc.register_layer(io.BytesIO(_tar_of([(f".wh.{shape.top}", b"")])), chain)
        assert [(c.path, c.kind) for c in svc.layer_changes(wo.chain_id)] == [(f"/{shape.top}", "D")]
        assert "sha256:" + export_sha256(svc, wo.chain_id) == wo.diff_id
        svc.release_layer(wo.chain_id)
    if containers:
        with t.step("container"):
            c = svc.create_container("big:1")
        with t.step("edit"), svc.perform_with_base_fs(c.id) as root:
            fd = descend(root, shape.edit_dir)
            try:
                os.unlink(shape.gone, dir_fd=fd)
                wfd = os.open(shape.rewritten, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=fd)
                os.write(wfd, b"rewritten, longer than before\n")
                os.close(wfd)
                wfd = os.open("new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
                os.write(wfd, b"new\n")
                os.close(wfd)
            finally:
                os.close(fd)
        edit = "/".join(shape.edit_dir)
        dirs = ["/".join(shape.edit_dir[: i + 1]) for i in range(len(shape.edit_dir))]
        with t.step("container changes"):
            got_c = [(ch.path, ch.kind) for ch in svc.changes(c.id)]
            want_c = sorted([("/" + d, "C") for d in dirs]
                            + [(f"/{edit}/{shape.gone}", "D"), (f"/{edit}/{shape.rewritten}", "C"),
                               (f"/{edit}/new", "A")])
            assert got_c == want_c, f"container changes: {got_c[-5:]} (of {len(got_c)})"
        with t.step("commit"):
            new = svc.commit_image(c.id, "big:2")
        top = svc.get_layer(new.chain[-1])
        assert "sha256:" + export_sha256(svc, top.chain_id) == top.diff_id
        assert exported_names(svc, top.chain_id) == {
            *dirs, f"{edit}/.wh.{shape.gone}", f"{edit}/{shape.rewritten}", f"{edit}/new"}
        with t.step("remove container"):
            svc.remove_container(c.id)
        svc.image_delete("big:2")
    with t.step("remove"):
        svc.image_delete("big:1")
    assert svc.layers() == [], "layers left after removing every image"
    with t.step("disk usage"):
        svc.layer_disk_usage()
    return t.steps


def driver_leftovers(root: Path, driver: str) -> list[str]:
    """What a driver keeps on disk for layers (should be nothing once every layer is gone)."""
    if driver == "vfs":
        return sorted(os.listdir(root / "vfs" / "dir"))
    if driver == "tarball":
        return sorted(os.listdir(root / "tarball" / "layers"))
    home = root / "overlay"
    return sorted([n for n in os.listdir(home) if n not in ("l", "mode", ".probe-ok") and not n.startswith(".lamina-")]
                  + os.listdir(home / "l"))


def unmount_below(path: Path) -> None:
    """Unmount whatever a failed run left mounted below ``path``."""
    import subprocess

    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(f"{path}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, check=False)

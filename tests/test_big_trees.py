"""Depth and width: nothing in lamina recurses on a tree's depth or keeps a descriptor per level.

A 5,000-level directory chain (paths of 10,000 bytes, far beyond PATH_MAX) and a layer of tens of
thousands of entries in one directory go through apply, exact export, changes, a whiteout by the next
layer, a container edited at the bottom of the tree, its commit and removal, on real stores (overlay with
real kernel mounts). ``bench/wide.py`` runs the same code with a million entries. The tree helpers of
``lamina.fs.ops`` are also tested directly, under a descriptor limit far below the depth.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from big_trees import chain_tar, descend, driver_leftovers, exercise, export_sha256, unmount_below, wide_tar

from lamina.config import Config
from lamina.fs.ops import DirStack, Root, rmtree
from lamina.service import ImageService
from lamina.testing import TarBuilder, require_root, require_tool

DEPTH = 5000
WIDE = {"vfs": 10_000, "overlay": 50_000, "tarball": 50_000}  # vfs copies the whole tree for every new layer


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # pytest's own clean-up of old temporary directories recurses: leave nothing deep behind
    unmount_below(tmp_path)
    for p in list(tmp_path.iterdir()):
        rmtree(p)


@contextlib.contextmanager
def fd_limit(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open(work: Path, driver: str) -> ImageService:
    if driver == "overlay":
        require_root()
    return ImageService.open(Config(root=work / "root", runroot=work / "run", driver=driver))


def make_chain(top: Path, depth: int) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if i % 100 == 0:
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=nfd))
        os.close(fd)
        fd = nfd
    os.close(fd)


# -- the whole store ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", ["vfs", "overlay", "tarball"])
def test_a_5000_level_chain_through_the_store(work: Path, driver: str) -> None:
    shape = chain_tar(work / "chain.tar", DEPTH)
    with _open(work, driver) as svc:
        steps = exercise(svc, shape, containers=driver != "tarball")
    assert driver_leftovers(work / "root", driver) == []
    print(driver, steps)


@pytest.mark.parametrize("driver", ["vfs", "overlay", "tarball"])
def test_a_wide_layer_through_the_store(work: Path, driver: str) -> None:
    shape = wide_tar(work / "wide.tar", WIDE[driver])
    with _open(work, driver) as svc:
        steps = exercise(svc, shape, containers=driver != "tarball")
    assert driver_leftovers(work / "root", driver) == []
    print(driver, steps)


def test_a_deep_chain_whited_out_with_few_descriptors(work: Path) -> None:
    """The reported case (a RecursionError): a chain 1,200 levels deep whited out by the next layer, here
    under a descriptor limit far below its depth."""
    shape = chain_tar(work / "chain.tar", 1200)
    with _open(work, "vfs") as svc, fd_limit(400):  # the apply engine caches up to 256
        with open(shape.tar, "rb") as f:
            base = svc.register_layer(f)
        top = svc.register_layer(io.BytesIO(TarBuilder().whiteout("d").build()), base.chain_id)
        with svc.mounted_layer(top.chain_id) as p:
            assert os.listdir(p) == []
        assert "sha256:" + export_sha256(svc, top.chain_id) == top.diff_id
        svc.release_layer(top.chain_id)
        svc.release_layer(base.chain_id)
    assert driver_leftovers(work / "root", "vfs") == []


# -- the tree helpers ----------------------------------------------------------------------------------------


def test_rmtree_of_a_deep_tree_with_few_descriptors(work: Path) -> None:
    top = work / "t"
    top.mkdir()
    make_chain(top, DEPTH)
    with fd_limit(64):
        rmtree(top)
    assert not top.exists()


def test_dirstack_reopens_closed_directories_and_notices_a_move(work: Path) -> None:
    top = work / "t"
    top.mkdir()
    make_chain(top, 300)
    tfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with DirStack(tfd, window=4) as stack:
            idents = []
            for _ in range(300):
                st = os.fstat(stack.push("d"))
                idents.append((st.st_dev, st.st_ino))
            assert stack.depth == 300
            for i in range(299, 0, -1):
                stack.pop()
                st = os.fstat(stack.fd)
                assert (st.st_dev, st.st_ino) == idents[i - 1]
            for _ in range(299):
                stack.push("d")
            # Meanwhile the subtree below level 100 moves out of it, and level 100 itself is renamed with
            # another directory made in its place: going back up from 101, ``..`` is no longer level 100
            # and the name leads to the newcomer; the walk must notice rather than go on in either.
            parent = descend(str(top), ["d"] * 99)
            os.rename("d/d", "moved", src_dir_fd=parent, dst_dir_fd=tfd)
            os.rename("d", "old", src_dir_fd=parent, dst_dir_fd=parent)
            os.mkdir("d", dir_fd=parent)
            os.close(parent)
            with pytest.raises(FileNotFoundError, match="moved"):
                for _ in range(299):
                    stack.pop()
            assert stack.depth == 100
    finally:
        os.close(tfd)


def test_root_resolves_deep_paths_from_what_it_resolved_before(work: Path) -> None:
    top = work / "t"
    top.mkdir()
    make_chain(top, DEPTH)
    os.symlink("/" + "/".join(["d"] * 10), top / "link")  # absolute: read inside the root
    with fd_limit(400), Root(str(top)) as root:  # its cache holds up to 256
        path = ""
        for _ in range(DEPTH):
            path = f"{path}/d" if path else "d"
            fd, real = root.dir(path)
            assert real == path
            assert os.path.exists(f"/proc/self/fd/{fd}")
        # deepest first (as the apply engine finishes directories), then through the symlink
        for i in range(DEPTH, 0, -50):
            fd, real = root.dir("/".join(["d"] * i))
            assert real == "/".join(["d"] * i)
        fd, real = root.dir("link/" + "/".join(["d"] * 20) + "/../../d")
        assert real == "/".join(["d"] * 29)


def test_rmtree_without_root_opens_up_deep_unreadable_directories(work: Path) -> None:
    """As a user: directories without read, write or search permission, thousands of levels down."""
    require_tool("unshare")
    script = """
import os, sys
from lamina.fs.ops import rmtree
top = sys.argv[1]
os.mkdir(top)
fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
for i in range(3000):
    os.mkdir("d", dir_fd=fd)
    nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    if i % 500 == 0:
        os.close(os.open("ro", os.O_WRONLY | os.O_CREAT, 0o400, dir_fd=nfd))
    if i % 7 == 0:
        os.fchmod(fd, (0o500, 0o300, 0o000)[i % 3])  # no write, no read, nothing
    os.close(fd)
    fd = nfd
os.close(fd)
rmtree(top)
print(os.geteuid(), os.path.exists(top))
"""
    os.chmod(work, 0o777)
    proc = subprocess.run(["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c",
                           script, str(work / "tree")], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.split() == [b"65534", b"False"]

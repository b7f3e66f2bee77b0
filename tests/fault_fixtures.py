"""Fault tests' fixtures: small real filesystems that fill up or turn read-only, and the images written
onto them.

A pytest plugin (``pytest_plugins`` in ``tests/conftest.py``). :func:`loop_ext4` makes and mounts a sparse
ext4 image (4 KiB blocks, like a real disk, and no blocks reserved for root, so root sees the disk full
like anyone else); :func:`fill` leaves a given number of free bytes (a preallocated file, so filling costs
no writes); :func:`remount` switches the mount between read-write and read-only.

``fault_images`` (session): :class:`FaultImages`, made by skopeo and umoci from root filesystem tars of
random bytes: ``keep:1`` (1 MiB) and ``big:1`` (``BIG`` bytes) as OCI layouts, ``big:1`` as a
docker-archive and in the test registry.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_fixtures import Registry, push_with_skopeo

from image_fixtures import build_rootfs_layout, copy_image
from lamina.testing import TarBuilder, require_root, require_tool

BIG = 6 << 20  # big:1's one file: random, so that gzip keeps it as big


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")


@contextlib.contextmanager
def loop_ext4(where: Path, size_mib: int) -> Iterator[Path]:
    """An ext4 filesystem of ``size_mib`` MiB mounted at ``where/disk`` for the block; skips (fails under
    CI=true) without root or the tools."""
    require_root()
    mkfs = require_tool("mkfs.ext4")
    require_tool("mount")
    image = where / "disk.img"
    mnt = where / "disk"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    _run(mkfs, "-q", "-F", "-b", "4096", "-m", "0", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        for attempt in range(50):
            proc = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
            if proc.returncode == 0 or not os.path.ismount(mnt):
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
        image.unlink(missing_ok=True)


def free_bytes(mnt: Path) -> int:
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def fill(mnt: Path, leave: int) -> Path:
    """Take all of ``mnt``'s free space but about ``leave`` bytes with one file; returns it (unlink it to
    give the space back)."""
    filler = mnt / "filler"
    with open(filler, "ab") as f:
        take = free_bytes(mnt) - leave
        if take > 0:
            os.posix_fallocate(f.fileno(), f.seek(0, os.SEEK_END), take)
    return filler


def remount(mnt: Path, *, read_only: bool) -> None:
    _run("mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(mnt))


def random_rootfs(path: Path, name: str, size: int, seed: int) -> Path:
    """A root filesystem tar holding ``data/<name>``: ``size`` random bytes from ``seed``."""
    tb = TarBuilder().dir("data").file(f"data/{name}", random.Random(seed).randbytes(size))
    path.write_bytes(tb.build())
    return path


@dataclass(frozen=True)
class FaultImages:
    keep: Path  # OCI layout, keep:1 (1 MiB): what a store holds before the fault
    big_rootfs: Path  # a root filesystem tar of BIG random bytes
    big_oci: Path  # big:1 as an OCI layout (gzip)
    big_docker: Path  # big:1 as a docker-archive (example.com/big:1)
    big_remote: str  # big:1 in the test registry (host/faults/big:1)


@pytest.fixture(scope="session")
def fault_images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> FaultImages:
    d = tmp_path_factory.mktemp("fault-images")
    keep = d / "keep"
    build_rootfs_layout(random_rootfs(d / "keep.tar", "keep", 1 << 20, 1), keep, "keep:1", "/bin/true")
    big_rootfs = random_rootfs(d / "big.tar", "big", BIG, 2)
    big_oci = d / "big"
    build_rootfs_layout(big_rootfs, big_oci, "big:1", "/bin/true")
    big_docker = d / "big-docker.tar"
    copy_image(f"oci:{big_oci}:big:1", f"docker-archive:{big_docker}:example.com/big:1")
    dest = push_with_skopeo(f"oci:{big_oci}:big:1", registry, "faults/big:1")
    return FaultImages(keep, big_rootfs, big_oci, big_docker, dest.removeprefix("docker://"))

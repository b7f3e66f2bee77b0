"""Small real filesystems for fault tests: a loop-mounted ext4 image that can be filled up or remounted
read-only.

:func:`loop_ext4` makes and mounts a sparse image (4 KiB blocks, like a real disk, and no blocks reserved
for root, so root sees the disk full like anyone else); :func:`fill` leaves a given number of free bytes
(a preallocated file, so filling costs no writes); :func:`remount` switches the mount between read-write
and read-only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from lamina.testing import require_root, require_tool


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

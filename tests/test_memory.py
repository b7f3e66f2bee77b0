"""Applying a layer costs bounded memory, whatever the size of the files in it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_large_file_applies_in_bounded_memory(tmp_path: Path, driver: str) -> None:
    size = 512 * 1024 * 1024
    big = tmp_path / "big"
    with open(big, "wb") as f:  # sparse: cheap to make, but every byte goes through lamina
        f.truncate(size)
    tar = tmp_path / "big.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(big, "big")
    big.unlink()
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
           "--driver", driver, "layer", "add", str(tar)]
    out = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, check=True, text=True)
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB for a {size >> 20} MiB file"
    assert os.path.getsize(tar) > size

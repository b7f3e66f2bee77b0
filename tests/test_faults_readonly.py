"""A read-only store: the filesystem holding the root (and the run root, or not) remounted read-only.

Every verb that only reads works and gives what it gives on the writable store; every verb that writes
fails with one line saying the store is read-only. Once the filesystem is writable again the store is
whole (``check_store``).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fault_fixtures import FaultImages, loop_ext4, remount
from store_invariants import check_store

# The verbs that write, each refused in a read-only store (``box`` is a container, ``big:1`` an image).
WRITES = [
    ["load", "-q", "-i", "{big_oci}"],
    ["pull", "{big_remote}"],
    ["import", "{big_rootfs}", "new:1"],
    ["tag", "big:1", "other:1"],
    ["untag", "big:1", "big:1"],
    ["rmi", "--force", "big:1"],
    ["layer", "add", "{big_rootfs}"],
    ["layer", "rm", "{top}"],
    ["create", "big:1"],
    ["commit", "box", "new:2"],
    ["rm", "--force", "box"],
    ["mount", "box"],
]


def _lamina(root: Path, run: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "lamina", "--root", str(root), "--runroot", str(run), *args]
    return subprocess.run(cmd, capture_output=True, timeout=300)


def _ok(root: Path, run: Path, *args: str) -> bytes:
    proc = _lamina(root, run, *args)
    assert proc.returncode == 0, (args, proc.stderr.decode())
    return proc.stdout


def _reads(root: Path, run: Path, out: Path, top: str) -> dict[str, bytes]:
    """What every reading verb shows; the saved archives by their hashes (a tree by its files' hashes)."""
    shown = {
        " ".join(args): _ok(root, run, *args)
        for args in (["--format", "json", "images"], ["inspect", "big:1"], ["inspect", "example.com/big:1"],
                     ["--format", "json", "layers"], ["--format", "json", "history", "big:1"],
                     ["--format", "json", "ps", "-a"],  # JSON: tables show times relative to now
                     ["system", "check", "--quick"])
    }
    assert shown["system check --quick"] == b"No problems found\n"
    _ok(root, run, "layer", "export", top, "-o", str(out / "layer.tar"))
    shown["layer export"] = (out / "layer.tar").read_bytes()
    _ok(root, run, "save", "-o", str(out / "save.tar"), "big:1", "example.com/big:1")
    shown["save"] = hashlib.sha256((out / "save.tar").read_bytes()).digest()
    # example.com/big:1 came from a docker-archive: an OCI layout of it has its layer compressed anew
    _ok(root, run, "save", "--format", "oci-dir", "-o", str(out / "oci"), "example.com/big:1", "big:1")
    for p in sorted((out / "oci").rglob("*")):
        if p.is_file():
            shown[f"oci {p.relative_to(out / 'oci')}"] = hashlib.sha256(p.read_bytes()).digest()
    return shown


@pytest.mark.parametrize(("where", "driver"), [("root-and-runroot", "vfs"), ("root-only", "overlay")])
def test_read_only_store_reads_and_refuses_writes(
    tmp_path: Path, fault_images: FaultImages, where: str, driver: str
) -> None:
    with loop_ext4(tmp_path, 64) as disk:
        root = disk / "root"
        run = disk / "run" if where == "root-and-runroot" else tmp_path / "run"
        _ok(root, run, "--driver", driver, "load", "-q", "-i", str(fault_images.big_oci))
        _ok(root, run, "load", "-q", "-i", str(fault_images.big_docker))  # same image, another name
        _ok(root, run, "create", "--name", "box", "big:1")
        # big:1's one layer, with a reference of its own that a `layer rm` could drop
        top = _ok(root, run, "layer", "add", str(fault_images.big_rootfs)).decode().strip()

        remount(disk, read_only=True)
        if where == "root-only":
            shutil.rmtree(run)  # a new run root, as after a reboot: nothing of it can be written under the root
        try:
            (tmp_path / "ro").mkdir()
            seen = _reads(root, run, tmp_path / "ro", top)
            for args in WRITES:
                args = [a.format(top=top, big_oci=fault_images.big_oci, big_remote=fault_images.big_remote,
                                 big_rootfs=fault_images.big_rootfs) for a in args]
                proc = _lamina(root, run, *args)
                err = proc.stderr.decode()
                assert proc.returncode == 1, (args, err)
                assert err.count("\n") == 1 and " is read-only" in err and "internal error" not in err, (args, err)
                if where == "root-and-runroot":
                    assert err == f"Error: store {root} is read-only: its file system is mounted read-only\n", err
        finally:
            remount(disk, read_only=False)
        (tmp_path / "rw").mkdir()
        assert _reads(root, run, tmp_path / "rw", top) == seen
        assert check_store(root, run, driver) == []


def test_read_only_run_root_alone(tmp_path: Path, fault_images: FaultImages) -> None:
    """A run root that takes no writes (and so no mount references): images can still change; mounts cannot."""
    with loop_ext4(tmp_path, 16) as disk:
        root = tmp_path / "root"
        run = disk / "run"
        _ok(root, run, "--driver", "vfs", "load", "-q", "-i", str(fault_images.keep))
        _ok(root, run, "create", "--name", "box", "keep:1")
        remount(disk, read_only=True)
        try:
            _ok(root, run, "tag", "keep:1", "other:1")
            assert b"other" in _ok(root, run, "images")
            proc = _lamina(root, run, "mount", "box")
            assert proc.returncode == 1
            assert proc.stderr.decode() == f"Error: run root {run} is read-only: its file system is mounted read-only\n"
        finally:
            remount(disk, read_only=False)
        assert check_store(root, run, "vfs") == []

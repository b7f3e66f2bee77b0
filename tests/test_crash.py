"""Crash safety and concurrent use of one store, with real processes and SIGKILL."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lamina_cli
from lamina.service import ImageService
from lamina.testing import TarBuilder


def _big_tar(tmp_path: Path, n: int = 400, size: int = 256 * 1024) -> Path:
    tb = TarBuilder()
    for i in range(n):
        tb.file(f"d{i % 20}/f{i}", hashlib.sha256(str(i).encode()).digest() * (size // 32))
    p = tmp_path / "big.tar"
    p.write_bytes(tb.build())
    return p


def _driver_leftovers(root: Path, driver: str) -> list[str]:
    """What the driver keeps (vfs: trees, tarball: streams) and the tar-split records lamina keeps."""
    base = root / "root" / driver
    out = []
    for d in (base / "dir", base / "records", base / "layers", root / "root" / "tar-split"):
        if d.exists():
            out.extend(os.listdir(d))
    return out


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_sigkill_during_layer_add_leaves_nothing(tmp_path: Path, driver: str) -> None:
    tar = _big_tar(tmp_path)
    data = tar.read_bytes()
    lamina_cli("--driver", driver, "layers", root=tmp_path)  # create the store
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
           "layer", "add", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])  # half the stream: the apply is under way and waits for more
    proc.stdin.flush()
    deadline = time.time() + 30
    while time.time() < deadline and not _driver_leftovers(tmp_path, driver):
        time.sleep(0.05)
    assert _driver_leftovers(tmp_path, driver), "the apply never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the next command finds a consistent store: no visible layer, leftovers cleaned
    out = lamina_cli("layers", "-q", root=tmp_path)
    assert out.stdout.strip() == b""
    assert _driver_leftovers(tmp_path, driver) == []
    again = lamina_cli("layer", "add", str(tar), root=tmp_path)
    assert again.stdout.strip() == ("sha256:" + hashlib.sha256(data).hexdigest()).encode()


def test_sigkill_at_random_points_keeps_store_consistent(tmp_path: Path) -> None:
    tar = _big_tar(tmp_path, n=200, size=64 * 1024)
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
           "layer", "add", str(tar)]
    for delay in (0.05, 0.15, 0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with ImageService.open(root=tmp_path / "root", runroot=tmp_path / "run") as svc:
            layers = svc.layers()
            assert len(layers) <= 1
            on_disk = set(_driver_leftovers(tmp_path, "vfs"))
            expected = {x.cache_id for x in layers} | {f"{x.cache_id}.tsr" for x in layers}
            assert on_disk == expected
            for layer in layers:  # whatever committed is complete and exact
                with svc.export_layer(layer.chain_id) as s:
                    assert "sha256:" + hashlib.sha256(s.read()).hexdigest() == layer.diff_id
                svc.release_layer(layer.chain_id)


def test_concurrent_processes_register_same_layer(tmp_path: Path) -> None:
    tar = _big_tar(tmp_path, n=100, size=32 * 1024)
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
           "layer", "add", str(tar)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1
    with ImageService.open(root=tmp_path / "root", runroot=tmp_path / "run") as svc:
        [layer] = svc.layers()
        assert layer.refs == 4
    assert sorted(_driver_leftovers(tmp_path, "vfs")) == sorted([layer.cache_id, f"{layer.cache_id}.tsr"])


def test_live_owner_work_is_not_reclaimed(tmp_path: Path) -> None:
    """A second process opening the store must not clean up an apply that is still running."""
    tar = _big_tar(tmp_path)
    data = tar.read_bytes()
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    cmd = [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
           "layer", "add", "-"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    deadline = time.time() + 30
    while time.time() < deadline and not _driver_leftovers(tmp_path, "vfs"):
        time.sleep(0.05)
    lamina_cli("layers", root=tmp_path)  # opens the store, runs recovery
    proc.stdin.write(data[len(data) // 2 :])
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout.read().strip() == ("sha256:" + hashlib.sha256(data).hexdigest()).encode()

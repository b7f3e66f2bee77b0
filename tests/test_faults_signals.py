"""SIGINT and SIGTERM during long operations, with real processes.

The process must stop, undo what it started (no half-written layer, partial blob, lease or output left:
``check_store`` finds the store whole at once, before any other command could recover it), print one
line and exit with 128 + the signal's number. A signal is sent once the operation is under way: the test
stops the process (SIGSTOP) as soon as its work shows on disk, sends the signal, and lets it go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_fixtures import Registry, push_with_skopeo
from store_invariants import check_store

from conftest import lamina_cli
from lamina.testing import TarBuilder

HUGE = "example.com/huge:1"


def _huge_layer() -> bytes:
    """A 100 MiB layer tar of 400 files: long enough to apply that a signal lands in the middle."""
    tb = TarBuilder()
    for i in range(400):
        tb.file(f"d{i % 20}/f{i}", hashlib.sha256(str(i).encode()).digest() * (256 * 1024 // 32))
    return tb.build()


@dataclass(frozen=True)
class Huge:
    layer: Path  # the layer tar
    archive: Path  # a docker-archive of the one-layer image HUGE
    remote: str  # the image in the test registry


def _docker_archive(dest: Path, layer: bytes) -> None:
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [HUGE], "Layers": ["layer/layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as t:
        for name, data in ((config_name, config), ("layer/layer.tar", layer), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, _Reader(data))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else self._pos + n
        out = bytes(self._view[self._pos:end])
        self._pos += len(out)
        return out


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Huge:
    d = tmp_path_factory.mktemp("huge")
    layer = _huge_layer()
    (d / "layer.tar").write_bytes(layer)
    _docker_archive(d / "huge.tar", layer)
    dest = push_with_skopeo(f"docker-archive:{d / 'huge.tar'}", registry, "faults/huge:1")
    return Huge(d / "layer.tar", d / "huge.tar", dest.removeprefix("docker://"))


def _cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(store / "root"), "--runroot", str(store / "run"), *args]


def _layer_dirs(store: Path) -> set[str]:
    d = store / "root" / "vfs" / "dir"
    return set(os.listdir(d)) if d.is_dir() else set()


def _written(d: Path) -> int:
    """Bytes in the files of ``d`` (a save's partial output)."""
    total = 0
    for p in d.iterdir():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            continue
    return total


def _stop_when(proc: subprocess.Popen[bytes], under_way: Callable[[], bool], what: str) -> None:
    """SIGSTOP ``proc`` as soon as ``under_way()``; fails if it ended first."""
    deadline = time.monotonic() + 60
    while not under_way():
        assert proc.poll() is None, f"{what} ended before the signal: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"{what} never got under way"
        time.sleep(0.001)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, f"{what} ended before the signal"


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> str:
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    return err.decode()


SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_layer_add(tmp_path: Path, huge: Huge, sig: signal.Signals) -> None:
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    data = huge.layer.read_bytes()
    proc = subprocess.Popen(_cmd(tmp_path, "layer", "add", "-"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) // 2])  # the apply is under way and waits for the rest
    proc.stdin.flush()
    _stop_when(proc, lambda: bool(_layer_dirs(tmp_path)), "layer add")
    assert _signal(proc, sig) == f"Error: interrupted by {sig.name}\n"
    assert _layer_dirs(tmp_path) == set()
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []
    assert lamina_cli("layers", "-q", root=tmp_path).stdout == b""


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_load(tmp_path: Path, huge: Huge, sig: signal.Signals) -> None:
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    proc = subprocess.Popen(_cmd(tmp_path, "load", "-q", "-i", str(huge.archive)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _stop_when(proc, lambda: bool(_layer_dirs(tmp_path)), "load")
    assert _signal(proc, sig) == f"Error: interrupted by {sig.name}\n"
    assert _layer_dirs(tmp_path) == set()
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []
    assert lamina_cli("images", "-q", root=tmp_path).stdout == b""
    lamina_cli("load", "-q", "-i", str(huge.archive), root=tmp_path)  # and it loads when let be


def test_sigterm_during_pull(tmp_path: Path, huge: Huge) -> None:
    lamina_cli("--driver", "vfs", "layers", root=tmp_path)
    proc = subprocess.Popen(_cmd(tmp_path, "pull", huge.remote), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _stop_when(proc, lambda: bool(_layer_dirs(tmp_path)), "pull")
    assert _signal(proc, signal.SIGTERM) == "Error: interrupted by SIGTERM\n"
    assert _layer_dirs(tmp_path) == set()
    assert not any((tmp_path / "root" / "content" / "ingest").iterdir())
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []
    assert lamina_cli("images", "-q", root=tmp_path).stdout == b""


def test_sigint_during_save(tmp_path: Path, huge: Huge) -> None:
    lamina_cli("--driver", "vfs", "load", "-q", "-i", str(huge.archive), root=tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(_cmd(tmp_path, "save", "-o", str(out / "saved.tar"), HUGE), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _stop_when(proc, lambda: _written(out) > (8 << 20), "save")
    assert _signal(proc, signal.SIGINT) == "Error: interrupted by SIGINT\n"
    assert list(out.iterdir()) == []  # no half-written archive
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []


def test_an_interrupt_in_a_service_block_leaves_nothing(tmp_path: Path) -> None:
    """A KeyboardInterrupt (or a CLI's Interrupted) leaving ``with ImageService.open()`` finishes off what
    this process had under way in the store, as the next process would for a dead one."""
    from lamina import ImageService

    with pytest.raises(KeyboardInterrupt), ImageService.open(root=tmp_path / "root", runroot=tmp_path / "run",
                                                             driver="vfs") as svc:
        layer = svc.register_layer(io.BytesIO(TarBuilder().file("a", b"a").build()))
        lease = svc.store.lease()  # one the interrupt kept from ending
        svc.layer_store.lease(layer.chain_id, lease)
        lease.blob("sha256:" + "0" * 64)
        raise KeyboardInterrupt
    assert check_store(tmp_path / "root", tmp_path / "run", "vfs") == []

"""One download per blob (issue 15): pulls that need the same blob at the same time fetch it once, and a
download cut short by SIGKILL carries on from its partial file with ``Range``."""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from registry_fixtures import Registry, inspect_remote

from conftest import lamina_cli
from lamina import ImageService
from lamina.config import Config
from lamina.errors import DigestMismatch
from lamina.store.content import ContentStore
from lamina.testing import TarBuilder

BIG = 64 << 20


pytestmark = pytest.mark.usefixtures("isolated_auth")


# -- the content store's side, in process ----------------------------------------------------------------
class _Source:
    """A blob's bytes from a file, counting what was asked of it (the reads a registry would serve)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.served = 0
        self.offsets: list[int] = []
        self.lock = threading.Lock()

    def open_at(self, offset: int) -> io.BytesIO:
        with self.lock:
            self.offsets.append(offset)
            self.served += len(self.data) - offset
        time.sleep(0.05)  # long enough for the others to queue behind the first
        return io.BytesIO(self.data[offset:])


def _blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _partial(store: ContentStore, digest: str, data: bytes) -> Path:
    """A partial download of ``digest`` holding ``data``, as one cut short leaves it."""
    store.partial.mkdir(exist_ok=True)
    partial = store.partial / digest.replace(":", "-")
    partial.write_bytes(data)
    return partial


def test_threads_wanting_one_blob_fetch_it_once(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data, digest = _blob(3 << 20)
    src = _Source(data)
    read_back: list[bytes] = []

    def want() -> None:
        with store.download(digest, len(data), "test blob", src.open_at) as d:
            d.fetch()
        read_back.append(store.read(digest))

    threads = [threading.Thread(target=want) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert src.offsets == [0] and src.served == len(data)
    assert read_back == [data] * 4
    assert list(store.partial.iterdir()) == []  # neither partial file nor lock left


def test_a_partial_download_is_resumed_and_a_wrong_one_dropped(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    data, digest = _blob(1 << 20)
    _partial(store, digest, data[:300_000])
    src = _Source(data)
    with store.download(digest, len(data), "test blob", src.open_at) as d:
        assert d.read(100_000) == data[:100_000]  # replayed from the partial file
        d.fetch()
        assert d.resumed_at == 300_000
    assert src.offsets == [300_000] and store.read(digest) == data
    # a partial file whose bytes are not the blob's: the digest check fails, and the file goes
    other, other_digest = _blob(1 << 20)
    partial = _partial(store, other_digest, b"x" * 1000)
    with pytest.raises(DigestMismatch, match="resumed at byte 1000"), \
            store.download(other_digest, len(other), "test blob", _Source(other).open_at) as d:
        d.fetch()
    assert not partial.exists() and not store.exists(other_digest)
    with store.download(other_digest, len(other), "test blob", _Source(other).open_at) as d:
        d.fetch()
    assert store.read(other_digest) == other


def test_reads_fill_across_the_partial_files_end_and_drop_forgets(tmp_path: Path) -> None:
    """A reader sniffing magic bytes gets them whole where replayed bytes end and new ones begin; bytes that
    fed a failure the network did not cause (a tar that does not apply) are dropped, not resumed from."""
    store = ContentStore(tmp_path)
    data, digest = _blob(1 << 16)
    partial = _partial(store, digest, data[:1])
    with store.download(digest, len(data), "test blob", _Source(data).open_at) as d:
        assert d.read(8) == data[:8]
        d.drop()
    assert not partial.exists() and not store.exists(digest)


def test_a_layer_streamed_from_a_download_that_does_not_verify_is_not_committed(tmp_path: Path) -> None:
    """A gzip layer whose header alone differs from the blob's (the same tar, so the DiffID matches; a mirror
    serving it): the digest fails at the blob's last byte, inside the apply, so no layer is committed, and
    neither the partial file nor its lock is left."""
    import gzip

    tar = TarBuilder().file("f", bytes(range(256)) * 4096).build()
    good = gzip.compress(tar, mtime=0)
    bad = bytearray(good)
    bad[9] ^= 0xFF  # the OS byte
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs")) as svc:
        images = svc.image_store
        with images.store.lease() as lease:
            with pytest.raises(DigestMismatch, match="does not match its digest"), \
                    images.content.download(digest, len(bad), "layer", _Source(bytes(bad)).open_at) as d:
                images.layers.register(d, None, expected_diff_id=diff_id, lease=lease)
            assert not d.complete
        assert svc.layers() == [] and not images.content.exists(digest)
        assert list(images.content.partial.iterdir()) == []
        with images.store.lease() as lease, \
                images.content.download(digest, len(good), "layer", _Source(good).open_at) as d:
            assert images.layers.register(d, None, expected_diff_id=diff_id, lease=lease).diff_id == diff_id
        assert images.content.read(digest) == good


# -- pulls in several processes against a real registry -------------------------------------------------
def _push_two_images_sharing_a_big_layer(tmp: Path, registry: Registry, repo: str) -> str:
    """``repo/a:1`` and ``repo/b:1``: one big random layer below a small one of their own. Returns the
    big layer's blob digest on the registry."""
    scratch = tmp / "scratch"
    big = TarBuilder().file("big", os.urandom(BIG)).build()
    with ImageService.open(Config(root=scratch / "root", runroot=scratch / "run", driver="vfs")) as svc:
        base = svc.import_image(io.BytesIO(big), f"{repo}/base:1").id
        for name in ("a", "b"):
            c = svc.create_container(base)
            with svc.perform_with_base_fs(c.id) as root:
                Path(root, name).write_bytes(name.encode() * 100)
            svc.commit_image(c.id, f"{registry.host}/{repo}/{name}:1")
            svc.remove_container(c.id)
    for name in ("a", "b"):
        lamina_cli("--driver", "vfs", "push", f"{registry.host}/{repo}/{name}:1", root=scratch)
    layers = [inspect_remote(registry, f"{repo}/{n}:1")["manifest"]["layers"] for n in ("a", "b")]
    assert layers[0][0]["digest"] == layers[1][0]["digest"] and layers[0][1] != layers[1][1]
    return str(layers[0][0]["digest"])


def _blob_gets(log: str, digest: str) -> list[tuple[int, int]]:
    """(status, bytes sent) of each GET of the blob in the registry's access log."""
    pattern = re.compile(r'"GET /v2/[^ ]+/blobs/' + re.escape(digest) + r' HTTP/[0-9.]+" (\d{3}) (\d+)')
    return [(int(m.group(1)), int(m.group(2))) for m in pattern.finditer(log)]


def _pull_argv(tmp: Path, ref: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"),
            "--driver", "vfs", "pull", "-q", ref]


def test_two_pulls_at_once_fetch_a_shared_layer_once(tmp_path: Path, registry: Registry) -> None:
    big = _push_two_images_sharing_a_big_layer(tmp_path, registry, "once")
    since = registry.log_size()
    procs = [subprocess.Popen(_pull_argv(tmp_path, f"{registry.host}/once/{n}:1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for n in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    time.sleep(0.2)  # the access log line is written as the response ends
    gets = _blob_gets(registry.log_text(since), big)
    assert len(gets) == 1 and gets[0][0] == 200, gets
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs")) as svc:
        assert len(svc.images()) == 2 and len(svc.layers()) == 3
    assert lamina_cli("--driver", "vfs", "system", "check", root=tmp_path, check=False).returncode == 0


def test_a_pull_killed_mid_download_resumes_with_range(tmp_path: Path, registry: Registry) -> None:
    big = _push_two_images_sharing_a_big_layer(tmp_path, registry, "resume")
    partial = tmp_path / "root" / "content" / "partial" / big.replace(":", "-")
    proc = subprocess.Popen(_pull_argv(tmp_path, f"{registry.host}/resume/a:1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    got = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            got = partial.stat().st_size
        except FileNotFoundError:
            got = 0
        if got > 4 << 20:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pull ended before it could be killed mid-download"
    kept = partial.stat().st_size
    assert kept >= got
    deadline = time.monotonic() + 10  # the registry logs the cut GET once it notices the broken connection
    while not _blob_gets(registry.log_text(), big) and time.monotonic() < deadline:
        time.sleep(0.05)
    since = registry.log_size()
    lamina_cli("--driver", "vfs", "pull", "-q", f"{registry.host}/resume/a:1", root=tmp_path)
    time.sleep(0.2)
    gets = _blob_gets(registry.log_text(since), big)
    size = int(inspect_remote(registry, "resume/a:1")["manifest"]["layers"][0]["size"])
    assert gets == [(206, size - kept)], gets
    assert not partial.exists()
    assert lamina_cli("--driver", "vfs", "system", "check", root=tmp_path, check=False).returncode == 0
    with ImageService.open(Config(root=tmp_path / "root", runroot=tmp_path / "run", driver="vfs")) as svc:
        img = svc.get_image(f"{registry.host}/resume/a:1")
        for chain, diff_id in zip(img.chain, img.diff_ids, strict=True):
            h = hashlib.sha256()
            with svc.export_layer(chain) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            assert "sha256:" + h.hexdigest() == diff_id

"""The content graph (containerd's images package): check, children, walk, platforms, and
``lamina manifest inspect``, on images umoci and skopeo wrote."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_images import _multi_platform_layout

from conftest import lamina_cli
from image_fixtures import ImageFacts, SkopeoImages, skopeo
from lamina import ImageService
from lamina.config import Config
from lamina.errors import BlobNotFound, ImageError, LaminaError
from lamina.formats import oci
from lamina.testing import TarBuilder


def _open(tmp: Path, **kw: Any) -> ImageService:
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver="vfs", **kw))


def _digests(descs: list[oci.Descriptor]) -> list[str]:
    return [d.digest for d in descs]


def _blob_file(tmp: Path, digest: str) -> Path:
    return tmp / "root" / "content" / "blobs" / "sha256" / digest.split(":", 1)[1]


def test_check_reports_what_the_content_store_lacks(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path) as svc:
        svc.load_image(facts.path)
        result = svc.graph.check("small:1")
        want = [facts.manifest_digest, facts.config_digest, *facts.layer_digests]
        assert result.available and result.complete and result.missing == []
        assert _digests(result.required) == want and _digests(result.present) == want
        manifest = result.required[0]
        assert manifest.media_type == facts.manifest_media_type
        assert manifest.size == len(skopeo("inspect", "--raw", facts.ref()))

        _blob_file(tmp_path, facts.layer_digests[1]).unlink()
        result = svc.graph.check("small:1")
        assert result.available and not result.complete
        assert _digests(result.missing) == [facts.layer_digests[1]]
        assert _digests(result.present) == [d for d in want if d != facts.layer_digests[1]]
        assert _digests(result.required) == want

        _blob_file(tmp_path, facts.manifest_digest).unlink()  # the manifest gone: nothing more is known
        result = svc.graph.check("small:1")
        assert not result.available and _digests(result.missing) == [facts.manifest_digest]
        assert _digests(result.required) == [facts.manifest_digest]


def test_check_without_kept_layer_blobs_or_manifest(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    with _open(tmp_path / "a", keep_layer_blobs=False) as svc:
        svc.load_image(skopeo_images.zstd_oci.path)
        result = svc.graph.check("small:1")
        # the layers are committed and the image runs, but their blobs are not in the content store
        assert result.available and not result.complete
        assert _digests(result.missing) == list(skopeo_images.zstd_oci.layer_digests)
        assert [la.diff_id for la in svc.layers()] == list(skopeo_images.zstd_oci.diff_ids)
    with _open(tmp_path / "b") as svc:
        [loaded] = svc.load_image(skopeo_images.docker_archive.path)  # a docker-archive has no manifest
        result = svc.graph.check(loaded.image.id)
        assert not result.available
        assert _digests(result.required) == [loaded.image.id] == _digests(result.present)
        assert svc.graph.target(loaded.image.id) is None
        img = svc.import_image(io.BytesIO(TarBuilder().file("f", b"x").build()), "imported:1")
        assert _digests(svc.graph.check("imported:1").required) == [img.id]


def test_children(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path) as svc:
        svc.load_image(facts.path)
        graph = svc.graph
        target = graph.target("small:1")
        assert target is not None and target.digest == facts.manifest_digest
        kids = graph.children(target)
        assert _digests(kids) == [facts.config_digest, *facts.layer_digests]
        assert [k.media_type for k in kids[1:]] == [oci.MEDIA_TYPE_LAYER_GZIP] * 3
        assert graph.children(kids[0]) == [] and graph.children(kids[1]) == []
        assert graph.children(target.to_json()) == kids  # a descriptor's JSON object does too
        missing = oci.Descriptor(oci.MEDIA_TYPE_MANIFEST, "sha256:" + "1" * 64, 10)
        with pytest.raises(BlobNotFound):
            graph.children(missing)


def _walk_counting(graph: Any, target: oci.Descriptor, limit: int) -> tuple[list[str], int]:
    """Walk six copies of ``target`` with handlers that take a while; returns what they saw and how many
    ran at once at most."""
    lock = threading.Lock()
    running = 0
    most = 0
    seen: list[str] = []

    def handler(desc: oci.Descriptor) -> list[oci.Descriptor]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            seen.append(desc.digest)
        time.sleep(0.03)
        with lock:
            running -= 1
        return list(graph.children(desc))

    graph.walk(handler, [target] * 6, limit=limit)
    return seen, most


def test_walk_runs_at_most_limit_handlers_at_once(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path) as svc:
        svc.load_image(umoci_small_image.path)
        graph = svc.graph
        target = graph.target("small:1")
        assert target is not None
        for limit in (1, 3):
            seen, most = _walk_counting(graph, target, limit)
            assert len(seen) == 6 * 5  # six manifests, each with a config and three layers
            assert most == limit

        def failing(desc: oci.Descriptor) -> list[oci.Descriptor]:
            if oci.is_layer_type(desc.media_type):
                raise LaminaError("stop here")
            return graph.children(desc)

        with pytest.raises(LaminaError, match="stop here"):
            graph.walk(failing, [target], limit=2)
        with pytest.raises(LaminaError, match="positive"):
            graph.walk(failing, [target], limit=0)
        graph.walk(failing, [], limit=2)  # nothing to do


def test_platforms_and_manifest_inspect_of_an_index(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    host_digest, arm_digest = _multi_platform_layout(facts, tmp_path / "multi")
    index_desc = json.loads((tmp_path / "multi" / "index.json").read_text())["manifests"][0]
    index_raw = (tmp_path / "multi" / "blobs" / "sha256" / index_desc["digest"][7:]).read_bytes()
    with _open(tmp_path / "s") as svc:
        svc.load_image(tmp_path / "multi")
        graph = svc.graph
        target = graph.target("multi:1")
        assert target is not None and target.digest == index_desc["digest"]
        assert target.media_type == oci.MEDIA_TYPE_INDEX and target.size == len(index_raw)
        assert graph.platforms("multi:1") == [oci.host_platform(), oci.Platform("linux", "arm64", "v8")]
        assert graph.platforms(target) == graph.platforms("multi:1")
        own = svc.get_image("multi:1").config.platform
        host_manifest = oci.Descriptor(oci.MEDIA_TYPE_MANIFEST, host_digest, len(skopeo("inspect", "--raw",
                                                                                      facts.ref())))
        assert graph.platforms(host_manifest) == [own]  # a manifest without a platform: its config's

        result = graph.check("multi:1")
        assert _digests(result.required) == [index_desc["digest"], host_digest, facts.config_digest,
                                             *facts.layer_digests]
        assert result.complete
        assert _digests(graph.children(target)) == [host_digest, arm_digest]  # the arm64 one is not stored

    root = tmp_path / "s"
    proc = lamina_cli("manifest", "inspect", "multi:1", root=root)
    assert proc.stdout == index_raw  # byte-exact, as stored
    with _open(tmp_path / "t") as svc:
        svc.load_image(facts.path)  # the same image, loaded without the index
        assert svc.graph.platforms("small:1") == [svc.get_image("small:1").config.platform]
    proc = lamina_cli("manifest", "inspect", "small:1", root=tmp_path / "t")
    assert proc.stdout == skopeo("inspect", "--raw", facts.ref())
    assert hashlib.sha256(proc.stdout).hexdigest() == facts.manifest_digest[7:]
    (tmp_path / "r.tar").write_bytes(TarBuilder().file("f", b"x").build())
    lamina_cli("import", str(tmp_path / "r.tar"), "imported:1", root=root)
    proc = lamina_cli("manifest", "inspect", "imported:1", root=root, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    assert "has no stored manifest" in err and "Traceback" not in err
    proc = lamina_cli("manifest", "inspect", "nothing:1", root=root, check=False)
    assert proc.returncode == 1 and b"not found" in proc.stderr
    with _open(root) as svc, pytest.raises(ImageError, match="no stored manifest"):
        svc.graph.target_bytes("imported:1")

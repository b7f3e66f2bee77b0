"""The oracle images are what they claim to be (checked with skopeo and Python's own tar/gzip readers).

A failure here is a problem of the test setup (tools, their versions, the builders in image_fixtures.py),
not of lamina: lamina is not used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

from image_fixtures import (
    DEBIAN_DOCKER_NAME,
    DEBIAN_NAME,
    DOCKER_MANIFEST,
    GZIP_MAGIC,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    SMALL_BIG_FILE_BYTES,
    SMALL_DOCKER_NAME,
    SMALL_NAME,
    SMALL_SECOND_NAME,
    ZSTD_MAGIC,
    ImageFacts,
    SkopeoImages,
    layer_tar_bytes,
    sha256_file,
)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _skopeo_json(*args: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", "inspect", *args], capture_output=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def _members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        return {m.name.removeprefix("./"): m for m in tf.getmembers()}


def _check_layout(facts: ImageFacts, media_type: str, magic: bytes) -> None:
    """Blobs hash to their digests, layers have the claimed compression, DiffIDs match the content."""
    assert facts.manifest_media_type == OCI_MANIFEST
    assert facts.manifest["config"]["mediaType"] == OCI_CONFIG
    index = json.loads((facts.path / "index.json").read_bytes())
    assert {m["digest"] for m in index["manifests"]} == {facts.manifest_digest}
    assert _sha(facts.blob(facts.manifest_digest).read_bytes()) == facts.manifest_digest
    assert _sha(facts.blob(facts.config_digest).read_bytes()) == facts.config_digest
    assert set(facts.layer_media_types) == {media_type}
    assert len(facts.layer_digests) == len(facts.diff_ids)
    for i, digest in enumerate(facts.layer_digests):
        blob = facts.blob(digest)
        assert "sha256:" + sha256_file(blob) == digest
        assert blob.stat().st_size == facts.layer_sizes[i]
        with open(blob, "rb") as f:
            assert f.read(len(magic)) == magic
        assert _sha(layer_tar_bytes(facts, i)) == facts.diff_ids[i]


def test_umoci_small_image(umoci_small_image: ImageFacts) -> None:
    img = umoci_small_image
    assert img.transport == "oci" and img.names == (SMALL_NAME,)
    assert len(img.layer_digests) == 3
    _check_layout(img, OCI_LAYER_GZIP, GZIP_MAGIC)
    cfg = img.config["config"]
    assert cfg["Cmd"] == ["/usr/bin/hello"] and "A=1" in cfg["Env"] and cfg["Labels"] == {"k": "v"}
    assert _skopeo_json(img.ref())["Digest"] == img.manifest_digest

    first, second, third = (_members(layer_tar_bytes(img, i)) for i in range(3))
    assert first["data/link"].issym() and first["data/link"].linkname == "../etc/greeting"
    assert any(m.islnk() for m in first.values())
    assert stat.S_IMODE(first["usr/bin/hello"].mode) == 0o755
    assert stat.S_IMODE(first["etc/secret"].mode) == 0o600
    assert "etc/.wh.remove-me" in second
    assert "gone/c" in second
    assert "gone/.wh..wh..opq" in second or {"gone/.wh.a", "gone/.wh.b"} <= second.keys()
    assert third["data/big.bin"].size == SMALL_BIG_FILE_BYTES

    root = img.rootfs
    assert root is not None
    assert os.readlink(root / "data/link") == "../etc/greeting"
    assert os.stat(root / "data/hard").st_ino == os.stat(root / "etc/greeting").st_ino
    assert (root / "etc/greeting").read_bytes() == b"hello\nhello again\n"
    assert not (root / "etc/remove-me").exists()
    assert sorted(os.listdir(root / "gone")) == ["c"]
    assert stat.S_IMODE(os.stat(root / "usr/bin/hello").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "etc/secret").st_mode) == 0o600
    assert (root / "data/big.bin").stat().st_size == SMALL_BIG_FILE_BYTES


def test_skopeo_zstd_layout(skopeo_images: SkopeoImages, umoci_small_image: ImageFacts) -> None:
    img = skopeo_images.zstd_oci
    assert img.names == (SMALL_NAME,)
    _check_layout(img, OCI_LAYER_ZSTD, ZSTD_MAGIC)
    assert img.diff_ids == umoci_small_image.diff_ids
    assert img.config_digest == umoci_small_image.config_digest
    assert img.manifest_digest != umoci_small_image.manifest_digest


def test_skopeo_docker_archive(skopeo_images: SkopeoImages, umoci_small_image: ImageFacts) -> None:
    img = skopeo_images.docker_archive
    assert img.transport == "docker-archive" and img.names == (SMALL_DOCKER_NAME,)
    assert img.manifest_media_type == DOCKER_MANIFEST
    assert img.config_digest == umoci_small_image.config_digest
    assert img.layer_digests == img.diff_ids == umoci_small_image.diff_ids  # layers are stored uncompressed
    for i, diff_id in enumerate(img.diff_ids):
        layer = layer_tar_bytes(img, i)
        assert layer[257:262] == b"ustar" and _sha(layer) == diff_id
    assert _skopeo_json(f"docker-archive:{img.path}:{SMALL_DOCKER_NAME}")["Digest"] == img.manifest_digest


def test_skopeo_oci_archive(skopeo_images: SkopeoImages, umoci_small_image: ImageFacts) -> None:
    img = skopeo_images.oci_archive
    assert img.transport == "oci-archive" and img.names == (SMALL_NAME,)
    with tarfile.open(img.path) as tf:
        names = set(tf.getnames())
    assert {"oci-layout", "index.json"} <= names
    assert {f"blobs/sha256/{d.partition(':')[2]}" for d in img.layer_digests} <= names
    assert img.layer_media_types == (OCI_LAYER_GZIP,) * 3
    # an unchanged copy keeps the manifest, hence its digest
    assert img.manifest_digest == umoci_small_image.manifest_digest


def test_skopeo_two_names(skopeo_images: SkopeoImages, umoci_small_image: ImageFacts) -> None:
    img = skopeo_images.two_names_oci
    assert img.names == (SMALL_NAME, SMALL_SECOND_NAME)
    _check_layout(img, OCI_LAYER_GZIP, GZIP_MAGIC)
    assert img.manifest_digest == umoci_small_image.manifest_digest
    for name in img.names:
        assert _skopeo_json(img.ref(name))["Digest"] == img.manifest_digest


def test_debian_image_oci(debian_image_oci: ImageFacts, debian_rootfs_tar: Path) -> None:
    img = debian_image_oci
    assert img.names == (DEBIAN_NAME,) and len(img.layer_digests) == 1
    _check_layout(img, OCI_LAYER_GZIP, GZIP_MAGIC)
    assert img.diff_ids == ("sha256:" + sha256_file(debian_rootfs_tar),)  # the rootfs tar, byte for byte
    assert img.config["config"]["Cmd"] == ["/bin/bash"]


def test_debian_image_docker_archive(debian_image_docker_archive: ImageFacts, debian_image_oci: ImageFacts) -> None:
    img = debian_image_docker_archive
    assert img.names == (DEBIAN_DOCKER_NAME,) and len(img.layer_digests) == 1
    assert img.config_digest == debian_image_oci.config_digest
    assert img.layer_digests == img.diff_ids == debian_image_oci.diff_ids
    assert _sha(layer_tar_bytes(img, 0)) == img.diff_ids[0]

"""Container images written by other tools (umoci, skopeo), never by lamina: the oracle side of image tests.

A pytest plugin (``pytest_plugins = ["image_fixtures"]`` in ``tests/conftest.py``) with session-scoped
fixtures, and the plain builder functions behind them, which ``bench/images.py`` uses too.

Every fixture returns :class:`ImageFacts`: where the image is plus what skopeo reports about it (manifest
digest and media type, config digest, layer digests and media types, DiffIDs) and the names the archive
or layout records. A test compares what lamina reads or writes with these facts; when the facts
themselves look wrong, ``tests/test_image_fixtures.py`` fails too, which tells an oracle problem from a
lamina bug.

Fixtures:

``umoci_small_image``
    OCI layout written by umoci, image ``small:1``: three gzip layers (1: directories, files with modes
    0644/0755/0600, a directory owned by 1000:1000, a symlink, a hard link; 2: a modified file, a deleted
    file, a directory deleted and recreated with other contents, as whiteouts; 3: a 1 MiB random file),
    config with Cmd, Env ``A=1`` and label ``k=v``. ``rootfs`` is umoci's own unpacking of the image.
``skopeo_images``
    :class:`SkopeoImages`, the same image copied by skopeo: zstd OCI layout, docker-archive
    (``example.com/small:1``), oci-archive (``small:1``) and an OCI layout holding it under two names.
``debian_image_oci`` / ``debian_image_docker_archive``
    The debootstrap rootfs (``debian_rootfs_tar``) as a one-layer image: an OCI layout with a gzip
    layer made by skopeo's ``tarball:`` transport (its DiffID is the rootfs tar's sha256; umoci sets
    ``Cmd``), named ``debian:bookworm``, and a docker-archive of it made by skopeo
    (``example.com/debian:bookworm``). Cached under ``$LAMINA_TEST_CACHE`` (default
    ``/var/tmp/lamina-test-cache``), keyed by the rootfs tar's sha256 and the tools' versions.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from lamina.testing import require_tool

BUILDER_VERSION = 1  # bump when a builder changes: cached images of another version are built again
SMALL_NAME = "small:1"
SMALL_DOCKER_NAME = "example.com/small:1"
SMALL_SECOND_NAME = "example.com/small:latest"
DEBIAN_NAME = "debian:bookworm"
DEBIAN_DOCKER_NAME = "example.com/debian:bookworm"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Fixed times for the small image, one per layer (2023-11-14 onwards), so that a rebuild with the same
# tools gives the same digests.
LAYER_TIMES = (1_700_000_000, 1_700_000_100, 1_700_000_200)
CONFIG_TIME = 1_700_000_300
SMALL_BIG_FILE_BYTES = 1 << 20

CACHE = Path(os.environ.get("LAMINA_TEST_CACHE", "/var/tmp/lamina-test-cache"))


@dataclass(frozen=True)
class ImageFacts:
    """An image written by umoci or skopeo, and what skopeo reports about it."""

    path: Path
    transport: str  # skopeo transport: "oci", "oci-archive" or "docker-archive"
    names: tuple[str, ...]  # names recorded by the layout (ref.name) or the archive (RepoTags)
    manifest_digest: str  # docker-archive holds no manifest: this is the one skopeo makes up for it
    manifest_media_type: str
    config_digest: str
    layer_digests: tuple[str, ...]  # as in the manifest (compressed blobs; uncompressed in docker-archive)
    layer_media_types: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]  # from the config
    manifest: dict[str, Any] = field(repr=False, compare=False)
    config: dict[str, Any] = field(repr=False, compare=False)
    rootfs: Path | None = None  # the image unpacked by umoci (the expected final tree), when made

    def ref(self, name: str | None = None) -> str:
        """A skopeo reference to the image (``name`` picks one of several in a layout)."""
        if name is None and self.transport != "docker-archive":
            name = self.names[0] if self.names else None
        return f"{self.transport}:{self.path}" + (f":{name}" if name else "")

    def blob(self, digest: str) -> Path:
        """Path of a blob in an OCI layout."""
        if self.transport != "oci":
            raise ValueError(f"{self.transport} has no blob directory")
        alg, _, hexdigest = digest.partition(":")
        return self.path / "blobs" / alg / hexdigest


@dataclass(frozen=True)
class SkopeoImages:
    """``umoci_small_image`` copied by skopeo into other formats."""

    zstd_oci: ImageFacts  # OCI layout, zstd layers, name small:1
    docker_archive: ImageFacts  # uncompressed layers, RepoTags example.com/small:1
    oci_archive: ImageFacts  # tar of an OCI layout, gzip layers, name small:1
    two_names_oci: ImageFacts  # OCI layout, one manifest under small:1 and example.com/small:latest


# -- running the tools ----------------------------------------------------------------------------------
def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is needed on PATH to build the test images")
    return path


def _run(cmd: Sequence[str | os.PathLike[str]]) -> bytes:
    args = [os.fspath(c) for c in cmd]
    args[0] = _tool(args[0])
    proc = subprocess.run(args, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def skopeo(*args: str | os.PathLike[str]) -> bytes:
    return _run(["skopeo", *args])


def umoci(*args: str | os.PathLike[str]) -> bytes:
    return _run(["umoci", "--log", "error", *args])


@functools.cache
def tool_versions() -> str:
    """The versions of skopeo and umoci (part of every cache key)."""
    return "; ".join(_run([t, "--version"]).decode().strip() for t in ("skopeo", "umoci"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _rfc3339(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _open_up(tree: Path) -> None:
    """umoci writes blobs 0600: make a layout readable to tests that drop root (contents are unchanged)."""
    for dirpath, _dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)


# -- builders -------------------------------------------------------------------------------------------
def _stamp_new_entries(root: Path, mtime: int) -> None:
    """Give every entry touched since the previous layer (mtime later than all fixed times) ``mtime``."""
    newest_fixed = max(*LAYER_TIMES, CONFIG_TIME)
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            if os.lstat(p).st_mtime > newest_fixed:
                os.utime(p, (mtime, mtime), follow_symlinks=False)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def build_small_layout(layout: Path, work: Path, name: str = SMALL_NAME) -> None:
    """Write the three-layer image ``name`` into a new OCI layout with umoci (see the module docstring).

    ``work`` is a scratch directory for umoci's bundle (removed afterwards).
    """
    bundle = work / "small-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    image = f"{layout}:{name}"
    umoci("init", "--layout", layout)
    umoci("new", "--image", image)
    umoci("unpack", *rootless, "--image", image, bundle)
    root = bundle / "rootfs"

    def repack(layer: int, what: str) -> None:
        _stamp_new_entries(root, LAYER_TIMES[layer])
        umoci("repack", "--refresh-bundle", "--history.created", _rfc3339(LAYER_TIMES[layer]),
              "--history.created_by", what, "--image", image, bundle)

    # layer 1: directories, files of several modes, a symlink, a hard link, a non-root owner
    for d in ("etc", "usr/bin", "data/sub", "gone"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _write(root / "etc/greeting", b"hello\n")
    _write(root / "etc/secret", b"secret\n", 0o600)
    _write(root / "etc/remove-me", b"bye\n")
    _write(root / "usr/bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    _write(root / "gone/a", b"a\n")
    _write(root / "gone/b", b"b\n")
    os.symlink("../etc/greeting", root / "data/link")
    os.link(root / "etc/greeting", root / "data/hard")
    if os.geteuid() == 0:
        os.chown(root / "data/sub", 1000, 1000)
    repack(0, "layer 1: files, modes, symlink, hard link")

    # layer 2: modify a file (both names of the hard link), delete a file, replace a directory
    with open(root / "etc/greeting", "ab") as f:
        f.write(b"hello again\n")
    (root / "etc/remove-me").unlink()
    shutil.rmtree(root / "gone")
    (root / "gone").mkdir()
    _write(root / "gone/c", b"c\n")
    repack(1, "layer 2: modify, delete, replace a directory")

    # layer 3: 1 MiB of (seeded) random bytes
    _write(root / "data/big.bin", random.Random(0x5A4A11).randbytes(SMALL_BIG_FILE_BYTES))
    repack(2, "layer 3: a 1 MiB file")

    umoci("config", "--image", image, "--config.cmd", "/usr/bin/hello", "--config.env", "A=1",
          "--config.label", "k=v", "--created", _rfc3339(CONFIG_TIME), "--history.created", _rfc3339(CONFIG_TIME))
    umoci("gc", "--layout", layout)
    shutil.rmtree(bundle)
    _open_up(layout)


def unpack_rootfs(layout: Path, name: str, bundle: Path) -> Path:
    """umoci's unpacking of the image: the tree the image stands for. Returns the rootfs directory."""
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    umoci("unpack", *rootless, "--image", f"{layout}:{name}", bundle)
    return bundle / "rootfs"


def build_rootfs_layout(rootfs_tar: Path, layout: Path, name: str = DEBIAN_NAME, cmd: str = "/bin/bash") -> None:
    """A one-layer OCI layout from a root filesystem tar: skopeo's ``tarball:`` transport (gzip layer).

    The layer is the tar byte for byte (its DiffID is the tar's sha256); umoci then sets ``Cmd``.
    """
    skopeo("copy", "--quiet", f"tarball:{rootfs_tar}", f"oci:{layout}:{name}")
    umoci("config", "--image", f"{layout}:{name}", "--config.cmd", cmd)
    umoci("gc", "--layout", layout)
    _open_up(layout)


def copy_image(src: str, dest: str, *options: str) -> None:
    """``skopeo copy`` (with ``options``, e.g. ``--dest-compress-format zstd``)."""
    skopeo("copy", "--quiet", *options, src, dest)


def _archive_member(archive: Path, member: str) -> bytes:
    with tarfile.open(archive) as tf:
        f = tf.extractfile(member)
        if f is None:
            raise RuntimeError(f"{archive}: {member} is not a file")
        return f.read()


def _layout_names(index: dict[str, Any], digest: str) -> tuple[str, ...]:
    return tuple(m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
                 for m in index.get("manifests", []) if m.get("digest") == digest)


def recorded_names(transport: str, path: Path, manifest_digest: str, config_digest: str) -> tuple[str, ...]:
    """The names the layout's index.json or the archive's manifest.json give the image."""
    if transport == "oci":
        return _layout_names(json.loads((path / "index.json").read_bytes()), manifest_digest)
    if transport == "oci-archive":
        return _layout_names(json.loads(_archive_member(path, "index.json")), manifest_digest)
    entries = json.loads(_archive_member(path, "manifest.json"))
    hexdigest = config_digest.partition(":")[2]
    return tuple(tag for e in entries if e.get("Config", "").removesuffix(".json").endswith(hexdigest)
                 for tag in e.get("RepoTags") or [])


def inspect_image(transport: str, path: Path, name: str | None = None) -> ImageFacts:
    """What skopeo reports about an image (``name`` picks one in a layout or archive of several)."""
    ref = f"{transport}:{path}" + (f":{name}" if name else "")
    info = json.loads(skopeo("inspect", ref))
    manifest = json.loads(skopeo("inspect", "--raw", ref))
    config = json.loads(skopeo("inspect", "--config", "--raw", ref))
    layers = manifest.get("layers", [])
    digest = info["Digest"]
    config_digest = manifest["config"]["digest"]
    return ImageFacts(
        path=path,
        transport=transport,
        names=recorded_names(transport, path, digest, config_digest),
        manifest_digest=digest,
        manifest_media_type=manifest.get("mediaType", OCI_MANIFEST),  # an OCI manifest may leave it out
        config_digest=config_digest,
        layer_digests=tuple(lyr["digest"] for lyr in layers),
        layer_media_types=tuple(lyr["mediaType"] for lyr in layers),
        layer_sizes=tuple(lyr["size"] for lyr in layers),
        diff_ids=tuple(config["rootfs"]["diff_ids"]),
        manifest=manifest,
        config=config,
    )


def build_skopeo_images(small: ImageFacts, dest: Path) -> SkopeoImages:
    """Copy the small image with skopeo into ``dest``: zstd layout, docker-archive, oci-archive, two names."""
    src = small.ref(SMALL_NAME)
    zstd = dest / "zstd-oci"
    copy_image(src, f"oci:{zstd}:{SMALL_NAME}", "--dest-compress-format", "zstd")
    docker = dest / "small-docker.tar"
    copy_image(src, f"docker-archive:{docker}:{SMALL_DOCKER_NAME}")
    ociarch = dest / "small-oci.tar"
    copy_image(src, f"oci-archive:{ociarch}:{SMALL_NAME}")
    two = dest / "two-names-oci"
    copy_image(src, f"oci:{two}:{SMALL_NAME}")
    copy_image(src, f"oci:{two}:{SMALL_SECOND_NAME}")
    for layout in (zstd, two):
        _open_up(layout)
    return SkopeoImages(
        zstd_oci=inspect_image("oci", zstd, SMALL_NAME),
        docker_archive=inspect_image("docker-archive", docker),
        oci_archive=inspect_image("oci-archive", ociarch, SMALL_NAME),
        two_names_oci=inspect_image("oci", two, SMALL_NAME),
    )


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def debian_images(rootfs_tar: Path, cache: Path, rootfs_sha256: str | None = None) -> tuple[ImageFacts, ImageFacts]:
    """The rootfs tar as a gzip OCI layout and as a docker-archive, built once and cached in ``cache``.

    The cache entry is keyed by the tar's sha256 (pass ``rootfs_sha256`` when already known), the tools'
    versions and :data:`BUILDER_VERSION`; it is built in a temporary directory and renamed into place, under
    a lock, so concurrent sessions share it.
    """
    sha = rootfs_sha256 or sha256_file(rootfs_tar)
    key = hashlib.sha256(f"{tool_versions()}|{BUILDER_VERSION}".encode()).hexdigest()[:8]
    entry = cache / f"debian-image-{sha[:16]}-{key}"
    if not (entry / "done").exists():
        with _locked(cache / "debian-image.lock"):
            if not (entry / "done").exists():
                tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                build_rootfs_layout(rootfs_tar, tmp / "oci", DEBIAN_NAME)
                copy_image(f"oci:{tmp / 'oci'}:{DEBIAN_NAME}",
                           f"docker-archive:{tmp / 'docker.tar'}:{DEBIAN_DOCKER_NAME}")
                (tmp / "done").write_text(json.dumps({"rootfs_sha256": sha, "tools": tool_versions()}) + "\n")
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
    return inspect_image("oci", entry / "oci", DEBIAN_NAME), inspect_image("docker-archive", entry / "docker.tar")


def layer_tar_bytes(facts: ImageFacts, index: int) -> bytes:
    """The uncompressed tar of layer ``index`` of an OCI layout (gzip or zstd) or a docker-archive."""
    if facts.transport == "docker-archive":
        entries = json.loads(_archive_member(facts.path, "manifest.json"))
        return _archive_member(facts.path, entries[0]["Layers"][index])
    data = facts.blob(facts.layer_digests[index]).read_bytes()
    if data.startswith(GZIP_MAGIC):
        return gzip.decompress(data)
    if data.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def host_binaries_tar(path: Path) -> None:
    """A root filesystem of host binaries (sh, cat, id) and their libraries, every entry owned by 0:0."""
    files: dict[str, str] = {}
    for name in ("sh", "cat", "id"):
        exe = shutil.which(name)
        assert exe is not None
        files[f"bin/{name}"] = os.path.realpath(exe)
        ldd = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
        for word in ldd.split():
            if word.startswith("/") and os.path.exists(word):
                files[word.lstrip("/")] = os.path.realpath(word)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        dirs = sorted({"etc", "tmp", *(str(p) for f in files for p in Path(f).parents if str(p) != ".")})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        extra = {"etc/os-release": b'NAME="lamina host binaries"\nID=lamina-host\n',
                 "etc/passwd": b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
                 "etc/group": b"root:x:0:\nnogroup:x:65534:\n"}
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
        for name, real in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = os.path.getsize(real), 0o755
            with open(real, "rb") as f:
                t.addfile(info, f)


# -- fixtures -------------------------------------------------------------------------------------------
def _require_tools() -> None:
    require_tool("umoci")
    require_tool("skopeo")


@pytest.fixture(scope="session")
def umoci_small_image(tmp_path_factory: pytest.TempPathFactory) -> ImageFacts:
    """Three-layer gzip OCI layout ``small:1`` written by umoci; ``rootfs`` is umoci's unpacking of it."""
    _require_tools()
    base = tmp_path_factory.mktemp("umoci-small")
    layout = base / "oci"
    build_small_layout(layout, base)
    facts = inspect_image("oci", layout, SMALL_NAME)
    return replace(facts, rootfs=unpack_rootfs(layout, SMALL_NAME, base / "unpacked"))


@pytest.fixture(scope="session")
def skopeo_images(umoci_small_image: ImageFacts, tmp_path_factory: pytest.TempPathFactory) -> SkopeoImages:
    """``umoci_small_image`` copied by skopeo: zstd layout, docker-archive, oci-archive, layout with two names."""
    _require_tools()
    return build_skopeo_images(umoci_small_image, tmp_path_factory.mktemp("skopeo-small"))


@pytest.fixture(scope="session")
def _debian_images(debian_rootfs_tar: Path) -> tuple[ImageFacts, ImageFacts]:
    _require_tools()
    return debian_images(debian_rootfs_tar, CACHE)


@pytest.fixture(scope="session")
def debian_image_oci(_debian_images: tuple[ImageFacts, ImageFacts]) -> ImageFacts:
    """The debootstrap rootfs as a one-layer gzip OCI layout (``debian:bookworm``), by skopeo and umoci."""
    return _debian_images[0]


@pytest.fixture(scope="session")
def debian_image_docker_archive(_debian_images: tuple[ImageFacts, ImageFacts]) -> ImageFacts:
    """The same image as a docker-archive (``example.com/debian:bookworm``, uncompressed layer), by skopeo."""
    return _debian_images[1]

"""Hostile and broken inputs to ``lamina load`` / ``ImageService.load_image``, and SIGKILL during a load.

Every broken input starts as a good image written by umoci or skopeo (``tests/image_fixtures.py``) and is
damaged here. Each must be refused with a :class:`~lamina.errors.LaminaError` carrying a one-line
message (through the CLI: a non-zero exit, ``Error: ...``, no traceback), and must leave nothing behind:
no image, no layer, no blob file beyond those of images already present, nothing in ``content/ingest``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from image_fixtures import DEBIAN_NAME, OCI_MANIFEST, ImageFacts, SkopeoImages
from lamina.config import Config
from lamina.errors import (
    ArchiveError,
    DigestMismatch,
    FormatError,
    InvalidDocument,
    InvalidReference,
    LaminaError,
    LimitExceeded,
    UnsafePathError,
)
from lamina.service import ImageService

DRIVERS = ["vfs", "tarball"]
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
CONTAINERD_NAME = "io.containerd.image.name"
HEX64 = "0123456789abcdef" * 4
BAD_TAGS = ["UPPER/case:1", "a:b:c", "name@sha256:zzz", HEX64]

Member = tuple[tarfile.TarInfo, bytes | None]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the store and its state ----------------------------------------------------------------------------
def _open(store: Path, driver: str) -> ImageService:
    return ImageService.open(Config(root=store / "root", runroot=store / "run", driver=driver))


def _env(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LAMINA_CONFIG", "LAMINA_DRIVER", "LAMINA_DEBUG", "LAMINA_DISABLE_PLUGIN_AUTOLOAD")}
    env["XDG_CONFIG_HOME"] = str(store / "xdg-config")
    return env


def _cli_cmd(store: Path, driver: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(store / "root"), "--runroot", str(store / "run"),
            "--driver", driver, *args]


def _cli(store: Path, driver: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(_cli_cmd(store, driver, *args), capture_output=True, env=_env(store), timeout=timeout,
                          check=False)


def _files(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def _state(svc: ImageService, store: Path) -> dict[str, list[str]]:
    content = store / "root" / "content"
    return {
        "images": sorted(i.id for i in svc.images(all=True)),
        "layers": sorted(layer.chain_id for layer in svc.layers()),
        "blobs": _files(content / "blobs" / "sha256"),
        "ingest": _files(content / "ingest"),
    }


def _assert_one_line_cli_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), err
    assert len([line for line in lines if line.startswith("Error: ")]) == 1, err
    assert "internal error" not in lines[-1], err
    return lines[-1]


def expect_rejected(store: Path, driver: str, path: Path, exc: type[LaminaError] | tuple[type[LaminaError], ...],
                    *needles: str) -> LaminaError:
    """``path`` must be refused by the API and the CLI with a one-line LaminaError and leave the store as it was."""
    with _open(store, driver) as svc:
        before = _state(svc, store)
        assert before["ingest"] == []
        with pytest.raises(LaminaError) as ei:
            svc.load_image(path)
        err = ei.value
        after = _state(svc, store)
    assert isinstance(err, exc), f"expected {exc}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert msg and "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert after == before, f"the failed load left something behind: {after} vs {before}"
    proc = _cli(store, driver, "load", "-q", "-i", str(path))
    _assert_one_line_cli_error(proc)
    with _open(store, driver) as svc:
        again = _state(svc, store)
    assert again == before, f"the failed CLI load left something behind: {again} vs {before}"
    return err


# -- building broken inputs -----------------------------------------------------------------------------
def _dir_members(d: Path) -> list[Member]:
    """Every entry under ``d`` as tar members (symlinks stay symlinks), in a stable order."""
    out: list[Member] = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            ti = tarfile.TarInfo(p.relative_to(d).as_posix())
            ti.mtime = 1_700_000_000
            data = None
            if p.is_symlink():
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(p)
            elif p.is_dir():
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
            else:
                data = p.read_bytes()
                ti.size = len(data)
                ti.mode = 0o644
            out.append((ti, data))
    return out


def _write_tar(members: list[Member], out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out


def _tar_members(path: Path) -> list[Member]:
    out: list[Member] = []
    with tarfile.open(path) as tf:
        for ti in tf.getmembers():
            f = tf.extractfile(ti) if ti.isfile() else None
            out.append((ti, f.read() if f else None))
    return out


def _pack(d: Path, out: Path) -> Path:
    return _write_tar(_dir_members(d), out)


def _reg(name: str, data: bytes) -> Member:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    return ti, data


def _link(name: str, target: str, kind: bytes) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti, None


def _replace_member(members: list[Member], name: str, new: Member) -> list[Member]:
    names = [ti.name for ti, _ in members]
    assert name in names, (name, names)
    return [new if ti.name == name else (ti, data) for ti, data in members]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# OCI layouts
def _oci_copy(facts: ImageFacts, dest: Path) -> Path:
    shutil.copytree(facts.path, dest, symlinks=True)
    return dest


def _index(layout: Path) -> dict[str, Any]:
    return json.loads((layout / "index.json").read_bytes())


def _write_index(layout: Path, doc: Any) -> None:
    (layout / "index.json").write_bytes(json.dumps(doc).encode())


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = _sha(data)
    _blob(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _manifest_desc(layout: Path) -> dict[str, Any]:
    manifests = _index(layout)["manifests"]
    assert len(manifests) == 1, manifests
    return dict(manifests[0])


def _manifest(layout: Path) -> dict[str, Any]:
    return json.loads(_blob(layout, _manifest_desc(layout)["digest"]).read_bytes())


def _set_manifest(layout: Path, manifest: dict[str, Any] | bytes, media_type: str | None = None,
                  **desc_changes: Any) -> dict[str, Any]:
    """Store ``manifest`` as a blob and point index.json's only descriptor at it."""
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    index = _index(layout)
    desc = dict(index["manifests"][0])
    desc.update(_put_blob(layout, data))
    if media_type is not None:
        desc["mediaType"] = media_type
    desc.update(desc_changes)
    index["manifests"] = [desc]
    _write_index(layout, index)
    return desc


def _edit_manifest(layout: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = _manifest(layout)
    edit(m)
    _set_manifest(layout, m)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _outside(tmp_path: Path, src: Path) -> Path:
    """A copy of ``src`` outside the image, for a symlink to point at."""
    out = tmp_path / "outside" / src.name
    out.parent.mkdir(exist_ok=True)
    shutil.copyfile(src, out)
    return out


def _symlink_out(tmp_path: Path, p: Path) -> None:
    target = _outside(tmp_path, p)
    p.unlink()
    os.symlink(target, p)


# docker-archives
def _docker_dir(facts: ImageFacts, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(facts.path) as tf:
        tf.extractall(dest, filter="data")
    return dest


def _docker_manifest(d: Path) -> list[dict[str, Any]]:
    return json.loads((d / "manifest.json").read_bytes())


def _write_docker_manifest(d: Path, doc: Any) -> None:
    (d / "manifest.json").write_bytes(json.dumps(doc).encode())


def _edit_docker_entry(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = _docker_manifest(d)
    edit(doc[0])
    _write_docker_manifest(d, doc)


def _flip_file_in_layer_tar(layer_tar: Path) -> None:
    """Change one byte of the first non-empty regular file's data inside a layer tar (the tar stays valid)."""
    with tarfile.open(layer_tar) as tf:
        member = next(m for m in tf.getmembers() if m.isfile() and m.size > 0)
    _flip(layer_tar, member.offset_data + member.size // 2)


def _finish(d: Path, form: str, tmp_path: Path) -> Path:
    return _pack(d, tmp_path / "image.tar") if form == "tar" else d


# -- OCI layout: documents --------------------------------------------------------------------------------
def _oci_manifests_null(layout: Path, tmp_path: Path) -> None:
    index = _index(layout)
    index["manifests"] = None
    _write_index(layout, index)


def _oci_index_layer_descriptor(layout: Path, tmp_path: Path) -> None:
    layer = _manifest(layout)["layers"][0]
    _write_index(layout, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [layer]})


def _oci_layer_as_manifest(layout: Path, tmp_path: Path) -> None:
    layer = _manifest(layout)["layers"][0]
    index = _index(layout)
    index["manifests"] = [{"mediaType": OCI_MANIFEST, "digest": layer["digest"], "size": layer["size"]}]
    _write_index(layout, index)


def _oci_manifest_is_index(layout: Path, tmp_path: Path) -> None:
    real = _manifest_desc(layout)
    nested = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [real]}
    _set_manifest(layout, nested, OCI_MANIFEST)


def _oci_index_is_manifest(layout: Path, tmp_path: Path) -> None:
    index = _index(layout)
    index["manifests"][0]["mediaType"] = OCI_INDEX
    _write_index(layout, index)


def _schema1(layout: Path) -> dict[str, Any]:
    m = _manifest(layout)
    return {
        "schemaVersion": 1, "name": "library/small", "tag": "1", "architecture": "amd64",
        "fsLayers": [{"blobSum": lyr["digest"]} for lyr in m["layers"]],
        "history": [{"v1Compatibility": "{}"} for _ in m["layers"]],
        "signatures": [],
    }


def _oci_schema1_oci_type(layout: Path, tmp_path: Path) -> None:
    _set_manifest(layout, _schema1(layout), OCI_MANIFEST)


def _oci_schema1_media_type(layout: Path, tmp_path: Path) -> None:
    _set_manifest(layout, _schema1(layout), SCHEMA1)


def _oci_index_oversized(layout: Path, tmp_path: Path) -> None:
    index = _index(layout)
    index.setdefault("annotations", {})["pad"] = "x" * (4 * 1024 * 1024 + 10)
    _write_index(layout, index)


def _oci_manifest_oversized(layout: Path, tmp_path: Path) -> None:
    m = _manifest(layout)
    m.setdefault("annotations", {})["pad"] = "x" * (4 * 1024 * 1024 + 10)
    _set_manifest(layout, m)


def _oci_layer_dropped(layout: Path, tmp_path: Path) -> None:
    _edit_manifest(layout, lambda m: m["layers"].pop())


def _oci_layer_added(layout: Path, tmp_path: Path) -> None:
    _edit_manifest(layout, lambda m: m["layers"].append(m["layers"][0]))


OCI_DOCUMENT_CASES: dict[str, tuple[Callable[[Path, Path], None], Any, str]] = {
    "manifests-null": (_oci_manifests_null, InvalidDocument, ""),
    "index-holds-layer-descriptor": (_oci_index_layer_descriptor, FormatError, ""),
    "layer-blob-as-manifest": (_oci_layer_as_manifest, InvalidDocument, ""),
    "manifest-blob-is-an-index": (_oci_manifest_is_index, InvalidDocument, ""),
    "index-descriptor-is-a-manifest": (_oci_index_is_manifest, InvalidDocument, ""),
    "schema1-under-oci-type": (_oci_schema1_oci_type, InvalidDocument, "schema1"),
    "schema1-media-type": (_oci_schema1_media_type, InvalidDocument, "schema1"),
    "index-json-oversized": (_oci_index_oversized, InvalidDocument, ""),
    "manifest-oversized": (_oci_manifest_oversized, (InvalidDocument, LimitExceeded), ""),
    "layer-dropped-from-manifest": (_oci_layer_dropped, InvalidDocument, ""),
    "layer-added-to-manifest": (_oci_layer_added, InvalidDocument, ""),
}


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("case", list(OCI_DOCUMENT_CASES))
def test_oci_broken_documents(tmp_path: Path, driver: str, umoci_small_image: ImageFacts, case: str,
                              form: str) -> None:
    damage, exc, needle = OCI_DOCUMENT_CASES[case]
    layout = _oci_copy(umoci_small_image, tmp_path / "layout")
    damage(layout, tmp_path)
    path = _finish(layout, form, tmp_path)
    expect_rejected(tmp_path / "store", driver, path, exc, *([needle] if needle else []))


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("name", BAD_TAGS)
def test_oci_bad_name_annotation(tmp_path: Path, driver: str, umoci_small_image: ImageFacts, name: str,
                                 form: str) -> None:
    layout = _oci_copy(umoci_small_image, tmp_path / "layout")
    index = _index(layout)
    index["manifests"][0].setdefault("annotations", {})[CONTAINERD_NAME] = name
    _write_index(layout, index)
    expect_rejected(tmp_path / "store", driver, _finish(layout, form, tmp_path), InvalidReference)


# -- OCI layout: blobs ----------------------------------------------------------------------------------
def _layer(layout: Path, i: int) -> dict[str, Any]:
    return dict(_manifest(layout)["layers"][i])


def _config_blob(layout: Path) -> Path:
    return _blob(layout, _manifest(layout)["config"]["digest"])


def _layer_header_flip(layout: Path, tmp_path: Path) -> None:
    p = _blob(layout, _layer(layout, 1)["digest"])
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    _flip(p, 4)  # gzip MTIME: the layer still decompresses to the same tar; only the blob digest is off


def _layer_data_flip(layout: Path, tmp_path: Path) -> None:
    p = _blob(layout, _layer(layout, 1)["digest"])
    _flip(p, p.stat().st_size // 2)


def _layer_size(delta: int) -> Callable[[Path, Path], None]:
    def damage(layout: Path, tmp_path: Path) -> None:
        _edit_manifest(layout, lambda m: m["layers"][1].update(size=m["layers"][1]["size"] + delta))
    return damage


def _config_size(delta: int) -> Callable[[Path, Path], None]:
    def damage(layout: Path, tmp_path: Path) -> None:
        _edit_manifest(layout, lambda m: m["config"].update(size=m["config"]["size"] + delta))
    return damage


def _manifest_size(delta: int) -> Callable[[Path, Path], None]:
    def damage(layout: Path, tmp_path: Path) -> None:
        index = _index(layout)
        index["manifests"][0]["size"] += delta
        _write_index(layout, index)
    return damage


def _layer_truncated(layout: Path, tmp_path: Path) -> None:
    _truncate(_blob(layout, _layer(layout, 1)["digest"]))


def _layer_missing(layout: Path, tmp_path: Path) -> None:
    _blob(layout, _layer(layout, 1)["digest"]).unlink()


def _config_truncated(layout: Path, tmp_path: Path) -> None:
    _truncate(_config_blob(layout))


def _config_changed(layout: Path, tmp_path: Path) -> None:
    p = _config_blob(layout)
    data = p.read_bytes()
    assert b'"A=1"' in data
    p.write_bytes(data.replace(b'"A=1"', b'"A=2"'))  # same size, still valid JSON, other digest


def _manifest_changed(layout: Path, tmp_path: Path) -> None:
    p = _blob(layout, _manifest_desc(layout)["digest"])
    data = p.read_bytes()
    i = data.index(b"sha256:") + 7
    p.write_bytes(data[:i] + (b"0" if data[i:i + 1] != b"0" else b"1") + data[i + 1:])


MISMATCH = (DigestMismatch, ArchiveError)  # too short may read as truncated, which is fine

OCI_BLOB_CASES: dict[str, tuple[Callable[[Path, Path], None], Any]] = {
    "layer-digest-mismatch-gzip-header": (_layer_header_flip, DigestMismatch),
    "layer-digest-mismatch-gzip-data": (_layer_data_flip, FormatError),
    "layer-size-larger": (_layer_size(+1), MISMATCH),
    "layer-size-smaller": (_layer_size(-1), MISMATCH),
    "layer-truncated": (_layer_truncated, FormatError),
    "layer-missing": (_layer_missing, ArchiveError),
    "config-size-larger": (_config_size(+1), MISMATCH),
    "config-size-smaller": (_config_size(-1), MISMATCH),
    "config-truncated": (_config_truncated, MISMATCH),
    "config-digest-mismatch": (_config_changed, DigestMismatch),
    "manifest-size-larger": (_manifest_size(+1), MISMATCH),
    "manifest-size-smaller": (_manifest_size(-1), MISMATCH),
    "manifest-digest-mismatch": (_manifest_changed, DigestMismatch),
}


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("case", list(OCI_BLOB_CASES))
def test_oci_broken_blobs(tmp_path: Path, driver: str, umoci_small_image: ImageFacts, case: str, form: str) -> None:
    damage, exc = OCI_BLOB_CASES[case]
    layout = _oci_copy(umoci_small_image, tmp_path / "layout")
    damage(layout, tmp_path)
    expect_rejected(tmp_path / "store", driver, _finish(layout, form, tmp_path), exc)


# -- OCI layout: links and escaping names -----------------------------------------------------------------
def _which_blob(layout: Path, which: str) -> Path:
    m = _manifest(layout)
    digest = {"manifest": _manifest_desc(layout)["digest"], "config": m["config"]["digest"],
              "layer": m["layers"][1]["digest"]}[which]
    return _blob(layout, digest)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("which", ["manifest", "config", "layer", "index.json", "oci-layout", "blobs-dir"])
def test_oci_symlink_to_outside(tmp_path: Path, driver: str, umoci_small_image: ImageFacts, which: str,
                                form: str) -> None:
    """A blob (or index.json, or the blob directory) that is a symlink to a copy outside the layout."""
    layout = _oci_copy(umoci_small_image, tmp_path / "layout")
    if which == "blobs-dir":
        target = tmp_path / "outside-blobs"
        shutil.move(layout / "blobs" / "sha256", target)
        os.symlink(target, layout / "blobs" / "sha256")
    elif which in ("index.json", "oci-layout"):
        _symlink_out(tmp_path, layout / which)
    else:
        _symlink_out(tmp_path, _which_blob(layout, which))
    # packed as a tar, a symlinked blob directory has no members under it: "missing" is a fine refusal too
    exc: Any = (UnsafePathError, ArchiveError) if which == "blobs-dir" and form == "tar" else UnsafePathError
    expect_rejected(tmp_path / "store", driver, _finish(layout, form, tmp_path), exc)


@pytest.mark.parametrize("which", ["manifest", "config", "layer", "index.json"])
def test_oci_archive_hardlink_member(tmp_path: Path, driver: str, umoci_small_image: ImageFacts, which: str) -> None:
    """An oci-archive whose blob (or index.json) is a hard link to another member with the same bytes."""
    layout = _oci_copy(umoci_small_image, tmp_path / "layout")
    target = layout / which if which == "index.json" else _which_blob(layout, which)
    name = target.relative_to(layout).as_posix()
    members = _dir_members(layout)
    members.insert(0, _reg("copy/" + target.name, target.read_bytes()))
    members = _replace_member(members, name, _link(name, "copy/" + target.name, tarfile.LNKTYPE))
    path = _write_tar(members, tmp_path / "image.tar")
    expect_rejected(tmp_path / "store", driver, path, UnsafePathError)


ESCAPING_NAMES = ["../evil", "/tmp/evil", "blobs/../../evil", "./../evil"]


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_tar_member_name_escapes(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, name: str,
                                 kind: str) -> None:
    facts = skopeo_images.oci_archive if kind == "oci-archive" else skopeo_images.docker_archive
    members = _tar_members(facts.path)
    members.insert(len(members) // 2, _reg(name, b"evil\n"))
    path = _write_tar(members, tmp_path / "image.tar")
    expect_rejected(tmp_path / "store", driver, path, UnsafePathError)


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive"])
def test_tar_blob_member_renamed_to_escape(tmp_path: Path, driver: str, skopeo_images: SkopeoImages,
                                          kind: str) -> None:
    """The real index.json / manifest.json stored as ``../<name>``: never read from outside."""
    facts = skopeo_images.oci_archive if kind == "oci-archive" else skopeo_images.docker_archive
    top = "index.json" if kind == "oci-archive" else "manifest.json"
    members = []
    for ti, data in _tar_members(facts.path):
        if ti.name == top:
            ti.name = "../" + top
        members.append((ti, data))
    path = _write_tar(members, tmp_path / "image.tar")
    expect_rejected(tmp_path / "store", driver, path, UnsafePathError)


# -- docker-archive: manifest.json ------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("content", [b"null", b"[]", b"[null]", b"{}", b"[{}]", b'[{"Config": 1}]', b"\"x\"",
                                     b"not json", b"\xff\xfe", b'[{"Config": "x.json", "Layers": "a.tar"}]',
                                     b'[{"Config": "x.json", "Layers": [1]}]'])
def test_docker_manifest_json_malformed(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, content: bytes,
                                       form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    (d / "manifest.json").write_bytes(content)
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), InvalidDocument)


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_docker_manifest_json_oversized(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    doc = _docker_manifest(d)
    doc[0]["Pad"] = "x" * (4 * 1024 * 1024 + 10)
    _write_docker_manifest(d, doc)
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), InvalidDocument)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("field", ["Config", "Layers"])
@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "./../x"])
def test_docker_manifest_paths_escape(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, field: str,
                                      bad: str, form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    # put real bytes at the escaping place, so a reader that followed the path would find something to use
    entry = _docker_manifest(d)[0]
    real = entry["Config"] if field == "Config" else entry["Layers"][0]
    if not bad.startswith("/"):
        escaped = (d / bad.replace("a/", "")).resolve()
        escaped.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(d / real, escaped)

    def edit(e: dict[str, Any]) -> None:
        if field == "Config":
            e["Config"] = bad
        else:
            e["Layers"][0] = bad

    _edit_docker_entry(d, edit)
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), UnsafePathError)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("how", ["drop-first", "drop-last", "add-one"])
def test_docker_layer_count_differs_from_diff_ids(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, how: str,
                                                  form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")

    def edit(e: dict[str, Any]) -> None:
        if how == "drop-first":
            e["Layers"].pop(0)
        elif how == "drop-last":
            e["Layers"].pop()
        else:
            e["Layers"].append(e["Layers"][0])

    _edit_docker_entry(d, edit)
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), InvalidDocument)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("tag", [*BAD_TAGS, f"example.com/small@sha256:{HEX64}", ""])
def test_docker_bad_repotags(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, tag: str, form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    _edit_docker_entry(d, lambda e: e.update(RepoTags=["example.com/good:1", tag]))
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), InvalidReference)


# -- docker-archive: content ----------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("how", ["content-changed", "renamed"])
def test_docker_config_name_digest_mismatch(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, how: str,
                                            form: str) -> None:
    """A config stored as ``<hex>.json`` whose bytes do not hash to ``<hex>``."""
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    config = _docker_manifest(d)[0]["Config"]
    hexpart = skopeo_images.docker_archive.config_digest.split(":")[1]
    assert hexpart in config, config
    if how == "content-changed":
        data = (d / config).read_bytes()
        assert b'"A=1"' in data
        (d / config).write_bytes(data.replace(b'"A=1"', b'"A=2"'))
    else:
        other = config.replace(hexpart, HEX64)
        (d / config).rename(d / other)
        _edit_docker_entry(d, lambda e: e.update(Config=other))
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), DigestMismatch)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_docker_layer_does_not_match_diff_id(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, which: int,
                                             form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    _flip_file_in_layer_tar(d / _docker_manifest(d)[0]["Layers"][which])
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), DigestMismatch)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("how", ["missing", "truncated", "garbage"])
def test_docker_layer_missing_or_broken(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, how: str,
                                        form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    p = d / _docker_manifest(d)[0]["Layers"][1]
    if how == "missing":
        p.unlink()
        exc: Any = ArchiveError
    elif how == "truncated":
        _truncate(p, 0.3)
        exc = FormatError
    else:
        p.write_bytes(os.urandom(10_000))
        exc = FormatError
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), exc)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("which", ["manifest.json", "config", "layer"])
def test_docker_symlink_to_outside(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, which: str,
                                   form: str) -> None:
    d = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
    entry = _docker_manifest(d)[0]
    name = {"manifest.json": "manifest.json", "config": entry["Config"], "layer": entry["Layers"][0]}[which]
    _symlink_out(tmp_path, d / name)
    expect_rejected(tmp_path / "store", driver, _finish(d, form, tmp_path), UnsafePathError)


@pytest.mark.parametrize("target", ["inside", "relative-outside"])
def test_docker_manifest_json_symlink_member(tmp_path: Path, driver: str, skopeo_images: SkopeoImages,
                                             target: str) -> None:
    """A tar symlink member named manifest.json (to a good copy inside the archive, or to ../manifest.json)."""
    members = _tar_members(skopeo_images.docker_archive.path)
    real = next(data for ti, data in members if ti.name == "manifest.json")
    assert real is not None
    members.insert(0, _reg("copy/manifest.json", real))
    (tmp_path / "manifest.json").write_bytes(real)
    link = "copy/manifest.json" if target == "inside" else "../manifest.json"
    members = _replace_member(members, "manifest.json", _link("manifest.json", link, tarfile.SYMTYPE))
    path = _write_tar(members, tmp_path / "image.tar")
    expect_rejected(tmp_path / "store", driver, path, UnsafePathError)


@pytest.mark.parametrize("which", ["manifest.json", "config", "layer"])
def test_docker_hardlink_member(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, which: str) -> None:
    members = _tar_members(skopeo_images.docker_archive.path)
    entry = json.loads(next(data for ti, data in members if ti.name == "manifest.json") or b"")[0]
    name = {"manifest.json": "manifest.json", "config": entry["Config"], "layer": entry["Layers"][0]}[which]
    data = next(data for ti, data in members if ti.name == name)
    assert data is not None
    members.insert(0, _reg("copy/data", data))
    members = _replace_member(members, name, _link(name, "copy/data", tarfile.LNKTYPE))
    path = _write_tar(members, tmp_path / "image.tar")
    expect_rejected(tmp_path / "store", driver, path, UnsafePathError)


# -- whole archives -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_archive_is_refused(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, kind: str,
                                       compression: str) -> None:
    facts = skopeo_images.docker_archive if kind == "docker-archive" else skopeo_images.oci_archive
    raw = facts.path.read_bytes()
    if compression == "gzip":
        data = gzip.compress(raw, compresslevel=1)
    else:
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"image.tar.{compression}"
    path.write_bytes(data)
    expect_rejected(tmp_path / "store", driver, path, ArchiveError, "compressed")


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_archive(tmp_path: Path, driver: str, skopeo_images: SkopeoImages, kind: str, keep: float) -> None:
    facts = skopeo_images.docker_archive if kind == "docker-archive" else skopeo_images.oci_archive
    path = tmp_path / "image.tar"
    path.write_bytes(facts.path.read_bytes()[: int(facts.path.stat().st_size * keep)])
    expect_rejected(tmp_path / "store", driver, path, FormatError)


def test_not_an_image(tmp_path: Path, driver: str) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    expect_rejected(tmp_path / "store", driver, d, FormatError)
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    expect_rejected(tmp_path / "store", driver, junk, ArchiveError)
    expect_rejected(tmp_path / "store", driver, tmp_path / "does-not-exist", ArchiveError)


# -- a failure after some layers were applied -------------------------------------------------------------
BASE_NAME = "example.com/base:1"


def _base_layout(small: ImageFacts, dest: Path) -> Path:
    """The small image cut down to its first layer, under another name: shares layer 1 with it."""
    layout = _oci_copy(small, dest)
    m = _manifest(layout)
    config = json.loads(_blob(layout, m["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:1]
    kept, history = 0, []
    for h in config.get("history", []):
        if not h.get("empty_layer"):
            kept += 1
            if kept > 1:
                continue
        history.append(h)
    config["history"] = history
    m["config"].update(_put_blob(layout, json.dumps(config).encode()))
    m["layers"] = m["layers"][:1]
    _set_manifest(layout, m, annotations={CONTAINERD_NAME: BASE_NAME, "org.opencontainers.image.ref.name": "1"})
    return layout


def _regzip_layer_with_other_content(layout: Path, i: int) -> None:
    """Layer ``i`` replaced by a valid gzip of a tar that differs from its DiffID; the descriptor matches it."""
    blob = _blob(layout, _layer(layout, i)["digest"])
    tar_path = layout.parent / "layer.tar"
    tar_path.write_bytes(gzip.decompress(blob.read_bytes()))
    _flip_file_in_layer_tar(tar_path)
    new = _put_blob(layout, gzip.compress(tar_path.read_bytes()))
    _edit_manifest(layout, lambda m: m["layers"][i].update(new))


@pytest.mark.parametrize("how", ["oci-diff-id", "oci-truncated", "oci-digest", "docker-diff-id", "docker-truncated"])
def test_third_layer_broken_leaves_nothing_and_keeps_shared_layer(
    tmp_path: Path, driver: str, umoci_small_image: ImageFacts, skopeo_images: SkopeoImages, how: str
) -> None:
    store = tmp_path / "store"
    base = _base_layout(umoci_small_image, tmp_path / "base")
    base_manifest = _manifest_desc(base)["digest"]
    with _open(store, driver) as svc:
        [loaded] = svc.load_image(base)
        base_id = loaded.image.id
        base_layers = sorted(layer.chain_id for layer in svc.layers())
        assert len(base_layers) == 1
    if how.startswith("oci"):
        path = _oci_copy(umoci_small_image, tmp_path / "layout")
        if how == "oci-diff-id":
            _regzip_layer_with_other_content(path, 2)
        elif how == "oci-truncated":
            _truncate(_blob(path, _layer(path, 2)["digest"]), 0.7)
        else:
            p = _blob(path, _layer(path, 2)["digest"])
            _flip(p, 4)
    else:
        path = _docker_dir(skopeo_images.docker_archive, tmp_path / "archive")
        layer3 = path / _docker_manifest(path)[0]["Layers"][2]
        if how == "docker-diff-id":
            _flip_file_in_layer_tar(layer3)
        else:
            _truncate(layer3, 0.7)
    seen: list[dict[str, Any]] = []
    with _open(store, driver) as svc:
        before = _state(svc, store)
        with pytest.raises(LaminaError) as ei:
            svc.load_image(path, progress=seen.append)
        assert isinstance(ei.value, FormatError), repr(ei.value)
        assert "\n" not in str(ei.value)
        # layers 1 (present) and 2 (applied) went fine before layer 3 failed
        done = {(e["index"], e["status"]) for e in seen if e.get("event") == "layer"}
        assert (1, "exists") in done and (2, "done") in done, seen
        assert _state(svc, store) == before
    _assert_one_line_cli_error(_cli(store, driver, "load", "-q", "-i", str(path)))
    with _open(store, driver) as svc:
        assert _state(svc, store) == before
        assert [i.id for i in svc.images()] == [base_id]
        assert sorted(layer.chain_id for layer in svc.layers()) == base_layers
        out = tmp_path / "saved"
        svc.export_image([BASE_NAME], out, "oci-dir")
        assert _manifest_desc(out)["digest"] == base_manifest
        svc.export_image([BASE_NAME], tmp_path / "saved.tar", "docker-archive")
        assert _state(svc, store) == before
    # and the good image still loads on top of the base afterwards
    with _open(store, driver) as svc:
        [good] = svc.load_image(umoci_small_image.path)
        assert good.image.id == umoci_small_image.config_digest
        assert len(svc.layers()) == 3


# -- SIGKILL during a load ------------------------------------------------------------------------------
def _crash_drivers() -> list[str]:
    return ["vfs", "tarball", "overlay"]


def _image_blobs(svc: ImageService) -> set[str]:
    store = svc.image_store
    out: set[str] = set()
    for rec in store.all():
        out.update(d.split(":", 1)[1] for d in store.blobs(rec.id))
    return out


def _check_consistent(svc: ImageService, store: Path, image: ImageFacts) -> bool:
    """After a kill: no half image, no stray layer, no stray blob. Returns whether the image is visible."""
    images = svc.images(all=True)
    assert [i.id for i in images] in ([], [image.config_digest]), [i.id for i in images]
    state = _state(svc, store)
    assert state["ingest"] == [], state
    if images:
        img = svc.get_image(image.config_digest)
        assert sorted(layer.chain_id for layer in svc.layers()) == sorted(img.chain)
        assert set(state["blobs"]) <= _image_blobs(svc)
        assert image.manifest_digest.split(":")[1] in state["blobs"]
    else:
        assert state["layers"] == [], state
        assert state["blobs"] == [], state
    return bool(images)


@pytest.mark.parametrize("driver_name", _crash_drivers())
def test_sigkill_during_load_keeps_store_consistent(tmp_path: Path, driver_name: str,
                                                    debian_image_oci: ImageFacts) -> None:
    if driver_name == "overlay":
        from lamina.testing import require_root

        require_root()
    image = debian_image_oci
    store = tmp_path / "store"
    with _open(store, driver_name):
        pass
    # how long a whole load takes here, in a scratch store, to spread the kills over it
    scratch = tmp_path / "scratch"
    with _open(scratch, driver_name):
        pass
    t0 = time.monotonic()
    proc = _cli(scratch, driver_name, "load", "-q", "-i", str(image.path))
    duration = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.decode()
    shutil.rmtree(scratch)
    rng = random.Random(0x1A111A + len(driver_name))
    cmd = _cli_cmd(store, driver_name, "load", "-q", "-i", str(image.path))
    outcomes = []
    for delay in sorted(rng.uniform(0.05, duration * 0.8) for _ in range(6)):  # the end is the commit
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(store))
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with _open(store, driver_name) as svc:
            visible = _check_consistent(svc, store, image)
            outcomes.append((round(delay, 2), visible))
            if visible:  # start over, so the next kill hits a load again
                svc.image_delete(image.config_digest, force=True)
                assert _state(svc, store) == {"images": [], "layers": [], "blobs": [], "ingest": []}
    assert any(not visible for _, visible in outcomes), ("no kill landed before the commit", duration, outcomes)
    # after all that, a load succeeds and a save of it reproduces the source manifest
    proc = _cli(store, driver_name, "load", "-q", "-i", str(image.path))
    assert proc.returncode == 0, (outcomes, proc.stderr.decode())
    with _open(store, driver_name) as svc:
        assert _check_consistent(svc, store, image)
    out = tmp_path / "saved"
    proc = _cli(store, driver_name, "save", "--format", "oci-dir", "-o", str(out), DEBIAN_NAME)
    assert proc.returncode == 0, proc.stderr.decode()
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{out}:bookworm"], capture_output=True, check=True).stdout
    assert _sha(raw) == image.manifest_digest

"""Images end to end, checked against images other tools wrote (umoci, skopeo) and read back by them.

skopeo and umoci are the oracles: what lamina loads must show the names, IDs and digests skopeo reports,
and what lamina saves must inspect (skopeo) and unpack (umoci) to the same digests and trees.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import lamina_cli
from image_fixtures import (
    SMALL_DOCKER_NAME,
    ImageFacts,
    SkopeoImages,
    inspect_image,
    skopeo,
    unpack_rootfs,
)
from lamina import ImageService
from lamina.config import Config
from lamina.errors import (
    AmbiguousImage,
    ArchiveError,
    ExportError,
    ImageConflict,
    ImageError,
    ImageNotFound,
    InvalidChange,
    InvalidReference,
)
from lamina.testing import TarBuilder, require_root, tree_snapshot

DRIVERS = ["vfs", "tarball", "overlay"]


def _open(tmp: Path, driver: str, **kw: Any) -> ImageService:
    if driver == "overlay":
        require_root()
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver=driver, **kw))


def _blobs(root: Path) -> set[str]:
    d = root / "content" / "blobs" / "sha256"
    return {"sha256:" + p.name for p in d.iterdir()} if d.exists() else set()


def _raw_digest(ref: str) -> str:
    return "sha256:" + hashlib.sha256(skopeo("inspect", "--raw", ref)).hexdigest()


# -- load: what other tools wrote ----------------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_load_oci_layout_written_by_umoci(tmp_path: Path, driver: str, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path, driver) as svc:
        [loaded] = svc.load_image(facts.path)
        img = loaded.image
        assert img.id == facts.config_digest
        assert img.tags == ("docker.io/library/small:1",)
        assert f"docker.io/library/small@{facts.manifest_digest}" in img.digests
        got = svc.get_image("small:1")
        assert got.diff_ids == list(facts.diff_ids)
        assert svc.get_image_manifest("small:1") == {
            "mediaType": facts.manifest_media_type, "digest": facts.manifest_digest,
            "size": len(skopeo("inspect", "--raw", facts.ref())),
        }
        info = svc.inspect_image("small:1")
        assert info["Layers"] == list(facts.layer_digests)
        assert info["Config"]["Env"][-1] == "A=1" and info["Labels"] == {"k": "v"}
        # every layer is there, in chain order, each holding the image's blobs byte-exact
        assert [la.diff_id for la in svc.layers()] == list(facts.diff_ids)
        assert _blobs(tmp_path / "root") == {facts.manifest_digest, facts.config_digest, *facts.layer_digests}
        [summary] = svc.images()
        assert summary.repo_tags == ["small:1"] and summary.size > (1 << 20)
        if svc.capabilities().can_mount:
            with svc.mounted_layer(got.chain[-1]) as path:
                assert facts.rootfs is not None
                assert tree_snapshot(path) == tree_snapshot(str(facts.rootfs))


@pytest.mark.parametrize("driver", DRIVERS)
def test_load_formats_written_by_skopeo(tmp_path: Path, driver: str, skopeo_images: SkopeoImages) -> None:
    with _open(tmp_path, driver) as svc:
        for facts in (skopeo_images.zstd_oci, skopeo_images.docker_archive, skopeo_images.oci_archive):
            [loaded] = svc.load_image(facts.path)
            assert loaded.image.id == facts.config_digest
        img = svc.get_image(SMALL_DOCKER_NAME)
        assert img.diff_ids == list(skopeo_images.zstd_oci.diff_ids)
        # one image, three sources: the layers were applied once
        assert len(svc.layers()) == len(img.diff_ids)
        assert sorted(svc.images()[0].repo_tags) == ["example.com/small:1", "small:1"]
        assert skopeo_images.zstd_oci.layer_media_types[0].endswith("+zstd")
        assert set(skopeo_images.zstd_oci.layer_digests) <= _blobs(tmp_path / "root")


def test_two_names_in_one_layout(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    with _open(tmp_path, "vfs") as svc:
        [loaded] = svc.load_image(skopeo_images.two_names_oci.path)
        assert set(loaded.image.tags) == {"docker.io/library/small:1", "example.com/small:latest"}
        assert svc.get_image("example.com/small").id == svc.get_image("small:1").id


# -- save: read back by skopeo and umoci ----------------------------------------------------------------------
@pytest.mark.parametrize("driver", DRIVERS)
def test_save_oci_reproduces_every_digest(tmp_path: Path, driver: str, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path, driver) as svc:
        svc.load_image(facts.path)
        svc.export_image(["small:1"], tmp_path / "out", "oci-dir")
        svc.export_image(["small:1"], tmp_path / "out.tar", "oci-archive")
    out = inspect_image("oci", tmp_path / "out", "1")
    assert out.manifest_digest == facts.manifest_digest
    assert out.config_digest == facts.config_digest
    assert out.layer_digests == facts.layer_digests
    assert _raw_digest(f"oci-archive:{tmp_path / 'out.tar'}:1") == facts.manifest_digest
    rootfs = unpack_rootfs(tmp_path / "out", "1", tmp_path / "bundle")
    assert facts.rootfs is not None
    assert tree_snapshot(str(rootfs)) == tree_snapshot(str(facts.rootfs))


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_save_docker_archive(tmp_path: Path, driver: str, skopeo_images: SkopeoImages) -> None:
    src = skopeo_images.docker_archive
    with _open(tmp_path, driver) as svc:
        svc.load_image(src.path)
        svc.export_image([SMALL_DOCKER_NAME], tmp_path / "out.tar", "docker-archive")
    out = inspect_image("docker-archive", tmp_path / "out.tar")
    assert out.config_digest == src.config_digest
    assert out.layer_digests == src.diff_ids  # docker-archive layers are the exact uncompressed streams
    assert out.names == (SMALL_DOCKER_NAME,)
    # and lamina reads its own archive back into the same image
    with _open(tmp_path / "again", "vfs") as svc:
        [loaded] = svc.load_image(tmp_path / "out.tar")
        assert loaded.image.id == src.config_digest


def _sparse_layer() -> bytes:
    """A layer whose exact export needs every kind of payload: a sparse file's data segments, a payload the
    layer replaced later (kept beside the record), a file larger than one copy, an empty file."""
    from test_tarformat import END, info, plain, sparse_entry

    return (plain(info("d", tarfile.DIRTYPE))
            + sparse_entry("1.0", "d/sparse", [(7, 5), (1 << 30, 6)], 1 << 31, b"first" + b"second")
            + plain(info("d/f"), b"replaced later")
            + plain(info("d/f"), b"the file now")
            + plain(info("d/empty"))
            + plain(info("big"), os.urandom(3 << 20) + b"odd")
            + END)


@pytest.mark.parametrize("driver", DRIVERS)
def test_save_copies_every_kind_of_payload_exactly(tmp_path: Path, driver: str) -> None:
    """A save into a file copies the file bodies in the kernel: the archive's layer is the layer's exact
    stream (docker-archive: as is; OCI layout: the blob lamina compressed from it)."""
    data = _sparse_layer()
    diff_id = hashlib.sha256(data).hexdigest()
    with _open(tmp_path, driver) as svc:
        svc.import_image(io.BytesIO(data), "example.com/payloads:1")
        svc.export_image(["example.com/payloads:1"], tmp_path / "out.tar", "docker-archive")
        svc.export_image(["example.com/payloads:1"], tmp_path / "out", "oci-dir")
    with tarfile.open(tmp_path / "out.tar") as t:
        member = t.extractfile(f"{diff_id}.tar")
        assert member is not None and member.read() == data
    [layer] = _manifest_of(tmp_path / "out")["layers"]
    blob = (tmp_path / "out" / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
    assert gzip.decompress(blob) == data


def _manifest_of(layout: Path) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_bytes())
    digest = index["manifests"][0]["digest"].split(":")[1]
    return dict(json.loads((layout / "blobs" / "sha256" / digest).read_bytes()))


@pytest.mark.parametrize("damage", ["changed", "shorter"])
def test_save_of_a_damaged_layer_fails_and_leaves_nothing(tmp_path: Path, damage: str) -> None:
    """The kernel's copy is verified: the archive's bytes are hashed and checked against the DiffID."""
    data = _sparse_layer()
    with _open(tmp_path, "vfs") as svc:
        svc.import_image(io.BytesIO(data), "example.com/payloads:1")
        [layer_dir] = (tmp_path / "root" / "vfs" / "dir").iterdir()
        big = layer_dir / "big"
        body = big.read_bytes()
        big.write_bytes(body[:-1] + b"!" if damage == "changed" else body[:-1])
        expected = "no longer matches its DiffID" if damage == "changed" else "'big' of the layer is shorter"
        for fmt, out in (("docker-archive", "out.tar"), ("oci-dir", "out")):
            with pytest.raises(ExportError, match=expected):
                svc.export_image(["example.com/payloads:1"], tmp_path / out, fmt)
    assert sorted(os.listdir(tmp_path)) == ["root", "run"]


def test_save_onto_a_full_disk_fails_cleanly_then_succeeds(tmp_path: Path) -> None:
    """The kernel's copy into another filesystem (ext4 has no copy_file_range of its own between two of
    them: sendfile does it) that fills up: an error and no partial archive; with the space back, the
    archive is exact."""
    from fault_fixtures import fill, loop_ext4

    data = _sparse_layer()
    with _open(tmp_path, "vfs") as svc, loop_ext4(tmp_path, 16) as disk:
        svc.import_image(io.BytesIO(data), "example.com/payloads:1")
        filler = fill(disk, 1 << 20)
        with pytest.raises(ExportError, match="cannot write"):
            svc.export_image(["example.com/payloads:1"], disk / "out.tar", "docker-archive")
        assert sorted(p.name for p in disk.iterdir() if p.name != "lost+found") == ["filler"]
        filler.unlink()
        svc.export_image(["example.com/payloads:1"], disk / "out.tar", "docker-archive")
        with tarfile.open(disk / "out.tar") as t:
            member = t.extractfile(f"{hashlib.sha256(data).hexdigest()}.tar")
            assert member is not None and member.read() == data


def test_docker_archive_origin_saved_as_oci_is_deterministic(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    src = skopeo_images.docker_archive
    with _open(tmp_path, "vfs") as svc:
        svc.load_image(src.path)
        svc.export_image([SMALL_DOCKER_NAME], tmp_path / "a", "oci-dir")
        svc.export_image([SMALL_DOCKER_NAME], tmp_path / "b", "oci-dir")
    a = inspect_image("oci", tmp_path / "a", "1")
    b = inspect_image("oci", tmp_path / "b", "1")
    assert a.manifest_digest == b.manifest_digest
    assert a.diff_ids == src.diff_ids and a.config_digest == src.config_digest


def test_keep_layer_blobs_false_recompresses_deterministically(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path, "vfs", keep_layer_blobs=False) as svc:
        svc.load_image(facts.path)
        assert not (set(facts.layer_digests) & _blobs(tmp_path / "root"))  # compressed blobs dropped
        svc.export_image(["small:1"], tmp_path / "a", "oci-dir")
        svc.export_image(["small:1"], tmp_path / "b", "oci-dir")
        assert not (_blobs(tmp_path / "root") - {facts.manifest_digest, facts.config_digest})
    a = inspect_image("oci", tmp_path / "a", "1")
    b = inspect_image("oci", tmp_path / "b", "1")
    assert a.manifest_digest == b.manifest_digest != facts.manifest_digest
    assert a.layer_digests != facts.layer_digests and a.config_digest == facts.config_digest
    rootfs = unpack_rootfs(tmp_path / "a", "1", tmp_path / "bundle")
    assert facts.rootfs is not None
    assert tree_snapshot(str(rootfs)) == tree_snapshot(str(facts.rootfs))


# -- the realistic image --------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_debian_image_round_trip(
    tmp_path: Path, driver: str, debian_image_oci: ImageFacts, debian_image_docker_archive: ImageFacts
) -> None:
    out = lamina_cli("--driver", driver, "load", "-i", str(debian_image_docker_archive.path), root=tmp_path)
    assert out.stdout.decode().strip() == f"Loaded image: {debian_image_docker_archive.names[0]}"
    lamina_cli("load", "-i", str(debian_image_oci.path), root=tmp_path)
    listing = json.loads(lamina_cli("--format", "json", "images", root=tmp_path).stdout)
    assert len(listing) == 1
    assert listing[0]["Id"] == debian_image_oci.config_digest
    assert sorted(listing[0]["RepoTags"]) == ["debian:bookworm", "example.com/debian:bookworm"]
    lamina_cli("save", "--format", "oci-dir", "-o", str(tmp_path / "out"), "debian:bookworm", root=tmp_path)
    assert _raw_digest(f"oci:{tmp_path / 'out'}:bookworm") == debian_image_oci.manifest_digest


# -- import ----------------------------------------------------------------------------------------------------
def test_import_with_changes(tmp_path: Path) -> None:
    tar = TarBuilder().dir("bin").file("bin/sh", b"#!fake\n", mode=0o755).build()
    (tmp_path / "rootfs.tar").write_bytes(tar)
    out = lamina_cli("import", str(tmp_path / "rootfs.tar"), "example.com/imported:1",
                     "--change", 'CMD ["sh"]', "--change", "ENV A=1", "-c", "WORKDIR /srv", "-c", "EXPOSE 80",
                     "-m", "from a tarball", root=tmp_path)
    image_id = out.stdout.decode().strip()
    info = json.loads(lamina_cli("inspect", "example.com/imported:1", root=tmp_path).stdout)[0]
    assert info["Id"] == image_id
    assert info["Config"]["Cmd"] == ["sh"]
    assert "A=1" in info["Config"]["Env"]
    assert info["Config"]["WorkingDir"] == "/srv" and info["Config"]["ExposedPorts"] == {"80/tcp": {}}
    assert info["RootFS"]["Layers"] == ["sha256:" + hashlib.sha256(tar).hexdigest()]
    assert info["History"][0]["comment"] == "from a tarball"
    assert info["Os"] == "linux" and info["Architecture"]
    # skopeo reads what lamina made of it
    lamina_cli("save", "--format", "oci-archive", "-o", str(tmp_path / "i.tar"), "example.com/imported:1",
               root=tmp_path)
    cfg = json.loads(skopeo("inspect", "--config", f"oci-archive:{tmp_path / 'i.tar'}:1"))
    assert cfg["config"]["Cmd"] == ["sh"]


def test_import_bad_change_stores_nothing(tmp_path: Path) -> None:
    (tmp_path / "rootfs.tar").write_bytes(TarBuilder().file("a", b"x").build())
    with _open(tmp_path, "vfs") as svc:
        with pytest.raises(InvalidChange), open(tmp_path / "rootfs.tar", "rb") as f:
            svc.import_image(f, "x:1", changes=["RUN rm -rf /"])
        assert svc.layers() == [] and svc.images() == []
    proc = lamina_cli("import", str(tmp_path / "rootfs.tar"), "x", "-c", "FROM scratch", root=tmp_path, check=False)
    assert proc.returncode != 0 and b"Traceback" not in proc.stderr


# -- names, lookup, filters, removal -------------------------------------------------------------------------
def _import(svc: ImageService, name: str | None, content: bytes, label: str = "") -> str:
    import io

    tar = TarBuilder().file("f", content).build()
    changes = [f"LABEL {label}"] if label else []
    return svc.import_image(io.BytesIO(tar), name, changes=changes).id


def test_lookup_by_id_prefix_and_ambiguity(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs") as svc:
        ids = [_import(svc, f"img{i}:1", str(i).encode()) for i in range(5)]
        one = ids[0]
        hexid = one.split(":")[1]
        assert svc.get_image(hexid[:12]).id == one
        assert svc.get_image(one).id == one and svc.get_image(hexid).id == one
        assert svc.get_image("sha256:" + hexid[:8]).id == one
        with pytest.raises(ImageNotFound):
            svc.get_image(hexid[:2])  # fewer than 3 hex characters is no ID prefix
        # import until two IDs share their first 3 hex characters (birthday bound: ~75 images)
        seen = {i[7:10]: i for i in ids}
        n = len(ids)
        while True:
            new = _import(svc, None, str(n).encode())
            n += 1
            if new[7:10] in seen:
                break
            seen[new[7:10]] = new
        with pytest.raises(AmbiguousImage, match="ambiguous") as e:
            svc.get_image(new[7:10])
        assert new[7:19] in str(e.value) and seen[new[7:10]][7:19] in str(e.value)
        assert svc.get_image(new[7:20]).id == new
        with pytest.raises(ImageNotFound):
            svc.get_image("nosuchimage")
        with pytest.raises(ImageNotFound):
            svc.get_image("sha256:" + "0" * 64)


def test_bad_names_rejected(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs") as svc:
        _import(svc, "ok:1", b"x")
        for bad in ["UPPER:1", "a/../b", "a:b:c", "x@sha256:zz", "a" * 64, "", "name:" + "t" * 200]:
            with pytest.raises((InvalidReference, ImageError)):
                svc.tag_image("ok:1", bad)
        assert svc.images()[0].repo_tags == ["ok:1"]


def test_filters(tmp_path: Path) -> None:
    import time

    with _open(tmp_path, "vfs") as svc:
        a = _import(svc, "a:1", b"a", label="team=red")
        time.sleep(0.01)
        b = _import(svc, "b:1", b"b", label="team=blue")
        time.sleep(0.01)
        c = _import(svc, None, b"c")
        assert [s.id for s in svc.images()] == [c, b, a]  # newest first
        assert [s.id for s in svc.images({"dangling": ["true"]})] == [c]
        assert [s.id for s in svc.images({"dangling": ["false"]})] == [b, a]
        assert [s.id for s in svc.images({"label": ["team=red"]})] == [a]
        assert [s.id for s in svc.images({"label": ["team"]})] == [b, a]
        assert [s.id for s in svc.images({"before": ["b:1"]})] == [a]
        assert [s.id for s in svc.images({"since": ["a:1"]})] == [c, b]
        assert [s.id for s in svc.images({"reference": ["a*"]})] == [a]
        assert [s.id for s in svc.images({"reference": ["docker.io/library/b:*"]})] == [b]
        assert svc.images()[0].repo_tags == [] and svc.count_images() == 3
        with pytest.raises(ImageError, match="invalid filter"):
            svc.images({"color": ["red"]})
        with pytest.raises(ImageError):
            svc.images({"dangling": ["maybe"]})
    proc = lamina_cli("images", "--filter", "nope=1", root=tmp_path, check=False)
    assert proc.returncode != 0 and b"invalid filter" in proc.stderr and b"Traceback" not in proc.stderr


def test_tag_moves_and_untag_deletes_last_name(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs") as svc:
        a = _import(svc, "app:1", b"a")
        b = _import(svc, "other:1", b"b")
        svc.tag_image("app:1", "app:latest")
        svc.tag_image(b, "app:1")  # the tag moves to b
        assert svc.get_image("app:1").id == b and svc.get_image("app").id == a
        # cri-o UntagImage: removing a name that is not the last keeps the image
        assert svc.untag_image("other:1", "other:1") == [{"Untagged": "other:1"}]
        assert svc.get_image(b).id == b
        # removing the last name deletes the image and releases its layers
        layers_before = len(svc.layers())
        out = svc.untag_image("app:1", "app:1")
        assert out == [{"Untagged": "app:1"}, {"Deleted": b}]
        assert len(svc.layers()) == layers_before - 1
        with pytest.raises(InvalidReference):
            svc.untag_image("app", "nosuch:tag")


def test_rmi_semantics(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path, "vfs") as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        iid = loaded.image.id
        svc.tag_image("small:1", "example.com/other:2")
        # by ID with names in two repositories: a soft conflict that --force overrides
        with pytest.raises(ImageConflict, match="multiple repositories"):
            svc.image_delete(iid[7:19])
        # by name: untag only (the repository's last tag takes its digest name along); the image keeps its
        # other name
        assert svc.image_delete("example.com/other:2") == [
            {"Untagged": "example.com/other:2"}, {"Untagged": f"example.com/other@{umoci_small_image.manifest_digest}"},
        ]
        # by name, last tag: the repository's digest name goes with it and the image is deleted
        out = svc.image_delete("small:1")
        assert out[0] == {"Untagged": "small:1"} and out[-1] == {"Deleted": iid}
        assert any("small@sha256:" in v for d in out for v in d.values())
        assert svc.images() == [] and svc.layers() == []
        assert _blobs(tmp_path / "root") == set()  # garbage collected
        svc.load_image(umoci_small_image.path)
        svc.tag_image("small:1", "example.com/other:2")
        out = svc.image_delete(iid, force=True)
        assert {"Deleted": iid} in out and svc.images() == []


def test_layer_rm_cannot_pull_a_layer_from_under_an_image(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path, "vfs") as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        top = svc.get_image(loaded.image.id).chain[-1]
    proc = lamina_cli("--driver", "vfs", "layer", "rm", top, root=tmp_path, check=False)
    assert proc.returncode != 0 and b"used by image" in proc.stderr


def test_cli_lifecycle(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    src = skopeo_images.oci_archive
    lamina_cli("load", "-i", str(src.path), root=tmp_path)
    lines = lamina_cli("images", root=tmp_path).stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["REPOSITORY", "TAG", "IMAGE"] and lines[1].split()[:2] == ["small", "1"]
    short = src.config_digest[7:19]
    assert lamina_cli("images", "-q", root=tmp_path).stdout.decode().split() == [short]
    hist = json.loads(lamina_cli("history", "--format", "json", "small:1", root=tmp_path).stdout)
    assert hist[0]["Id"] == src.config_digest
    assert len([h for h in hist if not h["EmptyLayer"]]) == len(src.diff_ids)
    lamina_cli("tag", "small:1", "example.com/x:9", root=tmp_path)
    assert "example.com/x:9" in lamina_cli("images", root=tmp_path).stdout.decode().replace("  ", " ").replace(
        "example.com/x 9", "example.com/x:9")
    lamina_cli("untag", "small:1", "example.com/x:9", root=tmp_path)
    lamina_cli("rmi", "small:1", root=tmp_path)
    assert lamina_cli("images", "-q", root=tmp_path).stdout == b""
    proc = lamina_cli("rmi", "small:1", root=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.decode().startswith("Error: image") and b"Traceback" not in proc.stderr


def test_save_refuses_existing_output_and_leaves_nothing(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with _open(tmp_path, "vfs") as svc:
        svc.load_image(umoci_small_image.path)
        with pytest.raises(Exception) as e:
            svc.export_image(["small:1"], tmp_path / "busy", "oci-dir")
        assert "already exists" in str(e.value)
        with pytest.raises(ImageNotFound):
            svc.export_image(["small:1", "nosuch:1"], tmp_path / "o.tar", "docker-archive")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["busy", "root", "run"]


def test_load_progress_events(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    events: list[dict[str, Any]] = []
    with _open(tmp_path, "vfs") as svc:
        svc.load_image(umoci_small_image.path, progress=events.append)
        done = [e for e in events if e["status"] == "done"]
        assert [e["index"] for e in done] == [1, 2, 3]
        events.clear()
        svc.load_image(umoci_small_image.path, progress=events.append)
        assert {e["status"] for e in events} == {"exists"}


def test_skopeo_can_copy_what_lamina_saved(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    with _open(tmp_path, "vfs") as svc:
        svc.load_image(skopeo_images.zstd_oci.path)
        svc.export_image(["small:1"], tmp_path / "out", "oci-dir")
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{tmp_path / 'out'}:1", f"oci:{tmp_path / 'copy'}:1"],
                   check=True)
    assert _raw_digest(f"oci:{tmp_path / 'copy'}:1") == skopeo_images.zstd_oci.manifest_digest


def _multi_platform_layout(src: ImageFacts, dest: Path) -> tuple[str, str]:
    """``src`` under an index with two platforms: the real manifest as the host's, an annotated copy of it as
    linux/arm64 (the same config and layers, another digest). Returns both manifest digests."""
    import shutil

    from lamina.formats import oci

    shutil.copytree(src.path, dest)
    raw = skopeo("inspect", "--raw", src.ref())
    doc = json.loads(raw)
    doc["annotations"] = {"example.platform": "arm64"}
    other = json.dumps(doc, separators=(",", ":")).encode()
    digests = []
    for data in (raw, other):
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / d[7:]).write_bytes(data)
        digests.append(d)
    host = oci.host_platform()
    index = oci.build_index([
        oci.Descriptor(oci.MEDIA_TYPE_MANIFEST, digests[0], len(raw), platform=host),
        oci.Descriptor(oci.MEDIA_TYPE_MANIFEST, digests[1], len(other),
                       platform=oci.Platform("linux", "arm64", "v8")),
    ])
    idx = "sha256:" + hashlib.sha256(index).hexdigest()
    (dest / "blobs" / "sha256" / idx[7:]).write_bytes(index)
    top = {"schemaVersion": 2, "manifests": [{"mediaType": oci.MEDIA_TYPE_INDEX, "digest": idx, "size": len(index),
                                              "annotations": {"org.opencontainers.image.ref.name": "multi:1"}}]}
    (dest / "index.json").write_text(json.dumps(top))
    return digests[0], digests[1]


def test_platform_selection_from_an_index(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    from lamina.errors import PlatformNotFound
    from lamina.formats import oci

    host_digest, arm_digest = _multi_platform_layout(umoci_small_image, tmp_path / "multi")
    with _open(tmp_path / "a", "vfs") as svc:
        svc.load_image(tmp_path / "multi")
        manifest = svc.get_image_manifest("multi:1")
        assert manifest is not None and manifest["digest"] == host_digest
    with _open(tmp_path / "b", "vfs") as svc:
        svc.load_image(tmp_path / "multi", platform=oci.parse_platform("linux/arm64"))
        manifest = svc.get_image_manifest("multi:1")
        assert manifest is not None and manifest["digest"] == arm_digest
        with pytest.raises(PlatformNotFound):
            svc.load_image(tmp_path / "multi", platform=oci.parse_platform("linux/s390x"))
    proc = lamina_cli("load", "-i", str(tmp_path / "multi"), "--platform", "linux/ppc64le", root=tmp_path / "c",
                      check=False)
    assert proc.returncode == 1 and b"no manifest for platform" in proc.stderr
    assert lamina_cli("images", "-q", root=tmp_path / "c", check=False).stdout == b""


def test_load_legacy_docker_save_layout(tmp_path: Path, skopeo_images: SkopeoImages) -> None:
    """Older ``docker save`` output: per-layer directories (``<id>/layer.tar``, ``VERSION``, ``json``) and a
    ``repositories`` file beside ``manifest.json``."""
    import tarfile

    src = skopeo_images.docker_archive
    with tarfile.open(src.path) as t:
        manifest = json.loads(t.extractfile("manifest.json").read())  # type: ignore[union-attr]
        members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
    entry = manifest[0]
    legacy_layers = []
    out = tmp_path / "legacy.tar"
    with tarfile.open(out, "w") as t:
        def add(name: str, data: bytes) -> None:
            import io

            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        for i, path in enumerate(entry["Layers"]):
            v1 = hashlib.sha256(f"v1-{i}".encode()).hexdigest()
            t.addfile(_dir_info(v1))
            add(f"{v1}/VERSION", b"1.0")
            add(f"{v1}/json", json.dumps({"id": v1}).encode())
            add(f"{v1}/layer.tar", members[path])
            legacy_layers.append(f"{v1}/layer.tar")
        add(entry["Config"], members[entry["Config"]])
        add("manifest.json", json.dumps([{**entry, "Layers": legacy_layers}]).encode())
        add("repositories", json.dumps({"example.com/small": {"1": legacy_layers[-1].split("/")[0]}}).encode())
    with _open(tmp_path, "tarball") as svc:
        [loaded] = svc.load_image(out)
        assert loaded.image.id == src.config_digest and loaded.image.tags == (SMALL_DOCKER_NAME,)
        assert [la.diff_id for la in svc.layers()] == list(src.diff_ids)


def _dir_info(name: str) -> Any:
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def test_rmi_prunes_untagged_parents_and_refuses_parents_of_children(tmp_path: Path) -> None:
    with _open(tmp_path, "vfs") as svc:
        base = _import(svc, None, b"base")
        mid = _import(svc, None, b"mid")
        child = _import(svc, "child:1", b"child")
        other = _import(svc, "other:1", b"other")
        db = svc.store.db.db  # parents are recorded by commit (containers); set them here directly
        db.execute("UPDATE images SET parent=? WHERE id=?", (base, mid))
        db.execute("UPDATE images SET parent=? WHERE id=?", (mid, child))
        db.execute("UPDATE images SET parent=? WHERE id=?", (base, other))
        assert svc.children(base) == [mid, other]
        assert set(svc.heads()) == {child, other}
        # intermediate images are hidden unless --all
        assert {s.id for s in svc.images()} == {child, other}
        assert {s.id for s in svc.images(all=True)} == {base, mid, child, other}
        with pytest.raises(ImageConflict, match="child"):
            svc.image_delete(mid[7:19])
        # removing the child prunes its untagged parent, but not base, which still has a child
        out = svc.image_delete("child:1")
        assert out == [{"Untagged": "child:1"}, {"Deleted": child}, {"Deleted": mid}]
        assert {s.id for s in svc.images(all=True)} == {base, other}
        out = svc.image_delete("other:1", prune=False)
        assert out == [{"Untagged": "other:1"}, {"Deleted": other}]
        assert [s.id for s in svc.images(all=True)] == [base]


def _archive(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    """A tar of (name, data, symlink target) members."""
    import io
    import tarfile

    with tarfile.open(path, "w") as t:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.SYMTYPE
                info.linkname = target
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_repeated_layer_as_symlink_in_legacy_archive(tmp_path: Path) -> None:
    """Older docker save writes a repeated layer as a symlink to its first copy: followed inside the
    archive, refused when it leads out or when a document is a link."""
    layer = TarBuilder().file("f", b"same").build()
    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff, diff]}}).encode()
    cname = hashlib.sha256(config).hexdigest() + ".json"

    def manifest(layers: list[str]) -> bytes:
        return json.dumps([{"Config": cname, "RepoTags": ["rep:1"], "Layers": layers}]).encode()

    both = manifest(["a/layer.tar", "b/layer.tar"])
    _archive(tmp_path / "ok.tar", [("a/layer.tar", layer, ""), ("b/layer.tar", None, "../a/layer.tar"),
                                   (cname, config, ""), ("manifest.json", both, "")])
    _archive(tmp_path / "out.tar", [("a/layer.tar", layer, ""), ("b/layer.tar", None, "../../a/layer.tar"),
                                    (cname, config, ""),
                                    ("manifest.json", manifest(["a/layer.tar", "b/layer.tar"]), "")])
    _archive(tmp_path / "doc.tar", [("a/layer.tar", layer, ""), ("real.json", config, ""), (cname, None, "real.json"),
                                    ("manifest.json", manifest(["a/layer.tar", "a/layer.tar"]), "")])
    from lamina.errors import LaminaError, UnsafePathError

    with _open(tmp_path, "vfs") as svc:
        svc.load_image(tmp_path / "ok.tar")
        assert [la.diff_id for la in svc.layers()] == [diff, diff]
        svc.image_delete("rep:1")
        with pytest.raises(UnsafePathError):
            svc.load_image(tmp_path / "out.tar")
        with pytest.raises(LaminaError):
            svc.load_image(tmp_path / "doc.tar")
        assert svc.images() == [] and svc.layers() == []


def test_listing_survives_a_damaged_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A listing comes from the records (no config is read): an image whose config is gone is still listed,
    and inspecting it fails in one line; an image whose labels were not recorded (a store of an older lamina)
    needs its config, and is then left out with a warning, not the others."""
    from lamina.errors import LaminaError

    with _open(tmp_path, "vfs") as svc:
        good = _import(svc, "good:1", b"good")
        bad = _import(svc, "bad:1", b"bad")
        (tmp_path / "root" / "content" / "blobs" / "sha256" / bad[7:]).unlink()  # its config is gone
        assert sorted(s.id for s in svc.images()) == sorted([good, bad])
        with pytest.raises(LaminaError):
            svc.inspect_image("bad:1")
        with svc.store.db.tx() as db:
            db.execute("UPDATE images SET labels=NULL WHERE id=?", (bad,))
        assert [s.id for s in svc.images()] == [good]
        assert "skipping image" in caplog.text


@pytest.mark.parametrize("ends", [0, 1], ids=["no-end-block", "one-end-block"])
def test_load_docker_archive_without_end_blocks(tmp_path: Path, skopeo_images: SkopeoImages, ends: int) -> None:
    """An image archive that ends where the next header would start (or after one zero block) loads."""
    src = skopeo_images.docker_archive
    data = Path(src.path).read_bytes()
    body = data.rstrip(b"\0")
    body += bytes(-len(body) % 512)
    assert len(body) < len(data) - 512  # the end-of-archive blocks are gone
    out = tmp_path / "no-end.tar"
    out.write_bytes(body + bytes(512 * ends))
    with _open(tmp_path, "vfs") as svc:
        [loaded] = svc.load_image(out)
        assert loaded.image.id == src.config_digest
        assert [la.diff_id for la in svc.layers()] == list(src.diff_ids)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(body[:-100])
    with _open(tmp_path / "c", "vfs") as svc, pytest.raises(ArchiveError, match="truncated"):
        svc.load_image(cut)


def test_an_image_removed_between_lookup_and_config_read_is_not_found(tmp_path: Path) -> None:
    """A command that found an image which another process then removed (its config blob with it) says
    the image is gone, not that a blob is missing (``tag`` racing ``rmi``)."""
    from lamina.errors import ImageNotFound
    from lamina.images import ops

    with _open(tmp_path, "vfs") as svc:
        _import(svc, "gone:1", b"g")
        rec = ops.find(svc.image_store, "gone:1")
        svc.image_delete("gone:1")
        with pytest.raises(ImageNotFound, match="removed meanwhile"):
            ops.load(svc.image_store, rec)

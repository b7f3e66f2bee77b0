"""Image management as docker and podman users know it (issue 14): listings, history, filters, platforms,
names, save, rmi and ps (credential helpers are in test_registry.py).

Images come from umoci and skopeo (``image_fixtures``) or are imported or archived from small tars.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from registry_fixtures import Registry, push_with_skopeo

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config
from lamina.testing import TarBuilder


def _open(tmp: Path, **kw: Any) -> ImageService:
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver="vfs", **kw))


def _import(svc: ImageService, name: str | None, content: bytes) -> str:
    return svc.import_image(io.BytesIO(TarBuilder().file("f", content).build()), name).id


def _docker_archive(path: Path, config: dict[str, Any], tag: str, content: bytes = b"x") -> str:
    """A one-layer docker-archive whose config is ``config`` with the layer's DiffID filled in; returns the
    image ID."""
    layer = TarBuilder().file("f", content).build()
    doc = {**config, "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    raw = json.dumps(doc).encode()
    image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    manifest = json.dumps([{"Config": f"{image_id[7:]}.json", "RepoTags": [tag], "Layers": ["l/layer.tar"]}])
    with tarfile.open(path, "w") as t:
        for name, data in (("l/layer.tar", layer), (f"{image_id[7:]}.json", raw), ("manifest.json", manifest.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return image_id


def _listing(tmp: Path, *args: str) -> dict[str, dict[str, Any]]:
    out = lamina_cli("--driver", "vfs", "--format", "json", "images", *args, root=tmp)
    return {d["Id"]: d for d in json.loads(out.stdout)}


# -- 1. containers per image ---------------------------------------------------------------------------------
def test_images_count_the_containers_using_each(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path) as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        small = loaded.image.id
        other = _import(svc, "other:1", b"other")
        first = svc.create_container("small:1")
        svc.create_container("small:1", name="second")
        assert {s.id: s.containers for s in svc.images()} == {small: 2, other: 0}
    listing = _listing(tmp_path)
    assert listing[small]["Containers"] == 2 and listing[other]["Containers"] == 0
    lamina_cli("--driver", "vfs", "rm", first.id, root=tmp_path)
    assert _listing(tmp_path)[small]["Containers"] == 1
    with _open(tmp_path) as svc:
        svc.remove_container("second")
        assert {s.id: s.containers for s in svc.images()} == {small: 0, other: 0}


# -- 2. history of committed images --------------------------------------------------------------------------
def _commit_edit(svc: ImageService, image: str, name: str, content: bytes) -> str:
    c = svc.create_container(image)
    with svc.perform_with_base_fs(c.id) as root:
        (Path(root) / "edited").write_bytes(content)
    new = svc.commit_image(c.id, name, message=f"made {name}")
    svc.remove_container(c.id)
    return new.id


def test_history_names_the_local_parents(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path) as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        base = loaded.image.id
        base_rows = len(svc.image_history(base))
        child = _commit_edit(svc, "small:1", "child:1", b"1")
        grandchild = _commit_edit(svc, "child:1", "grandchild:1", b"2")
        hist = svc.image_history("grandchild:1")
        assert len(hist) == base_rows + 2
        assert [(h["Id"], h["Tags"]) for h in hist[:3]] == [
            (grandchild, ["grandchild:1"]), (child, ["child:1"]), (base, ["small:1"]),
        ]
        assert hist[0]["Comment"] == "made grandchild:1" and hist[1]["Comment"] == "made child:1"
        assert {h["Id"] for h in hist[3:]} <= {"<missing>"}  # below the loaded image: no local image
        # the image's own history is unchanged: its ID on top only
        assert [h["Id"] for h in svc.image_history("small:1")] == [base] + ["<missing>"] * (base_rows - 1)
        # a squash records no parent: its history names only itself
        squashed = svc.squash_image("grandchild:1")
        assert [h["Id"] for h in svc.image_history(squashed.id)][:2] == [squashed.id, "<missing>"]
    table = lamina_cli("--driver", "vfs", "history", "child:1", root=tmp_path).stdout.decode().splitlines()
    assert [row.split()[0] for row in table[1:3]] == [child[7:19], base[7:19]]
    assert all(row.split()[0] == "<missing>" for row in table[3:])


# -- 3. before= and since= an image whose config has no created -----------------------------------------------
def test_time_filters_fall_back_to_when_the_image_was_stored(tmp_path: Path) -> None:
    undated = _docker_archive(tmp_path / "undated.tar", {"architecture": "amd64", "os": "linux"}, "undated:1")
    with _open(tmp_path) as svc:
        a = _import(svc, "a:1", b"a")
        time.sleep(0.01)
        svc.load_image(tmp_path / "undated.tar")
        assert svc.inspect_image("undated:1")["Created"] is None
        time.sleep(0.01)
        c = _import(svc, "c:1", b"c")
        # listed in the order they entered the store, newest first, the undated one by when it was loaded
        assert [s.id for s in svc.images()] == [c, undated, a]
        assert [s.id for s in svc.images({"before": ["undated:1"]})] == [a]
        assert [s.id for s in svc.images({"since": ["undated:1"]})] == [c]
        assert [s.id for s in svc.images({"since": ["a:1"]})] == [c, undated]
        assert [s.id for s in svc.images({"before": ["c:1"]})] == [undated, a]
        loaded_at = svc.image_store.get(undated).loaded
        assert next(s for s in svc.images() if s.id == undated).created == loaded_at
    listing = _listing(tmp_path, "--filter", "before=undated:1")
    assert list(listing) == [a]
    assert _listing(tmp_path)[undated]["Created"] == int(loaded_at)


# -- 4. an index whose entries name no platform -------------------------------------------------------------
def _write_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def _layout_of_configs(src: ImageFacts, dest: Path, configs: list[dict[str, Any]],
                      index: bool = True) -> list[str]:
    """A copy of ``src``'s layout with one manifest per config (its layers, the config's other members
    replaced by those given; ``None`` drops a member), named ``multi:1``: under an index whose entries carry
    no platform, or, with ``index=False``, directly. Returns the image IDs in order."""
    import shutil

    from lamina.formats import oci

    shutil.copytree(src.path, dest)
    top = json.loads((dest / "index.json").read_text())["manifests"][0]
    manifest = json.loads((dest / "blobs" / "sha256" / top["digest"][7:]).read_bytes())
    original = json.loads((dest / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
    entries, ids = [], []
    for members in configs:
        cfg = {k: v for k, v in {**original, **members}.items() if v is not None}
        cfg_raw = json.dumps(cfg).encode()
        ids.append(_write_blob(dest, cfg_raw))
        m_raw = json.dumps({**manifest, "config": {**manifest["config"], "digest": ids[-1],
                                                   "size": len(cfg_raw)}}).encode()
        entries.append(oci.Descriptor(top["mediaType"], _write_blob(dest, m_raw), len(m_raw)))
    name = {"org.opencontainers.image.ref.name": "multi:1"}
    if index:
        raw = oci.build_index(entries)
        tops = [{"mediaType": oci.MEDIA_TYPE_INDEX, "digest": _write_blob(dest, raw), "size": len(raw),
                 "annotations": name}]
    else:
        tops = [{**e.to_json(), "annotations": name} for e in entries]
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": tops}))
    return ids


def test_index_without_platforms_is_resolved_by_the_configs(
    tmp_path: Path, umoci_small_image: ImageFacts, registry: Registry
) -> None:
    from lamina.errors import PlatformNotFound
    from lamina.formats import oci

    host_platform = oci.host_platform()
    foreign, host = _layout_of_configs(umoci_small_image, tmp_path / "multi", [
        {"os": "linux", "architecture": "s390x", "variant": None},  # the first entry, not the host's
        {"os": "linux", "architecture": host_platform.architecture, "variant": host_platform.variant},
    ])
    with _open(tmp_path / "a") as svc:
        [loaded] = svc.load_image(tmp_path / "multi")  # the host's image, not the first entry
        assert loaded.image.id == host
        [loaded] = svc.load_image(tmp_path / "multi", platform=oci.parse_platform("linux/s390x"))
        assert loaded.image.id == foreign
        with pytest.raises(PlatformNotFound, match="s390x") as e:
            svc.load_image(tmp_path / "multi", platform=oci.parse_platform("linux/ppc64le"))
        assert str(oci.host_platform()) in str(e.value)
    proc = lamina_cli("load", "-i", str(tmp_path / "multi"), "--platform", "linux/riscv64", root=tmp_path / "c",
                      check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "linux/s390x" in err, err
    # the same index in a registry
    push_with_skopeo(f"oci:{tmp_path / 'multi'}:multi:1", registry, "unplatformed:1", None, "--all")
    with _open(tmp_path / "b") as svc:
        assert svc.pull_image(f"{registry.host}/unplatformed:1").id == host
        s390x = svc.pull_image(f"{registry.host}/unplatformed:1", platform=oci.parse_platform("linux/s390x"))
        assert s390x.id == foreign
        with pytest.raises(PlatformNotFound, match="s390x"):
            svc.pull_image(f"{registry.host}/unplatformed:1", platform=oci.parse_platform("linux/ppc64le"))


# -- 5. a new tag's repository digest --------------------------------------------------------------------------
def test_tag_adds_the_repository_digest(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    digest = umoci_small_image.manifest_digest
    with _open(tmp_path) as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        svc.tag_image("small:1", "example.com/app:2")
        img = svc.get_image("example.com/app:2")
        assert sorted(img.repo_digests) == sorted([f"small@{digest}", f"example.com/app@{digest}"])
        assert svc.get_image(f"example.com/app@{digest}").id == loaded.image.id
        # another tag of the same repository adds nothing new; removing one of two tags keeps the digest
        svc.tag_image("small:1", "example.com/app:3")
        assert svc.untag_image("example.com/app:2", "example.com/app:3") == [{"Untagged": "example.com/app:3"}]
        # the repository's last tag takes its digest name along; the image keeps its other names
        assert svc.untag_image("small:1", "example.com/app:2") == [
            {"Untagged": "example.com/app:2"}, {"Untagged": f"example.com/app@{digest}"},
        ]
        assert set(svc.get_image(loaded.image.id).record.names) == {
            "docker.io/library/small:1", f"docker.io/library/small@{digest}",
        }
        # no manifest known (a docker-archive, an import): a tag is all there is
        _docker_archive(tmp_path / "da.tar", {"architecture": "amd64", "os": "linux"}, "archived:1")
        [archived] = svc.load_image(tmp_path / "da.tar")
        imported = _import(svc, "imported:1", b"i")
        for name, image_id in (("archived:1", archived.image.id), ("imported:1", imported)):
            svc.tag_image(name, f"example.com/{name}")
            assert sorted(svc.get_image(image_id).record.names) == [f"docker.io/library/{name}", f"example.com/{name}"]
    lamina_cli("--driver", "vfs", "tag", "small:1", "example.com/cli:1", root=tmp_path)
    rows = lamina_cli("--driver", "vfs", "images", "--digests", root=tmp_path).stdout.decode().splitlines()
    assert any(r.split()[:3] == ["example.com/cli", "1", digest] for r in rows), rows


# -- 6. save of a repository ----------------------------------------------------------------------------------
def _archive_tags(path: Path) -> dict[str, list[str]]:
    """Image ID -> RepoTags of a docker-archive's manifest.json."""
    with tarfile.open(path) as t:
        member = t.extractfile("manifest.json")
        assert member is not None
        entries = json.loads(member.read())
    return {"sha256:" + e["Config"].removesuffix(".json").rsplit("/", 1)[-1]: e["RepoTags"] for e in entries}


def test_save_of_a_repository_saves_each_of_its_tags(tmp_path: Path) -> None:
    from lamina.errors import ImageNotFound

    with _open(tmp_path) as svc:
        one = _import(svc, "example.com/app:1", b"1")
        two = _import(svc, "example.com/app:2", b"2")
        _import(svc, "example.com/other:1", b"o")
        _import(svc, "example.com/app-x:1", b"x")  # a repository whose name only begins like it
        svc.export_image(["example.com/app"], tmp_path / "app.tar")  # there is no :latest
        assert _archive_tags(tmp_path / "app.tar") == {one: ["example.com/app:1"], two: ["example.com/app:2"]}
        # in general: :latest is one tag among the others, and a tag given is just that tag
        svc.tag_image("example.com/app:2", "example.com/app:latest")
        svc.export_image(["example.com/app", "example.com/other:1"], tmp_path / "all", "oci-dir")
        index = json.loads((tmp_path / "all" / "index.json").read_text())
        names = sorted(m["annotations"]["io.containerd.image.name"] for m in index["manifests"])
        assert names == ["example.com/app:1", "example.com/app:2", "example.com/app:latest", "example.com/other:1"]
        svc.export_image(["example.com/app:latest"], tmp_path / "latest.tar")
        assert _archive_tags(tmp_path / "latest.tar") == {two: ["example.com/app:latest"]}
        with pytest.raises(ImageNotFound):
            svc.export_image(["example.com/nosuch"], tmp_path / "none.tar")
    lamina_cli("--driver", "vfs", "save", "-o", str(tmp_path / "cli.tar"), "example.com/app", root=tmp_path)
    with _open(tmp_path / "back") as svc:
        loaded = svc.load_image(tmp_path / "cli.tar")
        assert {r.image.id: sorted(r.image.tags) for r in loaded} == {
            one: ["example.com/app:1"], two: ["example.com/app:2", "example.com/app:latest"],
        }


# -- 7. rmi --force and running containers ---------------------------------------------------------------------
def test_rmi_force_does_not_delete_an_image_a_running_container_uses(
    tmp_path: Path, umoci_small_image: ImageFacts
) -> None:
    from lamina.errors import ImageConflict

    with _open(tmp_path) as svc:
        [loaded] = svc.load_image(umoci_small_image.path)
        iid = loaded.image.id
        c = svc.create_container("small:1")
        svc.container_store.set_running(c.id)  # what `lamina run` records: this process runs it
        assert svc.get_container(c.id).status == "running"
        for force in (False, True):
            with pytest.raises(ImageConflict, match=f"running container {c.id[:12]}"):
                svc.image_delete(iid, force=force)
        proc = lamina_cli("--driver", "vfs", "rmi", "--force", iid[7:19], root=tmp_path, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "running container" in err, err
        assert set(svc.get_image(iid).record.names) == set(loaded.image.names)  # nothing went
        # a name is only a name: --force removes it whatever the container does (docker's rule)
        with pytest.raises(ImageConflict, match=c.id[:12]):
            svc.image_delete("small:1")
        assert svc.image_delete("small:1", force=True)[0] == {"Untagged": "small:1"}
        assert svc.get_image(iid).record.names == ()
        # once it stopped, --force by ID is allowed: the names go, the image stays for the container
        svc.tag_image(iid, "small:1")
        svc.container_store.set_exited(c.id, 0)
        with pytest.raises(ImageConflict, match=f"stopped container {c.id[:12]}"):
            svc.image_delete(iid)
        out = svc.image_delete(iid, force=True)
        assert {"Untagged": "small:1"} in out and all("Deleted" not in e for e in out)
        assert svc.get_image(iid).record.names == ()
        svc.remove_container(c.id)
        assert svc.image_delete(iid) == [{"Deleted": iid}]


# -- 8. configs without os and architecture ---------------------------------------------------------------------
def test_configs_without_a_platform_are_the_hosts(
    tmp_path: Path, umoci_small_image: ImageFacts, registry: Registry
) -> None:
    from lamina.formats import oci

    host = oci.host_platform()
    archived = _docker_archive(tmp_path / "da.tar", {"config": {"Cmd": ["sh"]}}, "bare:1")
    [in_layout] = _layout_of_configs(umoci_small_image, tmp_path / "layout",
                                     [{"os": None, "architecture": ""}], index=False)
    push_with_skopeo(f"oci:{tmp_path / 'layout'}:multi:1", registry, "bare:1")
    with _open(tmp_path) as svc:
        [loaded] = svc.load_image(tmp_path / "da.tar")
        assert loaded.image.id == archived
        [loaded] = svc.load_image(tmp_path / "layout")
        assert loaded.image.id == in_layout
        for ref in ("bare:1", "multi:1"):
            info = svc.inspect_image(ref)
            assert (info["Os"], info["Architecture"]) == (host.os, host.architecture)
        assert svc.pull_image(f"{registry.host}/bare:1").id == in_layout
        # a container of it commits to an image that loads as well; saving keeps the config's bytes
        child = _commit_edit(svc, "multi:1", "child:1", b"c")
        assert svc.inspect_image(child)["Architecture"] == host.architecture
        svc.export_image(["multi:1"], tmp_path / "out", "oci-dir")
    assert (tmp_path / "out" / "blobs" / "sha256" / in_layout[7:]).read_bytes() == (
        tmp_path / "layout" / "blobs" / "sha256" / in_layout[7:]).read_bytes()
    out = lamina_cli("--driver", "vfs", "load", "-i", str(tmp_path / "da.tar"), root=tmp_path / "cli")
    assert out.stdout.decode().strip() == "Loaded image: bare:1"


# -- 10. ps shows each container's state ------------------------------------------------------------------------
def test_ps_shows_created_running_and_exited_with_the_code(tmp_path: Path,
                                                           debian_image_docker_archive: ImageFacts) -> None:
    import subprocess
    import sys

    from lamina.testing import require_root, require_tool

    require_root()
    require_tool("runc")

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return lamina_cli("--driver", "vfs", *args, root=tmp_path, check=check)

    def table(*args: str) -> dict[str, str]:
        """NAMES -> STATUS of `ps` (table)."""
        lines = cli("ps", *args).stdout.decode().splitlines()
        start = lines[0].index("STATUS")
        return {line.split()[-1]: line[start:].rsplit(None, 1)[0].strip() for line in lines[1:]}

    name = "example.com/debian:bookworm"
    cli("load", "-q", "-i", str(debian_image_docker_archive.path))
    cli("create", "--name", "made", name)
    assert cli("run", "--name", "quitter", name, "sh", "-c", "exit 3", check=False).returncode == 3
    # a container that runs until the test leaves a file in its root filesystem
    cmd = [sys.executable, "-m", "lamina", "--driver", "vfs", "--root", str(tmp_path / "root"), "--runroot",
           str(tmp_path / "run"), "run", "--name", "runner", name, "sh", "-c",
           "while [ ! -e /stop ]; do sleep 0.1; done"]
    runner = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while "runner" not in table():
            assert runner.poll() is None and time.monotonic() < deadline, runner.stderr
            time.sleep(0.2)
        assert table() == {"runner": "Running"}  # without --all: the running ones only
        assert table("--all") == {"runner": "Running", "quitter": "Exited (3)", "made": "Created"}
        ps = json.loads(cli("--format", "json", "ps", "--all").stdout)
        assert {c["Name"]: (c["Status"], c["ExitCode"]) for c in ps} == {
            "runner": ("running", None), "quitter": ("exited", 3), "made": ("created", None),
        }
    finally:
        mounted = cli("mount", "runner", check=False)  # vfs: the very directory runc runs in
        if mounted.returncode == 0:
            (Path(mounted.stdout.decode().strip()) / "stop").touch()
            cli("umount", "runner")
        elif runner.poll() is None:
            runner.kill()
        runner.wait(timeout=60)
    assert runner.returncode == 0
    assert table("--all") == {"runner": "Exited (0)", "quitter": "Exited (3)", "made": "Created"}
    assert table() == {}

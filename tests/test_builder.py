"""The builder hooks (docker's builder backend): commit_build_step, the build cache (make_image_cache,
get_cache, with and without cache sources) and get_image_and_releasable_layer.

Images come from umoci (``image_fixtures``); build steps are real containers edited through real mounts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from registry_fixtures import Registry, push_with_skopeo

from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config
from lamina.errors import ImageError, ImageNotFound, InvalidDocument
from lamina.images.cache import same_config
from lamina.testing import require_root, tree_snapshot

DRIVERS = ["vfs", "overlay"]


def _open(tmp: Path, driver: str = "vfs") -> ImageService:
    if driver == "overlay":
        require_root()
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver=driver))


def _step(cmd: str, **more: Any) -> dict[str, Any]:
    """The container config of a RUN step, as docker's builder makes it."""
    return {"Cmd": ["/bin/sh", "-c", cmd], "Env": ["A=1"], "Hostname": "builder", **more}


def _run_step(svc: ImageService, parent: str, cmd: str, path: str, data: bytes, **kw: Any) -> Any:
    """One build step: a container from ``parent`` writes ``path``, and the step is committed."""
    c = svc.create_container(parent)
    with svc.perform_with_base_fs(c.id) as root:
        (Path(root) / path).write_bytes(data)
    img = svc.commit_build_step(c.id, _step(cmd), author="builder", comment="step", **kw)
    svc.remove_container(c.id)
    return img


@pytest.mark.parametrize("driver", DRIVERS)
def test_build_step_is_found_by_the_cache(tmp_path: Path, driver: str, umoci_small_image: ImageFacts) -> None:
    with _open(tmp_path, driver) as svc:
        svc.load_image(umoci_small_image.path)
        base = svc.get_image("small:1")
        cache = svc.make_image_cache()
        assert cache.get_cache(base.id, _step("echo one > /one")) is None  # nothing built yet

        new_config = {**base.config.config, "Cmd": ["/one"]}
        one = _run_step(svc, "small:1", "echo one > /one", "one", b"one\n", config=new_config,
                        parent_image_id=base.id)
        assert one.record.parent == base.id and one.record.origin == "build"
        assert one.config.doc["container_config"] == _step("echo one > /one")
        assert one.config.config["Cmd"] == ["/one"]  # the runtime config given, not the step's
        last = one.config.history[-1]
        assert last["created_by"] == "/bin/sh -c echo one > /one"
        assert last["author"] == "builder" and last["comment"] == "step"
        assert one.diff_ids[:-1] == base.diff_ids
        assert svc.children(base.id) == [one.id]

        # the same step is a hit; container-specific members do not count, anything else does
        assert cache.get_cache(base.id, _step("echo one > /one")) == one.id
        assert cache.get_cache("small:1", _step("echo one > /one")) == one.id  # the parent by any reference
        assert cache.get_cache(base.id, _step("echo one > /one", Hostname="other", Image="x")) == one.id
        assert cache.get_cache(base.id, _step("echo two > /two")) is None
        assert cache.get_cache(base.id, _step("echo one > /one", Env=["A=2"])) is None
        assert cache.get_cache(base.id, _step("echo one > /one", WorkingDir="/tmp")) is None
        assert cache.get_cache(base.id, _step("echo one > /one", Labels={"k": "v"})) is None
        assert cache.get_cache(base.id, _step("echo one > /one", ExposedPorts={"80/tcp": {}})) is None
        assert cache.get_cache(one.id, _step("echo one > /one")) is None  # only children of the parent
        assert cache.get_cache("", _step("echo one > /one")) is None  # scratch: no build step made a root

        # a plain commit of the same edits is no cache entry, and records no step config
        c = svc.create_container("small:1")
        with svc.perform_with_base_fs(c.id) as root:
            (Path(root) / "one").write_bytes(b"one\n")
        plain = svc.commit_image(c.id)
        assert plain.record.origin == "commit" and "container_config" not in plain.config.doc
        assert cache.get_cache(base.id, _step("echo one > /one")) == one.id

        # a child of a build step does not inherit its step config
        c2 = svc.create_container(one.id)
        child = svc.commit_image(c2.id)
        assert "container_config" not in child.config.doc

        # the newest match wins; the build step checks its parent
        again = _run_step(svc, "small:1", "echo one > /one", "one", b"one again\n")
        assert again.id != one.id
        assert cache.get_cache(base.id, _step("echo one > /one")) == again.id
        with pytest.raises(ImageError, match="not created from image"):
            svc.commit_build_step(c2.id, _step("x"), parent_image_id=base.id)
        with pytest.raises(InvalidDocument, match="Cmd"):
            cache.get_cache(base.id, {"Cmd": "not a list"})
        with pytest.raises(ImageNotFound):
            cache.get_cache("sha256:" + "0" * 64, _step("echo one > /one"))


def test_build_step_without_changes_adds_no_layer(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    """A metadata step (ENV, LABEL...) changes no file: its image has the parent's layers and an empty-layer
    history entry, as docker's builder makes it; the empty layer applied meanwhile does not stay."""
    with _open(tmp_path) as svc:
        svc.load_image(umoci_small_image.path)
        base = svc.get_image("small:1")
        c = svc.create_container("small:1")
        layers = {la.chain_id for la in svc.layers()}  # the image's and the container's init layer
        step = {"Cmd": ["/bin/sh", "-c", "#(nop) ", "ENV B=2"], "Env": ["A=1", "B=2"]}
        img = svc.commit_build_step(c.id, step, config={**base.config.config, "Env": ["A=1", "B=2"]})
        assert img.diff_ids == base.diff_ids and img.chain == base.chain
        assert img.config.history[-1]["empty_layer"] is True
        assert img.config.history[-1]["created_by"] == "/bin/sh -c #(nop)  ENV B=2"
        assert {la.chain_id for la in svc.layers()} == layers
        assert svc.make_image_cache().get_cache(base.id, step) == img.id
        plain = svc.commit_image(c.id)  # a plain commit keeps its (empty) layer
        assert len(plain.diff_ids) == len(base.diff_ids) + 1
        svc.remove_container(c.id)
        svc.image_delete(img.id)
        svc.image_delete(plain.id)
        assert [i.id for i in svc.images()] == [base.id]


def test_same_config_rules() -> None:
    a = _step("true")
    assert same_config(a, dict(a))
    assert same_config({"Cmd": ["x"]}, {"Cmd": ["x"], "Env": [], "Labels": None, "Tty": False})
    assert not same_config({"Cmd": ["x"]}, {"Cmd": ["x"], "Tty": True})
    assert not same_config({"Env": ["A=1", "B=2"]}, {"Env": ["B=2", "A=1"]})  # order counts
    assert same_config({"Volumes": {"/a": {}}}, {"Volumes": {"/a": {"x": 1}}})  # keys only
    assert not same_config({"Shell": ["/bin/sh"]}, {"Shell": ["/bin/bash"]})
    assert not same_config({"OnBuild": ["RUN x"]}, {})
    assert not same_config(None, {})


def test_cache_from_sources_matches_by_history(tmp_path: Path, umoci_small_image: ImageFacts) -> None:
    """An image built elsewhere and loaded (no parent links) serves as a cache source: the first step is
    made again from it, the last step is the source itself, which then gets its parent link."""
    with _open(tmp_path / "a") as svc:
        svc.load_image(umoci_small_image.path)
        one = _run_step(svc, "small:1", "echo one > /one", "one", b"one\n")
        two = _run_step(svc, one.id, "echo two > /two", "two", b"two\n")
        svc.tag_image(two.id, "built:1")
        svc.export_image(["built:1"], tmp_path / "built", "oci-dir")
    with _open(tmp_path / "b") as svc:
        svc.load_image(umoci_small_image.path)
        svc.load_image(tmp_path / "built")
        base = svc.get_image("small:1")
        built = svc.get_image("built:1")
        assert built.id == two.id and built.record.parent is None and built.record.origin == "oci"
        assert svc.make_image_cache().get_cache(base.id, _step("echo one > /one")) is None  # no local child
        assert svc.make_image_cache(["no-such:1"]).get_cache(base.id, _step("echo one > /one")) is None

        cache = svc.make_image_cache(["built:1", "no-such:1"])
        assert cache.get_cache(base.id, _step("echo other")) is None
        made = cache.get_cache(base.id, _step("echo one > /one"))
        assert made is not None and made not in (built.id, base.id)
        step1 = svc.get_image(made)
        assert step1.record.parent == base.id and step1.diff_ids == built.diff_ids[:-1]
        assert step1.config.history == built.config.history[:-1]
        with svc.perform_with_base_fs(svc.create_container(made).id) as root:
            assert (Path(root) / "one").read_bytes() == b"one\n" and not (Path(root) / "two").exists()

        assert cache.get_cache(made, _step("echo two > /two")) == built.id  # the source's last step
        assert svc.get_image("built:1").record.parent == made
        assert svc.children(made) == [built.id]
        # asked again, the step made earlier is a local child that is an ancestor of the source
        assert svc.make_image_cache(["built:1"]).get_cache(base.id, _step("echo one > /one")) == made


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.mark.parametrize("driver", DRIVERS)
def test_releasable_layer(tmp_path: Path, driver: str, umoci_small_image: ImageFacts) -> None:
    facts = umoci_small_image
    with _open(tmp_path, driver) as svc:
        svc.load_image(facts.path)
        top = svc.get_image("small:1").chain[-1]
        img, layer = svc.get_image_and_releasable_layer("small:1")
        assert img is not None and img.id == facts.config_digest
        assert layer.chain_id == top and layer.diff_id == facts.diff_ids[-1]
        assert layer.path is not None and facts.rootfs is not None
        assert tree_snapshot(layer.path) == tree_snapshot(str(facts.rootfs))
        assert svc.layer_mount_count(top) == 1
        if driver == "overlay":
            assert _mounted(layer.path)
        layer.release()
        layer.release()  # once only
        assert svc.layer_mount_count(top) == 0
        if driver == "overlay":
            assert not _mounted(layer.path)

        # scratch: no image, an empty layer
        img, empty = svc.get_image_and_releasable_layer("")
        assert img is None and empty.path is None and empty.chain_id is None
        empty.release()

        # the image removed while its layer is held: the layers stay until the release
        with svc.get_image_and_releasable_layer("small:1")[1] as held:
            svc.image_delete("small:1")
            assert svc.images() == [] and svc.layer_mount_count(top) == 1
            assert (Path(held.path or "") / "usr/bin/hello").exists()
        assert svc.layers() == []
        with pytest.raises(ImageNotFound):
            svc.get_image_and_releasable_layer("small:1")
        with pytest.raises(ImageError, match="pull option"):
            svc.get_image_and_releasable_layer("x", pull_option="sometimes")


@pytest.mark.parametrize("driver", DRIVERS)
def test_releasable_layer_of_a_killed_process_is_reclaimed(
    tmp_path: Path, driver: str, umoci_small_image: ImageFacts
) -> None:
    with _open(tmp_path, driver) as svc:
        svc.load_image(umoci_small_image.path)
        top = svc.get_image("small:1").chain[-1]
    holder = textwrap.dedent(f"""
        import sys, time
        from lamina import ImageService
        from lamina.config import Config
        svc = ImageService.open(Config(root={str(tmp_path / 'root')!r}, runroot={str(tmp_path / 'run')!r},
                                       driver={driver!r}))
        img, layer = svc.get_image_and_releasable_layer("small:1")
        print(layer.path, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().decode().strip()
        assert path
        with _open(tmp_path, driver) as svc:
            assert svc.layer_mount_count(top) == 1  # a live holder's reference is left alone
            svc.image_delete("small:1")
            assert svc.layers() != []  # held by the holder's lease and mount
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with _open(tmp_path, driver) as svc:  # opening the store reclaims what the dead process held
        assert svc.layers() == []
        assert not _mounted(path)
        assert svc.store.db.query("SELECT * FROM mount_refs", runroot=True) == []


def test_releasable_layer_pull_options(tmp_path: Path, umoci_small_image: ImageFacts, registry: Registry) -> None:
    name = f"{registry.host}/builder-pull:1"
    push_with_skopeo(umoci_small_image.ref(), registry, "builder-pull:1")
    with _open(tmp_path / "a") as a, _open(tmp_path / "b") as b:
        with pytest.raises(ImageNotFound):
            b.get_image_and_releasable_layer(name)  # no-pull: local images only
        img, layer = b.get_image_and_releasable_layer(name, pull_option="prefer-local")
        with layer:
            assert img is not None and img.id == umoci_small_image.config_digest
            assert (Path(layer.path or "") / "usr/bin/hello").exists()

        # the tag moves to another image on the registry: prefer-local keeps the local one, force-pull
        # fetches the new one
        newer = _run_step(a, a.pull_image(name).id, "echo more > /more", "more", b"more\n")
        a.push_image(newer.id, name)
        img, layer = b.get_image_and_releasable_layer(name, pull_option="prefer-local")
        layer.release()
        assert img is not None and img.id == umoci_small_image.config_digest
        img, layer = b.get_image_and_releasable_layer(name, pull_option="force-pull")
        with layer:
            assert img is not None and img.id == newer.id
            assert (Path(layer.path or "") / "more").read_bytes() == b"more\n"

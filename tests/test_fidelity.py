"""The differential test: random layer stacks on vfs, overlay and tarball against the reference model of
the OCI rules (``fidelity_model``): files, directories, symlinks that later layers write through, hard
links, whiteouts and opaque markers in every order, xattrs, modes and owners, with names from a
three-letter alphabet so they collide. Every merged tree must equal the model's, vfs and overlay must
report the same changes, and every driver must accept or refuse each layer as the model does.

A derandomized sample runs here (``LAMINA_FIDELITY_EXAMPLES``, default 300); ``bench/fidelity.py`` runs
more, from any seed.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from fidelity_model import STACKS, Op, canonical, check_stack
from hypothesis import HealthCheck, example, given, settings

from image_fixtures import ImageFacts, SkopeoImages, layer_tar_bytes
from lamina import ImageService
from lamina.config import Config
from lamina.testing import TarBuilder, require_root, tree_snapshot

EXAMPLES = int(os.environ.get("LAMINA_FIDELITY_EXAMPLES", "300"))


@pytest.mark.root
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(stack=STACKS)
# stacks longer runs found, kept as they were shrunk
@example(stack=[[Op("file", "a/a"), Op("file", "c/b"), Op("dir", "a", mode=0o755)],
                [Op("symlink", "a", target="c"), Op("whiteout", "a/b"), Op("file", "a/a"), Op("dir", "a", mode=0o755),
                 Op("whiteout", "c")]])
@example(stack=[[Op("file", "a"), Op("dir", "a", mode=0o755), Op("symlink", "a", target="b"), Op("file", "a/a/a"),
                 Op("hardlink", "a", target="a/a/a")]])
@example(stack=[[Op("dir", "a", mode=0o755), Op("dir", "b", mode=0o755)], [Op("opaque", "b"), Op("whiteout", "b")]])
@example(stack=[[Op("symlink", "a/a", target="a"), Op("hardlink", "a", target="a/a")]])
@example(stack=[[Op("file", "a"), Op("dir", "b/b/b", mode=0o755)],
                [Op("dir", "b", mode=0o755), Op("file", "a"), Op("whiteout", "b/b/b"), Op("whiteout", "b")]])
@example(stack=[[Op("dir", "c/c/c", mode=0o755)], [Op("symlink", "b", target="c"), Op("whiteout", "b/c/c")]])
@example(stack=[[Op("file", "a")], [Op("whiteout", "a"), Op("file", "a/a")], [Op("hardlink", "a", target="a")]])
@example(stack=[[Op("file", "a")], [Op("whiteout", "a"), Op("file", "a"), Op("hardlink", "a", target="a")]])
@example(stack=[[Op("file", "a/a"), Op("dir", "a", mode=0o755), Op("symlink", "b", target="a"),
                 Op("hardlink", "a/a", target="b/a")]])
@example(stack=[[Op("file", "a/b"), Op("symlink", "b", target="a")],
                [Op("file", "a/a"), Op("file", "b"), Op("opaque", "b")]])
# whiteouts resolved as the layers below show their paths, whatever the layer did to them before
@example(stack=[[Op("file", "usr/y"), Op("file", "foo/y"), Op("symlink", "lib", target="usr")],
                [Op("symlink", "lib", target="foo"), Op("file", "lib/x"), Op("whiteout", "lib/y")]])
@example(stack=[[Op("file", "usr/foo"), Op("symlink", "lib", target="usr")],
                [Op("dir", "lib", mode=0o755), Op("whiteout", "lib/foo")]])
@example(stack=[[Op("file", "usr/foo"), Op("symlink", "lib", target="usr")],
                [Op("dir", "lib", mode=0o755), Op("opaque", "lib")]])
@example(stack=[[Op("file", "usr/foo"), Op("symlink", "lib", target="usr")],
                [Op("whiteout", "lib"), Op("file", "lib/x"), Op("whiteout", "lib/foo")]])
def test_random_stacks_agree_with_the_rules_on_every_driver(stack: list[list[Op]]) -> None:
    require_root()  # overlay mounts
    check_stack(stack)


# -- real layers: images umoci and skopeo build, and the Debian image with a layer over its merged /usr ------


def _agree(layers: list[bytes], tmp: Path) -> dict[str, tuple[Any, ...]]:
    """Register ``layers`` as one stack on vfs, overlay and tarball: every layer exports exactly, vfs and
    overlay give the same merged trees and changes at every level. The top tree."""
    trees: dict[str, list[object]] = {}
    changes: dict[str, list[object]] = {}
    for driver in ("vfs", "overlay", "tarball"):
        with ImageService.open(Config(root=tmp / driver / "root", runroot=tmp / driver / "run",
                                      driver=driver)) as svc:
            parent: str | None = None
            for data in layers:
                parent = svc.register_layer(io.BytesIO(data), parent).chain_id
                with svc.export_layer(parent) as out:
                    assert hashlib.sha256(out.read()).digest() == hashlib.sha256(data).digest(), driver
                if driver != "tarball":
                    with svc.mounted_layer(parent) as root:
                        trees.setdefault(driver, []).append(canonical(tree_snapshot(root)))
                    changes.setdefault(driver, []).append(svc.layer_changes(parent))
    assert trees["vfs"] == trees["overlay"]
    assert changes["vfs"] == changes["overlay"]
    top = trees["vfs"][-1]
    assert isinstance(top, dict)
    return top


@pytest.mark.root
@pytest.mark.tool("umoci")
@pytest.mark.tool("skopeo")
def test_layers_umoci_and_skopeo_write(umoci_small_image: ImageFacts, skopeo_images: SkopeoImages,
                                       tmp_path: Path) -> None:
    require_root()
    for i, facts in enumerate((umoci_small_image, skopeo_images.docker_archive)):
        layers = [layer_tar_bytes(facts, n) for n in range(len(facts.layer_digests))]
        top = _agree(layers, tmp_path / str(i))
        assert umoci_small_image.rootfs is not None
        want = canonical(tree_snapshot(str(umoci_small_image.rootfs)))
        assert {p: row[:1] + row[4:5] for p, row in top.items()} == {p: row[:1] + row[4:5] for p, row in want.items()}


@pytest.mark.root
def test_a_layer_over_debians_merged_usr(debian_rootfs_tar: Path, tmp_path: Path) -> None:
    """The issue's case on a real image: a layer writing /lib/systemd and /var/run over Debian, whose /lib
    is a symlink to usr/lib (the dynamic loader lives behind it) and /var/run one to /run."""
    require_root()
    upper = (TarBuilder().file("lib/systemd/system/a.service", b"[Unit]\n").file("var/run/a.pid", b"1\n")
             .file("bin/tool", b"#!/bin/sh\n", mode=0o755).whiteout("etc/motd").build())
    top = _agree([debian_rootfs_tar.read_bytes(), upper], tmp_path)
    assert top["lib"][4] == "usr/lib"
    assert "usr/lib/systemd/system/a.service" in top and "run/a.pid" in top and "usr/bin/tool" in top
    assert "etc/motd" not in top

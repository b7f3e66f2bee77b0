"""Image management as docker and podman users know it (issue 14): listings, history, filters, names, save and
rmi.

Images come from umoci and skopeo (``image_fixtures``) or are imported from small tars.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config
from lamina.testing import TarBuilder


def _open(tmp: Path, **kw: Any) -> ImageService:
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver="vfs", **kw))


def _import(svc: ImageService, name: str | None, content: bytes) -> str:
    return svc.import_image(io.BytesIO(TarBuilder().file("f", content).build()), name).id


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

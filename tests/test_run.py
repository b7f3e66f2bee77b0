"""``lamina run`` end to end: images skopeo wrote, real runc, vfs and kernel overlay."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config
from lamina.errors import ImageError, LaminaError, RuntimeFailure
from lamina.testing import require_root, require_tool

DRIVERS = ["vfs", "overlay"]


@pytest.fixture(autouse=True)
def _runtime() -> None:
    require_root()
    require_tool("runc")


def _mounts(root: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line]


@pytest.fixture(scope="module")
def debian_store(tmp_path_factory: pytest.TempPathFactory, debian_image_docker_archive: ImageFacts) -> Path:
    """One store per driver with the skopeo-written Debian docker-archive loaded (shared by the tests)."""
    base = tmp_path_factory.mktemp("run")
    for driver in DRIVERS:
        lamina_cli("--driver", driver, "load", "-q", "-i", str(debian_image_docker_archive.path),
                   root=base / driver)
    return base


@pytest.mark.parametrize("driver", DRIVERS)
def test_run_prints_the_images_file_and_returns_exit_codes(debian_store: Path, driver: str,
                                                           debian_rootfs_tar: Path) -> None:
    root = debian_store / driver
    name = "example.com/debian:bookworm"
    out = lamina_cli("run", "--rm", name, "cat", "/etc/os-release", root=root)
    assert b"Debian GNU/Linux" in out.stdout
    proc = lamina_cli("run", "--rm", name, "sh", "-c", "echo oops >&2; exit 7", root=root, check=False)
    assert proc.returncode == 7 and proc.stderr == b"oops\n"
    # user and group names come from the image's own /etc/passwd and /etc/group
    out = lamina_cli("run", "--rm", "-u", "nobody", "-w", "/tmp", "-e", "GREETING=hi", name,
                     "sh", "-c", 'id -u; id -g; pwd; echo "$GREETING"; cat /proc/net/dev | grep -c :', root=root)
    assert out.stdout.decode().split() == ["65534", "65534", "/tmp", "hi", "1"]  # only lo: network none
    assert lamina_cli("ps", "-a", "-q", root=root).stdout == b""
    assert _mounts(root) == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_run_keeps_the_container_without_rm(debian_store: Path, driver: str) -> None:
    root = debian_store / driver
    lamina_cli("run", "--name", "keeper", "example.com/debian:bookworm", "sh", "-c", "echo kept > /kept; exit 3",
               root=root, check=False)
    ps = json.loads(lamina_cli("--format", "json", "ps", "--all", root=root).stdout)
    assert [(c["Name"], c["Status"], c["ExitCode"]) for c in ps] == [("keeper", "exited", 3)]
    assert lamina_cli("diff", "keeper", root=root).stdout.decode().splitlines() == ["A /kept"]
    proc = lamina_cli("run", "--name", "keeper", "example.com/debian:bookworm", "true", root=root, check=False)
    assert proc.returncode == 1 and b"already in use" in proc.stderr
    lamina_cli("rm", "keeper", root=root)
    assert _mounts(root) == []


def test_failures_leave_nothing(debian_store: Path, tmp_path: Path) -> None:
    root = debian_store / "vfs"
    cfg = Config(root=root / "root", runroot=root / "run", driver="vfs", runtime="nosuchruntime")
    with ImageService.open(cfg) as svc:
        before = len(svc.layers())
        with pytest.raises(RuntimeFailure, match="nosuchruntime"):
            svc.run_container("example.com/debian:bookworm", ["true"])
        assert svc.containers() == [] and len(svc.layers()) == before
        with pytest.raises(ImageError):
            svc.run_container("example.com/debian:bookworm", ["true"], user="nosuchuser")
        with pytest.raises(LaminaError):
            svc.run_container("example.com/debian:bookworm", ["true"], workdir="relative/dir")
        assert svc.containers() == [] and len(svc.layers()) == before
    proc = lamina_cli("run", "--rm", "example.com/debian:bookworm", "/bin/nosuch", root=root, check=False)
    assert proc.returncode == 1 and b"nosuch" in proc.stderr and b"Traceback" not in proc.stderr
    proc = lamina_cli("run", "--rm", "nosuch/image", "true", root=root, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(b"Error: image")
    assert lamina_cli("ps", "-a", "-q", root=root).stdout == b""
    assert _mounts(root) == []


def test_hostile_user_in_the_image_config(debian_store: Path, tmp_path: Path) -> None:
    """An image whose config names a user its /etc/passwd (a symlink out of the root) cannot resolve."""
    root = debian_store / "vfs"
    with ImageService.open(root=root / "root", runroot=root / "run", driver="vfs") as svc:
        c = svc.create_container("example.com/debian:bookworm", name="evil")
        with svc.perform_with_base_fs("evil") as rootfs:
            Path(rootfs, "etc/passwd").unlink()
            Path(rootfs, "etc/passwd").symlink_to("/etc/passwd")
        img = svc.commit_image("evil", "example.com/evil:1", changes=["USER root"])
        svc.remove_container(c.id)
        with pytest.raises(LaminaError, match="symlink"):
            svc.run_container(img.id, ["id"])
        assert svc.containers() == []
        svc.image_delete("example.com/evil:1")
    assert _mounts(root) == []


def test_bundle_for_another_runtime(debian_store: Path, tmp_path: Path) -> None:
    root = debian_store / "overlay"
    cid = lamina_cli("create", "--name", "bundled", "example.com/debian:bookworm", root=root).stdout.decode().strip()
    out = lamina_cli("bundle", "bundled", str(tmp_path / "b"), "cat", "/etc/debian_version", root=root)
    assert out.stdout.decode().strip() == str(tmp_path / "b")
    spec = json.loads((tmp_path / "b" / "config.json").read_text())
    assert spec["process"]["args"] == ["cat", "/etc/debian_version"]
    assert {n["type"] for n in spec["linux"]["namespaces"]} >= {"mount", "pid", "ipc", "uts", "network"}
    run = subprocess.run(["runc", "--root", str(tmp_path / "state"), "run", "--bundle", str(tmp_path / "b"),
                          cid[:12]], capture_output=True, timeout=60)
    subprocess.run(["runc", "--root", str(tmp_path / "state"), "delete", "--force", cid[:12]], capture_output=True)
    assert run.returncode == 0 and run.stdout.strip()
    lamina_cli("umount", "bundled", root=root)
    lamina_cli("rm", "bundled", root=root)
    assert _mounts(root) == []

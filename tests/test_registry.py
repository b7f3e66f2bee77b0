"""Pull and push against real registries (Debian's docker-registry on loopback), with skopeo as the oracle.

Images are put into the registries by skopeo; what lamina pushes is read back by skopeo.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from registry_fixtures import AuthRegistry, Registry, TokenRegistry, inspect_remote, push_with_skopeo

from conftest import lamina_cli
from image_fixtures import ImageFacts, SkopeoImages
from lamina import ImageService
from lamina.config import Config, RegistryConfig


def _svc(tmp: Path, driver: str = "vfs", **registry: object) -> ImageService:
    return ImageService.open(Config(root=tmp / "root", runroot=tmp / "run", driver=driver,
                                    registry=RegistryConfig(**registry)))  # type: ignore[arg-type]


def _mounts(root: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line]


pytestmark = pytest.mark.usefixtures("isolated_auth")


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_pull_run_push_round_trip(tmp_path: Path, driver: str, registry: Registry,
                                  umoci_small_image: ImageFacts) -> None:
    if driver == "overlay":
        from lamina.testing import require_root

        require_root()
    repo = f"pull/{driver}"
    push_with_skopeo(umoci_small_image.ref("small:1"), registry, f"{repo}:1")
    source = inspect_remote(registry, f"{repo}:1")
    with _svc(tmp_path, driver) as svc:
        img = svc.pull_image(f"{registry.host}/{repo}:1")
        assert img.id == umoci_small_image.config_digest
        assert img.record.tags == (f"{registry.host}/{repo}:1",)
        assert f"{registry.host}/{repo}@{source['digest']}" in img.record.digests
        assert [la.diff_id for la in svc.layers()] == list(umoci_small_image.diff_ids)
        # push to another repository: the same manifest digest, blobs mounted or uploaded
        digest = svc.push_image(f"{registry.host}/{repo}:1", f"{registry.host}/{repo}-copy:2")
        assert digest == source["digest"]
        # pulling again fetches nothing new and changes nothing
        again = svc.pull_image(f"{registry.host}/{repo}:1")
        assert again.id == img.id and len(svc.layers()) == len(umoci_small_image.diff_ids)
    assert inspect_remote(registry, f"{repo}-copy:2")["digest"] == source["digest"]


def test_pull_by_digest_and_short_names(tmp_path: Path, registry: Registry, skopeo_images: SkopeoImages) -> None:
    push_with_skopeo(skopeo_images.zstd_oci.ref("small:1"), registry, "short:1")
    digest = inspect_remote(registry, "short:1")["digest"]
    with _svc(tmp_path, registries=(registry.host,)) as svc:
        img = svc.pull_image("short:1")  # an unqualified name tried on the configured registries
        assert img.record.tags == (f"{registry.host}/short:1",)
        by_digest = svc.pull_image(f"{registry.host}/short@{digest}")
        assert by_digest.id == img.id
        # a truncated ID of a local image is that image: nothing is pulled
        assert svc.pull_image(img.id[7:19]).id == img.id
        from lamina.errors import LaminaError

        with pytest.raises(LaminaError):
            svc.pull_image(f"{registry.host}/short@sha256:{'0' * 64}")
        with pytest.raises(LaminaError):
            svc.pull_image("a" * 64)


def test_cli_pull_push_with_basic_auth(tmp_path: Path, auth_registry: AuthRegistry,
                                       umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), auth_registry, "basic/small:1", auth_registry.creds)
    host = auth_registry.host
    env = {k: os.environ[k] for k in ("LAMINA_AUTH_FILE", "XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    proc = lamina_cli("pull", f"{host}/basic/small:1", root=tmp_path, check=False, env=env)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = lamina_cli("login", host, "-u", "alice", "--password-stdin", input=b"wrong\n", root=tmp_path,
                      check=False, env=env)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    lamina_cli("login", host, "-u", "alice", "--password-stdin", input=b"secret\n", root=tmp_path, env=env)
    out = lamina_cli("pull", "-q", f"{host}/basic/small:1", root=tmp_path, env=env)
    assert out.stdout.decode().strip() == umoci_small_image.config_digest
    out = lamina_cli("push", "-q", f"{host}/basic/small:1", f"{host}/basic/pushed:1", root=tmp_path, env=env)
    assert out.stdout.decode().strip() == inspect_remote(auth_registry, "basic/small:1", auth_registry.creds)["digest"]
    lamina_cli("logout", host, root=tmp_path, env=env)
    proc = lamina_cli("push", f"{host}/basic/small:1", f"{host}/basic/again:1", root=tmp_path, check=False, env=env)
    assert proc.returncode == 1
    out = lamina_cli("push", "-q", "--creds", "alice:secret", f"{host}/basic/small:1", f"{host}/basic/again:1",
                     root=tmp_path, env=env)
    assert out.returncode == 0


def test_bearer_token_auth(tmp_path: Path, token_registry: TokenRegistry, umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), token_registry, "public/tok:1", token_registry.creds)
    host = token_registry.host
    with _svc(tmp_path) as svc:
        token_registry.token_service.clear()
        img = svc.pull_image(f"{host}/public/tok:1")  # anonymous pull of a public repository
        assert img.id == umoci_small_image.config_digest
        requests = token_registry.token_requests
        assert requests and all(r.account is None for r in requests)
        assert len(requests) <= 2  # one token per scope, reused for every blob
        from lamina.errors import LaminaError

        with pytest.raises(LaminaError):  # anonymous push is refused
            svc.push_image(f"{host}/public/tok:1", f"{host}/private/tok:1")
        digest = svc.push_image(f"{host}/public/tok:1", f"{host}/private/tok:1", creds=("alice", "secret"))
        assert digest == inspect_remote(token_registry, "private/tok:1", token_registry.creds)["digest"]
        with pytest.raises(LaminaError, match=host):
            svc.push_image(f"{host}/public/tok:1", f"{host}/private/tok:2", creds=("alice", "wrong"))


def test_killed_registry_mid_pull_resumes(tmp_path: Path, registry: Registry, debian_image_oci: ImageFacts) -> None:
    push_with_skopeo(debian_image_oci.ref(), registry, "big/debian:1")
    stopped = threading.Event()

    def kill_soon() -> None:
        time.sleep(0.4)
        registry.kill()
        stopped.set()
        time.sleep(1.0)
        registry.start()

    with _svc(tmp_path, max_download_attempts=8) as svc:
        t = threading.Thread(target=kill_soon)
        t.start()
        try:
            img = svc.pull_image(f"{registry.host}/big/debian:1")
        finally:
            t.join()
            if not registry.running:
                registry.start()
        assert stopped.is_set()
        assert img.id == debian_image_oci.config_digest
        assert [la.diff_id for la in svc.layers()] == list(debian_image_oci.diff_ids)
        svc.export_image([f"{registry.host}/big/debian:1"], tmp_path / "out", "oci-dir")
    from image_fixtures import inspect_image

    assert inspect_image("oci", tmp_path / "out", "1").manifest_digest == debian_image_oci.manifest_digest


def test_failed_pull_stores_nothing(tmp_path: Path, registry: Registry, umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), registry, "broken/small:1")
    manifest = inspect_remote(registry, "broken/small:1")["manifest"]
    layer = manifest["layers"][-1]["digest"]
    blob = next(Path(registry.storage_dir).rglob(f"blobs/sha256/{layer[7:9]}/{layer[7:]}/data"))
    original = blob.read_bytes()
    blob.write_bytes(original[:-10] + bytes(10))  # same size, wrong digest
    try:
        with _svc(tmp_path, max_download_attempts=2) as svc:
            from lamina.errors import LaminaError

            with pytest.raises(LaminaError):
                svc.pull_image(f"{registry.host}/broken/small:1")
            assert svc.images() == [] and svc.layers() == []
        blobs = list((tmp_path / "root" / "content" / "blobs" / "sha256").iterdir())
        assert blobs == [] and list((tmp_path / "root" / "content" / "ingest").iterdir()) == []
    finally:
        blob.write_bytes(original)
    assert _mounts(tmp_path) == []


def test_push_of_a_loaded_docker_archive(tmp_path: Path, registry: Registry, skopeo_images: SkopeoImages) -> None:
    """An image without a kept manifest gets one made (gzip layers, deterministic): pushing twice is stable."""
    with _svc(tmp_path) as svc:
        svc.load_image(skopeo_images.docker_archive.path)
        d1 = svc.push_image("example.com/small:1", f"{registry.host}/da/small:1")
        d2 = svc.push_image("example.com/small:1", f"{registry.host}/da/small:2")
    assert d1 == d2 == inspect_remote(registry, "da/small:2")["digest"]
    cfg = json.loads(inspect_remote(registry, "da/small:1")["raw"])["config"]
    assert cfg["digest"] == skopeo_images.docker_archive.config_digest


def test_pulled_image_runs(tmp_path: Path, registry: Registry, debian_image_oci: ImageFacts) -> None:
    from lamina.testing import require_root, require_tool

    require_root()
    require_tool("runc")
    push_with_skopeo(debian_image_oci.ref(), registry, "run/debian:1")
    lamina_cli("--driver", "overlay", "pull", "-q", f"{registry.host}/run/debian:1", root=tmp_path)
    out = lamina_cli("run", "--rm", f"{registry.host}/run/debian:1", "cat", "/etc/os-release", root=tmp_path)
    assert b"Debian GNU/Linux" in out.stdout
    assert _mounts(tmp_path) == []


def test_credential_helpers_pull_push_login_logout(tmp_path: Path, auth_registry: AuthRegistry,
                                                   umoci_small_image: ImageFacts) -> None:
    """docker's credHelpers and credsStore: the helper gives pulls and pushes their login, and login and
    logout store and erase it there; a helper that is missing or fails is a one-line error naming it."""
    from registry_fixtures import credential_helper, helper_calls

    push_with_skopeo(umoci_small_image.ref("small:1"), auth_registry, "helper/small:1", auth_registry.creds)
    host = auth_registry.host
    store = tmp_path / "helper.json"
    credential_helper(tmp_path / "bin", "labtest", store)
    broken = tmp_path / "bin" / "docker-credential-broken"
    broken.write_text("#!/bin/sh\necho 'the keyring is locked' >&2\nexit 3\n")
    broken.chmod(0o755)
    env = {k: os.environ[k] for k in ("LAMINA_AUTH_FILE", "XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}
    env["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    config = Path(env["DOCKER_CONFIG"]) / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)

    def cli(*args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return lamina_cli(*args, root=tmp_path, check=check, input=input, env=env)

    def fails(*args: str) -> str:
        proc = cli(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    config.write_text(json.dumps({"credHelpers": {host: "labtest"}}))
    fails("pull", "-q", f"{host}/helper/small:1")  # the helper has nothing: anonymous, refused
    assert helper_calls(store) == [["get", host]]
    store.write_text(json.dumps({host: ["alice", "secret"]}))
    out = cli("pull", "-q", f"{host}/helper/small:1")
    assert out.stdout.decode().strip() == umoci_small_image.config_digest
    # login stores in the helper docker's config names (here for every registry), and not in lamina's file
    config.write_text(json.dumps({"credsStore": "labtest"}))
    store.write_text("{}")
    assert b"Login Succeeded" in cli("login", host, "-u", "alice", "--password-stdin", input=b"secret\n").stdout
    assert json.loads(store.read_text()) == {host: ["alice", "secret"]}
    assert not Path(env["LAMINA_AUTH_FILE"]).exists()
    cli("push", "-q", f"{host}/helper/small:1", f"{host}/helper/pushed:1")
    assert inspect_remote(auth_registry, "helper/pushed:1", auth_registry.creds)["digest"]
    cli("logout", host)
    assert json.loads(store.read_text()) == {} and helper_calls(store)[-1] == ["erase", host]
    fails("push", "-q", f"{host}/helper/small:1", f"{host}/helper/again:1")
    assert "not logged in" in fails("logout", host)
    # a helper that is not there, or fails
    config.write_text(json.dumps({"credHelpers": {host: "nosuch"}}))
    assert "docker-credential-nosuch" in fails("pull", "-q", f"{host}/helper/small:1")
    config.write_text(json.dumps({"credsStore": "broken"}))
    err = fails("pull", "-q", f"{host}/helper/small:1")
    assert "docker-credential-broken" in err and "the keyring is locked" in err

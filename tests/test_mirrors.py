"""Registry mirrors, pull-through caches, prefix rewriting and blocked registries ([[registry]] tables).

The source is a real Debian ``docker-registry``; the mirror is a second one configured as a pull-through cache
(``proxy.remoteurl``) in front of it. Images go into the source with skopeo.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_fixtures import (
    AuthRegistry,
    Registry,
    _registry_fields,
    free_port,
    inspect_remote,
    pull_through_cache,
    push_with_skopeo,
    running,
)

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina import ImageService
from lamina.config import Config, load_config
from lamina.errors import ConfigError, LaminaError
from lamina.formats.reference import parse_normalized
from lamina.registry import endpoints, remote

ENDPOINT_LOG = "lamina.registry.endpoints"


# -- registries -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain registry of this module's own (tests stop and start it)."""
    from lamina.testing import require_tool

    require_tool("docker-registry")
    require_tool("skopeo")
    with running(Registry(**_registry_fields(tmp_path_factory.mktemp("mirror-source")))) as reg:
        yield reg


@pytest.fixture(scope="module")
def cache(source: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A pull-through cache in front of ``source``."""
    with running(pull_through_cache(tmp_path_factory.mktemp("mirror-cache"), source.url)) as reg:
        yield reg


@pytest.fixture(scope="module")
def spare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain registry only this module uses (a test kills it mid-blob)."""
    with running(Registry(**_registry_fields(tmp_path_factory.mktemp("mirror-spare")))) as reg:
        yield reg


pytestmark = pytest.mark.usefixtures("isolated_auth")


def _auth_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("LAMINA_AUTH_FILE", "XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG")}


def _config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _svc(tmp: Path, config_file: Path, name: str = "store") -> ImageService:
    return ImageService.open(load_config(config_file, driver="vfs", root=tmp / name / "root",
                                         runroot=tmp / name / "run"))


def _mirror_config(source: Registry, *mirrors: tuple[str, str]) -> str:
    text = f'[[registry]]\nlocation = "{source.host}"\n'
    for location, mode in mirrors:
        text += f'\n[[registry.mirror]]\nlocation = "{location}"\npull_from_mirror = "{mode}"\n'
    return text


def _served(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    """(kind, digest, "mirror HOST/REPO" or "source HOST/REPO") of each endpoint line logged."""
    out = []
    for rec in caplog.records:
        if rec.name != ENDPOINT_LOG:
            continue
        words = rec.getMessage().split()
        if len(words) == 6 and words[1] in ("manifest", "blob") and words[3] == "from":
            out.append((words[1], words[2], f"{words[4]} {words[5]}"))
    return out


def _blob_file(reg: Registry, digest: str) -> Path:
    alg, _, hexdigest = digest.partition(":")
    return reg.storage_dir / "docker" / "registry" / "v2" / "blobs" / alg / hexdigest[:2] / hexdigest / "data"


def _wait_for_blobs(reg: Registry, digests: list[str], timeout: float = 30.0) -> None:
    """The cache stores what it served in the background: wait until every blob is in its storage."""
    deadline = time.monotonic() + timeout
    while not all(_blob_file(reg, d).is_file() for d in digests):
        assert time.monotonic() < deadline, f"the cache did not store {digests}"
        time.sleep(0.1)


def _request(method: str, url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method), timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _catalog(reg: Registry) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{reg.url}/v2/_catalog?n=1000", timeout=10) as resp:
        return list(json.loads(resp.read())["repositories"])


def _blobs(image: ImageFacts) -> list[str]:
    return [image.config_digest, *image.layer_digests]


# -- the pull-through cache --------------------------------------------------------------------------------
def test_pull_through_cache_fills_then_serves_with_source_stopped(
    tmp_path: Path, source: Registry, cache: Registry, umoci_small_image: ImageFacts
) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "cached/app:1")
    digest = inspect_remote(source, "cached/app:1")["digest"]
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (cache.host, "all")))
    assert not any(_blob_file(cache, d).exists() for d in _blobs(umoci_small_image))
    # first store, through the CLI with --debug: every part comes from the mirror, one line each
    env = {"LAMINA_CONFIG": str(conf), "LAMINA_DRIVER": "vfs", **_auth_env()}
    proc = lamina_cli("pull", "--debug", "-q", f"{source.host}/cached/app:1", root=tmp_path / "one", env=env)
    assert proc.stdout.decode().strip() == umoci_small_image.config_digest
    lines = [line for line in proc.stderr.decode().splitlines() if " from mirror " in line or " from source " in line]
    assert f"DEBUG: {source.host}/cached/app:1: manifest {digest} from mirror {cache.host}/cached/app" in lines
    for blob in _blobs(umoci_small_image):
        assert f"DEBUG: {source.host}/cached/app:1: blob {blob} from mirror {cache.host}/cached/app" in lines
    assert len(lines) == 1 + len(_blobs(umoci_small_image)), lines
    _wait_for_blobs(cache, _blobs(umoci_small_image))
    # second store, with the source stopped: the mirror still serves the tag and the blobs
    source.stop()
    try:
        with _svc(tmp_path, conf, "two") as svc:
            img = svc.pull_image(f"{source.host}/cached/app:1")
            assert img.id == umoci_small_image.config_digest
            assert img.record.tags == (f"{source.host}/cached/app:1",)  # the name asked for, not the mirror's
            assert f"{source.host}/cached/app@{digest}" in img.record.digests
            assert [la.diff_id for la in svc.layers()] == list(umoci_small_image.diff_ids)
        with _svc(tmp_path, conf, "three") as svc:
            assert svc.pull_image(f"{source.host}/cached/app@{digest}").id == umoci_small_image.config_digest
        # without the mirror the same pull fails: the source really is gone
        plain = _config(tmp_path / "plain.toml", '[images]\nmax_download_attempts = 1\n')
        with _svc(tmp_path, plain, "four") as svc, pytest.raises(LaminaError, match="cannot reach"):
            svc.pull_image(f"{source.host}/cached/app:1")
    finally:
        source.start()


def test_digest_only_and_tag_only_mirrors(
    tmp_path: Path, source: Registry, cache: Registry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "bydigest/app:1")
    digest = inspect_remote(source, "bydigest/app:1")["digest"]
    digest_only = _config(tmp_path / "digest.toml", _mirror_config(source, (cache.host, "digest-only")))
    since = cache.log_size()
    with _svc(tmp_path, digest_only, "tag") as svc:
        svc.pull_image(f"{source.host}/bydigest/app:1")
    served = _served(caplog)
    assert served and all(where == f"source {source.host}/bydigest/app" for _, _, where in served)
    assert "/v2/bydigest/" not in cache.log_text(since)  # the mirror was not asked at all
    caplog.clear()
    with _svc(tmp_path, digest_only, "digest") as svc:
        svc.pull_image(f"{source.host}/bydigest/app@{digest}")
    served = _served(caplog)
    assert served and all(where == f"mirror {cache.host}/bydigest/app" for _, _, where in served)
    # tag-only: the other way round
    tag_only = _config(tmp_path / "tag.toml", _mirror_config(source, (cache.host, "tag-only")))
    caplog.clear()
    with _svc(tmp_path, tag_only, "digest2") as svc:
        svc.pull_image(f"{source.host}/bydigest/app@{digest}")
    assert {where for _, _, where in _served(caplog)} == {f"source {source.host}/bydigest/app"}
    caplog.clear()
    with _svc(tmp_path, tag_only, "tag2") as svc:
        svc.pull_image(f"{source.host}/bydigest/app:1")
    assert {where for _, _, where in _served(caplog)} == {f"mirror {cache.host}/bydigest/app"}


# -- falling through -----------------------------------------------------------------------------------------
def test_mirror_down_or_without_the_image_falls_through(
    tmp_path: Path, source: Registry, registry: Registry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "fallthrough/app:1")
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    # a mirror nobody answers on, then one that lacks the image (404), then the source
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (down, "all"), (registry.host, "all")))
    started = time.monotonic()
    with _svc(tmp_path, conf) as svc:
        img = svc.pull_image(f"{source.host}/fallthrough/app:1")
        assert img.id == umoci_small_image.config_digest
    assert time.monotonic() - started < 30
    served = _served(caplog)
    assert served and {where for _, _, where in served} == {f"source {source.host}/fallthrough/app"}
    failures = [r.getMessage() for r in caplog.records if r.name == ENDPOINT_LOG and "failed" in r.getMessage()]
    assert any(f"mirror {down}/" in m for m in failures) and any(f"mirror {registry.host}/" in m for m in failures)


def test_blob_missing_on_the_mirror_comes_from_the_source(
    tmp_path: Path, source: Registry, registry: Registry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain registry as the mirror, holding the image but for one layer blob."""
    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "perblob/app:1")
    push_with_skopeo(umoci_small_image.ref("small:1"), registry, "perblob/app:1")
    missing = umoci_small_image.layer_digests[0]
    assert _request("DELETE", f"{registry.url}/v2/perblob/app/blobs/{missing}") == 202
    assert _request("HEAD", f"{registry.url}/v2/perblob/app/blobs/{missing}") == 404
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (registry.host, "all")))
    with _svc(tmp_path, conf) as svc:
        assert svc.pull_image(f"{source.host}/perblob/app:1").id == umoci_small_image.config_digest
    served = {(kind, d): where for kind, d, where in _served(caplog)}
    mirror, src = f"mirror {registry.host}/perblob/app", f"source {source.host}/perblob/app"
    assert served.pop(("blob", missing)) == src
    assert served and set(served.values()) == {mirror}  # the manifest, the config and the other layers


def test_credentials_are_looked_up_per_endpoint(
    tmp_path: Path, source: Registry, auth_registry: AuthRegistry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mirror needs a login: the stored one for its host is used; credentials given for the pull are
    the source's and never go to the mirror."""
    from lamina.registry import auth

    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "creds/app:1")
    push_with_skopeo(umoci_small_image.ref("small:1"), auth_registry, "creds/app:1", auth_registry.creds)
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (auth_registry.host, "all")))
    mirror, src = f"mirror {auth_registry.host}/creds/app", f"source {source.host}/creds/app"
    # no login for the mirror: it refuses, the source serves
    with _svc(tmp_path, conf, "anonymous") as svc:
        svc.pull_image(f"{source.host}/creds/app:1")
    assert {where for _, _, where in _served(caplog)} == {src}
    # logged in to the mirror; the wrong credentials given for the pull are not sent there
    auth.store_credentials(auth_registry.host, auth_registry.user, auth_registry.password)
    caplog.clear()
    with _svc(tmp_path, conf, "logged-in") as svc:
        svc.pull_image(f"{source.host}/creds/app:1", creds=("mallory", "wrong"))
    assert {where for _, _, where in _served(caplog)} == {mirror}


def test_insecure_settings_reach_the_clients(tmp_path: Path) -> None:
    conf = _config(tmp_path / "lamina.toml", """
[[registry]]
location = "secure.example"

[[registry.mirror]]
location = "plain-mirror.example:5000"
insecure = true

[[registry]]
location = "plain.example"
insecure = true
""")
    config = load_config(conf, root=tmp_path / "root", runroot=tmp_path / "run")
    with remote.open_chain(config, parse_normalized("secure.example/a:1")) as chain:
        assert [chain._client(i).options.insecure for i in range(2)] == [True, False]
    with remote.open_chain(config, parse_normalized("plain.example/a:1")) as chain:
        assert chain._client(0).options.insecure is True
    with remote.open_chain(config, parse_normalized("secure.example/a:1"), tls_verify=False) as chain:
        assert chain._client(1).options.insecure is True  # --tls-verify=false: every endpoint


# -- damaged content -------------------------------------------------------------------------------------------
@pytest.fixture
def damaged(tmp_path: Path) -> Iterator[Registry]:
    """A plain registry of this test's own, whose stored blobs the test replaces by other bytes."""
    with running(Registry(**_registry_fields(tmp_path / "damaged-registry"))) as reg:
        yield reg


def _damage(reg: Registry, digest: str, header_only: bool = False) -> None:
    """Replace the registry's stored bytes of ``digest`` by others of the same size: every byte flipped, or
    (``header_only``) just the OS byte of a gzip header, which leaves a valid gzip stream of the same tar (the
    layer applies and its DiffID matches; only the blob's digest tells)."""
    path = _blob_file(reg, digest)
    data = bytearray(path.read_bytes())
    if header_only:
        assert data[:2] == b"\x1f\x8b"
        data[9] ^= 0xFF
    else:
        data = bytearray(b ^ 0xFF for b in data)
    path.write_bytes(bytes(data))


def _store_is_sound(root: Path, image: ImageFacts) -> None:
    """Every blob of ``image`` in the store's content hashes to its digest; no partial download is left."""
    import hashlib

    for digest in _blobs(image):
        data = (root / "content" / "blobs" / "sha256" / digest.partition(":")[2]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    partial = root / "content" / "partial"
    assert not partial.exists() or list(partial.iterdir()) == []


def _partials_are_right(root: Path, image: ImageFacts, failed: str) -> None:
    """No partial download of the blob ``failed`` is left; one of another blob (a concurrent download the
    failure cut short, kept to be resumed) holds the first bytes of the right blob."""
    partial = root / "content" / "partial"
    names = {p.name for p in partial.iterdir()} if partial.exists() else set()
    assert not {n for n in names if n.startswith(failed.replace(":", "-"))}, names
    for name in names - {n for n in names if n.endswith(".lock")}:
        data = (partial / name).read_bytes()
        assert image.blob(name.replace("-", ":", 1)).read_bytes()[:len(data)] == data


def _rejected(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The blobs whose bytes an endpoint served wrong, as logged (``"DIGEST ENDPOINT"``)."""
    out = []
    for rec in caplog.records:
        words = rec.getMessage().split()
        if rec.name == ENDPOINT_LOG and "did not verify" in rec.getMessage():
            out.append(f"{words[2]} {words[4]} {words[5]}")
    return out


def test_damaged_config_and_layers_on_a_mirror_come_from_the_source(
    tmp_path: Path, source: Registry, damaged: Registry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mirror serves the manifest, a config and two layers whose bytes do not match their digests (same
    sizes), and the third layer whole: each damaged blob is fetched again from the source, the rest comes
    from the mirror, and the store keeps only right bytes."""
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "damaged/app:1")
    push_with_skopeo(umoci_small_image.ref("small:1"), damaged, "damaged/app:1")
    config, first, second, third = _blobs(umoci_small_image)
    _damage(damaged, config)
    _damage(damaged, first, header_only=True)  # wrong only by its digest, known when its last byte is read
    _damage(damaged, second)  # no gzip stream at all
    text = _mirror_config(source, (damaged.host, "all"))
    conf = _config(tmp_path / "lamina.toml", text)
    mirror, src = f"mirror {damaged.host}/damaged/app", f"source {source.host}/damaged/app"
    # through the CLI: the first layer streams into the driver, the others into the content store
    env = {"LAMINA_CONFIG": str(conf), "LAMINA_DRIVER": "vfs", **_auth_env()}
    proc = lamina_cli("pull", "--debug", "-q", f"{source.host}/damaged/app:1", root=tmp_path / "one", env=env)
    assert proc.stdout.decode().strip() == umoci_small_image.config_digest
    err = proc.stderr.decode()
    for digest in (config, first, second):
        assert f"blob {digest} from {mirror} did not verify (" in err and f"fetching it again from {src}" in err
        assert f"DEBUG: {source.host}/damaged/app:1: blob {digest} from {src}\n" in err
    assert f"DEBUG: {source.host}/damaged/app:1: blob {third} from {mirror}\n" in err
    assert f"blob {third} from {src}" not in err
    with _svc(tmp_path, conf, "one") as svc:
        assert svc.get_image(f"{source.host}/damaged/app:1").id == umoci_small_image.config_digest
        assert [la.diff_id for la in svc.layers()] == list(umoci_small_image.diff_ids)
    _store_is_sound(tmp_path / "one" / "root", umoci_small_image)
    assert lamina_cli("system", "check", root=tmp_path / "one", env=env, check=False).returncode == 0
    # one download at a time: every layer streams into the driver, the damaged second one too; the third is
    # now longer on the mirror than its descriptor says
    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    with open(_blob_file(damaged, third), "ab") as f:
        f.write(b"\0" * 1024)
    serial = _config(tmp_path / "serial.toml", "[images]\nmax_concurrent_downloads = 1\n\n" + text)
    with _svc(tmp_path, serial, "two") as svc:
        img = svc.pull_image(f"{source.host}/damaged/app:1")
        assert img.id == umoci_small_image.config_digest
        assert [la.diff_id for la in svc.layers()] == list(umoci_small_image.diff_ids)
    assert sorted(_rejected(caplog)) == sorted(f"{d} {mirror}" for d in (config, first, second))
    served = {(kind, d): where for kind, d, where in _served(caplog)}
    assert served == {("manifest", inspect_remote(source, "damaged/app:1")["digest"]): mirror,
                      ("blob", config): src, ("blob", first): src, ("blob", second): src, ("blob", third): src}
    assert any(f"blob {third} from {mirror} failed (" in r.getMessage() and "not its size" in r.getMessage()
               for r in caplog.records)
    _store_is_sound(tmp_path / "two" / "root", umoci_small_image)


def test_a_manifest_by_digest_that_does_not_match_comes_from_the_source(
    tmp_path: Path, source: Registry, damaged: Registry, umoci_small_image: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "badmanifest/app:1")
    push_with_skopeo(umoci_small_image.ref("small:1"), damaged, "badmanifest/app:1")
    digest = inspect_remote(source, "badmanifest/app:1")["digest"]
    path = _blob_file(damaged, digest)
    doc = json.loads(path.read_bytes())
    path.write_bytes(json.dumps(doc, indent=1).encode())  # the same manifest, spelled otherwise
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (damaged.host, "all")))
    with _svc(tmp_path, conf) as svc:
        assert svc.pull_image(f"{source.host}/badmanifest/app@{digest}").id == umoci_small_image.config_digest
    messages = [r.getMessage() for r in caplog.records if r.name == ENDPOINT_LOG]
    assert any(f"manifest {digest} from mirror {damaged.host}/badmanifest/app failed (" in m
               and "does not match its digest" in m for m in messages), messages
    served = {(kind, d): where for kind, d, where in _served(caplog)}
    assert set(served.values()) == {f"source {source.host}/badmanifest/app"}  # the rest from where it came from
    _store_is_sound(tmp_path / "store" / "root", umoci_small_image)


def test_damaged_bytes_from_the_source_fail_the_pull_and_leave_nothing(
    tmp_path: Path, damaged: Registry, umoci_small_image: ImageFacts,
) -> None:
    """The last endpoint serves a layer wrong only by its digest (a mirror before it serves it wrong too):
    a one-line error, no image, no layer, nothing of that blob kept, a consistent store."""
    push_with_skopeo(umoci_small_image.ref("small:1"), damaged, "badsource/app:1")
    first = umoci_small_image.layer_digests[0]
    _damage(damaged, first, header_only=True)
    with running(Registry(**_registry_fields(tmp_path / "mirror-registry"))) as mirror:
        push_with_skopeo(umoci_small_image.ref("small:1"), mirror, "badsource/app:1")
        _damage(mirror, first)
        plain = _config(tmp_path / "plain.toml", "")
        both = _config(tmp_path / "both.toml", _mirror_config(damaged, (mirror.host, "all")))
        for conf in (plain, both):
            env = {"LAMINA_CONFIG": str(conf), "LAMINA_DRIVER": "vfs", **_auth_env()}
            root = tmp_path / conf.stem
            proc = lamina_cli("pull", f"{damaged.host}/badsource/app:1", root=root, env=env, check=False)
            err = proc.stderr.decode()
            assert proc.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert f"{first}) does not match its digest" in err
            _partials_are_right(root / "root", umoci_small_image, first)
            assert not (root / "root" / "content" / "blobs" / "sha256" / first.partition(":")[2]).exists()
            with _svc(tmp_path, conf, conf.stem) as svc:
                assert svc.images(all=True) == [] and list(svc.layers()) == []
            check = lamina_cli("system", "check", root=root, env=env, check=False)
            assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


# -- location, blocked, push -----------------------------------------------------------------------------------
def test_prefix_rewriting_for_pull_and_push(tmp_path: Path, source: Registry, umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "rewritten/app:1")
    conf = _config(tmp_path / "lamina.toml", f"""
[[registry]]
prefix = "lamina.example/team"
location = "{source.host}/rewritten"

[[registry]]
prefix = "*.corp.example"
location = "{source.host}"
""")
    with _svc(tmp_path, conf) as svc:
        img = svc.pull_image("lamina.example/team/app:1")
        assert img.id == umoci_small_image.config_digest
        assert img.record.tags == ("lamina.example/team/app:1",)
        # a subdomain of the wildcard prefix: its host is replaced, the path kept
        again = svc.pull_image("build.corp.example/rewritten/app:1")
        assert again.id == img.id
        # pushes are rewritten the same way
        pushed = svc.push_image("lamina.example/team/app:1", "lamina.example/team/pushed:2")
    assert inspect_remote(source, "rewritten/pushed:2")["digest"] == pushed
    # a name the prefix does not cover is not rewritten
    with _svc(tmp_path, conf, "other") as svc, pytest.raises(LaminaError):
        svc.pull_image("lamina.example/teams/app:1")


def test_blocked_registry_is_a_one_line_error(tmp_path: Path, source: Registry,
                                              umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "blocked/app:1")
    open_conf = _config(tmp_path / "open.toml", "")
    blocked = _config(tmp_path / "blocked.toml", f'[[registry]]\nprefix = "{source.host}/blocked"\n'
                      f'location = "{source.host}/blocked"\nblocked = true\n')
    env = {"LAMINA_DRIVER": "vfs", **_auth_env()}
    lamina_cli("pull", "-q", f"{source.host}/blocked/app:1", root=tmp_path,
               env={**env, "LAMINA_CONFIG": str(open_conf)})
    for args in (["pull", f"{source.host}/blocked/app:1"],
                 ["push", f"{source.host}/blocked/app:1", f"{source.host}/blocked/other:1"]):
        proc = lamina_cli(*args, root=tmp_path, check=False, env={**env, "LAMINA_CONFIG": str(blocked)})
        err = proc.stderr.decode()
        assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"the registry {source.host}/blocked is blocked" in err
    # the rest of the registry is not blocked
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "notblocked/app:1")
    lamina_cli("pull", "-q", f"{source.host}/notblocked/app:1", root=tmp_path,
               env={**env, "LAMINA_CONFIG": str(blocked)})


def test_push_goes_to_the_source_only(tmp_path: Path, source: Registry, registry: Registry,
                                      umoci_small_image: ImageFacts) -> None:
    """The mirror is a writable registry here: lamina must still leave it alone."""
    push_with_skopeo(umoci_small_image.ref("small:1"), source, "pushsrc/app:1")
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (registry.host, "all")))
    since = registry.log_size()
    with _svc(tmp_path, conf) as svc:
        svc.pull_image(f"{source.host}/pushsrc/app:1")
        digest = svc.push_image(f"{source.host}/pushsrc/app:1", f"{source.host}/pushsrc/pushed:1")
    assert inspect_remote(source, "pushsrc/pushed:1")["digest"] == digest
    assert "/v2/pushsrc/pushed/" not in registry.log_text(since)  # the mirror heard nothing of the push
    assert not any(repo.startswith("pushsrc/") for repo in _catalog(registry))
    for blob in _blobs(umoci_small_image):
        assert _request("HEAD", f"{registry.url}/v2/pushsrc/pushed/blobs/{blob}") == 404


# -- resolution and configuration (no registry) -------------------------------------------------------------
def _resolved(config: Config, name: str) -> list[str]:
    return [str(e) for e in endpoints.pull_endpoints(config, parse_normalized(name))]


def test_endpoint_resolution(tmp_path: Path) -> None:
    conf = _config(tmp_path / "lamina.toml", """
[[registry]]
prefix = "example.com"
location = "central.example:5000"

[[registry]]
prefix = "example.com/team"
location = "team.example/mirrored"

[[registry.mirror]]
location = "cache.example/t"
pull_from_mirror = "tag-only"

[[registry.mirror]]
location = "cache2.example"

[[registry]]
prefix = "*.corp.example"

[[registry.mirror]]
location = "corp-cache.example"

[[registry]]
location = "docker.io"

[[registry.mirror]]
location = "hub-cache.example:5000"
""")
    text = load_config(conf, root=tmp_path / "root", runroot=tmp_path / "run")
    # the longest prefix wins; a prefix matches at a path boundary only
    assert _resolved(text, "example.com/team/app:1") == [
        "mirror cache.example/t/app", "mirror cache2.example/app", "source team.example/mirrored/app"]
    assert _resolved(text, f"example.com/team/app@sha256:{'a' * 64}") == [
        "mirror cache2.example/app", "source team.example/mirrored/app"]
    assert _resolved(text, "example.com/teams/app:1") == ["source central.example:5000/teams/app"]
    assert _resolved(text, "other.example/x:1") == ["source other.example/x"]
    # a wildcard without a location keeps the reference's own host
    assert _resolved(text, "a.b.corp.example:444/tools/x:1") == [
        "mirror corp-cache.example/tools/x", "source a.b.corp.example:444/tools/x"]
    assert _resolved(text, "corp.example/x:1") == ["source corp.example/x"]
    # docker.io names are normalized before matching
    assert _resolved(text, "busybox") == [
        "mirror hub-cache.example:5000/library/busybox", "source docker.io/library/busybox"]


@pytest.mark.parametrize(("text", "message"), [
    ('[registry]\nlocation = "a.example"\n', "[[registry]] must be a list"),
    ('[[registry]]\nlocation = "https://a.example"\n',
     "registry #1: location 'https://a.example' must not have a scheme"),
    ('[[registry]]\nlocation = "a.example/Upper"\n', "registry #1: location 'a.example/Upper' has an invalid"),
    ('[[registry]]\nlocation = "a example"\n', "registry #1: location 'a example' must be host[:port][/path]"),
    ('[[registry]]\nlocation = 5\n', "registry #1: location must be a str"),
    ('[[registry]]\nprefix = "a.example"\n', "registry #1: needs a location unless its prefix is *.domain"),
    ('[[registry]]\nprefix = "*.a.example/x"\nlocation = "b.example"\n', "registry #1: prefix '*.a.example/x'"),
    ('[[registry]]\nlocation = "a.example"\nblocked = "yes"\n', "registry #1: blocked must be a bool"),
    ('[[registry]]\nlocation = "a.example"\ninsecure = 1\n', "registry #1: insecure must be a bool"),
    ('[[registry]]\nlocation = "a.example"\nmirrors = []\n', "registry #1: unknown key(s) mirrors"),
    ('[[registry]]\nlocation = "a.example"\n[[registry]]\nprefix = "a.example"\nlocation = "b.example"\n',
     "registry #2: prefix 'a.example' is given by another"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\ninsecure = true\n',
     "registry #1: mirror #1: needs a location"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m.example"\npull_from_mirror = "tags"\n',
     "registry #1: mirror #1: pull_from_mirror must be one of all, digest-only, tag-only, got 'tags'"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "http://m.example"\n',
     "registry #1: mirror #1: location 'http://m.example' must not have a scheme"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m.example"\nurl = "x"\n',
     "registry #1: mirror #1: unknown key(s) url"),
])
def test_config_validation(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "lamina.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, root=tmp_path / "root", runroot=tmp_path / "run")
    assert message in info.value.message
    assert info.value.message.startswith(str(path)) and "\n" not in info.value.message


def test_config_values(tmp_path: Path) -> None:
    path = tmp_path / "lamina.toml"
    path.write_text('[images]\nregistries = ["a.example"]\n\n[[registry]]\nprefix = "a.example/x"\n'
                    'location = "b.example:5000/y/"\ninsecure = true\n\n[[registry.mirror]]\nlocation = "m.example"\n'
                    'insecure = true\npull_from_mirror = "digest-only"\n')
    cfg = load_config(path, root=tmp_path / "root", runroot=tmp_path / "run")
    assert cfg.registry.registries == ("a.example",)
    [table] = cfg.registry.per_registry
    assert (table.prefix, table.location, table.insecure, table.blocked) == ("a.example/x", "b.example:5000/y", True,
                                                                              False)
    assert [(m.location, m.insecure, m.pull_from_mirror) for m in table.mirrors] == [("m.example", True, "digest-only")]
    path.write_text('[[registry]]\nlocation = "index.docker.io"\n')
    cfg = load_config(path, root=tmp_path / "root", runroot=tmp_path / "run")
    assert _resolved(cfg, "busybox") == ["source docker.io/library/busybox"]
    assert cfg.registry.per_registry[0].prefix == "docker.io"


def test_readme_example(tmp_path: Path) -> None:
    """The README's [[registry]] example is valid and does what the README says."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    [block] = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "cache.lan:5000" in b]
    config = load_config(_config(tmp_path / "lamina.toml", block), root=tmp_path / "root", runroot=tmp_path / "run")
    assert _resolved(config, "registry.example.com/app:1") == [
        "mirror cache.lan:5000/app", "source registry.example.com/app"]
    assert _resolved(config, f"registry.example.com/app@sha256:{'a' * 64}") == [
        "mirror cache.lan:5000/app", "mirror backup.lan/mirrored/app", "source registry.example.com/app"]
    assert _resolved(config, "old.example.com/team/app:1") == ["source registry.example.com/team/app"]
    assert str(endpoints.push_endpoint(config, parse_normalized("old.example.com/team/app:1"))) == \
        "source registry.example.com/team/app"
    with pytest.raises(endpoints.RegistryBlocked, match="blocked"):
        endpoints.pull_endpoints(config, parse_normalized("a.untrusted.example/app:1"))


def test_a_mirror_that_breaks_off_mid_blob_is_carried_on_by_the_source(
    tmp_path: Path, source: Registry, spare: Registry, debian_image_oci: ImageFacts,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mirror dies in the middle of the big layer: the source serves the rest of it with ``Range``,
    and the blob, hashed whole, is accepted."""
    import threading

    caplog.set_level(logging.DEBUG, logger=ENDPOINT_LOG)
    push_with_skopeo(debian_image_oci.ref(), source, "midblob/debian:1")
    push_with_skopeo(debian_image_oci.ref(), spare, "midblob/debian:1")
    [layer] = debian_image_oci.layer_digests
    partial = tmp_path / "store" / "root" / "content" / "partial" / layer.replace(":", "-")
    conf = _config(tmp_path / "lamina.toml", _mirror_config(source, (spare.host, "all")))
    since = source.log_size()
    killed = threading.Event()

    def kill_mid_blob() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if partial.stat().st_size > 4 << 20:
                    spare.kill()
                    killed.set()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    watcher = threading.Thread(target=kill_mid_blob)
    watcher.start()
    try:
        with _svc(tmp_path, conf) as svc:
            img = svc.pull_image(f"{source.host}/midblob/debian:1")
            assert img.id == debian_image_oci.config_digest
            assert [la.diff_id for la in svc.layers()] == list(debian_image_oci.diff_ids)
    finally:
        watcher.join()
        spare.start()
    assert killed.is_set(), "the pull ended before the mirror could be killed"
    messages = [r.getMessage() for r in caplog.records if r.name == ENDPOINT_LOG]
    assert any(f"blob {layer} from mirror {spare.host}/midblob/debian broke off at byte" in m for m in messages)
    time.sleep(0.2)
    ranged = [line for line in source.log_text(since).splitlines()
              if f"/blobs/{layer} HTTP" in line and '" 206 ' in line]
    assert len(ranged) == 1, ranged

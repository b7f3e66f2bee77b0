"""The test registries work, checked with skopeo only (lamina is not used).

A failure here is a problem of the test setup (docker-registry, skopeo, the token service and the
fixtures in registry_fixtures.py), not of lamina.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from registry_fixtures import (
    PASSWORD,
    TOKEN_ISSUER,
    TOKEN_SERVICE,
    USER,
    AuthRegistry,
    Registry,
    TokenRegistry,
    decode_jwt,
    inspect_remote,
    push_with_skopeo,
)

from image_fixtures import ImageFacts

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_plain_registry_push_and_inspect(registry: Registry, umoci_small_image: ImageFacts) -> None:
    status, headers, _ = _get(f"{registry.url}/v2/")
    assert status == 200
    assert headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
    dest = push_with_skopeo(umoci_small_image.ref(), registry, "fixtures/plain:1")
    assert dest == f"docker://{registry.host}/fixtures/plain:1"
    remote = inspect_remote(registry, "fixtures/plain:1")
    assert remote["digest"] == umoci_small_image.manifest_digest
    assert remote["manifest"]["config"]["digest"] == umoci_small_image.config_digest
    by_digest = inspect_remote(registry, f"fixtures/plain@{umoci_small_image.manifest_digest}")
    assert by_digest["raw"] == remote["raw"]
    assert (registry.storage_dir / "docker/registry/v2/repositories/fixtures/plain").is_dir()


def test_plain_registry_restart_keeps_data(registry: Registry, umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref(), registry, "fixtures/restart:1")
    old_pid = registry.process.pid if registry.process else None
    registry.restart()
    assert registry.running and registry.process is not None and registry.process.pid != old_pid
    assert inspect_remote(registry, "fixtures/restart:1")["digest"] == umoci_small_image.manifest_digest

    registry.kill()
    assert not registry.running
    with pytest.raises(RuntimeError):
        inspect_remote(registry, "fixtures/restart:1")
    registry.start()
    assert inspect_remote(registry, "fixtures/restart:1")["digest"] == umoci_small_image.manifest_digest
    assert "starting" in registry.log_text()


def test_auth_registry(auth_registry: AuthRegistry, umoci_small_image: ImageFacts) -> None:
    assert (auth_registry.user, auth_registry.password, auth_registry.creds) == (USER, PASSWORD, "alice:secret")
    status, headers, _ = _get(f"{auth_registry.url}/v2/")
    assert status == 401
    assert headers.get("Www-Authenticate", "").startswith("Basic ")
    assert _get(f"{auth_registry.url}/v2/", _basic(USER, PASSWORD))[0] == 200
    assert _get(f"{auth_registry.url}/v2/", _basic(USER, "wrong"))[0] == 401

    push_with_skopeo(umoci_small_image.ref(), auth_registry, "fixtures/auth:1", auth_registry.creds)
    remote = inspect_remote(auth_registry, "fixtures/auth:1", auth_registry.creds)
    assert remote["digest"] == umoci_small_image.manifest_digest

    with pytest.raises(RuntimeError, match=r"(?i)unauthorized|authentication"):
        inspect_remote(auth_registry, "fixtures/auth:1", f"{USER}:wrong")
    with pytest.raises(RuntimeError):
        inspect_remote(auth_registry, "fixtures/auth:1")
    with pytest.raises(RuntimeError):
        push_with_skopeo(umoci_small_image.ref(), auth_registry, "fixtures/auth:2", f"{USER}:wrong")


def test_token_registry_push_and_pull(token_registry: TokenRegistry, umoci_small_image: ImageFacts) -> None:
    svc = token_registry.token_service
    status, headers, _ = _get(f"{token_registry.url}/v2/")
    assert status == 401
    challenge = headers.get("Www-Authenticate", "")
    assert challenge.startswith("Bearer ")
    assert f'realm="{svc.realm}"' in challenge and f'service="{TOKEN_SERVICE}"' in challenge

    svc.clear()
    push_with_skopeo(umoci_small_image.ref(), token_registry, "fixtures/token:1", token_registry.creds)
    pushes = [r for r in token_registry.token_requests if r.status == 200]
    assert pushes and all(r.account == USER for r in pushes)
    assert any("repository:fixtures/token:pull,push" in r.scopes for r in pushes)
    granted = {(a["name"], tuple(a["actions"])) for r in pushes for a in r.granted}
    assert ("fixtures/token", ("pull", "push")) in granted

    remote = inspect_remote(token_registry, "fixtures/token:1", token_registry.creds)
    assert remote["digest"] == umoci_small_image.manifest_digest

    # Anonymous clients get a token without access outside public/: the registry refuses them.
    with pytest.raises(RuntimeError):
        inspect_remote(token_registry, "fixtures/token:1")


def test_token_registry_wrong_creds(token_registry: TokenRegistry, umoci_small_image: ImageFacts) -> None:
    svc = token_registry.token_service
    svc.clear()
    with pytest.raises(RuntimeError):
        push_with_skopeo(umoci_small_image.ref(), token_registry, "fixtures/token-wrong:1", f"{USER}:wrong")
    with pytest.raises(RuntimeError):
        inspect_remote(token_registry, "fixtures/token:1", f"{USER}:wrong")
    assert token_registry.token_requests
    assert all(r.status == 401 and not r.granted for r in token_registry.token_requests)


def test_token_registry_anonymous_public_pull(token_registry: TokenRegistry, umoci_small_image: ImageFacts) -> None:
    push_with_skopeo(umoci_small_image.ref(), token_registry, "public/small:1", token_registry.creds)
    token_registry.token_service.clear()
    remote = inspect_remote(token_registry, "public/small:1")
    assert remote["digest"] == umoci_small_image.manifest_digest
    anonymous = [r for r in token_registry.token_requests if r.account is None]
    assert anonymous and all(r.status == 200 for r in anonymous)
    assert any(a == {"type": "repository", "name": "public/small", "actions": ["pull"]}
               for r in anonymous for a in r.granted)
    # ... but no anonymous push, not even to public/.
    with pytest.raises(RuntimeError):
        push_with_skopeo(umoci_small_image.ref(), token_registry, "public/small:2")


def test_token_service_tokens(token_registry: TokenRegistry) -> None:
    svc = token_registry.token_service
    url = f"{svc.realm}?service={TOKEN_SERVICE}&scope=repository:fixtures/x:pull,push&scope=registry:catalog:*"
    status, _, body = _get(url, _basic(USER, PASSWORD))
    assert status == 200
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"] and answer["expires_in"] > 0
    header, claims = decode_jwt(answer["token"])
    assert header["alg"] == "RS256" and header["kid"] == svc.key_id and header["x5c"]
    assert len(header["kid"]) == 59 and header["kid"].count(":") == 11
    assert claims["iss"] == TOKEN_ISSUER and claims["aud"] == TOKEN_SERVICE and claims["sub"] == USER
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["access"] == [
        {"type": "repository", "name": "fixtures/x", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    # The registry takes the token.
    assert _get(f"{token_registry.url}/v2/", {"Authorization": f"Bearer {answer['token']}"})[0] == 200
    status, _, body = _get(f"{token_registry.url}/v2/_catalog", {"Authorization": f"Bearer {answer['token']}"})
    assert status == 200 and "repositories" in json.loads(body)

    anonymous = json.loads(_get(url)[2])
    assert decode_jwt(anonymous["token"])[1]["access"] == []
    assert _get(url, _basic(USER, "wrong"))[0] == 401
    assert _get(f"{svc.realm}?service=other&scope=repository:x:pull", _basic(USER, PASSWORD))[0] == 400

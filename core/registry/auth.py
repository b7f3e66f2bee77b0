"""Registry credentials: lamina's own auth file, and the ones podman, skopeo and docker write.

Every file has the containers/docker ``auth.json`` shape::

    {"auths": {"registry.example.com": {"auth": "<base64 of user:password>"}}}

:func:`find_credentials` looks through, in order (the first file with an entry for the host wins):

1. lamina's file, :func:`lamina_auth_file` (``$LAMINA_AUTH_FILE``; else ``/run/lamina/auth.json`` for root,
   ``$XDG_RUNTIME_DIR/lamina/auth.json`` for others);
2. ``$REGISTRY_AUTH_FILE``;
3. ``$XDG_RUNTIME_DIR/containers/auth.json`` (root without it: ``/run/containers/0/auth.json``);
4. ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/containers/auth.json``);
5. ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``.

Keys are matched on the host: ``host``, ``https://host`` or ``http://host/...`` (docker's URL form);
``index.docker.io``, ``registry-1.docker.io`` and ``https://index.docker.io/v1/`` all mean ``docker.io``.
Repository-scoped keys (``host/namespace``) and entries that defer to a credential helper (``credsStore``,
``credHelpers``, an empty entry, an ``identitytoken``) are skipped without a word. A file that exists but
cannot be read or parsed raises :class:`~lamina.registry.client.AuthError` naming the file.

:func:`login` checks credentials against the registry before :func:`store_credentials` writes them to
lamina's file (mode 0600, replaced atomically); :func:`logout` removes them again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lamina.registry.client import AuthError, Credentials, RegistryClient, RegistryOptions

__all__ = [
    "ClientFactory",
    "credential_files",
    "find_credentials",
    "lamina_auth_file",
    "login",
    "logout",
    "normalize_host",
    "store_credentials",
]

_MAX_FILE_BYTES = 4 * 1024 * 1024
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class _Pinger(Protocol):
    def ping(self) -> None: ...


#: Builds the client :func:`login` verifies with: ``(host, credentials) -> client``.
ClientFactory = Callable[[str, Credentials], _Pinger]


def lamina_auth_file() -> Path:
    """Where lamina stores credentials."""
    env = os.environ.get("LAMINA_AUTH_FILE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/lamina/auth.json")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lamina" / "auth.json"
    return Path(f"/run/user/{os.geteuid()}") / "lamina" / "auth.json"


def _home() -> Path | None:
    try:
        return Path.home()
    except (RuntimeError, KeyError, OSError):
        return None


def credential_files() -> list[Path]:
    """The files :func:`find_credentials` reads, in order."""
    files = [lamina_auth_file()]
    if registry_auth := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(registry_auth))
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(runtime) / "containers" / "auth.json")
    elif os.geteuid() == 0:
        files.append(Path("/run/containers/0/auth.json"))
    home = _home()
    config_home = os.environ.get("XDG_CONFIG_HOME")
    if config_home:
        files.append(Path(config_home) / "containers" / "auth.json")
    elif home is not None:
        files.append(home / ".config" / "containers" / "auth.json")
    if docker_config := os.environ.get("DOCKER_CONFIG"):
        files.append(Path(docker_config) / "config.json")
    elif home is not None:
        files.append(home / ".docker" / "config.json")
    out: list[Path] = []
    for f in files:
        if f not in out:
            out.append(f)
    return out


def normalize_host(key: str) -> str | None:
    """The registry host an auth-file key or a login argument names, or None for a repository-scoped key.

    ``https://index.docker.io/v1/`` -> ``docker.io``; ``HTTPS://Example.com:5000`` -> ``example.com:5000``.
    """
    text = key.strip()
    lowered = text.lower()
    url_form = False
    for prefix in ("https://", "http://"):
        if lowered.startswith(prefix):
            text = text[len(prefix) :]
            url_form = True
            break
    if url_form:
        text = text.split("/", 1)[0]
    elif text.endswith("/"):
        text = text.rstrip("/")
    if not text or "/" in text or any(c.isspace() for c in text):
        return None
    text = text.lower()
    return "docker.io" if text in _DOCKER_HUB_ALIASES else text


def _load(path: Path) -> dict[str, Any] | None:
    """An auth file's JSON object; None if it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        raise AuthError(f"cannot read the auth file {path}: it is a directory") from None
    except OSError as e:
        raise AuthError(f"cannot read the auth file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise AuthError(f"the auth file {path} is larger than {_MAX_FILE_BYTES} bytes")
    if not data.strip():
        return {}
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise AuthError(f"the auth file {path} is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise AuthError(f"the auth file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError):
        raise AuthError(f"the auth file {path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise AuthError(f"the auth file {path} must hold a JSON object")
    auths = doc.get("auths")
    if auths is not None and not isinstance(auths, dict):
        raise AuthError(f"the auth file {path}: auths must be an object")
    return doc


def _decode_entry(path: Path, key: str, entry: object) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        raise AuthError(f"the auth file {path}: the entry for {key!r} must be an object")
    auth = entry.get("auth")
    if auth is not None and not isinstance(auth, str):
        raise AuthError(f"the auth file {path}: the auth of {key!r} must be a string")
    if auth:
        try:
            raw = base64.b64decode("".join(auth.split()), validate=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise AuthError(f"the auth file {path}: the auth of {key!r} is not base64 of user:password") from None
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise AuthError(f"the auth file {path}: the auth of {key!r} is not base64 of user:password")
        return user, password
    user_value, password_value = entry.get("username"), entry.get("password")
    if isinstance(user_value, str) and user_value and isinstance(password_value, str):
        return user_value, password_value
    return None  # an empty entry (credsStore), an identity token: not something lamina can use


def _lookup(path: Path, doc: dict[str, Any], host: str) -> tuple[str, str] | None:
    auths = doc.get("auths") or {}
    # The key spelled exactly as the host first, then its other spellings.
    keys = sorted((k for k in auths if isinstance(k, str) and normalize_host(k) == host), key=lambda k: k != host)
    for key in keys:
        creds = _decode_entry(path, key, auths[key])
        if creds is not None:
            return creds
    return None


def find_credentials(host: str) -> tuple[str, str] | None:
    """``(user, password)`` for ``host`` from the first auth file that has them, or None."""
    wanted = normalize_host(host)
    if wanted is None:
        return None
    for path in credential_files():
        doc = _load(path)
        if doc is None:
            continue
        creds = _lookup(path, doc, wanted)
        if creds is not None:
            return creds
    return None


def _login_host(host: str) -> str:
    key = normalize_host(host) if isinstance(host, str) else None
    if key is None:
        raise AuthError(f"invalid registry host {host!r}")
    return key


def _write(path: Path, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, indent="\t", sort_keys=True) + "\n").encode("utf-8")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except OSError as e:
        raise AuthError(f"cannot write the auth file {path}: {e.strerror or e}") from None


def store_credentials(host: str, user: str, password: str) -> None:
    """Write ``user``/``password`` for ``host`` to lamina's auth file (without checking them)."""
    key = _login_host(host)
    if not isinstance(user, str) or not user or ":" in user or any(c in user for c in "\r\n"):
        raise AuthError("the user name must be non-empty and contain no ':' or newline")
    if not isinstance(password, str):
        raise AuthError("the password must be a string")
    path = lamina_auth_file()
    doc = _load(path) or {}
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    for other in [k for k in auths if isinstance(k, str) and k != key and normalize_host(k) == key]:
        del auths[other]  # one entry per host
    auths[key] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}
    doc["auths"] = auths
    _write(path, doc)


def _default_factory(host: str, credentials: Credentials) -> _Pinger:
    return RegistryClient(host, RegistryOptions(), credentials=credentials)


def login(host: str, user: str, password: str, client_factory: ClientFactory | None = None) -> None:
    """Check the credentials with a ping of the registry (AuthError if it refuses them), then store them."""
    key = _login_host(host)
    if not isinstance(user, str) or not user or ":" in user:
        raise AuthError("the user name must be non-empty and contain no ':'")
    factory = client_factory if client_factory is not None else _default_factory
    client = factory(key, lambda _host: (user, password))
    try:
        client.ping()
    finally:
        close = getattr(client, "close", None)
        if callable(close):
            close()
    store_credentials(key, user, password)


def logout(host: str) -> bool:
    """Remove the credentials for ``host`` from lamina's auth file; False if there were none."""
    key = _login_host(host)
    path = lamina_auth_file()
    doc = _load(path)
    if not doc or not isinstance(doc.get("auths"), dict):
        return False
    auths = doc["auths"]
    doomed = [k for k in auths if isinstance(k, str) and normalize_host(k) == key]
    if not doomed:
        return False
    for k in doomed:
        del auths[k]
    _write(path, doc)
    return True

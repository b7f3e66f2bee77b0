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
Repository-scoped keys (``host/namespace``), empty entries and ``identitytoken`` entries are skipped. A file
that exists but cannot be read or parsed raises :class:`~lamina.registry.client.AuthError` naming the file.

A file that names a credential helper for the host (``credHelpers``, else ``credsStore``, docker's
``config.json`` keys) answers through it rather than its ``auths``: ``docker-credential-NAME get`` with the
server (the host; ``https://index.docker.io/v1/`` for Docker Hub) on stdin, a JSON ``{"ServerURL",
"Username", "Secret"}`` on stdout; "credentials not found" (exit status 1) sends the lookup on to the next
file. A helper that is not installed, fails or answers nonsense is an ``AuthError`` naming it.

:func:`login` checks credentials against the registry before :func:`save_login` keeps them: with the helper
the credential files name for the host (``docker-credential-NAME store``), else in lamina's file (mode
0600, replaced atomically, :func:`store_credentials`); :func:`logout` removes them from both (``erase``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import subprocess
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
    "save_login",
    "store_credentials",
]

_MAX_FILE_BYTES = 4 * 1024 * 1024
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_SERVER = "https://index.docker.io/v1/"  # the server docker hands helpers for Docker Hub
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HELPER_TIMEOUT = 60.0
_HELPER_NOT_FOUND = "credentials not found"  # docker-credential-helpers' errCredentialsNotFoundMessage
log = logging.getLogger("lamina.registry.auth")


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
    """``(user, password)`` for ``host`` from the first auth file (or the helper it names) that has them."""
    wanted = normalize_host(host)
    if wanted is None:
        return None
    for path in credential_files():
        doc = _load(path)
        if doc is None:
            continue
        helper = _helper_of(path, doc, wanted)
        creds = _helper_get(helper, wanted) if helper is not None else _lookup(path, doc, wanted)
        if creds is not None:
            return creds
    return None


# -- credential helpers ---------------------------------------------------------------------------------------
class _Helper:
    """A ``docker-credential-NAME`` program an auth file names, and which file names it."""

    def __init__(self, name: str, source: Path) -> None:
        self.program = f"docker-credential-{name}"
        self.source = source

    def run(self, action: str, data: str, host: str) -> str | None:
        """Its stdout for ``action``; None when it says it has no credentials for the server."""
        try:
            proc = subprocess.run(
                [self.program, action], input=data.encode("utf-8"), capture_output=True, timeout=_HELPER_TIMEOUT
            )
        except FileNotFoundError:
            raise AuthError(
                f"the credential helper {self.program} that {self.source} names for {host} is not installed"
            ) from None
        except subprocess.TimeoutExpired:
            raise AuthError(f"the credential helper {self.program} gave no answer to {action} within "
                            f"{_HELPER_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise AuthError(f"cannot run the credential helper {self.program}: {e.strerror or e}") from None
        out = proc.stdout.decode("utf-8", "replace").strip()
        if proc.returncode == 0:
            return out
        said = out or proc.stderr.decode("utf-8", "replace").strip()
        if _HELPER_NOT_FOUND in said.lower():
            return None
        first = said.splitlines()[0][:200] if said else f"exit status {proc.returncode}"
        raise AuthError(f"the credential helper {self.program} failed to {action} the credentials for {host}: {first}")


def _server_url(host: str) -> str:
    return _DOCKER_HUB_SERVER if host == "docker.io" else host


def _helper_of(path: Path, doc: dict[str, Any], host: str) -> _Helper | None:
    """The helper ``doc`` names for ``host``: its ``credHelpers`` entry, else its ``credsStore``."""
    helpers = doc.get("credHelpers")
    if helpers is not None and not isinstance(helpers, dict):
        raise AuthError(f"the auth file {path}: credHelpers must be an object")
    name: object = None
    for key, value in sorted((helpers or {}).items(), key=lambda kv: kv[0] != host):
        if isinstance(key, str) and normalize_host(key) == host:
            name = value
            break
    else:
        name = doc.get("credsStore")
    if name is None or name == "":
        return None
    if not isinstance(name, str) or not _HELPER_NAME.fullmatch(name):
        raise AuthError(f"the auth file {path}: {name!r} is not a credential helper name")
    return _Helper(name, path)


def _helper_get(helper: _Helper, host: str) -> tuple[str, str] | None:
    out = helper.run("get", _server_url(host), host)
    if out is None:
        return None
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, TypeError, KeyError):
        raise AuthError(f"the credential helper {helper.program} answered get for {host} with no "
                        "Username and Secret") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f"the credential helper {helper.program} answered get for {host} with no Username and Secret")
    if user == "<token>":  # an identity token: an OAuth2 refresh token lamina cannot exchange
        log.warning("%s holds an identity token for %s, which lamina cannot use; going on without it",
                    helper.program, host)
        return None
    return (user, secret) if user else None


def _login_helper(host: str) -> _Helper | None:
    """The helper the first credential file naming one for ``host`` names (where docker would log in)."""
    for path in credential_files():
        doc = _load(path)
        if doc is not None and (helper := _helper_of(path, doc, host)) is not None:
            return helper
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


def save_login(host: str, user: str, password: str) -> str:
    """Keep checked credentials: with the credential helper the credential files name for ``host`` (and
    out of lamina's file, where they would shadow it), else in lamina's file. Returns where they went."""
    key = _login_host(host)
    helper = _login_helper(key)
    if helper is None:
        store_credentials(key, user, password)
        return str(lamina_auth_file())
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise AuthError("the user name must be non-empty and the password a string")
    helper.run("store", json.dumps({"ServerURL": _server_url(key), "Username": user, "Secret": password}), key)
    _forget(key)
    return helper.program


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
    save_login(key, user, password)


def logout(host: str) -> bool:
    """Remove the credentials for ``host`` from lamina's auth file and from the credential helper the
    credential files name for it; False if there were none."""
    key = _login_host(host)
    helper = _login_helper(key)
    erased = helper is not None and helper.run("erase", _server_url(key), key) is not None
    return _forget(key) or erased


def _forget(key: str) -> bool:
    """Remove ``key``'s entries from lamina's auth file; False if there were none."""
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

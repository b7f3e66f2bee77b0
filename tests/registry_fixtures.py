"""Real container registries on 127.0.0.1 for pull/push tests: the remote side of registry tests.

A pytest plugin (``pytest_plugins = [..., "registry_fixtures"]`` in ``tests/conftest.py``) with
session-scoped fixtures. Each runs Debian's ``docker-registry`` (distribution 2.8) as a subprocess with
its own config file, storage directory and free loopback port; the fixture waits until ``GET /v2/``
answers (20 s at most) and stops the process at teardown (SIGTERM, then SIGKILL). The registry's output
goes to a log file; when a test that used a registry fails, the part of the log written during the test
is added to the report (section "registry log ..."), and a registry that does not come up fails with
the end of its log.

Fixtures:

``registry``
    :class:`Registry`, plain HTTP, no auth. ``restart()`` / ``stop()`` / ``start()`` / ``kill()`` keep
    the port and the storage, for "the registry went away mid-pull" tests.
``auth_registry``
    :class:`AuthRegistry`, htpasswd basic auth: user ``alice``, password ``secret`` (``.user``,
    ``.password``, ``.creds`` = ``"alice:secret"``).
``token_registry``
    :class:`TokenRegistry`, bearer-token auth against :class:`TokenService`, a small token server run by
    the fixture in a thread on another loopback port (realm ``.token_service.realm``, service
    ``lamina-test``, issuer ``lamina-test-issuer``). ``alice``/``secret`` get every action they ask for
    (pull, push, delete, catalog); anonymous requests get ``pull`` on repositories under ``public/`` and
    nothing else; wrong credentials get 401. Each request is recorded in ``.token_requests`` (a list of
    :class:`TokenRequest`) so that tests can check a client's token caching; ``clear()`` empties it.
    Tokens are RS256 JWTs whose header carries the signing certificate (``x5c``) and its libtrust key
    id (``kid``); the registry trusts that self-signed certificate (``rootcertbundle``).

Helpers (skopeo only, no lamina): :func:`push_with_skopeo` and :func:`inspect_remote`.
:func:`pull_through_cache` makes a registry that caches another (run it with :func:`running`).

The fixtures are shared by the whole session: use a repository name of your own per test, and expect
other tests' repositories in the catalog. A test that stops a registry must leave it running
(``restart()``, or ``start()`` after ``stop()``/``kill()``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from lamina.testing import require_tool

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0  # seconds for a started registry to answer GET /v2/
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

USER = "alice"
PASSWORD = "secret"
# bcrypt of PASSWORD (cost 5, so that the registry's check of every request stays fast), made once with
# glibc's crypt(3); used when the Python ``bcrypt`` module is not installed.
PASSWORD_BCRYPT = "$2b$05$iDTdy5s4317vbcSl/YoabOfEUqGfu5wyO7Hn8IrHUziQCKppQDrVO"

TOKEN_SERVICE = "lamina-test"
TOKEN_ISSUER = "lamina-test-issuer"
TOKEN_LIFETIME = 300  # seconds; distribution accepts tokens up to 60 s past exp
PUBLIC_PREFIX = "public/"  # repositories anonymous clients may pull from on the token registry
ALL_ACTIONS = ("pull", "push", "delete", "*")

R = TypeVar("R", bound="Registry")
_LOG_STASH = pytest.StashKey[dict[str, int]]()


# -- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _registry_env() -> dict[str, str]:
    # REGISTRY_* variables override the config file: keep the caller's out.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


@dataclass(kw_only=True, eq=False)
class Registry:
    """A ``docker-registry serve CONFIG`` process on ``host`` (``127.0.0.1:PORT``), plain HTTP."""

    host: str
    url: str  # http://127.0.0.1:PORT
    storage_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.host.rpartition(":")[2])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ref(self, repo_tag: str) -> str:
        """A skopeo reference to ``repo_tag`` (``name:tag`` or ``name@digest``) on this registry."""
        return f"docker://{self.host}/{repo_tag}"

    def start(self) -> None:
        """Start the registry (if not running) and wait until it answers ``GET /v2/``."""
        if self.running:
            return
        binary = require_tool("docker-registry")
        with open(self.log_path, "ab") as log:
            log.write(f"--- lamina tests: starting {binary} serve {self.config_path}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [binary, "serve", str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=_registry_env(), start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        opener = _no_proxy_opener()
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"docker-registry on {self.host} exited {code} at start:\n{self.log_tail()}")
            try:
                with opener.open(f"{self.url}/v2/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # 401 from an auth registry: it is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"docker-registry on {self.host} did not answer within {START_TIMEOUT:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the registry (no graceful shutdown: in-flight requests break off)."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start()

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        """The registry's log from byte offset ``since``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, limit: int = 8000) -> str:
        return self.log_text(max(0, self.log_size() - limit))


@dataclass(kw_only=True, eq=False)
class AuthRegistry(Registry):
    """A registry with htpasswd basic auth."""

    user: str = USER
    password: str = PASSWORD
    htpasswd_path: Path | None = None  # None on the token registry (the token service checks passwords)

    @property
    def creds(self) -> str:
        """``user:password``, as skopeo's ``--creds`` takes it."""
        return f"{self.user}:{self.password}"


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token service, as received and as answered."""

    path: str
    service: str | None
    scopes: tuple[str, ...]  # the ``scope`` parameters, as sent
    account: str | None  # the user of the Authorization header (None: anonymous)
    status: int  # 200, 400 (wrong service), 401 (wrong credentials), 404 (other paths)
    granted: tuple[dict[str, Any], ...]  # the token's ``access`` claim (empty unless 200)
    time: float


class TokenService:
    """A bearer-token server (Docker registry token auth) on 127.0.0.1, in a thread."""

    def __init__(self, cert_dir: Path, user: str = USER, password: str = PASSWORD,
                 service: str = TOKEN_SERVICE, issuer: str = TOKEN_ISSUER) -> None:
        self.user = user
        self.password = password
        self.service = service
        self.issuer = issuer
        self.expires_in = TOKEN_LIFETIME  # tests may change it
        self.token_requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key, cert_der = _make_signing_cert()
        self.cert_path = cert_dir / "token-signer.pem"
        self.cert_path.write_text(_pem("CERTIFICATE", cert_der))
        self.key_id = libtrust_key_id(self._key.public_key())
        self._x5c = [base64.b64encode(cert_der).decode()]
        self._server = ThreadingHTTPServer((LOOPBACK, 0), _make_handler(self))
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-service", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.token_requests.clear()

    def record(self, req: TokenRequest) -> None:
        with self._lock:
            self.token_requests.append(req)

    def grant(self, account: str | None, scopes: tuple[str, ...]) -> list[dict[str, Any]]:
        """The ``access`` claim for ``scopes``: all for the user, pull on ``public/*`` for anonymous."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, sep, rest = one.partition(":")
                name, sep2, actions_text = rest.rpartition(":")
                if not sep or not sep2:
                    continue
                kind = kind.split("(", 1)[0]  # "repository(plugin)" names a resource class
                wanted = [a for a in actions_text.split(",") if a]
                if account is not None:
                    actions = [a for a in wanted if a in ALL_ACTIONS] if kind == "repository" else wanted
                elif kind == "repository" and name.startswith(PUBLIC_PREFIX):
                    actions = [a for a in wanted if a == "pull"]
                else:
                    actions = []
                if actions:
                    access.append({"type": kind, "name": name, "actions": actions})
        return access

    def issue(self, account: str | None, access: list[dict[str, Any]]) -> tuple[str, int]:
        """A signed JWT and its issue time."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.key_id, "x5c": self._x5c}
        claims = {
            "iss": self.issuer, "sub": account or "", "aud": self.service, "exp": now + self.expires_in,
            "nbf": now - 1, "iat": now, "jti": secrets.token_hex(16), "access": access,
        }
        return sign_jwt(self._key, header, claims), now

    def check_basic(self, header: str | None) -> tuple[bool, str | None]:
        """(credentials acceptable, account) for an Authorization header."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except ValueError:
            return False, None
        ok = secrets.compare_digest(user.encode(), self.user.encode()) and \
            secrets.compare_digest(password.encode(), self.password.encode())
        return ok, user


def _make_handler(svc: TokenService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parsed.query)
            service = query.get("service", [None])[0]
            scopes = tuple(query.get("scope", []))
            ok, account = svc.check_basic(self.headers.get("Authorization"))

            def record(status: int, granted: list[dict[str, Any]] | None = None) -> None:
                svc.record(TokenRequest(path=parsed.path, service=service, scopes=scopes, account=account,
                                        status=status, granted=tuple(granted or ()), time=time.time()))

            if parsed.path != "/token":
                record(404)
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": "no such path"}]})
            elif not ok:
                record(401)
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong credentials"}]},
                            {"WWW-Authenticate": f'Basic realm="{svc.service}"'})
            elif service is not None and service != svc.service:
                record(400)
                self._reply(400, {"errors": [{"code": "INVALID_SERVICE", "message": f"unknown service {service}"}]})
            else:
                access = svc.grant(account, scopes)
                token, issued = svc.issue(account, access)
                record(200, access)
                self._reply(200, {
                    "token": token, "access_token": token, "expires_in": svc.expires_in,
                    "issued_at": datetime.datetime.fromtimestamp(issued, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                })

    return Handler


@dataclass(kw_only=True, eq=False)
class TokenRegistry(AuthRegistry):
    """A registry with bearer-token auth; the token server is ``token_service``."""

    token_service: TokenService

    @property
    def token_requests(self) -> list[TokenRequest]:
        return self.token_service.token_requests


# -- tokens ---------------------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"


def _make_signing_cert() -> tuple[Any, bytes]:
    """An RSA key and a self-signed CA certificate of it (DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lamina test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.DER)


def libtrust_key_id(public_key: Any) -> str:
    """libtrust's key id: the first 240 bits of SHA-256 of the DER SubjectPublicKeyInfo, base32, in 4s."""
    from cryptography.hazmat.primitives import serialization

    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(spki).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def sign_jwt(key: Any, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Compact JWS of ``claims``, RS256 (RSASSA-PKCS1-v1_5 with SHA-256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = _b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + \
        _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT, unverified (for tests that look inside tokens)."""
    head, claims, _sig = token.split(".")

    def part(s: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))  # type: ignore[no-any-return]

    return part(head), part(claims)


def htpasswd_line(user: str, password: str) -> str:
    """An htpasswd entry with a bcrypt hash (the only kind distribution accepts)."""
    try:
        import bcrypt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if password != PASSWORD:
            raise RuntimeError("the Python bcrypt module is needed for passwords other than the default") from None
        return f"{user}:{PASSWORD_BCRYPT}\n"
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()}\n"


# -- registries -----------------------------------------------------------------------------------------
def registry_config(port: int, storage_dir: Path, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    """A distribution 2.8 config (written as JSON, which is YAML too)."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": secrets.token_hex(16),
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth:
        config["auth"] = auth
    return config


def _registry_fields(base: Path, auth: dict[str, Any] | None = None) -> dict[str, Any]:
    port = free_port()
    storage = base / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config_path = base / "config.yml"
    config_path.write_text(json.dumps(registry_config(port, storage, auth), indent=2) + "\n")
    host = f"{LOOPBACK}:{port}"
    return {"host": host, "url": f"http://{host}", "storage_dir": storage, "config_path": config_path,
            "log_path": base / "registry.log"}


def pull_through_cache(base: Path, remote_url: str) -> Registry:
    """A registry (not started; use :func:`running`) that is a pull-through cache of ``remote_url``
    (distribution's ``proxy.remoteurl``): it serves what it holds, fetches the rest from the remote and keeps
    it (blobs are stored in the background while they are served), refuses pushes, and answers tags from
    its own storage when the remote cannot be reached."""
    fields = _registry_fields(base)
    config = json.loads(fields["config_path"].read_text())
    config["proxy"] = {"remoteurl": remote_url}
    fields["config_path"].write_text(json.dumps(config, indent=2) + "\n")
    return Registry(**fields)


def _move(reg: Registry, port: int) -> None:
    """Point ``reg`` (not running) at another port."""
    config = json.loads(reg.config_path.read_text())
    config["http"]["addr"] = f"{LOOPBACK}:{port}"
    reg.config_path.write_text(json.dumps(config, indent=2) + "\n")
    reg.host = f"{LOOPBACK}:{port}"
    reg.url = f"http://{reg.host}"


@contextlib.contextmanager
def running(reg: R) -> Iterator[R]:
    """Start ``reg``; stop it on the way out, whatever state a test left it in.

    The free port may be taken by someone else before the registry binds it: then try other ports.
    """
    try:
        for attempt in range(3):
            try:
                reg.start()
                break
            except RuntimeError as e:
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                _move(reg, free_port())
        yield reg
    finally:
        reg.stop()


def _require_tools() -> None:
    require_tool("docker-registry")
    require_tool("skopeo")


@pytest.fixture
def isolated_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials from the machine: lamina's and containers' auth files live in the test's directory
    (``pytestmark = pytest.mark.usefixtures("isolated_auth")`` in a module that talks to registries)."""
    monkeypatch.setenv("LAMINA_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "containers-auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP registry without auth on 127.0.0.1 (session-wide)."""
    _require_tools()
    with running(Registry(**_registry_fields(tmp_path_factory.mktemp("registry")))) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """A registry with htpasswd basic auth, user ``alice``, password ``secret``."""
    _require_tools()
    base = tmp_path_factory.mktemp("auth-registry")
    htpasswd = base / "htpasswd"
    htpasswd.write_text(htpasswd_line(USER, PASSWORD))
    auth = {"htpasswd": {"realm": "lamina-test", "path": str(htpasswd)}}
    with running(AuthRegistry(**_registry_fields(base, auth), htpasswd_path=htpasswd)) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """A registry with bearer-token auth against a token service run by the fixture."""
    _require_tools()
    base = tmp_path_factory.mktemp("token-registry")
    svc = TokenService(base)
    try:
        auth = {"token": {"realm": svc.realm, "service": svc.service, "issuer": svc.issuer,
                          "rootcertbundle": str(svc.cert_path)}}
        with running(TokenRegistry(**_registry_fields(base, auth), token_service=svc)) as reg:
            yield reg
    finally:
        svc.close()


# -- failure reports ------------------------------------------------------------------------------------
def _used_registries(item: pytest.Item) -> list[tuple[str, Registry]]:
    funcargs = getattr(item, "funcargs", {}) or {}
    return [(name, value) for name, value in funcargs.items() if isinstance(value, Registry)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    item.stash[_LOG_STASH] = {name: reg.log_size() for name, reg in _used_registries(item)}
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    report = yield
    if call.when == "call" and getattr(report, "failed", False):
        offsets = item.stash.get(_LOG_STASH, {})
        for name, reg in _used_registries(item):
            text = reg.log_text(offsets.get(name, 0))
            if len(text) > 20000:
                text = "[...]\n" + text[-20000:]
            report.sections.append((f"registry log {name} ({reg.log_path})", text))  # type: ignore[attr-defined]
    return report


# -- skopeo ---------------------------------------------------------------------------------------------
def _skopeo(*args: str) -> bytes:
    cmd = [require_tool("skopeo"), *args]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def push_with_skopeo(src_ref: str, registry: Registry, repo_tag: str, creds: str | None = None,
                     *options: str) -> str:
    """``skopeo copy SRC docker://HOST/REPO:TAG`` over plain HTTP; returns the destination reference.

    ``creds`` is ``user:password``; without it skopeo pushes anonymously (``--dest-no-creds``, so that
    no auth file of the caller's leaks in). ``options`` go to ``skopeo copy`` as they are.
    """
    dest = registry.ref(repo_tag)
    auth = ["--dest-creds", creds] if creds is not None else ["--dest-no-creds"]
    _skopeo("copy", "--quiet", "--dest-tls-verify=false", *auth, *options, src_ref, dest)
    return dest


def inspect_remote(registry: Registry, repo_tag: str, creds: str | None = None) -> dict[str, Any]:
    """The manifest of ``repo_tag`` as the registry serves it (``skopeo inspect --raw``).

    Returns ``{"raw": bytes, "digest": "sha256:...", "manifest": parsed JSON}``.
    """
    auth = ["--creds", creds] if creds is not None else ["--no-creds"]
    raw = _skopeo("inspect", "--tls-verify=false", "--raw", *auth, registry.ref(repo_tag))
    return {"raw": raw, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(), "manifest": json.loads(raw)}


# -- docker credential helpers -------------------------------------------------------------------------------
_HELPER_SCRIPT = '''#!{python}
"""A docker credential helper (get, store, erase) keeping its credentials in a JSON file."""
import json
import sys
from pathlib import Path

store = Path({store!r})
action = sys.argv[1] if len(sys.argv) > 1 else ""
data = sys.stdin.read()
with open(str(store) + ".log", "a") as log:
    log.write(json.dumps([action, data]) + "\\n")
creds = json.loads(store.read_text()) if store.exists() else {{}}
if action in ("get", "erase") and data.strip() not in creds:
    print("credentials not found in native keychain")
    sys.exit(1)
if action == "get":
    user, secret = creds[data.strip()]
    print(json.dumps({{"ServerURL": data.strip(), "Username": user, "Secret": secret}}))
elif action == "store":
    doc = json.loads(data)
    creds[doc["ServerURL"]] = [doc["Username"], doc["Secret"]]
    store.write_text(json.dumps(creds))
elif action == "erase":
    del creds[data.strip()]
    store.write_text(json.dumps(creds))
else:
    print("unknown action " + action)
    sys.exit(1)
'''


def credential_helper(bin_dir: Path, name: str, store: Path) -> Path:
    """``bin_dir/docker-credential-NAME``, a helper speaking docker's protocol that keeps its credentials in
    the JSON file ``store`` (server -> [user, secret]) and logs each call as ``[action, stdin]`` to
    ``store.log``; put ``bin_dir`` on PATH."""
    import sys

    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(_HELPER_SCRIPT.format(python=sys.executable, store=str(store)))
    path.chmod(0o755)
    return path


def helper_calls(store: Path) -> list[list[str]]:
    """The calls the helper keeping ``store`` answered, oldest first."""
    log = Path(str(store) + ".log")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

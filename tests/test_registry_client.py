"""The registry client and the auth files, against a small in-test registry (http.server on 127.0.0.1).

The fake registry speaks enough of the OCI distribution API for the client: manifests, blobs (with Range),
uploads (monolithic and chunked, with OCI-Chunk-Min-Length), mounts, tag pagination, Basic auth and Bearer
tokens from its own ``/token`` endpoint, and injected faults: 5xx storms, 429 with Retry-After, connections
cut mid-body, servers that ignore Range, redirects to a second server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from lamina.errors import DigestError, DigestMismatch, InvalidDocument, InvalidReference, LaminaError
from lamina.formats.oci import (
    MAX_DOCUMENT_BYTES,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_LAYER_GZIP,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
)
from lamina.registry import auth
from lamina.registry.client import (
    AuthError,
    RegistryClient,
    RegistryError,
    RegistryNotFound,
    RegistryOptions,
    RegistryUnavailable,
    _parse_challenges,
)

MiB = 1 << 20
USER, PASSWORD = "alice", "s3cret:with:colons"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def manifest_bytes(media_type: str | None = MEDIA_TYPE_MANIFEST, layer: bytes = b"layer") -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc["config"] = {"mediaType": MEDIA_TYPE_CONFIG, "digest": sha(b"{}"), "size": 2}
    doc["layers"] = [{"mediaType": MEDIA_TYPE_LAYER_GZIP, "digest": sha(layer), "size": len(layer)}]
    return json.dumps(doc).encode()


# -- the fake registry ----------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body_len: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


_ROUTE = re.compile(r"^/v2/(.+?)/(manifests|blobs/uploads|blobs|tags)(?:/(.*))?$")


@dataclass
class FakeRegistry:
    base: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict)
    repo_blobs: set[tuple[str, str]] = field(default_factory=set)
    manifests: dict[tuple[str, str], tuple[bytes, str | None]] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    tag_page: int = 2
    log: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # auth
    auth: str | None = None  # None, "basic" or "bearer"
    users: dict[str, str] = field(default_factory=lambda: {USER: PASSWORD})
    private: bool = True  # bearer: anonymous tokens are refused by the registry
    access_token_key: str = "token"
    tokens: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)
    token_requests: list[tuple[str | None, list[str]]] = field(default_factory=list)
    # faults
    fail_next: int = 0
    fail_status: int = 503
    throttle_next: int = 0
    retry_after: str = "1"
    cut_after: int | None = None
    cuts_left: int = 0
    ignore_range: bool = False
    redirect_blobs_to: str | None = None
    digest_header: str | None = None  # a wrong Docker-Content-Digest for manifests
    omit_length: bool = False  # manifests without Content-Length (connection closes)
    chunk_min: int | None = None
    uploads: dict[str, bytearray] = field(default_factory=dict)
    patches: list[int] = field(default_factory=list)

    def add_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha(data)
        self.blobs[digest] = data
        self.repo_blobs.add((repo, digest))
        return digest

    def add_manifest(self, repo: str, tag: str | None, data: bytes, content_type: str | None) -> str:
        digest = sha(data)
        self.manifests[(repo, digest)] = (data, content_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (data, content_type)
        return digest

    def requests(self, method: str | None = None, prefix: str = "") -> list[Seen]:
        return [s for s in self.log if (method is None or s.method == method) and s.path.startswith(prefix)]

    # -- dispatch

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        query = parse_qsl(url.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.log.append(Seen(method, url.path, query, dict(h.headers.items()), len(body)))
        if url.path == "/token":
            return self.token(h, query)
        if url.path.startswith("/cdn/"):
            return self.serve_bytes(h, method, self.blobs.get(url.path[len("/cdn/") :]))
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.reply(h, method, self.fail_status, self.error("UNAVAILABLE", "try later"))
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return self.reply(h, method, 429, self.error("TOOMANYREQUESTS", "slow down"),
                              {"Retry-After": self.retry_after})  # fmt: skip
        if url.path in ("/v2", "/v2/"):
            if self.authorized(h, method, None, []):
                self.reply(h, method, 200, b"{}", {"Content-Type": "application/json"})
            return None
        m = _ROUTE.match(url.path)
        if m is None:
            return self.reply(h, method, 404, self.error("NAME_UNKNOWN", "no route"))
        repo, kind, rest = m.group(1), m.group(2), m.group(3) or ""
        extra = []
        q = dict(query)
        if kind == "blobs/uploads" and "from" in q:
            extra.append(f"repository:{q['from']}:pull")
        if not self.authorized(h, method, repo, extra):
            return None
        if kind == "manifests":
            return self.manifest(h, method, repo, rest, body)
        if kind == "blobs":
            return self.blob(h, method, repo, rest)
        if kind == "blobs/uploads":
            return self.upload(h, method, repo, rest, q, body)
        return self.tag_list(h, method, repo, q)

    # -- helpers

    @staticmethod
    def error(code: str, message: str) -> bytes:
        return json.dumps({"errors": [{"code": code, "message": message}]}).encode()

    @staticmethod
    def reply(
        h: BaseHTTPRequestHandler, method: str, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD" and body:
            h.wfile.write(body)

    def challenge(self, h: BaseHTTPRequestHandler, method: str, scope: str | None) -> None:
        if self.auth == "basic":
            value = 'Basic realm="fake"'
        else:
            value = f'Bearer realm="{self.base}/token",service="fake-registry"'
            if scope:
                value += f',scope="{scope}"'
        self.reply(h, method, 401, self.error("UNAUTHORIZED", "authentication required"),
                   {"WWW-Authenticate": value})  # fmt: skip

    def authorized(self, h: BaseHTTPRequestHandler, method: str, repo: str | None, extra: list[str]) -> bool:
        if self.auth is None:
            return True
        need: list[str] = []
        if repo is not None:
            need.append(f"repository:{repo}:pull" if method in ("GET", "HEAD") else f"repository:{repo}:pull,push")
        need.extend(extra)
        header = h.headers.get("Authorization") or ""
        if self.auth == "basic":
            if header and header == basic(USER, self.users[USER]):
                return True
            self.challenge(h, method, None)
            return False
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
        grant = self.tokens.get(token)
        if grant is not None and (grant[0] is not None or not self.private):
            granted = set(grant[1])
            if all(s in granted or s.replace(":pull", ":pull,push") in granted for s in need):
                return True
        self.challenge(h, method, need[0] if need else None)
        return False

    def token(self, h: BaseHTTPRequestHandler, query: list[tuple[str, str]]) -> None:
        header = h.headers.get("Authorization")
        user: str | None = None
        if header:
            raw = base64.b64decode(header.removeprefix("Basic ")).decode()
            name, _, password = raw.partition(":")
            if self.users.get(name) != password:
                return self.reply(h, "GET", 401, b'{"details":"incorrect username or password"}')
            user = name
        scopes = [v for k, v in query if k == "scope"]
        with self.lock:
            self.token_requests.append((user, scopes))
        token = secrets.token_hex(8)
        self.tokens[token] = (user, scopes)
        body = json.dumps({self.access_token_key: token, "expires_in": 300}).encode()
        return self.reply(h, "GET", 200, body, {"Content-Type": "application/json"})

    def serve_bytes(self, h: BaseHTTPRequestHandler, method: str, data: bytes | None) -> None:
        if data is None:
            return self.reply(h, method, 404, self.error("BLOB_UNKNOWN", "no such blob"))
        start, status, headers = 0, 200, {"Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if m and not self.ignore_range:
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method == "HEAD":
            return None
        if self.cut_after is not None and self.cuts_left > 0:
            self.cuts_left -= 1
            h.wfile.write(body[: self.cut_after])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        h.wfile.write(body)
        return None

    # -- routes

    def manifest(self, h: BaseHTTPRequestHandler, method: str, repo: str, ref: str, body: bytes) -> None:
        if method == "PUT":
            content_type = h.headers.get("Content-Type")
            digest = self.add_manifest(repo, None if ref.startswith("sha256:") else ref, body, content_type)
            return self.reply(h, method, 201, b"", {"Docker-Content-Digest": digest,
                                                    "Location": f"/v2/{repo}/manifests/{digest}"})  # fmt: skip
        entry = self.manifests.get((repo, ref))
        if entry is None:
            return self.reply(h, method, 404, self.error("MANIFEST_UNKNOWN", "manifest unknown"))
        data, content_type = entry
        headers = {"Docker-Content-Digest": self.digest_header or sha(data)}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self.omit_length:
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            if method != "HEAD":
                h.wfile.write(data)
            return None
        return self.reply(h, method, 200, data, headers)

    def blob(self, h: BaseHTTPRequestHandler, method: str, repo: str, digest: str) -> None:
        if (repo, digest) not in self.repo_blobs:
            return self.reply(h, method, 404, self.error("BLOB_UNKNOWN", "blob unknown"))
        if self.redirect_blobs_to is not None:
            return self.reply(h, method, 307, b"", {"Location": f"{self.redirect_blobs_to}/cdn/{digest}"})
        return self.serve_bytes(h, method, self.blobs.get(digest))

    def upload(
        self, h: BaseHTTPRequestHandler, method: str, repo: str, rest: str, q: dict[str, str], body: bytes
    ) -> None:
        if method == "POST":
            if "mount" in q and (q.get("from", ""), q["mount"]) in self.repo_blobs:
                self.repo_blobs.add((repo, q["mount"]))
                return self.reply(h, method, 201, b"", {"Docker-Content-Digest": q["mount"],
                                                        "Location": f"/v2/{repo}/blobs/{q['mount']}"})  # fmt: skip
            uuid = secrets.token_hex(8)
            self.uploads[uuid] = bytearray()
            headers = {"Location": f"/v2/{repo}/blobs/uploads/{uuid}?_state=st%2Bate", "Range": "0-0"}
            if self.chunk_min is not None:
                headers["OCI-Chunk-Min-Length"] = str(self.chunk_min)
            return self.reply(h, method, 202, b"", headers)
        buf = self.uploads.get(rest)
        if buf is None:
            return self.reply(h, method, 404, self.error("BLOB_UPLOAD_UNKNOWN", "no upload"))
        if method == "DELETE":
            del self.uploads[rest]
            return self.reply(h, method, 204)
        if method == "PATCH":
            m = re.fullmatch(r"(\d+)-(\d+)", h.headers.get("Content-Range") or "")
            if m is None or int(m.group(1)) != len(buf) or int(m.group(2)) != len(buf) + len(body) - 1:
                return self.reply(h, method, 416, self.error("BLOB_UPLOAD_INVALID", "bad range"))
            buf += body
            self.patches.append(len(body))
            return self.reply(h, method, 202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{rest}?_state=st%2Bate",
                                                    "Range": f"0-{len(buf) - 1}"})  # fmt: skip
        if method == "PUT":
            buf += body
            digest = q.get("digest", "")
            if sha(bytes(buf)) != digest or dict(parse_qsl(urlsplit(h.path).query)).get("_state") != "st+ate":
                return self.reply(h, method, 400, self.error("DIGEST_INVALID", "digest does not match"))
            self.add_blob(repo, bytes(buf), digest)
            del self.uploads[rest]
            return self.reply(h, method, 201, b"", {"Docker-Content-Digest": digest})
        return self.reply(h, method, 405)

    def tag_list(self, h: BaseHTTPRequestHandler, method: str, repo: str, q: dict[str, str]) -> None:
        if repo not in self.tags:
            return self.reply(h, method, 404, self.error("NAME_UNKNOWN", "repository unknown"))
        tags = sorted(self.tags[repo])
        last = q.get("last")
        if last is not None:
            tags = [t for t in tags if t > last]
        n = int(q.get("n", self.tag_page))
        page, more = tags[:n], len(tags) > n
        headers = {"Content-Type": "application/json"}
        if more:
            headers["Link"] = f'</v2/{repo}/tags/list?n={n}&last={page[-1]}>; rel="next"'
        return self.reply(h, method, 200, json.dumps({"name": repo, "tags": page}).encode(), headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _go(self) -> None:
        registry: FakeRegistry = self.server.registry  # type: ignore[attr-defined]
        registry.handle(self, self.command)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _go


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-body (the tests make them) and TLS probes are not news


def _serve() -> Iterator[FakeRegistry]:
    server = _Server(("127.0.0.1", 0), _Handler)
    registry = FakeRegistry(base=f"http://127.0.0.1:{server.server_address[1]}")
    server.registry = registry  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def reg() -> Iterator[FakeRegistry]:
    yield from _serve()


@pytest.fixture
def other() -> Iterator[FakeRegistry]:
    """A second server on another port (a CDN, or a foreign-layer host)."""
    yield from _serve()


FAST: dict[str, Any] = {"insecure": True, "backoff": 0.01, "max_backoff": 0.05, "timeout": 5.0}


def opts(**options: Any) -> RegistryOptions:
    return RegistryOptions(**{**FAST, **options})


def client_for(
    reg: FakeRegistry,
    creds: tuple[str, str] | None = None,
    cache: dict[tuple[str, ...], tuple[str, float]] | None = None,
    **options: Any,
) -> RegistryClient:
    host = reg.base.removeprefix("http://")
    return RegistryClient(host, opts(**options), lambda h: creds, cache)


def chunks_of(data: bytes, size: int = 300_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read_all(reader: Any, n: int = 1 * MiB) -> bytes:
    out = bytearray()
    while chunk := reader.read(n):
        out += chunk
    return bytes(out)


# -- manifests ------------------------------------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest(reg: FakeRegistry) -> None:
    data = manifest_bytes()
    digest = reg.add_manifest("lib/app", "v1", data, MEDIA_TYPE_MANIFEST)
    with client_for(reg) as c:
        assert c.get_manifest("lib/app", "v1") == (data, MEDIA_TYPE_MANIFEST, digest)
        assert c.get_manifest("lib/app", digest) == (data, MEDIA_TYPE_MANIFEST, digest)
        assert c.head_manifest("lib/app", "v1") == (digest, MEDIA_TYPE_MANIFEST, len(data))
        assert c.head_manifest("lib/app", "nope") is None
        with pytest.raises(RegistryNotFound, match="lib/app:nope"):
            c.get_manifest("lib/app", "nope")
    accept = reg.requests("GET", "/v2/lib/app/manifests/")[0].header("Accept") or ""
    assert MEDIA_TYPE_MANIFEST in accept and MEDIA_TYPE_INDEX in accept


def test_manifest_media_type_from_document_when_content_type_is_generic(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "json", manifest_bytes(MEDIA_TYPE_DOCKER_MANIFEST), "application/json")
    reg.add_manifest("app", "none", manifest_bytes(None), None)
    with client_for(reg) as c:
        assert c.get_manifest("app", "json")[1] == MEDIA_TYPE_DOCKER_MANIFEST
        assert c.get_manifest("app", "none")[1] == MEDIA_TYPE_MANIFEST


def test_manifest_digest_mismatch(reg: FakeRegistry) -> None:
    good = manifest_bytes()
    evil = manifest_bytes(layer=b"evil")
    reg.manifests[("app", sha(good))] = (evil, MEDIA_TYPE_MANIFEST)
    with client_for(reg) as c, pytest.raises(DigestMismatch):
        c.get_manifest("app", sha(good))


def test_manifest_docker_content_digest_must_match(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    reg.digest_header = sha(b"something else")
    with client_for(reg) as c, pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        c.get_manifest("app", "v1")


def test_manifest_media_type_disagrees_with_content_type(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "v1", manifest_bytes(MEDIA_TYPE_MANIFEST), MEDIA_TYPE_DOCKER_MANIFEST)
    with client_for(reg) as c, pytest.raises(InvalidDocument, match="media type disagrees"):
        c.get_manifest("app", "v1")


def test_schema1_is_refused_clearly(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "old", b'{"schemaVersion": 1, "name": "app", "fsLayers": []}', "application/json")
    reg.add_manifest("app", "signed", b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with client_for(reg) as c:
        for tag in ("old", "signed"):
            with pytest.raises(InvalidDocument, match="schema1"):
                c.get_manifest("app", tag)


def test_oversized_manifest(reg: FakeRegistry) -> None:
    big = b'{"schemaVersion": 2, "pad": "' + b"x" * MAX_DOCUMENT_BYTES + b'"}'
    reg.add_manifest("app", "big", big, MEDIA_TYPE_MANIFEST)
    with client_for(reg) as c:
        with pytest.raises(InvalidDocument, match="limit"):
            c.get_manifest("app", "big")
        reg.omit_length = True  # no Content-Length: the body itself must be cut off
        with pytest.raises(InvalidDocument, match="limit"):
            c.get_manifest("app", "big")


def test_put_manifest(reg: FakeRegistry) -> None:
    data = manifest_bytes()
    with client_for(reg) as c:
        assert c.put_manifest("app", "v2", data, MEDIA_TYPE_MANIFEST) == sha(data)
        assert c.put_manifest("app", sha(data), data, MEDIA_TYPE_MANIFEST) == sha(data)
        with pytest.raises(DigestMismatch):
            c.put_manifest("app", sha(b"x"), data, MEDIA_TYPE_MANIFEST)
        with pytest.raises(InvalidDocument):
            c.put_manifest("app", "v3", data, MEDIA_TYPE_DOCKER_MANIFEST)
    assert reg.manifests[("app", "v2")] == (data, MEDIA_TYPE_MANIFEST)
    assert len(reg.requests("PUT")) == 2


def test_names_are_validated_before_any_request(reg: FakeRegistry) -> None:
    with client_for(reg) as c:
        with pytest.raises(InvalidReference):
            c.get_manifest("Upper/Case", "v1")
        with pytest.raises(InvalidReference):
            c.get_manifest("app/../etc", "v1")
        with pytest.raises(InvalidReference):
            c.get_manifest("app", "bad tag")
        with pytest.raises(DigestError):
            c.open_blob("app", "sha256:../../x", 1)
        with pytest.raises(InvalidReference):
            c.mount_blob("app", sha(b""), "From")
    assert reg.log == []
    with pytest.raises(RegistryError, match="invalid registry host"):
        RegistryClient("not a host")
    assert RegistryClient("docker.io")._base == "https://registry-1.docker.io"


# -- blobs ----------------------------------------------------------------------------------------------------


def test_blob_download_verified(reg: FakeRegistry) -> None:
    data = os.urandom(3 * MiB + 17)
    digest = reg.add_blob("app", data)
    with client_for(reg) as c:
        assert c.blob_exists("app", digest)
        assert not c.blob_exists("app", sha(b"other"))
        with c.open_blob("app", digest, len(data)) as r:
            assert read_all(r) == data
        with pytest.raises(RegistryNotFound):
            c.open_blob("app", sha(b"missing"), 7)


def test_blob_digest_and_size_mismatch(reg: FakeRegistry) -> None:
    data = os.urandom(100_000)
    wrong = sha(b"not this")
    reg.add_blob("app", data, digest=wrong)
    right = reg.add_blob("app", data)
    with client_for(reg) as c:
        r = c.open_blob("app", wrong, len(data))
        with pytest.raises(DigestMismatch, match="does not match"):
            read_all(r)
        with pytest.raises(DigestMismatch, match="size"):
            c.open_blob("app", right, len(data) - 1)
        with pytest.raises(DigestMismatch, match="size"):
            c.open_blob("app", right, len(data) + 1)


def test_truncated_blob_resumes_with_range(reg: FakeRegistry) -> None:
    data = os.urandom(3 * MiB)
    digest = reg.add_blob("app", data)
    reg.cut_after, reg.cuts_left = 1 * MiB + 123, 1
    with client_for(reg) as c, c.open_blob("app", digest, len(data)) as r:
        assert read_all(r, 64 * 1024) == data
    gets = reg.requests("GET", "/v2/app/blobs/")
    assert [g.header("Range") for g in gets] == [None, f"bytes={MiB + 123}-"]


def test_resume_when_the_server_ignores_range(reg: FakeRegistry) -> None:
    data = os.urandom(2 * MiB + 5)
    digest = reg.add_blob("app", data)
    reg.cut_after, reg.cuts_left, reg.ignore_range = 700_000, 2, True
    with client_for(reg) as c, c.open_blob("app", digest, len(data)) as r:
        assert read_all(r) == data
    assert len(reg.requests("GET", "/v2/app/blobs/")) == 3


def test_a_blob_that_always_breaks_gives_up(reg: FakeRegistry) -> None:
    data = os.urandom(500_000)
    digest = reg.add_blob("app", data)
    reg.cut_after, reg.cuts_left = 0, 1000
    with client_for(reg, max_attempts=3) as c:
        r = c.open_blob("app", digest, len(data))
        with pytest.raises(RegistryUnavailable, match="without progress"):
            read_all(r)
    assert len(reg.requests("GET", "/v2/app/blobs/")) == 3


def test_redirect_to_another_host_gets_no_credentials(reg: FakeRegistry, other: FakeRegistry) -> None:
    reg.auth = "basic"
    data = os.urandom(1 * MiB + 1)
    digest = reg.add_blob("app", data)
    other.blobs[digest] = data
    reg.redirect_blobs_to = other.base
    other.cut_after, other.cuts_left = 4096, 1  # and a resume through the redirect
    with client_for(reg, creds=(USER, PASSWORD)) as c, c.open_blob("app", digest, len(data)) as r:
        assert read_all(r) == data
    assert reg.requests("GET", "/v2/app/blobs/")[-1].header("Authorization") == basic(USER, PASSWORD)
    cdn = other.requests("GET", "/cdn/")
    assert len(cdn) == 2 and cdn[1].header("Range") == "bytes=4096-"
    assert all(s.header("Authorization") is None for s in other.log)


def test_foreign_urls_only_when_allowed(reg: FakeRegistry, other: FakeRegistry) -> None:
    reg.auth = "basic"
    data = b"foreign layer"
    other.blobs[sha(data)] = data
    desc = Descriptor(MEDIA_TYPE_LAYER_GZIP, sha(data), len(data), urls=(f"{other.base}/cdn/{sha(data)}",))
    with client_for(reg, creds=(USER, PASSWORD)) as c, pytest.raises(RegistryError, match="not fetched"):
        c.open_blob_urls(desc)
    with client_for(reg, creds=(USER, PASSWORD), allow_foreign_urls=True) as c, c.open_blob_urls(desc) as r:
        assert read_all(r) == data
    assert other.log and all(s.header("Authorization") is None for s in other.log)
    assert reg.log == []


# -- retries --------------------------------------------------------------------------------------------------


def test_5xx_storm_is_bounded(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    reg.fail_next = 1000
    with client_for(reg, max_attempts=4) as c, pytest.raises(RegistryUnavailable, match="503") as info:
        c.get_manifest("app", "v1")
    assert len(reg.requests("GET", "/v2/app/manifests/")) == 4
    assert "\n" not in str(info.value) and "UNAVAILABLE" in str(info.value)


def test_transient_5xx_then_success(reg: FakeRegistry) -> None:
    data = manifest_bytes()
    reg.add_manifest("app", "v1", data, MEDIA_TYPE_MANIFEST)
    reg.fail_next, reg.fail_status = 2, 502
    with client_for(reg) as c:
        assert c.get_manifest("app", "v1")[0] == data
    assert len(reg.requests("GET")) == 3


def test_429_honours_retry_after(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    reg.throttle_next, reg.retry_after = 1, "1"
    with client_for(reg) as c:
        start = time.monotonic()
        c.get_manifest("app", "v1")
        assert time.monotonic() - start >= 0.9
    assert len(reg.requests("GET")) == 2


def test_https_is_the_default(reg: FakeRegistry) -> None:
    with client_for(reg, insecure=False) as c, pytest.raises(RegistryUnavailable, match="TLS error"):
        c.ping()
    assert reg.log == []  # no plain-http request was made
    with client_for(reg) as c:  # insecure: https is tried, then plain http
        c.ping()
    assert [s.path for s in reg.log] == ["/v2/"]


def test_connection_refused_is_registry_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RegistryClient(f"127.0.0.1:{port}", opts(max_attempts=2)) as c, pytest.raises(RegistryUnavailable):
        c.ping()


# -- auth -----------------------------------------------------------------------------------------------------


def test_challenge_parsing() -> None:
    header = (
        'Bearer realm="https://auth.example.com/token",service="reg, ok",scope="repository:a/b:pull", Basic realm=x'
    )
    challenges = _parse_challenges(header)
    assert [c.scheme for c in challenges] == ["bearer", "basic"]
    assert challenges[0].params == {
        "realm": "https://auth.example.com/token", "service": "reg, ok", "scope": "repository:a/b:pull"
    }  # fmt: skip
    assert challenges[1].params == {"realm": "x"}
    assert _parse_challenges("") == []


def test_basic_auth(reg: FakeRegistry) -> None:
    reg.auth = "basic"
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    with client_for(reg, creds=(USER, PASSWORD)) as c:
        c.ping()
        c.get_manifest("app", "v1")
        c.get_manifest("app", "v1")
    # One 401 taught the client; every later request carries the credentials up front.
    assert [s.header("Authorization") is not None for s in reg.log] == [False, True, True, True]
    host = reg.base.removeprefix("http://")
    with client_for(reg) as c, pytest.raises(AuthError, match=f"authentication required for {host}; run lamina login"):
        c.ping()
    with client_for(reg, creds=(USER, "wrong")) as c, pytest.raises(AuthError, match=f"wrong .* for {host}"):
        c.get_manifest("app", "v1")


def test_bearer_token_negotiation_and_scope_caching(reg: FakeRegistry) -> None:
    reg.auth = "bearer"
    data = os.urandom(1000)
    digest = reg.add_blob("team/app", data)
    reg.add_manifest("team/app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    with client_for(reg, creds=(USER, PASSWORD)) as c:
        c.get_manifest("team/app", "v1")
        c.head_manifest("team/app", "v1")
        assert c.blob_exists("team/app", digest)
        with c.open_blob("team/app", digest, len(data)) as r:
            assert read_all(r) == data
    assert reg.token_requests == [(USER, ["repository:team/app:pull"])]
    realm = next(s for s in reg.log if s.path == "/token")
    assert ("service", "fake-registry") in realm.query


def test_bearer_access_token_and_shared_cache(reg: FakeRegistry) -> None:
    reg.auth, reg.private, reg.access_token_key = "bearer", False, "access_token"
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    cache: dict[tuple[str, ...], tuple[str, float]] = {}
    for _ in range(3):
        with client_for(reg, cache=cache) as c:  # anonymous
            c.get_manifest("app", "v1")
    assert reg.token_requests == [(None, ["repository:app:pull"])]


def test_bearer_anonymous_refused_and_wrong_credentials(reg: FakeRegistry) -> None:
    reg.auth = "bearer"
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    host = reg.base.removeprefix("http://")
    with client_for(reg) as c, pytest.raises(AuthError, match=f"run lamina login {host}"):
        c.get_manifest("app", "v1")
    with client_for(reg, creds=(USER, "nope")) as c, pytest.raises(AuthError, match=f"wrong .* for {host}") as info:
        c.ping()
    assert "nope" not in str(info.value)


def test_push_scopes(reg: FakeRegistry) -> None:
    reg.auth = "bearer"
    data = b"blob to mount"
    digest = reg.add_blob("source", data)
    with client_for(reg, creds=(USER, PASSWORD)) as c:
        assert c.mount_blob("dest", digest, "source")
        c.upload_blob("dest", sha(b"new"), 3, lambda: iter([b"new"]))
    assert reg.token_requests == [
        (USER, ["repository:dest:pull,push", "repository:source:pull"]),
        (USER, ["repository:dest:pull,push"]),
    ]


# -- uploads --------------------------------------------------------------------------------------------------


def test_monolithic_upload_without_chunk_hints(reg: FakeRegistry) -> None:
    data = os.urandom(3 * MiB + 1)
    digest = sha(data)
    calls = []

    def chunks() -> Iterator[bytes]:
        calls.append(1)
        return chunks_of(data)

    with client_for(reg, chunk_size=1 * MiB) as c:
        c.upload_blob("app", digest, len(data), chunks)
        c.upload_blob("app", sha(b""), 0, lambda: iter([]))
    assert reg.blobs[digest] == data and reg.blobs[sha(b"")] == b""
    assert calls == [1] and reg.patches == []
    put = reg.requests("PUT")[0]
    assert put.body_len == len(data) and put.header("Content-Length") == str(len(data))


def test_chunked_upload_honours_min_length(reg: FakeRegistry) -> None:
    data = os.urandom(5 * MiB + 100)
    digest = sha(data)
    reg.chunk_min = 1 * MiB + MiB // 2
    with client_for(reg, chunk_size=1 * MiB) as c:
        c.upload_blob("app", digest, len(data), lambda: chunks_of(data))
    assert reg.blobs[digest] == data
    assert sum(reg.patches) == len(data) and len(reg.patches) == 4
    assert all(p == reg.chunk_min for p in reg.patches[:-1])
    final = reg.requests("PUT")[-1]
    assert final.body_len == 0 and ("digest", digest) in final.query


def test_small_blob_is_monolithic_even_with_chunk_hints(reg: FakeRegistry) -> None:
    reg.chunk_min = 1 * MiB
    with client_for(reg) as c:
        c.upload_blob("app", sha(b"tiny"), 4, lambda: iter([b"ti", b"ny"]))
    assert reg.patches == [] and reg.blobs[sha(b"tiny")] == b"tiny"


def test_upload_checks_the_callers_bytes(reg: FakeRegistry) -> None:
    with client_for(reg) as c:
        with pytest.raises(DigestMismatch):
            c.upload_blob("app", sha(b"expected"), 8, lambda: iter([b"xpectede"]))
        with pytest.raises(DigestMismatch):
            c.upload_blob("app", sha(b"expected"), 8, lambda: iter([b"expected", b"!"]))
    assert sha(b"expected") not in reg.blobs


def test_upload_retries_after_a_5xx_on_put(reg: FakeRegistry) -> None:
    data = b"payload" * 1000

    original = reg.upload

    def flaky(h: BaseHTTPRequestHandler, method: str, repo: str, rest: str, q: dict[str, str], body: bytes) -> None:
        if method == "PUT" and not getattr(flaky, "done", False):
            flaky.done = True  # type: ignore[attr-defined]
            return reg.reply(h, method, 500, reg.error("UNKNOWN", "boom"))
        return original(h, method, repo, rest, q, body)

    reg.upload = flaky  # type: ignore[method-assign]
    with client_for(reg) as c:
        c.upload_blob("app", sha(data), len(data), lambda: chunks_of(data, 1000))
    assert reg.blobs[sha(data)] == data
    assert len(reg.requests("POST")) == 2


def test_mount(reg: FakeRegistry) -> None:
    digest = reg.add_blob("source", b"shared")
    with client_for(reg) as c:
        assert c.mount_blob("dest", digest, "source")
        assert ("dest", digest) in reg.repo_blobs
        assert not c.mount_blob("dest", sha(b"absent"), "source")
    # The upload the registry opened instead of mounting is cancelled.
    assert len(reg.requests("DELETE")) == 1 and reg.uploads == {}


# -- tags -----------------------------------------------------------------------------------------------------


def test_tag_pagination(reg: FakeRegistry) -> None:
    reg.tags["app"] = ["v1", "v2", "v3", "latest", "edge"]
    reg.tags["empty"] = []
    with client_for(reg) as c:
        assert sorted(c.list_tags("app")) == sorted(reg.tags["app"])
        assert c.list_tags("empty") == []
        with pytest.raises(RegistryNotFound):
            c.list_tags("nothing")
    assert len(reg.requests("GET", "/v2/app/tags/list")) == 3


# -- auth files -----------------------------------------------------------------------------------------------


@pytest.fixture
def auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("LAMINA_AUTH_FILE", str(tmp_path / "lamina" / "auth.json"))
    return tmp_path


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auth_file_locations(auth_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth.lamina_auth_file() == auth_env / "lamina" / "auth.json"
    files = auth.credential_files()
    assert files == [
        auth_env / "lamina" / "auth.json",
        auth_env / "run" / "containers" / "auth.json",
        auth_env / "home" / ".config" / "containers" / "auth.json",
        auth_env / "home" / ".docker" / "config.json",
    ]
    monkeypatch.delenv("LAMINA_AUTH_FILE")
    if os.geteuid() == 0:
        assert auth.lamina_auth_file() == Path("/run/lamina/auth.json")
    else:
        assert auth.lamina_auth_file() == auth_env / "run" / "lamina" / "auth.json"


def test_docker_config_formats(auth_env: Path) -> None:
    write_json(auth_env / "home" / ".docker" / "config.json", {
        "auths": {
            "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
            "https://quay.io": {"auth": b64("q:x:y")},
            "ghcr.io": {},  # left by a credential helper that held it once
            "example.com/team": {"auth": b64("scoped:pw")},
        },
    })  # fmt: skip
    assert auth.find_credentials("docker.io") == ("hub", "pw")
    assert auth.find_credentials("index.docker.io") == ("hub", "pw")
    assert auth.find_credentials("quay.io") == ("q", "x:y")
    assert auth.find_credentials("ghcr.io") is None
    assert auth.find_credentials("example.com") is None


def test_credential_helpers(auth_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """credHelpers, else credsStore, answer for a file instead of its auths (the helper protocol itself, and
    login and logout through it, are tested against a registry in test_registry.py)."""
    from registry_fixtures import credential_helper, helper_calls

    bin_dir = auth_env / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    one, two = auth_env / "one.json", auth_env / "two.json"
    credential_helper(bin_dir, "one", one)
    credential_helper(bin_dir, "two", two)
    write_json(one, {"https://index.docker.io/v1/": ["hub", "1"], "quay.io": ["<token>", "refresh"]})
    write_json(two, {"gcr.io": ["g", "2"]})
    config = auth_env / "home" / ".docker" / "config.json"
    write_json(config, {"auths": {"docker.io": {"auth": b64("stale:0")}, "gcr.io": {"auth": b64("stale:0")}},
                        "credsStore": "one", "credHelpers": {"https://gcr.io": "two"}})
    assert auth.find_credentials("docker.io") == ("hub", "1")  # the helper, not the stale entry
    assert auth.find_credentials("gcr.io") == ("g", "2")  # credHelpers before credsStore
    assert helper_calls(one)[0] == ["get", "https://index.docker.io/v1/"] and helper_calls(two) == [["get", "gcr.io"]]
    assert auth.find_credentials("other.example") is None  # not found: anonymous
    assert auth.find_credentials("quay.io") is None and "identity token" in caplog.text
    # a file earlier in the order still wins with an entry of its own
    write_json(auth_env / "lamina" / "auth.json", {"auths": {"docker.io": {"auth": b64("mine:3")}}})
    assert auth.find_credentials("docker.io") == ("mine", "3")
    for doc, needle in (({"credsStore": "nosuch"}, "docker-credential-nosuch that .* is not installed"),
                        ({"credsStore": "../../bin/sh"}, "not a credential helper name"),
                        ({"credHelpers": ["x"]}, "credHelpers must be an object")):
        write_json(config, doc)
        with pytest.raises(AuthError, match=needle):
            auth.find_credentials("gcr.io")
    (bin_dir / "docker-credential-one").write_text("#!/bin/sh\necho not json\n")
    write_json(config, {"credsStore": "one"})
    with pytest.raises(AuthError, match=r"docker-credential-one answered get for gcr\.io with no Username"):
        auth.find_credentials("gcr.io")


def test_podman_files_and_precedence(auth_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_json(auth_env / "run" / "containers" / "auth.json", {"auths": {"reg.example:5000": {"auth": b64("p:1")}}})
    write_json(auth_env / "home" / ".docker" / "config.json", {"auths": {"reg.example:5000": {"auth": b64("d:2")}}})
    assert auth.find_credentials("reg.example:5000") == ("p", "1")
    explicit = write_json(auth_env / "elsewhere.json", {"auths": {"reg.example:5000": {"auth": b64("r:3")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert auth.find_credentials("reg.example:5000") == ("r", "3")
    monkeypatch.setenv("DOCKER_CONFIG", str(auth_env / "dc"))
    write_json(auth_env / "dc" / "config.json", {"auths": {"only.docker": {"auth": b64("dc:4")}}})
    assert auth.find_credentials("only.docker") == ("dc", "4")
    assert auth.find_credentials("unknown.example") is None


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"auths": []}', b'{"auths": {"h.io": "x"}}', b'{"auths": {"h.io": {"auth": "%%%"}}}',
     b'{"auths": {"h.io": {"auth": "' + base64.b64encode(b"nocolon") + b'"}}}', b"\xff\xfe"],
)  # fmt: skip
def test_malformed_auth_file_names_the_file(auth_env: Path, content: bytes) -> None:
    path = auth_env / "home" / ".docker" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(AuthError, match=re.escape(str(path))) as info:
        auth.find_credentials("h.io")
    assert "\n" not in str(info.value)


def test_store_and_logout(auth_env: Path) -> None:
    auth.store_credentials("https://Reg.Example:5000/", "bob", "p:w")
    path = auth.lamina_auth_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"auths": {"reg.example:5000": {"auth": b64("bob:p:w")}}}
    assert auth.find_credentials("reg.example:5000") == ("bob", "p:w")
    auth.store_credentials("reg.example:5000", "carol", "x")
    assert auth.find_credentials("reg.example:5000") == ("carol", "x")
    assert [p.name for p in path.parent.iterdir()] == ["auth.json"]  # no temporary left behind
    assert auth.logout("reg.example:5000")
    assert not auth.logout("reg.example:5000")
    assert auth.find_credentials("reg.example:5000") is None
    with pytest.raises(AuthError):
        auth.store_credentials("reg.example", "a:b", "x")


def test_login_verifies_before_storing(auth_env: Path, reg: FakeRegistry) -> None:
    reg.auth = "bearer"
    host = reg.base.removeprefix("http://")

    def factory(h: str, creds: Any) -> RegistryClient:
        return RegistryClient(h, opts(), creds)

    with pytest.raises(AuthError, match=f"wrong .* for {host}"):
        auth.login(host, USER, "wrong", factory)
    assert not auth.lamina_auth_file().exists()
    auth.login(host, USER, PASSWORD, factory)
    assert auth.find_credentials(host) == (USER, PASSWORD)
    # And the stored credentials are what a client then uses.
    reg.add_manifest("app", "v1", manifest_bytes(), MEDIA_TYPE_MANIFEST)
    with RegistryClient(host, opts(), auth.find_credentials) as c:
        c.get_manifest("app", "v1")
    assert reg.token_requests[-1] == (USER, ["repository:app:pull"])


def test_only_lamina_errors_escape(reg: FakeRegistry) -> None:
    reg.add_manifest("app", "garbage", b"\x00not json", MEDIA_TYPE_MANIFEST)
    reg.tags["app"] = []
    with client_for(reg) as c, pytest.raises(LaminaError):
        c.get_manifest("app", "garbage")
    with RegistryClient("127.0.0.1:1", opts(max_attempts=1)) as c, pytest.raises(RegistryUnavailable):
        c.list_tags("app")

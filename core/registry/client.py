"""A client for OCI distribution (docker registry v2) registries.

:class:`RegistryClient` talks to one registry host over a :class:`requests.Session`:

* **Transport.** ``https://`` with certificate verification. With :attr:`RegistryOptions.insecure` the client
  tries ``https://`` without verification first and falls back to plain ``http://`` (as podman's
  ``--tls-verify=false`` does). Connection errors, 5xx answers and 429 are retried with exponential backoff and
  jitter (429 and 503 honour ``Retry-After``), at most :attr:`RegistryOptions.max_attempts` times, then
  :class:`RegistryUnavailable` is raised.
* **Auth.** A 401 is answered from its ``WWW-Authenticate`` challenge: ``Basic`` resends with the credentials
  for the host; ``Bearer`` fetches a token from the realm (with the credentials as Basic auth if there are
  any, anonymously otherwise) for the scopes the call needs (``repository:<repo>:pull`` to read,
  ``repository:<repo>:pull,push`` to write, plus ``repository:<from>:pull`` to mount), caches it per (realm,
  service, scopes, user) and retries. Credentials and tokens go to the registry host and the token realm only,
  never to the host a redirect points at.
* **Verification.** Every name, tag and digest is validated before it is put in a URL. Manifests are read to at
  most :data:`~lamina.formats.oci.MAX_DOCUMENT_BYTES`, checked against the digest asked for and the
  ``Docker-Content-Digest`` the registry sends, and their declared ``mediaType`` must agree with the
  ``Content-Type``. Blobs stream through :class:`~lamina.store.content.VerifyingReader` (size and digest checked at
  the end) and a broken download resumes with ``Range: bytes=N-``.

Only lamina errors escape: :class:`RegistryError` and its subclasses, and the format errors of
:mod:`lamina.errors` (:class:`~lamina.errors.DigestMismatch`, :class:`~lamina.errors.InvalidDocument`, ...).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final, NoReturn
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3
import urllib3.exceptions

from lamina import __version__
from lamina.digest import parse_digest
from lamina.errors import DigestError, DigestMismatch, InvalidDocument, InvalidReference, LaminaError
from lamina.formats.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT_BYTES,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    SCHEMA1_TYPES,
    Descriptor,
    parse_document,
)
from lamina.formats.reference import Reference, parse_tag
from lamina.tar.compression import VerifyingReader

__all__ = [
    "ALL_MANIFEST_TYPES",
    "AuthError",
    "BlobReader",
    "Credentials",
    "RegistryClient",
    "RegistryError",
    "RegistryNotFound",
    "RegistryOptions",
    "RegistryUnavailable",
    "TokenCache",
    "api_host",
]

MiB: Final = 1 << 20

#: What ``get_manifest`` accepts by default: OCI and Docker schema2 manifests and indexes.
ALL_MANIFEST_TYPES: Final[tuple[str, ...]] = (
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
)

#: host -> (user, password), or None when there are no credentials for the host.
Credentials = Callable[[str], tuple[str, str] | None]
#: (realm, service, user, *scopes) -> (token, expiry on the time.monotonic() clock).
TokenCache = dict[tuple[str, ...], tuple[str, float]]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS: Final = 10
_ERROR_BODY_LIMIT: Final = 16 * 1024
_TOKEN_BODY_LIMIT: Final = 1 * MiB
_MAX_TAG_PAGES: Final = 10_000
# A registry asking for chunks larger than this gets a monolithic upload instead.
_MAX_CHUNK: Final = 256 * MiB
# Content types that say nothing about which manifest a body is.
_GENERIC_TYPES: Final = frozenset({"", "application/json", "text/plain", "application/octet-stream"})
_DOCKER_HUB_HOSTS: Final = frozenset({"docker.io", "index.docker.io"})
_DOCKER_HUB_API: Final = "registry-1.docker.io"


class RegistryError(LaminaError):
    """A registry refused a request, answered something unusable, or cannot be used as asked."""


class AuthError(RegistryError):
    """Authentication is needed, the credentials are wrong, or access was denied."""


class RegistryUnavailable(RegistryError):
    """The registry cannot be reached, or kept failing after the retries."""


class RegistryNotFound(RegistryError):
    """The registry has no such repository, manifest, tag or blob."""


@dataclass
class RegistryOptions:
    """How a :class:`RegistryClient` talks to its registry.

    ``insecure`` allows plain ``http://`` and turns TLS verification off. ``backoff`` is the first retry delay
    in seconds, doubled on each retry up to ``max_backoff``; ``max_retry_after`` caps what a ``Retry-After``
    header can make the client wait.
    """

    insecure: bool = False
    timeout: float = 30.0
    max_attempts: int = 5
    chunk_size: int = 8 * MiB
    allow_foreign_urls: bool = False
    user_agent: str = f"lamina/{__version__}"
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise RegistryError("max_attempts must be at least 1")
        if self.chunk_size < 1 * MiB:
            raise RegistryError("chunk_size must be at least 1 MiB")
        if self.timeout <= 0:
            raise RegistryError("timeout must be positive")


def api_host(host: str) -> str:
    """The host the registry API of ``host`` is served from: Docker Hub's is ``registry-1.docker.io``."""
    return _DOCKER_HUB_API if host in _DOCKER_HUB_HOSTS else host


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _clean_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _digest_bytes(data: bytes, algorithm: str) -> str:
    return algorithm + ":" + hashlib.new(algorithm, data).hexdigest()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# Errors of the HTTP stack that mean "the connection broke"; worth retrying or resuming.
_TRANSIENT: Final = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class _Transient(Exception):
    """A connection-level failure (internal; never escapes the client)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StreamFailed(Exception):
    """A request with a one-shot body failed in a way an upload restart may fix (internal)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- WWW-Authenticate -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Challenge:
    scheme: str  # lower case
    params: dict[str, str]


def _parse_challenges(header: str) -> list[_Challenge]:
    """Parse ``WWW-Authenticate``: ``Scheme k=v, k="quoted, value", Other ...`` (RFC 7235, leniently)."""
    out: list[_Challenge] = []
    i, n = 0, len(header)
    current: _Challenge | None = None

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    while i < n:
        skip(" \t,")
        if i >= n:
            break
        word = token()
        if not word:
            i += 1  # a stray quote or '=': skip it
            continue
        skip(" \t")
        if i < n and header[i] == "=" and current is not None:
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(header[i])
                    i += 1
                i += 1
                value = "".join(chars)
            else:
                value = token()
            current.params[word.lower()] = value
        elif i < n and header[i] == "=":
            token()  # a parameter with no scheme before it (or a token68): ignore
            skip("=")
        else:
            current = _Challenge(word.lower(), {})
            out.append(current)
    return out


# -- bodies ---------------------------------------------------------------------------------------------------


class _UploadBody:
    """A blob body streamed from the caller's chunks, sized for Content-Length and checked on the way."""

    def __init__(self, chunks: Iterator[bytes], size: int, digest: str, what: str) -> None:
        self._chunks = chunks
        self._size = size
        self._digest = digest
        self._hash = hashlib.new(digest.split(":", 1)[0])
        self._what = what
        self._sent = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        # Each chunk is held back until the next one arrives, and the last until the whole stream checked
        # out: a stream of the wrong size or digest never completes a request body.
        pending: bytes | None = None
        for chunk in self._chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise RegistryError(f"{self._what}: chunks must be bytes, got {type(chunk).__name__}")
            if not chunk:
                continue
            self._sent += len(chunk)
            if self._sent > self._size:
                raise DigestMismatch(f"{self._what} is longer than its size {self._size}")
            self._hash.update(chunk)
            if pending is not None:
                yield pending
            pending = bytes(chunk)
        self.check()
        if pending is not None:
            yield pending

    def check(self) -> None:
        if self._sent != self._size:
            raise DigestMismatch(f"{self._what} is {self._sent} bytes, not its size {self._size}")
        actual = self._hash.name + ":" + self._hash.hexdigest()
        if actual != self._digest:
            raise DigestMismatch(f"{self._what} does not match its digest: expected {self._digest}, got {actual}")


class _ChunkSource:
    """Cuts the caller's chunks into parts of a fixed size (at most one part in memory)."""

    def __init__(self, chunks: Iterator[bytes], part: int) -> None:
        self._chunks = chunks
        self._part = part
        self._pending = b""
        self._done = False

    def next_part(self) -> bytes:
        buf = bytearray(self._pending)
        self._pending = b""
        while len(buf) < self._part and not self._done:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                break
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise RegistryError(f"blob chunks must be bytes, got {type(chunk).__name__}")
            buf += chunk
        if len(buf) > self._part:
            self._pending = bytes(buf[self._part :])
            del buf[self._part :]
        return bytes(buf)


class _BlobStream:
    """The raw bytes of a blob download; resumes with ``Range`` when the connection breaks."""

    def __init__(
        self,
        open_at: Callable[[int], requests.Response],
        size: int,
        what: str,
        options: RegistryOptions,
        sleep: Callable[[int], None],
        offset: int = 0,
    ) -> None:
        self._open_at = open_at
        self._size = size
        self._what = what
        self._options = options
        self._sleep = sleep
        self._resp: requests.Response | None = None
        self._iter: Iterator[bytes] | None = None
        self._buf = b""
        self._received = offset  # bytes of the blob received so far (delivered or buffered)
        self._skip = 0  # bytes to drop from a 200 answer to a Range request
        self._failures = 0
        self._progress = False
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = self._options.chunk_size
        while not self._buf:
            if self._eof:
                return b""
            if self._iter is None:
                self._connect()
            assert self._iter is not None
            try:
                data = next(self._iter, b"")
            except _TRANSIENT as e:
                self._broken(_one_line(str(e) or type(e).__name__))
                continue
            if not data:
                if self._received < self._size:
                    self._broken(f"connection closed after {self._received} of {self._size} bytes")
                    continue
                self.close()
                self._eof = True
                return b""
            if self._skip:
                drop = min(self._skip, len(data))
                self._skip -= drop
                data = data[drop:]
                if not data:
                    continue
            self._received += len(data)
            self._progress = True
            self._buf = data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _connect(self) -> None:
        offset = self._received
        resp = self._open_at(offset)
        length = resp.headers.get("Content-Length")
        if resp.status_code == 206:
            content_range = resp.headers.get("Content-Range", "")
            unit, _, spec = content_range.partition(" ")
            start = spec.split("-", 1)[0]
            if unit.strip().lower() != "bytes" or not start.isdigit() or int(start) != offset:
                resp.close()
                raise RegistryError(f"{self._what}: asked for bytes from {offset}, got range {content_range!r}")
            expected = self._size - offset
        else:
            self._skip = offset
            expected = self._size
        if length is not None and length.strip().isdigit() and int(length) != expected:
            resp.close()
            total = int(length) + (self._size - expected)
            raise DigestMismatch(f"{self._what} is {total} bytes on the registry, not its size {self._size}")
        self._resp = resp
        self._iter = resp.raw.stream(self._options.chunk_size, decode_content=False)

    def _broken(self, reason: str) -> None:
        self.close()
        if self._progress:
            self._failures = 0
        self._progress = False
        self._failures += 1
        if self._failures >= self._options.max_attempts:
            raise RegistryUnavailable(
                f"download of {self._what} failed {self._failures} times without progress: {reason}"
            )
        self._sleep(self._failures)

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self._resp = None
        self._iter = None


class BlobReader:
    """A blob being downloaded: ``read(n)`` returns the next bytes; size and digest are verified at the end.

    :meth:`finish` reads what is left and verifies; :meth:`close` drops the connection. Usable as a context
    manager.
    """

    def __init__(self, stream: _BlobStream, digest: str, size: int, what: str) -> None:
        self._stream = stream
        self._reader = VerifyingReader(stream, digest, size, what)
        self.digest = self._reader.digest
        self.size = size

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._reader.read(n)
        except BaseException:
            self._stream.close()
            raise

    def finish(self) -> None:
        try:
            self._reader.finish()
        finally:
            self._stream.close()

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoNetrc(requests.auth.AuthBase):
    """Keeps requests from picking credentials out of ~/.netrc: lamina decides what is sent where."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


# -- the client -----------------------------------------------------------------------------------------------


class RegistryClient:
    """One registry host. ``host`` is ``name[:port]`` as in image references (``docker.io`` is Docker Hub)."""

    def __init__(
        self,
        host: str,
        options: RegistryOptions | None = None,
        credentials: Credentials | None = None,
        token_cache: TokenCache | None = None,
    ) -> None:
        self.host = _check_host(host)
        self.options = options if options is not None else RegistryOptions()
        self._api_host = api_host(self.host)
        self._scheme = "https"
        self._probe_scheme = self.options.insecure
        self._credentials_fn = credentials
        self._creds: tuple[str, str] | None = None
        self._creds_loaded = False
        self._tokens: TokenCache = token_cache if token_cache is not None else {}
        self._auth_kind: str | None = None  # "basic" or "bearer", once a challenge has told
        self._bearer: tuple[str, str] = ("", "")  # realm, service
        self._lock = threading.Lock()  # the client is shared by a push's or pull's worker threads
        self._session = requests.Session()
        self._session.verify = not self.options.insecure
        self._session.auth = _NoNetrc()
        self._session.headers["User-Agent"] = self.options.user_agent
        if self.options.insecure:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    # -- plumbing ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _base(self) -> str:
        return f"{self._scheme}://{self._api_host}"

    def _url(self, path: str) -> str:
        return self._base + path

    def _current_scheme(self, url: str) -> str:
        """A registry URL made before the insecure probe settled on plain http, rewritten to http."""
        if self._scheme == "http" and url.startswith("https://") and _origin(url)[1] == self._api_host.lower():
            return "http://" + url[len("https://") :]
        return url

    def _same_origin(self, url: str) -> bool:
        return _origin(url) == _origin(self._base)

    def _credentials(self) -> tuple[str, str] | None:
        if not self._creds_loaded:
            with self._lock:
                if not self._creds_loaded:
                    self._creds = self._credentials_fn(self.host) if self._credentials_fn is not None else None
                    self._creds_loaded = True
        return self._creds

    def _delay(self, attempt: int) -> float:
        ceiling = min(self.options.max_backoff, self.options.backoff * 2.0 ** max(attempt - 1, 0))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _sleep(self, attempt: int) -> None:
        time.sleep(self._delay(attempt))

    def _retry_after(self, resp: requests.Response, attempt: int) -> float:
        value = resp.headers.get("Retry-After", "").strip()
        wait: float | None = None
        if value.isdigit():
            wait = float(value)
        elif value:
            try:
                wait = float(parsedate_to_datetime(value).timestamp()) - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                wait = None
        if wait is None:
            return self._delay(attempt)
        return min(max(wait, 0.0), self.options.max_retry_after)

    def _raw(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | _UploadBody | None,
        params: Sequence[tuple[str, str]] | None = None,
    ) -> requests.Response:
        """One HTTP exchange; connection failures become :class:`_Transient`."""
        while True:
            probing = self._probe_scheme and self._same_origin(url) and url.startswith("https://")
            try:
                resp = self._session.request(
                    method,
                    url,
                    headers=dict(headers),
                    data=body,
                    params=params,
                    stream=True,
                    allow_redirects=False,
                    # While probing for TLS, a plain-http server that sits on our TLS hello must not stall us.
                    timeout=(min(self.options.timeout, 5.0), self.options.timeout) if probing else self.options.timeout,
                )
            except (requests.exceptions.SSLError, requests.ConnectionError) as e:
                if probing:
                    # insecure: no TLS there (or no https port), so talk plain http from now on.
                    self._probe_scheme = False
                    self._scheme = "http"
                    url = "http://" + url[len("https://") :]
                    continue
                if isinstance(e, requests.exceptions.SSLError):
                    raise RegistryUnavailable(
                        f"TLS error talking to {urlsplit(url).netloc}: {_one_line(str(e))}"
                    ) from e
                raise _Transient(_one_line(str(e) or type(e).__name__)) from e
            except requests.exceptions.InvalidURL as e:
                raise RegistryError(f"invalid URL {_one_line(url)}: {_one_line(str(e))}") from e
            except _TRANSIENT as e:
                raise _Transient(_one_line(str(e) or type(e).__name__)) from e
            except (requests.RequestException, ValueError) as e:
                raise RegistryError(f"request to {urlsplit(url).netloc} failed: {_one_line(str(e))}") from e
            if probing:
                self._probe_scheme = False
            return resp

    def _auth_headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        creds = self._credentials()
        if self._auth_kind == "basic" and creds is not None:
            return {"Authorization": _basic(*creds)}
        if self._auth_kind == "bearer":
            entry = self._tokens.get(self._token_key(scopes))
            if entry is not None and entry[1] > time.monotonic():
                return {"Authorization": "Bearer " + entry[0]}
        return {}

    def _token_key(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        creds = self._credentials()
        realm, service = self._bearer
        return (realm, service, creds[0] if creds else "", *scopes)

    def _exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | _UploadBody | None,
        scopes: tuple[str, ...] | None,
        follow: bool,
    ) -> tuple[requests.Response, str, bool]:
        """A request and the redirects it leads to: the answer, its URL, and whether credentials were sent.
        Credentials only ever go to the registry's own origin."""
        auth = self._auth_headers(scopes) if scopes is not None else {}
        current = self._current_scheme(url)
        sent = bool(auth) and self._same_origin(current)
        resp = self._raw(method, current, {**headers, **(auth if sent else {})}, body)
        current = resp.url or current  # the insecure probe may have switched to http
        hops = 0
        while follow and resp.status_code in _REDIRECTS:
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise RegistryError(f"{urlsplit(current).netloc} sent a redirect without a Location")
            hops += 1
            if hops > _MAX_REDIRECTS:
                raise RegistryError(f"too many redirects for {_one_line(url)}")
            target = urljoin(current, location)
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ("http", "https"):
                raise RegistryError(f"{urlsplit(current).netloc} redirected to a {scheme or 'relative'} URL")
            if scheme == "http" and urlsplit(current).scheme == "https" and not self.options.insecure:
                raise RegistryError(f"{urlsplit(current).netloc} redirected from https to plain http")
            current = target
            hop_headers = {**headers, **(auth if self._same_origin(current) else {})}
            resp = self._raw(method, current, hop_headers, None)
            current = resp.url or current
        return resp, current, sent

    def _send(
        self,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...] | None,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | _UploadBody | None = None,
        replayable: bool = True,
        follow: bool = False,
    ) -> requests.Response:
        """A request with retries and auth negotiation. ``scopes=None``: no registry auth at all (foreign URLs).

        Returns any answer that is not a 5xx, 429 or a 401 the client could answer; the caller checks it.
        """
        headers = dict(headers or {})
        attempt = 0
        negotiated = False
        while True:
            attempt += 1
            try:
                resp, final_url, sent_auth = self._exchange(method, url, headers, body, scopes, follow)
            except _Transient as e:
                if not replayable:
                    raise _StreamFailed(e.reason) from None
                if attempt >= self.options.max_attempts:
                    raise RegistryUnavailable(
                        f"cannot reach {self.host} after {attempt} attempts: {e.reason}"
                    ) from None
                self._sleep(attempt)
                continue
            status = resp.status_code
            if status >= 500 or status == 429:
                wait = self._retry_after(resp, attempt)
                detail = _error_detail(resp)
                if not replayable:
                    raise _StreamFailed(f"HTTP {status}{detail}")
                if attempt >= self.options.max_attempts:
                    raise RegistryUnavailable(
                        f"{self.host} answered {what} with HTTP {status}{detail} {attempt} times; giving up"
                    )
                time.sleep(wait)
                continue
            if status == 401 and scopes is not None and self._same_origin(final_url):
                challenge_header = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                if negotiated:
                    raise AuthError(self._denied(scopes))
                # A token another call (or client sharing the cache) got is tried once before a fresh one.
                negotiated = self._negotiate(challenge_header, scopes, allow_cached=not sent_auth)
                attempt -= 1  # an auth round trip is not a failed attempt
                if not replayable:
                    raise _StreamFailed("authorization expired")
                continue
            return resp

    def _negotiate(self, header: str, scopes: tuple[str, ...], allow_cached: bool) -> bool:
        """Answer a challenge; True when that took fresh credentials, False when a cached token will do."""
        challenges = _parse_challenges(header)
        creds = self._credentials()
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                self._auth_kind = "bearer"
                self._bearer = (challenge.params["realm"], challenge.params.get("service", ""))
                wanted = list(scopes)
                extra = challenge.params.get("scope", "")
                for scope in extra.split(" "):
                    if scope and scope not in wanted:
                        wanted.append(scope)
                key = self._token_key(scopes)
                cached = self._tokens.get(key)
                if allow_cached and cached is not None and cached[1] > time.monotonic():
                    return False
                self._tokens.pop(key, None)
                token, ttl = self._fetch_token(*self._bearer, wanted)
                self._tokens[key] = (token, time.monotonic() + ttl)
                return True
        for challenge in challenges:
            if challenge.scheme == "basic":
                if creds is None:
                    raise AuthError(self._login_hint())
                self._auth_kind = "basic"
                return True
        if not challenges:
            raise AuthError(f"{self.host} requires authentication but sent no WWW-Authenticate challenge")
        schemes = ", ".join(sorted({c.scheme for c in challenges}))
        raise AuthError(f"{self.host} asks for unsupported authentication ({schemes})")

    def _login_hint(self) -> str:
        return f"authentication required for {self.host}; run lamina login {self.host}"

    def _denied(self, scopes: tuple[str, ...]) -> str:
        creds = self._credentials()
        if creds is None:
            return self._login_hint()
        if self._auth_kind == "basic":
            return f"wrong username or password for {self.host}"
        target = " ".join(scopes) if scopes else "the registry"
        return f"{self.host} denied {creds[0]} access to {target}"

    def _fetch_token(self, realm: str, service: str, scopes: Sequence[str]) -> tuple[str, float]:
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AuthError(f"{self.host} names an invalid token realm {_one_line(realm, 80)!r}")
        if parts.scheme == "http" and not self.options.insecure:
            raise AuthError(f"{self.host} names a plain-http token realm {_one_line(realm, 80)!r}")
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        creds = self._credentials()
        headers = {"Authorization": _basic(*creds)} if creds is not None else {}
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._raw("GET", realm, headers, None, params=params)
            except _Transient as e:
                if attempt >= self.options.max_attempts:
                    raise RegistryUnavailable(f"cannot reach the token service of {self.host}: {e.reason}") from None
                self._sleep(attempt)
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                wait = self._retry_after(resp, attempt)
                resp.close()
                if attempt >= self.options.max_attempts:
                    raise RegistryUnavailable(
                        f"the token service of {self.host} answered HTTP {resp.status_code} {attempt} times"
                    )
                time.sleep(wait)
                continue
            break
        with resp:
            if resp.status_code in (401, 403):
                if creds is None:
                    raise AuthError(self._login_hint())
                raise AuthError(f"wrong username or password for {self.host}")
            if resp.status_code != 200:
                raise AuthError(
                    f"the token service of {self.host} answered HTTP {resp.status_code}{_error_detail(resp)}"
                )
            try:
                data = _read_limited(resp, _TOKEN_BODY_LIMIT, "token response", decode=True)
            except _Transient as e:
                raise RegistryUnavailable(f"token request to {self.host} broke off: {e.reason}") from None
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise AuthError(f"the token service of {self.host} sent invalid JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise AuthError(f"the token service of {self.host} sent no token")
        expires = doc.get("expires_in")
        ttl = float(expires) if isinstance(expires, int | float) and not isinstance(expires, bool) else 60.0
        return token, max(ttl, 60.0) - 10.0

    def _fail(self, resp: requests.Response, what: str) -> NoReturn:
        status = resp.status_code
        detail = _error_detail(resp)
        if status == 404:
            raise RegistryNotFound(f"{what} not found on {self.host}{detail}")
        if status == 401:
            raise AuthError(f"{self.host} refused {what}: unauthorized{detail}")
        if status == 403:
            raise AuthError(f"{self.host} denied access to {what}{detail}")
        raise RegistryError(f"{self.host} answered {what} with HTTP {status}{detail}")

    # -- names ------------------------------------------------------------------------------------------------

    def _repo(self, repo: str) -> str:
        if not isinstance(repo, str):
            raise InvalidReference(f"repository must be a string, got {type(repo).__name__}")
        return Reference(self.host, repo).path

    @staticmethod
    def _reference(reference: str) -> str:
        if not isinstance(reference, str):
            raise InvalidReference(f"manifest reference must be a string, got {type(reference).__name__}")
        if ":" in reference:
            return parse_digest(reference)
        return parse_tag(reference)

    @staticmethod
    def _pull(repo: str) -> tuple[str, ...]:
        return (f"repository:{repo}:pull",)

    @staticmethod
    def _push(repo: str) -> tuple[str, ...]:
        return (f"repository:{repo}:pull,push",)

    def _show(self, repo: str, reference: str) -> str:
        sep = "@" if ":" in reference else ":"
        return f"{self.host}/{repo}{sep}{reference}"

    # -- API --------------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: check the registry answers and, if it wants authentication, that it accepts ours."""
        resp = self._send("GET", self._url("/v2/"), scopes=(), what="GET /v2/")
        with resp:
            if resp.status_code == 200:
                return
            if resp.status_code == 404:
                raise RegistryError(f"{self.host} does not serve the registry API (GET /v2/ answered 404)")
            self._fail(resp, "GET /v2/")

    def get_manifest(
        self, repo: str, reference: str, accept: Sequence[str] = ALL_MANIFEST_TYPES
    ) -> tuple[bytes, str, str]:
        """Fetch a manifest or index by tag or digest: ``(bytes, media_type, digest)``, verified."""
        repo = self._repo(repo)
        reference = self._reference(reference)
        what = f"manifest {self._show(repo, reference)}"
        accept_list = [a for a in accept if isinstance(a, str) and a]
        if not accept_list:
            raise RegistryError("get_manifest needs at least one media type to accept")
        headers = {"Accept": ", ".join(accept_list)}
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        attempt = 0
        while True:
            attempt += 1
            resp = self._send("GET", url, scopes=self._pull(repo), what=f"GET {what}", headers=headers, follow=True)
            with resp:
                if resp.status_code != 200:
                    self._fail(resp, what)
                try:
                    data = _read_limited(resp, MAX_DOCUMENT_BYTES, what, decode=True)
                except _Transient as e:
                    if attempt >= self.options.max_attempts:
                        raise RegistryUnavailable(f"reading {what} kept failing: {e.reason}") from None
                    self._sleep(attempt)
                    continue
                content_type = _clean_type(resp.headers.get("Content-Type"))
                header_digest = resp.headers.get("Docker-Content-Digest")
            break
        digest = self._verify_digests(data, reference, header_digest, what)
        media_type = self._manifest_type(data, content_type, accept_list, what)
        return data, media_type, digest

    def _verify_digests(self, data: bytes, reference: str, header_digest: str | None, what: str) -> str:
        digest: str
        if ":" in reference:
            digest = reference
            actual = _digest_bytes(data, reference.split(":", 1)[0])
            if actual != reference:
                raise DigestMismatch(f"{what} does not match its digest: got {actual}")
        else:
            digest = _digest_bytes(data, "sha256")
        if header_digest:
            try:
                claimed = parse_digest(header_digest.strip())
            except DigestError:
                raise RegistryError(
                    f"{self.host} sent an invalid Docker-Content-Digest {_one_line(header_digest, 80)!r}"
                ) from None
            actual = _digest_bytes(data, claimed.split(":", 1)[0])
            if actual != claimed:
                raise DigestMismatch(f"{what} does not match the registry's Docker-Content-Digest {claimed}")
        return digest

    def _manifest_type(self, data: bytes, content_type: str, accept: Sequence[str], what: str) -> str:
        if content_type in SCHEMA1_TYPES:
            raise InvalidDocument(f"{what} is a Docker schema1 manifest; schema1 manifests are not supported")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidDocument(f"{what} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise InvalidDocument(f"{what} is not a JSON object")
        version = doc.get("schemaVersion")
        declared = doc.get("mediaType")
        if (version == 1 and not isinstance(version, bool)) or declared in SCHEMA1_TYPES:
            raise InvalidDocument(f"{what} is a Docker schema1 manifest; schema1 manifests are not supported")
        if declared is not None and not isinstance(declared, str):
            raise InvalidDocument(f"{what}: mediaType must be a string")
        media_type = content_type
        if content_type in _GENERIC_TYPES:
            media_type = declared or parse_document(data).media_type
        elif declared is not None and declared.lower() != content_type:
            raise InvalidDocument(
                f"{what} media type disagrees: the registry sent {content_type!r}, the document says {declared!r}"
            )
        if media_type in MANIFEST_TYPES or media_type in INDEX_TYPES:
            parse_document(data, media_type)
        elif media_type not in {a.lower() for a in accept}:
            raise InvalidDocument(f"{what} has unexpected media type {media_type!r}")
        return media_type

    def head_manifest(self, repo: str, reference: str) -> tuple[str, str, int] | None:
        """``HEAD`` a manifest: ``(digest, media_type, size)``, or None if the registry does not have it."""
        repo = self._repo(repo)
        reference = self._reference(reference)
        what = f"manifest {self._show(repo, reference)}"
        headers = {"Accept": ", ".join(ALL_MANIFEST_TYPES)}
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        resp = self._send("HEAD", url, scopes=self._pull(repo), what=f"HEAD {what}", headers=headers, follow=True)
        with resp:
            if resp.status_code == 404:
                return None
            if resp.status_code != 200:
                self._fail(resp, what)
            header_digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
            media_type = _clean_type(resp.headers.get("Content-Type"))
            length = (resp.headers.get("Content-Length") or "").strip()
        if not header_digest or not length.isdigit() or media_type in _GENERIC_TYPES:
            # Not enough in the headers: fetch the manifest itself.
            data, media_type, digest = self.get_manifest(repo, reference)
            return digest, media_type, len(data)
        try:
            digest = parse_digest(header_digest)
        except DigestError:
            raise RegistryError(
                f"{self.host} sent an invalid Docker-Content-Digest {_one_line(header_digest, 80)!r}"
            ) from None
        if ":" in reference and digest != reference:
            raise DigestMismatch(f"{what}: the registry reports digest {digest}")
        if int(length) > MAX_DOCUMENT_BYTES:
            raise InvalidDocument(f"{what} is {length} bytes, over the {MAX_DOCUMENT_BYTES} byte limit")
        return digest, media_type, int(length)

    def open_blob(self, repo: str, digest: str, size: int) -> BlobReader:
        """Stream a blob; the returned reader verifies size and digest when its last byte is read."""
        return BlobReader(self._blob_stream(repo, digest, size, 0), parse_digest(digest), size,
                          f"blob {self.host}/{self._repo(repo)}@{digest}")

    def open_blob_at(self, repo: str, digest: str, size: int, offset: int) -> _BlobStream:
        """A blob's raw bytes from ``offset`` on (``Range``), unverified: for a caller that hashes the bytes
        before ``offset`` itself (a resumed download)."""
        if not 0 <= offset <= size:
            raise RegistryError(f"offset {offset} is outside blob {digest} of {size} bytes")
        return self._blob_stream(repo, digest, size, offset)

    def _blob_stream(self, repo: str, digest: str, size: int, offset: int) -> _BlobStream:
        repo = self._repo(repo)
        digest = parse_digest(digest)
        size = _check_size(size)
        what = f"blob {self.host}/{repo}@{digest}"
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        scopes = self._pull(repo)

        def open_at(at: int) -> requests.Response:
            headers = {"Accept-Encoding": "identity"}
            if at:
                headers["Range"] = f"bytes={at}-"
            resp = self._send("GET", url, scopes=scopes, what=f"GET {what}", headers=headers, follow=True)
            if resp.status_code == 200 or (at and resp.status_code == 206):
                return resp
            with resp:
                self._fail(resp, what)

        stream = _BlobStream(open_at, size, what, self.options, self._sleep, offset)
        if offset < size:
            stream._connect()
        else:
            stream._eof = True
        return stream

    def open_blob_urls(self, desc: Descriptor) -> BlobReader:
        """Fetch a foreign layer from its descriptor's ``urls`` (no registry credentials are sent there)."""
        if not isinstance(desc, Descriptor):
            raise RegistryError(f"open_blob_urls needs a Descriptor, got {type(desc).__name__}")
        if not desc.urls:
            raise RegistryError(f"blob {desc.digest} has no URLs")
        if not self.options.allow_foreign_urls:
            raise RegistryError(
                f"blob {desc.digest} is a foreign layer served from {_one_line(desc.urls[0], 80)}; "
                "foreign URLs are not fetched unless allowed"
            )
        what = f"foreign blob {desc.digest}"
        problems: list[str] = []
        for raw_url in desc.urls:
            scheme = urlsplit(raw_url).scheme.lower()
            if scheme not in ("http", "https") or (scheme == "http" and not self.options.insecure):
                problems.append(f"{_one_line(raw_url, 80)}: not an allowed URL")
                continue

            def open_at(offset: int, url: str = raw_url) -> requests.Response:
                headers = {"Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                resp = self._send("GET", url, scopes=None, what=f"GET {what}", headers=headers, follow=True)
                if resp.status_code == 200 or (offset and resp.status_code == 206):
                    return resp
                with resp:
                    detail = _error_detail(resp)
                raise RegistryError(f"{urlsplit(url).netloc} answered {what} with HTTP {resp.status_code}{detail}")

            stream = _BlobStream(open_at, desc.size, what, self.options, self._sleep)
            try:
                stream._connect()
            except RegistryError as e:
                problems.append(e.message)
                continue
            return BlobReader(stream, desc.digest, desc.size, what)
        raise RegistryError(f"cannot fetch {what}: {'; '.join(problems)}")

    def blob_exists(self, repo: str, digest: str) -> bool:
        """``HEAD`` a blob."""
        repo = self._repo(repo)
        digest = parse_digest(digest)
        what = f"blob {self.host}/{repo}@{digest}"
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        resp = self._send("HEAD", url, scopes=self._pull(repo), what=f"HEAD {what}", follow=True)
        with resp:
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            self._fail(resp, what)

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Ask the registry to mount a blob from another repository; True if it did (201)."""
        repo = self._repo(repo)
        from_repo = self._repo(from_repo)
        digest = parse_digest(digest)
        what = f"mount of {digest} from {from_repo} into {self.host}/{repo}"
        query = urlencode({"mount": digest, "from": from_repo})
        url = self._url(f"/v2/{repo}/blobs/uploads/?{query}")
        scopes = self._push(repo) + self._pull(from_repo) if from_repo != repo else self._push(repo)
        resp = self._send("POST", url, scopes=scopes, what=what, body=b"")
        with resp:
            status = resp.status_code
            location = resp.headers.get("Location")
            header_digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
            if status not in (201, 202):
                self._fail(resp, what)
        if status == 201:
            if header_digest and header_digest != digest:
                raise DigestMismatch(f"{what}: the registry reports digest {_one_line(header_digest, 80)}")
            return True
        if location:  # the registry started an upload instead: cancel it
            self._cancel_upload(location, self._push(repo))
        return False

    def _cancel_upload(self, location: str, scopes: tuple[str, ...]) -> None:
        try:
            target = self._upload_url(location, {})
            resp = self._send("DELETE", target, scopes=scopes, what="cancel upload", replayable=True)
            resp.close()
        except (LaminaError, _StreamFailed):
            pass  # best effort: the registry expires abandoned uploads

    def _upload_url(self, location: str, extra: Mapping[str, str]) -> str:
        url = urljoin(self._base + "/", location)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise RegistryError(f"{self.host} sent an upload location that is not http(s)")
        if parts.scheme.lower() == "http" and self._scheme == "https":
            raise RegistryError(f"{self.host} sent a plain-http upload location")
        if extra:
            # Append to the query as the registry wrote it: upload locations may carry opaque, signed state.
            added = urlencode(dict(extra))
            url = urlunsplit(parts._replace(query=f"{parts.query}&{added}" if parts.query else added))
        return url

    def upload_blob(self, repo: str, digest: str, size: int, chunks: Callable[[], Iterator[bytes]]) -> None:
        """Upload a blob whose bytes ``chunks()`` yields (called again if the upload must restart)."""
        repo = self._repo(repo)
        digest = parse_digest(digest)
        size = _check_size(size)
        what = f"blob {self.host}/{repo}@{digest}"
        attempt = 0
        while True:
            attempt += 1
            try:
                self._upload_once(repo, digest, size, chunks, what)
                return
            except _StreamFailed as e:
                if attempt >= self.options.max_attempts:
                    raise RegistryUnavailable(f"upload of {what} failed {attempt} times: {e.reason}") from None
                self._sleep(attempt)

    def _upload_once(self, repo: str, digest: str, size: int, chunks: Callable[[], Iterator[bytes]], what: str) -> None:
        scopes = self._push(repo)
        resp = self._send(
            "POST", self._url(f"/v2/{repo}/blobs/uploads/"), scopes=scopes, what=f"upload of {what}", body=b""
        )
        with resp:
            if resp.status_code != 202:
                self._fail(resp, f"upload of {what}")
            location = resp.headers.get("Location")
            min_header = (resp.headers.get("OCI-Chunk-Min-Length") or "").strip()
        if not location:
            raise RegistryError(f"{self.host} started an upload of {what} without a Location")
        min_length = int(min_header) if min_header.isdigit() else None
        iterator = iter(chunks())
        try:
            if size <= self.options.chunk_size or min_length is None or min_length > _MAX_CHUNK:
                self._put_monolithic(location, repo, digest, size, iterator, what)
            else:
                self._put_chunked(
                    location, repo, digest, size, iterator, max(self.options.chunk_size, min_length), what
                )
        except BaseException:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()
            raise

    def _put_monolithic(
        self, location: str, repo: str, digest: str, size: int, iterator: Iterator[bytes], what: str
    ) -> None:
        body = _UploadBody(iterator, size, digest, what)
        data: bytes | _UploadBody = body
        if size == 0:
            body.check()
            data = b""
        url = self._upload_url(location, {"digest": digest})
        resp = self._send(
            "PUT", url, scopes=self._push(repo), what=f"upload of {what}", replayable=False,
            headers={"Content-Type": "application/octet-stream"}, body=data,
        )  # fmt: skip
        self._finish_upload(resp, digest, what)

    def _put_chunked(
        self, location: str, repo: str, digest: str, size: int, iterator: Iterator[bytes], part: int, what: str
    ) -> None:
        source = _ChunkSource(iter(_UploadBody(iterator, size, digest, what)), part)
        offset = 0
        while True:
            data = source.next_part()
            if not data:
                break
            end = offset + len(data) - 1
            resp = self._send(
                "PATCH", self._upload_url(location, {}), scopes=self._push(repo), what=f"upload of {what}",
                replayable=False, body=data,
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
            )  # fmt: skip
            with resp:
                if resp.status_code == 416:
                    raise _StreamFailed(f"the registry refused the chunk at {offset}-{end}")
                if resp.status_code != 202:
                    self._fail(resp, f"upload of {what}")
                location = resp.headers.get("Location") or location
                acknowledged = (resp.headers.get("Range") or "").strip()
            if acknowledged:
                last = acknowledged.removeprefix("bytes=").split("-", 1)[-1]
                if not last.isdigit() or int(last) != end:
                    raise _StreamFailed(f"the registry acknowledged {acknowledged!r} after the chunk {offset}-{end}")
            offset = end + 1
        if offset != size:  # _UploadBody raised already if the stream was longer or shorter
            raise DigestMismatch(f"{what} is {offset} bytes, not its size {size}")
        url = self._upload_url(location, {"digest": digest})
        resp = self._send("PUT", url, scopes=self._push(repo), what=f"upload of {what}", replayable=False, body=b"")
        self._finish_upload(resp, digest, what)

    def _finish_upload(self, resp: requests.Response, digest: str, what: str) -> None:
        with resp:
            if resp.status_code != 201:
                self._fail(resp, f"upload of {what}")
            header_digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
        if header_digest and header_digest != digest:
            raise DigestMismatch(f"{what}: the registry stored it as {_one_line(header_digest, 80)}")

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest or index under a tag or its digest; returns its digest."""
        repo = self._repo(repo)
        reference = self._reference(reference)
        what = f"manifest {self._show(repo, reference)}"
        if not isinstance(data, bytes | bytearray):
            raise RegistryError(f"{what}: data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise InvalidDocument(f"{what} is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES} byte limit")
        if not isinstance(media_type, str) or not media_type or any(c in media_type for c in "\r\n"):
            raise RegistryError(f"{what}: invalid media type {media_type!r}")
        if media_type in SCHEMA1_TYPES:
            raise InvalidDocument(f"{what}: schema1 manifests are not supported")
        if media_type in MANIFEST_TYPES or media_type in INDEX_TYPES:
            parse_document(data, media_type)  # refuses a declared mediaType that disagrees
        algorithm = reference.split(":", 1)[0] if ":" in reference else "sha256"
        digest = _digest_bytes(data, algorithm)
        if ":" in reference and digest != reference:
            raise DigestMismatch(f"{what} does not match its digest: got {digest}")
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        resp = self._send(
            "PUT", url, scopes=self._push(repo), what=f"PUT {what}", headers={"Content-Type": media_type}, body=data
        )
        with resp:
            if resp.status_code not in (200, 201):
                self._fail(resp, what)
            header_digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
        if header_digest and header_digest != digest:
            raise DigestMismatch(f"{what}: the registry stored it as {_one_line(header_digest, 80)}")
        return digest

    def list_tags(self, repo: str) -> list[str]:
        """All tags of a repository, following ``Link: <...>; rel="next"`` pagination."""
        repo = self._repo(repo)
        what = f"tags of {self.host}/{repo}"
        url: str | None = self._url(f"/v2/{repo}/tags/list")
        seen: set[str] = set()
        tags: list[str] = []
        while url is not None:
            if url in seen or len(seen) >= _MAX_TAG_PAGES:
                raise RegistryError(f"{self.host} paginates the {what} in a loop")
            seen.add(url)
            resp = self._send("GET", url, scopes=self._pull(repo), what=f"GET {what}")
            with resp:
                if resp.status_code != 200:
                    self._fail(resp, what)
                try:
                    data = _read_limited(resp, MAX_DOCUMENT_BYTES, what, decode=True)
                except _Transient as e:
                    raise RegistryUnavailable(f"reading the {what} broke off: {e.reason}") from None
                next_link = resp.links.get("next", {}).get("url")
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):
                raise RegistryError(f"{self.host} sent invalid JSON for the {what}") from None
            page = doc.get("tags") if isinstance(doc, dict) else None
            if page is None and isinstance(doc, dict):
                page = []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError(f"{self.host} sent a malformed tag list for {repo}")
            tags.extend(page)
            url = None
            if next_link:
                url = urljoin(resp.url or self._base, next_link)
                if not self._same_origin(url):
                    raise RegistryError(f"{self.host} paginates the {what} to another host")
        return tags


# -- helpers --------------------------------------------------------------------------------------------------


def _check_host(host: str) -> str:
    if not isinstance(host, str):
        raise RegistryError(f"registry host must be a string, got {type(host).__name__}")
    try:
        domain = Reference(host, "x").domain
    except InvalidReference:
        domain = ""
    if host == "index.docker.io":
        return "docker.io"
    if domain != host:
        raise RegistryError(f"invalid registry host {_one_line(host, 80)!r}")
    return host


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RegistryError(f"blob size must be a non-negative integer, got {size!r}")
    return size


def _read_limited(resp: requests.Response, limit: int, what: str, *, decode: bool) -> bytes:
    """A whole (small) body, at most ``limit`` bytes; :class:`_Transient` if the connection breaks."""
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > limit:
        raise InvalidDocument(f"{what} is {length} bytes, over the {limit} byte limit")
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in resp.raw.stream(1 * MiB, decode_content=decode):
            total += len(chunk)
            if total > limit:
                raise InvalidDocument(f"{what} is over the {limit} byte limit")
            parts.append(chunk)
    except _TRANSIENT as e:
        raise _Transient(_one_line(str(e) or type(e).__name__)) from e
    if length.isdigit() and not decode and total != int(length):
        raise _Transient(f"got {total} of {length} bytes")
    return b"".join(parts)


def _error_detail(resp: requests.Response) -> str:
    """``": CODE: message"`` from an OCI error body, or "" (reads a bounded amount, closes the response)."""
    try:
        data = resp.raw.read(_ERROR_BODY_LIMIT, decode_content=True) if resp.request.method != "HEAD" else b""
    except Exception:  # the body of an error is only a nicety
        data = b""
    finally:
        resp.close()
    try:
        doc: Any = json.loads(data) if data else None
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
        items = []
        for err in doc["errors"][:3]:
            if isinstance(err, dict):
                code, message = err.get("code"), err.get("message")
                items.append(": ".join(str(x) for x in (code, message) if x))
        text = "; ".join(i for i in items if i)
        return f": {_one_line(text)}" if text else ""
    return ""

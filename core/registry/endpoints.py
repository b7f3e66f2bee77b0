"""Where a reference is pulled from and pushed to: the ``[[registry]]`` tables of the configuration.

The rules follow containers' ``registries.conf`` (v2):

* The table whose ``prefix`` matches the reference's name (``domain/path``, without tag or digest) for the
  longest stretch applies. A prefix ``host``, ``host/namespace`` or ``host/repo`` matches the name itself
  and every name below it (``example.com/team`` matches ``example.com/team/app``, not
  ``example.com/teams``); ``*.example.com`` matches any name on a subdomain of ``example.com`` (any port).
  A reference no table matches is reached at its own domain.
* ``location`` replaces the matched prefix: with ``prefix = "example.com/team"`` and ``location =
  "registry.internal:5000/mirrored"``, ``example.com/team/app:1`` is ``registry.internal:5000/mirrored/app:1``
  on the wire. A wildcard table without a location keeps the reference's own domain.
* ``blocked = true`` refuses pulls and pushes of matching references (:class:`RegistryBlocked`).
* Pulls try the table's mirrors in order (each rewriting the prefix to its own location), then the location;
  a mirror with ``pull_from_mirror = "digest-only"`` serves only pulls by digest, ``"tag-only"`` only pulls
  by tag. The endpoint that served the image's (top) manifest serves its config and layers; a blob it lacks
  is asked of the endpoints after it. A mirror that fails (cannot be reached, 404, 5xx, refuses access,
  sends something that does not verify) is passed over for the next endpoint; content is verified against
  its digest whoever serves it. A blob whose bytes turn out wrong only once they have all been read (a
  config, a layer streamed into the driver or the content store) is fetched again, whole, from the
  endpoints after the one that served it (:meth:`EndpointChain.reject_blob`); the source's own bad bytes
  fail the pull. A manifest asked for by tag has no digest to check (it is trusted as served, as
  containers/image does); one asked for by digest must match it. Pushes go to the location only.
* ``insecure = true`` (on a table for its location, on a mirror for the mirror) allows plain HTTP there, as
  ``[images] insecure_registries`` does. Credentials are looked up for each endpoint's host; credentials given
  for the pull or push (``--creds``) go to the location only.

The image keeps the names it was asked for, whichever endpoint served it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lamina.config import Config, RegistrySettings
from lamina.errors import DigestMismatch, InvalidDocument, InvalidReference, LaminaError
from lamina.formats import oci
from lamina.formats.reference import Reference
from lamina.registry.client import RegistryError

log = logging.getLogger("lamina.registry.endpoints")

T = TypeVar("T")

#: How often a mirror is asked (retries included) before the next endpoint is tried.
MIRROR_ATTEMPTS = 2


class RegistryBlocked(RegistryError):
    """The configuration blocks the registry a reference names."""


@dataclass(frozen=True)
class Endpoint:
    """One place to reach an image: the reference as that registry knows it."""

    ref: Reference  # domain = the endpoint's host, path = the repository there
    insecure: bool = False  # the [[registry]] or mirror table allows plain HTTP
    mirror: bool = False

    @property
    def host(self) -> str:
        return self.ref.domain

    @property
    def repo(self) -> str:
        return self.ref.path

    def __str__(self) -> str:
        return f"{'mirror' if self.mirror else 'source'} {self.ref.name}"


def _match_length(prefix: str, ref: Reference) -> int:
    """How much of ``ref.name`` the prefix covers, or -1 when it does not match."""
    name = ref.name
    if prefix.startswith("*."):
        host = ref.domain.rsplit(":", 1)[0] if not ref.domain.endswith("]") else ref.domain
        return len(ref.domain) if host.endswith(prefix[1:]) else -1
    if name == prefix or name.startswith(prefix + "/"):
        return len(prefix)
    return -1


def find_settings(config: Config, ref: Reference) -> tuple[RegistrySettings, int] | None:
    """The ``[[registry]]`` table for ``ref`` (the longest matching prefix) and how much of its name matched."""
    best: tuple[RegistrySettings, int] | None = None
    for table in config.registry.per_registry:
        length = _match_length(table.prefix, ref)
        if length >= 0 and (best is None or len(table.prefix) > len(best[0].prefix)):
            best = (table, length)
    return best


def _rewrite(location: str, ref: Reference, matched: int) -> Reference:
    """``ref`` with its first ``matched`` characters of name replaced by ``location``."""
    if not location:
        return ref
    name = location + ref.name[matched:]
    host, _, repo = name.partition("/")
    try:
        return Reference(host, repo, ref.tag, ref.digest)
    except InvalidReference as e:
        raise RegistryError(f"the registry location {location!r} makes no valid reference of {ref}: {e.message}") \
            from None


def _blocked(table: RegistrySettings, ref: Reference, action: str) -> RegistryBlocked:
    return RegistryBlocked(f"cannot {action} {ref}: the registry {table.prefix} is blocked in the configuration")


def push_endpoint(config: Config, ref: Reference) -> Endpoint:
    """Where a push of ``ref`` goes: the location of its table (never a mirror)."""
    found = find_settings(config, ref)
    if found is None:
        return Endpoint(ref)
    table, matched = found
    if table.blocked:
        raise _blocked(table, ref, "push")
    return Endpoint(_rewrite(table.location, ref, matched), insecure=table.insecure)


def pull_endpoints(config: Config, ref: Reference) -> list[Endpoint]:
    """Where a pull of ``ref`` looks, in order: the mirrors that serve this kind of pull, then the location."""
    found = find_settings(config, ref)
    if found is None:
        return [Endpoint(ref)]
    table, matched = found
    if table.blocked:
        raise _blocked(table, ref, "pull")
    skip = "tag-only" if ref.digest is not None else "digest-only"
    out = [
        Endpoint(_rewrite(m.location, ref, matched), insecure=m.insecure, mirror=True)
        for m in table.mirrors
        if m.pull_from_mirror != skip
    ]
    out.append(Endpoint(_rewrite(table.location, ref, matched), insecure=table.insecure))
    return out


def mount_sources(config: Config, host: str, domain: str, repos: list[str]) -> list[str]:
    """The repositories ``repos`` (named on ``domain``) as they are called on ``host``, for those the
    configuration puts there (the candidates a push may mount blobs from)."""
    out: list[str] = []
    for repo in repos:
        try:
            endpoint = push_endpoint(config, Reference(domain, repo))
        except LaminaError:
            continue
        if endpoint.host == host and endpoint.repo not in out:
            out.append(endpoint.repo)
    return out


# Failures after which the next endpoint is tried.
_FALL_THROUGH = (RegistryError, DigestMismatch, InvalidDocument)


class EndpointChain:
    """The endpoints of one pull, used like a :class:`~lamina.registry.client.RegistryClient` by
    :func:`lamina.registry.remote.read_remote` (``repo`` is the reference's repository; each endpoint reads
    its own). The first manifest fixes the endpoint the rest of the image comes from; every request then
    tries that endpoint and, when it fails, the ones after it. Thread-safe (a pull fetches layers
    concurrently)."""

    def __init__(self, ref: Reference, endpoints: list[Endpoint], connect: Callable[[Endpoint], Any]) -> None:
        if not endpoints:
            raise RegistryError(f"no endpoint to pull {ref} from")
        self.ref = ref
        self.endpoints = endpoints
        self._connect = connect
        self._clients: dict[int, Any] = {}
        self._start: int | None = None  # the endpoint that served the first manifest
        self._blob_from: dict[str, int] = {}  # blobs an endpoint served wrong: the first endpoint left to ask
        self._blob_served: dict[str, int] = {}  # the endpoint that served the first bytes of a blob's last fetch
        self._lock = threading.Lock()

    def __enter__(self) -> EndpointChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def _client(self, index: int) -> Any:
        with self._lock:
            client = self._clients.get(index)
            if client is None:
                client = self._clients[index] = self._connect(self.endpoints[index])
            return client

    def _check(self, repo: str) -> None:
        if repo != self.ref.path:
            raise RegistryError(f"this pull reads {self.ref.path}, not {repo}")

    def _first(self, what: str, call: Callable[[Any, Endpoint], T], start: int | None = None) -> tuple[int, T]:
        start = (self._start or 0) if start is None else start
        failures: list[str] = []
        last = len(self.endpoints) - 1
        for index in range(start, len(self.endpoints)):
            endpoint = self.endpoints[index]
            try:
                return index, call(self._client(index), endpoint)
            except _FALL_THROUGH as e:
                if index == last:
                    if failures:
                        raise _with_note(e, "; ".join(failures)) from e
                    raise
                log.debug("%s: %s from %s failed (%s); trying %s", self.ref, what, endpoint, e,
                          self.endpoints[index + 1])
                failures.append(f"{endpoint}: {e}")
        raise AssertionError("unreachable")

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        self._check(repo)
        index, found = self._first(f"manifest {reference}", lambda c, ep: c.get_manifest(ep.repo, reference))
        result: tuple[bytes, str, str] = found
        if self._start is None:
            self._start = index
        log.debug("%s: manifest %s from %s", self.ref, result[2], self.endpoints[index])
        return result

    def _blob_start(self, digest: str) -> int:
        with self._lock:
            return max(self._start or 0, self._blob_from.get(digest, 0))

    def _served(self, digest: str, index: int) -> None:
        with self._lock:
            self._blob_served[digest] = index

    def open_blob(self, repo: str, digest: str, size: int) -> Any:
        self._check(repo)
        index, reader = self._first(f"blob {digest}", lambda c, ep: c.open_blob(ep.repo, digest, size),
                                    self._blob_start(digest))
        self._served(digest, index)
        log.debug("%s: blob %s from %s", self.ref, digest, self.endpoints[index])
        return reader

    def reject_blob(self, digest: str, error: LaminaError) -> bool:
        """The bytes of ``digest`` as last fetched did not verify (``error``: wrong digest or size, or a
        layer that would not apply from them): the endpoint that began serving them is not asked for this
        blob again. True when an endpoint after it is left (the caller drops what it has of the blob and
        fetches it again, whole); False when that was the last (the caller raises ``error``)."""
        with self._lock:
            index = self._blob_served.get(digest)
            if index is None or index >= len(self.endpoints) - 1:
                return False
            self._blob_from[digest] = max(self._blob_from.get(digest, 0), index + 1)
        log.debug("%s: blob %s from %s did not verify (%s); fetching it again from %s", self.ref, digest,
                  self.endpoints[index], error.message, self.endpoints[index + 1])
        return True

    def open_blob_at(self, repo: str, digest: str, size: int, offset: int) -> Any:
        """A blob's bytes from ``offset`` on, unverified (the caller hashes the whole blob): the bytes before
        may have come from another endpoint."""
        self._check(repo)
        return _CarriedOn(self, digest, size, offset)

    def _open_at(self, digest: str, size: int, offset: int, start: int | None = None) -> tuple[int, Any]:
        index, stream = self._first(f"blob {digest}", lambda c, ep: c.open_blob_at(ep.repo, digest, size, offset),
                                    start)
        log.debug("%s: blob %s from %s%s", self.ref, digest, self.endpoints[index],
                  f" (bytes {offset}- of {size})" if offset else "")
        return index, stream

    def open_blob_urls(self, desc: oci.Descriptor) -> Any:
        reader = self._client(self._start or 0).open_blob_urls(desc)
        log.debug("%s: blob %s from its URLs", self.ref, desc.digest)
        return reader


class _CarriedOn:
    """A blob's raw bytes from an offset on, from the endpoints of a chain in turn: where one breaks off for
    good (its own retries with ``Range`` spent), the next carries on from the byte it stopped at. The bytes
    are unverified here; the reader hashes the whole blob, whoever served each part."""

    def __init__(self, chain: EndpointChain, digest: str, size: int, offset: int) -> None:
        self._chain = chain
        self._digest = digest
        self._size = size
        self._offset = offset
        self._index, self._stream = chain._open_at(digest, size, offset, chain._blob_start(digest))
        chain._served(digest, self._index)

    def read(self, n: int = -1, /) -> bytes:
        while True:
            try:
                data: bytes = self._stream.read(n)
            except _FALL_THROUGH as e:
                if self._index >= len(self._chain.endpoints) - 1:
                    raise
                log.debug("%s: blob %s from %s broke off at byte %d (%s); carrying on from %s", self._chain.ref,
                          self._digest, self._chain.endpoints[self._index], self._offset, e,
                          self._chain.endpoints[self._index + 1])
                self.close()
                self._index, self._stream = self._chain._open_at(self._digest, self._size, self._offset,
                                                                 self._index + 1)
                continue
            self._offset += len(data)
            return data

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def _with_note(error: LaminaError, note: str) -> LaminaError:
    """``error`` saying which mirrors failed before it (same class when it can be made so)."""
    message = f"{error.message} (mirrors tried first: {note})"
    try:
        return type(error)(message)
    except TypeError:
        return RegistryError(message)

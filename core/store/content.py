"""The content store: blobs kept byte-exact under their digest.

Manifests, indexes, configs and (unless ``keep_layer_blobs = false``) compressed layer blobs live at
``<root>/content/blobs/sha256/<hex>`` exactly as they were received, so saving an image reproduces every
digest. A blob is written to ``content/ingest/`` first, hashed and sized while it streams, and renamed
into place only when it matches what the caller expected: a blob that is visible is always whole and
correct, whenever the writing process is killed. (Like layer contents, blobs are not fsynced: the store
survives killed processes; a power cut may need the blob loaded again.)

Which blobs are alive is decided in the store database: images refer to blobs (``image_blobs``), and a
process that is writing (or reading) blobs for an image not yet committed holds them in a *lease*
(``lease_blobs``; see :mod:`lamina.store.leases`). :meth:`ContentStore.gc` removes every blob file that
no image refers to and no live lease holds; leases of dead processes are ended by the store's recovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from lamina.digest import Digest, parse_digest
from lamina.errors import BlobNotFound, DigestMismatch, write_failure
from lamina.tar.compression import CHUNK, Readable, VerifyingReader, read_verified


class ContentStore:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root / "content"
        self.blobs = self.root / "blobs"
        self.ingest = self.root / "ingest"
        self.read_only = read_only  # its filesystem takes no writes: nothing is made or cleaned
        if read_only:
            return
        try:
            for d in (self.root, self.blobs, self.blobs / "sha256", self.ingest):
                d.mkdir(exist_ok=True, mode=0o700)
        except OSError as e:
            raise write_failure(e, f"creating the content store at {self.root}") from e

    def path(self, digest: str) -> Path:
        algo, hexpart = parse_digest(digest).split(":", 1)
        return self.blobs / algo / hexpart

    def place(self, tmp: Path, digest: str) -> None:
        """Rename a finished ingest file into place (its algorithm's directory made on first use)."""
        dest = self.path(digest)
        dest.parent.mkdir(exist_ok=True, mode=0o700)
        os.rename(tmp, dest)

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the content store") from None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the content store") from None

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, parse_digest(digest))

    def put(self, data: bytes, digest: str) -> None:
        """Store a small blob whose digest the caller has already checked (or computed)."""
        if self.exists(digest):
            return
        with self.writer(digest) as w:
            w.write(data)
            w.commit()

    def copy_in(self, src: Readable, digest: str, size: int, what: str) -> None:
        """Stream a blob into the store, verifying it."""
        if self.exists(digest):
            return
        with self.writer(digest) as w:
            reader = VerifyingReader(src, digest, size, what, tee=w.file)
            while reader.read(CHUNK):
                pass
            reader.finish()
            w.commit()

    def put_stream(self, chunks: Iterable[bytes], before_commit: Callable[[str], None]) -> tuple[str, int]:
        """Store a stream whose digest is not known in advance; returns (digest, size).

        ``before_commit(digest)`` runs just before the blob becomes visible (to lease it).
        """
        h = hashlib.sha256()
        size = 0
        tmp = self.ingest / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                for c in chunks:
                    h.update(c)
                    size += len(c)
                    f.write(c)
                f.flush()
            digest = "sha256:" + h.hexdigest()
            before_commit(digest)
            self.place(tmp, digest)
        except OSError as e:
            raise write_failure(e, "storing a blob in the content store") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return digest, size

    def walk(self) -> Iterator[Digest]:
        if not self.blobs.is_dir():
            return
        for algo_dir in self.blobs.iterdir():
            if not algo_dir.is_dir():
                continue
            for f in algo_dir.iterdir():
                yield Digest(f"{algo_dir.name}:{f.name}")

    def gc(self, alive: Iterable[str], candidates: Iterable[str] | None = None) -> list[str]:
        """Delete every blob (of ``candidates``, default all) not in ``alive``; return the digests removed."""
        keep = set(alive)
        removed: list[str] = []
        for d in list(self.walk()) if candidates is None else list(candidates):
            if d not in keep:
                try:
                    self.path(d).unlink()
                except FileNotFoundError:
                    continue
                removed.append(d)
        return removed

    def clean_ingest(self, alive: Callable[[int], bool]) -> int:
        """Remove partial writes of processes that are gone (files are named ``<pid>-<random>``); returns
        how many went."""
        if self.read_only:
            return 0
        n = 0
        for f in self.ingest.iterdir():
            pid = f.name.split("-", 1)[0]
            if not pid.isdigit() or not alive(int(pid)):
                f.unlink(missing_ok=True)
                n += 1
        return n

    def matches(self, digest: str) -> bool:
        """Whether a stored blob's bytes still hash to its digest (False when it is gone)."""
        algo, hexpart = parse_digest(digest).split(":", 1)
        h = hashlib.new(algo)
        try:
            with open(self.path(digest), "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            return False
        return h.hexdigest() == hexpart

    def discard(self, name: str) -> None:
        """Remove a file of the blob area by the name :meth:`walk` gave it (``algo:rest``), digest or not."""
        algo, _, rest = name.partition(":")
        if algo and rest and "/" not in name and not algo.startswith(".") and not rest.startswith("."):
            (self.blobs / algo / rest).unlink(missing_ok=True)


class BlobWriter:
    """A blob being written: ``with store.writer(d) as w: w.write(...); w.commit()``.

    Leaving the block without :meth:`commit` removes the partial file.
    """

    def __init__(self, store: ContentStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self._tmp = store.ingest / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.file: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit() or __exit__
        except OSError as e:
            raise write_failure(e, f"storing blob {digest}") from e
        self._committed = False

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as e:
            raise write_failure(e, f"storing blob {self.digest}") from e

    def commit(self) -> None:
        try:
            self.file.close()
            self._store.place(self._tmp, self.digest)
        except OSError as e:
            raise write_failure(e, f"storing blob {self.digest}") from e
        self._committed = True

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            with contextlib.suppress(OSError):  # a full disk fails the close's flush too: the file goes anyway
                self.file.close()
            self._tmp.unlink(missing_ok=True)


__all__ = [
    "BlobWriter",
    "ContentStore",
    "DigestMismatch",
    "VerifyingReader",
    "read_verified",
]

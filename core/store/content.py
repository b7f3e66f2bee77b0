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
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from lamina.digest import Digest, parse_digest
from lamina.errors import ArchiveError, BlobNotFound, DigestError, DigestMismatch, write_failure

if TYPE_CHECKING:
    from lamina.tar.compression import Readable


class ContentStore:
    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root / "content"
        self.blobs = self.root / "blobs"
        self.ingest = self.root / "ingest"
        self.partial = self.root / "partial"  # downloads in progress, or cut short: see Download
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

    def stored_size(self, digest: str) -> int | None:
        """A stored blob's size; None when it is not there (or ``digest`` names no blob at all)."""
        try:
            return os.stat(self.path(digest)).st_size
        except (OSError, DigestError):
            return None

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is not in the content store") from None

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def download(self, digest: str, size: int, what: str, open_at: Callable[[int], Readable]) -> Download:
        """A fetch of a blob that happens once however many want it (:class:`Download`)."""
        return Download(self, digest, size, what, open_at)

    def drop_partials(self) -> dict[str, int]:
        """Remove the partial downloads no process is carrying on (``system prune``); returns each one's
        digest and size."""
        out: dict[str, int] = {}
        if self.read_only or not self.partial.is_dir():
            return out
        for entry in os.scandir(self.partial):
            if entry.name.endswith(".lock"):
                continue
            lock = self.partial / f"{entry.name}.lock"
            try:
                fd = _lock_current(lock, None)
            except OSError:
                continue
            if fd is None:
                continue  # being fetched
            try:
                size = entry.stat().st_size
                os.unlink(entry.path)
                os.unlink(lock)
                out[entry.name.replace("-", ":", 1)] = size
            except OSError:  # finished meanwhile: the lock file held here is nobody's
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                continue
            finally:
                os.close(fd)
        return out

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
        from lamina.tar.compression import CHUNK, VerifyingReader

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
        import hashlib  # here: opening the store loads no OpenSSL

        h = hashlib.sha256()
        size = 0
        tmp = self.ingest / f"{os.getpid()}-{os.urandom(8).hex()}"
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
                except (FileNotFoundError, DigestError):  # gone, or no blob's name (system check reports it)
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
        import hashlib

        from lamina.tar.compression import CHUNK

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


class Download:
    """A blob fetched into the content store once, however many processes (or threads) want it at the same
    time, and resumed from what an interrupted fetch left.

    ``content/partial/<algo>-<hex>`` holds the bytes received so far and ``<algo>-<hex>.lock`` is its
    ``flock``: the holder fetches, the others wait (:meth:`acquire`) and then find the blob in place, or,
    when the holder died or failed, carry on from its partial file. Reading replays that file's bytes
    first (hashing them again: the digest covers the whole blob), then asks ``open_at(offset)`` for the
    rest (a registry's ``Range``), appending it; the blob is renamed into place when its last byte has
    been read and the whole hashes to the digest. A partial file whose bytes turn out wrong goes (its lock
    file too), so the next attempt starts over. The kernel drops the lock of a process killed at any point.

    Use it as a context manager after :meth:`acquire`; :attr:`complete` says whether the blob was already
    there (reading then serves the stored file).
    """

    def __init__(self, store: ContentStore, digest: str, size: int, what: str,
                 open_at: Callable[[int], Readable]) -> None:
        self.store = store
        self.digest = parse_digest(digest)
        self.size = size
        self.what = what
        self._open_at = open_at
        name = self.digest.replace(":", "-")
        self._part = store.partial / name
        self._lock = store.partial / f"{name}.lock"
        self._lock_fd: int | None = None
        self._src: Readable | BinaryIO | None = None
        self._out: BinaryIO | None = None
        self._replay = 0  # bytes of the partial file still to replay
        self._left = size
        import hashlib

        self._hash = hashlib.new(self.digest.split(":", 1)[0])
        self.complete = False
        self.resumed_at = 0
        self._dropped = False  # the partial file went (its bytes were wrong): nothing to carry on from

    def acquire(self, cancel: threading.Event | None = None) -> bool:
        """Wait until this process may fetch the blob (False if ``cancel`` was set meanwhile)."""
        try:
            self.store.partial.mkdir(exist_ok=True, mode=0o700)
            fd = _lock_current(self._lock, cancel if cancel is not None else threading.Event())
            if fd is None:
                return False
            self.complete = self.store.exists(self.digest)
            self._lock_fd = fd
            return True
        except OSError as e:
            raise write_failure(e, f"fetching {self.what}") from e

    def __enter__(self) -> Download:
        if self._lock_fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self.complete:
            self._src = self.store.open(self.digest)
            return
        try:
            have = os.stat(self._part).st_size
        except FileNotFoundError:
            have = 0
        try:
            if have > self.size:
                os.truncate(self._part, 0)
                have = 0
            self._out = open(self._part, "ab")  # noqa: SIM115 - closed by close()
            self._src = open(self._part, "rb") if have else None  # noqa: SIM115
        except OSError as e:
            raise write_failure(e, f"fetching {self.what}") from e
        self._replay = self.resumed_at = have

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; fewer only at the blob's end (a reader sniffing a format's magic gets them
        whole, even where the partial file's bytes end and the registry's begin)."""
        if self._src is None and self._out is None:
            self._start()
        if self.complete:
            assert self._src is not None
            return self._src.read(n)
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._read(want)
        while data and len(data) < want and self._left > 0:
            data += self._read(want - len(data))
        return data

    def _read(self, want: int) -> bytes:
        if self._left <= 0:
            return b""
        if self._replay:
            assert self._src is not None
            data = self._src.read(min(want, self._replay))
            if not data:
                raise ArchiveError(f"the partial download of {self.what} shrank while it was read")
            self._replay -= len(data)
            if not self._replay:
                getattr(self._src, "close", lambda: None)()
                self._src = None
        else:
            if self._src is None:
                self._src = self._open_at(self.size - self._left)
            data = self._src.read(want)
            if not data:
                raise ArchiveError(f"{self.what} is truncated: {self._left} of {self.size} bytes missing")
            assert self._out is not None
            try:
                self._out.write(data)
            except OSError as e:
                raise write_failure(e, f"storing {self.what}") from e
        self._left -= len(data)
        self._hash.update(data)
        if self._left == 0:
            self._finish()
        return data

    def _finish(self) -> None:
        assert self._out is not None
        try:
            self._out.close()
            if self._hash.hexdigest() != self.digest.split(":", 1)[1]:
                self._part.unlink(missing_ok=True)
                self._dropped = True
                raise DigestMismatch(
                    f"{self.what} does not match its digest"
                    + (f" (resumed at byte {self.resumed_at}; the partial download was dropped)"
                       if self.resumed_at else "")
                )
            self.store.place(self._part, self.digest)
        except OSError as e:
            raise write_failure(e, f"storing {self.what}") from e
        self.complete = True

    def drop(self) -> None:
        """Forget the bytes received so far: what they fed failed in a way the network did not cause (a tar
        that does not apply, a digest that does not match), so they are not worth resuming from."""
        self.close_files()
        if not self.complete:
            with contextlib.suppress(OSError):
                self._part.unlink()
            self._dropped = True

    def fetch(self) -> None:
        """Read the whole blob into the store (nothing when it is there already)."""
        if self.complete:
            return
        from lamina.tar.compression import CHUNK

        while self.read(CHUNK):
            pass

    def close_files(self) -> None:
        for f in (self._src, self._out):
            close = getattr(f, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        self._src = self._out = None

    def close(self) -> None:
        self.close_files()
        if self._lock_fd is not None:
            if self.complete or self._dropped:  # nobody needs that lock file again: later comers find the blob,
                # or start afresh (one waiting for this lock takes a new one, as acquire() does)
                with contextlib.suppress(OSError):
                    os.unlink(self._lock)
            os.close(self._lock_fd)
            self._lock_fd = None


class BlobWriter:
    """A blob being written: ``with store.writer(d) as w: w.write(...); w.commit()``.

    Leaving the block without :meth:`commit` removes the partial file.
    """

    def __init__(self, store: ContentStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self._tmp = store.ingest / f"{os.getpid()}-{os.urandom(8).hex()}"
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


def _lock_current(path: Path, wait: threading.Event | None) -> int | None:
    """An fd holding the exclusive flock of the lock file at ``path`` as it is when the lock is taken (a
    lock file that a finished fetch removed meanwhile is let go and the current one taken). Without
    ``wait``, None if another process holds it; with it, wait until it is free, or None once ``wait`` is set."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if wait is None or wait.is_set():
                    os.close(fd)
                    return None
                time.sleep(0.05)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


__all__ = ["BlobWriter", "ContentStore", "DigestMismatch"]

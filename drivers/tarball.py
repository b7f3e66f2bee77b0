"""tarball: layers kept only as their archives.

Each layer is its uncompressed tar stream, stored byte for byte as it was read (so its sha256 is the
DiffID), plus a listing of its entries. Nothing is ever unpacked: the driver cannot mount and has no
read-write layers. Use it for CI caches and mirrors, where layers are only stored and streamed back.

On-disk layout under the driver's home: ``layers/<cache-id>.tar`` (the stream) and
``layers/<cache-id>.paths`` (NUL-separated paths of the layer's full tree, parents included, each after
a letter for its kind -- ``d`` directory, ``l`` symlink, ``f`` anything else -- behind a first record
``\x01kinds``; listings written before kinds were kept have bare paths). Entries are judged against it as
the apply engine judges them against a tree: a hard link must point at something there and not at a
directory, an entry cannot go below a file; changes tell additions from modifications with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lamina.driver import ByteStream, Capabilities, Change, Driver, DriverRegistry, existing_ancestor
from lamina.errors import ArchiveError, DriverUnsupported, LayerNotFound, OperationUnsupported, UnsafePathError, shown
from lamina.fs.apply import check_entry
from lamina.fs.ops import normalize
from lamina.plugins.hookspecs import hookimpl
from lamina.tar import whiteout
from lamina.tar.compression import DiffStream
from lamina.tar.format import DIR, LNK, SYM, Entry
from lamina.tar.split import ExactTarStream

CANNOT_MOUNT = "tarball driver cannot mount; use vfs or overlay"
_KINDS = b"\x01kinds"  # the first record of a listing that gives each path's kind


class _Tree:
    """The merged tree a layer's entries build, as paths and kinds: what lets the tarball driver refuse
    what the apply engine refuses on a tree without writing one. A path reached through a symlink (or
    through one whose kind an old listing did not keep) is not resolved: such entries are not judged."""

    def __init__(self, kinds: dict[str, str]) -> None:
        self.kinds = kinds
        self.mine: set[str] = set()  # paths this layer put in the tree
        self.sound: set[str] = set()  # directories whose ancestors are all directories

    def _blocker(self, head: str) -> tuple[str, str] | None:
        """The first path above and at ``head`` that is not a directory, with its kind, if any (paths missing
        from the tree are directories to be made)."""
        chain = []
        p = head
        while p and p not in self.sound:
            chain.append(p)
            p = p.rpartition("/")[0]
        for q in reversed(chain):
            k = self.kinds.get(q)
            if k is None:
                break
            if k != "d":
                return q, k
            self.sound.add(q)
        return None

    def _below(self, e: Entry, head: str) -> bool:
        """Whether ``head`` is a plain directory chain; refuses a chain through a file, as apply does."""
        blocker = self._blocker(head)
        if blocker is None:
            return True
        if blocker[1] == "f":
            raise ArchiveError(f"cannot apply {shown(e.name)}: {shown(blocker[0])} is not a directory")
        return False  # through a symlink: apply resolves it, this listing cannot

    def _remove_below(self, prefix: str, keep_mine: bool = False) -> None:
        """Paths starting with ``prefix`` (all for ``""``) leave the tree; with ``keep_mine``, except those
        this layer put there."""
        self.kinds = {p: k for p, k in self.kinds.items()
                      if not p.startswith(prefix) or (keep_mine and p in self.mine)}
        self.sound.clear()

    def add(self, e: Entry) -> None:
        path = check_entry(e)
        head, _, base = path.rpartition("/")
        self._below(e, head)
        if whiteout.is_whiteout(base):
            target = whiteout.target_of(base, e.name)
            prefix = f"{head}/" if head else ""
            if target is None:
                self._remove_below(prefix, keep_mine=True)
            elif not base.startswith(whiteout.META_PREFIX):
                self.kinds.pop(prefix + target, None)
                self._remove_below(f"{prefix}{target}/")
            return
        if path == "":
            return
        kind = "d" if e.type == DIR else "l" if e.type == SYM else "f"
        if e.type == LNK:
            target = normalize(e.linkname)
            thead = target.rpartition("/")[0]
            try:
                reachable = self._below(e, thead)
            except ArchiveError:
                raise ArchiveError(f"hard link {shown(e.name)} points at missing {shown(e.linkname)}") from None
            if reachable:
                tkind = self.kinds.get(target)
                if tkind is None:
                    raise ArchiveError(f"hard link {shown(e.name)} points at missing {shown(e.linkname)}")
                if tkind == "d":
                    raise UnsafePathError(f"hard link {shown(e.name)} points at a directory")
                kind = tkind
        old = self.kinds.get(path)
        if old == "d" and kind != "d":
            self._remove_below(path + "/")
        elif old is not None and old != "d" and kind == "d":
            self.sound.discard(path)
        # The entry and its parents join both the tree and this layer's paths; both hold every parent of
        # what they hold, so the climb stops at the first one already in both (one step for an entry of
        # a deep tree listed in order).
        self.kinds[path] = kind
        self.mine.add(path)
        p = head
        while p and not (p in self.kinds and p in self.mine):
            self.kinds.setdefault(p, "d")
            self.mine.add(p)
            p = p.rpartition("/")[0]


class _Tee:
    """Writes every chunk of the stream to the archive file as the listing reader consumes it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def raw(self, data: bytes | memoryview) -> None:
        self.out.write(data)

    def file(self, path: str, size: int) -> None:  # payloads are written by the applier loop
        pass

    def sparse_file(self, path: str, segments: Sequence[tuple[int, int]]) -> None:
        pass


class TarballDriver(Driver):
    name = "tarball"
    description = "layers stored only as their tar archives; cannot mount (CI caches, mirrors)"

    def __init__(self, home: Path, runhome: Path, options: Mapping[str, Any]) -> None:
        super().__init__(home, runhome, options)
        self.layers = home / "layers"
        self.layers.mkdir(exist_ok=True)

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, Any]) -> None:
        if options:
            raise DriverUnsupported(f"unknown tarball option(s): {', '.join(sorted(options))}")
        base = existing_ancestor(home)
        if not os.access(base, os.W_OK):
            raise DriverUnsupported(f"{base} is not writable")

    def _tar(self, layer_id: str) -> Path:
        if not layer_id or "/" in layer_id or layer_id.startswith("."):
            raise LayerNotFound(f"bad layer id {shown(layer_id)}")
        return self.layers / f"{layer_id}.tar"

    @hookimpl
    def lamina_capabilities(self) -> Capabilities:
        return Capabilities(can_mount=False, native_diff=True, exact_tar=True, supports_rw_layers=False,
                            keeps_stream=True)

    @hookimpl
    def lamina_status(self) -> list[tuple[str, str]]:
        return [("Layers on disk", str(sum(1 for e in os.scandir(self.layers) if e.name.endswith(".tar"))))]

    @hookimpl
    def lamina_metadata(self, layer_id: str) -> dict[str, str]:
        return {"archive": str(self._tar(layer_id))}

    @hookimpl
    def lamina_create(self, layer_id: str, parent: str | None, rw: bool) -> bool:
        if rw:
            raise OperationUnsupported("tarball driver has no read-write layers; use vfs or overlay")
        with open(self._tar(layer_id), "xb"):
            pass
        return True

    def _listing(self, layer_id: str) -> Path:
        return self.layers / f"{layer_id}.paths"

    def _tree(self, layer_id: str | None) -> dict[str, str]:
        """Every path of a layer's full tree (parents included) and its kind (``d``, ``l``, ``f``, or ``?``
        from a listing that kept none), from its listing file."""
        if layer_id is None:
            return {}
        records = self._listing(layer_id).read_bytes().split(b"\0")
        if records[0] != _KINDS:
            return {p.decode("utf-8", "surrogateescape"): "?" for p in records if p}
        return {p[1:].decode("utf-8", "surrogateescape"): chr(p[0]) for p in records[1:] if p}

    @hookimpl
    def lamina_apply_diff(self, layer_id: str, parent: str | None, diff: DiffStream) -> int:
        # Judge the archive while storing it: the one tar reader (every header rule) and the apply
        # engine's entry rules, as on every driver; tracking the merged tree (kinds included) so hard
        # links can only point at what exists in it, and nothing is written below a file. Nothing is
        # unpacked.
        from lamina.tar.format import TarReader

        tree = _Tree(self._tree(parent))
        size = 0
        with open(self._tar(layer_id), "wb") as out:
            reader = TarReader(diff, _Tee(out))
            while (e := reader.next()) is not None:
                tree.add(e)
                for chunk in reader.payload_chunks():
                    out.write(chunk)
                size += e.size
            diff.drain(out.write)
            out.flush()
            os.fsync(out.fileno())
        self._listing(layer_id).write_bytes(b"\0".join(
            [_KINDS, *(k.encode() + p.encode("utf-8", "surrogateescape") for p, k in sorted(tree.kinds.items()))]))
        return size

    @hookimpl
    def lamina_mount(self, layer_id: str, options: list[str]) -> str:
        raise OperationUnsupported(CANNOT_MOUNT)

    @hookimpl
    def lamina_unmount(self, layer_id: str) -> bool:
        raise OperationUnsupported(CANNOT_MOUNT)

    @hookimpl
    def lamina_changes(self, layer_id: str, parent: str | None) -> list[Change]:
        from lamina.fs.ops import normalize
        from lamina.tar.compression import DiffStream as _DS
        from lamina.tar.format import TarReader

        before = self._tree(parent)
        out: dict[str, Change] = {}
        with open(self._tar(layer_id), "rb") as f:
            reader = TarReader(_DS(f))
            while (e := reader.next()) is not None:
                path = normalize(e.name)
                head, _, base = path.rpartition("/")
                if base == whiteout.OPAQUE:
                    continue
                if whiteout.is_whiteout(base):
                    p = (f"{head}/" if head else "") + base[len(whiteout.PREFIX):]
                    out[p] = Change("/" + p, "D")
                elif path:
                    out[path] = Change("/" + path, "C" if path in before else "A")
        return sorted(out.values())

    @hookimpl
    def lamina_diff(self, layer_id: str, parent: str | None) -> ByteStream:
        return self.lamina_tar_stream(layer_id)

    @hookimpl
    def lamina_diff_size(self, layer_id: str, parent: str | None) -> int:
        from lamina.tar.compression import DiffStream as _DS
        from lamina.tar.format import TarReader

        total = 0
        with open(self._tar(layer_id), "rb") as f:
            reader = TarReader(_DS(f))
            while (e := reader.next()) is not None:
                total += e.size
        return total

    @hookimpl
    def lamina_tar_stream(self, layer_id: str) -> ByteStream:
        path = self._tar(layer_id)
        if not path.exists():
            raise LayerNotFound(f"tarball layer {layer_id} has no archive")

        def chunks() -> Any:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return ExactTarStream(chunks(), None)

    @hookimpl
    def lamina_exists(self, layer_id: str) -> bool:
        return self._tar(layer_id).exists()

    @hookimpl
    def lamina_layers(self) -> list[str]:
        return sorted({e.name.split(".", 1)[0] for e in os.scandir(self.layers) if not e.name.startswith(".")})

    @hookimpl
    def lamina_remove(self, layer_id: str) -> bool:
        self._tar(layer_id).unlink(missing_ok=True)
        self._listing(layer_id).unlink(missing_ok=True)
        return True

    @hookimpl
    def lamina_cleanup(self) -> bool:
        return True


@hookimpl
def lamina_register_drivers(registry: DriverRegistry) -> None:
    registry.add(TarballDriver)




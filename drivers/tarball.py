"""tarball: layers kept only as their archives.

Each layer is its uncompressed tar stream, stored byte for byte as it was read (so its sha256 is the
DiffID), plus a listing of its entries. Nothing is ever unpacked: the driver cannot mount and has no
read-write layers. Use it for CI caches and mirrors, where layers are only stored and streamed back.

On-disk layout under the driver's home: ``layers/<cache-id>.tar`` (the stream) and
``layers/<cache-id>.paths`` (NUL-separated paths of the layer's full tree, parents included, each after
a letter for its kind -- ``d`` directory, ``l`` symlink (then its target as the next record), ``f``
anything else -- behind a first record ``\x01kinds2``; listings written before kinds were kept have bare
paths). Entries are judged against it by :class:`lamina.fs.vtree.VirtualTree` with the apply engine's
tree rules (whiteouts first, names resolved through symlinks, no path through a file, hard links to
what exists and is no directory); changes tell additions from modifications with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lamina.driver import ByteStream, Capabilities, Change, Driver, DriverRegistry, Span, existing_ancestor
from lamina.errors import DriverUnsupported, LayerNotFound, OperationUnsupported, shown
from lamina.plugins.hookspecs import hookimpl
from lamina.tar import whiteout
from lamina.tar.compression import DiffStream
from lamina.tar.split import ExactTarStream

CANNOT_MOUNT = "tarball driver cannot mount; use vfs or overlay"
_KINDS = b"\x01kinds2"  # the first record of a listing that gives each path's kind (symlinks: then the target)


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
        if not self.read_only:
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

    def _tree(self, layer_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
        """Every path of a layer's full tree (parents included) with its kind (``d``, ``l``, ``f``, or ``?``
        from a listing that kept none), and the symlinks' targets, from its listing file."""
        if layer_id is None:
            return {}, {}
        records = self._listing(layer_id).read_bytes().split(b"\0")
        if records[0] != _KINDS:
            return {p.decode("utf-8", "surrogateescape"): "?" for p in records if p}, {}
        kinds: dict[str, str] = {}
        targets: dict[str, str] = {}
        it = iter(records[1:])
        for rec in it:
            if not rec:
                continue
            path = rec[1:].decode("utf-8", "surrogateescape")
            kinds[path] = chr(rec[0])
            if rec[0] == ord("l"):
                targets[path] = next(it, b"").decode("utf-8", "surrogateescape")
        return kinds, targets

    @hookimpl
    def lamina_apply_diff(self, layer_id: str, parent: str | None, diff: DiffStream) -> int:
        # Judge the archive while storing it: the one tar reader (every header rule) and the apply
        # engine's entry rules, as on every driver; tracking the merged tree (kinds included) so hard
        # links can only point at what exists in it, and nothing is written below a file. Nothing is
        # unpacked.
        from lamina.fs.apply import check_entry
        from lamina.fs.vtree import VirtualTree
        from lamina.tar.format import TarReader

        tree = VirtualTree(*self._tree(parent))
        size = 0
        with open(self._tar(layer_id), "wb") as out:
            reader = TarReader(diff, _Tee(out))
            while (e := reader.next()) is not None:
                tree.add(e, check_entry(e))
                for chunk in reader.payload_chunks():
                    out.write(chunk)
                size += e.size
            diff.drain(out.write)
            tree.finish()
            out.flush()
            os.fsync(out.fileno())
        records = [_KINDS]
        for p, k in sorted(tree.kinds.items()):
            records.append(k.encode() + p.encode("utf-8", "surrogateescape"))
            if k == "l":
                records.append(tree.targets.get(p, "").encode("utf-8", "surrogateescape"))
        self._listing(layer_id).write_bytes(b"\0".join(records))
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

        before, _ = self._tree(parent)
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
            with open(path, "rb") as f:  # the whole archive as one span: a copy into a file is the kernel's
                yield Span(f.fileno(), 0, os.fstat(f.fileno()).st_size, str(path))

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




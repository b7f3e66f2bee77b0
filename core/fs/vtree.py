"""A layer stack's merged tree as paths, kinds and symlink targets: the tree rules of the apply engine
judged without writing a tree (the tarball driver keeps layers as their archives).

It follows the same rules as :mod:`lamina.fs.apply` on a real tree: whiteouts and opaque markers act on
the layers below first, wherever they stand in the stream; the other entries are applied in order, their
directories resolved in the tree as it stands (symlinks followed inside the root, ``..`` stopping at
it); a path through a file, a hard link to a missing path or a directory, a symlink loop, and a
relative symlink leading out of the root from where it lands are refused, with the engine's words.

Kinds: ``d`` directory, ``l`` symlink, ``f`` anything else, ``?`` unknown (a listing that kept none:
what it would decide is let through).
"""

from __future__ import annotations

from typing import NamedTuple

from lamina.errors import ArchiveError, UnsafePathError, shown
from lamina.fs.ops import MAX_SYMLINK_HOPS, follow, normalize
from lamina.tar import whiteout
from lamina.tar.format import DIR, LNK, SYM, Entry


class _Op(NamedTuple):
    """What the tree rules need of an entry (not its xattrs or sparse map: a layer's worth is kept)."""

    name: str
    type: str
    linkname: str


class _Cross(Exception):
    """A path crosses a non-directory (``real``), or a symlink loop (``loop``)."""

    def __init__(self, real: str, loop: bool = False) -> None:
        self.real, self.loop = real, loop


class _Unknown(Exception):
    """A path crosses an entry of unknown kind: the rules cannot tell."""


class VirtualTree:
    def __init__(self, kinds: dict[str, str], targets: dict[str, str]) -> None:
        self.kinds = kinds
        self.targets = targets  # symlink path -> target
        self._dirs: set[str] = set()  # real paths of directories walks reached (dropped when any goes)
        self._ops: list[tuple[str, _Op]] = []

    # -- resolution --------------------------------------------------------------------------------------
    def _resolve(self, path: str, create: bool) -> str | None:
        """The real path of directory ``path``; None when missing (and not ``create``). A walk starts at
        the nearest directory above that an earlier walk reached (one step for a deep tree in order)."""
        if path in self._dirs:
            return path
        head, rest = path, []
        while head and head not in self._dirs:
            head, _, c = head.rpartition("/")
            rest.append(c)
        todo = [c for c in rest if c not in ("", ".")]  # reversed: the next component last
        cur = head
        hops = 0
        while todo:
            c = todo.pop()
            if c == "..":
                cur = cur.rpartition("/")[0]
                continue
            p = f"{cur}/{c}" if cur else c
            k = self.kinds.get(p)
            if k is None:
                if not create:
                    return None
                self.kinds[p] = "d"
            elif k == "l":
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _Cross(p, loop=True)
                cur = follow(cur, self.targets.get(p, ""), todo)
                continue
            elif k == "?":
                raise _Unknown
            elif k != "d":
                raise _Cross(p)
            cur = p
            self._dirs.add(p)  # a real path: no symlink in it
        return cur

    def _remove(self, real: str) -> None:
        if self.kinds.get(real) == "d":
            self._dirs.clear()
        if self.kinds.pop(real, None) == "d" or real == "":
            prefix = f"{real}/" if real else ""
            for p in [p for p in self.kinds if p.startswith(prefix)]:
                del self.kinds[p]
                self.targets.pop(p, None)
        self.targets.pop(real, None)

    # -- a layer -----------------------------------------------------------------------------------------
    def add(self, e: Entry, path: str) -> None:
        """Take entry ``e`` (``path``: its checked layer-relative path); judged in :meth:`finish`."""
        self._ops.append((path, _Op(e.name, e.type, e.linkname)))

    def finish(self) -> None:
        """Apply the layer's entries (:class:`ArchiveError` or :class:`UnsafePathError` if the tree rules
        refuse it)."""
        ops, self._ops = self._ops, []
        hides = []
        for path, e in ops:
            head, _, base = path.rpartition("/")
            if not whiteout.is_whiteout(base):
                continue
            target = whiteout.target_of(base, e.name)
            if target is not None and base.startswith(whiteout.META_PREFIX):
                continue
            try:
                real = self._resolve(head, create=False)
            except (_Cross, _Unknown):
                continue  # nothing of the layers below to hide there
            if real is not None:
                hides.append((real, target))
        for real, target in hides:  # against the layers below, each resolved before any is applied
            if target is None:
                prefix = f"{real}/" if real else ""
                self._dirs.clear()
                for p in [p for p in self.kinds if p.startswith(prefix)]:
                    del self.kinds[p]
                    self.targets.pop(p, None)
            else:
                self._remove(f"{real}/{target}" if real else target)
        for path, e in ops:
            head, _, base = path.rpartition("/")
            if path == "" or whiteout.is_whiteout(base):
                continue
            try:
                self._entry(e, head, base)
            except _Unknown:
                continue
            except _Cross as c:
                if c.loop:
                    raise ArchiveError(f"cannot apply {shown(e.name)}: too many levels of symbolic links") from None
                raise ArchiveError(f"cannot apply {shown(e.name)}: {shown(c.real)} is not a directory") from None

    def _entry(self, e: _Op, head: str, base: str) -> None:
        from lamina.fs.apply import check_symlink

        parent = self._resolve(head, create=True)
        real = f"{parent}/{base}" if parent else base
        kind = "d" if e.type == DIR else "l" if e.type == SYM else "f"
        if e.type == SYM:
            check_symlink(real, e.linkname, e.name)
        elif e.type == LNK:
            target = normalize(e.linkname)
            thead, _, tbase = target.rpartition("/")
            try:
                tparent = self._resolve(thead, create=False)
            except _Cross:
                tparent = None
            treal = None if tparent is None else f"{tparent}/{tbase}" if tparent else tbase
            tkind = None if treal is None else self.kinds.get(treal)
            if tkind is None or (treal is not None and treal.startswith(real + "/")):  # replacing it removes it
                raise ArchiveError(f"hard link {shown(e.name)} points at missing {shown(e.linkname)}")
            if tkind == "d":
                raise UnsafePathError(f"hard link {shown(e.name)} points at a directory")
            if treal == real:
                return
            if tkind == "l":
                assert treal is not None
                self._remove(real)
                self.kinds[real] = "l"
                self.targets[real] = self.targets.get(treal, "")
                return
        if kind == "d" and self.kinds.get(real) == "d":
            return
        self._remove(real)
        self.kinds[real] = kind
        if kind == "l":
            self.targets[real] = e.linkname

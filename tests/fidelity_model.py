"""A reference model of how a stack of layers makes a root filesystem, for the differential test.

Written from the OCI image spec ("Applying changesets", "Whiteouts") and from what container engines do
where the spec is silent, independently of lamina's apply engine:

- A layer's whiteouts and opaque markers hide entries of the layers *below* it only: they are applied first,
  to the lower tree, whatever their place in the stream; entries of the same layer are never hidden by
  them. A whiteout of a path that no lower layer has changes nothing and creates nothing.
- The other entries are applied in stream order. Each one's parent directories are resolved in the tree
  as it stands (lower layers plus this layer's entries so far), symlinks followed inside the root (an
  absolute target starts at the root, ``..`` stops at it), as an engine applying through the mounted lower
  layers does; missing directories are created (mode 0755, owned by 0:0). A path crossing a file is
  invalid.
- A directory entry over a directory keeps its contents and takes the entry's metadata; anything else over
  any path replaces what is there, a directory with everything below it. A hard link names the same file
  as its target (resolved the same way, final component not followed), which must exist and not be a
  directory.
- A relative symlink whose target climbs above the root, from the directory the archive names or the
  one it lands in, is invalid. A hard link to a lower layer's file the same layer whites out is invalid
  (the whiteout comes first).

:func:`snapshot` renders a tree as :func:`lamina.testing.tree_snapshot` rows, with hard-link groups made
comparable by :func:`canonical`.
"""

from __future__ import annotations

import hashlib
import io
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from lamina import ImageService
from lamina.config import Config
from lamina.errors import LaminaError
from lamina.testing import TarBuilder, tree_snapshot

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class Invalid(Exception):
    """The layer is not a valid changeset (every driver must refuse it)."""


@dataclass
class Node:
    kind: str  # dir, file, symlink
    mode: int
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Op:
    """One tar entry of a generated layer."""

    kind: str  # dir, file, symlink, hardlink, whiteout, opaque
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = ()


Tree = dict[str, Node]


def _norm(path: str) -> str:
    parts: list[str] = []
    for c in path.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                raise Invalid(f"{path} climbs out of the root")
            parts.pop()
            continue
        parts.append(c)
    return "/".join(parts)


def _resolve_dir(tree: Tree, path: str, *, create: bool) -> str | None:
    """The real path of directory ``path``; None when missing (and not ``create``)."""
    todo = [c for c in reversed(path.split("/")) if c not in ("", ".")]
    cur: list[str] = []
    hops = 0
    while todo:
        c = todo.pop()
        if c == "..":
            if cur:
                cur.pop()
            continue
        p = "/".join([*cur, c])
        node = tree.get(p)
        if node is None:
            if not create:
                return None
            tree[p] = Node("dir", 0o755)
            cur.append(c)
        elif node.kind == "dir":
            cur.append(c)
        elif node.kind == "symlink":
            hops += 1
            if hops > 40:
                raise Invalid(f"too many symlinks resolving {path}")
            if node.target.startswith("/"):
                cur = []
            todo.extend(x for x in reversed(node.target.split("/")) if x not in ("", "."))
        else:
            raise Invalid(f"{p} is not a directory")
    return "/".join(cur)


def _remove(tree: Tree, real: str) -> None:
    tree.pop(real, None)
    prefix = real + "/"
    for p in [p for p in tree if p.startswith(prefix)]:
        del tree[p]


def apply_layer(tree: Tree, ops: list[Op]) -> Tree:
    """The tree after one layer (a new dict; ``tree`` is left alone). :class:`Invalid` if it is not valid."""
    out = dict(tree)
    # hiding first: whiteouts and opaque markers act on the lower layers only
    for op in ops:
        if op.kind not in ("whiteout", "opaque"):
            continue
        path = _norm(op.path)
        head = path if op.kind == "opaque" else path.rpartition("/")[0]
        try:
            real_head = _resolve_dir(tree, head, create=False)
        except Invalid:
            continue  # through a file: nothing of the lower layers is there to hide
        if real_head is None:
            continue
        if op.kind == "opaque":
            for p in [p for p in tree if p.startswith(real_head + "/" if real_head else "")]:
                if p != real_head:
                    out.pop(p, None)
        else:
            base = path.rpartition("/")[2]
            _remove(out, f"{real_head}/{base}" if real_head else base)
    # then the entries, in order
    for op in ops:
        if op.kind in ("whiteout", "opaque"):
            continue
        path = _norm(op.path)
        if path == "":
            continue
        head, _, base = path.rpartition("/")
        parent = _resolve_dir(out, head, create=True)
        real = f"{parent}/{base}" if parent else base
        existing = out.get(real)
        if op.kind == "dir":
            if existing is not None and existing.kind == "dir":
                out[real] = Node("dir", op.mode, op.uid, op.gid, xattrs=dict(op.xattrs))
                continue
            _remove(out, real)
            out[real] = Node("dir", op.mode, op.uid, op.gid, xattrs=dict(op.xattrs))
        elif op.kind == "file":
            _remove(out, real)
            out[real] = Node("file", op.mode, op.uid, op.gid, data=op.data, xattrs=dict(op.xattrs))
        elif op.kind == "symlink":
            if not op.target.startswith("/"):
                # climbing out of the root, from where the archive names it or where it lands: Invalid
                _norm(f"{head}/{op.target}" if head else op.target)
                _norm(f"{parent}/{op.target}" if parent else op.target)
            _remove(out, real)
            out[real] = Node("symlink", 0o777, op.uid, op.gid, target=op.target)
        elif op.kind == "hardlink":
            tpath = _norm(op.target)
            if tpath == "":
                raise Invalid("hard link to the root")
            thead, _, tbase = tpath.rpartition("/")
            tparent = _resolve_dir(out, thead, create=False)
            if tparent is None:
                raise Invalid(f"hard link to missing {op.target}")
            treal = f"{tparent}/{tbase}" if tparent else tbase
            node = out.get(treal)
            if node is None or node.kind == "dir":
                raise Invalid(f"hard link to {'missing' if node is None else 'a directory'} {op.target}")
            if treal.startswith(real + "/"):
                raise Invalid(f"hard link {op.path} replaces the directory that holds its target")
            if treal != real:
                _remove(out, real)
                out[real] = node
        else:
            raise AssertionError(op.kind)
    return out


def snapshot(tree: Tree) -> dict[str, tuple[Any, ...]]:
    groups: dict[int, list[str]] = {}
    for p, n in tree.items():
        if n.kind == "file":
            groups.setdefault(id(n), []).append(p)
    rows: dict[str, tuple[Any, ...]] = {}
    for p, n in sorted(tree.items()):
        kind = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}[n.kind]
        extra: Any
        if n.kind == "file":
            digest = hashlib.sha256(n.data).hexdigest()
            members = groups[id(n)]
            extra = (digest, "group", min(members)) if len(members) > 1 else digest
        elif n.kind == "symlink":
            extra = n.target
        else:
            extra = None
        rows[p] = (kind, n.mode if n.kind != "symlink" else 0o777, n.uid, n.gid, extra,
                   tuple(sorted(n.xattrs.items())))
    return rows


def canonical(snap: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """:func:`lamina.testing.tree_snapshot` rows with each hard-link group named by its smallest path."""
    members: dict[str, list[str]] = {}
    for p, row in snap.items():
        extra = row[4]
        if isinstance(extra, tuple) and extra and extra[0] == "link":
            members.setdefault(extra[1], [extra[1]]).append(p)
    out = dict(snap)
    for first, paths in members.items():
        digest = snap[first][4]
        for p in paths:
            row = snap[p]
            out[p] = (*row[:4], (digest, "group", min(paths)), *row[5:])
    return out


# -- random stacks and the differential check (tests/test_fidelity.py, bench/fidelity.py) --------------

NAMES = ("a", "b", "c")


def _paths(depth: int = 3) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(NAMES), min_size=1, max_size=depth).map("/".join)


def _op() -> st.SearchStrategy[Op]:
    owner = st.sampled_from([0, 1000])
    return st.one_of(
        st.builds(Op, st.just("file"), _paths(), mode=st.sampled_from([0o644, 0o755, 0o600]), uid=owner,
                  gid=owner, data=st.sampled_from([b"", b"x", b"y" * 3000]),
                  xattrs=st.sampled_from([(), (("user.k", b"v"),)])),
        st.builds(Op, st.just("dir"), _paths(), mode=st.sampled_from([0o755, 0o700, 0o750]), uid=owner, gid=owner),
        st.builds(Op, st.just("symlink"), _paths(), uid=owner,
                  target=st.one_of(_paths().map(lambda p: "/" + p), st.sampled_from(NAMES),
                                   st.sampled_from(["../a", "../b/c"]))),
        st.builds(Op, st.just("hardlink"), _paths(), target=_paths()),
        st.builds(Op, st.just("whiteout"), _paths()),
        st.builds(Op, st.just("opaque"), _paths(2)),
    )


STACKS = st.lists(st.lists(_op(), min_size=1, max_size=8), min_size=1, max_size=3)


def _tar(ops: list[Op]) -> bytes:
    tb = TarBuilder()
    for op in ops:
        if op.kind == "file":
            tb.file(op.path, op.data, mode=op.mode, uid=op.uid, gid=op.gid, xattrs=dict(op.xattrs))
        elif op.kind == "dir":
            tb.dir(op.path, mode=op.mode, uid=op.uid, gid=op.gid)
        elif op.kind == "symlink":
            tb.symlink(op.path, op.target, uid=op.uid, gid=op.gid)
        elif op.kind == "hardlink":
            tb.hardlink(op.path, op.target)
        elif op.kind == "whiteout":
            tb.whiteout(op.path)
        else:
            tb.opaque(op.path)
    return tb.build()


def _model(stack: list[list[Op]]) -> list[Tree | None]:
    out: list[Tree | None] = []
    tree: Tree = {}
    for ops in stack:
        try:
            tree = apply_layer(tree, ops)
        except Invalid:
            out.append(None)
            break
        out.append(tree)
    return out


DRIVERS = ["vfs", "overlay", "tarball"]  # the drivers check_stack compares


def check_stack(stack: list[list[Op]]) -> None:
    want = _model(stack)
    valid = sum(1 for t in want if t is not None)
    with tempfile.TemporaryDirectory(prefix="lamina-fidelity-") as tmp:
        trees: dict[str, list[object]] = {}
        changes: dict[str, list[object]] = {}
        for driver in DRIVERS:
            base = Path(tmp) / driver
            with ImageService.open(Config(root=base / "root", runroot=base / "run", driver=driver)) as svc:
                chains: list[str] = []
                for ops in stack[: len(want)]:
                    try:
                        layer = svc.register_layer(io.BytesIO(_tar(ops)), chains[-1] if chains else None)
                    except LaminaError:
                        break
                    chains.append(layer.chain_id)
                assert len(chains) == valid, f"{driver} accepted {len(chains)} layers, the rules {valid}"
                if driver == "tarball":
                    continue
                got = []
                for c in chains:
                    with svc.mounted_layer(c) as path:
                        got.append(canonical(tree_snapshot(path)))
                trees[driver] = got
                changes[driver] = [svc.layer_changes(c) for c in chains]
        expected = [snapshot(t) for t in want if t is not None]
        for driver in trees:
            assert trees[driver] == expected, driver
        if "vfs" in changes and "overlay" in changes:
            assert changes["vfs"] == changes["overlay"], "changes"

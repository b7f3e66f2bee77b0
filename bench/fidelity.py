"""Differential run: random layer stacks on vfs, overlay and tarball against the OCI rules' model.

Random stacks (files, directories, symlinks that later layers write through, hard links, whiteouts and
opaque markers in any order, xattrs, modes, owners; names from a three-letter alphabet so they collide) are
applied on every driver; each merged tree must equal the reference model's (``tests/fidelity_model.py``),
vfs and overlay must report the same changes, and every driver must accept or refuse each layer as the
model does. Hypothesis shrinks each distinct failure to a minimal stack and prints it.

This is where issue 13's fidelity work starts: today it finds the disagreements that issue lists (an
opaque marker after a layer's own entries, a whiteout of the same layer's file, whiteouts of paths no lower
layer has on overlay, writes below a lower layer's symlink on overlay). Once the drivers pass, the test moves
into the suite.

    .venv/bin/python bench/fidelity.py [--examples 200] [--seed N]     (as root: overlay needs it)
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fidelity_model import Invalid, Op, Tree, apply_layer, canonical, snapshot  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lamina import ImageService  # noqa: E402
from lamina.config import Config  # noqa: E402
from lamina.errors import LaminaError  # noqa: E402
from lamina.testing import TarBuilder, tree_snapshot  # noqa: E402

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


DRIVERS = ["vfs", "overlay", "tarball"]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drivers", default=",".join(DRIVERS), help="comma-separated (default: %(default)s)")
    args = ap.parse_args()
    DRIVERS[:] = args.drivers.split(",")
    test = settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=True)(given(stack=STACKS)(check_stack))
    test = seed(args.seed)(test)
    try:
        test()
    except Exception as e:  # hypothesis raises what it found, grouped when there is more than one
        found = list(getattr(e, "exceptions", [e]))
        print(f"fidelity: {len(found)} distinct disagreement(s) (seed {args.seed})")
        for i, sub in enumerate(found, 1):
            notes = "\n    ".join(getattr(sub, "__notes__", []))
            print(f"  {i}. {type(sub).__name__}: {str(sub)[:300]}\n    {notes}")
        sys.exit(1)
    print(f"fidelity: {args.examples} random stacks, vfs and overlay agree with the rules (seed {args.seed})")


if __name__ == "__main__":
    main()

"""Wide and deep layers at full size: the checks of tests/test_big_trees.py, with a one-line summary.

    .venv/bin/python bench/wide.py [--entries 1000000] [--width 0] [--depth 0] [--driver vfs] [--driver overlay]
                                   [--work DIR] [--keep]

A layer of ``--entries`` entries (empty files under ``w/``, ``--width`` per directory, 0: all in one) or,
with ``--depth``, a directory chain that deep, goes through apply, exact export, changes, a whiteout by the
next layer, a container edited inside the tree, its commit and removal (tests/big_trees.py). Prints one
line per driver (each step's seconds and the peak RSS) and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from big_trees import Shape, chain_tar, driver_leftovers, exercise, unmount_below, wide_tar

from lamina.config import Config
from lamina.fs.ops import rmtree
from lamina.service import ImageService


def run(driver: str, shape: Shape, work: Path) -> tuple[bool, str]:
    root = work / driver
    try:
        with ImageService.open(Config(root=root / "root", runroot=root / "run", driver=driver)) as svc:
            steps = exercise(svc, shape, containers=driver != "tarball")
        left = driver_leftovers(root / "root", driver)
        if left:
            return False, f"left on disk: {left[:3]}"
        return True, ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
    except Exception as e:  # a failed check or an error: reported in the summary line
        traceback.print_exc()
        return False, f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        unmount_below(root)
        if root.exists():
            rmtree(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--width", type=int, default=0, help="files per directory (0: all in one directory)")
    ap.add_argument("--depth", type=int, default=0, help="a directory chain this deep instead of a wide layer")
    ap.add_argument("--driver", action="append", choices=["vfs", "overlay", "tarball"])
    ap.add_argument("--work", metavar="DIR", help="work in DIR (default: a temporary directory under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (the tar)")
    args = ap.parse_args(argv)
    drivers = args.driver or ["vfs", "overlay"]

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lamina-wide-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    try:
        t = time.monotonic()
        if args.depth:
            shape = chain_tar(work / "layer.tar", args.depth)
            what = f"a {args.depth}-level chain"
        else:
            shape = wide_tar(work / "layer.tar", args.entries, args.width)
            what = f"{args.entries} entries ({f'{args.width} per directory' if args.width else 'one directory'})"
        built = time.monotonic() - t
        for driver in drivers:
            ok, detail = run(driver, shape, work)
            failed |= not ok
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"wide: {what}, {driver}: {'ok' if ok else 'FAILED'} ({detail}); tar built in {built:.1f} s,"
                  f" peak RSS {rss} MiB", flush=True)
    finally:
        if not args.keep:
            unmount_below(work)
            rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

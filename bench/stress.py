"""Stress: the mixed concurrent workload of tests/test_concurrency.py, longer, with a one-line summary.

    .venv/bin/python bench/stress.py [--procs 8] [--ops 100] [--driver vfs] [--seed N] [--keep DIR] [-v]

Exits non-zero on any internal error, multi-line or unrecognised error, timeout, or invariant problem.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from concurrency_harness import (
    cli,
    error_messages,
    make_plans,
    make_tars,
    op_problems,
    refusal_counts,
    run_concurrently,
    seed_store,
    unmount_all,
)
from store_invariants import check_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--ops", type=int, default=100, help="operations per process")
    ap.add_argument("--driver", default="vfs", choices=["vfs", "overlay"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    ap.add_argument("--image-store", action="store_true",
                    help="a store that keeps its images apart (an image store beside its root)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every distinct refusal message")
    args = ap.parse_args(argv)

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lamina-stress-"))
    base.mkdir(parents=True, exist_ok=True)
    root, runroot = base / "root", base / "run"
    image_root = base / "images" if args.image_store else None
    started = time.monotonic()
    try:
        w = make_tars(base / "tars")
        if image_root is not None:  # the store records it: the racing commands name none
            cli(root, runroot, "--driver", args.driver, "--image-store", str(image_root), "info")
        seed_store(root, runroot, args.driver, w)
        plans = make_plans(w, args.procs, args.ops, args.seed)
        per_worker = run_concurrently(root, runroot, plans, base / "work", op_timeout=300, timeout=24 * 3600)
        results = [r for worker in per_worker for r in worker]
        problems = op_problems(results)
        unmount_all(root, runroot)
        invariants = check_store(root, runroot, args.driver, image_root=image_root)
    finally:
        if not args.keep:
            _unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - started

    ok = sum(r.ok for r in results)
    refused = refusal_counts(results)
    internal = sum("internal error" in r.stderr for r in results)
    kinds = ", ".join(f"{k} {n}" for k, n in refused.most_common())
    apart = " with an image store" if image_root is not None else ""
    print(f"stress: {args.procs} procs x {args.ops} ops, {args.driver}{apart}: {ok} ok, {sum(refused.values())} refused"
          f" ({kinds or 'none'}), {internal} internal errors, {len(problems)} bad errors, invariants: "
          f"{'ok' if not invariants else f'{len(invariants)} problems'}, {elapsed:.1f} s")
    if args.verbose:
        for msg, n in sorted(error_messages(results).items(), key=lambda x: -x[1]):
            print(f"  {n:5d} x {msg}")
    for p in problems + invariants:
        print(f"  problem: {p}", file=sys.stderr)
    return 1 if problems or invariants else 0


def _unmount_under(base: Path) -> None:
    """Unmount what an interrupted or failed run left under its temporary directory."""
    import subprocess

    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split()[4].startswith(str(base.resolve()))]
    for t in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", t], capture_output=True, check=False)


if __name__ == "__main__":
    sys.exit(main())

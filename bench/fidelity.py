"""Differential run: random layer stacks on vfs, overlay and tarball against the OCI rules' model.

Random stacks (files, directories, symlinks that later layers write through, hard links, whiteouts and
opaque markers in any order, xattrs, modes, owners; names from a three-letter alphabet so they collide) are
applied on every driver; each merged tree must equal the reference model's (``tests/fidelity_model.py``),
vfs and overlay must report the same changes, and every driver must accept or refuse each layer as the
model does. Hypothesis shrinks each distinct failure to a minimal stack and prints it.

The suite runs a derandomized sample of the same test (``tests/test_fidelity.py``); this runs more
examples, from any seed.

    .venv/bin/python bench/fidelity.py [--examples 200] [--seed N]     (as root: overlay needs it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fidelity_model  # noqa: E402
from fidelity_model import STACKS, check_stack  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drivers", default=",".join(fidelity_model.DRIVERS),
                    help="comma-separated (default: %(default)s)")
    args = ap.parse_args()
    fidelity_model.DRIVERS[:] = args.drivers.split(",")
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
    print(f"fidelity: {args.examples} random stacks, the drivers agree with the rules (seed {args.seed})")


if __name__ == "__main__":
    main()

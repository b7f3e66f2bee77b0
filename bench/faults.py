"""Faults: kill -9 at random instants of lamina's commands, hundreds of times, with a one-line summary.

    .venv/bin/python bench/faults.py [--trials 400] [--seed N] [--driver vfs|overlay|both] [--ops OP ...]
        [--scale 1.0] [--repair auto|on|off] [--keep DIR] [-v]

Every trial is tests/fault_harness.py's: a command on a prepared store, SIGKILLed after a delay drawn
over its measured duration, then the next command, the store's state against before and after the
command, the store invariants (tests/store_invariants.py), every layer's export and blob's digest, and
`lamina system check` when this lamina has it; then the store is brought back to its baseline. Exits
non-zero on any inconsistency, each printed with what reproduces its delay (seed, driver, command, trial).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fault_harness import (
    DRIVERS,
    OPS,
    REPAIR,
    FaultStore,
    Outcome,
    build_inputs,
    has_system_check,
    push_pulled_image,
    remove_scratch,
    run,
    scratch_dir,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--trials", type=int, default=400, help="killed runs in all, spread evenly (default 400)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--driver", default="both", choices=[*DRIVERS, "both"])
    ap.add_argument("--ops", nargs="+", choices=[*OPS, REPAIR], metavar="OP",
                    help=f"commands to kill (default: all of {', '.join(OPS)}, and {REPAIR!r} when present)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the inputs' numbers of files")
    ap.add_argument("--repair", default="auto", choices=["auto", "on", "off"],
                    help=f"kill {REPAIR!r} too: auto when `lamina system check` exists")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory, "
                    "stores on /dev/shm when it exists)")
    ap.add_argument("--image-store", action="store_true",
                    help="stores that keep their images apart (an image store beside each root)")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per trial")
    args = ap.parse_args(argv)

    checkable = has_system_check()
    if args.repair == "on" and not checkable:
        ap.error("--repair on: this lamina has no `lamina system check`")
    repair = checkable and args.repair != "off"
    drivers = list(DRIVERS) if args.driver == "both" else [args.driver]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lamina-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes: list[Outcome] = []
    notes: list[str] = []

    def seen(o: Outcome) -> None:
        outcomes.append(o)
        if args.verbose:
            what = "killed" if o.killed else "ended"
            when = f"{o.delay:.3f} s" if o.delay is not None else "measure"
            print(f"  {o.driver:7s} {o.op:22s} trial {o.trial:3d} {when:>9s} {what}: "
                  f"{'ok' if not o.problems else f'{len(o.problems)} problems'}", flush=True)

    stores: list[FaultStore] = []
    try:
        with ExitStack() as stack:
            inputs = build_inputs(base / "inputs", args.scale)
            host = _registry(stack, base, notes)
            if host is not None:
                push_pulled_image(inputs, host)
            for driver in drivers:
                where = base / driver if args.keep else scratch_dir(f"lamina-faults-{driver}-", base)
                store = FaultStore(where, driver, inputs, host, system_check=repair, image_store=args.image_store)
                stores.append(store)
                ops = [op for op in (args.ops or store.ops()) if op in store.ops()]
                share = _spread(args.trials // len(drivers) + (drivers.index(driver) < args.trials % len(drivers)), ops)
                store.prepare()
                run(store, args.seed, share, on_outcome=seen,
                    log=lambda text: print(f"inconsistent: {text}", file=sys.stderr, flush=True))
    finally:
        for store in stores:
            if args.keep:
                store.unmount_leftovers()
            else:
                remove_scratch(store)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    trials = [o for o in outcomes if o.trial >= 0]
    bad = [o for o in outcomes if o.problems]
    per_driver = Counter(o.driver for o in trials)
    killed = sum(o.killed for o in trials)
    print(f"faults: {len(trials)} trials, {len(trials) - sum(1 for o in trials if o.problems)} consistent, "
          f"{sum(1 for o in trials if o.problems)} inconsistent "
          f"({', '.join(f'{d} {per_driver[d]}' for d in drivers)}) in {time.monotonic() - started:.0f} s"
          f"; {killed} killed mid-way, {len(trials) - killed} ran to their end; "
          f"measuring runs: {sum(1 for o in outcomes if o.trial < 0 and o.problems)} inconsistent")
    for note in notes:
        print(f"  note: {note}")
    if not repair:
        print(f"  note: {REPAIR!r} not killed ({'--repair off' if checkable else 'no `lamina system check` here'})")
    return 1 if bad else 0


def _spread(n: int, ops: list[str]) -> dict[str, int]:
    """``n`` trials over ``ops``, as evenly as can be (the first ones get one more)."""
    return {op: n // len(ops) + (i < n % len(ops)) for i, op in enumerate(ops)}


def _registry(stack: ExitStack, base: Path, notes: list[str]) -> str | None:
    """Start docker-registry on loopback for the pulls; None (and a note) when it or skopeo is missing."""
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        notes.append("'pull' not killed: docker-registry and skopeo are needed")
        return None
    from registry_fixtures import Registry, _registry_fields, running

    reg = stack.enter_context(running(Registry(**_registry_fields(base / "registry"))))
    return reg.host


if __name__ == "__main__":
    sys.exit(main())

"""Speed of ``lamina system check``: seconds per GB for the full check, and the quick check's time.

For each driver (vfs, and overlay when root), a new store gets the cached ``rootfs`` and ``big`` workloads of
``bench/run.py`` as layers (about 1.2 GB), then, with the page cache warm, each of these runs ``--repeat``
times in alternating order:

- ``lamina system check`` (every layer read back and hashed against its DiffID, its files compared with its
  entries, every blob hashed) and ``lamina system check --quick`` (rows and presence only);
- the peer: ``tar -cf - -C LAYER . | openssl dgst -sha256`` for every layer's tree, one after the other: GNU tar reading
  each file once and openssl hashing the stream, the least work a check that reads every byte can do.

Prints one line per driver, e.g. ``check vfs: 1.21 GB, full 1.05 s (0.87 s/GB, 1.3x tar|openssl), quick 0.14 s``.

    .venv/bin/python bench/check.py [--work /var/tmp/lamina-bench] [--repeat 5] [--driver vfs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent


def lamina(store: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "lamina", "--root", str(store / "root"), "--runroot", str(store / "run"), *args]
    return subprocess.run(cmd, capture_output=True, check=False)


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peer(trees: list[str]) -> None:
    for tree in trees:
        tar = subprocess.Popen(["tar", "--numeric-owner", "-cf", "-", "-C", tree, "."], stdout=subprocess.PIPE)
        subprocess.run(["openssl", "dgst", "-sha256"], stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0:
            raise SystemExit(f"tar failed on {tree}")


def bench(driver: str, work: Path, repeat: int) -> str:
    tars = [work / "rootfs.tar", work / "big.tar"]
    missing = [str(t) for t in tars if not t.exists()]
    if missing:
        raise SystemExit(f"missing workloads {missing}: run bench/run.py --build-only --work {work}")
    store = Path(tempfile.mkdtemp(prefix=f"check-{driver}-", dir=work))
    try:
        for t in tars:
            p = lamina(store, "--driver", driver, "layer", "add", str(t))
            if p.returncode != 0:
                raise SystemExit(f"layer add failed: {p.stderr.decode()}")
        sys.path.insert(0, str(HERE.parent / "core"))
        from lamina import ImageService

        with ImageService.open(root=store / "root", runroot=store / "run") as svc:
            layers = svc.layers()
            nbytes = sum(la.tar_size for la in layers)
            trees = [svc.layer_store.driver.diff_root(la.cache_id) or "" for la in layers]

        def full() -> None:
            p = lamina(store, "system", "check")
            if p.returncode != 0:
                raise SystemExit(f"check found problems: {p.stdout.decode()}{p.stderr.decode()}")

        def quick() -> None:
            if lamina(store, "system", "check", "--quick").returncode != 0:
                raise SystemExit("quick check found problems")

        full()
        peer(trees)  # warm the page cache
        times: dict[str, list[float]] = {"full": [], "quick": [], "peer": []}
        for i in range(repeat):
            order: list[tuple[str, Callable[[], None]]] = [
                ("full", full), ("quick", quick), ("peer", lambda: peer(trees))]
            for name, fn in order if i % 2 == 0 else reversed(order):
                times[name].append(timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        gb = nbytes / 1e9
        return (f"check {driver}: {gb:.2f} GB in {len(layers)} layers, full {med['full']:.2f} s "
                f"({med['full'] / gb:.2f} s/GB, {med['full'] / med['peer']:.2f}x tar|openssl at "
                f"{med['peer'] / gb:.2f} s/GB), quick {med['quick']:.3f} s")
    finally:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="bench/run.py's work directory")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--driver", action="append", choices=["vfs", "overlay"])
    args = ap.parse_args()
    drivers = args.driver or (["vfs", "overlay"] if os.geteuid() == 0 else ["vfs"])
    for d in drivers:
        print(bench(d, args.work, args.repeat), flush=True)


if __name__ == "__main__":
    main()

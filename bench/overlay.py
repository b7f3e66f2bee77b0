#!/usr/bin/env python3
"""Benchmark the overlay driver against vfs on the targets of the overlay work.

Usage::

    python bench/overlay.py [--work DIR] [--repeat N] [--json OUT]

Needs root (kernel overlay mounts) and the rootfs workload of ``bench/run.py`` (built by it, or by
``python bench/run.py --build-only``). Everything runs in this process through lamina's API, so the numbers
are the drivers' own work, without interpreter start-up. Measured, as medians of N repetitions:

``create+mount``
    a read-write layer created and mounted on an image of 1,000 files and on one of 100,000 files. Target:
    overlay's time on the big image within 1.2x of its time on the small one (constant in image size);
    vfs on the same images for reference.
``changes+diff``
    after changing one file in a read-write layer on the realistic rootfs: the change list and the whole
    diff tar. Target: overlay (native diff) at least 20x faster than vfs (tree comparison).
``apply``
    registering the realistic rootfs tar in a fresh store. Target: overlay within 1.1x of vfs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lamina.config import Config
from lamina.service import ImageService

HERE = Path(__file__).resolve().parent


def many_files_tar(path: Path, count: int) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(max(1, count // 500)):
            ti = tarfile.TarInfo(f"d{d:04d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for i in range(count):
            data = f"file {i}\n".encode()
            ti = tarfile.TarInfo(f"d{(i // 500):04d}/f{i:06d}")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def open_store(base: Path, driver: str) -> ImageService:
    return ImageService.open(Config(root=base / driver / "root", runroot=base / driver / "run", driver=driver))


def median_of(repeat: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeat))


def bench_create_mount(svc: ImageService, chain: str, repeat: int) -> float:
    layer = svc.get_layer(chain)
    hook = svc.layer_store.hook

    def once() -> float:
        rw = os.urandom(32).hex()
        t0 = time.perf_counter()
        hook.lamina_create(layer_id=rw, parent=layer.cache_id, rw=True)
        path = hook.lamina_mount(layer_id=rw, options=[])
        dt = time.perf_counter() - t0
        assert os.path.isdir(path)
        hook.lamina_unmount(layer_id=rw)
        hook.lamina_remove(layer_id=rw)
        return dt

    return median_of(repeat, once)


def bench_changes_diff(svc: ImageService, chain: str, repeat: int) -> float:
    layer = svc.get_layer(chain)
    hook = svc.layer_store.hook
    rw = os.urandom(32).hex()
    hook.lamina_create(layer_id=rw, parent=layer.cache_id, rw=True)
    path = hook.lamina_mount(layer_id=rw, options=[])
    try:
        Path(path, "etc/motd").write_text("changed\n")

        def once() -> float:
            t0 = time.perf_counter()
            changes = hook.lamina_changes(layer_id=rw, parent=layer.cache_id)
            with hook.lamina_diff(layer_id=rw, parent=layer.cache_id) as d:
                while d.read(1 << 20):
                    pass
            dt = time.perf_counter() - t0
            assert [str(c) for c in changes] == ["C /etc", "C /etc/motd"], changes
            return dt

        return median_of(repeat, once)
    finally:
        hook.lamina_unmount(layer_id=rw)
        hook.lamina_remove(layer_id=rw)


def bench_apply(base: Path, driver: str, tar: Path, repeat: int) -> float:
    def once() -> float:
        d = Path(tempfile.mkdtemp(dir=base, prefix=f"apply-{driver}-"))
        try:
            with open_store(d, driver) as svc, open(tar, "rb") as f:
                os.sync()
                t0 = time.perf_counter()
                svc.register_layer(f)
                return time.perf_counter() - t0
        finally:
            shutil.rmtree(d)

    return median_of(repeat, once)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("overlay benchmarks need root (kernel overlay mounts)", file=sys.stderr)
        return 2
    work: Path = args.work
    rootfs = work / "rootfs.tar"
    if not rootfs.exists():
        print(f"{rootfs} is missing: run `python bench/run.py --build-only` first", file=sys.stderr)
        return 2
    small = many_files_tar(work / "files-1k.tar", 1_000)
    large = many_files_tar(work / "files-100k.tar", 100_000)
    base = Path(tempfile.mkdtemp(dir=work, prefix="overlay-bench-"))
    results: dict[str, Any] = {}
    try:
        for driver in ("overlay", "vfs"):
            with open_store(base, driver) as svc:
                chains = {}
                for name, tar in (("1k", small), ("100k", large), ("rootfs", rootfs)):
                    with open(tar, "rb") as f:
                        chains[name] = svc.register_layer(f).chain_id
                for name in ("1k", "100k"):
                    results[f"create+mount {driver} {name}"] = bench_create_mount(
                        svc, chains[name], args.repeat if driver == "overlay" else max(1, args.repeat // 2))
                results[f"changes+diff {driver}"] = bench_changes_diff(
                    svc, chains["rootfs"], args.repeat if driver == "overlay" else 3)
        for driver in ("vfs", "overlay"):
            results[f"apply {driver}"] = bench_apply(base, driver, rootfs, max(3, args.repeat // 2))
    finally:
        shutil.rmtree(base, ignore_errors=True)

    checks = [
        ("create+mount: overlay 100k / overlay 1k", results["create+mount overlay 100k"]
         / results["create+mount overlay 1k"], "<=", 1.2),
        ("changes+diff: vfs / overlay", results["changes+diff vfs"] / results["changes+diff overlay"], ">=", 20.0),
        ("apply rootfs: overlay / vfs", results["apply overlay"] / results["apply vfs"], "<=", 1.1),
    ]
    print(f"{'measurement':40s} {'median':>10s}")
    for k, v in results.items():
        print(f"{k:40s} {v * 1000:9.1f}ms")
    print()
    verdicts = []
    for label, ratio, op, target in checks:
        ok = ratio <= target if op == "<=" else ratio >= target
        verdicts.append({"check": label, "ratio": round(ratio, 3), "target": f"{op} {target}", "pass": ok})
        print(f"{label:45s} {ratio:8.2f}x  (target {op} {target}x)  {'PASS' if ok else 'MISS'}")
    ref = results["create+mount vfs 100k"] / results["create+mount overlay 100k"]
    print(f"{'create+mount on 100k files: vfs / overlay':45s} {ref:8.1f}x  (for reference)")
    if args.json:
        args.json.write_text(json.dumps({"results_s": results, "checks": verdicts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

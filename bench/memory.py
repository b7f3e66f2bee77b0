#!/usr/bin/env python3
"""Peak resident memory of ``lamina load``, ``save``, ``push`` and ``pull`` of an image with one big layer.

Usage::

    python bench/memory.py [--work DIR] [--size-gib 4] [--driver overlay|vfs] [--json OUT] [--keep]

The image is one layer holding one file of ``--size-gib`` GiB (default 4; a 1 MiB random block repeated,
so gzip cannot shrink it much and it costs no time to make) and a small file, as a docker-archive with an
uncompressed layer (cached in ``WORK/memory``). In order, each as the CLI in a subprocess against
throwaway stores under ``WORK/runs/memory``:

- ``lamina load -i big.docker.tar`` into store A;
- ``lamina save -o out.tar IMAGE`` from A (the archive is compared with the input's layer digest);
- ``lamina push IMAGE HOST/bench/big:1`` from A to Debian's ``docker-registry`` on a loopback port (the
  layer is compressed on the way, as the store keeps no blob for it);
- ``lamina pull HOST/bench/big:1`` into an empty store B.

Target: each command's peak resident set (GNU time's ``%M`` when ``/usr/bin/time`` exists, else
``wait4``'s ``ru_maxrss``) under 100 MB. Wall times are printed for information. Needs about
four times the size of free disk in the work directory, root for the overlay driver (``--driver vfs`` otherwise),
and ``docker-registry``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import containers as cbench  # noqa: E402  (bench/containers.py: the docker-archive builder)
import registry as rbench  # noqa: E402  (bench/registry.py: docker-registry on a loopback port)
import run as harness  # noqa: E402  (bench/run.py: the work directory's lock, logging)
from run import MIB, log  # noqa: E402

IMAGE = "bench/big:1"
LIMIT_MB = 100.0
GIB = 1024 * MIB


def build_layer(path: Path, size: int) -> str:
    """A layer tar with one file of ``size`` bytes and a small one; returns its sha256 (hex)."""
    block = os.urandom(MIB)
    h = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:

        def put(data: bytes) -> None:
            h.update(data)
            f.write(data)

        for name, length in (("small", 5), ("big", size)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = length, 0o644, 1_700_000_000
            put(info.tobuf(tarfile.PAX_FORMAT))
            if name == "small":
                put(b"small")
            else:
                for _ in range(length // MIB):
                    put(block)
                put(block[: length % MIB])
            if length % 512:
                put(bytes(512 - length % 512))
        put(bytes(1024))
    os.replace(tmp, path)
    return h.hexdigest()


def ensure_archive(work: Path, size: int) -> tuple[Path, str]:
    d = work / "memory"
    d.mkdir(parents=True, exist_ok=True)
    archive = d / f"big-{size // MIB}m.docker.tar"
    meta = archive.with_suffix(".json")
    if archive.exists() and meta.exists():
        return archive, json.loads(meta.read_text())["layer_sha256"]
    for stale in d.glob("big-*"):
        stale.unlink()
    layer = d / "layer.tar"
    t0 = time.perf_counter()
    digest = build_layer(layer, size)
    cbench.build_docker_archive(layer, digest, archive, IMAGE)
    layer.unlink()
    meta.write_text(json.dumps({"layer_sha256": digest, "size": size}) + "\n")
    log(f"built {archive.name} in {time.perf_counter() - t0:.0f}s")
    return archive, digest


def run_measured(cmd: list[str], env: dict[str, str], logs: Path, name: str) -> dict[str, Any]:
    """Run ``cmd``; its wall time and peak RSS (MB)."""
    gnu_time = shutil.which("time", path="/usr/bin")
    stats = logs / f"{name}.time"
    full = [gnu_time, "-f", "%M", "-o", str(stats), *cmd] if gnu_time else cmd
    t0 = time.perf_counter()
    with open(logs / f"{name}.out", "wb") as so, open(logs / f"{name}.err", "wb") as se:
        p = subprocess.Popen(full, stdout=so, stderr=se, env=env)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {(logs / f'{name}.err').read_text()[-2000:]}")
    kib = int(stats.read_text().split()[-1]) if gnu_time else ru.ru_maxrss
    return {"command": name, "wall_s": round(wall, 2), "peak_rss_mb": round(kib * 1024 / 1e6, 1),
            "source": "GNU time %M" if gnu_time else "wait4 ru_maxrss"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--size-gib", type=float, default=4.0, help="size of the big file in GiB (default 4)")
    ap.add_argument("--driver", choices=["overlay", "vfs"], default="overlay", help="lamina's driver (default overlay)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the stores and outputs (WORK/runs/memory)")
    args = ap.parse_args(argv)
    if shutil.which("docker-registry") is None:
        ap.error("docker-registry is needed on PATH")
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    harness.lock_work_dir(work)
    size = int(args.size_gib * GIB)
    free = shutil.disk_usage(work).free
    if free < 4 * size + GIB:
        ap.error(f"needs about {harness.human_bytes(4 * size + GIB)} free in {work}, has {harness.human_bytes(free)}")
    archive, layer_sha = ensure_archive(work, size)
    top = work / "runs" / "memory"
    for mnt in harness._mounts_below(top):
        subprocess.run(["umount", "-l", mnt], check=False)
    shutil.rmtree(top, ignore_errors=True)
    logs = top / "logs"
    logs.mkdir(parents=True)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    config = top / "empty.toml"
    config.write_text("")

    def lamina(store: str, *a: str | os.PathLike[str]) -> list[str]:
        return [sys.executable, "-m", "lamina", "--config", str(config), "--root", str(top / store / "root"),
                "--runroot", str(top / store / "run"), "--driver", args.driver, *map(os.fspath, a)]

    reg = rbench.start_registry(Path(tempfile.mkdtemp(prefix="registry-", dir=top)))
    results = []
    try:
        results.append(run_measured(lamina("a", "load", "-q", "-i", archive), env, logs, "load"))
        out = top / "saved.tar"
        results.append(run_measured(lamina("a", "save", "-o", out, IMAGE), env, logs, "save"))
        with tarfile.open(out) as t:
            names = [m.name for m in t.getmembers()]
        layer_names = [n for n in names if n.endswith(".tar") or n.startswith("blobs/sha256/")]
        if not any(layer_sha in n for n in layer_names):
            raise RuntimeError(f"the saved archive has no layer named by its digest {layer_sha[:12]}: {names[:8]}")
        out.unlink()
        remote = f"{reg.host}/{IMAGE}"
        results.append(run_measured(lamina("a", "push", "-q", IMAGE, remote), env, logs, "push"))
        results.append(run_measured(lamina("b", "pull", "-q", remote), env, logs, "pull"))
        pulled = subprocess.run(lamina("b", "images", "-q"), capture_output=True, text=True, env=env, check=True)
        if len(pulled.stdout.split()) != 1:
            raise RuntimeError(f"the pulled store lists {pulled.stdout.split()} images, expected one")
    finally:
        reg.stop()
        for mnt in harness._mounts_below(top):
            subprocess.run(["umount", "-l", mnt], check=False)
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    for r in results:
        r["target_mb"] = LIMIT_MB
        r["verdict"] = "PASS" if r["peak_rss_mb"] < LIMIT_MB else "MISS"
    print()
    print(f"Image {IMAGE}: one layer with a {harness.human_bytes(size)} file; driver {args.driver}")
    print(f"{'COMMAND':8s} {'WALL s':>8s} {'PEAK RSS MB':>12s} {'TARGET':>8s}  RESULT")
    for r in results:
        limit = f"<{LIMIT_MB:.0f}"
        print(f"{r['command']:8s} {r['wall_s']:8.1f} {r['peak_rss_mb']:12.1f} {limit:>8s}  {r['verdict']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": size, "driver": args.driver, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

#!/usr/bin/env python3
"""How lamina's CLI holds up on a large store: 10,000 images on 20,000 layers against 10 images.

Usage::

    python bench/scale.py [--work DIR] [--images 10000] [--repeat N] [--only OP ...] [--json OUT]
    python bench/scale.py --profile [--only images]     # cProfile + -X importtime of each command on the big store

Two stores on the overlay driver (root) are built through the API (``ImageService.load_image`` of
docker-archives made here, 250 images per archive) and cached in ``WORK/scale`` (default
``bench/work/scale``, git-ignored): ``small`` with 10 images and ``big`` with ``--images`` (10,000).
Image ``i`` has two layers of its own (one small file each), so a store of N images has 2N layers, all
with their blobs kept. Each store records what it holds in ``WORK/scale/NAME.json``; a store whose count
or build version differs is built again.

Each command runs as ``python -m lamina --config EMPTY --root R --runroot RR --driver overlay ...`` (a
subprocess, interpreter and CLI start-up included, with a bytecode cache as bench/run.py gives it), on
both stores, alternating which goes first, medians of ``--repeat`` (default 7):

lookups and totals (target: big / small <= 1.5x)
    ``inspect IMG`` (an image in the middle of the big store), ``create IMG`` + ``rm ID`` (one sample is
    the pair), ``tag IMG NEW``, ``rmi`` of an image just loaded, ``system df``, ``info``;
loading (target <= 1.5x)
    ``load -i`` of a one-more two-layer image (a different one every time; the ``rmi`` above removes it);
listings (target: at most 20 µs per row beyond the fixed cost)
    ``images``, ``images --format json``, ``layers``, ``layers --format json``; the per-row cost is
    (big - small) / (rows of big - rows of small).

Everything a command adds is taken away again (untimed) so the cached stores stay as built. Timing and
noise control follow bench/run.py: the work directory's lock, ``sync`` and an idle wait before each timed
command, CPU used by other processes recorded (noisy samples are listed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import run as harness  # noqa: E402  (bench/run.py)
from run import log  # noqa: E402

BUILD_VERSION = 3  # bump when the builder changes: cached stores of another version are built again
PER_ARCHIVE = 250
SMALL = 10
LOOKUPS = ("inspect", "create-rm", "tag", "rmi", "df", "info")
LOADS = ("load",)
LISTINGS = ("images", "images-json", "layers", "layers-json")
OPS = LOOKUPS + LOADS + LISTINGS
RATIO_TARGET = 1.5
ROW_TARGET_US = 20.0
CREATED = "2026-01-01T00:00:00Z"


# -- building the stores ---------------------------------------------------------------------------------
def _layer(content: bytes, name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(content)
        ti.mtime = 1_700_000_000
        ti.mode = 0o644
        tf.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


def image_parts(tag: str, seed: str) -> tuple[bytes, list[bytes]]:
    """The config and the two layer tars of the image named ``tag`` (``seed`` makes its layers unique)."""
    layers = [_layer(f"{seed} {k}\n".encode(), f"scale/{k}") for k in ("base", "top")]
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = {"architecture": arch, "os": "linux", "created": CREATED,
              "config": {"Cmd": ["/bin/sh"], "Labels": {"scale": seed}},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created": CREATED, "created_by": f"scale {seed} {k}"} for k in ("base", "top")]}
    return json.dumps(config, sort_keys=True).encode(), layers


def write_archive(path: Path, images: Sequence[tuple[str, str]]) -> None:
    """A docker-archive of ``(tag, seed)`` images."""
    manifest = []
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))

        for tag, seed in images:
            config, layers = image_parts(tag, seed)
            cfg_name = hashlib.sha256(config).hexdigest() + ".json"
            add(cfg_name, config)
            names = []
            for t in layers:
                name = hashlib.sha256(t).hexdigest() + "/layer.tar"
                add(name, t)
                names.append(name)
            manifest.append({"Config": cfg_name, "RepoTags": [tag], "Layers": names})
        add("manifest.json", json.dumps(manifest).encode())
    os.replace(tmp, path)


def store_dirs(top: Path, name: str) -> tuple[Path, Path]:
    return top / name / "root", top / name / "run"


def build_store(top: Path, name: str, count: int) -> dict[str, Any]:
    """Build (or reuse) the store ``name`` with ``count`` images of two layers each, through the API."""
    stamp = top / f"{name}.json"
    want = {"version": BUILD_VERSION, "images": count, "layers": 2 * count}
    with contextlib.suppress(OSError, ValueError):
        have = json.loads(stamp.read_text())
        if {k: have.get(k) for k in want} == want:
            return dict(have)
    from lamina.config import Config
    from lamina.service import ImageService

    root, runroot = store_dirs(top, name)
    for mnt in harness._mounts_below(top / name):
        subprocess.run(["umount", "-l", mnt], check=False)
    harness.remove_tree(top / name)
    stamp.unlink(missing_ok=True)
    log(f"building the {name} store: {count} images, {2 * count} layers (through ImageService.load_image)")
    t0 = time.perf_counter()
    archives = top / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    with ImageService.open(Config(root=root, runroot=runroot, driver="overlay")) as svc:
        for start in range(0, count, PER_ARCHIVE):
            batch = [(f"scale/img{i}:latest", f"{name}-{i}") for i in range(start, min(count, start + PER_ARCHIVE))]
            path = archives / f"{name}-{start}.tar"
            write_archive(path, batch)
            svc.load_image(path)
            path.unlink()
            if (start // PER_ARCHIVE) % 8 == 7:
                log(f"  {start + len(batch)} images, {time.perf_counter() - t0:.0f}s")
        n_images, n_layers = svc.count_images(), len(svc.layers())
    info = {**want, "images": n_images, "layers": n_layers, "build_seconds": round(time.perf_counter() - t0, 1)}
    if n_images != count or n_layers != 2 * count:
        raise RuntimeError(f"the {name} store has {n_images} images and {n_layers} layers, not {count} and {2 * count}")
    stamp.write_text(json.dumps(info) + "\n")
    log(f"built the {name} store in {info['build_seconds']}s")
    return info


# -- timing ----------------------------------------------------------------------------------------------
@dataclass
class Timing:
    op: str
    store: str
    samples: list[float] = field(default_factory=list)
    cpu_samples: list[float] = field(default_factory=list)
    foreign_cpu_samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "median": round(self.median, 4), "min": min(self.samples), "max": max(self.samples),
                "cpu_median": round(statistics.median(self.cpu_samples), 4)}


class ScaleBench:
    def __init__(self, work: Path, top: Path, stores: dict[str, dict[str, Any]], idle_wait: float) -> None:
        self.work = work
        self.top = top
        self.stores = stores
        self.idle_wait = idle_wait
        self.waited = 0.0
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.config = work / "storage.toml"
        self.config.write_text("[storage]\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)  # as bench/run.py: an installed lamina has its bytecode
        self.env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        self.timings: dict[tuple[str, str], Timing] = {}
        self.extra = top / "extra"
        self.extra.mkdir(exist_ok=True)
        self.n = 0

    def cmd(self, store: str, *args: str | os.PathLike[str]) -> list[str]:
        root, runroot = store_dirs(self.top, store)
        return [sys.executable, "-m", "lamina", "--config", str(self.config), "--root", str(root),
                "--runroot", str(runroot), "--driver", "overlay", *[os.fspath(a) for a in args]]

    def quiet(self, cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.work, env=self.env, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r.stdout

    def timed(self, op: str, store: str, cmd: list[str]) -> tuple[float, float, float, str]:
        self.n += 1
        out_path = self.logs / f"scale-{self.n:04d}.out"
        err_path = self.logs / f"scale-{self.n:04d}.err"
        os.sync()
        if self.idle_wait > 0:
            self.waited += harness.wait_idle(self.idle_wait)
        with open(out_path, "wb") as so, open(err_path, "wb") as se:
            busy0 = harness.cpu_busy_seconds()
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=self.work, env=self.env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            busy = harness.cpu_busy_seconds() - busy0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {code}: {err_path.read_text(errors='replace')[-2000:]}")
        cpu = ru.ru_utime + ru.ru_stime
        return wall, cpu, max(0.0, busy - cpu), out_path.read_text()

    def record(self, op: str, store: str, *samples: tuple[float, float, float, str]) -> str:
        t = self.timings.setdefault((op, store), Timing(op, store))
        t.samples.append(round(sum(s[0] for s in samples), 4))
        t.cpu_samples.append(round(sum(s[1] for s in samples), 4))
        t.foreign_cpu_samples.append(round(sum(s[2] for s in samples), 4))
        return samples[-1][3]

    def extra_archive(self, store: str, rep: int) -> tuple[Path, str]:
        tag = f"scale/extra-{store}-{rep}:latest"
        path = self.extra / f"{store}-{rep}.tar"
        if not path.exists():
            write_archive(path, [(tag, f"extra-{store}-{rep}")])
        return path, tag

    def probe(self, store: str) -> str:
        """An image in the middle of the store (by name), for the lookups."""
        return f"scale/img{self.stores[store]['images'] // 2}:latest"

    def one_round(self, store: str, rep: int, ops: Sequence[str]) -> None:
        c = self.cmd
        img = self.probe(store)
        for op in ops:
            if op == "inspect":
                self.record(op, store, self.timed(op, store, c(store, "inspect", img)))
            elif op == "create-rm":
                a = self.timed(op, store, c(store, "create", img))
                cid = a[3].split()[-1]
                self.record(op, store, a, self.timed(op, store, c(store, "rm", cid)))
            elif op == "tag":
                new = f"scale/tagged:{rep}"
                self.record(op, store, self.timed(op, store, c(store, "tag", img, new)))
                self.quiet(c(store, "untag", img, new))
            elif op in ("load", "rmi"):
                if op == "rmi" and "load" in ops:
                    continue  # done with load
                path, tag = self.extra_archive(store, rep)
                s = self.timed("load", store, c(store, "load", "-q", "-i", path))
                if "load" in ops:
                    self.record("load", store, s)
                image_id = json.loads(self.quiet(c(store, "inspect", tag)))[0]["Id"]
                s = self.timed("rmi", store, c(store, "rmi", image_id))
                if "rmi" in ops:
                    self.record("rmi", store, s)
            elif op == "df":
                self.record(op, store, self.timed(op, store, c(store, "system", "df")))
            elif op == "info":
                self.record(op, store, self.timed(op, store, c(store, "info")))
            elif op in LISTINGS:
                verb, _, fmt = op.partition("-")
                args = [verb] + (["--format", "json"] if fmt else [])
                out = self.record(op, store, self.timed(op, store, c(store, *args)))
                if rep == 0:
                    self.check_listing(op, store, out)

    def check_listing(self, op: str, store: str, out: str) -> None:
        rows = self.rows(op, store)
        got = len(json.loads(out)) if op.endswith("json") else len(out.splitlines()) - 1
        if got != rows:
            raise RuntimeError(f"{op} on the {store} store listed {got} rows, {rows} expected")

    def rows(self, op: str, store: str) -> int:
        return int(self.stores[store]["images" if op.startswith("images") else "layers"])

    def warm_up(self) -> None:
        """Untimed: fill the bytecode cache and the page cache of both stores' databases."""
        for store in self.stores:
            for args in (["images"], ["layers"], ["info"], ["system", "df"], ["inspect", self.probe(store)]):
                self.quiet(self.cmd(store, *args))

    def comparisons(self) -> list[dict[str, Any]]:
        out = []
        for op in OPS:
            small, big = self.timings.get((op, "small")), self.timings.get((op, "big"))
            if small is None or big is None:
                continue
            row: dict[str, Any] = {"op": op, "small": round(small.median, 4), "big": round(big.median, 4),
                                   "ratio": round(big.median / small.median, 2),
                                   "small_cpu": round(statistics.median(small.cpu_samples), 4),
                                   "big_cpu": round(statistics.median(big.cpu_samples), 4)}
            if op in LISTINGS:
                drows = self.rows(op, "big") - self.rows(op, "small")
                per_row = (big.median - small.median) / drows * 1e6
                row.update(rows_small=self.rows(op, "small"), rows_big=self.rows(op, "big"),
                           per_row_us=round(per_row, 1), target=f"<= {ROW_TARGET_US:.0f} us/row",
                           verdict="PASS" if per_row <= ROW_TARGET_US else "MISS")
            else:
                row.update(target=f"<= {RATIO_TARGET}x",
                           verdict="PASS" if row["ratio"] <= RATIO_TARGET else "MISS")
            out.append(row)
        return out

    def profile(self, ops: Sequence[str], top_n: int) -> None:
        """Each command once on the big store under ``-X importtime`` and cProfile; print the hotspots."""
        from containers import print_importtime

        pdir = self.work / "profiles"
        pdir.mkdir(exist_ok=True)
        img = self.probe("big")
        jobs: dict[str, list[str]] = {
            "inspect": ["inspect", img], "create-rm": ["create", img], "tag": ["tag", img, "scale/tagged:p"],
            "df": ["system", "df"], "info": ["info"], "images": ["images"],
            "images-json": ["images", "--format", "json"], "layers": ["layers"],
            "layers-json": ["layers", "--format", "json"],
        }
        for op in ops:
            if op not in jobs:
                continue
            cmd = self.cmd("big", *jobs[op])
            it = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True,
                                cwd=self.work, env=self.env, check=True)
            print_importtime(op, it.stderr, top_n)
            self.undo(op, it.stdout)
            prof = pdir / f"scale-{op}.prof"
            t0 = time.perf_counter()
            r = subprocess.run([cmd[0], "-m", "cProfile", "-o", str(prof), *cmd[1:]], capture_output=True, text=True,
                               cwd=self.work, env=self.env, check=True)
            log(f"lamina {op} under cProfile: {time.perf_counter() - t0:.3f}s; profile in {prof}")
            self.undo(op, r.stdout)
            for key in ("cumulative", "tottime"):
                print(f"\n=== lamina {op}: top {top_n} by {key} ===")
                pstats.Stats(str(prof)).strip_dirs().sort_stats(key).print_stats(top_n)

    def undo(self, op: str, stdout: str) -> None:
        if op == "create-rm":
            self.quiet(self.cmd("big", "rm", stdout.split()[-1]))
        elif op == "tag":
            self.quiet(self.cmd("big", "untag", self.probe("big"), "scale/tagged:p"))


def print_table(comps: list[dict[str, Any]], stores: dict[str, dict[str, Any]], sb: ScaleBench, repeat: int) -> None:
    print()
    print(f"Stores (overlay): small {stores['small']['images']} images / {stores['small']['layers']} layers, "
          f"big {stores['big']['images']:,d} images / {stores['big']['layers']:,d} layers; {repeat} repetitions")
    print()
    headers = ["COMMAND", "SMALL s", "BIG s", "RATIO", "PER ROW", "TARGET", "RESULT", "CPU SMALL s", "CPU BIG s"]
    rows = [[c["op"], f"{c['small']:.3f}", f"{c['big']:.3f}", f"{c['ratio']:.2f}x",
             f"{c['per_row_us']:.1f} us" if "per_row_us" in c else "", c["target"], c["verdict"],
             f"{c['small_cpu']:.3f}", f"{c['big_cpu']:.3f}"] for c in comps]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    print()
    print("Medians of wall seconds per command (create-rm: the pair); RATIO = big / small; PER ROW (listings) =")
    print("(big - small) / (rows of big - rows of small). Every command is a `python -m lamina` subprocess;")
    print("CPU = median user + system seconds of the command (wait4), less disturbed by other processes.")
    noisy = [f"{t.op}/{t.store} ({f:.2f}s of {w:.2f}s)" for t in sb.timings.values()
             for w, f in zip(t.samples, t.foreign_cpu_samples, strict=True) if f > max(0.1 * w, 0.05)]
    if noisy:
        print(f"WARNING: other processes used >10% of a core during {len(noisy)} sample(s): " + ", ".join(noisy[:8])
              + (" ..." if len(noisy) > 8 else ""))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--images", type=int, default=10_000, help="images in the big store (default 10000)")
    ap.add_argument("--only", nargs="+", choices=OPS, metavar="OP", help=f"commands (default: all of {', '.join(OPS)})")
    ap.add_argument("--repeat", type=int, default=7, help="repetitions per command; the median counts (default 7)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--idle-wait", type=float, default=3.0, metavar="SECONDS",
                    help="before each timed command wait up to this long for other processes to go quiet (default 3)")
    ap.add_argument("--build-only", action="store_true", help="just build (or check) the cached stores")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run each command once on the big store under cProfile and -X importtime")
    ap.add_argument("--top", type=int, default=25, help="rows of profile output (default 25)")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.images <= SMALL:
        ap.error(f"--repeat must be at least 1 and --images more than {SMALL}")
    if os.geteuid() != 0:
        ap.error("needs root (the overlay driver)")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    harness.lock_work_dir(work)  # shared with the other harnesses
    top = work / "scale"
    top.mkdir(exist_ok=True)
    stores = {"small": build_store(top, "small", SMALL), "big": build_store(top, "big", args.images)}
    if args.build_only:
        return 0
    sb = ScaleBench(work, top, stores, args.idle_wait)
    ops = list(args.only or OPS)
    machine = harness.machine_info(work)
    t0 = time.perf_counter()
    sb.warm_up()
    if args.profile:
        sb.profile(ops, args.top)
        return 0
    code = harness.code_fingerprint()
    for rep in range(args.repeat):
        order = ("small", "big") if rep % 2 == 0 else ("big", "small")
        for store in order:
            sb.one_round(store, rep, ops)
        log(f"repetition {rep + 1}/{args.repeat} done")
    code_changed = harness.code_fingerprint() != code
    elapsed = time.perf_counter() - t0
    comps = sb.comparisons()
    print_table(comps, stores, sb, args.repeat)
    if code_changed:
        print("WARNING: lamina's code (core/, drivers/) changed during the measurement: run again")
    print(f"measured in {elapsed:.0f}s, {sb.waited:.0f}s of it waiting for the machine to go idle")
    if args.json:
        doc = {"machine": machine, "repeat": args.repeat, "stores": stores,
               "targets": {"ratio": RATIO_TARGET, "per_row_us": ROW_TARGET_US},
               "comparisons": comps, "timings": [t.summary() for t in sb.timings.values()],
               "code_changed_during": code_changed, "seconds": round(elapsed, 1)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

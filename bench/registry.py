#!/usr/bin/env python3
"""Benchmark ``lamina pull`` and ``lamina push`` against podman and skopeo over a loopback registry.

Usage::

    python bench/registry.py [--work DIR] [--only pull push] [--repeat N] [--json OUT]
    python bench/registry.py --profile [--only pull]     # cProfile of one lamina pull / push, hotspots printed

The image is the one ``bench/images.py`` builds (with the builders of ``tests/image_fixtures.py``): the
rootfs workload of ``bench/run.py`` (a debootstrap minbase when root with debootstrap, else synthetic) as a
one-layer OCI layout with a gzip layer (skopeo ``tarball:``, then umoci), cached in ``WORK/images``. The
registry is Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, plain HTTP, no auth, started
with the config of ``tests/registry_fixtures.py`` (access log off) and a storage directory under
``WORK/runs/registry``. skopeo copies the layout into it once, untouched, as ``HOST/bench/debian:1``.

Workloads and targets (ratio of medians, measured in the same run):

``pull``
    ``lamina --root R --runroot RR --driver overlay pull -q HOST/bench/debian:1`` into an empty store
    against ``podman --root R --runroot RR --storage-driver overlay --cgroup-manager cgroupfs
    --events-backend none pull -q --tls-verify=false HOST/bench/debian:1`` into an empty podman store
    (download, verify, decompress, unpack). Target <= 0.7x.
``push``
    ``lamina push -q HOST_PULL/bench/debian:1 HOST/bench/push-lamina-push-N:1`` from a store that pulled the
    image beforehand (untimed; lamina keeps the manifest and the gzip blob, so it pushes them as they are)
    against ``skopeo copy --quiet --dest-tls-verify=false --dest-no-creds oci:LAYOUT:debian:bookworm
    docker://HOST/bench/push-skopeo-push-N:1``. Every push, of either tool, goes to a registry started just for it
    with a new, empty storage directory: no blob exists or can be mounted, both tools upload everything.
    Target <= 1.0x.

Timing and noise control are bench/run.py's, imported from it (as bench/images.py and bench/containers.py
do): the work directory's lock, the settle wait after mass deletions on journal-less ext4, ``sync``, an idle
wait and prefaulted memory before each timed command, warm inputs (the registry's blobs and the layout are
read once), the bytecode cache, rotation of the order in each repetition, medians of N (default 3). Untimed
warm-ups first: each tool pulls and pushes a small image (podman's first start, bytecode, binaries).

Outside the timing: the ID lamina's pull prints and podman's image ID must be the config digest, the image
lamina pulled is saved (``lamina save``) and its config and layer hashed against the config digest and the
DiffID; every pushed manifest, read back with ``skopeo inspect --raw``, must hash to the source manifest's
digest (and lamina's printed digest must be it too).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import images as imgbench  # noqa: E402  (bench/images.py: the input images, the archive check, reporting)
import registry_fixtures as rf  # noqa: E402  (tests/registry_fixtures.py: docker-registry on loopback)
import run as harness  # noqa: E402  (bench/run.py: timing and noise control)
from run import MIB, Bench, Variant, log  # noqa: E402

import image_fixtures as fx  # noqa: E402  (tests/image_fixtures.py)

WORKLOADS = ("pull", "push")
REPO_NAME = "bench/debian:1"
SMALL_REPO = "bench/small:1"
DRIVER = "overlay"


@dataclass(frozen=True)
class Target:
    workload: str
    variant: str
    baseline: str
    limit: float


TARGETS = (
    Target("pull", "lamina-pull", "podman-pull", 0.7),
    Target("push", "lamina-push", "skopeo-push", 1.0),
)


# -- registries ------------------------------------------------------------------------------------------
def start_registry(base: Path) -> rf.Registry:
    """A ``docker-registry`` on a free loopback port with a new storage directory under ``base``."""
    storage = base / "storage"
    storage.mkdir(parents=True)
    config_path = base / "config.yml"
    for attempt in range(3):
        port = rf.free_port()
        config = rf.registry_config(port, storage)
        # no access log: the registry's own output is not what is measured
        config["log"] = {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        host = f"{rf.LOOPBACK}:{port}"
        reg = rf.Registry(host=host, url=f"http://{host}", storage_dir=storage, config_path=config_path,
                          log_path=base / "registry.log")
        try:
            reg.start()
            return reg
        except RuntimeError as e:  # the free port was taken before the registry bound it
            if "address already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def push_repo(out: Path) -> str:
    """The repository and tag a timed push writes (``bench/push-lamina-push-N:1``), in its own registry."""
    return f"bench/push-{out.name}:1"


def warm_dir(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            harness.warm(Path(dirpath) / name)


def remote_manifest(host: str, repo_tag: str) -> tuple[bytes, str]:
    """``skopeo inspect --raw`` of ``HOST/REPO:TAG``: the manifest bytes and their digest."""
    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", "--no-creds",
                           f"docker://{host}/{repo_tag}"], capture_output=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo inspect {host}/{repo_tag}: {proc.stderr.decode(errors='replace')[-1000:]}")
    return proc.stdout, "sha256:" + hashlib.sha256(proc.stdout).hexdigest()


# -- the harness -----------------------------------------------------------------------------------------
class RegistryBench:
    def __init__(self, bench: Bench, inputs: imgbench.Inputs) -> None:
        self.b = bench
        self.inputs = inputs
        self.oci = inputs.oci
        self.top = bench.runs / "registry"
        self.top.mkdir(parents=True, exist_ok=True)
        self.registries: list[rf.Registry] = []
        self.checks: dict[str, list[str]] = {}
        self.code_changed: list[str] = []
        # podman's storage.conf is ours (the flags override its paths): no host option takes part. Its runroot
        # and tmpdir go to a short directory in /tmp (podman refuses runroots longer than 50 characters).
        self.podman_short = Path(tempfile.mkdtemp(prefix="lamina-rbench-"))
        conf_dir = bench.work / "registry"
        conf_dir.mkdir(exist_ok=True)
        conf = conf_dir / "podman-storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\nrunroot = "{self.podman_short / "run"}"\n'
                        f'graphroot = "{self.top / "podman-default"}"\n')
        bench.env["CONTAINERS_STORAGE_CONF"] = str(conf)
        self.source = self.registry("source")  # holds bench/debian:1 (and bench/small:1) for the pulls
        self.push_input = self.top / "push-input"  # a lamina store that pulled the image (untimed)
        self.push_host = ""  # the registry of the push being timed

    # commands
    def registry(self, name: str) -> rf.Registry:
        reg = start_registry(self.top / f"registry-{name}")
        self.registries.append(reg)
        return reg

    def stop(self, reg: rf.Registry) -> None:
        reg.stop()
        self.registries.remove(reg)

    def lamina(self, out: Path, *args: str | os.PathLike[str]) -> list[str]:
        return self.b.lamina(out, DRIVER, *args)

    def podman(self, out: Path, *args: str | os.PathLike[str]) -> list[str]:
        short = self.podman_short / hashlib.sha256(str(out).encode()).hexdigest()[:12]
        return ["podman", "--root", str(out / "root"), "--runroot", str(short / "run"), "--tmpdir", str(short / "tmp"),
                "--storage-driver", DRIVER, "--cgroup-manager", "cgroupfs", "--events-backend", "none",
                *[os.fspath(a) for a in args]]

    def skopeo_push(self, layout_ref: str, host: str, repo_tag: str) -> list[str]:
        return ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--dest-no-creds", layout_ref,
                f"docker://{host}/{repo_tag}"]

    def quiet(self, cmd: Sequence[str]) -> str:
        proc = subprocess.run(list(cmd), cwd=self.b.work, env=self.b.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def variants(self, workload: str) -> list[Variant]:
        src = f"{self.source.host}/{REPO_NAME}"
        layout = self.oci.path
        if workload == "pull":
            return [
                Variant("podman-pull", "podman pull (overlay)", layout, None, False,
                        lambda out: self.podman(out, "pull", "-q", "--tls-verify=false", src)),
                Variant("lamina-pull", "lamina pull (overlay)", layout, "podman-pull", False,
                        lambda out: self.lamina(out, "pull", "-q", src)),
            ]
        return [
            Variant("skopeo-push", "skopeo copy oci: -> docker://", layout, None, False,
                    lambda out: self.skopeo_push(f"oci:{layout}:{fx.DEBIAN_NAME}", self.push_host,
                                                 push_repo(out))),
            Variant("lamina-push", "lamina push", layout, "skopeo-push", False,
                    lambda out: self.lamina(self.push_input, "push", "-q", src,
                                            f"{self.push_host}/{push_repo(out)}")),
        ]

    # setup (untimed)
    def setup(self) -> None:
        """Fill the source registry with skopeo, warm its blobs, and run every tool once on a small image."""
        small = self.inputs.small_oci
        for layout, name, repo in ((self.oci.path, fx.DEBIAN_NAME, REPO_NAME), (small.path, fx.SMALL_NAME, SMALL_REPO)):
            self.quiet(self.skopeo_push(f"oci:{layout}:{name}", self.source.host, repo))
        _raw, digest = remote_manifest(self.source.host, REPO_NAME)
        if digest != self.oci.manifest_digest:
            raise RuntimeError(f"skopeo stored {REPO_NAME} as {digest}, not {self.oci.manifest_digest}")
        w = self.top / "warmup"
        reg = self.registry("warmup")
        try:
            small_src = f"{self.source.host}/{SMALL_REPO}"
            for i in range(2):
                self.quiet(self.podman(w / f"podman-{i}", "pull", "-q", "--tls-verify=false", small_src))
                self.quiet(self.lamina(w / f"lamina-{i}", "pull", "-q", small_src))
                self.quiet(self.skopeo_push(f"oci:{small.path}:{fx.SMALL_NAME}", reg.host, f"warm/skopeo-{i}:1"))
                self.quiet(self.lamina(w / f"lamina-{i}", "push", "-q", small_src, f"{reg.host}/warm/lamina-{i}:1"))
            # the push input: lamina pulls the image (keeping its manifest and gzip blob), then pushes it once,
            # and skopeo pushes the layout once (both read their input into the page cache)
            self.quiet(self.lamina(self.push_input, "pull", "-q", f"{self.source.host}/{REPO_NAME}"))
            self.quiet(self.lamina(self.push_input, "push", "-q", f"{self.source.host}/{REPO_NAME}",
                                   f"{reg.host}/warm/lamina-debian:1"))
            self.quiet(self.skopeo_push(f"oci:{self.oci.path}:{fx.DEBIAN_NAME}", reg.host, "warm/skopeo-debian:1"))
        finally:
            self.stop(reg)
        warm_dir(self.source.storage_dir)
        warm_dir(self.oci.path)

    # measuring
    def measure(self, workload: str) -> list[imgbench.Timing]:
        vs = self.variants(workload)
        runs = self.b.runs / workload
        runs.mkdir(parents=True, exist_ok=True)
        self.b.settle()
        code = harness.code_fingerprint()
        nbytes = self.inputs.rootfs.bytes if workload == "pull" else 0
        problems: list[str] = []
        for rep in range(self.b.repeat):
            k = rep % len(vs)
            for v in vs[k:] + vs[:k]:
                out = runs / f"{v.key}-{rep}"
                reg = self.registry(f"{v.key}-{rep}") if workload == "push" else None
                try:
                    if reg is not None:
                        self.push_host = reg.host
                    s = self.b.timed(v, out, f"{workload}-{v.key}-{rep}", nbytes)
                    if reg is not None:
                        problems += self.check_push(v, reg, out)
                finally:
                    if reg is not None:
                        self.stop(reg)
                v.samples.append(s)
                log(f"{workload:5s} rep {rep + 1}/{self.b.repeat} {v.label:32s} {s.wall:8.3f}s  user {s.user:6.2f}s"
                    f"  sys {s.sys:6.2f}s  others {s.foreign_cpu:5.2f}s")
            if rep == 0 and workload == "pull":
                problems += self.check_pull(vs)
        self.checks[workload] = problems
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        log(f"{workload}: correctness check {status}")
        for p in problems[:20]:
            log(f"  {p}")
        if harness.code_fingerprint() != code:
            log(f"WARNING: lamina's code (core/, drivers/) changed while {workload} was measured")
            self.code_changed.append(workload)
        return [imgbench.timing(workload, v) for v in vs]

    # correctness (outside the timing)
    def check_pull(self, vs: list[Variant]) -> list[str]:
        problems: list[str] = []
        want = self.oci.config_digest
        runs = self.b.runs / "pull"
        for v in vs:
            out = runs / f"{v.key}-0"
            if v.key == "podman-pull":
                ids = self.quiet(self.podman(out, "images", "--no-trunc", "--format", "{{.ID}}")).split()
            else:
                ids = v.stdout.split()[-1:]
            if ids not in ([want], [want.partition(":")[2]]):
                problems.append(f"{v.key}: image ID {ids} is not the config digest {want}")
            if v.key == "lamina-pull":
                saved = runs / "lamina-pull-0.check.tar"
                self.quiet(self.lamina(out, "save", "-o", saved, "--format", "docker-archive",
                                       f"{self.source.host}/{REPO_NAME}"))
                problems += [f"{v.key}: {p}" for p in imgbench.check_archive(saved, self.oci, None)]
        return problems

    def check_push(self, v: Variant, reg: rf.Registry, out: Path) -> list[str]:
        problems: list[str] = []
        tool = v.key.split("-")[0]
        repo_tag = push_repo(out)
        want = self.oci.manifest_digest
        try:
            _raw, got = remote_manifest(reg.host, repo_tag)
        except RuntimeError as e:
            return [f"{v.key} {out.name}: {e}"]
        if got != want:
            problems.append(f"{v.key} {out.name}: the pushed manifest hashes to {got}, the source's is {want}")
        if tool == "lamina" and v.stdout.split()[-1:] != [want]:
            problems.append(f"{v.key} {out.name}: lamina push printed {v.stdout.strip()!r}, expected {want}")
        return problems

    # profiling
    def profile(self, workloads: Sequence[str], top: int) -> None:
        pdir = self.b.work / "profiles"
        pdir.mkdir(exist_ok=True)
        src = f"{self.source.host}/{REPO_NAME}"
        jobs: list[tuple[str, Callable[[], list[str]]]] = []
        if "pull" in workloads:
            jobs.append(("pull", lambda: self.lamina(self.top / "profile-pull", "pull", "-q", src)))
        if "push" in workloads:
            jobs.append(("push", lambda: self.lamina(self.push_input, "push", "-q", src,
                                                     f"{self.push_host}/bench/profile:1")))
        self.b.settle()
        for name, make in jobs:
            reg = self.registry(f"profile-{name}") if name == "push" else None
            try:
                if reg is not None:
                    self.push_host = reg.host
                cmd = make()
                prof = pdir / f"registry-{name}.prof"
                os.sync()
                harness.prefault(min(self.inputs.rootfs.bytes + 512 * MIB, harness.mem_available() // 2))
                t0 = time.perf_counter()
                subprocess.run([cmd[0], "-m", "cProfile", "-o", str(prof), *cmd[1:]], cwd=self.b.work,
                               env=self.b.env, check=True, stdout=subprocess.DEVNULL)
                log(f"lamina {name} under cProfile: {time.perf_counter() - t0:.3f}s; profile in {prof}")
            finally:
                if reg is not None:
                    self.stop(reg)
            for key in ("cumulative", "tottime"):
                print(f"\n=== lamina {name}: top {top} by {key} ===")
                pstats.Stats(str(prof)).strip_dirs().sort_stats(key).print_stats(top)

    def cleanup(self, keep: bool) -> None:
        """Stop the registries, unmount what was left mounted, remove podman's runroots and (unless keep) outputs."""
        for reg in list(self.registries):
            self.stop(reg)
        for d in (self.b.runs, self.podman_short):
            for mnt in harness._mounts_below(d):
                subprocess.run(["umount", "-l", mnt], check=False)
        harness.remove_tree(self.podman_short)
        if not keep:
            self.b.cleanup()


def compare(timings: list[imgbench.Timing]) -> list[imgbench.Comparison]:
    by_key = {(t.workload, t.variant): t for t in timings}
    out: list[imgbench.Comparison] = []
    for tg in TARGETS:
        a, b = by_key.get((tg.workload, tg.variant)), by_key.get((tg.workload, tg.baseline))
        if a is None or b is None:
            continue
        ratio = round(a.median / b.median, 3)
        out.append(imgbench.Comparison(tg.workload, tg.variant, tg.baseline, ratio, tg.limit,
                                       "PASS" if ratio <= tg.limit else "MISS"))
    return out


def print_report(rb: RegistryBench, timings: list[imgbench.Timing], comparisons: list[imgbench.Comparison]) -> None:
    inp = rb.inputs
    print()
    print(f"Image: rootfs workload ({inp.rootfs.source}, {inp.rootfs.entries:,d} entries, "
          f"{harness.human_bytes(inp.rootfs.bytes)}) as a one-layer OCI image, gzip layer "
          f"{harness.human_bytes(inp.oci.layer_sizes[0])}; docker-registry on loopback; overlay on both sides")
    print()
    rows = [[t.workload, t.label, f"{t.median:.3f}", f"{t.min:.3f}", f"{t.max:.3f}", f"{t.user_median:.2f}",
             f"{t.sys_median:.2f}", f"{t.maxrss_kib / 1024:.0f}"] for t in timings]
    imgbench._table(["WORKLOAD", "COMMAND", "MEDIAN s", "MIN s", "MAX s", "USER s", "SYS s", "RSS MiB"], rows)
    if comparisons:
        print()
        imgbench._table(["WORKLOAD", "RATIO OF MEDIANS", "RATIO", "TARGET", "RESULT"],
                        [[c.workload, f"{c.variant} / {c.baseline}", f"{c.ratio:.2f}x", f"<={c.target:.1f}x",
                          c.verdict] for c in comparisons])
    print()
    print("USER/SYS: median CPU of the command and its children (wait4); the registry's own CPU is not in them.")
    noisy = [f"{t.workload}/{t.variant} ({f:.1f}s of {w:.1f}s)" for t in timings
             for w, f in zip(t.samples, t.foreign_cpu_samples, strict=True) if f > max(0.1 * w, 0.05)]
    if noisy:
        print(f"note: other processes (the registry included) used >10% of a core during {len(noisy)} sample(s): "
              + ", ".join(noisy[:8]))
    for name, problems in rb.checks.items():
        print(f"correctness {name}: " + ("ok" if not problems else f"FAILED ({len(problems)}): {problems[0]}"))


# -- main ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="NAME",
                    help=f"workloads to run (default: all of {', '.join(WORKLOADS)})")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per command; the median counts (default 3)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rootfs", choices=["auto", "debootstrap", "synthetic"], default="auto",
                    help="how bench/run.py builds the rootfs workload if it is missing (default auto)")
    ap.add_argument("--idle-wait", type=float, default=30.0, metavar="SECONDS",
                    help="before each timed command wait up to this long for other processes to go quiet")
    ap.add_argument("--no-settle", action="store_true",
                    help="on journal-less ext4, do not wait for the inode-reuse delay after deletions (noisier)")
    ap.add_argument("--no-prefault", action="store_true",
                    help="do not touch and free memory before each timed command (noisier on lazily backed VMs)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (WORK/runs)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run one lamina pull / push under cProfile and print the hotspots")
    ap.add_argument("--top", type=int, default=25, help="rows of profile output (default 25)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    for tool in ("tar", "gzip", "skopeo", "umoci", "podman", "docker-registry"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is needed on PATH")
    if os.geteuid() != 0:
        ap.error("needs root (podman's rootful store, overlay)")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    harness.lock_work_dir(work)  # held until exit, shared with run.py, images.py and containers.py
    inputs, built = imgbench.build_inputs(work, args.rootfs)
    names = list(args.only or WORKLOADS)
    need = (args.repeat * 2 + 4) * inputs.rootfs.bytes
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"about {harness.human_bytes(need)} of free space is needed in {work}")
    for mnt in harness._mounts_below(work / "runs"):  # left by an interrupted run: rm -rf would stop at them
        subprocess.run(["umount", "-l", mnt], check=False)
    bench = Bench(work, args.repeat, with_info=False, idle_wait=args.idle_wait, settle=not args.no_settle,
                  prefault=not args.no_prefault)
    if built:
        bench.note_delete()
    machine = harness.machine_info(work)
    machine.update({t: harness.tool_version([t, "--version"]) for t in ("podman", "skopeo", "docker-registry")})
    t0 = time.perf_counter()
    timings: list[imgbench.Timing] = []
    rb: RegistryBench | None = None
    try:
        rb = RegistryBench(bench, inputs)
        rb.setup()
        if args.profile:
            rb.profile(names, args.top)
            return 0
        for n in names:
            timings += rb.measure(n)
    finally:
        if rb is not None:
            rb.cleanup(args.keep)
        elif not args.keep:
            bench.cleanup()
    assert rb is not None
    elapsed = time.perf_counter() - t0
    comparisons = compare(timings)
    print_report(rb, timings, comparisons)
    if rb.code_changed:
        print(f"WARNING: lamina's code changed during the measurement of {', '.join(rb.code_changed)}: run again")
    print(f"measured in {elapsed:.0f}s, {bench.waited:.0f}s of it waiting for the machine to go idle and "
          f"{bench.settled:.0f}s for freed inodes to become reusable (cleanup included)")
    if args.json:
        doc: dict[str, Any] = {
            "machine": machine,
            "repeat": args.repeat,
            "driver": DRIVER,
            "image": {"rootfs": asdict(inputs.rootfs), "oci": imgbench._facts_json(inputs.oci)},
            "targets": [asdict(t) for t in TARGETS],
            "timings": [asdict(t) for t in timings],
            "comparisons": [asdict(c) for c in comparisons],
            "correctness": rb.checks,
            "code_changed_during": rb.code_changed,
            "seconds": round(elapsed, 1),
            "idle_wait_seconds": round(bench.waited, 1),
            "inode_settle_seconds": round(bench.settled, 1),
            "medians": {f"{t.workload}/{t.variant}": t.median for t in timings},
            "median_cpu": {f"{t.workload}/{t.variant}": round(statistics.median(
                u + s for u, s in zip(t.user_samples, t.sys_samples, strict=True)), 3) for t in timings},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if any(rb.checks.values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

#!/usr/bin/env python3
"""Benchmark lamina's container commands (``create``/``rm``, ``diff``, ``commit``) against podman's.

Usage::

    python bench/containers.py [--work DIR] [--only OP ...] [--repeat N] [--json OUT]
    python bench/containers.py --profile [--only diff]     # cProfile + -X importtime of one lamina command per op

Both tools get the same image: the rootfs workload of ``bench/run.py`` (a debootstrap minbase when root with
debootstrap, else synthetic; built if missing) wrapped in a one-layer docker-archive
(``bench/debian:1``, cached in ``WORK/containers``), loaded once, untimed, with ``lamina load -i`` and
``podman load -i`` into throwaway stores with the overlay driver on both sides:

- lamina: ``python -m lamina --config EMPTY --root R --runroot RR --driver overlay ...`` (the CLI in a
  subprocess, interpreter and CLI start-up included, as in bench/run.py);
- podman: ``podman --root R --runroot RR --tmpdir T --storage-driver overlay --cgroup-manager cgroupfs
  --events-backend none ...`` (runs as root without systemd; its own storage.conf, so no host option
  takes part).

Operations and targets (ratio of medians, lamina / podman, measured in the same run):

``create-rm``
    ``lamina create IMG`` then ``lamina rm ID`` against ``podman create IMG true`` then ``podman rm ID``;
    one sample is the wall of the pair. Target <= 1.0x.
``diff``
    a fresh container is created and mounted (``lamina mount`` / ``podman mount``), one file is written
    into it, then ``lamina diff C`` against ``podman diff C`` is timed. Target <= 1.5x.
``commit``
    as for diff, on a fresh container each repetition, then ``lamina commit C bench/commit:N`` against
    ``podman commit C bench/commit:N``. Target <= 1.5x.
``read``
    on the one-image store (the warm-up's containers and images removed), each read verb against podman's:
    ``lamina images`` / ``podman images``, ``lamina ps -a`` / ``podman ps -a``, ``lamina inspect IMG`` /
    ``podman image inspect IMG``, ``lamina layers`` / ``podman image tree IMG`` (podman has no verb listing
    the store's layers; ``image tree`` lists the image's). Target <= 1.0x each.
``inprocess``
    the same work through ``ImageService`` in one Python process (the way lamina is embedded): create +
    remove of a container, ``changes`` after one write, ``commit_image`` of one write; medians of N,
    against podman's CLI medians of create-rm, diff and commit from the same run. Information (no target).
``startup``
    ``python -c pass`` (information), ``python -m lamina --version`` and ``--help`` (targets: <= 25 ms each,
    absolute): the floor under every lamina command.

Timing and noise control are bench/run.py's (imported): the work directory's lock, the settle wait after
mass deletions on journal-less ext4, ``sync``, an idle wait and prefaulted memory before every timed
command, the bytecode cache for lamina, rotation of the order in each repetition, medians of N
(default 10). Outside the timing: diff must list the file written, commit must give a two-layer image,
rm must leave no container.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import run as harness  # noqa: E402  (bench/run.py)
from run import MIB, Bench, Sample, log  # noqa: E402

OPS = ("read", "create-rm", "diff", "commit", "inprocess")
READ_VERBS = ("images", "ps", "inspect", "layers")
TARGETS = {"create-rm": 1.0, "diff": 1.5, "commit": 1.5, **dict.fromkeys(READ_VERBS, 1.0)}
STARTUP_TARGETS = {"python -m lamina --version": 0.025, "python -m lamina --help": 0.025}  # seconds, absolute
INPROCESS = {"inprocess create+rm": "create-rm", "inprocess changes": "diff", "inprocess commit": "commit"}
IMAGE = "bench/debian:1"
CREATED = "2026-01-01T00:00:00Z"
PREFAULT_BYTES = 256 * MIB  # more than a lamina or podman process touches here


# -- the image -------------------------------------------------------------------------------------------
def host_arch() -> dict[str, str]:
    try:
        from lamina.formats.oci import host_platform

        return {k: v for k, v in host_platform().to_json().items() if k in ("architecture", "os", "variant")}
    except ImportError:  # lamina not importable here: the usual Go names for the common machines
        import platform

        m = platform.machine()
        return {"architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m), "os": "linux"}


def build_docker_archive(layer: Path, layer_sha256: str, out: Path, name: str) -> None:
    """A one-layer docker-archive (``docker save`` layout) of ``layer`` (an uncompressed tar), as demo.sh."""
    config = json.dumps({
        **host_arch(),
        "created": CREATED,
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_sha256}"]},
        "history": [{"created": CREATED, "created_by": "bench/containers.py"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]).encode()
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as t:
        info = tarfile.TarInfo("layer.tar")
        info.size = layer.stat().st_size
        with open(layer, "rb") as f:
            t.addfile(info, f)
        for n, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)


def ensure_image(work: Path, rootfs_mode: str) -> tuple[harness.WorkloadInfo, Path, bool]:
    """The rootfs workload and the docker-archive made of it (cached); and whether anything was deleted."""
    info, built = harness.ensure_workload(work, "rootfs", rootfs_mode, False)
    d = work / "containers"
    d.mkdir(exist_ok=True)
    archive = d / f"debian-{info.sha256[:12]}.docker.tar"
    if not archive.exists():
        log(f"writing {archive.name} (docker-archive of {info.tar}, {info.source})")
        for stale in d.glob("debian-*.docker.tar"):
            stale.unlink()
        build_docker_archive(work / info.tar, info.sha256, archive, IMAGE)
    return info, archive, built


# -- the two tools ---------------------------------------------------------------------------------------
@dataclass
class Tool:
    name: str  # "lamina" or "podman"
    base: list[str]

    def cmd(self, *args: str | os.PathLike[str]) -> list[str]:
        return [*self.base, *[os.fspath(a) for a in args]]


@dataclass
class Timing:
    op: str
    tool: str
    label: str
    command: list[str]
    samples: list[float] = field(default_factory=list)
    user_samples: list[float] = field(default_factory=list)
    sys_samples: list[float] = field(default_factory=list)
    foreign_cpu_samples: list[float] = field(default_factory=list)

    def add(self, *samples: Sample) -> None:
        """One sample; several (create then rm) are summed into one."""
        self.samples.append(round(sum(s.wall for s in samples), 4))
        self.user_samples.append(round(sum(s.user for s in samples), 3))
        self.sys_samples.append(round(sum(s.sys for s in samples), 3))
        self.foreign_cpu_samples.append(round(sum(s.foreign_cpu for s in samples), 3))

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "min": min(self.samples), "max": max(self.samples),
                "user_median": round(statistics.median(self.user_samples), 3),
                "sys_median": round(statistics.median(self.sys_samples), 3)}

    @property
    def median(self) -> float:
        return round(statistics.median(self.samples), 4)

    @property
    def cpu_median(self) -> float:
        return statistics.median(u + s for u, s in zip(self.user_samples, self.sys_samples, strict=True))


class ContainerBench:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.top = bench.runs / "containers"
        self.lamina = Tool("lamina", bench.lamina(self.top / "lamina", "overlay"))
        # podman refuses a runroot longer than 50 characters: its runroot and tmpdir (lock files, a few
        # bytes) go to a short directory in /tmp; its storage.conf is ours, the flags override its paths.
        self.podman_short = Path(tempfile.mkdtemp(prefix="lamina-cbench-"))
        conf = bench.work / "containers" / "podman-storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\nrunroot = "{self.podman_short / "run"}"\n'
                        f'graphroot = "{self.top / "podman" / "root"}"\n')
        bench.env["CONTAINERS_STORAGE_CONF"] = str(conf)
        self.podman = Tool("podman", [
            "podman", "--root", str(self.top / "podman" / "root"), "--runroot", str(self.podman_short / "run"),
            "--tmpdir", str(self.podman_short / "tmp"), "--storage-driver", "overlay",
            "--cgroup-manager", "cgroupfs", "--events-backend", "none"])
        self.tools = (self.lamina, self.podman)
        self.timings: dict[tuple[str, str], Timing] = {}
        self.checks: dict[str, list[str]] = {}
        self.n = 0  # sequence number of timed commands (log file names)

    # -- running commands ----------------------------------------------------------------------------
    def quiet(self, cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=self.b.work, env=self.b.env, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return r.stdout

    def timed(self, cmd: list[str]) -> tuple[Sample, str]:
        """Run one command as bench/run.py times one: sync, idle wait, prefault, then wall and wait4's CPU."""
        self.n += 1
        out_path = self.b.logs / f"containers-{self.n:04d}.out"
        err_path = self.b.logs / f"containers-{self.n:04d}.err"
        os.sync()
        if self.b.idle_wait > 0:
            self.b.waited += harness.wait_idle(self.b.idle_wait)
        if self.b.prefault:
            harness.prefault(min(PREFAULT_BYTES, harness.mem_available() // 2))
        with open(out_path, "wb") as so, open(err_path, "wb") as se:
            busy0 = harness.cpu_busy_seconds()
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=self.b.work, env=self.b.env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            busy = harness.cpu_busy_seconds() - busy0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {code}: {err_path.read_text(errors='replace')[-2000:]}")
        foreign = max(0.0, busy - ru.ru_utime - ru.ru_stime)
        return Sample(wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss, ru.ru_minflt, foreign), out_path.read_text()

    def timing(self, op: str, tool: Tool, label: str, command: list[str]) -> Timing:
        key = (op, tool.name)
        if key not in self.timings:
            self.timings[key] = Timing(op, tool.name, label, command)
        return self.timings[key]

    # -- container helpers -----------------------------------------------------------------------------
    def create_args(self, tool: Tool) -> list[str]:
        return ["create", IMAGE] + (["true"] if tool.name == "podman" else [])

    def changed_container(self, tool: Tool, tag: str) -> tuple[str, str]:
        """A fresh container with one file written into its mounted root; returns (ID, path in it)."""
        cid = self.quiet(tool.cmd(*self.create_args(tool))).split()[-1]
        root = Path(self.quiet(tool.cmd("mount", cid)).split()[-1])
        rel = f"/etc/lamina-bench-{tag}"
        (root / rel.lstrip("/")).write_text(f"changed by bench/containers.py ({tag})\n")
        return cid, rel

    # -- setup -----------------------------------------------------------------------------------------
    def setup(self, archive: Path) -> None:
        harness.warm(archive)
        for tool in self.tools:
            t0 = time.perf_counter()
            self.quiet(tool.cmd("load", "-i", archive))
            log(f"{tool.name} load -i {archive.name}: {time.perf_counter() - t0:.1f}s (untimed)")
        # Untimed rounds of every command: bytecode cache, podman's first start (refresh), page cache.
        for tool in self.tools:
            for i in range(2):
                cid = self.quiet(tool.cmd(*self.create_args(tool))).split()[-1]
                self.quiet(tool.cmd("rm", cid))
                cid, _ = self.changed_container(tool, f"warmup{i}")
                self.quiet(tool.cmd("diff", cid))
                self.quiet(tool.cmd("commit", cid, f"bench/warmup:{i}"))
                for verb in READ_VERBS:
                    self.quiet(tool.cmd(*self.read_args(tool, verb)))
        # Back to one image and no container, for the read verbs.
        for tool in self.tools:
            for cid in self.container_ids(tool):
                self.quiet(tool.cmd("rm", "-f", cid))
            for i in range(2):
                self.quiet(tool.cmd("rmi", f"bench/warmup:{i}"))

    def read_args(self, tool: Tool, verb: str) -> list[str]:
        if verb == "ps":
            return ["ps", "-a"]
        if verb == "inspect":
            return ["image", "inspect", IMAGE] if tool.name == "podman" else ["inspect", IMAGE]
        if verb == "layers" and tool.name == "podman":
            return ["image", "tree", IMAGE]
        return [verb]

    # -- measurements ----------------------------------------------------------------------------------
    def order(self, rep: int) -> tuple[Tool, ...]:
        return self.tools if rep % 2 == 0 else self.tools[::-1]

    def container_ids(self, tool: Tool) -> set[str]:
        return set(self.quiet(tool.cmd("ps", "-a", "-q", "--no-trunc")).split())

    def measure_create_rm(self, repeat: int) -> None:
        before = {tool.name: self.container_ids(tool) for tool in self.tools}  # the warm-up leaves some
        for rep in range(repeat):
            for tool in self.order(rep):
                create = self.create_args(tool)
                s1, out = self.timed(tool.cmd(*create))
                cid = out.split()[-1]
                s2, _ = self.timed(tool.cmd("rm", cid))
                self.timing("create-rm", tool, f"{tool.name} {' '.join(create)} + rm",
                            [*create, "+", "rm", "ID"]).add(s1, s2)
                self.timing("create", tool, f"{tool.name} {' '.join(create)}", create).add(s1)
                self.timing("rm", tool, f"{tool.name} rm", ["rm", "ID"]).add(s2)
                log(f"create-rm rep {rep + 1}/{repeat} {tool.name:6s} create {s1.wall:6.3f}s  rm {s2.wall:6.3f}s"
                    f"  others {s1.foreign_cpu + s2.foreign_cpu:5.2f}s")
        problems = []
        for tool in self.tools:
            left = self.container_ids(tool) - before[tool.name]
            if left:
                problems.append(f"{tool.name}: {len(left)} container(s) left after rm")
        self.checks["create-rm"] = problems

    def measure_diff(self, repeat: int) -> None:
        problems: list[str] = []
        for rep in range(repeat):
            for tool in self.order(rep):
                cid, rel = self.changed_container(tool, f"diff{rep}")
                s, out = self.timed(tool.cmd("diff", cid))
                self.timing("diff", tool, f"{tool.name} diff", ["diff", "C"]).add(s)
                lines = out.split("\n")
                if f"A {rel}" not in lines:
                    problems.append(f"{tool.name}: diff does not list 'A {rel}': {out.strip()!r}")
                log(f"diff      rep {rep + 1}/{repeat} {tool.name:6s} {s.wall:6.3f}s  others {s.foreign_cpu:5.2f}s")
        self.checks["diff"] = problems

    def layer_count(self, tool: Tool, ref: str) -> int:
        if tool.name == "podman":
            return int(self.quiet(tool.cmd("image", "inspect", "--format", "{{len .RootFS.Layers}}", ref)).strip())
        doc = json.loads(self.quiet(tool.cmd("inspect", ref)))[0]
        rootfs = doc.get("RootFS") or doc.get("rootfs") or {}
        return len(rootfs.get("Layers") or rootfs.get("diff_ids") or [])

    def measure_commit(self, repeat: int) -> None:
        problems: list[str] = []
        for rep in range(repeat):
            for tool in self.order(rep):
                cid, _ = self.changed_container(tool, f"commit{rep}")
                s, out = self.timed(tool.cmd("commit", cid, f"bench/commit:{rep}"))
                self.timing("commit", tool, f"{tool.name} commit", ["commit", "C", "bench/commit:N"]).add(s)
                if not re.search(r"[0-9a-f]{64}", out):
                    problems.append(f"{tool.name}: commit printed no image ID: {out.strip()!r}")
                log(f"commit    rep {rep + 1}/{repeat} {tool.name:6s} {s.wall:6.3f}s  others {s.foreign_cpu:5.2f}s")
        for tool in self.tools:
            n = self.layer_count(tool, "bench/commit:0")
            if n != 2:
                problems.append(f"{tool.name}: the committed image has {n} layer(s), expected 2")
        self.checks["commit"] = problems

    def measure_read(self, repeat: int) -> None:
        problems: list[str] = []
        images = {tool.name: len(self.quiet(tool.cmd("images", "-q")).split()) for tool in self.tools}
        if set(images.values()) != {1}:
            problems.append(f"not a one-image store: {images}")
        for rep in range(repeat):
            for tool in self.order(rep):
                for verb in READ_VERBS:
                    args = self.read_args(tool, verb)
                    s, out = self.timed(tool.cmd(*args))
                    self.timing(verb, tool, f"{tool.name} {' '.join(args)}", args).add(s)
                    if verb in ("images", "inspect") and IMAGE.split(":")[0] not in out:
                        problems.append(f"{tool.name} {verb} does not show {IMAGE}")
            log(f"read      rep {rep + 1}/{repeat} " + ", ".join(
                f"{verb} {self.timings[(verb, t.name)].samples[-1]:.3f}/{t.name}" for t in self.tools
                for verb in READ_VERBS))
        self.checks["read"] = problems

    def measure_inprocess(self, repeat: int) -> None:
        """Create + remove, changes and commit through ImageService in one process, in the lamina store."""
        store = self.top / "lamina"
        script = INPROCESS_SCRIPT.format(root=str(store / "root"), run=str(store / "run"), image=IMAGE, n=repeat)
        out = self.quiet([sys.executable, "-c", script])
        result = json.loads(out.strip().splitlines()[-1])
        for label, samples in result.items():
            t = self.timings.setdefault(("inprocess", label), Timing("inprocess", label, label, ["ImageService"]))
            for wall in samples:
                t.add(Sample(wall, 0.0, 0.0, 0, 0, 0.0))
        log("inprocess: " + ", ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in result.items()))

    def measure_startup(self, repeat: int) -> None:
        py = [sys.executable, "-c", "pass"]
        version = [sys.executable, "-m", "lamina", "--version"]
        help_ = [sys.executable, "-m", "lamina", "--help"]
        for _ in range(repeat):
            for label, cmd in (("python -c pass", py), ("python -m lamina --version", version),
                               ("python -m lamina --help", help_)):
                s, _ = self.timed(cmd)
                self.timings.setdefault(("startup", label), Timing("startup", label, label, cmd)).add(s)
        log("startup: " + ", ".join(f"{t.label} {t.median:.3f}s" for (op, _), t in self.timings.items()
                                    if op == "startup"))

    def comparisons(self) -> list[dict[str, Any]]:
        out = []
        for op in (*READ_VERBS, "create-rm", "create", "rm", "diff", "commit"):
            lam, pod = self.timings.get((op, "lamina")), self.timings.get((op, "podman"))
            if lam is None or pod is None:
                continue
            ratio = round(lam.median / pod.median, 2) if pod.median > 0 else float("inf")
            target = TARGETS.get(op)
            verdict = "info" if target is None else ("PASS" if ratio <= target else "MISS")
            out.append({"op": op, "lamina_median": lam.median, "podman_median": pod.median, "ratio": ratio,
                        "target": target, "verdict": verdict, "lamina_cpu_median": round(lam.cpu_median, 3),
                        "podman_cpu_median": round(pod.cpu_median, 3),
                        "lamina_range": [min(lam.samples), max(lam.samples)],
                        "podman_range": [min(pod.samples), max(pod.samples)]})
        for label, op in INPROCESS.items():
            lam, pod = self.timings.get(("inprocess", label)), self.timings.get((op, "podman"))
            if lam is None or pod is None:
                continue
            out.append({"op": label, "lamina_median": lam.median, "podman_median": pod.median,
                        "ratio": round(lam.median / pod.median, 3) if pod.median > 0 else float("inf"),
                        "target": None, "verdict": "info", "lamina_cpu_median": 0.0,
                        "podman_cpu_median": round(pod.cpu_median, 3),
                        "lamina_range": [min(lam.samples), max(lam.samples)],
                        "podman_range": [min(pod.samples), max(pod.samples)]})
        for (op, label), t in self.timings.items():
            if op == "startup" and label in STARTUP_TARGETS:
                limit = STARTUP_TARGETS[label]
                out.append({"op": label, "lamina_median": t.median, "podman_median": None,
                            "ratio": None, "target_seconds": limit,
                            "target": None, "verdict": "PASS" if t.median <= limit else "MISS",
                            "lamina_cpu_median": round(t.cpu_median, 3), "podman_cpu_median": 0.0,
                            "lamina_range": [min(t.samples), max(t.samples)], "podman_range": [0.0, 0.0]})
        return out

    # -- profiling -------------------------------------------------------------------------------------
    def profile(self, ops: Sequence[str], top: int) -> None:
        """One lamina command per op under ``-X importtime`` and one under cProfile; print the hotspots."""
        pdir = self.b.work / "profiles"
        pdir.mkdir(exist_ok=True)
        lam = self.lamina

        def fresh() -> str:
            return self.quiet(lam.cmd(*self.create_args(lam))).split()[-1]

        def changed() -> str:
            return self.changed_container(lam, f"profile{self.n}")[0]

        jobs: list[tuple[str, Callable[[], list[str]]]] = []
        if "create-rm" in ops:
            jobs += [("create", lambda: lam.cmd(*self.create_args(lam))), ("rm", lambda: lam.cmd("rm", fresh()))]
        if "diff" in ops:
            jobs.append(("diff", lambda: lam.cmd("diff", changed())))
        if "commit" in ops:
            jobs.append(("commit", lambda: lam.cmd("commit", changed(), f"bench/profile:{self.n}")))
        for name, make in jobs:
            self.n += 1
            cmd = make()  # a new container (or none, for create) for each run
            it = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True,
                                cwd=self.b.work, env=self.b.env, check=True)
            print_importtime(name, it.stderr, top)
            self.n += 1
            cmd = make()
            prof = pdir / f"containers-{name}.prof"
            t0 = time.perf_counter()
            subprocess.run([cmd[0], "-m", "cProfile", "-o", str(prof), *cmd[1:]], capture_output=True,
                           cwd=self.b.work, env=self.b.env, check=True)
            log(f"lamina {name} under cProfile: {time.perf_counter() - t0:.3f}s; profile in {prof}")
            for key in ("cumulative", "tottime"):
                print(f"\n=== lamina {name}: top {top} by {key} ===")
                pstats.Stats(str(prof)).strip_dirs().sort_stats(key).print_stats(top)

    def cleanup(self, keep: bool) -> None:
        """Unmount what the stores left mounted, remove podman's runroot (always) and the stores (unless keep)."""
        for d in (self.top, self.podman_short):
            for mnt in harness._mounts_below(d):
                subprocess.run(["umount", "-l", mnt], check=False)
        harness.remove_tree(self.podman_short)
        if not keep:
            self.b.cleanup()


def print_importtime(name: str, stderr: str, top: int) -> None:
    """The slowest imports of ``-X importtime`` output, by self and by cumulative time (microseconds)."""
    rows: list[tuple[int, int, str]] = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), m.group(4)))
    total = sum(r[0] for r in rows)
    print(f"\n=== lamina {name}: -X importtime, {len(rows)} modules, {total / 1000:.1f} ms of imports in all ===")
    print("  by cumulative:  " + ", ".join(f"{n} {c / 1000:.1f}ms" for _s, c, n in
                                         sorted(rows, key=lambda r: -r[1])[:top]))
    print("  by self:        " + ", ".join(f"{n} {s / 1000:.1f}ms" for s, _c, n in
                                         sorted(rows, key=lambda r: -r[0])[:top]))


def print_table(cb: ContainerBench, comps: list[dict[str, Any]], info: harness.WorkloadInfo, repeat: int) -> None:
    print()
    print(f"Image: {IMAGE}, one layer: rootfs workload ({info.source}, {info.entries:,d} entries, "
          f"{harness.human_bytes(info.bytes)}); drivers: lamina overlay, podman overlay; {repeat} repetitions")
    print()
    headers = ["OPERATION", "LAMINA s", "PODMAN s", "RATIO", "TARGET", "RESULT", "LAMINA MIN-MAX", "PODMAN MIN-MAX",
               "LAMINA CPU s", "PODMAN CPU s"]
    rows = []
    for c in comps:
        if c.get("target_seconds") is not None:  # an absolute target (start-up)
            rows.append([c["op"], f"{c['lamina_median']:.3f}", "", "", f"<={c['target_seconds']:.3f}s", c["verdict"],
                         "{:.3f}-{:.3f}".format(*c["lamina_range"]), "", f"{c['lamina_cpu_median']:.3f}", ""])
            continue
        ratio = f"{c['ratio']:.3f}x" if c["ratio"] < 0.1 else f"{c['ratio']:.2f}x"
        rows.append([c["op"], f"{c['lamina_median']:.4f}", f"{c['podman_median']:.3f}", ratio,
                     f"<={c['target']:.1f}x" if c["target"] is not None else "", c["verdict"],
                     "{:.3f}-{:.3f}".format(*c["lamina_range"]), "{:.3f}-{:.3f}".format(*c["podman_range"]),
                     f"{c['lamina_cpu_median']:.3f}", f"{c['podman_cpu_median']:.3f}"])
    for (op, label), t in cb.timings.items():
        if op == "startup" and label not in STARTUP_TARGETS:
            rows.append([t.label, f"{t.median:.3f}", "", "", "", "info", f"{min(t.samples):.3f}-{max(t.samples):.3f}",
                         "", f"{t.cpu_median:.3f}", ""])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    print("Medians of wall seconds per command (create-rm: per create + rm pair); RATIO = lamina / podman.")
    print("inprocess rows: the same work through ImageService in one process, against podman's command.")
    print("CPU = median user + system seconds of the command (wait4). lamina runs as `python -m lamina`, so the")
    print("startup rows (interpreter, then interpreter + CLI imports) are a floor under each of its commands.")
    noisy = [f"{t.op}/{t.tool} ({f:.2f}s of {w:.2f}s)" for t in cb.timings.values()
             for w, f in zip(t.samples, t.foreign_cpu_samples, strict=True) if f > max(0.1 * w, 0.05)]
    if noisy:
        print(f"WARNING: other processes used >10% of a core during {len(noisy)} sample(s): " + ", ".join(noisy[:8])
              + (" ..." if len(noisy) > 8 else ""))
    for op, problems in cb.checks.items():
        print(f"check {op}: " + ("ok" if not problems else f"FAILED ({len(problems)}): {problems[0]}"))


# Run by measure_inprocess in a fresh interpreter, against the lamina store the CLI runs used; prints JSON.
INPROCESS_SCRIPT = """
import json, statistics, time
from pathlib import Path
from lamina import ImageService
from lamina.config import Config

out = {{"inprocess create+rm": [], "inprocess changes": [], "inprocess commit": []}}
with ImageService.open(Config(root=Path({root!r}), runroot=Path({run!r}), driver="overlay")) as svc:
    for i in range({n} + 2):  # two untimed rounds first
        t0 = time.perf_counter()
        c = svc.create_container({image!r})
        svc.remove_container(c.id)
        create_rm = time.perf_counter() - t0
        c = svc.create_container({image!r})
        Path(svc.mount(c.id), "etc", f"lamina-inprocess-{{i}}").write_text("x")
        t0 = time.perf_counter()
        changes = svc.changes(c.id)
        changes_s = time.perf_counter() - t0
        assert any(ch.path == f"/etc/lamina-inprocess-{{i}}" for ch in changes), changes
        t0 = time.perf_counter()
        img = svc.commit_image(c.id, f"bench/inprocess:{{i}}")
        commit_s = time.perf_counter() - t0
        assert len(img.chain) == 2
        svc.unmount(c.id)
        svc.remove_container(c.id)
        svc.image_delete(img.id)
        if i >= 2:
            out["inprocess create+rm"].append(create_rm)
            out["inprocess changes"].append(changes_s)
            out["inprocess commit"].append(commit_s)
print(json.dumps(out))
"""


# -- main ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--only", nargs="+", choices=OPS, metavar="OP",
                    help=f"operations (default: all of {', '.join(OPS)})")
    ap.add_argument("--repeat", type=int, default=10, help="repetitions per command; the median counts (default 10)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rootfs", choices=["auto", "debootstrap", "synthetic"], default="auto",
                    help="how bench/run.py builds the rootfs workload if it is missing (default auto)")
    ap.add_argument("--no-startup", action="store_true", help="skip the informational start-up timings")
    ap.add_argument("--idle-wait", type=float, default=5.0, metavar="SECONDS",
                    help="before each timed command wait up to this long for other processes to go quiet (default 5)")
    ap.add_argument("--no-settle", action="store_true",
                    help="on journal-less ext4, do not wait for the inode-reuse delay after deletions (noisier)")
    ap.add_argument("--no-prefault", action="store_true", help="do not touch and free memory before each command")
    ap.add_argument("--keep", action="store_true", help="keep the stores (WORK/runs/containers)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run one lamina command per op under cProfile and -X importtime")
    ap.add_argument("--top", type=int, default=25, help="rows of profile output (default 25)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    for tool in ("tar", "podman"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is needed on PATH")
    if os.geteuid() != 0:
        ap.error("needs root (overlay mounts, podman's rootful store)")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    harness.lock_work_dir(work)  # held until exit, shared with bench/run.py and bench/images.py
    info, archive, built = ensure_image(work, args.rootfs)
    for mnt in harness._mounts_below(work / "runs"):  # left by an interrupted run: rm -rf would stop at them
        subprocess.run(["umount", "-l", mnt], check=False)
    bench = Bench(work, args.repeat, with_info=False, idle_wait=args.idle_wait, settle=not args.no_settle,
                  prefault=not args.no_prefault)
    if built:  # the rootfs source tree was just deleted
        bench.note_delete()
    ops = list(args.only or OPS)
    cb = ContainerBench(bench)
    machine = harness.machine_info(work)
    machine["podman"] = harness.tool_version(["podman", "--version"])
    t0 = time.perf_counter()
    try:
        bench.settle()  # the loads create ~7k files per store; nothing below deletes many
        cb.setup(archive)
        if args.profile:
            cb.profile(ops, args.top)
            return 0
        code = harness.code_fingerprint()
        if not args.no_startup:
            cb.measure_startup(args.repeat)
        for op in ops:
            {"read": cb.measure_read, "create-rm": cb.measure_create_rm, "diff": cb.measure_diff,
             "commit": cb.measure_commit, "inprocess": cb.measure_inprocess}[op](args.repeat)
        code_changed = harness.code_fingerprint() != code
    finally:
        cb.cleanup(args.keep)
    elapsed = time.perf_counter() - t0
    comps = cb.comparisons()
    print_table(cb, comps, info, args.repeat)
    if code_changed:
        print("WARNING: lamina's code (core/, drivers/) changed during the measurement: run again")
    print(f"measured in {elapsed:.0f}s, {bench.waited:.0f}s of it waiting for the machine to go idle and "
          f"{bench.settled:.0f}s for freed inodes to become reusable (cleanup included)")
    if args.json:
        doc = {
            "machine": machine,
            "repeat": args.repeat,
            "targets": TARGETS,
            "image": {"name": IMAGE, "archive": archive.name, "rootfs": asdict(info)},
            "commands": {"lamina": cb.lamina.base, "podman": cb.podman.base},
            "comparisons": comps,
            "timings": [t.summary() for t in cb.timings.values()],
            "checks": cb.checks,
            "code_changed_during": code_changed,
            "seconds": round(elapsed, 1),
            "idle_wait_seconds": round(bench.waited, 1),
            "inode_settle_seconds": round(bench.settled, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if any(cb.checks.values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

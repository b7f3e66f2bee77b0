#!/usr/bin/env python3
"""Benchmark ``lamina load`` and ``lamina save`` against podman, umoci and GNU tar on the Debian rootfs image.

Usage::

    python bench/images.py [--work DIR] [--only NAME ...] [--repeat N] [--driver vfs|overlay] [--json OUT]
    python bench/images.py --baselines-only      # podman, umoci and tar alone (lamina is not needed)
    python bench/images.py --build-only          # just build (or check) the input images

The input is the rootfs workload of ``bench/run.py`` (a debootstrap minbase when root with debootstrap,
else synthetic; built if missing) turned into an image by skopeo and umoci with the builders of
``tests/image_fixtures.py``: a one-layer OCI layout with a gzip layer (``debian:bookworm``) and a
docker-archive of it (``example.com/debian:bookworm``, uncompressed layer). Cached in ``WORK/images``.

Workloads and targets (ratios of medians, measured in the same run):

``load-docker``
    ``lamina load -i debian.tar`` (docker-archive) <= 0.5x ``podman load -i debian.tar`` (its own throwaway
    ``--root``/``--runroot``/``--tmpdir``, overlay storage driver by default: ``--podman-driver``).
``load-oci``
    ``lamina load -i LAYOUT`` (gzip OCI layout) <= 0.4x ``umoci unpack --image LAYOUT:debian:bookworm
    BUNDLE`` and <= 1.2x ``tar -xzf`` of the layer blob into an empty directory.
``save``
    ``lamina save -o out.tar --format docker-archive example.com/debian:bookworm`` <= 1.2x
    ``tar -cf out.tar -C TREE .`` where TREE is the image's layer extracted by tar; and ``lamina save --format
    oci-archive debian:bookworm`` (the same image, also loaded from the OCI layout: its kept blobs) <= 1.2x.

lamina runs as the CLI in a subprocess (start-up included) against a throwaway store
(``--root``/``--runroot``, ``--driver``, default vfs). Timing, noise control (settle wait after deletions,
prefaulted memory, idle wait, ``sync`` before each command, warm inputs, bytecode cache), the lock on the
work directory and clean-up are bench/run.py's, imported from it. Outside the timing, once: every archive
lamina saves is read back (skopeo inspects it; Python hashes its layers against the DiffIDs and its config
against the config digest; the oci-archive must keep the layout's manifest, config and layer digests),
podman's image ID is checked against the config digest, and with vfs the trees
lamina loaded are compared with tar's extraction of the layer.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import run as harness  # noqa: E402  (bench/run.py)
from run import MIB, TAR_EXTRACT_FLAGS, Bench, Variant, WorkloadInfo, log  # noqa: E402

import image_fixtures as fx  # noqa: E402  (tests/image_fixtures.py: the builders the tests use)

WORKLOADS = ("load-docker", "load-oci", "save")


@dataclass(frozen=True)
class Target:
    workload: str
    variant: str
    baseline: str
    limit: float  # the variant's median must be at most this multiple of the baseline's


TARGETS = (
    Target("load-docker", "lamina-load", "podman-load", 0.5),
    Target("load-oci", "lamina-load", "umoci-unpack", 0.4),
    Target("load-oci", "lamina-load", "tar-xzf", 1.2),
    Target("save", "lamina-save", "tar-cf", 1.2),
    Target("save", "lamina-save-oci", "tar-cf", 1.2),
)


@dataclass
class Timing:
    workload: str
    variant: str
    label: str
    command: list[str]
    samples: list[float]
    user_samples: list[float]
    sys_samples: list[float]
    foreign_cpu_samples: list[float]
    median: float
    min: float
    max: float
    user_median: float
    sys_median: float
    maxrss_kib: int


@dataclass
class Comparison:
    workload: str
    variant: str
    baseline: str
    ratio: float
    target: float
    verdict: str  # PASS or MISS


@dataclass
class Inputs:
    rootfs: WorkloadInfo
    oci: fx.ImageFacts
    docker: fx.ImageFacts
    small_oci: fx.ImageFacts  # for warm-ups
    small_docker: fx.ImageFacts


# -- inputs ----------------------------------------------------------------------------------------------
def build_inputs(work: Path, rootfs_mode: str) -> tuple[Inputs, bool]:
    """The rootfs workload (bench/run.py's) as images, and the small umoci image for warm-ups."""
    info, built = harness.ensure_workload(work, "rootfs", rootfs_mode, False)
    cache = work / "images"
    t0 = time.perf_counter()
    oci, docker = fx.debian_images(work / info.tar, cache, rootfs_sha256=info.sha256)
    key = hashlib.sha256(f"{fx.tool_versions()}|{fx.BUILDER_VERSION}".encode()).hexdigest()[:8]
    small = cache / f"small-{key}"
    if not (small / "done").exists():
        tmp = small.with_name(small.name + ".tmp")
        harness.remove_tree(tmp)
        tmp.mkdir(parents=True)
        fx.build_small_layout(tmp / "oci", tmp)
        fx.copy_image(f"oci:{tmp / 'oci'}:{fx.SMALL_NAME}",
                      f"docker-archive:{tmp / 'docker.tar'}:{fx.SMALL_DOCKER_NAME}")
        (tmp / "done").write_text("\n")
        harness.remove_tree(small)
        os.rename(tmp, small)
    inputs = Inputs(info, oci, docker, fx.inspect_image("oci", small / "oci", fx.SMALL_NAME),
                    fx.inspect_image("docker-archive", small / "docker.tar"))
    log(f"images ready in {time.perf_counter() - t0:.1f}s: {oci.path} ({fx.DEBIAN_NAME}), {docker.path} "
        f"({fx.DEBIAN_DOCKER_NAME}); rootfs {info.source}, {harness.human_bytes(info.bytes)}")
    return inputs, built


def lamina_has(command: str) -> bool:
    """Whether the installed lamina CLI has ``command`` (``load``, ``save``)."""
    proc = subprocess.run([sys.executable, "-m", "lamina", command, "--help"], capture_output=True, check=False)
    return proc.returncode == 0


# -- the harness -----------------------------------------------------------------------------------------
class ImageBench:
    def __init__(self, bench: Bench, inputs: Inputs, driver: str, podman_driver: str, with_lamina: bool) -> None:
        self.b = bench
        self.inputs = inputs
        self.driver = driver
        self.podman_driver = podman_driver
        self.with_lamina = with_lamina
        self.checks: dict[str, list[str]] = {}
        self.code_changed: list[str] = []
        # podman reads /etc/containers/storage.conf unless told otherwise: a file of our own (the command-line
        # flags override its paths), so that no host option (mount_program, additional stores) takes part.
        conf = bench.work / "images" / "podman-storage.conf"
        conf.write_text(f'[storage]\ndriver = "{podman_driver}"\nrunroot = "{bench.work / "images" / "podman-run"}"\n'
                        f'graphroot = "{bench.work / "images" / "podman-root"}"\n')
        bench.env["CONTAINERS_STORAGE_CONF"] = str(conf)
        self.podman_run = Path(tempfile.mkdtemp(prefix="lamina-bench-"))
        self.tree = bench.runs / "save-input" / "tree"
        self.save_store = bench.runs / "save-input" / "store"

    # commands
    def lamina(self, out: Path, *args: str | os.PathLike[str]) -> list[str]:
        return self.b.lamina(out, self.driver, *args)

    def podman(self, out: Path, *args: str | os.PathLike[str]) -> list[str]:
        # podman refuses a runroot longer than 50 characters: its runroot and tmpdir (lock files, a few
        # bytes) go to a short directory in /tmp, one per store
        short = self.podman_run / hashlib.sha256(str(out).encode()).hexdigest()[:12]
        return ["podman", "--root", str(out / "root"), "--runroot", str(short / "run"), "--tmpdir", str(short / "tmp"),
                "--storage-driver", self.podman_driver, *[os.fspath(a) for a in args]]

    def tar_xz_blobs(self, facts: fx.ImageFacts, out: Path) -> list[str]:
        blobs = [str(facts.blob(d)) for d in facts.layer_digests]
        if len(blobs) == 1:
            return ["tar", "-xzf", blobs[0], "-C", str(out), *TAR_EXTRACT_FLAGS]
        script = 'out=$1; shift; for b; do tar -xzf "$b" -C "$out" ' + " ".join(TAR_EXTRACT_FLAGS) + " || exit; done"
        return ["bash", "-c", script, "tar-layers", str(out), *blobs]

    def run_quiet(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(cmd, cwd=self.b.work, env=self.b.env, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc

    def variants(self, workload: str) -> list[Variant]:
        oci, docker = self.inputs.oci, self.inputs.docker
        runs = self.b.runs / workload
        vs: list[Variant] = []
        if workload == "load-docker":
            vs.append(Variant("podman-load", f"podman load ({self.podman_driver})", docker.path, None, False,
                              lambda out: self.podman(out, "load", "-q", "-i", docker.path)))
            if self.with_lamina:
                vs.append(Variant("lamina-load", f"lamina load ({self.driver})", docker.path, "podman-load", False,
                                  lambda out: self.lamina(out, "load", "-q", "-i", docker.path)))
        elif workload == "load-oci":
            vs.append(Variant("umoci-unpack", "umoci unpack", oci.path, None, False,
                              lambda out: ["umoci", "unpack", "--image", f"{oci.path}:{fx.DEBIAN_NAME}",
                                           str(out / "bundle")]))
            vs.append(Variant("tar-xzf", "tar -xzf (layer blob)", oci.path, None, False,
                              lambda out: self.tar_xz_blobs(oci, out)))
            if self.with_lamina:
                vs.append(Variant("lamina-load", f"lamina load ({self.driver}, OCI layout)", oci.path, "umoci-unpack",
                                  False, lambda out: self.lamina(out, "load", "-q", "-i", oci.path)))
        elif workload == "save":
            vs.append(Variant("tar-cf", "tar -cf (unpacked tree)", self.tree, None, False,
                              lambda out: ["tar", "-cf", str(out / "out.tar"), "-C", str(self.tree), "."]))
            if self.with_lamina:
                # the store is prepare_save()'s; each run writes a new file next to the tar runs' directories
                vs.append(Variant("lamina-save", f"lamina save ({self.driver}, docker-archive)", self.tree, "tar-cf",
                                  False, lambda out: self.lamina(self.save_store, "save", "-o",
                                                                 runs / f"{out.name}.tar", "--format",
                                                                 "docker-archive", fx.DEBIAN_DOCKER_NAME)))
                # the same image under the name it was loaded with from the OCI layout: its kept blobs
                vs.append(Variant("lamina-save-oci", f"lamina save ({self.driver}, oci-archive)", self.tree,
                                  "tar-cf", False, lambda out: self.lamina(self.save_store, "save", "-o",
                                                                           runs / f"{out.name}.tar", "--format",
                                                                           "oci-archive", fx.DEBIAN_NAME)))
        return vs

    # warm-up and preparation (untimed)
    def warm_up(self) -> None:
        """One untimed run of every tool on the small image: binaries, bytecode cache, podman's first start."""
        w = self.b.runs / "warmup-images"
        small_oci, small_docker = self.inputs.small_oci, self.inputs.small_docker
        self.run_quiet(self.podman(w / "podman", "load", "-q", "-i", small_docker.path))
        self.run_quiet(["umoci", "unpack", "--image", f"{small_oci.path}:{fx.SMALL_NAME}", str(w / "umoci")])
        if self.with_lamina:
            self.run_quiet(self.lamina(w / "lamina", "load", "-i", small_oci.path))
            self.run_quiet(self.lamina(w / "lamina", "load", "-i", small_docker.path))
            self.run_quiet(self.lamina(w / "lamina", "save", "-o", w / "lamina-save.tar", "--format", "docker-archive",
                                       fx.SMALL_DOCKER_NAME))

    def prepare_save(self) -> None:
        """The inputs of the save workload: the layer extracted by tar, a store holding the image (untimed)."""
        self.tree.mkdir(parents=True)
        self.run_quiet(self.tar_xz_blobs(self.inputs.oci, self.tree))
        warm_tree(self.tree)
        if self.with_lamina:
            self.run_quiet(self.lamina(self.save_store, "load", "-i", self.inputs.docker.path))
            self.run_quiet(self.lamina(self.save_store, "load", "-i", self.inputs.oci.path))  # the same image ID
            # reads the store once before timing, and checks what it gives
            self.checks["save-input"] = self.save_and_check(self.save_store, fx.DEBIAN_DOCKER_NAME,
                                                            self.b.runs / "save-input" / "warm.tar", self.inputs.docker)

    def save_and_check(self, store: Path, name: str, dest: Path, expected: fx.ImageFacts) -> list[str]:
        """``lamina save`` (untimed), then :func:`check_archive`."""
        cmd = self.lamina(store, "save", "-o", dest, "--format", "docker-archive", name)
        proc = subprocess.run(cmd, cwd=self.b.work, env=self.b.env, capture_output=True, check=False)
        if proc.returncode != 0:
            return [f"lamina save {name} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}"]
        return check_archive(dest, expected, name if name == fx.DEBIAN_DOCKER_NAME else None)

    # measuring
    def measure(self, workload: str) -> list[Timing]:
        vs = self.variants(workload)
        (self.b.runs / workload).mkdir(parents=True, exist_ok=True)
        for v in vs:
            if v.input.is_file():
                harness.warm(v.input)
            elif v.input.is_dir() and workload != "save":
                for blob in (v.input / "blobs" / "sha256").iterdir():
                    harness.warm(blob)
        self.b.settle()
        code = harness.code_fingerprint()
        nbytes = self.inputs.rootfs.bytes
        for rep in range(self.b.repeat):
            k = rep % len(vs)
            for v in vs[k:] + vs[:k]:
                s = self.b.timed(v, self.b.out_dir(_info(workload), v.key, rep), f"{workload}-{v.key}-{rep}", nbytes)
                v.samples.append(s)
                log(f"{workload:11s} rep {rep + 1}/{self.b.repeat} {v.label:38s} {s.wall:8.3f}s  user {s.user:6.2f}s"
                    f"  sys {s.sys:6.2f}s  others {s.foreign_cpu:5.2f}s")
            if rep == 0:
                self.checks[workload] = self.verify(workload)
        if harness.code_fingerprint() != code:
            log(f"WARNING: lamina's code (core/, drivers/) changed while {workload} was measured")
            self.code_changed.append(workload)
        return [timing(workload, v) for v in vs]

    def verify(self, workload: str) -> list[str]:
        problems: list[str] = []
        out0 = self.b.runs / workload
        oci, docker = self.inputs.oci, self.inputs.docker
        if workload == "load-docker":
            ids = self.run_quiet(self.podman(out0 / "podman-load-0", "images", "--no-trunc", "--format", "{{.ID}}"))
            if ids.stdout.decode().split() not in ([docker.config_digest], [docker.config_digest.partition(":")[2]]):
                problems.append(f"podman's image ID {ids.stdout.decode().split()} is not the config digest "
                                f"{docker.config_digest}")
            if self.with_lamina:
                problems += self.save_and_check(out0 / "lamina-load-0", fx.DEBIAN_DOCKER_NAME, out0 / "check.tar",
                                                docker)
                if self.tree.is_dir():  # made by prepare_save() when the save workload runs
                    problems += self.compare_tree(workload, self.tree)
        elif workload == "load-oci" and self.with_lamina:
            problems += self.save_and_check(out0 / "lamina-load-0", fx.DEBIAN_NAME, out0 / "check.tar", oci)
            problems += self.compare_tree(workload, out0 / "tar-xzf-0")
        elif workload == "save" and self.with_lamina:
            problems += check_archive(out0 / "lamina-save-0.tar", docker, fx.DEBIAN_DOCKER_NAME)
            problems += check_layout_archive(out0 / "lamina-save-oci-0.tar", oci)
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        log(f"{workload}: correctness check {status}")
        for p in problems[:20]:
            log(f"  {p}")
        return problems

    def compare_tree(self, workload: str, expected: Path) -> list[str]:
        """With vfs: the layer lamina loaded (its only layer directory) against tar's extraction of the layer."""
        layer_dirs = sorted((self.b.runs / workload / "lamina-load-0" / "root" / "vfs" / "dir").glob("*"))
        if self.driver != "vfs" or len(layer_dirs) != 1:
            log(f"{workload}: tree comparison skipped ({self.driver}, {len(layer_dirs)} vfs layer directories)")
            return []
        return [f"tree: {d}" for d in harness.compare_trees(expected, layer_dirs[0])]

    def cleanup(self, keep: bool) -> None:
        """Remove podman's runroots (always) and the outputs (unless ``keep``); unmount what was left first."""
        for d in (self.b.runs, self.podman_run):
            for mnt in harness._mounts_below(d):
                subprocess.run(["umount", "-l", mnt], check=False)
        harness.remove_tree(self.podman_run)
        if not keep:
            self.b.cleanup()


def _info(workload: str) -> WorkloadInfo:
    return WorkloadInfo(name=workload, tar="", source="", sha256="", bytes=0, entries=0, build_seconds=0.0)


def warm_tree(tree: Path) -> None:
    """Read every file of a tree once (tar -c to /dev/null would skip the contents)."""
    subprocess.run(f"tar -cf - -C {shlex.quote(str(tree))} . | cat > /dev/null", shell=True, check=True)


def check_archive(path: Path, expected: fx.ImageFacts, tag: str | None) -> list[str]:
    """A docker-archive lamina saved: skopeo reads it, its layers hash to the DiffIDs, its config to its digest,
    and its RepoTags hold ``tag`` (when given)."""
    problems: list[str] = []
    try:
        got = fx.inspect_image("docker-archive", path)
    except RuntimeError as e:
        return [f"skopeo cannot read {path.name}: {e}"]
    if got.config_digest != expected.config_digest:
        problems.append(f"{path.name}: config {got.config_digest} != {expected.config_digest}")
    if got.diff_ids != expected.diff_ids:
        problems.append(f"{path.name}: DiffIDs {got.diff_ids} != {expected.diff_ids}")
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        entry = manifest[0]
        if tag is not None and tag not in (entry.get("RepoTags") or []):
            problems.append(f"{path.name}: RepoTags {entry.get('RepoTags')} lack {tag}")
        for name, want in [(entry["Config"], expected.config_digest),
                           *zip(entry["Layers"], expected.diff_ids, strict=False)]:
            f = tf.extractfile(name)
            if f is None:
                problems.append(f"{path.name}: {name} is not a file")
                continue
            h = hashlib.sha256()
            while chunk := f.read(4 * MIB):
                h.update(chunk)
            if "sha256:" + h.hexdigest() != want:
                problems.append(f"{path.name}: {name} hashes to sha256:{h.hexdigest()}, expected {want}")
    return problems


def check_layout_archive(path: Path, expected: fx.ImageFacts) -> list[str]:
    """An oci-archive lamina saved from the blobs it kept: skopeo reads the manifest, config and layer digests
    the layout was loaded with (the kept blobs, copied as stored)."""
    try:
        got = fx.inspect_image("oci-archive", path, fx.DEBIAN_NAME.partition(":")[2])
    except RuntimeError as e:
        return [f"skopeo cannot read {path.name}: {e}"]
    return [f"{path.name}: {what} {a} != {b}" for what, a, b in (
        ("manifest", got.manifest_digest, expected.manifest_digest),
        ("config", got.config_digest, expected.config_digest),
        ("layers", got.layer_digests, expected.layer_digests),
    ) if a != b]


def timing(workload: str, v: Variant) -> Timing:
    walls = [s.wall for s in v.samples]
    return Timing(workload, v.key, v.label, v.make(Path("OUT")), [round(w, 4) for w in walls],
                  [round(s.user, 3) for s in v.samples], [round(s.sys, 3) for s in v.samples],
                  [round(s.foreign_cpu, 3) for s in v.samples], round(statistics.median(walls), 4),
                  round(min(walls), 4), round(max(walls), 4), round(statistics.median(s.user for s in v.samples), 3),
                  round(statistics.median(s.sys for s in v.samples), 3), max(s.maxrss_kib for s in v.samples))


def compare(timings: list[Timing]) -> list[Comparison]:
    by_key = {(t.workload, t.variant): t for t in timings}
    out: list[Comparison] = []
    for tg in TARGETS:
        a, b = by_key.get((tg.workload, tg.variant)), by_key.get((tg.workload, tg.baseline))
        if a is None or b is None:
            continue
        ratio = round(a.median / b.median, 3)
        out.append(Comparison(tg.workload, tg.variant, tg.baseline, ratio, tg.limit,
                              "PASS" if ratio <= tg.limit else "MISS"))
    return out


# -- reporting -------------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_report(ib: ImageBench, timings: list[Timing], comparisons: list[Comparison]) -> None:
    inp = ib.inputs
    print()
    print(f"Input: rootfs workload ({inp.rootfs.source}, {inp.rootfs.entries:,d} entries, "
          f"{harness.human_bytes(inp.rootfs.bytes)}) as an image: OCI layout with one gzip layer "
          f"({harness.human_bytes(inp.oci.layer_sizes[0])}), docker-archive with the layer uncompressed.")
    print(f"lamina driver: {ib.driver}; podman storage driver: {ib.podman_driver} (podman's default is overlay)")
    print()
    noisy: list[str] = []
    rows: list[list[str]] = []
    for t in timings:
        rows.append([t.workload, t.label, f"{t.median:.3f}", f"{t.min:.3f}", f"{t.max:.3f}", f"{t.user_median:.2f}",
                     f"{t.sys_median:.2f}", f"{t.maxrss_kib / 1024:.0f}"])
        noisy += [f"{t.workload}/{t.variant} ({f:.1f}s of {w:.1f}s)" for w, f in
                  zip(t.samples, t.foreign_cpu_samples, strict=True) if f > max(0.1 * w, 0.05)]
    _table(["WORKLOAD", "COMMAND", "MEDIAN s", "MIN s", "MAX s", "USER s", "SYS s", "RSS MiB"], rows)
    if comparisons:
        print()
        _table(["WORKLOAD", "RATIO OF MEDIANS", "RATIO", "TARGET", "RESULT"],
               [[c.workload, f"{c.variant} / {c.baseline}", f"{c.ratio:.2f}x", f"<={c.target:.1f}x", c.verdict]
                for c in comparisons])
    elif not ib.with_lamina:
        print("\nlamina was not measured (no load/save command, or --baselines-only): no ratios.")
    print()
    if noisy:
        print(f"WARNING: other processes used >10% of a core during {len(noisy)} sample(s): " + ", ".join(noisy[:8]))
    for name, problems in ib.checks.items():
        print(f"correctness {name}: " + ("ok" if not problems else f"FAILED ({len(problems)}): {problems[0]}"))


# -- main ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="NAME",
                    help=f"workloads to run (default: all of {', '.join(WORKLOADS)})")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per command; the median counts (default 3)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--driver", choices=["vfs", "overlay"], default="vfs", help="lamina's storage driver (default vfs)")
    ap.add_argument("--podman-driver", choices=["overlay", "vfs"], default="overlay",
                    help="podman's storage driver (default overlay, podman's own default)")
    ap.add_argument("--rootfs", choices=["auto", "debootstrap", "synthetic"], default="auto",
                    help="how bench/run.py builds the rootfs workload if it is missing (default auto)")
    ap.add_argument("--baselines-only", action="store_true", help="time podman, umoci and tar only")
    ap.add_argument("--idle-wait", type=float, default=30.0, metavar="SECONDS",
                    help="before each timed command wait up to this long for other processes to go quiet")
    ap.add_argument("--no-settle", action="store_true",
                    help="on journal-less ext4, do not wait for the inode-reuse delay after deletions (noisier)")
    ap.add_argument("--no-prefault", action="store_true",
                    help="do not touch and free memory before each timed command (noisier on lazily backed VMs)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (WORK/runs)")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the input images and stop")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    for tool in ("tar", "gzip", "skopeo", "umoci", "podman"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is needed on PATH")
    if os.geteuid() != 0:
        ap.error("needs root (podman and umoci with real ownership, like the tests)")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    harness.lock_work_dir(work)  # held until exit: runs sharing a work directory would delete each other's outputs
    inputs, built = build_inputs(work, args.rootfs)
    if args.build_only:
        return 0
    with_lamina = not args.baselines_only and lamina_has("load") and lamina_has("save")
    if not with_lamina and not args.baselines_only:
        log("this lamina has no load/save command: measuring the baselines only")
    names = list(args.only or WORKLOADS)
    need = args.repeat * 12 * inputs.rootfs.bytes
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"about {harness.human_bytes(need)} of free space is needed in {work}")
    bench = Bench(work, args.repeat, with_info=False, idle_wait=args.idle_wait, settle=not args.no_settle,
                  prefault=not args.no_prefault)
    if built:
        bench.note_delete()
    ib = ImageBench(bench, inputs, args.driver, args.podman_driver, with_lamina)
    machine = harness.machine_info(work)
    machine.update({t: harness.tool_version([t, "--version"]) for t in ("podman", "umoci", "skopeo")})
    t0 = time.perf_counter()
    timings: list[Timing] = []
    try:
        ib.warm_up()
        if "save" in names:
            ib.prepare_save()
        for n in names:
            timings += ib.measure(n)
    finally:
        ib.cleanup(args.keep)
    elapsed = time.perf_counter() - t0
    comparisons = compare(timings)
    print_report(ib, timings, comparisons)
    if ib.code_changed:
        print(f"WARNING: lamina's code changed during the measurement of {', '.join(ib.code_changed)}: run again")
    print(f"measured in {elapsed:.0f}s, {bench.waited:.0f}s of it waiting for the machine to go idle and "
          f"{bench.settled:.0f}s for freed inodes to become reusable (cleanup included)")
    if args.json:
        doc: dict[str, Any] = {
            "machine": machine,
            "repeat": args.repeat,
            "lamina_driver": args.driver,
            "podman_driver": args.podman_driver,
            "lamina_measured": with_lamina,
            "inputs": {"rootfs": asdict(inputs.rootfs), "oci": _facts_json(inputs.oci),
                       "docker_archive": _facts_json(inputs.docker)},
            "targets": [asdict(t) for t in TARGETS],
            "timings": [asdict(t) for t in timings],
            "comparisons": [asdict(c) for c in comparisons],
            "correctness": ib.checks,
            "code_changed_during": ib.code_changed,
            "seconds": round(elapsed, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if any(ib.checks.values()) else 0


def _facts_json(f: fx.ImageFacts) -> dict[str, Any]:
    return {"path": str(f.path), "names": f.names, "manifest_digest": f.manifest_digest,
            "config_digest": f.config_digest, "layer_digests": f.layer_digests, "diff_ids": f.diff_ids,
            "layer_sizes": f.layer_sizes}


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

#!/usr/bin/env python3
"""Benchmark ``lamina layer add`` against GNU ``tar -x`` on three workloads.

Usage::

    python bench/run.py [--work DIR] [--only NAME ...] [--repeat N] [--json OUT]
    python bench/run.py --profile [--only small]          # cProfile one lamina add per workload

Workloads (built once and cached in the work directory, default ``bench/work``):

``rootfs``
    A Debian root filesystem made by ``debootstrap --variant=minbase bookworm`` when debootstrap is
    installed and we are root, else a synthetic tree of about 7k entries and 150 MB (directories,
    small and medium files, symlinks, hard links, a few xattrs and non-root owners). A gzip copy
    (``rootfs.tar.gz``) is timed too, for information.
``small``
    50,000 files of 1-8 KiB in 300 directories.
``big``
    4 files of 256 MiB of random bytes.

Every tree is archived by GNU tar (``tar --numeric-owner --xattrs --sort=name -C DIR -cf X.tar .``).

Per workload the harness times, alternating the order in every repetition, in fresh directories on the
work directory's filesystem:

- ``lamina --driver vfs layer add X.tar`` into a new store, through the CLI in a subprocess
  (``python -m lamina``), so interpreter and CLI start-up are included, as a user would see them;
- ``tar -xf X.tar -C DIR --same-owner --numeric-owner --xattrs --xattrs-include=*`` (the same metadata
  lamina applies). lamina also computes the DiffID (sha256 of the tar stream) and writes the tar-split
  record needed for byte-exact export while it extracts; tar does neither. That is part of the comparison;
- for information: ``lamina --driver tarball layer add`` (no extraction; the driver fsyncs); GNU tar
  extracting while ``openssl dgst -sha256`` hashes the same stream through ``tee`` (the work lamina does,
  by C tools: column VS TAR+SHA); and on the rootfs, ``lamina layer add rootfs.tar.gz`` against
  ``tar -xzf`` (tar runs gzip in a second process, lamina decompresses in-process with ISA-L).

Medians of N repetitions (default 3) are compared with the targets (lamina/tar): rootfs <= 1.3x,
small <= 1.3x, big <= 1.1x. The page cache cannot be dropped reliably, so every input file is read once
before timing and ``sync`` runs before every timed command (dirty pages of the previous run are not
charged to the next). Outside the timing, each workload is checked once: the exported layer must be
byte-identical to the input tar (sha256), its ChainID must be the tar's sha256, and the tree lamina
extracted must match tar's (types, modes, owners, sizes, mtimes, link targets, hard-link counts, xattrs).

Noise control, each a measured effect on the 2-core VM this was written on:

- nothing is deleted between timed commands: every command gets a new directory and all outputs are
  removed when the run ends; on journal-less ext4 the next run first waits out the inode-reuse delay
  (:func:`inode_reuse_delay`, about 5.5 minutes after a mass deletion; ``--no-settle`` skips it);
- before each command, memory is touched and freed (:func:`prefault`; ``--no-prefault`` skips it);
- before each command, the harness waits (``--idle-wait``) for other processes to go quiet, and it
  records the CPU other processes used while each command ran; noisy samples are listed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import math
import mmap
import os
import platform
import pstats
import random
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BUILD_VERSION = 1  # bump when a builder changes: cached workloads of another version are rebuilt
MIB = 1 << 20
FIXED_MTIME = 1_700_000_000
DEBIAN_MIRROR = "http://deb.debian.org/debian"
WORKLOADS = ("startup", "rootfs", "small", "big")
TARGETS = {"rootfs": 1.3, "small": 1.3, "big": 1.1}
TAR_EXTRACT_FLAGS = ["--same-owner", "--numeric-owner", "--xattrs", "--xattrs-include=*"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- helpers ---------------------------------------------------------------------------------------------
def run(cmd: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os.fspath(c) for c in cmd], check=True, **kw)


def remove_tree(path: Path) -> None:
    """``rm -rf`` that never crosses into another filesystem (a leftover mount, say)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        run(["rm", "-rf", "--one-file-system", path])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read a file once so every timed command finds it in the page cache."""
    with open(path, "rb") as f:
        while f.read(4 * MIB):
            pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def count_entries(root: Path) -> int:
    n = 1  # the root itself ("./" in the archive)
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unavailable"
    return out.splitlines()[0].strip() if out else "unknown"


def inode_reuse_delay(path: Path) -> float:
    """Seconds ext4 without a journal avoids reusing freed inodes (0 for other filesystems).

    Journal-less ext4 (``find_inode_bit``/``recently_deleted``) skips inodes freed less than
    ``dirty_expire_centisecs`` ago -- plus 300 s while their inode-table block is dirty, which creating
    new inodes next to them makes it -- and looks each candidate up again on every allocation. Creating
    many files within minutes of deleting many costs quadratic system time (seen here: ``tar -x`` of the
    small workload from 0.5 s to 9.8 s). So the harness never deletes between timed commands, removes its
    outputs only at the end, and waits this long after the last removal before timing again.
    """
    st = os.stat(path)
    try:
        dev = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        journal = Path(f"/sys/fs/ext4/{dev}/journal_task").read_text().strip()
        expire = int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
    except (OSError, ValueError):
        return 0.0
    return expire + 300.0 + 5.0 if journal == "<none>" else 0.0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory, then free it.

    On a VM whose host backs guest memory lazily (and takes free memory back), the first touch of a
    page is expensive (here: about 1.3 s of system time per GiB, in page zeroing and copies) and is
    charged to whichever command allocates it: a ``tar -x`` of 1 GiB measured 0.5 s or 2.7 s depending
    on it. Touching the memory just before the timed command lets it reuse pages already backed.
    """
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes)
    try:
        with memoryview(m) as mv:
            mv[::4096] = b"\1" * len(range(0, nbytes, 4096))
    finally:
        m.close()


def code_fingerprint() -> str:
    """sha256 over lamina's sources (core/, drivers/): tells whether the code changed during a run."""
    h = hashlib.sha256()
    for d in ("core", "drivers"):
        for p in sorted((REPO / d).rglob("*.py")):
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


GNU_TIME = "/usr/bin/time"


def tar_with_sha256(src: Path, out: Path) -> list[str]:
    """GNU tar extracting while openssl hashes the same stream: tar doing lamina's work, in C."""
    script = ('set -o pipefail; { tee /dev/fd/3 < "$1" | tar -xf - -C "$2" ' + shlex.join(TAR_EXTRACT_FLAGS)
              + ' >&2; } 3>&1 | openssl dgst -sha256 > /dev/null')
    return ["bash", "-c", script, "tar-sha256", str(src), str(out)]


def has_gnu_time() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    r = subprocess.run([GNU_TIME, "--version"], capture_output=True, text=True, check=False)
    return "GNU" in r.stdout + r.stderr


def lock_work_dir(work: Path) -> int:
    """Take ``WORK/bench.lock`` (flock), waiting for another run of the harness to finish first."""
    fd = os.open(work / "bench.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another run of the harness uses {work}; waiting for it to finish")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# -- workloads -------------------------------------------------------------------------------------------
@dataclass
class WorkloadInfo:
    name: str
    tar: str
    source: str
    sha256: str
    bytes: int
    entries: int
    build_seconds: float
    version: int = BUILD_VERSION
    gz: str | None = None
    gz_bytes: int | None = None


def tar_tree(src: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    run(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", src, "-cf", tmp, "."])
    os.replace(tmp, out)


class Pools:
    """Pre-generated byte pools: files are slices of them (cheap, deterministic, varied)."""

    def __init__(self, rng: random.Random, size: int = 8 * MIB) -> None:
        self.binary = rng.randbytes(size)
        words = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
            for _ in range(3000)
        ]
        parts: list[str] = []
        total = 0
        while total < size:
            line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + "\n"
            parts.append(line)
            total += len(line)
        self.text = "".join(parts).encode()[:size]
        # "Executable-like": random bytes with runs of zeros, compresses about 2:1.
        chunks: list[bytes] = []
        total = 0
        while total < size:
            n = rng.randint(64, 4096)
            chunks.append(self.binary[total % (size - n) : total % (size - n) + n] if rng.random() < 0.5 else bytes(n))
            total += n
        self.exe = b"".join(chunks)[:size]

    def take(self, rng: random.Random, kind: str, n: int) -> bytes:
        pool = {"binary": self.binary, "text": self.text, "exe": self.exe}[kind]
        if n >= len(pool):
            reps = n // len(pool) + 1
            return (pool * reps)[:n]
        off = rng.randrange(0, len(pool) - n + 1)
        return pool[off : off + n]


def _write(path: Path, data: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: int = FIXED_MTIME) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def _freeze_dir_times(root: Path, mtime: int = FIXED_MTIME) -> None:
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        os.utime(dirpath, (mtime, mtime))


def build_synthetic_rootfs(dest: Path) -> None:
    """~7k entries, ~150 MB: 700 dirs, 5,600 files, 500 symlinks, 200 hard links, some xattrs/owners."""
    rng = random.Random(0x1A3117A)
    pools = Pools(rng)
    tops = ["bin", "etc", "lib", "opt", "sbin", "srv", "usr/bin", "usr/lib", "usr/share/doc", "usr/share/man",
            "usr/share/locale", "usr/include", "var/lib", "var/cache", "var/log"]
    dirs: list[str] = []
    for t in tops:
        (dest / t).mkdir(parents=True, exist_ok=True)
        dirs.append(t)
    while len(dirs) < 700:
        parent = rng.choice(dirs)
        if parent.count("/") >= 6:
            continue
        d = f"{parent}/d{len(dirs):03d}"
        (dest / d).mkdir()
        dirs.append(d)
    (dest / "tmp").mkdir()
    os.chmod(dest / "tmp", 0o1777)
    files: list[str] = []
    owners = [(0, 0)] * 20 + [(1, 1), (100, 101), (33, 33), (65534, 65534)]
    for i in range(5600):
        r = rng.random()
        if r < 0.85:
            size = int(math.exp(rng.uniform(math.log(64), math.log(16 * 1024))))
        elif r < 0.99:
            size = int(math.exp(rng.uniform(math.log(16 * 1024), math.log(256 * 1024))))
        else:
            size = int(math.exp(rng.uniform(math.log(256 * 1024), math.log(4 * MIB))))
        kind = rng.choices(["text", "exe", "binary"], weights=[5, 4, 1])[0]
        d = rng.choice(dirs)
        name = f"{d}/f{i:04d}" + (".so" if kind == "exe" and rng.random() < 0.5 else "")
        mode = 0o755 if kind == "exe" else rng.choice([0o644] * 8 + [0o600, 0o640])
        if kind == "exe" and rng.random() < 0.01:
            mode = 0o4755
        uid, gid = rng.choice(owners)
        _write(dest / name, pools.take(rng, kind, size), mode, uid, gid, FIXED_MTIME - rng.randrange(10**7))
        files.append(name)
    for i, name in enumerate(rng.sample(files, 40)):
        os.setxattr(dest / name, "user.bench.note", f"file {i}".encode())
    for i in range(500):
        d = rng.choice(dirs)
        target = rng.choice(files)
        link = dest / f"{d}/l{i:03d}"
        os.symlink("/" + target if rng.random() < 0.3 else os.path.relpath(target, d), link)
        if os.geteuid() == 0:
            os.lchown(link, 0, 0)
        os.utime(link, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    for i in range(200):
        d = rng.choice(dirs)
        os.link(dest / rng.choice(files), dest / f"{d}/h{i:03d}")
    _freeze_dir_times(dest)


def build_startup(dest: Path) -> None:
    """One small file: what is left is start-up and store creation (informational, no target)."""
    (dest / "etc").mkdir()
    _write(dest / "etc" / "hostname", b"lamina\n", 0o644)
    _freeze_dir_times(dest)


def build_small(dest: Path) -> None:
    """50,000 files of 1-8 KiB in 300 directories (20 x 15)."""
    rng = random.Random(0x5A11)
    pools = Pools(rng)
    dirs = [f"p{a:02d}/q{b:02d}" for a in range(20) for b in range(15)]
    for d in dirs:
        (dest / d).mkdir(parents=True)
    for i in range(50_000):
        size = rng.randint(1024, 8192)
        kind = "text" if i % 2 else "binary"
        _write(dest / dirs[i % len(dirs)] / f"file{i:05d}.dat", pools.take(rng, kind, size), 0o644)
    _freeze_dir_times(dest)


def build_big(dest: Path) -> None:
    """4 files of 256 MiB of random bytes (incompressible; the uncompressed tar is what is timed)."""
    for i in range(4):
        with open(dest / f"blob{i}.bin", "wb") as f:
            for _ in range(256):
                f.write(os.urandom(MIB))
        os.utime(dest / f"blob{i}.bin", (FIXED_MTIME, FIXED_MTIME))
    _freeze_dir_times(dest)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].encode().decode("unicode_escape")
            if mnt.startswith(prefix):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _safe_remove_chroot(path: Path) -> None:
    for mnt in _mounts_below(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    remove_tree(path)


def build_debootstrap(dest: Path, logfile: Path) -> bool:
    cmd = ["debootstrap", "--variant=minbase", "bookworm", str(dest), DEBIAN_MIRROR]
    log(f"running {' '.join(cmd)} (a few minutes; output in {logfile})")
    with open(logfile, "wb") as lf:
        try:
            rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=1800, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    if rc != 0:
        log(f"debootstrap failed (exit {rc}); see {logfile}; falling back to the synthetic rootfs")
        return False
    if _mounts_below(dest):
        log("debootstrap left mounts behind; unmounting them")
        for mnt in _mounts_below(dest):
            subprocess.run(["umount", "-l", mnt], check=False)
    return True


def ensure_workload(work: Path, name: str, rootfs_mode: str, rebuild: bool) -> tuple[WorkloadInfo, bool]:
    """The cached workload, built first if missing or stale; and whether it was built now."""
    tar = work / f"{name}.tar"
    meta_path = work / f"{name}.json"
    if not rebuild and tar.exists() and meta_path.exists():
        info = WorkloadInfo(**json.loads(meta_path.read_text()))
        wanted_ok = name != "rootfs" or rootfs_mode == "auto" or info.source == rootfs_mode
        gz_ok = name != "rootfs" or (info.gz is not None and (work / info.gz).exists()
                                     and (work / info.gz).stat().st_size == info.gz_bytes)  # not replaced since
        if info.version == BUILD_VERSION and wanted_ok and gz_ok:
            return info, False
    log(f"building workload {name!r} in {work}")
    t0 = time.perf_counter()
    src = work / f"{name}.src"
    _safe_remove_chroot(src)
    source = "synthetic"
    if name == "rootfs":
        want_deb = rootfs_mode == "debootstrap" or (
            rootfs_mode == "auto" and shutil.which("debootstrap") is not None and os.geteuid() == 0
        )
        if rootfs_mode == "debootstrap" and (shutil.which("debootstrap") is None or os.geteuid() != 0):
            raise SystemExit("--rootfs debootstrap needs debootstrap on PATH and root")
        if want_deb and build_debootstrap(src, work / "rootfs.debootstrap.log"):
            source = "debootstrap"
        else:
            if rootfs_mode == "debootstrap":
                raise SystemExit("debootstrap failed")
            _safe_remove_chroot(src)
            src.mkdir()
            build_synthetic_rootfs(src)
    else:
        src.mkdir()
        {"startup": build_startup, "small": build_small, "big": build_big}[name](src)
    entries = count_entries(src)
    tar_tree(src, tar)
    _safe_remove_chroot(src)
    info = WorkloadInfo(name=name, tar=tar.name, source=source, sha256=sha256_file(tar), bytes=tar.stat().st_size,
                        entries=entries, build_seconds=0.0)
    if name == "rootfs":
        gz = work / "rootfs.tar.gz"
        with open(gz.with_name(gz.name + ".tmp"), "wb") as out:
            run(["gzip", "-6", "-n", "-c", tar], stdout=out)
        os.replace(gz.with_name(gz.name + ".tmp"), gz)
        info.gz, info.gz_bytes = gz.name, gz.stat().st_size
    info.build_seconds = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(asdict(info), indent=2) + "\n")
    log(f"built {name}: {info.entries} entries, {human_bytes(info.bytes)}, {info.source}, {info.build_seconds}s")
    return info, True


# -- measurement -----------------------------------------------------------------------------------------
@dataclass
class Sample:
    wall: float
    user: float
    sys: float
    maxrss_kib: int
    minflt: int  # minor page faults
    foreign_cpu: float  # CPU seconds other processes used while this command ran (noise)

    @property
    def cpu(self) -> float:
        return self.user + self.sys


_HZ = os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def wait_idle(max_wait: float, window: float = 0.5, threshold: float = 0.1) -> float:
    """Wait (up to ``max_wait`` s) until the machine has been idle for two windows; return the time waited.

    Idle: less than ``threshold`` of one core busy. Other people's test runs on a shared 2-core machine
    otherwise show up directly in the timings.
    """
    t0 = time.perf_counter()
    quiet = 0
    while quiet < 2 and time.perf_counter() - t0 < max_wait:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        quiet = quiet + 1 if cpu_busy_seconds() - b0 < threshold * window else 0
    return time.perf_counter() - t0


@dataclass
class Variant:
    key: str  # e.g. "lamina-vfs"
    label: str
    input: Path
    compare_to: str | None  # key of the baseline variant (ratio), None for a baseline
    informational: bool
    make: Callable[[Path], list[str]]  # output dir -> command
    samples: list[Sample] = field(default_factory=list)
    stdout: str = ""


@dataclass
class Result:
    workload: str
    variant: str
    label: str
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
    minflt_median: int
    ratio: float | None = None
    baseline: str | None = None
    target: float | None = None
    verdict: str = ""
    ratio_hashed: float | None = None  # lamina (vfs) against tar extracting while openssl hashes the stream


class Bench:
    def __init__(self, work: Path, repeat: int, with_info: bool, idle_wait: float, settle: bool = True,
                 prefault: bool = True) -> None:
        self.work = work
        self.idle_wait = idle_wait
        self.waited = 0.0
        self.repeat = repeat
        self.with_info = with_info
        self.runs = work / "runs"
        self.logs = work / "logs"
        self.runs.mkdir(exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        # An empty configuration file: no /etc/lamina or $XDG_CONFIG_HOME file can change the setup.
        self.config = work / "storage.toml"
        self.config.write_text("[storage]\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_")}
        # An installed lamina has its bytecode compiled; with PYTHONDONTWRITEBYTECODE (set on some dev
        # machines) every run would compile lamina again (~40 ms). The cache goes to the work directory.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        self.checks: dict[str, list[str]] = {}
        self.reuse_delay = inode_reuse_delay(work) if settle else 0.0
        self.stamp = self.runs / ".last-cleanup"  # wall-clock time of the last mass deletion, across runs
        self.settled = 0.0
        self.prefault = prefault
        self.gnu_time = has_gnu_time()
        self.hash_baseline = shutil.which("openssl") is not None and shutil.which("bash") is not None
        self.code_changed: list[str] = []
        self.cleanup()
        self.warm_up()

    def warm_up(self) -> None:
        """One untimed ``layer add`` per driver: fills the bytecode cache, loads the interpreter's files."""
        tar = self.runs / "warmup.tar"
        with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
            ti = tarfile.TarInfo("warmup")
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"hi\n"))
        for driver in ("vfs", "tarball"):
            run(self.lamina(self.runs / f"warmup-{driver}", driver, "layer", "add", tar), cwd=self.work, env=self.env,
                stdout=subprocess.DEVNULL)

    @property
    def last_delete(self) -> float:
        try:
            return float(self.stamp.read_text())
        except (OSError, ValueError):
            return 0.0

    def note_delete(self) -> None:
        self.stamp.write_text(f"{time.time()}\n")

    def cleanup(self) -> None:
        """Remove every output of earlier runs (only between runs: see :func:`inode_reuse_delay`)."""
        stale = [p for p in self.runs.iterdir() if p != self.stamp]
        if stale:
            log(f"removing {len(stale)} output(s) in {self.runs}")
            for p in stale:
                remove_tree(p)
            os.sync()
            self.note_delete()

    def settle(self) -> None:
        """Let the inode-reuse delay of recent deletions pass (see :func:`inode_reuse_delay`)."""
        left = self.last_delete + self.reuse_delay - time.time()
        if left > 0:
            log(f"{self.work} is on ext4 without a journal, which is slow to create files for minutes after "
                f"many were deleted: waiting {left:.0f}s (--no-settle skips this)")
            time.sleep(left)
            self.settled += left

    def lamina(self, out: Path, driver: str, *args: str | os.PathLike[str]) -> list[str]:
        return [sys.executable, "-m", "lamina", "--config", str(self.config), "--root", str(out / "root"),
                "--runroot", str(out / "run"), "--driver", driver, *[os.fspath(a) for a in args]]

    def variants(self, info: WorkloadInfo) -> list[Variant]:
        tar = self.work / info.tar

        def tar_x(src: Path, z: bool) -> Callable[[Path], list[str]]:
            return lambda out: ["tar", "-xzf" if z else "-xf", str(src), "-C", str(out), *TAR_EXTRACT_FLAGS]

        vs = [
            Variant("tar", "tar -xf", tar, None, False, tar_x(tar, False)),
            Variant("lamina-vfs", "lamina layer add (vfs)", tar, "tar", False,
                    lambda out: self.lamina(out, "vfs", "layer", "add", tar)),
        ]
        if self.with_info:
            if self.hash_baseline:
                vs.append(Variant("tar-sha256", "tar -xf + sha256 (tee, openssl)", tar, None, True,
                                  lambda out: tar_with_sha256(tar, out)))
            vs.append(Variant("lamina-tarball", "lamina layer add (tarball)", tar, "tar", True,
                              lambda out: self.lamina(out, "tarball", "layer", "add", tar)))
            if info.gz:
                gz = self.work / info.gz
                vs.append(Variant("tar-gz", "tar -xzf (.tar.gz)", gz, None, True, tar_x(gz, True)))
                vs.append(Variant("lamina-vfs-gz", "lamina layer add (vfs, .tar.gz)", gz, "tar-gz", True,
                                  lambda out: self.lamina(out, "vfs", "layer", "add", gz)))
        return vs

    def timed(self, v: Variant, out: Path, tag: str, out_bytes: int) -> Sample:
        if out.exists():
            raise RuntimeError(f"{out} exists: outputs are only removed between workloads")
        if not v.key.startswith("lamina"):
            out.mkdir(parents=True)  # tar -C needs the directory; lamina creates its store itself
        os.sync()
        if self.idle_wait > 0:
            self.waited += wait_idle(self.idle_wait)
        if self.prefault:
            # room for the output's page cache and lamina's buffers, within half the memory available
            prefault(min(int(out_bytes * 1.25) + 512 * MIB, mem_available() // 2))
        cmd = v.make(out)
        stdout_path = self.logs / f"{tag}.out"
        stderr_path = self.logs / f"{tag}.err"
        rss_path = self.logs / f"{tag}.rss"
        rss_path.unlink(missing_ok=True)
        # The peak RSS wait4 reports for a child starts at its parent's own peak (exec records the old
        # mm's high-water mark), so the command runs under GNU time, a small C program, when there is one.
        run_cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_path), *cmd] if self.gnu_time else cmd
        with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
            busy0 = cpu_busy_seconds()
            t0 = time.perf_counter()
            p = subprocess.Popen(run_cmd, stdout=so, stderr=se, cwd=self.work, env=self.env)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            busy = cpu_busy_seconds() - busy0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err = stderr_path.read_text(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {err}")
        v.stdout = stdout_path.read_text().strip()
        foreign = max(0.0, busy - ru.ru_utime - ru.ru_stime)
        maxrss = ru.ru_maxrss
        if self.gnu_time:
            with contextlib.suppress(OSError, ValueError, IndexError):
                maxrss = int(rss_path.read_text().split()[-1])
        return Sample(wall, ru.ru_utime, ru.ru_stime, maxrss, ru.ru_minflt, foreign)

    def out_dir(self, info: WorkloadInfo, key: str, rep: int) -> Path:
        return self.runs / info.name / f"{key}-{rep}"

    def check_space(self, infos: Sequence[WorkloadInfo]) -> None:
        need = sum(int(len(self.variants(i)) * self.repeat * i.bytes * 1.4) for i in infos)
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise SystemExit(f"about {human_bytes(need)} of free space is needed in {self.work} (every output is "
                             f"kept until the run ends), {human_bytes(free)} free; use --repeat or --only")

    def measure(self, info: WorkloadInfo) -> list[Result]:
        vs = self.variants(info)
        for path in {v.input for v in vs}:
            warm(path)
        self.settle()
        code = code_fingerprint()
        for rep in range(self.repeat):
            k = rep % len(vs)
            order = vs[k:] + vs[:k]  # rotate so no variant always runs first (or right after another)
            for v in order:
                s = self.timed(v, self.out_dir(info, v.key, rep), f"{info.name}-{v.key}-{rep}", info.bytes)
                v.samples.append(s)
                log(f"{info.name:7s} rep {rep + 1}/{self.repeat} {v.label:34s} {s.wall:8.3f}s  user {s.user:6.2f}s"
                    f"  sys {s.sys:6.2f}s  minflt {s.minflt:7d}  others {s.foreign_cpu:5.2f}s")
            if rep == 0:
                self.checks[info.name] = self.verify(info, vs)
        if code_fingerprint() != code:
            log(f"WARNING: lamina's code (core/, drivers/) changed while {info.name} was measured")
            self.code_changed.append(info.name)
        return self.results(info, vs)

    def results(self, info: WorkloadInfo, vs: list[Variant]) -> list[Result]:
        by_key = {v.key: v for v in vs}
        out: list[Result] = []
        for v in vs:
            walls = [s.wall for s in v.samples]
            users = [s.user for s in v.samples]
            syss = [s.sys for s in v.samples]
            r = Result(info.name, v.key, v.label, [round(w, 4) for w in walls], [round(c, 3) for c in users],
                       [round(c, 3) for c in syss], [round(s.foreign_cpu, 3) for s in v.samples],
                       round(statistics.median(walls), 4), round(min(walls), 4), round(max(walls), 4),
                       round(statistics.median(users), 3), round(statistics.median(syss), 3),
                       max(s.maxrss_kib for s in v.samples), int(statistics.median(s.minflt for s in v.samples)))
            if v.compare_to is not None:
                base = statistics.median(s.wall for s in by_key[v.compare_to].samples)
                r.ratio = round(statistics.median(walls) / base, 3)
                r.baseline = v.compare_to
                target = TARGETS.get(info.name)
                if not v.informational and target is not None:
                    r.target = target
                    r.verdict = "PASS" if r.ratio <= target else "MISS"
                else:
                    r.verdict = "info"
            out.append(r)
        if "tar-sha256" in by_key:
            hashed = statistics.median(s.wall for s in by_key["tar-sha256"].samples)
            for r in out:
                if r.variant == "lamina-vfs":
                    r.ratio_hashed = round(r.median / hashed, 3)
        return out

    # -- correctness (outside the timing) -------------------------------------------------------------
    def verify(self, info: WorkloadInfo, vs: list[Variant]) -> list[str]:
        problems: list[str] = []
        tree_tar = self.out_dir(info, "tar", 0)
        for v in vs:
            if not v.key.startswith("lamina"):
                continue
            chain = v.stdout.splitlines()[-1] if v.stdout else ""
            if chain != f"sha256:{info.sha256}":
                problems.append(f"{v.key}: ChainID {chain!r} is not the tar's sha256 {info.sha256}")
            store = self.out_dir(info, v.key, 0)
            exported = self.runs / f"{v.key}.export.tar"
            run(self.lamina(store, v.key.split("-")[1], "layer", "export", chain, "-o", exported),
                cwd=self.work, env=self.env, stdout=subprocess.DEVNULL)
            got = sha256_file(exported)
            exported.unlink()
            if got != info.sha256:
                problems.append(f"{v.key}: exported layer sha256 {got} != input tar sha256 {info.sha256}")
            if v.key == "lamina-vfs":
                layer_dirs = list((store / "root" / "vfs" / "dir").iterdir())
                if len(layer_dirs) != 1:
                    problems.append(f"{v.key}: expected one layer directory, found {len(layer_dirs)}")
                else:
                    problems += [f"tree: {d}" for d in compare_trees(tree_tar, layer_dirs[0])]
        status = "OK" if not problems else f"{len(problems)} problem(s)"
        log(f"{info.name}: correctness check {status}")
        for p in problems[:20]:
            log(f"  {p}")
        return problems


def _describe(path: str, st: os.stat_result) -> tuple[Any, ...]:
    mode = st.st_mode
    kind = stat.S_IFMT(mode)
    link = os.readlink(path) if stat.S_ISLNK(mode) else ""
    size = st.st_size if stat.S_ISREG(mode) else 0
    nlink = st.st_nlink if stat.S_ISREG(mode) else 0
    rdev = st.st_rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
    perms = stat.S_IMODE(mode) if not stat.S_ISLNK(mode) else 0
    try:
        xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False))
                              for k in os.listxattr(path, follow_symlinks=False)))
    except OSError:
        xattrs = ()
    return (kind, perms, st.st_uid, st.st_gid, size, st.st_mtime_ns, link, nlink, rdev, xattrs)


_FIELDS = ("type", "mode", "uid", "gid", "size", "mtime_ns", "symlink", "nlink", "rdev", "xattrs")


def _walk(root: Path) -> Iterator[tuple[str, tuple[Any, ...]]]:
    yield ".", _describe(str(root), os.lstat(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            yield os.path.relpath(p, root), _describe(p, os.lstat(p))


def compare_trees(expected: Path, actual: Path, limit: int = 20) -> list[str]:
    """Metadata differences between tar's extraction and lamina's (contents are checked by the export)."""
    a = dict(_walk(expected))
    b = dict(_walk(actual))
    diffs: list[str] = []
    for p in sorted(a.keys() - b.keys())[:limit]:
        diffs.append(f"{p}: missing in lamina's tree")
    for p in sorted(b.keys() - a.keys())[:limit]:
        diffs.append(f"{p}: only in lamina's tree")
    for p in sorted(a.keys() & b.keys()):
        if a[p] != b[p]:
            fields = [f"{f} tar={x!r} lamina={y!r}" for f, x, y in zip(_FIELDS, a[p], b[p], strict=True) if x != y]
            diffs.append(f"{p}: " + "; ".join(fields))
            if len(diffs) >= 3 * limit:
                break
    return diffs


# -- reporting -------------------------------------------------------------------------------------------
def print_table(infos: dict[str, WorkloadInfo], results: list[Result], checks: dict[str, list[str]]) -> None:
    headers = ["WORKLOAD", "VARIANT", "MEDIAN s", "MIN s", "MAX s", "USER s", "SYS s", "RSS MiB", "MINFLT",
               "RATIO", "TARGET", "RESULT", "VS TAR+SHA"]
    rows: list[list[str]] = []
    noisy: list[str] = []
    for r in results:
        rows.append([r.workload, r.label, f"{r.median:.3f}", f"{r.min:.3f}", f"{r.max:.3f}", f"{r.user_median:.2f}",
                     f"{r.sys_median:.2f}", f"{r.maxrss_kib / 1024:.0f}", f"{r.minflt_median:,d}",
                     f"{r.ratio:.2f}x" if r.ratio is not None else "",
                     f"<={r.target:.1f}x" if r.target is not None else "", r.verdict,
                     f"{r.ratio_hashed:.2f}x" if r.ratio_hashed is not None else ""])
        for w, f in zip(r.samples, r.foreign_cpu_samples, strict=True):
            if f > max(0.1 * w, 0.05):  # /proc/stat counts in clock ticks (10 ms)
                noisy.append(f"{r.workload}/{r.variant} ({f:.1f}s of {w:.1f}s)")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print()
    print("Workloads:")
    for info in infos.values():
        gz = f", gzip {human_bytes(info.gz_bytes)}" if info.gz_bytes else ""
        print(f"  {info.name:7s} {info.source:11s} {info.entries:>7,d} entries  {human_bytes(info.bytes)}{gz}"
              f"  sha256:{info.sha256[:12]}")
    print()
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    print("RATIO = median lamina / median tar of the same input; RESULT against the target (info: no target).")
    print("VS TAR+SHA = lamina (vfs) / tar extracting while openssl sha256-hashes the stream (tee): the same work"
          " done by C tools.")
    print("lamina also hashes the stream (DiffID) and writes the tar-split record for exact export; tar does not.")
    print("USER/SYS: median CPU of the command (children included); RSS: its peak resident set (of the largest"
          " process); MINFLT: its median minor page faults.")
    if noisy:
        print(f"WARNING: other processes used >10% of a core during {len(noisy)} sample(s): " + ", ".join(noisy[:8])
              + (" ..." if len(noisy) > 8 else ""))
    for name, problems in checks.items():
        print(f"correctness {name}: " + ("export sha256 == tar sha256, ChainID ok, tree matches tar's"
                                         if not problems else f"FAILED ({len(problems)}): {problems[0]}"))


def native_built() -> bool:
    """Whether the interpreter that runs lamina here has its C fast path (lamina.fs._native)."""
    probe = "import lamina.fs.apply as a; print(a.native_enabled())"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    return r.stdout.strip() == "True"


def machine_info(work: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return r.stdout.strip()

    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "tar": tool_version(["tar", "--version"]),
        "lamina": tool_version([sys.executable, "-m", "lamina", "--version"]),
        "lamina_native": native_built(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "core", "drivers")),
        "code_fingerprint": code_fingerprint(),
        "work_fs": fs.stdout.strip(),
        "euid": os.geteuid(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- profiling -------------------------------------------------------------------------------------------
def profile(bench: Bench, info: WorkloadInfo, top: int) -> None:
    out = bench.runs / f"profile-{info.name}"
    bench.settle()
    prof = bench.work / "profiles" / f"{info.name}.prof"
    prof.parent.mkdir(exist_ok=True)
    cmd = bench.lamina(out, "vfs", "layer", "add", bench.work / info.tar)
    cmd[1:3] = ["-m", "cProfile", "-o", str(prof), "-m", "lamina"]
    warm(bench.work / info.tar)
    os.sync()
    if bench.prefault:
        prefault(min(int(info.bytes * 1.25) + 512 * MIB, mem_available() // 2))
    t0 = time.perf_counter()
    run(cmd, cwd=bench.work, env=bench.env, stdout=subprocess.DEVNULL)
    log(f"{info.name}: lamina add under cProfile took {time.perf_counter() - t0:.2f}s; profile in {prof}")
    for key in ("cumulative", "tottime"):
        print(f"\n=== {info.name}: top {top} by {key} ===")
        pstats.Stats(str(prof)).strip_dirs().sort_stats(key).print_stats(top)


# -- main ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="NAME",
                    help=f"workloads to run (default: all of {', '.join(WORKLOADS)})")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per command; the median counts (default 3)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rootfs", choices=["auto", "debootstrap", "synthetic"], default="auto",
                    help="how to build the rootfs workload (default: debootstrap if available and root)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the selected workloads")
    ap.add_argument("--no-info", action="store_true",
                    help="skip the informational variants (tarball driver, tar+sha256, gzip input)")
    ap.add_argument("--idle-wait", type=float, default=30.0, metavar="SECONDS",
                    help="before each timed command wait up to this long for other processes to go quiet "
                    "(0: do not wait; default 30)")
    ap.add_argument("--no-settle", action="store_true",
                    help="on journal-less ext4, do not wait for the inode-reuse delay after deletions (noisier)")
    ap.add_argument("--no-prefault", action="store_true",
                    help="do not touch and free memory before each timed command (noisier on lazily backed VMs)")
    ap.add_argument("--keep", action="store_true", help="keep the extracted trees and stores (WORK/runs)")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the workloads and stop")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run one lamina add per workload under cProfile and print hotspots")
    ap.add_argument("--top", type=int, default=25, help="rows of profile output (default 25)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    for tool in ("tar", "gzip", "rm"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is needed on PATH")
    if "GNU tar" not in tool_version(["tar", "--version"]):
        ap.error("GNU tar is needed")

    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    lock_work_dir(work)  # held until exit: runs sharing a work directory would delete each other's outputs
    names: list[str] = list(args.only or WORKLOADS)
    infos: dict[str, WorkloadInfo] = {}
    built = False
    for n in names:
        infos[n], fresh = ensure_workload(work, n, args.rootfs, args.rebuild)
        built = built or fresh
    if args.build_only:
        return 0
    bench = Bench(work, args.repeat, with_info=not args.no_info, idle_wait=args.idle_wait, settle=not args.no_settle,
                  prefault=not args.no_prefault)
    if built:  # the source trees were just deleted
        bench.note_delete()

    if args.profile:
        try:
            for n in names:
                profile(bench, infos[n], args.top)
        finally:
            if not args.keep:
                bench.cleanup()
        return 0

    bench.check_space(list(infos.values()))
    machine = machine_info(work)  # before measuring: the commit and sources measured
    if not machine["lamina_native"]:
        print(f"WARNING: {sys.executable} runs lamina without its C fast path (lamina.fs._native is not built for "
              "it, or LAMINA_NATIVE=0): run the harness with the project's .venv/bin/python", file=sys.stderr)
    t0 = time.perf_counter()
    results: list[Result] = []
    try:
        for n in names:
            results += bench.measure(infos[n])
    finally:
        if not args.keep:
            bench.cleanup()
    elapsed = time.perf_counter() - t0
    print_table(infos, results, bench.checks)
    if bench.code_changed:
        print(f"WARNING: lamina's code changed during the measurement of {', '.join(bench.code_changed)}: "
              "those numbers mix versions; run again")
    print(f"measured in {elapsed:.0f}s, {bench.waited:.0f}s of it waiting for the machine to go idle and "
          f"{bench.settled:.0f}s for freed inodes to become reusable (cleanup included)")
    if args.json:
        doc = {
            "machine": machine,
            "repeat": args.repeat,
            "targets": TARGETS,
            "workloads": {n: asdict(i) for n, i in infos.items()},
            "results": [asdict(r) for r in results],
            "correctness": bench.checks,
            "code_changed_during": bench.code_changed,
            "seconds": round(elapsed, 1),
            "idle_wait_seconds": round(bench.waited, 1),
            "inode_settle_seconds": round(bench.settled, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"results written to {args.json}")
    failed_checks = any(bench.checks.values())
    return 1 if failed_checks else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

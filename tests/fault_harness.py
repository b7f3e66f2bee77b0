"""SIGKILL at random instants of lamina commands, and the proof that the store stays consistent.

A *trial* starts one command (``python -m lamina ...``, its own process group) on a prepared store, kills it
with SIGKILL after a random delay, and then checks, from the outside:

- the next command works (``lamina images --format json`` exits 0; it is also the one that runs recovery);
- the store is either as it was before the command or as the command leaves it when it finishes: every
  image complete before the kill is there with its names (but the one ``rmi`` removes, whole), at most
  the one image the command makes is new, whole and named as asked, containers and retained layers
  likewise (:func:`judge`);
- :func:`store_invariants.check_store` finds nothing: no row left ``incomplete`` or ``removing``, no lease,
  no driver directory, record or blob nothing owns, no partial blob, no mount under the store, reference
  counts that cover every user, and every image's layers export to their DiffIDs (here in-process through
  :class:`lamina.ImageService`);
- every content-store blob hashes to its digest;
- the store's own check, ``lamina system check`` (``--quick`` where asked), exits 0, when this lamina has
  that command.

The store is then brought back to its baseline through the CLI (which is a test of its own: the command
that was killed, or its undoing, must work now), and the next trial starts.

The baseline (:meth:`FaultStore.prepare`): ``fault/base:1`` (one layer B), ``fault/app:1`` and
``fault/victim:1`` (B and two layers of their own each), containers ``fault-c1`` and ``fault-c2`` of
``fault/app:1`` with files written into them, and a layer ``layer add``-ed on its own. The commands
(:data:`OPS`): ``load`` of ``fault/loaded:1`` (B and two more layers), ``pull`` of ``fault/pulled:1`` from a
registry (B and two more, gzip), ``import`` of a root filesystem, ``layer add``, ``commit`` of
``fault-c1``, ``squash`` of ``fault/app:1``, ``rm`` of ``fault-c2``, ``rmi`` of ``fault/victim:1``,
``tag`` of ``fault/app:1``, ``image prune -a`` (which takes ``fault/base:1`` and ``fault/victim:1``, the images
no container uses), and ``system check --repair`` when the CLI has it (on the leftovers of a
``layer add`` killed just before, so that it has something to repair). Every input is made here,
in-process, with :class:`lamina.testing.TarBuilder` and a few lines of JSON; the registry's copy is pushed
by skopeo.

Delays are drawn uniformly from the interpreter's start-up (:func:`startup_floor`) to the command's
duration, measured once per command and driver by a run that is not killed (and is checked like any
trial), and lowered whenever a trial's command ends before its kill. A trial's delay comes from
``(seed, driver, op, k)`` and that duration, so a failure names what reproduces it. :func:`kill_at` kills
at one exact point instead, for regression tests of the windows the random kills found.

Shared by ``tests/test_faults.py`` (a sample) and ``bench/faults.py`` (the long run).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from store_invariants import check_store

from lamina.testing import TarBuilder

OPS: tuple[str, ...] = ("load", "pull", "import", "layer add", "commit", "squash", "rm", "rmi", "tag", "prune")
REPAIR = "system check --repair"  # killed too when the CLI has `system check` (see has_system_check)
DRIVERS = ("vfs", "overlay")

NAME = "docker.io/fault/{}:1"  # how the store records the short names below
BASE, APP, VICTIM, LOADED, IMPORTED, COMMITTED, TAGGED = (
    "fault/base:1", "fault/app:1", "fault/victim:1", "fault/loaded:1", "fault/imported:1", "fault/committed:1",
    "fault/tagged:1",
)
PULLED_REPO = "fault/pulled:1"
C1, C2 = "fault-c1", "fault-c2"
CONTAINER_TIMEOUT = 300.0


def full_name(short: str) -> str:
    return f"docker.io/{short}" if short.count("/") == 1 and "." not in short.split("/")[0] else short


# -- inputs ---------------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(tag: str, files: int, size: int) -> bytes:
    """A layer of ``files`` files of ``size`` seeded random bytes under ``tag/``, in a few directories."""
    rng = random.Random(tag)
    tb = TarBuilder()
    tb.dir(tag)
    dirs = max(1, files // 25)
    for d in range(dirs):
        tb.dir(f"{tag}/d{d}")
    for i in range(files):
        tb.file(f"{tag}/d{i % dirs}/f{i}", rng.randbytes(size), mode=0o644 if i % 7 else 0o755)
    tb.symlink(f"{tag}/link", "d0/f0")
    return tb.build()


def base_tar() -> bytes:
    """Layer B: a tiny root filesystem every image of the baseline starts from."""
    tb = TarBuilder()
    for d in ("bin", "etc", "tmp", "usr", "usr/lib"):
        tb.dir(d)
    tb.file("etc/os-release", b"NAME=fault\n").file("bin/busybox", b"\x7fELF" + bytes(4096), mode=0o755)
    tb.symlink("bin/sh", "busybox")
    for i in range(40):
        tb.file(f"usr/lib/lib{i}.so", random.Random(i).randbytes(2048))
    return tb.build()


def _config(diff_ids: list[str], comment: str) -> bytes:
    doc = {
        "architecture": _host_arch(), "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Labels": {"fault": comment}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"fault harness: {comment} {i}"}
                    for i in range(len(diff_ids))],
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


@functools.cache
def _host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def write_docker_archive(directory: Path, name: str, layers: list[bytes]) -> str:
    """A docker-archive as a directory (``lamina load -i DIR``); returns the image ID (config digest)."""
    directory.mkdir(parents=True, exist_ok=True)
    diff_ids = [_sha256(data) for data in layers]
    config = _config(diff_ids, name)
    image_id = _sha256(config)
    paths = []
    for diff_id, data in zip(diff_ids, layers, strict=True):
        p = f"{diff_id[7:]}.tar"
        (directory / p).write_bytes(data)
        paths.append(p)
    (directory / f"{image_id[7:]}.json").write_bytes(config)
    manifest = [{"Config": f"{image_id[7:]}.json", "RepoTags": [name], "Layers": paths}]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return image_id


def write_oci_layout(directory: Path, name: str, layers: list[bytes]) -> tuple[str, str]:
    """An OCI layout with gzip layers and image ``name``; returns (image ID, manifest digest)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descs = []
    for data in layers:
        gz = gzip.compress(data, compresslevel=1, mtime=0)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz),
                      "size": len(gz)})
    config = _config([_sha256(data) for data in layers], name)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config),
                   "size": len(config)},
        "layers": descs,
    }).encode()
    mdigest = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}]}))
    return _sha256(config), mdigest


@dataclass(frozen=True)
class Inputs:
    """Everything the trials feed lamina, made once per run (both drivers share it)."""

    dir: Path
    archives: dict[str, Path]  # docker-archive directories: BASE, APP, VICTIM, LOADED
    ids: dict[str, str]  # their image IDs, and the pulled image's
    rootfs: Path  # `import` input
    layer: Path  # `layer add` input
    layer_chain: str
    keep: Path  # a layer the baseline holds by `layer add`
    keep_chain: str
    pull_layout: Path  # the registry's copy of fault/pulled:1, pushed by skopeo
    pull_manifest: str
    payload: dict[str, bytes]  # files written into each container (path -> data)
    config: Path  # an empty lamina configuration file (no host settings take part)


def build_inputs(directory: Path, scale: float = 1.0) -> Inputs:
    """Make the inputs; ``scale`` multiplies the numbers of files (1.0: layers of 600 files of 16 KiB, which
    keep each command busy for about 0.1 to 0.4 s beyond its start-up on tmpfs)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = max(4, int(600 * scale))
    size = 16 * 1024
    b = base_tar()
    layers = {tag: layer_tar(tag, n, size) for tag in ("a1", "a2", "v1", "v2", "p1", "p2", "q1", "q2")}
    archives: dict[str, Path] = {}
    ids: dict[str, str] = {}
    for name, tags in ((BASE, []), (APP, ["a1", "a2"]), (VICTIM, ["v1", "v2"]), (LOADED, ["p1", "p2"])):
        path = directory / name.replace("/", "-").replace(":", "-")
        ids[name] = write_docker_archive(path, name, [b, *(layers[t] for t in tags)])
        archives[name] = path
    pulled_id, manifest = write_oci_layout(directory / "pulled-oci", PULLED_REPO,
                                           [b, layers["q1"], layers["q2"]])
    ids[PULLED_REPO] = pulled_id
    rootfs = directory / "rootfs.tar"
    rootfs.write_bytes(layer_tar("rootfs", 2 * n, size))
    layer = directory / "layer.tar"
    data = layer_tar("added", 2 * n, size)
    layer.write_bytes(data)
    keep = directory / "keep.tar"
    keep_data = layer_tar("keep", 4, 1024)
    keep.write_bytes(keep_data)
    rng = random.Random("payload")
    payload = {f"payload/p{i}.bin": rng.randbytes(size) for i in range(2 * n)}
    config = directory / "lamina.toml"
    config.write_text("")
    return Inputs(directory, archives, ids, rootfs, layer, _sha256(data), keep, _sha256(keep_data),
                  directory / "pulled-oci", manifest, payload, config)


# -- the store's state, read from its database ---------------------------------------------------------
@dataclass(frozen=True)
class State:
    images: dict[str, tuple[str, ...]]  # image ID -> its names, sorted
    containers: dict[str, str]  # container name -> image ID
    layers: dict[str, int]  # ChainID -> references, of the read-only layers the baseline retains itself

    def describe(self) -> str:
        imgs = ", ".join(f"{i[7:19]} {list(n)}" for i, n in sorted(self.images.items()))
        ctrs = ", ".join(f"{n} ({i[7:19]})" for n, i in sorted(self.containers.items()))
        lays = ", ".join(f"{c[7:19]} refs {r}" for c, r in sorted(self.layers.items()))
        return f"images: {imgs or '-'}; containers: {ctrs or '-'}; retained layers: {lays or '-'}"


def read_state(root: Path, chains: tuple[str, ...]) -> State:
    """What the store holds (only committed rows count: recovery has run when this is called)."""
    with contextlib.closing(sqlite3.connect(f"file:{root / 'lamina.db'}?mode=ro", uri=True, timeout=30)) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        images: dict[str, list[str]] = {}
        containers: dict[str, str] = {}
        if "images" in tables:
            images = {r[0]: [] for r in db.execute("SELECT id FROM images")}
            for name, iid in db.execute("SELECT name, image_id FROM image_names"):
                images.setdefault(iid, []).append(name)
        if "containers" in tables:
            containers = {str(r[0]): r[1] for r in db.execute(
                "SELECT COALESCE(name, id), image_id FROM containers WHERE state='created'")}
        layers = {r[0]: int(r[1]) for r in db.execute(
            "SELECT chain_id, refs FROM layers WHERE state='committed' AND rw=0") if r[0] in chains}
    return State({i: tuple(sorted(n)) for i, n in images.items()}, containers, layers)


# -- judging one trial ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """What a finished command adds to or takes from the store."""

    new_names: tuple[str, ...] | None = None  # one new image with exactly these names (None: no new image)
    new_id: str | None = None  # ... and this ID, when it is known in advance
    gone_image: str | None = None  # this image is removed, names and all
    gone_container: str | None = None
    added_name: tuple[str, str] | None = None  # (image ID, name) given to an existing image
    added_layer: str | None = None  # this ChainID gains one reference
    gone_some: tuple[str, ...] = ()  # any of these images may be removed, each whole (a prune)


def judge(before: State, after: State, expect: Expect) -> list[str]:
    """Problems if ``after`` is neither ``before`` nor what the finished command makes of it."""
    done = _finished(before, after, expect)
    if after == before or (done is not None and after == done):
        return []
    for k in range(1, len(expect.gone_some) + 1):
        for gone in itertools.combinations(expect.gone_some, k):
            images = {i: n for i, n in before.images.items() if i not in gone}
            if after == State(images, dict(before.containers), dict(before.layers)):
                return []
    why = f"before: {before.describe()}\n  after: {after.describe()}"
    if done is not None:
        why += f"\n  finished: {done.describe()}"
    return [f"the store is neither as before the command nor as the finished command leaves it:\n  {why}"]


def _finished(before: State, after: State, expect: Expect) -> State | None:
    images = dict(before.images)
    containers = dict(before.containers)
    layers = dict(before.layers)
    if expect.new_names is not None:
        new = [i for i in after.images if i not in before.images]
        if len(new) != 1 or (expect.new_id is not None and new[0] != expect.new_id):
            return None
        images[new[0]] = tuple(sorted(expect.new_names))
        for other, names in list(images.items()):  # a name moves to the new image
            if other != new[0]:
                images[other] = tuple(n for n in names if n not in expect.new_names)
    if expect.gone_image is not None:
        images.pop(expect.gone_image, None)
    if expect.gone_container is not None:
        containers.pop(expect.gone_container, None)
    if expect.added_name is not None:
        iid, name = expect.added_name
        images[iid] = tuple(sorted({*images.get(iid, ()), name}))
    if expect.added_layer is not None:
        layers[expect.added_layer] = layers.get(expect.added_layer, 0) + 1
    return State(images, containers, layers)


# -- verifying blobs and layers -------------------------------------------------------------------------
_VERIFIED_BLOBS: dict[tuple[str, int, int, int, int], bool] = {}


def blob_problems(root: Path) -> list[str]:
    """Content-store blobs that do not hash to their names (a blob once checked is not read again while
    its inode, size and times stay the same: blobs are written once, under another name, and renamed)."""
    problems = []
    blobs = root / "content" / "blobs"
    for algo in sorted(os.listdir(blobs)) if blobs.is_dir() else []:
        for name in sorted(os.listdir(blobs / algo)):
            p = blobs / algo / name
            st = p.stat()
            key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key in _VERIFIED_BLOBS:
                continue
            h = hashlib.new(algo)
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != name:
                problems.append(f"blob {algo}:{name} hashes to {algo}:{h.hexdigest()}")
            else:
                _VERIFIED_BLOBS[key] = True
    return problems


_VERIFIED_EXPORTS: dict[tuple[str, str], str] = {}  # (ChainID, fingerprint of its files) -> DiffID it exported to


def layer_fingerprint(root: Path, driver: str, chain: str, image_root: Path | None = None) -> str | None:
    """A digest of the lstat (inode, size, mode, mtime and ctime in ns) of every file lamina keeps for a layer:
    its tree in the driver and its tar-split record. Any write to them changes it (ctime cannot be set
    back), so a layer whose fingerprint is unchanged since it exported correctly exports the same bytes.
    None when the layer or its files cannot be found (the export then tells why)."""
    with contextlib.closing(sqlite3.connect(f"file:{root / 'lamina.db'}?mode=ro", uri=True, timeout=30)) as db:
        row = db.execute("SELECT id FROM layers WHERE chain_id=? AND state='committed'", (chain,)).fetchone()
    if row is None:
        return None
    lid = str(row[0])
    images_at = image_root or root  # image layers and their records (with an image store: there)
    tree = images_at / "vfs" / "dir" / lid if driver == "vfs" else images_at / "overlay" / lid / "diff"
    if not tree.is_dir():
        return None
    h = hashlib.sha256(lid.encode())
    for p in (images_at / "tar-split" / f"{lid}.tsr", images_at / "tar-split" / f"{lid}.tsr.sup"):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            h.update(f"{p.name} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in [".", *dirnames, *sorted(filenames)]:
            st = os.lstat(os.path.join(dirpath, name))
            h.update(f"{dirpath}/{name} {st.st_ino} {st.st_size} {st.st_mode} {st.st_mtime_ns} {st.st_ctime_ns}\n"
                     .encode(errors="surrogateescape"))
    return h.hexdigest()


@contextlib.contextmanager
def in_process_exports(root: Path, runroot: Path, driver: str, config: Path,
                       image_root: Path | None = None) -> Iterator[Callable[[str], str]]:
    """A function: ChainID -> sha256 of the layer's export through ImageService (or an error text).

    The store is opened at the first export, so that what runs before sees the store as the CLI left it. A
    layer that exported to its DiffID before and whose files are untouched since (:func:`layer_fingerprint`)
    is not read again."""
    from lamina.config import load_config
    from lamina.errors import LaminaError
    from lamina.service import ImageService

    with contextlib.ExitStack() as stack:
        opened: list[ImageService] = []

        def export(chain: str) -> str:
            fingerprint = layer_fingerprint(root, driver, chain, image_root)
            if fingerprint is not None and (chain, fingerprint) in _VERIFIED_EXPORTS:
                return _VERIFIED_EXPORTS[chain, fingerprint]
            if not opened:
                svc = ImageService.open(load_config(config, driver=driver, root=root, runroot=runroot))
                opened.append(stack.enter_context(svc))
            h = hashlib.sha256()
            try:
                with opened[0].export_layer(chain) as stream:
                    while chunk := stream.read(1 << 20):
                        h.update(chunk)
            except LaminaError as e:
                return f"error: {e.message}"
            got = "sha256:" + h.hexdigest()
            if fingerprint is not None and layer_fingerprint(root, driver, chain, image_root) == fingerprint:
                _VERIFIED_EXPORTS[chain, fingerprint] = got  # the caller compares it with the DiffID
            return got

        yield export


@functools.cache
def has_system_check(python: str = sys.executable) -> bool:
    """Whether this lamina has ``lamina system check`` (the harness was written while it was being added)."""
    proc = subprocess.run([python, "-m", "lamina", "system", "check", "--help"], capture_output=True, timeout=60)
    return proc.returncode == 0


# -- one store ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    op: str
    driver: str
    trial: int  # -1: the measuring run, not killed
    delay: float | None
    killed: bool
    seconds: float
    problems: list[str] = field(default_factory=list)

    def describe(self, seed: int) -> str:
        when = f"killed after {self.delay:.3f} s" if self.killed else "ran to its end"
        head = (f"seed {seed} driver {self.driver} op {self.op!r} trial {self.trial} "
                f"(delay {self.delay if self.delay is None else round(self.delay, 3)}): {when}")
        return head + "".join(f"\n  - {p}" for p in self.problems)


class FaultStore:
    """A store with the baseline, for one driver, and the commands that are killed on it."""

    def __init__(self, base: Path, driver: str, inputs: Inputs, registry_host: str | None,
                 *, system_check: bool | None = None, quick_check: bool = False, image_store: bool = False) -> None:
        self.base = base
        self.root = base / "root"
        self.image_root = base / "images" if image_store else None  # the store keeps its images apart
        self.runroot = base / "run"
        self.driver = driver
        self.inputs = inputs
        self.registry_host = registry_host
        self.system_check = has_system_check() if system_check is None else system_check
        self.quick_check = quick_check  # `system check --quick` after each trial (rows and presence only)
        self.work = base / "work"
        self.baseline: State | None = None
        self.durations: dict[str, float] = {}

    # -- commands -------------------------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        images = ["--image-store", str(self.image_root)] if self.image_root is not None else []
        return [sys.executable, "-m", "lamina", "--config", str(self.inputs.config), "--root", str(self.root),
                "--runroot", str(self.runroot), "--driver", self.driver, *images, *args]

    def cli(self, *args: str, check: bool = True, timeout: float = CONTAINER_TIMEOUT) -> str:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandFailed(f"lamina {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def ops(self) -> list[str]:
        out = [op for op in OPS if op != "pull" or self.registry_host is not None]
        return [*out, REPAIR] if self.system_check else out

    def command(self, op: str) -> list[str]:
        i = self.inputs
        return {
            "load": ["load", "-q", "-i", str(i.archives[LOADED])],
            "pull": ["pull", "-q", self.pulled_ref],
            "import": ["import", str(i.rootfs), IMPORTED],
            "layer add": ["layer", "add", str(i.layer)],
            "commit": ["commit", C1, COMMITTED],
            "squash": ["squash", APP],
            "rm": ["rm", C2],
            "rmi": ["rmi", VICTIM],
            "tag": ["tag", APP, TAGGED],
            "prune": ["image", "prune", "-a"],
            REPAIR: ["system", "check", "--repair"],
        }[op]

    @property
    def pulled_ref(self) -> str:
        return f"{self.registry_host}/{PULLED_REPO}"

    def expect(self, op: str) -> Expect:
        ids = self.inputs.ids
        if op == "load":
            return Expect(new_names=(full_name(LOADED),), new_id=ids[LOADED])
        if op == "pull":
            repo = self.pulled_ref.rsplit(":", 1)[0]
            return Expect(new_names=(self.pulled_ref, f"{repo}@{self.inputs.pull_manifest}"), new_id=ids[PULLED_REPO])
        if op == "import":
            return Expect(new_names=(full_name(IMPORTED),))
        if op == "commit":
            return Expect(new_names=(full_name(COMMITTED),))
        if op == "squash":
            return Expect(new_names=())
        if op == "layer add":
            return Expect(added_layer=self.inputs.layer_chain)
        if op == "rm":
            return Expect(gone_container=C2)
        if op == "rmi":
            return Expect(gone_image=ids[VICTIM])
        if op == "tag":
            return Expect(added_name=(ids[APP], full_name(TAGGED)))
        if op == "prune":  # every image no container uses, one at a time
            return Expect(gone_some=(ids[BASE], ids[VICTIM]))
        return Expect()  # system check --repair: a sound store stays as it is

    # -- the baseline ---------------------------------------------------------------------------------
    def prepare(self) -> State:
        """Make the baseline in a new store."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        for name in (BASE, APP, VICTIM):
            self.cli("load", "-q", "-i", str(self.inputs.archives[name]))
        self.cli("layer", "add", str(self.inputs.keep))
        for c in (C1, C2):
            self._container(c)
        self.baseline = self.state()
        return self.baseline

    def _container(self, name: str) -> None:
        self.cli("create", "--name", name, APP)
        path = Path(self.cli("mount", name).strip())
        try:
            for rel, data in self.inputs.payload.items():
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                (path / rel).write_bytes(data)
        finally:
            self.cli("umount", name)

    def state(self) -> State:
        return read_state(self.root, (self.inputs.keep_chain, self.inputs.layer_chain))

    def restore(self) -> list[str]:
        """Bring the store back to the baseline through the CLI; problems if a command fails or the
        store does not reach it."""
        assert self.baseline is not None
        want = self.baseline
        try:
            now = self.state()
            for name in sorted(set(now.containers) - set(want.containers)):
                self.cli("rm", "--force", name)
            for iid in sorted(set(now.images) - set(want.images)):
                self.cli("rmi", iid)
            now = self.state()
            for iid, names in want.images.items():
                if iid not in now.images:
                    name = next(n for n, i in self.inputs.ids.items() if i == iid)
                    self.cli("load", "-q", "-i", str(self.inputs.archives[name]))
                    continue
                for n in sorted(set(names) - set(now.images[iid])):
                    self.cli("tag", iid, n)
                for n in sorted(set(now.images[iid]) - set(names)):
                    self.cli("untag", iid, n)
            for c in sorted(set(want.containers) - set(now.containers)):
                self._container(c)
            for chain, refs in want.layers.items():
                for _ in range(refs - now.layers.get(chain, 0)):
                    self.cli("layer", "add", str(self.inputs.keep))
            for _ in range(now.layers.get(self.inputs.layer_chain, 0) - want.layers.get(self.inputs.layer_chain, 0)):
                self.cli("layer", "rm", self.inputs.layer_chain)
        except CommandFailed as e:
            return [f"bringing the store back to its baseline: {e}"]
        now = self.state()
        if now != want:
            return ["the store did not come back to its baseline:\n"
                    f"  want: {want.describe()}\n  have: {now.describe()}"]
        return []

    # -- trials ---------------------------------------------------------------------------------------
    def prelude(self, op: str, seed: int, k: int) -> None:
        """What ``op`` needs before it runs: ``system check --repair`` gets something to repair, what a
        ``layer add`` killed at a random instant left (as it left it: the check opens the store without
        recovering it; the next command after the repair recovers whatever the repair did not get to)."""
        if op == REPAIR:
            duration = self.durations.get("layer add", 0.3)
            self._run("layer add", trial_delay(seed, self.driver, f"{op}/prelude", k, duration, startup_floor()))

    def measure(self, op: str, seed: int = 0) -> Outcome:
        """Run ``op`` to its end once (timing it), then check and restore as after a kill."""
        self.prelude(op, seed, -1)
        before = self.state()
        started = time.monotonic()
        code, err = self._run(op, None)
        seconds = time.monotonic() - started
        self.durations[op] = seconds
        out = Outcome(op, self.driver, -1, None, False, seconds)
        if code != 0:
            out.problems.append(f"lamina {' '.join(self.command(op))} failed ({code}) without a kill: {err}")
        out.problems += self.verify(op, before)
        out.problems += self.restore()
        return out

    def trial(self, op: str, seed: int, k: int) -> Outcome:
        """Trial ``k`` of ``op``: kill after a delay drawn from (seed, driver, op, k), then verify and restore."""
        duration = self.durations.get(op)
        if duration is None:
            raise RuntimeError(f"measure {op!r} first")
        delay = trial_delay(seed, self.driver, op, k, duration, startup_floor())
        self.prelude(op, seed, k)
        before = self.state()
        started = time.monotonic()
        code, err = self._run(op, delay)
        out = Outcome(op, self.driver, k, delay, code is None, time.monotonic() - started)
        if code == 0:  # it ran to its end before the kill: it takes no longer than that
            self.durations[op] = min(duration, out.seconds)
        if code not in (None, 0):
            out.problems.append(f"lamina {' '.join(self.command(op))} failed ({code}) before the kill: {err}")
        out.problems += self.verify(op, before)
        out.problems += self.restore()
        return out

    def _run(self, op: str, delay: float | None) -> tuple[int | None, str]:
        """Run ``op``; with ``delay`` SIGKILL its process group after that many seconds. Returns its exit code
        (None when it was killed) and its stderr."""
        with tempfile.TemporaryFile(dir=self.work) as err:
            proc = subprocess.Popen(self.argv(*self.command(op)), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            code: int | None
            if delay is None:  # a blocking wait times the run exactly; the timer only guards against a hang
                watchdog = threading.Timer(CONTAINER_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
                watchdog.start()
                try:
                    code = proc.wait()
                finally:
                    watchdog.cancel()
            else:
                try:
                    code = proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started just above
                    proc.wait()
                    code = None
            err.seek(0)
            return code, err.read().decode(errors="replace").strip()

    def verify(self, op: str, before: State) -> list[str]:
        """Everything this module's docstring lists, on the store as the killed command left it."""
        nxt = subprocess.run(self.argv("images", "--format", "json"), capture_output=True, text=True, timeout=300)
        if nxt.returncode != 0:
            return [f"the next command, lamina images, failed ({nxt.returncode}): {nxt.stderr.strip()}"]
        problems = judge(before, self.state(), self.expect(op))
        with in_process_exports(self.root, self.runroot, self.driver, self.inputs.config, self.image_root) as export:
            problems += check_store(self.root, self.runroot, self.driver, export=export, image_root=self.image_root)
        problems += blob_problems(self.image_root or self.root)
        problems += self.own_check()
        return problems

    def own_check(self) -> list[str]:
        """``lamina system check`` (exit 0: sound), when this lamina has it."""
        if not self.system_check:
            return []
        quick = ["--quick"] if self.quick_check else []
        proc = subprocess.run(self.argv("system", "check", *quick, "--format", "json"), capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            return [f"lamina system check exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-2000:]}"]
        return []

    def unmount_leftovers(self) -> None:
        """Unmount whatever is still mounted under this store (after a failed run; nothing, normally)."""
        prefix = str(self.base.resolve())
        with open("/proc/self/mountinfo") as f:
            targets = [line.split()[4] for line in f if line.split()[4].startswith(prefix + "/")]
        for t in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", t], capture_output=True, check=False)


class CommandFailed(Exception):
    pass


def trial_delay(seed: int, driver: str, op: str, k: int, duration: float, floor: float = 0.0) -> float:
    """The kill's delay for trial ``k``: uniform from ``floor`` (the interpreter's start-up, before which a kill
    finds lamina doing nothing at all) to the command's measured duration."""
    return random.Random(f"{seed}/{driver}/{op}/{k}").uniform(min(floor, duration), duration)


@functools.cache
def startup_floor(python: str = sys.executable) -> float:
    """The shortest of three ``python -m lamina --version``: the interpreter and the CLI's imports, no store."""
    best = float("inf")
    for _ in range(3):
        started = time.monotonic()
        subprocess.run([python, "-m", "lamina", "--version"], capture_output=True, timeout=60, check=True)
        best = min(best, time.monotonic() - started)
    return best


def scratch_dir(prefix: str, fallback: Path) -> Path:
    """A new directory for stores: on tmpfs (/dev/shm) when there is one, else under ``fallback``. Trials
    delete and create thousands of files; on ext4 files created shortly after others were deleted cost
    several times more (see bench/README.md, "Noise control"), which made trials up to ten times slower."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    fallback.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=fallback))


def remove_scratch(store: FaultStore) -> None:
    """Unmount what is left under a store's directory and remove it."""
    import shutil

    store.unmount_leftovers()
    shutil.rmtree(store.base, ignore_errors=True)


# -- a kill at a chosen instant --------------------------------------------------------------------------
KILL_AT_SCRIPT = r"""
import importlib, os, signal, sys
when, point = sys.argv[1:3]
module_name, _, attr = point.partition(":")
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)  # the point must exist: a renamed function fails here, not silently never reached

def die(*args, **kwargs):
    if when == "return":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(owner, name, die)
from lamina.cli import main
main(sys.argv[3:])
"""


def kill_at(
    point: str, argv: list[str], *, when: str = "call", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``lamina ARGV`` in a process that SIGKILLs itself when it calls ``point`` (``module:Class.function``
    or ``module:function``, looked up where the code calls it), or with ``when="return"`` as soon as that
    call returns: the precise counterpart of a random kill, for regression tests of one window. ``argv``
    starts after ``lamina``."""
    assert when in ("call", "return")
    return subprocess.run([sys.executable, "-c", KILL_AT_SCRIPT, when, point, *argv], capture_output=True,
                          text=True, timeout=timeout)


def push_pulled_image(inputs: Inputs, registry_host: str) -> None:
    """Put ``fault/pulled:1`` into the registry with skopeo (not lamina: the registry's side is an oracle)."""
    from lamina.testing import require_tool

    dest = f"docker://{registry_host}/{PULLED_REPO}"
    cmd = [require_tool("skopeo"), "copy", "--quiet", "--dest-tls-verify=false", "--dest-no-creds",
           f"oci:{inputs.pull_layout}:{PULLED_REPO.rsplit(':', 1)[1]}", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def run(store: FaultStore, seed: int, trials: dict[str, int], *, log: Callable[[str], None] | None = None,
        on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """``trials[op]`` trials of each op on ``store`` (measuring each op first), interleaved op by op.

    After an inconsistency the store is made anew, so that one bug does not count again in every later
    trial. Returns every outcome, the measuring runs included."""
    outcomes: list[Outcome] = []

    def record(o: Outcome) -> None:
        outcomes.append(o)
        if on_outcome is not None:
            on_outcome(o)
        if o.problems:
            if log is not None:
                log(o.describe(seed))
            store.unmount_leftovers()
            fresh(store)

    for op in trials:
        record(store.measure(op, seed))
    for k in range(max(trials.values(), default=0)):
        for op, n in trials.items():
            if k < n:
                record(store.trial(op, seed, k))
    return outcomes


def fresh(store: FaultStore) -> None:
    """Replace ``store``'s files with a new baseline (its durations are kept)."""
    import shutil

    store.unmount_leftovers()
    for d in (store.root, store.runroot, store.work):
        shutil.rmtree(d, ignore_errors=True)
    store.prepare()

"""Running lamina CLI commands in many processes released at one instant, and judging their errors.

Each *worker* is ``sys.executable -c WORKER_SCRIPT``: it imports lamina's CLI (so start-up is paid before
the race), reports ready on a pipe, blocks reading a second pipe, and is released when the parent closes
that pipe's write end: every worker's ``read()`` returns EOF at the same moment. A worker then runs its
plan of commands one after the other; each command is a fork of the warm worker that calls
``lamina.cli.main(argv)`` with its stdout and stderr sent to files and an alarm as its timeout, so every
command is a process of its own (its own pid, its own store connections) and none pays the imports again.

Shared by ``tests/test_concurrency.py`` and ``bench/stress.py``; it uses only the CLI.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

WORKER_SCRIPT = r"""
import json, os, signal, sys, time, traceback
import lamina.cli
from lamina.cli import main
import lamina
lamina.ImageService  # warm: the store's modules are imported before the barrier

plan = json.loads(open(sys.argv[1]).read())
os.write(plan["ready_fd"], b"r")
os.close(plan["ready_fd"])
while os.read(plan["go_fd"], 1):  # blocks until the parent closes the write end: EOF for all at once
    pass
os.close(plan["go_fd"])
outdir = plan["outdir"]
results = []
for i, argv in enumerate(plan["ops"]):
    out_path = os.path.join(outdir, f"{i}.out")
    err_path = os.path.join(outdir, f"{i}.err")
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 97
        try:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(err, 2)
            signal.alarm(plan["op_timeout"])
            try:
                main(["--root", plan["root"], "--runroot", plan["runroot"], *argv])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 98
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append({
        "argv": argv,
        "code": os.waitstatus_to_exitcode(status),
        "stdout": open(out_path, errors="replace").read(),
        "stderr": open(err_path, errors="replace").read(),
        "seconds": time.monotonic() - started,
    })
with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f)
"""


@dataclass(frozen=True)
class OpResult:
    worker: int
    index: int
    argv: tuple[str, ...]
    code: int  # negative: killed by that signal (SIGALRM: the command timed out)
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        return f"worker {self.worker} op {self.index} `lamina {' '.join(self.argv)}` -> {self.code}: {self.stderr!r}"


def run_concurrently(
    root: Path,
    runroot: Path,
    plans: Sequence[Sequence[Sequence[str]]],
    workdir: Path,
    *,
    op_timeout: int = 120,
    timeout: float = 600,
) -> list[list[OpResult]]:
    """Run ``plans[i]`` (a list of CLI argvs, without --root/--runroot) in worker ``i``; all workers start
    their first command at the same instant. Returns each worker's results, in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    procs: list[subprocess.Popen[bytes]] = []
    outdirs: list[Path] = []
    try:
        for i, ops in enumerate(plans):
            outdir = Path(tempfile.mkdtemp(prefix=f"w{i}-", dir=workdir))
            plan_file = outdir / "plan.json"
            plan_file.write_text(json.dumps({
                "root": str(root), "runroot": str(runroot), "ops": [list(a) for a in ops],
                "outdir": str(outdir), "ready_fd": ready_w, "go_fd": go_r, "op_timeout": op_timeout,
            }))
            outdirs.append(outdir)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, str(plan_file)], pass_fds=(go_r, ready_w),
                stdout=subprocess.DEVNULL, stderr=(outdir / "worker.err").open("wb"), start_new_session=True,
            ))
        os.close(ready_w)
        ready_w = -1
        os.close(go_r)
        go_r = -1
        deadline = time.monotonic() + min(timeout, 120)
        got = 0
        while got < len(plans):  # the barrier: every worker is warm and waiting
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                raise TimeoutError(f"only {got} of {len(plans)} workers became ready")
            chunk = os.read(ready_r, 64)
            if not chunk:
                raise RuntimeError(f"a worker died before the barrier ({got} of {len(plans)} ready)")
            got += len(chunk)
        os.close(go_w)  # release every worker at once
        go_w = -1
        end = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(0.1, end - time.monotonic()))
    finally:
        for fd in (go_r, go_w, ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # our own worker's session, and nothing else
                p.wait()
    out: list[list[OpResult]] = []
    for i, (p, outdir) in enumerate(zip(procs, outdirs, strict=True)):
        results_file = outdir / "results.json"
        if p.returncode != 0 or not results_file.exists():
            raise RuntimeError(f"worker {i} failed ({p.returncode}): {(outdir / 'worker.err').read_text()[-2000:]}")
        rows = json.loads(results_file.read_text())
        out.append([
            OpResult(i, n, tuple(r["argv"]), int(r["code"]), r["stdout"], r["stderr"], float(r["seconds"]))
            for n, r in enumerate(rows)
        ])
    return out


# -- judging failures ---------------------------------------------------------------------------------
# What a refused command may say: a missing object, an object in use, or a conflict. Each pattern was seen
# in runs of the mixed workload (see test_concurrency.py).
ALLOWED_ERRORS: dict[str, re.Pattern[str]] = {
    "conflict": re.compile(r"conflict|already in use|referenced in multiple repositories"),
    "not found": re.compile(r"not found|no image|no container|was removed|has no name"),
    "in use": re.compile(r"in use|is used by|is mounted|has child|has dependent child"),
}


def classify(stderr: str) -> str | None:
    """The category of a refusal's message, or None when it is none of the allowed kinds."""
    text = stderr.strip()
    for kind, pattern in ALLOWED_ERRORS.items():
        if pattern.search(text):
            return kind
    return None


def op_problems(results: Sequence[OpResult]) -> list[str]:
    """Commands whose failure is not a clean refusal: several lines, a traceback, an internal error, a
    timeout or a crash, or a message that is not a conflict, a missing object or an object in use."""
    problems = []
    for r in results:
        if r.ok:
            continue
        text = r.stderr.strip()
        if r.code < 0:
            problems.append(f"killed by signal {-r.code} (timeout?): {r.describe()}")
        elif "\n" in text:
            problems.append(f"multi-line error: {r.describe()}")
        elif "internal error" in text or "Traceback" in text:
            problems.append(f"internal error: {r.describe()}")
        elif not text.startswith("Error: "):
            problems.append(f"not a lamina error line: {r.describe()}")
        elif classify(text) is None:
            problems.append(f"unexpected kind of error: {r.describe()}")
    return problems


def refusal_counts(results: Sequence[OpResult]) -> Counter[str]:
    return Counter(classify(r.stderr) or "other" for r in results if not r.ok)


def error_messages(results: Sequence[OpResult]) -> Counter[str]:
    """Distinct refusal messages with IDs, digests and paths blanked (to list the kinds seen)."""
    out: Counter[str] = Counter()
    for r in results:
        if not r.ok:
            text = re.sub(r"sha256:[0-9a-f]{64}", "<digest>", r.stderr.strip())
            text = re.sub(r"\b[0-9a-f]{12,64}\b", "<id>", text)
            out[f"{r.argv[0] if r.argv[0] != 'layer' else 'layer ' + r.argv[1]}: {text}"] += 1
    return out


# -- the mixed workload -------------------------------------------------------------------------------
@dataclass
class Workload:
    """Shared inputs: a few small tars (so ChainIDs collide), a few image and container names."""

    tars: list[Path]
    chains: list[str]  # ChainID of each tar as a base layer (its DiffID)
    outdir: Path
    images: list[str] = field(default_factory=lambda: ["stress/a:1", "stress/b:1", "stress/c:1"])
    containers: list[str] = field(default_factory=lambda: ["c1", "c2", "c3"])
    committed: str = "stress/committed:1"


def make_tars(directory: Path, count: int = 3) -> Workload:
    """``count`` small distinct root filesystems as tars, made with lamina.testing.TarBuilder."""
    import hashlib

    from lamina.testing import TarBuilder

    directory.mkdir(parents=True, exist_ok=True)
    tars: list[Path] = []
    chains: list[str] = []
    for k in range(count):
        tb = TarBuilder()
        tb.dir("bin").dir("etc").dir(f"data{k}")
        tb.file("etc/os-release", f"NAME=stress{k}\n".encode())
        for j in range(8):
            tb.file(f"data{k}/f{j}", hashlib.sha256(f"{k}/{j}".encode()).digest() * (64 * (j + 1)))
        tb.symlink("bin/sh", "busybox").file("bin/busybox", b"\x7fELF" + bytes(1000), mode=0o755)
        data = tb.build()
        path = directory / f"layer{k}.tar"
        path.write_bytes(data)
        tars.append(path)
        chains.append("sha256:" + hashlib.sha256(data).hexdigest())
    out = directory / "out"
    out.mkdir(exist_ok=True)
    return Workload(tars, chains, out)


# Weighted so that names, containers and layers exist often enough to be fought over.
OP_WEIGHTS = {"import": 3, "create": 3, "layer add": 2, "layer rm": 2, "rm": 2, "tag": 1, "untag": 1, "rmi": 1,
              "commit": 1, "mount": 1, "umount": 1, "save": 1}


def make_plan(w: Workload, worker: int, n_ops: int, rng: random.Random) -> list[list[str]]:
    """One worker's sequence: deliberate races on the same names, images, containers and layers."""
    ops: list[list[str]] = []
    for n in range(n_ops):
        [kind] = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))
        img = rng.choice(w.images)
        other = rng.choice(w.images)
        k = rng.randrange(len(w.tars))
        ctr = rng.choice(w.containers)
        if kind == "import":
            ops.append(["import", str(w.tars[k]), img])
        elif kind == "tag":
            ops.append(["tag", img, other])
        elif kind == "untag":
            ops.append(["untag", img, img])
        elif kind == "rmi":
            ops.append(["rmi", *(["--force"] if rng.random() < 0.3 else []), img])
        elif kind == "layer add":
            ops.append(["layer", "add", str(w.tars[k])])
        elif kind == "layer rm":
            ops.append(["layer", "rm", w.chains[k]])
        elif kind == "create":
            ops.append(["create", "--name", ctr, img])
        elif kind == "rm":
            ops.append(["rm", *(["--force"] if rng.random() < 0.5 else []), ctr])
        elif kind == "commit":
            ops.append(["commit", ctr, rng.choice([w.committed, img])])
        elif kind == "mount":
            ops.append(["mount", ctr])
        elif kind == "umount":
            ops.append(["umount", ctr])
        else:
            fmt = rng.choice(["docker-archive", "oci-archive"])
            target = rng.choice([img, w.committed])
            ops.append(["save", "-o", str(w.outdir / f"w{worker}-{n}.tar"), "--format", fmt, target])
    return ops


def make_plans(w: Workload, procs: int, n_ops: int, seed: int) -> list[list[list[str]]]:
    rng = random.Random(seed)
    return [make_plan(w, i, n_ops, random.Random(rng.getrandbits(64))) for i in range(procs)]


def seed_store(root: Path, runroot: Path, driver: str, w: Workload) -> None:
    """Give the race something to fight over: every image name, and one container."""
    for k, name in enumerate(w.images):
        cli(root, runroot, "--driver", driver, "import", str(w.tars[k % len(w.tars)]), name)
    cli(root, runroot, "create", "--name", w.containers[0], w.images[0])


def cli(
    root: Path, runroot: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """One CLI command in a subprocess (no barrier)."""
    cmd = [sys.executable, "-m", "lamina", "--root", str(root), "--runroot", str(runroot), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lamina {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def unmount_all(root: Path, runroot: Path) -> None:
    """Drop every container's mount references (the workload mounts without always unmounting)."""
    containers = json.loads(cli(root, runroot, "ps", "--all", "--format", "json").stdout)
    for c in containers:
        cli(root, runroot, "umount", "--force", c["Id"])


def drain(root: Path, runroot: Path, rounds: int = 10) -> list[str]:
    """Remove every container, image and layer through the CLI; returns what could not be removed."""
    left: list[str] = []
    for _ in range(rounds):
        ids = [c["Id"] for c in json.loads(cli(root, runroot, "ps", "--all", "--format", "json").stdout)]
        if ids:
            cli(root, runroot, "rm", "--force", *ids)
        imgs = [i["Id"] for i in json.loads(cli(root, runroot, "images", "--all", "--format", "json").stdout)]
        for iid in imgs:  # children before parents: a parent with children is refused this round
            cli(root, runroot, "rmi", "--force", iid, check=False)
        layers = json.loads(cli(root, runroot, "layers", "--format", "json").stdout)
        for layer in sorted(layers, key=lambda x: -int(x["depth"])):
            cli(root, runroot, "layer", "rm", layer["chain_id"], check=False)
        left = [f"container {c}" for c in ids] + [f"image {i}" for i in imgs] + [
            f"layer {x['chain_id']} (refs {x['references']})" for x in layers]
        if not left:
            return []
    return left

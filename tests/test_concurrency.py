"""Several lamina processes on one store at the same instant: races that must end in a clean refusal or
success, never an internal error, and a store that is sound afterwards (tests/store_invariants.py).

Every race is started by a barrier (tests/concurrency_harness.py): warm worker processes block on a pipe
and are released together. Only the public face is used: the CLI, lamina.testing, and read-only sqlite3.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from concurrency_harness import (
    OpResult,
    Workload,
    cli,
    drain,
    error_messages,
    make_plans,
    make_tars,
    op_problems,
    run_concurrently,
    seed_store,
    unmount_all,
)
from store_invariants import check_store

from lamina.testing import require_root

DRIVERS = ["vfs", "overlay"]


@dataclass
class Store:
    root: Path
    runroot: Path
    driver: str
    work: Path
    tmp: Path
    image_root: Path | None = None  # the store keeps its images there ([storage] image_store)

    def cli(self, *args: str, check: bool = True) -> str:
        out: str = cli(self.root, self.runroot, *args, check=check).stdout
        return out

    def race(self, plans: list[list[list[str]]]) -> list[OpResult]:
        """Each plan in its own worker, released together; the results of one-command plans, flattened."""
        self.work.mkdir(exist_ok=True)
        results = run_concurrently(self.root, self.runroot, plans, Path(os.path.join(self.work, str(time.time_ns()))))
        return [r for worker in results for r in worker]

    def problems(self) -> list[str]:
        found: list[str] = check_store(self.root, self.runroot, self.driver, image_root=self.image_root)
        return found


@pytest.fixture(params=DRIVERS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    driver = str(request.param)
    if driver == "overlay":
        require_root()
    s = Store(tmp_path / "root", tmp_path / "run", driver, tmp_path / "work", tmp_path)
    yield s
    _unmount_leftovers(s)


def _unmount_leftovers(s: Store) -> None:
    """Leave no overlay mount behind a failed test (tmp_path is removed later)."""
    if not s.root.exists():
        return
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f if line.split()[4].startswith(str(s.tmp))]
    for t in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", t], capture_output=True, check=False)


def _one_line_refusal(r: OpResult) -> str:
    text = r.stderr.strip()
    assert r.code > 0, f"not refused: {r.describe()}"
    assert "\n" not in text and "Traceback" not in text, r.describe()
    assert "internal error" not in text, r.describe()
    assert text.startswith("Error: "), r.describe()
    return text


def _sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1: eight `layer rm` of a layer an image uses, with one explicit reference --------------------------
@pytest.mark.parametrize("procs", [8])
def test_layer_rm_race_leaves_the_image_its_layer(store: Store, procs: int) -> None:
    w = make_tars(store.tmp / "tars", 1)
    chain = w.chains[0]
    store.cli("--driver", store.driver, "import", str(w.tars[0]), "name:1")
    assert store.cli("layer", "add", str(w.tars[0])).strip() == chain  # second reference: an explicit one

    results = store.race([[["layer", "rm", chain]]] * procs)

    ok = [r for r in results if r.ok]
    assert len(ok) == 1, "exactly one removal may succeed:\n" + "\n".join(r.describe() for r in results)
    for r in results:
        if not r.ok:
            text = _one_line_refusal(r)
            assert "in use" in text or "is used by" in text, r.describe()
    store.cli("save", "-o", str(store.tmp / "out.tar"), "name:1")
    store.cli("layer", "export", chain, "-o", str(store.tmp / "layer.tar"))
    assert _sha256_file(store.tmp / "layer.tar") == chain  # a base layer's ChainID is its DiffID
    assert store.problems() == []


# -- 2: `create` of an image racing `rm` of other containers of that image --------------------------------
def test_create_races_rm_of_containers_of_the_same_image(store: Store) -> None:
    w = make_tars(store.tmp / "tars", 1)
    store.cli("--driver", store.driver, "import", str(w.tars[0]), "name:1")
    victims = [store.cli("create", "name:1").strip() for _ in range(3)]
    for _round in range(6):
        # the removals take the shared init layer's references to zero while the creates want it
        results = store.race([[["create", "name:1"]]] * 3 + [[["rm", v]] for v in victims])
        assert op_problems(results) == []
        assert [r.describe() for r in results if not r.ok] == []
        victims = [r.stdout.strip() for r in results if r.argv[0] == "create"]
    assert len(json.loads(store.cli("ps", "--all", "--format", "json"))) == 3
    assert store.problems() == []


# -- 3: `layer rm` of a container's init layer -------------------------------------------------------------
def test_layer_rm_of_a_containers_init_layer_is_refused(store: Store) -> None:
    w = make_tars(store.tmp / "tars", 1)
    store.cli("--driver", store.driver, "import", str(w.tars[0]), "name:1")
    for name in ("c1", "c2"):
        store.cli("create", "--name", name, "name:1")
    ps = json.loads(store.cli("ps", "--all", "--format", "json"))
    [init_cache] = {c["InitLayer"] for c in ps}  # containers of one image share their init layer
    layers = json.loads(store.cli("layers", "--format", "json"))
    [init] = [x for x in layers if x["cache_id"] == init_cache]
    assert init["parent"] == w.chains[0]  # the init layer sits on the image's top layer

    proc = cli(store.root, store.runroot, "layer", "rm", init["chain_id"], check=False)
    result = OpResult(0, 0, ("layer", "rm", init["chain_id"]), proc.returncode, proc.stdout, proc.stderr, 0.0)
    text = _one_line_refusal(result)
    ids = {c["Name"] for c in ps} | {c["Id"][:12] for c in ps}
    assert any(i in text for i in ids), f"the refusal names no container: {text}"
    assert store.problems() == []

    path = store.cli("mount", "c1").strip()
    assert (Path(path) / "etc" / "os-release").is_file()
    (Path(path) / "new-file").write_bytes(b"x")
    assert "A /new-file" in store.cli("diff", "c1")
    store.cli("umount", "c1")
    store.cli("rm", "c1")
    store.cli("rm", "c2")
    assert store.problems() == []


# -- 4: the first commands on a new store, at once ----------------------------------------------------------
@pytest.mark.parametrize("procs", [4, 8])
def test_first_commands_on_a_new_store(store: Store, procs: int) -> None:
    failures: list[str] = []
    for n in range(4):
        root, runroot = store.tmp / f"r{n}" / "root", store.tmp / f"r{n}" / "run"
        results = run_concurrently(root, runroot, [[["--driver", store.driver, "images"]]] * procs,
                                   store.tmp / f"work{n}")
        failures += [r.describe() for worker in results for r in worker if not r.ok]
        assert check_store(root, runroot, store.driver) == []
    assert failures == []


def test_concurrent_imports_into_a_new_store(store: Store) -> None:
    w = make_tars(store.tmp / "tars", 2)
    for n in range(3):
        root, runroot = store.tmp / f"r{n}" / "root", store.tmp / f"r{n}" / "run"
        plans = [[["--driver", store.driver, "import", str(w.tars[i % 2]), f"img{i}:1"]] for i in range(4)]
        results = [r for worker in run_concurrently(root, runroot, plans, store.tmp / f"work{n}") for r in worker]
        assert [r.describe() for r in results if not r.ok] == []
        assert check_store(root, runroot, store.driver) == []


# -- mixed: many processes, random seeded sequences, the same names ------------------------------------------
PROCS = int(os.environ.get("LAMINA_MIXED_PROCS", "8"))
OPS = int(os.environ.get("LAMINA_MIXED_OPS", "12"))
SEED = int(os.environ.get("LAMINA_MIXED_SEED", "20240611"))


def run_mixed(s: Store, w: Workload, procs: int, ops: int, seed: int) -> list[OpResult]:
    seed_store(s.root, s.runroot, s.driver, w)
    plans = make_plans(w, procs, ops, seed)
    results = run_concurrently(s.root, s.runroot, plans, s.work, op_timeout=120, timeout=900)
    return [r for worker in results for r in worker]


def test_mixed_workload_keeps_the_store_sound(store: Store) -> None:
    _mixed_workload_keeps_sound(store)


def test_mixed_workload_keeps_a_store_with_an_image_store_sound(tmp_path: Path) -> None:
    """The same race on overlay with the images kept apart (the store records its image store when made:
    the racing commands name none)."""
    require_root()
    s = Store(tmp_path / "root", tmp_path / "run", "overlay", tmp_path / "work", tmp_path, tmp_path / "images")
    s.cli("--driver", "overlay", "--image-store", str(s.image_root), "info")
    try:
        _mixed_workload_keeps_sound(s)
    finally:
        _unmount_leftovers(s)


def _mixed_workload_keeps_sound(store: Store) -> None:
    w = make_tars(store.tmp / "tars", 3)
    results = run_mixed(store, w, PROCS, OPS, SEED)
    problems = op_problems(results)
    assert problems == [], "\n".join(problems + [f"{n} x {m}" for m, n in error_messages(results).items()])
    assert any(r.ok for r in results)
    unmount_all(store.root, store.runroot)  # the workload may leave containers mounted
    assert store.problems() == []
    assert drain(store.root, store.runroot) == []  # every reference can be given back
    assert store.problems() == []
    db = sqlite3.connect(f"file:{store.root / 'lamina.db'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM layers").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
    finally:
        db.close()


# -- the checker itself finds damage ------------------------------------------------------------------------
def test_check_store_reports_damage(store: Store) -> None:
    w = make_tars(store.tmp / "tars", 2)
    store.cli("--driver", store.driver, "import", str(w.tars[0]), "name:1")
    store.cli("create", "--name", "c1", "name:1")
    assert store.problems() == []
    layers = json.loads(store.cli("layers", "--format", "json"))
    [base] = [x for x in layers if x["chain_id"] == w.chains[0]]
    home = store.root / store.driver
    layer_dir = home / "dir" / base["cache_id"] if store.driver == "vfs" else home / base["cache_id"]

    # 1. the driver directory of a committed layer an image uses disappears
    moved = store.tmp / "moved-away"
    os.rename(layer_dir, moved)
    found = store.problems()
    assert any(f"layer {base['cache_id'][:12]} has no" in p for p in found), found
    assert any("exports to error" in p for p in found), found
    os.rename(moved, layer_dir)
    assert store.problems() == []

    # 2. stray rows and files
    db = sqlite3.connect(store.root / "lamina.db")
    try:
        with db:
            db.execute("INSERT INTO layers (id, state, depth, created) VALUES ('f00d', 'incomplete', 1, 0)")
            db.execute("INSERT INTO leases VALUES ('dead', 999999999, NULL, 0)")
            db.execute("INSERT INTO lease_layers VALUES ('dead', 'f00d')")
            db.execute("INSERT INTO lease_blobs VALUES ('dead', 'sha256:beef')")
            db.execute("UPDATE layers SET refs=0 WHERE id=?", (base["cache_id"],))
    finally:
        db.close()
    stray_blob = store.root / "content" / "blobs" / "sha256" / ("ab" * 32)
    stray_blob.write_bytes(b"stray")
    (home / ("dir" if store.driver == "vfs" else ".") / ("cd" * 32)).mkdir()
    found = store.problems()
    expected = [
        "layer row f00d is 'incomplete'",
        "layer lease left on f00d",
        "content lease left on sha256:beef",
        f"layer {w.chains[0]} has refs 0 but 1 users",
        f"blob sha256:{'ab' * 32} is named by no image",
        f"{'entry' if store.driver == 'overlay' else 'directory'} {'cd' * 32} has no layer row",
    ]
    for e in expected:
        assert any(e in p for p in found), (e, found)

    # 3. something left mounted
    db = sqlite3.connect(store.root / "lamina.db")
    try:
        with db:
            db.execute("DELETE FROM layers WHERE id='f00d'")
            db.execute("DELETE FROM leases")
            db.execute("DELETE FROM lease_layers")
            db.execute("DELETE FROM lease_blobs")
            db.execute("UPDATE layers SET refs=1 WHERE id=?", (base["cache_id"],))
    finally:
        db.close()
    stray_blob.unlink(missing_ok=True)  # the exports above opened the store: recovery may have collected it
    (home / ("dir" if store.driver == "vfs" else ".") / ("cd" * 32)).rmdir()
    store.cli("mount", "c1")
    found = store.problems()
    assert any("mount reference left" in p for p in found), found
    store.cli("umount", "c1")
    assert store.problems() == []

"""``lamina copy`` between stores and ``lamina system migrate`` to another driver: real drivers (vfs and
kernel overlay), real runc, SIGKILL of the migration at a random instant and at the switch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from fault_harness import kill_at, startup_floor
from store_invariants import check_store

from conftest import lamina_cli
from image_fixtures import ImageFacts
from lamina.testing import require_root, require_tool


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _images(base: Path) -> list[tuple[str, list[str], str]]:
    """(ID, tags and digests, parent ID) of every image."""
    rows = json.loads(lamina_cli("--format", "json", "images", "-a", root=base).stdout)
    return sorted((r["Id"], sorted(r["RepoTags"] + r["RepoDigests"]), r["ParentId"]) for r in rows)


def _layers(base: Path) -> dict[str, str]:
    """ChainID -> CacheID of every layer."""
    rows = json.loads(lamina_cli("--format", "json", "layers", root=base).stdout)
    return {r["chain_id"]: r["cache_id"] for r in rows}


def _containers(base: Path) -> list[dict[str, object]]:
    """What ``ps -a`` says of each container but its layers' CacheIDs (the driver's)."""
    rows = json.loads(lamina_cli("--format", "json", "ps", "-a", root=base).stdout)
    return [{k: v for k, v in r.items() if k not in ("InitLayer", "RWLayer")} for r in rows]


def _stored_driver(root: Path) -> str:
    with sqlite3.connect(f"file:{root / 'lamina.db'}?mode=ro", uri=True) as db:
        return str(db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()[0])


def _save_digests(base: Path, refs: list[str], out: Path) -> dict[str, str]:
    digests = {}
    for fmt in ("docker-archive", "oci-archive"):
        path = out / f"{fmt}.tar"
        lamina_cli("save", "--format", fmt, "-o", str(path), *refs, root=base)
        digests[fmt] = _sha256(path)
        path.unlink()
    return digests


def _tiny_tar(text: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = text.encode()
        info = tarfile.TarInfo("tiny.txt")
        info.size = len(data)
        info.mtime = 1_700_000_000
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content's sha256 (a symlink: its target; a directory: its mode)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = oct(p.stat().st_mode)
            else:
                out[rel] = _sha256(p)
    return out


def _mounts(root: Path) -> list[str]:
    return [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in ln]


# -- lamina copy ----------------------------------------------------------------------------------------
@pytest.fixture
def small_store(tmp_path: Path, umoci_small_image: ImageFacts) -> Path:
    """A vfs store with the small image and a committed child of it (one more layer)."""
    require_root()
    base = tmp_path / "a"
    lamina_cli("--driver", "vfs", "load", "-q", "-i", str(umoci_small_image.path), root=base)
    name = _images(base)[0][1][0]
    lamina_cli("create", "--name", "c", name, root=base)
    mnt = lamina_cli("mount", "c", root=base).stdout.decode().strip()
    Path(mnt, "child.txt").write_text("a child\n")
    lamina_cli("umount", "c", root=base)
    lamina_cli("commit", "c", "example.com/small-child:1", root=base)
    lamina_cli("rm", "c", root=base)
    return base


def _copy(scratch: Path, src: Path, dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return lamina_cli("--format", "json", "copy", str(src / "root"), str(dest / "root"), *args, root=scratch,
                      check=check)


def test_copy_vfs_to_overlay_and_back_keeps_images_byte_exact(tmp_path: Path, small_store: Path) -> None:
    scratch = tmp_path / "scratch"
    child = "example.com/small-child:1"
    base_name = next(n for _, names, _ in _images(small_store) for n in names if "child" not in n and "@" not in n)
    refs = [base_name, child]
    before = _images(small_store)
    saved = _save_digests(small_store, refs, tmp_path)
    src_layers = _layers(small_store)

    src_tree = _tree(small_store / "root")

    # a new overlay store: everything, each layer applied once
    over = tmp_path / "over"
    proc = lamina_cli("--driver", "overlay", "--format", "json", "copy", str(small_store / "root"),
                      str(over / "root"), root=scratch)
    out = json.loads(proc.stdout)
    assert sum(c["LayersApplied"] for c in out) == len(src_layers)
    assert _stored_driver(over / "root") == "overlay"
    assert _images(over) == before
    assert _layers(over).keys() == src_layers.keys()
    assert _tree(small_store / "root") == src_tree  # the source is only read
    assert _save_digests(over, refs, tmp_path) == saved

    # again: nothing applied, the destination's layers untouched
    over_layers = _layers(over)
    out = json.loads(_copy(scratch, small_store, over).stdout)
    assert [c["LayersApplied"] for c in out] == [0, 0]
    assert _layers(over) == over_layers

    # overlay -> a new vfs store, the base image first: then the child applies only its own layer
    back = tmp_path / "back"
    lamina_cli("--driver", "vfs", "--format", "json", "copy", str(over / "root"), str(back / "root"), base_name,
               root=scratch)
    out = json.loads(_copy(scratch, over, back, child).stdout)
    assert [c["LayersApplied"] for c in out] == [1]
    assert _stored_driver(back / "root") == "vfs"
    assert _images(back) == before
    assert _save_digests(back, refs, tmp_path) == saved
    for store, driver in ((small_store, "vfs"), (over, "overlay"), (back, "vfs")):
        assert check_store(store / "root", store / "run", driver) == []


def test_copy_of_a_missing_image_is_a_one_line_error(tmp_path: Path, small_store: Path) -> None:
    dest = tmp_path / "dest"
    proc = _copy(tmp_path / "scratch", small_store, dest, "example.com/nosuch:1", check=False)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "nosuch" in err and "Traceback" not in err
    proc = _copy(tmp_path / "scratch", tmp_path / "nowhere", dest, check=False)
    assert proc.returncode != 0 and proc.stderr.decode().count("\n") == 1 and "no lamina store" in proc.stderr.decode()


# -- lamina system migrate ------------------------------------------------------------------------------
def test_migrate_refuses_a_store_with_containers_without_the_flag(tmp_path: Path) -> None:
    require_root()
    base = tmp_path / "s"
    lamina_cli("--driver", "vfs", "import", "-", "example.com/tiny:1", input=_tiny_tar("tiny"), root=base)
    lamina_cli("create", "--name", "c", "example.com/tiny:1", root=base)
    proc = lamina_cli("system", "migrate", "--driver", "overlay", root=base, check=False)
    assert proc.returncode != 0 and "--containers" in proc.stderr.decode() and proc.stderr.count(b"\n") == 1
    assert _stored_driver(base / "root") == "vfs" and not (base / "root" / "migrate").exists()
    lamina_cli("rm", "c", root=base)
    lamina_cli("system", "migrate", "-q", "--driver", "overlay", root=base)
    assert _stored_driver(base / "root") == "overlay"
    assert check_store(base / "root", base / "run", "overlay") == []
    out = lamina_cli("system", "migrate", "--driver", "overlay", root=base).stdout.decode()
    assert "already uses driver overlay" in out


@pytest.mark.parametrize(("first", "second"), [("vfs", "overlay"), ("overlay", "vfs")])
def test_migrate_killed_before_the_switch_in_it_and_in_the_cleanup(tmp_path: Path, first: str, second: str) -> None:
    """Killed at each step of the state machine (just before the switch, right after it, just before the
    cleanup of the way back): the next command sees a sound store on one driver or the other and finishes
    the switch; the last run finds nothing left to do."""
    require_root()
    base = tmp_path / "s"
    root, run = base / "root", base / "run"
    lamina_cli("--driver", first, "import", "-", "example.com/tiny:1", input=_tiny_tar("one"), root=base)
    lamina_cli("create", "--name", "c", "--label", "k=v", "example.com/tiny:1", root=base)
    mnt = lamina_cli("mount", "c", root=base).stdout.decode().strip()
    Path(mnt, "changed.txt").write_text("changed\n")
    Path(mnt, "tiny.txt").unlink()
    lamina_cli("umount", "c", root=base)
    before = _images(base)
    ps = _containers(base)
    argv = ["--root", str(root), "--runroot", str(run), "system", "migrate", "--driver", second, "--containers"]
    for point, driver in (("lamina.store.migrate:_switch", first), ("lamina.store.migrate:_move_into_place", second),
                          ("lamina.store.migrate:cleanup", first)):
        argv[-2] = driver if point.endswith("cleanup") else second  # the cleanup: on the way back
        killed = kill_at(point, argv)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        assert _stored_driver(root) == driver, point
        assert _images(base) == before, point  # the first command after the kill finishes what it can
        assert check_store(root, run, driver) == [], point
        assert _containers(base) == ps, point
    lamina_cli("system", "migrate", "-q", "--driver", first, "--containers", root=base)
    assert not (root / "migrate").exists() and not (root / second).exists()
    diff = lamina_cli("diff", "c", root=base).stdout.decode().splitlines()
    assert "A /changed.txt" in diff and "D /tiny.txt" in diff
    assert _images(base) == before and check_store(root, run, first) == []


def test_migrate_debian_store_vfs_to_overlay_killed_and_run_again(tmp_path: Path, debian_image_oci: ImageFacts) -> None:
    """The issue's Done-when: the Debian image, a committed child and a container with changes; one
    migration killed at a random instant, one killed just after its switch; each time the next command
    sees a sound store; in the end the same images and archives, and containers run."""
    require_root()
    require_tool("runc")
    base = tmp_path / "s"
    root, run = base / "root", base / "run"
    lamina_cli("--driver", "vfs", "load", "-q", "-i", str(debian_image_oci.path), root=base)
    debian = next(n for n in _images(base)[0][1] if "@" not in n)
    lamina_cli("run", "--name", "c1", debian, "sh", "-c", "echo migrated > /hello", root=base)
    lamina_cli("commit", "c1", "example.com/child:1", root=base)
    lamina_cli("run", "--name", "c2", debian, "sh", "-c", "echo kept > /kept", root=base)  # its changes move
    refs = [debian, "example.com/child:1"]
    saved = _save_digests(base, refs, tmp_path)
    ps = json.loads(lamina_cli("--format", "json", "ps", "-a", root=base).stdout)
    containers = sorted((c["Id"], c["Name"]) for c in ps)

    argv = ["--root", str(root), "--runroot", str(run), "system", "migrate", "--driver", "overlay", "--containers"]
    seed = int(os.environ.get("LAMINA_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    floor = startup_floor()
    where = f"seed {seed}"
    for k, spread in enumerate((2.0, 4.0)):  # SIGKILL at random instants (while copying, most of the time)
        delay = floor + rng.uniform(0, spread)
        where = f"seed {seed}, kill {k} after {delay:.2f} s"
        proc = subprocess.Popen([sys.executable, "-m", "lamina", *argv], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # the next command works (on vfs, unless the kill came after the switch), and the store changes meanwhile
        lamina_cli("import", "-", f"example.com/tiny:{k}", input=_tiny_tar(f"tiny {k}"), root=base)
        driver = _stored_driver(root)
        assert check_store(root, run, driver) == [], where
    expected = _images(base)

    if driver == "vfs":  # the usual case: killed while copying; now killed right after the switch
        killed = kill_at("lamina.store.migrate:_move_into_place", argv)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert _stored_driver(root) == "overlay" and (root / "migrate" / "overlay").is_dir()
        assert _images(base) == expected  # this command finishes the switch
        assert not (root / "migrate").exists() and not (root / "vfs").exists()
    out = lamina_cli("system", "migrate", "--driver", "overlay", "--containers", root=base).stdout.decode()
    assert _stored_driver(root) == "overlay", where
    assert "already uses driver overlay" in out or "Migrated" in out

    assert _images(base) == expected, where
    assert _save_digests(base, refs, tmp_path) == saved, where
    ps = json.loads(lamina_cli("--format", "json", "ps", "-a", root=base).stdout)
    assert sorted((c["Id"], c["Name"]) for c in ps) == containers
    assert "A /kept" in lamina_cli("diff", "c2", root=base).stdout.decode()
    out = lamina_cli("run", "--rm", "example.com/child:1", "cat", "/hello", root=base)
    assert out.stdout == b"migrated\n"
    lamina_cli("commit", "c2", "example.com/kept:1", root=base)
    assert lamina_cli("run", "--rm", "example.com/kept:1", "cat", "/kept", root=base).stdout == b"kept\n"
    assert check_store(root, run, "overlay") == [], where
    lamina_cli("system", "check", "--quick", root=base)
    lamina_cli("rm", "c1", "c2", root=base)
    assert _mounts(root) == []

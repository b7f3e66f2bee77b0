"""Rootless ``lamina run``: an ordinary user on vfs, and overlay inside ``unshare``'s user namespace.

The end-to-end tests need root only to set the stage: they create unprivileged users, grant one of
them subordinate ids in ``/etc/subuid`` and ``/etc/subgid``, and install lamina from this source tree
into a venv of ``/usr/bin/python3`` that those users can read (the interpreter tests run with may live
under ``/root``). Every lamina command then runs as that user through ``runuser``, with real runc.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from image_fixtures import ImageFacts, host_binaries_tar
from lamina.errors import ContainerError
from lamina.runtime import IdMap, UserNamespace, build_spec
from lamina.testing import require_root, require_tool

SOURCE = Path(__file__).resolve().parents[1]
USER = "lamina-test"  # granted subordinate ids
USER_NOSUB = "lamina-nosub"  # none: the container's root is the user's own id, alone
DEBIAN = "example.com/debian:bookworm"
HOST_IMAGE = "local/host-binaries:1"
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".mypy_cache",
                                 ".ruff_cache", ".pytest_cache", ".hypothesis")


# -- the spec (no privileges needed) ----------------------------------------------------------------------
def _rootfs(tmp_path: Path) -> str:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    return str(tmp_path)


def test_rootless_spec_maps_the_callers_ids_and_drops_what_needs_root(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path)
    single = UserNamespace((IdMap(0, 1234, 1),), (IdMap(0, 1235, 1),))
    spec = build_spec(rootfs, {"Cmd": ["sh"]}, userns=single)
    linux = spec["linux"]
    assert {"type": "user"} in linux["namespaces"] and {"type": "network"} in linux["namespaces"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": 1234, "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": 1235, "size": 1}]
    assert "resources" not in linux
    devpts = next(m for m in spec["mounts"] if m["destination"] == "/dev/pts")
    assert not any(o.startswith("gid=") for o in devpts["options"])  # group 5 is not mapped
    host = build_spec(rootfs, {"Cmd": ["sh"]}, userns=single, network="host")
    sys_mount = next(m for m in host["mounts"] if m["destination"] == "/sys")
    assert sys_mount["type"] == "bind" and sys_mount["options"][0] == "rbind" and "ro" in sys_mount["options"]
    assert {"type": "network"} not in host["linux"]["namespaces"]
    # a user the namespace does not map is refused before the runtime is started
    with pytest.raises(ContainerError, match="uid 65534 is not mapped"):
        build_spec(rootfs, {"Cmd": ["sh"]}, userns=single, user="nobody")

    wide = UserNamespace((IdMap(0, 1234, 1), IdMap(1, 100000, 65536)), (IdMap(0, 1235, 1), IdMap(1, 100000, 65536)))
    spec = build_spec(rootfs, {"Cmd": ["sh"]}, userns=wide, user="nobody")
    assert spec["linux"]["uidMappings"][1] == {"containerID": 1, "hostID": 100000, "size": 65536}
    assert spec["process"]["user"] == {"uid": 65534, "gid": 65534}
    devpts = next(m for m in spec["mounts"] if m["destination"] == "/dev/pts")
    assert "gid=5" in devpts["options"]
    # root's spec is unchanged: no user namespace
    assert "uidMappings" not in build_spec(rootfs, {"Cmd": ["sh"]})["linux"]


# -- end to end as unprivileged users ---------------------------------------------------------------------
@dataclass
class Stage:
    work: Path  # readable by the test users
    lamina: str  # the venv's lamina script
    uid: int
    gid: int
    subuid: tuple[int, int]  # USER's first subordinate range (start, count)
    subgid: tuple[int, int]
    nosub_uid: int


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # a system account: useradd gives it no subordinate ids of its own
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name], check=True,
                   capture_output=True)
    return pwd.getpwnam(name)


def _ranges(path: str, name: str, uid: int) -> list[tuple[int, int]]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        f = line.strip().split(":")
        if len(f) == 3 and f[0] in (name, str(uid)) and f[1].isdigit() and f[2].isdigit():
            out.append((int(f[1]), int(f[2])))
    return out


def _ensure_subids(path: str, name: str, uid: int) -> tuple[int, int]:
    """The user's first range in ``path``, granting it 65536 unused ids when it has none."""
    have = _ranges(path, name, uid)
    if have:
        return have[0]
    lines = Path(path).read_text().splitlines() if os.path.exists(path) else []
    end = 100000
    for line in lines:
        f = line.strip().split(":")
        if len(f) == 3 and f[1].isdigit() and f[2].isdigit():
            end = max(end, int(f[1]) + int(f[2]))
    with open(path, "a") as f:
        f.write(f"{name}:{end}:65536\n")
    os.chmod(path, 0o644)
    return end, 65536


def _drop_subids(path: str, name: str) -> None:
    if not os.path.exists(path):
        return
    lines = Path(path).read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.split(":")[0] != name]
    if kept != lines:
        Path(path).write_text("".join(kept))


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    require_root()
    for tool in ("runc", "unshare", "runuser", "useradd", "newuidmap", "newgidmap"):
        require_tool(tool)
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.fail("the rootless tests need /usr/bin/python3 to make a venv the test users can read")
    user = _ensure_user(USER)
    nosub = _ensure_user(USER_NOSUB)
    subuid = _ensure_subids("/etc/subuid", USER, user.pw_uid)
    subgid = _ensure_subids("/etc/subgid", USER, user.pw_uid)
    for path in ("/etc/subuid", "/etc/subgid"):
        _drop_subids(path, USER_NOSUB)
    work = Path(tempfile.mkdtemp(prefix="lamina-rootless-"))
    try:
        work.chmod(0o755)
        src = work / "src"
        shutil.copytree(SOURCE, src, ignore=_IGNORE)
        venv = work / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, capture_output=True)
        proc = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               str(src)], capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        for dirpath, _dirs, files in os.walk(work):
            os.chmod(dirpath, os.stat(dirpath).st_mode | 0o755)
            for n in files:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        yield Stage(work, str(venv / "bin/lamina"), user.pw_uid, user.pw_gid, subuid, subgid, nosub.pw_uid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _as(user: str, *cmd: str, stage: Stage, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(stage.work),
           "LANG": "C.UTF-8"}
    proc = subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, env=env, cwd=stage.work,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} as {user} failed ({proc.returncode}): {proc.stderr.decode()[-3000:]}")
    return proc


def _store(stage: Stage, name: str, owner: int, driver: str) -> list[str]:
    d = stage.work / name
    d.mkdir()
    os.chown(d, owner, -1)
    return [stage.lamina, "--root", str(d / "root"), "--runroot", str(d / "run"), "--driver", driver]


def _uid_map(text: str) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]


def _readable_copy(stage: Stage, archive: Path) -> str:
    dest = stage.work / archive.name
    if not dest.exists():
        shutil.copyfile(archive, dest)
        dest.chmod(0o644)
    return str(dest)


def test_run_as_an_ordinary_user_on_vfs(stage: Stage) -> None:
    # a small image: each vfs container is a full copy of its image
    lam = _store(stage, "nosub-vfs", stage.nosub_uid, "vfs")
    _as(USER_NOSUB, *lam, "import", "--change", "CMD /bin/sh", _host_tar(stage), HOST_IMAGE, stage=stage)
    out = _as(USER_NOSUB, *lam, "run", "--rm", HOST_IMAGE, "cat", "/etc/os-release", stage=stage)
    assert out.stdout == b'NAME="lamina host binaries"\nID=lamina-host\n'
    out = _as(USER_NOSUB, *lam, "run", "--rm", HOST_IMAGE, "sh", "-c",
              "id -u; cat /proc/self/uid_map; cat /proc/net/dev", stage=stage)
    first, uid_map, *net = out.stdout.decode().splitlines()
    assert first == "0"  # root in the container...
    assert _uid_map(uid_map) == [[0, stage.nosub_uid, 1]]  # ...is the user, alone
    assert [line.split(":")[0].strip() for line in net if ":" in line] == ["lo"]  # its own network namespace
    # exit codes come back; a user the namespace cannot map is a short error, before runc starts
    code = _as(USER_NOSUB, *lam, "run", "--rm", HOST_IMAGE, "sh", "-c", "exit 7", stage=stage, check=False).returncode
    assert code == 7
    bad = _as(USER_NOSUB, *lam, "run", "--rm", "-u", "nobody", HOST_IMAGE, "id", stage=stage, check=False)
    assert bad.returncode != 0 and b"uid 65534 is not mapped" in bad.stderr and b"Traceback" not in bad.stderr
    assert _as(USER_NOSUB, *lam, "ps", "-a", "-q", stage=stage).stdout == b""


def test_bundle_as_an_ordinary_user_is_rootless(stage: Stage) -> None:
    lam = _store(stage, "nosub-bundle", stage.nosub_uid, "vfs")
    _as(USER_NOSUB, *lam, "import", "--change", "CMD /bin/sh", _host_tar(stage), HOST_IMAGE, stage=stage)
    _as(USER_NOSUB, *lam, "create", "--name", "b", HOST_IMAGE, stage=stage)
    bundle = stage.work / "nosub-bundle" / "bundle"
    spec = json.loads(_as(USER_NOSUB, *lam, "bundle", "--format", "json", "b", str(bundle), "cat", "/etc/os-release",
                          stage=stage).stdout)
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": stage.nosub_uid, "size": 1}]
    # plain runc, as the same user, runs what lamina wrote
    out = _as(USER_NOSUB, "runc", "--root", str(bundle.parent / "state"), "run", "--bundle", str(bundle), "b1",
              stage=stage)
    assert out.stdout == b'NAME="lamina host binaries"\nID=lamina-host\n'
    _as(USER_NOSUB, *lam, "umount", "b", stage=stage)
    _as(USER_NOSUB, *lam, "rm", "b", stage=stage)


def test_run_maps_subordinate_ids(stage: Stage) -> None:
    lam = _store(stage, "sub-vfs", stage.uid, "vfs")
    _as(USER, *lam, "import", "--change", "CMD /bin/sh", _host_tar(stage), HOST_IMAGE, stage=stage)
    out = _as(USER, *lam, "run", "--rm", HOST_IMAGE, "sh", "-c", "cat /proc/self/uid_map; echo; cat /proc/self/gid_map",
              stage=stage)
    uids, gids = out.stdout.decode().split("\n\n")
    assert _uid_map(uids) == [[0, stage.uid, 1], [1, stage.subuid[0], stage.subuid[1]]]
    assert _uid_map(gids) == [[0, stage.gid, 1], [1, stage.subgid[0], stage.subgid[1]]]
    out = _as(USER, *lam, "run", "--rm", "-u", "nobody", HOST_IMAGE, "sh", "-c", "id -u; id -g", stage=stage)
    assert out.stdout.decode().split() == ["65534", "65534"]


def _host_tar(stage: Stage) -> str:
    tar = stage.work / "host-binaries.tar"
    if not tar.exists():
        host_binaries_tar(tar)
        tar.chmod(0o644)
    return str(tar)


def test_run_on_overlay_inside_unshare(stage: Stage) -> None:
    lam = _store(stage, "userns-overlay", stage.nosub_uid, "overlay")
    ns = ["unshare", "--map-root-user", "--mount"]
    _as(USER_NOSUB, *ns, *lam, "import", "--change", "CMD /bin/sh", _host_tar(stage), HOST_IMAGE, stage=stage)
    out = _as(USER_NOSUB, *ns, *lam, "run", "--rm", HOST_IMAGE, "cat", "/etc/os-release", stage=stage)
    assert out.stdout == b'NAME="lamina host binaries"\nID=lamina-host\n'
    out = _as(USER_NOSUB, *ns, *lam, "run", "--rm", HOST_IMAGE, "cat", "/proc/self/uid_map", stage=stage)
    assert _uid_map(out.stdout.decode()) == [[0, 0, 1]]  # the namespace's root, which is the user
    info = _as(USER_NOSUB, *ns, *lam, "info", stage=stage, check=False).stdout
    assert b"Userxattr: yes" in info
    assert _as(USER_NOSUB, *ns, *lam, "ps", "-a", "-q", stage=stage).stdout == b""


@contextmanager
def _fuse_for_everyone() -> Iterator[None]:
    """/dev/fuse usable by the test users (many systems ship it 0666; here it may be 0600)."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 == 0o006:
        yield
        return
    os.chmod("/dev/fuse", mode | 0o006)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


def test_run_on_fuse_overlayfs_as_an_ordinary_user(stage: Stage) -> None:
    require_tool("fuse-overlayfs")
    require_tool("fusermount3")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("fuse-overlayfs needs /dev/fuse")
    lam = _store(stage, "sub-fuse", stage.uid, "overlay")
    with _fuse_for_everyone():
        _as(USER, *lam, "import", "--change", "CMD /bin/sh", _host_tar(stage), HOST_IMAGE, stage=stage)
        assert b"Mount mode: fuse" in _as(USER, *lam, "info", stage=stage).stdout
        out = _as(USER, *lam, "run", "--rm", HOST_IMAGE, "sh", "-c", "cat /etc/os-release; id -u", stage=stage)
        assert out.stdout == b'NAME="lamina host binaries"\nID=lamina-host\n0\n'
        assert _as(USER, *lam, "ps", "-a", "-q", stage=stage).stdout == b""
    assert str(stage.work / "sub-fuse") not in Path("/proc/self/mountinfo").read_text()


def test_run_on_overlay_inside_unshare_with_subordinate_ids(stage: Stage,
                                                            debian_image_docker_archive: ImageFacts) -> None:
    """``unshare --map-auto`` maps the user's subordinate ids too: the container gets every id mapped there."""
    archive = _readable_copy(stage, debian_image_docker_archive.path)
    lam = _store(stage, "userns-auto-overlay", stage.uid, "overlay")
    ns = ["unshare", "--map-root-user", "--map-auto", "--mount"]
    _as(USER, *ns, *lam, "load", "-q", "-i", archive, stage=stage)
    out = _as(USER, *ns, *lam, "run", "--rm", "-u", "nobody", DEBIAN, "sh", "-c",
              "id -u; grep PRETTY /etc/os-release; cat /proc/self/uid_map", stage=stage)
    first, pretty, *maps = out.stdout.decode().splitlines()
    assert first == "65534" and pretty == 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'
    # every id of unshare's namespace, as that namespace numbers it: root and the subordinate range
    here = _uid_map(_as(USER, *ns, "cat", "/proc/self/uid_map", stage=stage).stdout.decode())
    assert len(here) == 2 and here[1][1] == stage.subuid[0]
    assert _uid_map("\n".join(maps)) == [[inside, inside, count] for inside, _, count in here]

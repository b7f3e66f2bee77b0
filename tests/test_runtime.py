"""Turning a root filesystem and an image config into an OCI bundle, and running it with real runc."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import FormatError, ImageError, LaminaError, UnsafePathError
from lamina.runtime import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    RuntimeFailure,
    build_spec,
    resolve_user,
    run_bundle,
    write_bundle,
)
from lamina.testing import require_root, require_tool

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nsvc:x:1001:1001::/:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nsvc:x:1001:\nextra:x:2000:app,svc\nvideo:x:44:app\n"


def _accounts(root: Path) -> Path:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


# --------------------------------------------------------------------------------------------------
# resolve_user


@pytest.fixture
def accounts_root(tmp_path: Path) -> Path:
    return _accounts(tmp_path / "rootfs")


@pytest.mark.parametrize(("user", "expected"), [
    ("", (0, 0, [])),
    ("root", (0, 0, [])),
    ("app", (1000, 1000, [2000, 44])),
    ("1000", (1000, 1000, [2000, 44])),
    ("app:svc", (1000, 1001, [2000, 44])),
    ("app:44", (1000, 44, [2000])),            # the primary group is not repeated as supplementary
    ("1000:2000", (1000, 2000, [44])),
    ("1000:video", (1000, 44, [2000])),
    ("svc", (1001, 1001, [2000])),
    ("4242", (4242, 0, [])),                   # numeric uid without a passwd entry
    ("4242:4343", (4242, 4343, [])),
    ("4294967294", (4294967294, 0, [])),
])
def test_resolve_user_forms(accounts_root: Path, user: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(str(accounts_root), user) == expected


def test_resolve_user_without_account_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert resolve_user(str(tmp_path / "empty"), "123:456") == (123, 456, [])
    with pytest.raises(ImageError, match=r"unable to find user 'app'.*no /etc/passwd"):
        resolve_user(str(tmp_path / "empty"), "app")


@pytest.mark.parametrize("user", ["nobody", "app:nogroup", "4242:nogroup"])
def test_resolve_user_unknown_names(accounts_root: Path, user: str) -> None:
    with pytest.raises(ImageError, match="unable to find"):
        resolve_user(str(accounts_root), user)


@pytest.mark.parametrize("user", [
    "-1", "1000:-1", "+5", "4294967295", "99999999999999999999", " app", "app ", "a pp", "app\n", "ap\x00p",
    "app\t:1", ":", "app:", ":1000", "x" * 5000, "1:" + "9" * 400, "a:b:c", "../etc", "app/x",
])
def test_resolve_user_hostile_values(accounts_root: Path, user: str) -> None:
    with pytest.raises(FormatError):
        resolve_user(str(accounts_root), user)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/passwd", "passwd.real"])
def test_resolve_user_refuses_symlinked_passwd(accounts_root: Path, target: str) -> None:
    passwd = accounts_root / "etc" / "passwd"
    os.rename(passwd, accounts_root / "etc" / "passwd.real")
    passwd.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve_user(str(accounts_root), "app")


def test_resolve_user_refuses_symlinked_etc(tmp_path: Path) -> None:
    real = _accounts(tmp_path / "elsewhere")
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to(real / "etc")
    with pytest.raises(UnsafePathError, match="/etc"):
        resolve_user(str(root), "app")
    # Even a purely numeric user reads the account files for supplementary groups, so it is refused too.
    with pytest.raises(UnsafePathError):
        resolve_user(str(root), "1000:1000")


def test_resolve_user_refuses_fifo_without_blocking(accounts_root: Path) -> None:
    passwd = accounts_root / "etc" / "passwd"
    passwd.unlink()
    os.mkfifo(passwd)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(resolve_user, str(accounts_root), "app")
        try:
            with pytest.raises(UnsafePathError, match="not a regular file"):
                future.result(timeout=10)
        finally:
            if not future.done():  # unblock the thread so the test can end
                fd = os.open(passwd, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)


def test_resolve_user_refuses_device_and_directory(accounts_root: Path) -> None:
    require_root()
    group = accounts_root / "etc" / "group"
    group.unlink()
    os.mknod(group, 0o600 | 0o020000, os.makedev(1, 3))  # a /dev/null character device
    with pytest.raises(UnsafePathError, match=r"/etc/group.*not a regular file"):
        resolve_user(str(accounts_root), "app")
    group.unlink()
    group.mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        resolve_user(str(accounts_root), "app")


def test_resolve_user_refuses_huge_passwd(accounts_root: Path) -> None:
    with open(accounts_root / "etc" / "passwd", "w") as f:
        f.write(PASSWD)
        f.write("#" * (2 << 20) + "\n")
    with pytest.raises(UnsafePathError, match="larger than"):
        resolve_user(str(accounts_root), "app")


def test_resolve_user_malformed_entries(accounts_root: Path) -> None:
    (accounts_root / "etc" / "passwd").write_text(
        "# comment\n\ngarbage\nbroken:x:notanumber:1\napp:x:1000:1000::/:/bin/sh\n+nis\n")
    (accounts_root / "etc" / "group").write_text("junk\nextra:x:2000:app\nbad:x:-4:app\n")
    assert resolve_user(str(accounts_root), "app") == (1000, 1000, [2000])
    with pytest.raises(FormatError, match="broken"):
        resolve_user(str(accounts_root), "broken")


# --------------------------------------------------------------------------------------------------
# build_spec / write_bundle (no runtime needed)


def _env(spec: dict[str, Any]) -> dict[str, str]:
    return dict(e.split("=", 1) for e in spec["process"]["env"])


def test_build_spec_defaults(accounts_root: Path) -> None:
    spec = build_spec(str(accounts_root), {"Cmd": ["/bin/sh"]}, hostname="box")
    proc = spec["process"]
    assert spec["ociVersion"].startswith("1.0.")
    assert proc["args"] == ["/bin/sh"]
    assert proc["cwd"] == "/"
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert _env(spec) == {"PATH": DEFAULT_PATH, "HOSTNAME": "box"}
    assert set(proc["capabilities"]["bounding"]) == set(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in proc["capabilities"]["effective"]
    (nofile,) = proc["rlimits"]
    assert nofile["type"] == "RLIMIT_NOFILE"
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert nofile["soft"] <= nofile["hard"] <= (hard if hard >= 0 else 1 << 16)
    assert spec["root"] == {"path": str(accounts_root), "readonly": False}
    assert spec["hostname"] == "box"
    kinds = {ns["type"] for ns in spec["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "network"}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/sys"]["type"] == "sysfs" and "ro" in mounts["/sys"]["options"]
    assert "newinstance" in mounts["/dev/pts"]["options"]
    assert {"/dev", "/dev/shm", "/dev/mqueue"} <= set(mounts)
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]


def test_build_spec_random_hostname(accounts_root: Path) -> None:
    a = build_spec(str(accounts_root), {"Cmd": ["x"]})["hostname"]
    b = build_spec(str(accounts_root), {"Cmd": ["x"]})["hostname"]
    assert a != b and len(a) == 12


def test_build_spec_args_replace_cmd_keep_entrypoint(accounts_root: Path) -> None:
    config = {"Entrypoint": ["/bin/tini", "--"], "Cmd": ["serve"]}
    assert build_spec(str(accounts_root), config)["process"]["args"] == ["/bin/tini", "--", "serve"]
    assert build_spec(str(accounts_root), config, args=["sh"])["process"]["args"] == ["/bin/tini", "--", "sh"]
    assert build_spec(str(accounts_root), config, args=[])["process"]["args"] == ["/bin/tini", "--"]
    assert build_spec(str(accounts_root), {"Cmd": ["a"]}, args=["b", "c"])["process"]["args"] == ["b", "c"]


@pytest.mark.parametrize("config", [{}, {"Cmd": None, "Entrypoint": None}, {"Cmd": []}])
def test_build_spec_needs_a_command(accounts_root: Path, config: dict[str, Any]) -> None:
    with pytest.raises(ImageError, match="no command"):
        build_spec(str(accounts_root), config)


def test_build_spec_env_order_and_overrides(accounts_root: Path) -> None:
    config = {"Cmd": ["x"], "Env": ["PATH=/opt/bin", "A=image", "B=1=2", "HOSTNAME=fromimage"]}
    spec = build_spec(str(accounts_root), config, env=["A=cli", "C="], hostname="h", terminal=True)
    assert spec["process"]["env"] == ["PATH=/opt/bin", "A=cli", "B=1=2", "HOSTNAME=fromimage", "TERM=xterm", "C="]
    spec = build_spec(str(accounts_root), {"Cmd": ["x"], "Env": ["A=1"]}, env=["HOSTNAME=over"], hostname="h")
    assert spec["process"]["env"] == ["A=1", f"PATH={DEFAULT_PATH}", "HOSTNAME=over"]


@pytest.mark.parametrize(("config", "kwargs"), [
    ({"Cmd": ["x"], "Env": ["NOEQUALS"]}, {}),
    ({"Cmd": ["x"], "Env": ["=value"]}, {}),
    ({"Cmd": ["x"]}, {"env": ["A=b\x00c"]}),
    ({"Cmd": ["x"]}, {"env": ["JUSTKEY"]}),
    ({"Cmd": ["x"], "Env": "A=1"}, {}),
    ({"Cmd": "sh -c x"}, {}),
    ({"Cmd": ["x", 1]}, {}),
    ({"Cmd": ["a\x00b"]}, {}),
    ({"Cmd": [""]}, {}),
    ({"Cmd": ["x"], "WorkingDir": "relative/dir"}, {}),
    ({"Cmd": ["x"]}, {"workdir": "tmp"}),
    ({"Cmd": ["x"]}, {"workdir": "/a\x00b"}),
    ({"Cmd": ["x"], "User": 1000}, {}),
    ({"Cmd": ["x"]}, {"hostname": "bad host"}),
    ({"Cmd": ["x"]}, {"hostname": "-lead"}),
    ({"Cmd": ["x"]}, {"hostname": "a" * 65}),
    ({"Cmd": ["x"]}, {"network": "bridge"}),
])
def test_build_spec_rejects_bad_input(accounts_root: Path, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        build_spec(str(accounts_root), config, **kwargs)


@pytest.mark.parametrize(("given", "cwd"), [("/srv//app/", "/srv/app"), ("/a/../../b", "/b"), ("//x", "/x"),
                                            ("/./", "/")])
def test_build_spec_normalizes_cwd(accounts_root: Path, given: str, cwd: str) -> None:
    assert build_spec(str(accounts_root), {"Cmd": ["x"], "WorkingDir": given})["process"]["cwd"] == cwd
    assert build_spec(str(accounts_root), {"Cmd": ["x"]}, workdir=given)["process"]["cwd"] == cwd


def test_build_spec_user_override_and_image_user(accounts_root: Path) -> None:
    spec = build_spec(str(accounts_root), {"Cmd": ["x"], "User": "app"})
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [2000, 44]}
    spec = build_spec(str(accounts_root), {"Cmd": ["x"], "User": "app"}, user="0:0")
    assert spec["process"]["user"] == {"uid": 0, "gid": 0}
    with pytest.raises(ImageError):
        build_spec(str(accounts_root), {"Cmd": ["x"], "User": "ghost"})


def test_build_spec_host_network(accounts_root: Path) -> None:
    spec = build_spec(str(accounts_root), {"Cmd": ["x"]}, network="host", readonly=True)
    assert "network" not in {ns["type"] for ns in spec["linux"]["namespaces"]}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/sys"]["type"] == "bind" and "ro" in mounts["/sys"]["options"]
    for name in ("/etc/resolv.conf", "/etc/hosts"):
        if os.path.isfile(name):
            assert mounts[name]["type"] == "bind" and "ro" in mounts[name]["options"]
    assert spec["root"]["readonly"] is True


def test_build_spec_missing_rootfs(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        build_spec(str(tmp_path / "nope"), {"Cmd": ["x"]})


def test_write_bundle(tmp_path: Path, accounts_root: Path) -> None:
    import json
    spec = build_spec(str(accounts_root), {"Cmd": ["x"]})
    write_bundle(str(tmp_path / "bundle"), spec)
    assert json.loads((tmp_path / "bundle" / "config.json").read_text()) == spec
    assert sorted(os.listdir(tmp_path / "bundle")) == ["config.json"]
    with pytest.raises(FormatError, match="absolute"):
        write_bundle(str(tmp_path / "b2"), {**spec, "root": {"path": "rootfs"}})
    with pytest.raises(FormatError):
        write_bundle(str(tmp_path / "b3"), {**spec, "hostname": "\udcff"})
    (tmp_path / "file").write_text("")
    with pytest.raises(LaminaError):
        write_bundle(str(tmp_path / "file" / "b"), spec)


def test_run_bundle_unknown_runtime(tmp_path: Path, accounts_root: Path) -> None:
    write_bundle(str(tmp_path / "bundle"), build_spec(str(accounts_root), {"Cmd": ["x"]}))
    with pytest.raises(RuntimeFailure, match="'nosuchruntime' not found on PATH; install"):
        run_bundle(str(tmp_path / "bundle"), "lamina-test", runtime="nosuchruntime")


@pytest.mark.parametrize("cid", ["", "-x", "a/b", "a b", "../x", "x" * 200, "a\x00"])
def test_run_bundle_rejects_bad_container_id(tmp_path: Path, accounts_root: Path, cid: str) -> None:
    write_bundle(str(tmp_path / "bundle"), build_spec(str(accounts_root), {"Cmd": ["x"]}))
    with pytest.raises(RuntimeFailure, match="invalid container ID"):
        run_bundle(str(tmp_path / "bundle"), cid)


def test_run_bundle_needs_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match=r"no config\.json"):
        run_bundle(str(tmp_path), "lamina-test")


# --------------------------------------------------------------------------------------------------
# real containers with runc


TOOLS = ("sh", "cat", "id", "env", "pwd", "sleep")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root filesystem made of this host's binaries and the libraries they link."""
    root = tmp_path_factory.mktemp("runtime") / "rootfs"
    for d in ("bin", "etc", "tmp", "work"):
        (root / d).mkdir(parents=True)
    for tool in TOOLS:
        src = shutil.which(tool)
        assert src is not None, tool
        shutil.copy(os.path.realpath(src), root / "bin" / tool)
        out = subprocess.run(["ldd", src], capture_output=True, text=True, check=False).stdout
        for word in out.split():
            if word.startswith("/") and os.path.exists(word):
                dest = root / word.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    shutil.copy(os.path.realpath(word), dest)
    (root / "etc" / "os-release").write_text('NAME="lamina test"\nID=lamina-test\n')
    _accounts(root)
    return root


class Runner:
    def __init__(self, rootfs: Path, tmp: Path, runc: str) -> None:
        self.rootfs = rootfs
        self.tmp = tmp
        self.runc = runc
        self.state = tmp / "runc-state"
        self.ids: list[str] = []

    def new_id(self) -> str:
        cid = f"lamina-test-{secrets.token_hex(5)}"
        self.ids.append(cid)
        return cid

    def bundle(self, config: dict[str, Any], **kwargs: Any) -> str:
        bundle = self.tmp / f"bundle-{secrets.token_hex(4)}"
        write_bundle(str(bundle), build_spec(str(self.rootfs), config, **kwargs))
        return str(bundle)

    def run(self, config: dict[str, Any], cid: str | None = None, **kwargs: Any) -> tuple[int, str, str]:
        bundle = self.bundle(config, **kwargs)
        out_path, err_path = self.tmp / "out", self.tmp / "err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            rc = run_bundle(bundle, cid or self.new_id(), runtime_root=str(self.state), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=err)
        return rc, out_path.read_text(), err_path.read_text()

    def listed(self) -> list[str]:
        if not self.state.exists():
            return []
        out = subprocess.run([self.runc, "--root", str(self.state), "list", "-q"], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if str(path) in line]


@pytest.fixture
def runner(rootfs: Path, tmp_path: Path) -> Any:
    runc = require_tool("runc")
    require_root()
    before = _mounts_under(rootfs) + _mounts_under(tmp_path)
    r = Runner(rootfs, tmp_path, runc)
    yield r
    leftover = [cid for cid in r.listed() if cid in r.ids]
    for cid in leftover:
        subprocess.run([runc, "--root", str(r.state), "delete", "--force", cid], check=False)
    assert leftover == [], "runc state left behind"
    assert _mounts_under(rootfs) + _mounts_under(tmp_path) == before, "mounts leaked"
    for cid in r.ids:  # no cgroup left behind either
        assert glob.glob(f"/sys/fs/cgroup/{cid}") + glob.glob(f"/sys/fs/cgroup/*/{cid}") == []


def test_run_captures_output(runner: Runner) -> None:
    rc, out, _ = runner.run({"Cmd": ["cat", "/etc/os-release"]})
    assert rc == 0
    assert out == 'NAME="lamina test"\nID=lamina-test\n'


def test_run_exit_code_passes_through(runner: Runner) -> None:
    rc, _, err = runner.run({"Cmd": ["sh", "-c", "echo oops >&2; exit 7"]})
    assert rc == 7
    assert err == "oops\n"


def test_run_as_image_user_with_supplementary_groups(runner: Runner) -> None:
    rc, out, _ = runner.run({"Cmd": ["sh", "-c", "id -u; id -g; id -G"], "User": "app"})
    assert rc == 0
    uid, gid, groups = out.splitlines()
    assert (uid, gid) == ("1000", "1000")
    assert set(groups.split()) == {"1000", "2000", "44"}
    rc, out, _ = runner.run({"Cmd": ["id", "-u"], "User": "app"}, user="svc:44")
    assert out.strip() == "1001"


def test_run_workdir(runner: Runner) -> None:
    assert runner.run({"Cmd": ["pwd"], "WorkingDir": "/work"})[1] == "/work\n"
    assert runner.run({"Cmd": ["pwd"], "WorkingDir": "/work"}, workdir="/tmp/../etc")[1] == "/etc\n"
    assert runner.run({"Cmd": ["pwd"]})[1] == "/\n"


def test_run_environment(runner: Runner) -> None:
    config = {"Cmd": ["env"], "Env": ["GREETING=hello", "KEEP=yes"]}
    rc, out, _ = runner.run(config, env=["GREETING=bonjour", "EXTRA=1"], hostname="lamina-box")
    assert rc == 0
    env = dict(line.split("=", 1) for line in out.splitlines())
    assert env["GREETING"] == "bonjour" and env["KEEP"] == "yes" and env["EXTRA"] == "1"
    assert env["PATH"] == DEFAULT_PATH
    assert env["HOSTNAME"] == "lamina-box"


def test_run_network_none_has_only_loopback(runner: Runner) -> None:
    rc, out, _ = runner.run({"Cmd": ["cat", "/proc/net/dev"]})
    assert rc == 0
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_run_readonly_rootfs(runner: Runner) -> None:
    rc, _, err = runner.run({"Cmd": ["sh", "-c", "echo x > /tmp/f"]}, readonly=True)
    assert rc != 0 and "Read-only" in err
    assert not (runner.rootfs / "tmp" / "f").exists()


def test_run_signal_exit_is_128_plus_n(runner: Runner) -> None:
    cid = runner.new_id()
    killer_done = threading.Event()

    def kill_when_running() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killer_done.is_set():
            if cid in runner.listed():
                subprocess.run([runner.runc, "--root", str(runner.state), "kill", cid, "KILL"], check=False)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill_when_running)
    thread.start()
    try:
        rc, _, _ = runner.run({"Cmd": ["sleep", "60"]}, cid=cid)
    finally:
        killer_done.set()
        thread.join()
    assert rc == 128 + signal.SIGKILL


def test_run_missing_binary_is_a_runtime_failure(runner: Runner) -> None:
    with pytest.raises(RuntimeFailure, match=r"failed to start container .*/bin/nosuch.*no such file"):
        runner.run({"Cmd": ["/bin/nosuch"]})


def test_run_bad_config_is_a_runtime_failure(runner: Runner) -> None:
    import json
    bundle = Path(runner.bundle({"Cmd": ["sh"]}))
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"].append({"type": "bogus"})
    write_bundle(str(bundle), spec)
    with pytest.raises(RuntimeFailure, match=r"runc failed to start container .*bogus"):
        run_bundle(str(bundle), runner.new_id(), runtime_root=str(runner.state), stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_run_same_id_twice_in_a_row(runner: Runner) -> None:
    cid = runner.new_id()
    assert runner.run({"Cmd": ["sh", "-c", "exit 3"]}, cid=cid)[0] == 3
    assert runner.run({"Cmd": ["sh", "-c", "exit 4"]}, cid=cid)[0] == 4


def test_keyboard_interrupt_kills_container_and_deletes_state(runner: Runner) -> None:
    bundle = runner.bundle({"Cmd": ["sh", "-c", "echo ready; exec sleep 600"]})
    cid = runner.new_id()
    script = (
        "import signal, subprocess, sys\n"
        "from lamina.runtime import run_bundle\n"
        # Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT ignored (a shell's background job)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "try:\n"
        "    run_bundle(sys.argv[1], sys.argv[2], runtime_root=sys.argv[3], stdin=subprocess.DEVNULL)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(42)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, bundle, cid, str(runner.state)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        assert cid in runner.listed()
        child.send_signal(signal.SIGINT)  # to the Python process only, not to runc
        rest, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 42
    assert rest == "interrupted\n"
    assert cid not in runner.listed()

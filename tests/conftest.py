"""Shared test setup.

Under ``CI=true`` a test skipped because it lacked root or a tool is turned into a failure: CI runs as
root with every tool installed by ``.ci/run``, so such a skip means a missing install step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

from lamina.testing.helpers import in_ci

pytest_plugins = ["image_fixtures", "registry_fixtures", "fault_fixtures"]  # images by umoci and skopeo; small disks

_TOOL_SKIP_PREFIXES = ("requires root", "requires ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    report = yield
    if in_ci() and getattr(report, "skipped", False):
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if "Skipped: requires" in reason or reason.startswith(_TOOL_SKIP_PREFIXES):
            report.outcome = "failed"  # type: ignore[attr-defined]
    return report


def lamina_cli(*args: str, root: Path, check: bool = True, input: bytes | None = None,
               env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI in a subprocess against the store at ``root``."""
    cmd = [sys.executable, "-m", "lamina", "--root", str(root / "root"), "--runroot", str(root / "run"), *args]
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(cmd, input=input, capture_output=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


ROOTFS_CACHE = Path(os.environ.get("LAMINA_TEST_CACHE", "/var/tmp/lamina-test-cache"))


@pytest.fixture(scope="session")
def debian_rootfs_tar() -> Path:
    """A real Debian root filesystem tar made with debootstrap (cached between runs)."""
    from lamina.testing import require_root, require_tool

    cached = ROOTFS_CACHE / "debian-bookworm-minbase.tar"
    if cached.exists():
        return cached
    require_root()
    require_tool("debootstrap")
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    work = ROOTFS_CACHE / "rootfs.tmp"
    shutil.rmtree(work, ignore_errors=True)
    last = None
    for _attempt in range(3):
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(work), "http://deb.debian.org/debian"],
            capture_output=True, timeout=1200)
        if proc.returncode == 0:
            break
        last = proc.stderr.decode()[-2000:]
        shutil.rmtree(work, ignore_errors=True)
    else:
        pytest.fail(f"debootstrap failed: {last}")
    tmp = cached.with_suffix(".part")
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(work), "-cf", str(tmp), "."], check=True)
    os.replace(tmp, cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached

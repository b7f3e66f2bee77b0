"""A store used without root: read-only and unreadable directories in layers (Fedora's 0555 /usr/lib)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lamina.testing import require_tool

_SCRIPT = """
import io, json, os, sys
from lamina.config import Config
from lamina.service import ImageService
from lamina.testing import TarBuilder
d = sys.argv[1]
out = {"euid": os.geteuid()}
with ImageService.open(Config(root=d + "/r", runroot=d + "/run", driver=sys.argv[2])) as svc:
    base = svc.register_layer(io.BytesIO(TarBuilder().dir("usr", mode=0o555).file("usr/f", b"x")
        .dir("usr/lib", mode=0o555).file("usr/lib/a", b"a").dir("secret", mode=0).file("g", b"g").build()))
    child = svc.register_layer(io.BytesIO(TarBuilder().whiteout("usr/f").file("usr/lib/b", b"b")
        .opaque("secret").build()), base.chain_id)
    with svc.mounted_layer(child.chain_id) as p:
        out["usr"] = sorted(os.listdir(p + "/usr"))
        out["lib"] = sorted(os.listdir(p + "/usr/lib"))
        out["modes"] = [oct(os.stat(p + x).st_mode & 0o777) for x in ("/usr", "/usr/lib")]
    with svc.mounted_layer(base.chain_id) as p:
        out["base_usr"] = sorted(os.listdir(p + "/usr"))
    with svc.export_layer(base.chain_id) as s:
        out["base_exact"] = "sha256:" + __import__("hashlib").sha256(s.read()).hexdigest() == base.diff_id
    svc.release_layer(child.chain_id)
    svc.release_layer(base.chain_id)
    out["left"] = svc.layers() == []
print(json.dumps(out))
"""


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_read_only_and_unreadable_directories_without_root(tmp_path: object, driver: str) -> None:
    require_tool("unshare")
    d = str(tmp_path)
    # map to an unprivileged id: no capability applies to the store's files
    cmd = ["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c", _SCRIPT, d, driver]
    if driver == "overlay":
        cmd = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", _SCRIPT, d, driver]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout)
    assert out["usr"] == ["lib"] and out["lib"] == ["a", "b"] and out["modes"] == ["0o555", "0o555"]
    assert out["base_usr"] == ["f", "lib"] and out["base_exact"] and out["left"]
    if driver == "vfs":
        assert out["euid"] == 65534

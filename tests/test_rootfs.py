"""A real Debian root filesystem (debootstrap minbase) through vfs and tarball."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from conftest import lamina_cli


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture(scope="module")
def rootfs_variants(debian_rootfs_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("variants")
    gz = d / "rootfs.tar.gz"
    zst = d / "rootfs.tar.zst"
    subprocess.run(f"gzip -1 -c {debian_rootfs_tar} > {gz}", shell=True, check=True)
    subprocess.run(["zstd", "-q", "-1", str(debian_rootfs_tar), "-o", str(zst)], check=True)
    return {"tar": debian_rootfs_tar, "gzip": gz, "zstd": zst}


@pytest.mark.parametrize("driver", ["vfs", "tarball"])
def test_debian_rootfs_registers_and_exports_exactly(driver: str, rootfs_variants: dict[str, Path],
                                                     tmp_path: Path) -> None:
    expected = _sha(rootfs_variants["tar"])
    chains = set()
    for kind in ("tar", "gzip", "zstd"):
        out = lamina_cli("--driver", driver, "layer", "add", str(rootfs_variants[kind]), root=tmp_path)
        chains.add(out.stdout.decode().strip())
    assert chains == {expected}  # a base layer's ChainID is its DiffID
    exported = tmp_path / "export.tar"
    lamina_cli("layer", "export", expected, "-o", str(exported), root=tmp_path)
    assert _sha(exported) == expected
    if driver == "vfs":
        changes = lamina_cli("layer", "diff", expected, root=tmp_path).stdout.decode().splitlines()
        assert "A /etc/os-release" in changes and "A /usr/bin/dpkg" in changes


def test_hostile_archives_leave_store_unchanged(tmp_path: Path, debian_rootfs_tar: Path) -> None:
    import io
    import tarfile

    from lamina.testing import TarBuilder

    lamina_cli("--driver", "vfs", "layer", "add", str(debian_rootfs_tar), root=tmp_path)
    before = lamina_cli("layers", "--format", "json", root=tmp_path).stdout
    listing_before = sorted(p.name for p in (tmp_path / "root" / "vfs" / "dir").iterdir())
    evil = tmp_path / "evil"
    evil.mkdir()
    cases = {
        "dotdot.tar": TarBuilder().file("../escaped", b"x").build(),
        "symlink.tar": TarBuilder().symlink("out", "../" * 12 + str(evil).lstrip("/")).file("out/pwned", b"x")
        .build(),
        "abs-symlink.tar": TarBuilder().symlink("out", str(evil)).file("out/pwned", b"x").build(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ti = tarfile.TarInfo("f")
        data = bytes(range(256)) * 4000
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    cases["truncated.tar.gz"] = buf.getvalue()[:-100]
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        proc = lamina_cli("layer", "add", str(p), root=tmp_path, check=False)
        err = proc.stderr.decode()
        if name == "abs-symlink.tar":
            # the write is confined: it lands inside the layer, never in `evil`
            assert proc.returncode == 0, err
            chain = proc.stdout.decode().strip()
            lamina_cli("layer", "rm", chain, root=tmp_path)
        else:
            assert proc.returncode != 0
            assert err.count("\n") == 1 and err.startswith("Error: ") and "Traceback" not in err
        assert list(evil.iterdir()) == []
        assert not (tmp_path / "escaped").exists() and not (tmp_path / "root" / "escaped").exists()
    assert lamina_cli("layers", "--format", "json", root=tmp_path).stdout == before
    assert sorted(p.name for p in (tmp_path / "root" / "vfs" / "dir").iterdir()) == listing_before

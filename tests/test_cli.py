"""The ``lamina`` command line, run as a subprocess (``python -m lamina``)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lamina
from lamina.errors import MAX_MESSAGE
from lamina.testing import TarBuilder

HEAVY = ("sqlite3", "pluggy", "isal", "zstandard", "psutil", "lamina.store.layers")


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LAMINA_CONFIG", "LAMINA_DRIVER", "LAMINA_DEBUG", "LAMINA_DISABLE_PLUGIN_AUTOLOAD")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    return env


def run(tmp_path: Path, *args: str, stdin: bytes | None = None, store: bool = True,
        env: dict[str, str] | None = None, pre: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, *pre, "-m", "lamina"]
    if store:
        cmd += ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    full = base_env(tmp_path)
    full.update(env or {})
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, env=full, timeout=120, check=False)


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: "), err
    assert err.endswith("\n")
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- --version and --help -----------------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    out = ok(run(tmp_path, "--version", store=False))
    assert lamina.__version__ in out
    assert out.startswith("lamina")


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_heavy_modules(tmp_path: Path, flag: str) -> None:
    proc = run(tmp_path, flag, store=False, pre=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr.decode()
    imported = set()
    for line in proc.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            imported.add(line.rsplit("|", 1)[1].strip())
    assert "lamina.cli" in imported  # the measurement works
    heavy = sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


@pytest.mark.parametrize("flag", ["--version", "--help", "-h"])
def test_version_and_help_answer_without_click(tmp_path: Path, flag: str) -> None:
    proc = run(tmp_path, flag, store=False, pre=("-X", "importtime"), env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr.decode()
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "lamina.cli" in imported and "click" not in imported and "typing" not in imported
    assert proc.stdout.startswith(b"Usage: lamina" if flag != "--version" else b"lamina, version ")


# what a listing has no use for: the registry client and its HTTP stack, the OCI runtime, the archive formats
# and image transfer, tar writing, the compression libraries, and the driver (a store that records its driver
# starts it on first use: no plugin discovery, no driver module)
LISTING_NEEDS_NOT = ("lamina.registry", "lamina.runtime", "lamina.formats.ocilayout", "lamina.formats.dockerarchive",
                     "lamina.formats.archives", "lamina.formats.archivefs", "lamina.images.transfer", "requests",
                     "urllib3", "urllib.request", "http", "ssl", "tarfile", "zstandard", "isal",
                     "lamina.plugins.discovery", "lamina.plugins.active", "lamina.drivers", "pluggy", "lamina.tar",
                     "_hashlib")


@pytest.mark.parametrize("verb", [("images",), ("ps", "-a"), ("layers",), ("inspect", "app:1")])
def test_listing_verbs_import_only_what_they_use(tmp_path: Path, verb: tuple[str, ...]) -> None:
    ok(run(tmp_path, "--driver", "vfs", "import", "-", "app:1", stdin=TarBuilder().file("f", b"x").build()))
    proc = run(tmp_path, "--driver", "vfs", *verb, pre=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr.decode()
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "lamina.store.kernel" in imported  # the measurement works
    assert sorted(m for m in imported if any(m == n or m.startswith(n + ".") for n in LISTING_NEEDS_NOT)) == []


def test_the_stored_help_is_what_click_renders(tmp_path: Path) -> None:
    """``lamina --help`` prints a stored copy; it must be click's rendering of the commands as they are now
    (on failure: ``python -m lamina.cli.entry --write-help``)."""
    from lamina.cli._help import TEXT

    rendered = subprocess.run([sys.executable, "-c", "from lamina.cli.entry import main; main(['--help'])"],
                              capture_output=True, env=base_env(tmp_path), check=True).stdout.decode()
    assert rendered == TEXT
    # narrower than the stored copy: click renders it
    narrow = run(tmp_path, "--help", store=False, env={"COLUMNS": "60"})
    assert narrow.returncode == 0 and narrow.stdout.decode() != TEXT and b"Commands:" in narrow.stdout


# -- the workflow -------------------------------------------------------------------------------------------


@pytest.fixture
def tars(tmp_path: Path) -> dict[str, Path]:
    base = (TarBuilder().dir("etc").file("etc/os-release", b"ID=test\n").file("etc/hosts", b"127.0.0.1\n")
            .file("x", b"to be deleted").dir("bin").file("bin/sh", os.urandom(5000), mode=0o755).build())
    child = (TarBuilder().dir("etc").file("etc/hosts", b"10.0.0.1\n").file("new", b"new").whiteout("x")
             .build())
    d = tmp_path / "in"
    d.mkdir()
    out = {"base.tar": base, "base.tar.gz": gzip.compress(base), "child.tar": child}
    for name, data in out.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in out}


def test_workflow(tmp_path: Path, tars: dict[str, Path]) -> None:
    base_raw = tars["base.tar"].read_bytes()
    child_raw = tars["child.tar"].read_bytes()

    base_chain = ok(run(tmp_path, "--driver", "vfs", "layer", "add", str(tars["base.tar.gz"]))).strip()
    assert base_chain == sha(base_raw)  # a base layer's ChainID is its DiffID

    added = json.loads(ok(run(tmp_path, "layer", "add", "--parent", base_chain.split(":")[1][:12],
                              "--diff-id", sha(child_raw), "--format", "json", str(tars["child.tar"]))))
    child_chain = added["chain_id"]
    assert added["diff_id"] == sha(child_raw)
    assert added["parent"] == base_chain
    assert child_chain == sha(f"{base_chain} {sha(child_raw)}".encode())

    listed = json.loads(ok(run(tmp_path, "layers", "--format", "json")))
    assert [x["chain_id"] for x in listed] == [base_chain, child_chain]
    by_chain = {x["chain_id"]: x for x in listed}
    assert by_chain[base_chain]["compression"] == "gzip"
    assert by_chain[base_chain]["tar_size"] == len(base_raw)
    assert by_chain[child_chain]["parent"] == base_chain
    assert by_chain[child_chain]["depth"] == 2
    assert all(x["references"] == 1 for x in listed)
    # the global --format works too, and -q prints ChainIDs only
    assert json.loads(ok(run(tmp_path, "--format", "json", "layers"))) == listed
    assert ok(run(tmp_path, "layers", "-q")).split() == [base_chain, child_chain]
    table = ok(run(tmp_path, "layers"))
    assert "CHAIN ID" in table and base_chain.split(":")[1][:12] in table

    for chain, raw in ((base_chain, base_raw), (child_chain, child_raw)):
        out = tmp_path / f"export-{chain[7:19]}.tar"
        ok(run(tmp_path, "layer", "export", chain, "-o", str(out)))
        data = out.read_bytes()
        assert sha(data) == by_chain[chain]["diff_id"]
        assert data == raw
    assert not [p for p in tmp_path.iterdir() if "lamina-tmp" in p.name]
    assert run(tmp_path, "layer", "export", child_chain[7:20], "-o", "-").stdout == child_raw

    diff = ok(run(tmp_path, "layer", "diff", child_chain)).splitlines()
    assert "A /new" in diff and "C /etc/hosts" in diff and "D /x" in diff
    assert not [line for line in diff if "os-release" in line or "bin" in line]
    diff_json = json.loads(ok(run(tmp_path, "layer", "diff", child_chain, "--format", "json")))
    assert {"kind": "D", "path": "/x"} in diff_json
    base_diff = ok(run(tmp_path, "layer", "diff", base_chain)).splitlines()
    assert "A /bin/sh" in base_diff and all(line.startswith("A ") for line in base_diff)

    info = ok(run(tmp_path, "info"))
    assert "Storage Driver: vfs" in info
    assert "Layers: 2" in info
    info_json = json.loads(ok(run(tmp_path, "info", "--format", "json")))
    assert info_json["store"]["Storage Driver"] == "vfs"
    assert info_json["store"]["Root"] == str(tmp_path / "root")
    assert info_json["capabilities"]["can_mount"] is True
    assert info_json["version"] == lamina.__version__
    assert info_json["disk_usage"] > 5000
    assert info_json["timings"]["lamina_create"]["calls"] == 2
    assert info_json["timings"]["lamina_apply_diff"]["calls"] == 2

    # removing the parent first is refused; then child, then parent
    assert_one_line_error(run(tmp_path, "layer", "rm", base_chain), "child")
    removed = json.loads(ok(run(tmp_path, "layer", "rm", child_chain, "--format", "json")))
    assert removed == {"removed": [child_chain]}
    assert ok(run(tmp_path, "layers", "-q")).split() == [base_chain]
    assert ok(run(tmp_path, "layer", "rm", base_chain)).strip() == f"removed {base_chain}"
    assert json.loads(ok(run(tmp_path, "layers", "--format", "json"))) == []


def test_add_from_stdin_and_refcounts(tmp_path: Path, tars: dict[str, Path]) -> None:
    raw = tars["base.tar"].read_bytes()
    chain = ok(run(tmp_path, "--driver", "tarball", "layer", "add", "-", stdin=raw)).strip()
    assert chain == sha(raw)
    assert ok(run(tmp_path, "layer", "add", str(tars["base.tar.gz"]))).strip() == chain
    listed = json.loads(ok(run(tmp_path, "layers", "--format", "json")))
    assert [(x["chain_id"], x["references"]) for x in listed] == [(chain, 2)]
    assert ok(run(tmp_path, "layer", "rm", chain)) == ""  # one reference left: nothing removed
    assert ok(run(tmp_path, "layer", "rm", chain)).strip() == f"removed {chain}"


def test_drivers(tmp_path: Path) -> None:
    table = ok(run(tmp_path, "drivers"))
    assert table.splitlines()[0].split()[:3] == ["NAME", "SOURCE", "SUPPORTED"]
    rows = json.loads(ok(run(tmp_path, "drivers", "--format", "json")))
    by_name = {r["name"]: r for r in rows}
    for name in ("vfs", "tarball"):
        assert by_name[name]["source"] == "lamina"
        assert by_name[name]["supported"] is True
        assert by_name[name]["description"]


def test_drivers_shows_broken_plugin(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "lamina_cli_broken_plugin.py").write_text("raise ImportError('half-installed plugin')\n")
    info = site / "lamina_cli_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lamina-cli-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[lamina.drivers]\nbrokendrv = lamina_cli_broken_plugin\n")
    env = {"PYTHONPATH": str(site)}
    rows = json.loads(ok(run(tmp_path, "drivers", "--format", "json", env=env)))
    broken = [r for r in rows if r["name"] == "brokendrv"]
    assert len(broken) == 1
    assert "lamina-cli-broken" in broken[0]["source"]
    assert broken[0]["supported"] is False
    assert "half-installed plugin" in broken[0]["reason"]
    assert {r["name"] for r in rows if r["supported"]} >= {"vfs", "tarball"}
    # selecting it is a one-line error naming the distribution; vfs keeps working
    assert_one_line_error(run(tmp_path, "--driver", "brokendrv", "layers", env=env), "lamina-cli-broken")
    ok(run(tmp_path, "--driver", "vfs", "layers", env=env))
    # with autoload off, it is not even looked at
    rows = json.loads(ok(run(tmp_path, "drivers", "--format", "json",
                             env={**env, "LAMINA_DISABLE_PLUGIN_AUTOLOAD": "1"})))
    assert "brokendrv" not in {r["name"] for r in rows}


# -- errors -------------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "traversal.tar").write_bytes(TarBuilder().file("../x", b"x").build())
    (d / "long-traversal.tar").write_bytes(TarBuilder().file("../" + "x/" * 50_000 + "x", b"x").build())
    full = gzip.compress(TarBuilder().file("f", os.urandom(100_000)).build())
    (d / "truncated.tar.gz").write_bytes(full[: len(full) // 2])
    (d / "good.tar").write_bytes(TarBuilder().file("g", b"g").build())
    zero = "sha256:" + "0" * 64
    return {
        "traversal": (["layer", "add", str(d / "traversal.tar")], ("../x",)),
        "truncated-gzip": (["layer", "add", str(d / "truncated.tar.gz")], ("gzip",)),
        "nonexistent-file": (["layer", "add", str(d / "nope.tar")], ("nope.tar",)),
        "unknown-driver": (["--driver", "nosuchdriver", "layers"], ("nosuchdriver", "vfs")),
        "unknown-layer-export": (["layer", "export", zero, "-o", str(d / "out.tar")], (zero,)),
        "unknown-layer-prefix": (["layer", "diff", "abcdef"], ("abcdef",)),
        "unknown-layer-rm": (["layer", "rm", "0123456789"], ("0123456789",)),
        "unknown-parent": (["layer", "add", "--parent", "fedcba", str(d / "good.tar")], ("fedcba",)),
        "bad-digest": (["layer", "add", "--diff-id", "md5:1234", str(d / "good.tar")], ("md5:1234",)),
        "digest-mismatch": (["layer", "add", "--diff-id", zero, str(d / "good.tar")], ("mismatch",)),
        "not-a-layer-ref": (["layer", "diff", "xyz!"], ("xyz!",)),
        # a name of 100,000 characters is quoted cut in its middle; any message is cut at 400 characters
        "long-traversal": (["layer", "add", str(d / "long-traversal.tar")], ("climbs out", "more]...")),
        "long-driver-name": (["--driver", "d" * 100_000, "layers"], ("unknown storage driver", "characters]")),
    }


CASES = [
    "traversal", "truncated-gzip", "nonexistent-file", "unknown-driver",
    "unknown-layer-export", "unknown-layer-prefix", "unknown-layer-rm", "unknown-parent", "bad-digest",
    "digest-mismatch", "not-a-layer-ref", "long-traversal", "long-driver-name",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_error(tmp_path: Path, case: str) -> None:
    args, needles = _bad_inputs(tmp_path)[case]
    proc = run(tmp_path, *args)
    line = assert_one_line_error(proc, *needles)
    assert len(line) <= len("Error: ") + MAX_MESSAGE
    if case not in ("unknown-driver", "long-driver-name"):
        # nothing became visible
        assert json.loads(ok(run(tmp_path, "layers", "--format", "json"))) == []
        assert not (tmp_path / "bad" / "out.tar").exists()


@pytest.mark.parametrize("case", ["traversal", "truncated-gzip", "unknown-driver", "unknown-layer-export"])
def test_debug_shows_traceback(tmp_path: Path, case: str) -> None:
    args, _ = _bad_inputs(tmp_path)[case]
    for proc in (run(tmp_path, "--debug", *args), run(tmp_path, *args, env={"LAMINA_DEBUG": "1"})):
        err = proc.stderr.decode()
        assert proc.returncode != 0
        assert "Traceback (most recent call last)" in err
        assert err.splitlines()[-1].startswith("Error: ")


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run(tmp_path, "layers", env={"LAMINA_CONFIG": str(tmp_path / "missing.toml")}),
                          "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nroot = 5\n")
    assert_one_line_error(run(tmp_path, "--config", str(bad), "layers", store=False), "storage.root")
    bad.write_text("[storage\n")
    assert_one_line_error(run(tmp_path, "--config", str(bad), "layers", store=False), "invalid TOML")
    bad.write_text("[storage.limits]\nmax_layer_bytes = 0\n")
    assert_one_line_error(run(tmp_path, "--config", str(bad), "layers"), "positive")


def test_config_file_is_used(tmp_path: Path, tars: dict[str, Path]) -> None:
    cfg = tmp_path / "storage.toml"
    cfg.write_text(textwrap.dedent(f"""
        [storage]
        driver = "tarball"
        root = "{tmp_path / 'cfgroot'}"
        runroot = "{tmp_path / 'cfgrun'}"
    """))
    env = {"LAMINA_CONFIG": str(cfg)}
    ok(run(tmp_path, "layer", "add", str(tars["base.tar"]), store=False, env=env))
    info = json.loads(ok(run(tmp_path, "info", "--format", "json", store=False, env=env)))
    assert info["store"]["Storage Driver"] == "tarball"
    assert info["store"]["Root"] == str(tmp_path / "cfgroot")
    # LAMINA_DRIVER beats the file, and the store remembers its driver: a conflict naming it
    line = assert_one_line_error(run(tmp_path, "layers", store=False, env={**env, "LAMINA_DRIVER": "vfs"}))
    assert "'tarball'" in line


def test_driver_conflict_is_one_line(tmp_path: Path, tars: dict[str, Path]) -> None:
    ok(run(tmp_path, "--driver", "vfs", "layer", "add", str(tars["base.tar"])))
    assert_one_line_error(run(tmp_path, "--driver", "tarball", "layers"), "'vfs'")


def test_export_to_unwritable_place_is_one_line(tmp_path: Path, tars: dict[str, Path]) -> None:
    chain = ok(run(tmp_path, "layer", "add", str(tars["base.tar"]))).strip()
    target = tmp_path / "no" / "such" / "dir" / "out.tar"
    assert_one_line_error(run(tmp_path, "layer", "export", chain, "-o", str(target)), str(target))
    assert not target.parent.exists()


def test_mismatched_export_is_one_line(tmp_path: Path, tars: dict[str, Path]) -> None:
    chain = ok(run(tmp_path, "--driver", "vfs", "layer", "add", str(tars["base.tar"]))).strip()
    # tamper with the stored layer: the export must fail at its end, and leave no output file
    dirs = list((tmp_path / "root" / "vfs" / "dir").iterdir())
    assert len(dirs) == 1
    (dirs[0] / "etc" / "hosts").write_bytes(b"127.0.0.2\n")
    out = tmp_path / "out.tar"
    assert_one_line_error(run(tmp_path, "layer", "export", chain, "-o", str(out)), chain)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "lamina-tmp" in p.name]


def test_tls_verify_spellings() -> None:
    from lamina.cli.entry import _bare_tls_verify

    assert _bare_tls_verify(["pull", "--tls-verify", "x"]) == ["pull", "--tls-verify=true", "x"]
    assert _bare_tls_verify(["push", "--tls-verify=false", "x"]) == ["push", "--tls-verify=false", "x"]
    # a container's own arguments are left alone
    assert _bare_tls_verify(["run", "img", "prog", "--tls-verify"]) == ["run", "img", "prog", "--tls-verify"]
    assert _bare_tls_verify(["pull", "--", "--tls-verify"]) == ["pull", "--", "--tls-verify"]

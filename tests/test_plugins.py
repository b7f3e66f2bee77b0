"""Driver discovery through real installed-distribution metadata, driver selection, the timing observer.

Third-party drivers are real distributions: a ``*.dist-info`` directory (METADATA + entry_points.txt
declaring ``[lamina.drivers]``) next to its module, put on ``sys.path``; ``importlib.metadata`` finds them
exactly as it finds pip-installed packages.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lamina.config import Config
from lamina.errors import (
    ArchiveError,
    DriverConflict,
    DriverNotFound,
    DriverUnsupported,
    LaminaError,
    PluginError,
)
from lamina.plugins.discovery import DISABLE_ENV, BrokenPlugin, DriverCatalog, discover, lookup
from lamina.service import ImageService
from lamina.testing import TarBuilder


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("LAMINA_CONFIG", "LAMINA_DRIVER", DISABLE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


@pytest.fixture
def _forget_modules() -> Iterator[None]:
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("lamina_fake_"):
            del sys.modules[name]


@dataclass
class FakeDist:
    name: str  # distribution name
    module: str  # module the entry point names
    entry: str  # entry-point name


class Site:
    """A directory on sys.path holding fake installed distributions."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        path.mkdir()
        monkeypatch.syspath_prepend(str(path))

    def add(self, source: str, *, entry: str | None = None, value: str | None = None,
            dist: str | None = None) -> FakeDist:
        tag = uuid.uuid4().hex[:10]
        module = f"lamina_fake_{tag}"
        dist_name = dist or f"lamina-fake-dist-{tag}"
        entry = entry or f"fake{tag}"
        (self.path / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.path / f"{dist_name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[lamina.drivers]\n{entry} = {value or module}\n")
        return FakeDist(dist_name, module, entry)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _forget_modules: None) -> Site:
    return Site(tmp_path / "site", monkeypatch)


def vfs_like(name: str, extra_class_body: str = "", extra_module: str = "",
             register: str = "registry.add(Drv)") -> str:
    """Source of a plugin module whose driver is the vfs driver under another name."""
    body = textwrap.indent(textwrap.dedent(extra_class_body), "    ")
    return (
        "from lamina.drivers.vfs import VfsDriver\n"
        "from lamina.plugins.hookspecs import hookimpl\n"
        "from lamina.errors import DriverUnsupported\n\n"
        "class Drv(VfsDriver):\n"
        f"    name = {name!r}\n"
        "    description = 'a third-party test driver'\n"
        f"{body}\n\n"
        f"{textwrap.dedent(extra_module)}\n"
        "@hookimpl\n"
        "def lamina_register_drivers(registry):\n"
        f"    {register}\n"
    )


def cfg(tmp_path: Path, **kw: object) -> Config:
    return Config(root=tmp_path / "root", runroot=tmp_path / "run", **kw)  # type: ignore[arg-type]


def layer_tar() -> bytes:
    return TarBuilder().dir("etc").file("etc/hostname", b"box\n").build()


def assert_builtins_intact(cat: DriverCatalog) -> None:
    assert cat.drivers["vfs"].source == "lamina"
    assert cat.drivers["tarball"].source == "lamina"
    assert cat.drivers["vfs"].cls.__module__ == "lamina.drivers.vfs"
    assert cat.drivers["tarball"].cls.__module__ == "lamina.drivers.tarball"


def broken_for(cat: DriverCatalog, d: FakeDist) -> BrokenPlugin:
    hits = [b for b in cat.broken if d.name in b.source]
    assert len(hits) == 1, cat.broken
    return hits[0]


# -- discovery ----------------------------------------------------------------------------------------------


def test_builtins_only() -> None:
    cat = discover()
    assert_builtins_intact(cat)
    assert not [b for b in cat.broken if b.source == "lamina"]


def test_good_third_party_driver(site: Site, tmp_path: Path) -> None:
    d = site.add(vfs_like("gooddrv"), entry="gooddrv")
    cat = discover()
    assert_builtins_intact(cat)
    info = cat.drivers["gooddrv"]
    assert d.name in info.source
    assert info.cls.__module__ == d.module
    assert not [b for b in cat.broken if d.name in b.source]
    assert lookup(cat, "gooddrv") is info

    # and it really works as a store's driver
    data = layer_tar()
    with ImageService.open(cfg(tmp_path, driver="gooddrv")) as svc:
        assert svc.storage_driver() == "gooddrv"
        status = dict(svc.layer_store_status())
        assert d.name in status["Driver Source"]
        layer = svc.register_layer(io.BytesIO(data))
        with svc.export_layer(layer.chain_id) as s:
            assert s.read() == data
    assert (tmp_path / "root" / "gooddrv").is_dir()


def test_plugin_registering_several_drivers(site: Site) -> None:
    src = vfs_like("multi-a", extra_module="""
        from lamina.drivers.tarball import TarballDriver
        class Other(TarballDriver):
            name = "multi_b"
    """, register="registry.add(Drv); registry.add(Other)")
    d = site.add(src)
    cat = discover()
    assert d.name in cat.drivers["multi-a"].source
    assert d.name in cat.drivers["multi_b"].source


BROKEN_CASES = {
    "import-error": ("raise RuntimeError('boom at import time')\n", "boom at import time"),
    "missing-dependency": ("import lamina_no_such_dependency_xyz\n", "lamina_no_such_dependency_xyz"),
    "unknown-module-hook": (
        vfs_like("{entry}", extra_module="""
            @hookimpl
            def lamina_bogus():
                pass
        """),
        "lamina_bogus",
    ),
    "unknown-driver-hook": (
        vfs_like("{entry}", extra_class_body="""
            @hookimpl
            def lamina_bogus(self):
                return True
        """),
        "lamina_bogus",
    ),
    "unknown-argument-register": (
        "from lamina.plugins.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def lamina_register_drivers(registry, flavour):\n"
        "    pass\n",
        "flavour",
    ),
    "unknown-argument-driver-hook": (
        vfs_like("{entry}", extra_class_body="""
            @hookimpl
            def lamina_create(self, layer_id, parent, rw, flavour):
                return True
        """),
        "flavour",
    ),
    "name-registered-twice": (vfs_like("{entry}", register="registry.add(Drv); registry.add(Drv)"), "twice"),
    "builtin-name": (vfs_like("vfs"), "'vfs'"),
    "no-register-hook": ("X = 1\n", "lamina_register_drivers"),
    "register-raises": (
        "from lamina.plugins.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def lamina_register_drivers(registry):\n"
        "    raise ValueError('registry exploded')\n",
        "registry exploded",
    ),
    "not-a-driver-class": (
        "from lamina.plugins.hookspecs import hookimpl\n\n"
        "class NotADriver:\n"
        "    name = '{entry}'\n\n"
        "@hookimpl\n"
        "def lamina_register_drivers(registry):\n"
        "    registry.add(NotADriver)\n",
        "Driver",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_plugin_is_recorded_and_others_keep_working(site: Site, tmp_path: Path, case: str) -> None:
    template, expected = BROKEN_CASES[case]
    entry = "brk" + case.replace("-", "")[:20]
    d = site.add(template.replace("{entry}", entry), entry=entry)
    good = site.add(vfs_like("stillgood"), entry="stillgood")

    cat = discover()  # must not raise
    assert_builtins_intact(cat)
    assert good.name in cat.drivers["stillgood"].source
    assert entry not in cat.drivers
    b = broken_for(cat, d)
    assert d.name in b.source
    assert b.names == [entry]
    assert expected in b.error
    assert "\n" not in b.error

    with pytest.raises(PluginError) as ei:
        lookup(cat, entry)
    assert d.name in ei.value.message
    assert expected in ei.value.message

    # selecting the broken driver for a store says why; vfs and tarball stores still work
    with pytest.raises(PluginError, match=d.name):
        ImageService.open(cfg(tmp_path, driver=entry))
    for name in ("vfs", "tarball"):
        with ImageService.open(cfg(tmp_path / name, driver=name)) as svc:
            assert svc.storage_driver() == name
            svc.register_layer(io.BytesIO(layer_tar()))
            assert len(svc.layers()) == 1


def test_broken_plugin_leaves_none_of_its_drivers(site: Site) -> None:
    # the first driver registers fine, the second clashes with a built-in: the whole plugin is broken
    src = vfs_like("halfgood", extra_module="""
        from lamina.drivers.tarball import TarballDriver
        class Clash(TarballDriver):
            name = "tarball"
    """, register="registry.add(Drv); registry.add(Clash)")
    d = site.add(src, entry="halfgood")
    cat = discover()
    assert "halfgood" not in cat.drivers
    assert_builtins_intact(cat)
    b = broken_for(cat, d)
    assert "tarball" in b.error and "lamina" in b.error


def test_two_distributions_registering_the_same_name(site: Site) -> None:
    a = site.add(vfs_like("samename"), entry="samename")
    b = site.add(vfs_like("samename"), entry="samename")
    cat = discover()
    winner = cat.drivers["samename"].source
    loser = b if a.name in winner else a
    assert (a.name in winner) != (b.name in winner)
    broken = broken_for(cat, loser)
    assert "twice" in broken.error
    assert a.name in broken.error and b.name in broken.error


def test_entry_point_naming_an_object_not_a_module(site: Site) -> None:
    d = site.add("X = 1\n", entry="objentry")
    # rewrite the entry point to name an attribute
    ep = next(site.path.glob(f"{d.name.replace('-', '_')}-*.dist-info")) / "entry_points.txt"
    ep.write_text(f"[lamina.drivers]\nobjentry = {d.module}:X\n")
    cat = discover()
    assert "module" in broken_for(cat, d).error
    with pytest.raises(PluginError, match=d.name):
        lookup(cat, "objentry")


def test_unknown_driver_lists_available(site: Site, tmp_path: Path) -> None:
    site.add(vfs_like("listed"), entry="listed")
    cat = discover()
    with pytest.raises(DriverNotFound) as ei:
        lookup(cat, "nosuchdriver")
    msg = ei.value.message
    assert "nosuchdriver" in msg
    for name in ("listed", "tarball", "vfs"):
        assert name in msg
    with pytest.raises(DriverNotFound, match="nosuchdriver"):
        ImageService.open(cfg(tmp_path, driver="nosuchdriver"))


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_autoload_disabled(site: Site, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    site.add(vfs_like("plugdrv"), entry="plugdrv")
    broken = site.add("raise RuntimeError('should not even be imported')\n")
    assert "plugdrv" in discover().drivers
    monkeypatch.setenv(DISABLE_ENV, value)
    cat = discover()
    assert "plugdrv" not in cat.drivers
    assert not [b for b in cat.broken if broken.name in b.source]
    assert_builtins_intact(cat)
    with pytest.raises(DriverNotFound):
        lookup(cat, "plugdrv")


def test_autoload_not_disabled_by_other_values(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.add(vfs_like("plugdrv2"), entry="plugdrv2")
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert "plugdrv2" in discover().drivers


def test_autoload_disabled_skips_import(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    d = site.add("raise RuntimeError('imported although autoload is disabled')\n")
    monkeypatch.setenv(DISABLE_ENV, "1")
    discover()
    assert d.module not in sys.modules


# -- driver selection ---------------------------------------------------------------------------------------


def test_sticky_driver(tmp_path: Path) -> None:
    with ImageService.open(cfg(tmp_path, driver="vfs")) as svc:
        assert svc.storage_driver() == "vfs"
        svc.register_layer(io.BytesIO(layer_tar()))
    # no driver asked for, tarball first in priority: the store's own driver is reused
    with ImageService.open(cfg(tmp_path, driver_priority=("tarball", "vfs"))) as svc:
        assert svc.storage_driver() == "vfs"
        assert len(svc.layers()) == 1
    # the same driver asked for explicitly is fine
    with ImageService.open(cfg(tmp_path, driver="vfs")) as svc:
        assert svc.storage_driver() == "vfs"
    with pytest.raises(DriverConflict) as ei:
        ImageService.open(cfg(tmp_path, driver="tarball"))
    assert "'vfs'" in ei.value.message
    assert "tarball" in ei.value.message
    assert not (tmp_path / "root" / "tarball").exists()


def test_sticky_driver_through_load_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, run = tmp_path / "r", tmp_path / "x"
    with ImageService.open(root=root, runroot=run, driver="tarball") as svc:
        assert svc.storage_driver() == "tarball"
    with ImageService.open(root=root, runroot=run) as svc:
        assert svc.storage_driver() == "tarball"
    monkeypatch.setenv("LAMINA_DRIVER", "vfs")
    with pytest.raises(DriverConflict, match="'tarball'"):
        ImageService.open(root=root, runroot=run)


UNSUPPORTED = vfs_like("nope", extra_class_body="""
    @classmethod
    def probe(cls, home, options):
        raise DriverUnsupported("no frobnicator on this host")
""")


def test_priority_skips_unsupported_driver(site: Site, tmp_path: Path) -> None:
    site.add(UNSUPPORTED, entry="nope")
    with ImageService.open(cfg(tmp_path, driver_priority=("missing", "nope", "vfs", "tarball"))) as svc:
        assert svc.storage_driver() == "vfs"
    assert not (tmp_path / "root" / "nope").exists()
    with ImageService.open(cfg(tmp_path, driver_priority=("tarball",))) as svc:
        assert svc.storage_driver() == "vfs"  # recorded as the store's driver


def test_priority_order_is_respected(tmp_path: Path) -> None:
    with ImageService.open(cfg(tmp_path, driver_priority=("tarball", "vfs"))) as svc:
        assert svc.storage_driver() == "tarball"


def test_explicit_unsupported_driver(site: Site, tmp_path: Path) -> None:
    site.add(UNSUPPORTED, entry="nope")
    with pytest.raises(DriverUnsupported) as ei:
        ImageService.open(cfg(tmp_path, driver="nope"))
    assert "no frobnicator on this host" in ei.value.message
    assert "'nope'" in ei.value.message


def test_all_unsupported_lists_reasons(site: Site, tmp_path: Path) -> None:
    site.add(UNSUPPORTED, entry="nope")
    config = cfg(tmp_path, driver_priority=("nope", "vfs", "notinstalled"),
                 driver_options={"vfs": {"bogus_option": 1}})
    with pytest.raises(DriverUnsupported) as ei:
        ImageService.open(config)
    msg = ei.value.message
    assert "nope: no frobnicator on this host" in msg
    assert "vfs:" in msg and "bogus_option" in msg
    assert "notinstalled: not installed" in msg
    assert "\n" not in msg
    # nothing was recorded: a later open with a working configuration picks its own driver
    with ImageService.open(cfg(tmp_path, driver_priority=("tarball",))) as svc:
        assert svc.storage_driver() == "tarball"


# -- the timing observer ------------------------------------------------------------------------------------


def test_recorded_timings_on_a_fresh_store(tmp_path: Path) -> None:
    with ImageService.open(cfg(tmp_path, driver="vfs")) as svc:
        t = svc.layer_store.recorded_timings()
        assert t.get("lamina_create", {}).get("calls", 0) == 0


def test_recorded_timings(tmp_path: Path) -> None:
    good1 = TarBuilder().file("a", b"1").build()
    good2 = TarBuilder().file("b", b"2").build()
    bad = TarBuilder().file("../escape", b"x").build()
    with ImageService.open(cfg(tmp_path, driver="vfs")) as svc:
        l1 = svc.register_layer(io.BytesIO(good1))
        svc.register_layer(io.BytesIO(good2), l1.chain_id)
        with pytest.raises(LaminaError):
            svc.register_layer(io.BytesIO(bad))
        t = svc.layer_store.recorded_timings()
        assert t["lamina_create"]["calls"] == 3
        assert t["lamina_create"]["errors"] == 0
        assert t["lamina_apply_diff"]["calls"] == 3
        assert t["lamina_apply_diff"]["errors"] == 1
        for st in t.values():
            assert st["total_ms"] >= st["max_ms"] >= 0
        # asking again does not count the same calls twice
        assert svc.layer_store.recorded_timings()["lamina_create"]["calls"] == 3
        # in-process view of what has not been saved yet
        svc.register_layer(io.BytesIO(TarBuilder().file("c", b"3").build()))
        assert svc.timings()["lamina_create"]["calls"] == 1
        assert svc.layer_store.recorded_timings()["lamina_create"]["calls"] == 4

    env = {k: v for k, v in os.environ.items() if k not in ("LAMINA_CONFIG", "LAMINA_DRIVER")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    out = subprocess.run(
        [sys.executable, "-m", "lamina", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"),
         "info", "--format", "json"],
        capture_output=True, text=True, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["store"]["Storage Driver"] == "vfs"
    assert data["timings"]["lamina_create"]["calls"] == 4
    assert data["timings"]["lamina_apply_diff"]["calls"] == 4
    assert data["timings"]["lamina_apply_diff"]["errors"] == 1
    assert data["timings"]["lamina_status"]["calls"] >= 1


def test_timing_errors_are_counted_for_format_errors(tmp_path: Path) -> None:
    with ImageService.open(cfg(tmp_path, driver="tarball")) as svc:
        with pytest.raises(ArchiveError):
            svc.register_layer(io.BytesIO(b"\x1f\x8b" + b"garbage" * 10))
        svc.register_layer(io.BytesIO(layer_tar()))
        t = svc.layer_store.recorded_timings()
    assert t["lamina_create"] == {**t["lamina_create"], "calls": 2, "errors": 0}
    assert t["lamina_apply_diff"]["calls"] == 2
    assert t["lamina_apply_diff"]["errors"] == 1
    assert t["lamina_remove"]["calls"] == 1  # the failed layer was discarded


def test_entry_point_scan_agrees_with_importlib_metadata(site: Site, tmp_path: Path) -> None:
    """lamina reads entry points itself (start-up); its answer must be importlib.metadata's."""
    import importlib.metadata

    from lamina.plugins.discovery import driver_entry_points

    site.add(vfs_like("scan1"), entry="scan1")
    site.add(vfs_like("scan2"), entry="scan2", value="lamina_fake_x : attr")
    # a second copy of one distribution further down sys.path is shadowed by the first
    shadow = tmp_path / "shadow"
    info = shadow / "lamina_fake_dist_dup-2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lamina-fake-dist-dup\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[other]\nx = y\n\n[lamina.drivers]\n# a comment\ndup = second\n")
    first = site.path / "lamina_fake_dist_dup-1.0.dist-info"
    first.mkdir()
    (first / "METADATA").write_text("Metadata-Version: 2.1\nName: lamina-fake-dist-dup\nVersion: 1.0\n")
    (first / "entry_points.txt").write_text("[lamina.drivers]\ndup = first\n")
    sys.path.append(str(shadow))
    try:
        ours = sorted(driver_entry_points())
        theirs = sorted((ep.name, ep.value, ep.dist.name if ep.dist else "")
                        for ep in importlib.metadata.entry_points(group="lamina.drivers"))
    finally:
        sys.path.remove(str(shadow))
    assert ours == theirs
    assert ("dup", "first", "lamina-fake-dist-dup") in ours
    assert any(name == "scan2" and value == "lamina_fake_x : attr" for name, value, _ in ours)

"""Plugin manager: built-in and third-party drivers, hook validation, the timing observer.

Built-in driver modules are registered by import path, third-party ones through the ``lamina.drivers``
entry-point group (skipped when ``LAMINA_DISABLE_PLUGIN_AUTOLOAD=1``); both then go through the same
:func:`~lamina.plugins.hookspecs.lamina_register_drivers` hook. A plugin that fails to import, implements an unknown
hook, or registers a malformed driver is recorded as *broken* with its distribution's name; other drivers
keep working, and selecting a broken one reports why.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from lamina.contract import Driver, DriverInfo, DriverRegistry
from lamina.errors import DriverNotFound, LaminaError, PluginError
from lamina.plugins import OpStats, hookspecs

ENTRY_POINT_GROUP = "lamina.drivers"
BUILTIN_DRIVERS = ("lamina.drivers.vfs", "lamina.drivers.overlay", "lamina.drivers.tarball")
DISABLE_ENV = "LAMINA_DISABLE_PLUGIN_AUTOLOAD"


@dataclass
class BrokenPlugin:
    source: str
    error: str
    names: list[str] = field(default_factory=list)


@dataclass
class DriverCatalog:
    drivers: dict[str, DriverInfo]
    broken: list[BrokenPlugin]
    observers: list[tuple[ModuleType, str]] = field(default_factory=list)  # modules wrapping operation hooks


REQUIRED_HOOKS = ("lamina_capabilities", "lamina_create", "lamina_apply_diff", "lamina_exists", "lamina_remove")
# and at least one way to export a layer: lamina assembles it from a tree, or the driver keeps the stream
EXPORT_HOOKS = ("lamina_diff_root", "lamina_tar_stream")


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("lamina")
    pm.add_hookspecs(hookspecs)
    return pm


def _spec_args(name: str) -> list[str] | None:
    fn = getattr(hookspecs, name, None)
    if fn is None or not name.startswith("lamina_"):
        return None
    return list(inspect.signature(fn).parameters)


def validate_impls(obj: object, where: str) -> None:
    """Check every ``@hookimpl`` on ``obj`` names a known hook and only known arguments."""
    for attr in dir(obj):
        if not attr.startswith("lamina_"):
            continue
        fn = getattr(obj, attr, None)
        if fn is None:
            continue
        if not hasattr(fn, "lamina_impl"):
            if isinstance(obj, type):
                marked = next((base for base in obj.__mro__[1:] if hasattr(vars(base).get(attr), "lamina_impl")), None)
                if marked is not None:
                    raise PluginError(
                        f"{where}: {attr} overrides the hook of {marked.__name__} without @hookimpl, so it would "
                        "never be called"
                    )
            continue
        allowed = _spec_args(attr)
        if allowed is None:
            raise PluginError(f"{where}: implements unknown hook {attr!r}")
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        extra = [p for p in params if p not in allowed]
        if extra:
            raise PluginError(f"{where}: hook {attr} takes unknown argument(s) {', '.join(extra)}")


def _operation_impls(obj: object) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name in hookspecs.OPERATION_HOOKS:
        fn = getattr(obj, name, None)
        opts = getattr(fn, "lamina_impl", None)
        if opts is not None:
            out.append((name, opts))
    return out


def _register_module(pm: pluggy.PluginManager, module: ModuleType, source: str, registry: DriverRegistry) -> None:
    validate_impls(module, source)
    for name, opts in _operation_impls(module):
        if not (opts.get("wrapper") or opts.get("hookwrapper")):
            raise PluginError(
                f"{source}: module-level {name} must be a wrapper (@hookimpl(wrapper=True)); "
                "operations belong to driver classes"
            )
    impl = getattr(module, "lamina_register_drivers", None)
    if impl is None:
        if _operation_impls(module):
            return  # an observer-only plugin
        raise PluginError(f"{source}: module {module.__name__} has no lamina_register_drivers hook")
    before = set(registry.drivers)
    registry._current_source = source
    try:
        impl(registry=registry)
    except LaminaError:
        raise
    except Exception as e:
        raise PluginError(f"{source}: lamina_register_drivers failed: {type(e).__name__}: {e}") from e
    for name in set(registry.drivers) - before:
        cls = registry.drivers[name].cls
        validate_impls(cls, f"{source} (driver {name!r})")
        have = {n for n, _ in _operation_impls(cls)}
        missing = [h for h in REQUIRED_HOOKS if h not in have]
        if not any(h in have for h in EXPORT_HOOKS):
            missing.append(" or ".join(EXPORT_HOOKS))
        if missing:
            raise PluginError(f"{source}: driver {name!r} lacks required hook(s) {', '.join(missing)}")


def _load(value: str) -> object:
    """What an entry point's ``module[:attr]`` value names."""
    modname, _, attr = value.partition(":")
    obj: object = importlib.import_module(modname.strip())
    for part in attr.strip().split(".") if attr.strip() else []:
        obj = getattr(obj, part)
    return obj


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def driver_entry_points(group: str = ENTRY_POINT_GROUP) -> Iterator[tuple[str, str, str]]:
    """(name, value, distribution) of every entry point in ``group`` of the distributions on ``sys.path``.

    The same answer as ``importlib.metadata.entry_points(group=...)`` (first distribution of a name wins,
    in ``sys.path`` order) for installed ``*.dist-info``/``*.egg-info`` directories, without importing
    ``importlib.metadata`` and parsing every distribution's metadata: a third of a command's start-up.
    A zipped ``sys.path`` entry is left to ``importlib.metadata``.
    """
    seen: set[str] = set()
    for entry in sys.path:
        where = entry or "."
        try:
            names = os.listdir(where)
        except NotADirectoryError:
            if os.path.isfile(where):
                yield from _zipped_entry_points(group, where, seen)
            continue
        except OSError:
            continue
        for n in sorted(names):
            if not n.endswith((".dist-info", ".egg-info")):
                continue
            key = _canonical(n.rpartition(".")[0].partition("-")[0])
            if key in seen:
                continue
            seen.add(key)
            info = os.path.join(where, n)
            try:
                with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if f"[{group}]" not in text:
                continue
            found = list(_section(text, group))
            if found:
                dist = _dist_name(info) or n.partition("-")[0]
                for name, value in found:
                    yield name, value, dist


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def _dist_name(info: str) -> str | None:
    for meta in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, meta), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("Name:"):
                        return line[5:].strip()
                    if not line.strip():
                        break
        except OSError:
            continue
    return None


def _zipped_entry_points(group: str, path: str, seen: set[str]) -> Iterator[tuple[str, str, str]]:
    from importlib.metadata import distributions

    for dist in distributions(path=[path]):
        key = _canonical(dist.name or "")
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points.select(group=group):
            yield ep.name, ep.value, dist.name


def discover(only: str | None = None) -> DriverCatalog:
    """All drivers known here: built-ins, then entry points (unless disabled).

    With ``only`` (the driver a store is opened with), the other built-in drivers are not imported: a
    command pays for one driver module, not three. Every entry point is still loaded, since any of them
    may hold observers (or the driver itself)."""
    pm = new_manager()
    registry = DriverRegistry()
    broken: list[BrokenPlugin] = []
    observers: list[tuple[ModuleType, str]] = []
    for modname in BUILTIN_DRIVERS:
        if only is not None and modname.rsplit(".", 1)[-1] != only:
            continue
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # not shipped in this build
            broken.append(BrokenPlugin("lamina", f"{modname}: missing dependency {e.name}",
                                       [modname.rsplit(".", 1)[-1]]))
            continue
        snapshot = dict(registry.drivers)
        try:
            _register_module(pm, module, "lamina", registry)
        except LaminaError as e:
            registry.drivers = snapshot
            broken.append(BrokenPlugin("lamina", e.message))
            continue
        if _operation_impls(module):
            observers.append((module, "lamina"))
    if os.environ.get(DISABLE_ENV, "") not in ("1", "true", "yes"):
        for ep_name, value, dist in driver_entry_points():
            if dist == "lamina":
                continue
            source = f"{dist} (entry point {ep_name!r})"
            snapshot = dict(registry.drivers)
            try:
                try:
                    loaded = _load(value)
                except Exception as e:
                    raise PluginError(f"{source}: cannot import {value}: {type(e).__name__}: {e}") from e
                if not isinstance(loaded, ModuleType):
                    raise PluginError(f"{source}: entry point must name a module, not {value}")
                module = loaded
                _register_module(pm, module, source, registry)
            except LaminaError as e:
                registry.drivers = snapshot
                broken.append(BrokenPlugin(source, e.message, [ep_name]))
                continue
            if _operation_impls(module):
                observers.append((module, source))
    return DriverCatalog(registry.drivers, broken, observers)


def lookup(catalog: DriverCatalog, name: str) -> DriverInfo:
    info = catalog.drivers.get(name)
    if info is not None:
        return info
    for b in catalog.broken:
        if name in b.names:
            raise PluginError(f"driver {name!r} cannot be used: {b.error}")
    known = ", ".join(sorted(catalog.drivers)) or "none"
    raise DriverNotFound(f"unknown storage driver {name!r}; available drivers: {known}")


# --------------------------------------------------------------------------------------------------
# The built-in timing observer: wraps every operation hook.
# --------------------------------------------------------------------------------------------------


class TimingObserver:
    """Records calls, errors and wall time per operation hook; shown by ``lamina info --format json``."""

    def __init__(self) -> None:
        self.stats: dict[str, OpStats] = {}

    def _observe(self, hook: str) -> Generator[None, Any, Any]:
        st = self.stats.setdefault(hook, OpStats())
        t0 = time.perf_counter()
        try:
            return (yield)
        except BaseException:
            st.errors += 1
            raise
        finally:
            dt = time.perf_counter() - t0
            st.calls += 1
            st.total_s += dt
            st.max_s = max(st.max_s, dt)


def _make_wrapper(hook: str) -> Any:
    def wrapper(self: TimingObserver) -> Generator[None, Any, Any]:
        return (yield from self._observe(hook))

    wrapper.__name__ = hook
    return hookspecs.hookimpl(wrapper=True)(wrapper)


for _hook in hookspecs.OPERATION_HOOKS:
    setattr(TimingObserver, _hook, _make_wrapper(_hook))


def activate(
    info: DriverInfo, driver: Driver, observers: list[tuple[ModuleType, str]] | None = None
) -> tuple[pluggy.PluginManager, TimingObserver]:
    """A plugin manager whose operation hooks run ``driver``, wrapped by the timing observer and by
    every plugin module that wraps operation hooks."""
    pm = new_manager()
    try:
        pm.register(driver, name=f"driver:{info.cls.name}")
    except pluggy.PluginValidationError as e:
        raise PluginError(f"driver {info.cls.name!r} from {info.source} is malformed: {e}") from e
    observer = TimingObserver()
    pm.register(observer, name="lamina:timing")
    for module, source in observers or []:
        try:
            pm.register(module, name=f"observer:{source}:{module.__name__}")
        except (ValueError, pluggy.PluginValidationError) as e:
            raise PluginError(f"observer plugin {module.__name__} from {source}: {e}") from e
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"driver {info.cls.name!r} from {info.source}: {e}") from e
    return pm, observer

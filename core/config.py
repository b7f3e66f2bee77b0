"""Configuration: a TOML file shaped like containers' storage.conf.

::

    [storage]
    driver = "vfs"                      # empty: the store's own driver, else the first supported in priority
    root = "/var/lib/lamina"
    runroot = "/run/lamina"
    driver_priority = ["overlay", "vfs"]
    image_store = ""                    # a directory for image layers and blobs apart from containers'
                                        # layers (set when the store is made; the root keeps the rest)
    additional_image_stores = []        # other lamina stores' roots, used read-only (a shared filesystem)
    max_events = 10000                  # the newest events `lamina events` keeps (in the run root)

    [storage.limits]                    # guards against decompression bombs while applying a layer
    max_layer_bytes = 68719476736
    max_layer_entries = 10000000

    [storage.options.overlay]           # handed to the driver as is
    mountopt = "nodev"

    [images]
    keep_layer_blobs = true             # false: drop compressed layer blobs after apply to save disk;
                                        # saved images then get deterministically recompressed layers,
                                        # so their compressed digests (and manifest digest) change

    registries = ["docker.io"]          # tried in order for unqualified names (`busybox`)
    insecure_registries = []            # "host:port" or CIDR: plain HTTP / no TLS verification (loopback
                                        # always is)
    max_concurrent_downloads = 3
    max_concurrent_uploads = 5
    max_download_attempts = 5
    allow_foreign_urls = false          # fetch layers from a descriptor's `urls`

    [containers]
    runtime = "runc"                    # the OCI runtime `lamina run` uses: runc, crun, or a path

    [[registry]]                        # per-registry settings, shaped like containers' registries.conf v2
    prefix = "example.com/team"         # which references this table covers (default: location); host,
                                        # host/namespace, host/repo or "*.example.com"
    location = "registry.internal:5000/team"   # where they really live: replaces the prefix
    insecure = false                    # plain HTTP / no TLS verification for the location
    blocked = false                     # true: pulls and pushes of these references are refused

    [[registry.mirror]]                 # tried in order before the location, for pulls only
    location = "mirror.internal:5000/team"
    insecure = false
    pull_from_mirror = "all"            # or "digest-only", "tag-only"

Lookup order: ``$LAMINA_CONFIG``, ``/etc/lamina/storage.toml``, ``$XDG_CONFIG_HOME/lamina/storage.toml``
(the first that exists wins). Explicit arguments (CLI flags) beat ``$LAMINA_DRIVER``, which beats the file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import ConfigError

DEFAULT_PRIORITY = ("overlay", "vfs")
SYSTEM_CONFIG = Path("/etc/lamina/storage.toml")


@dataclass(frozen=True)
class Limits:
    max_layer_bytes: int = 64 * 1024**3
    max_layer_entries: int = 10_000_000


PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class MirrorSettings:
    """A ``[[registry.mirror]]``: another place to pull the registry's images from."""

    location: str  # host[:port][/path]
    insecure: bool = False
    pull_from_mirror: str = "all"  # one of PULL_FROM_MIRROR


@dataclass(frozen=True)
class RegistrySettings:
    """A ``[[registry]]``: where references starting with ``prefix`` live and how to reach them."""

    prefix: str  # host[:port][/path] or *.domain
    location: str = ""  # host[:port][/path]; empty only for a wildcard prefix (the reference's own host)
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[MirrorSettings, ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    registries: tuple[str, ...] = ("docker.io",)
    insecure_registries: tuple[str, ...] = ()
    max_concurrent_downloads: int = 3
    max_concurrent_uploads: int = 5
    max_download_attempts: int = 5
    allow_foreign_urls: bool = False
    per_registry: tuple[RegistrySettings, ...] = ()  # the [[registry]] tables


@dataclass(frozen=True)
class Config:
    root: Path
    runroot: Path
    driver: str | None = None
    driver_priority: tuple[str, ...] = DEFAULT_PRIORITY
    driver_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    source: Path | None = None
    keep_layer_blobs: bool = True
    runtime: str = "runc"
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    additional_image_stores: tuple[Path, ...] = ()  # roots of stores whose images are used read-only
    max_events: int = 10_000
    image_store: Path | None = None  # where image layers and blobs live, apart from the root (None: the root)

    def __post_init__(self) -> None:
        # Accept plain strings from API callers; everything downstream works on absolute Paths.
        for name in ("root", "runroot"):
            value = Path(getattr(self, name))
            object.__setattr__(self, name, value if value.is_absolute() else Path.cwd() / value)
        object.__setattr__(self, "driver_priority", tuple(self.driver_priority))
        object.__setattr__(self, "additional_image_stores", tuple(Path(p) for p in self.additional_image_stores))
        if self.image_store is not None:
            object.__setattr__(self, "image_store", Path(os.path.abspath(self.image_store)))

    def options_for(self, driver: str) -> dict[str, Any]:
        return dict(self.driver_options.get(driver, {}))


def _is_root() -> bool:
    return os.geteuid() == 0


def default_root() -> Path:
    if _is_root():
        return Path("/var/lib/lamina")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lamina" / "storage"


def default_runroot() -> Path:
    if _is_root():
        return Path("/run/lamina")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lamina"
    return Path(f"/tmp/lamina-run-{os.geteuid()}")


def find_config_file() -> Path | None:
    env = os.environ.get("LAMINA_CONFIG")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ConfigError(f"LAMINA_CONFIG names {env}, which is not a readable file")
        return p
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(xdg) / "lamina" / "storage.toml"
    if user.is_file():
        return user
    return None


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where} must be a {names}, got {value!r}")
    return value


def parse_config(text: str, source: Path | None = None) -> dict[str, Any]:
    where = str(source) if source else "configuration"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from e
    unknown_tables = sorted(set(data) - {"storage", "images", "containers", "registry"})
    if unknown_tables:
        raise ConfigError(
            f"{where}: unknown table(s) {', '.join(unknown_tables)}; lamina reads [storage], [images], "
            "[containers], [[registry]]"
        )
    containers = data.get("containers", {})
    _expect(containers, dict, f"{where}: [containers]")
    unknown = sorted(set(containers) - {"runtime"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [containers]: {', '.join(unknown)}")
    if "runtime" in containers:
        _expect(containers["runtime"], str, f"{where}: containers.runtime")
        if not containers["runtime"]:
            raise ConfigError(f"{where}: containers.runtime must not be empty")
    images = data.get("images", {})
    _expect(images, dict, f"{where}: [images]")
    image_keys = {"keep_layer_blobs", "registries", "insecure_registries", "max_concurrent_downloads",
                  "max_concurrent_uploads", "max_download_attempts", "allow_foreign_urls"}
    unknown = sorted(set(images) - image_keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [images]: {', '.join(unknown)}")
    for key in ("keep_layer_blobs", "allow_foreign_urls"):
        if key in images:
            _expect(images[key], bool, f"{where}: images.{key}")
    for key in ("registries", "insecure_registries"):
        if key in images:
            _expect(images[key], list, f"{where}: images.{key}")
            for entry in images[key]:
                _expect(entry, str, f"{where}: images.{key} entry")
                if not entry or ("/" in entry.rstrip("/") and key == "registries"):
                    raise ConfigError(f"{where}: images.{key} entry {entry!r} is not a registry host")
    for key in ("max_concurrent_downloads", "max_concurrent_uploads", "max_download_attempts"):
        if key in images:
            _positive(images[key], f"{where}: images.{key}")
    storage = data.get("storage", {})
    _expect(storage, dict, f"{where}: [storage]")
    known = {"driver", "root", "runroot", "driver_priority", "options", "limits", "additional_image_stores",
             "max_events", "image_store"}
    unknown = sorted(set(storage) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [storage]: {', '.join(unknown)}")
    out = dict(storage)
    if "keep_layer_blobs" in images:
        out["keep_layer_blobs"] = images["keep_layer_blobs"]
    registry = {k: v for k, v in images.items() if k != "keep_layer_blobs"}
    if "registry" in data:
        registry["per_registry"] = _registry_tables(data["registry"], where)
    if registry:
        out["registry"] = registry
    if "runtime" in containers:
        out["runtime"] = containers["runtime"]
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    driver: str | None = None,
    root: str | os.PathLike[str] | None = None,
    runroot: str | os.PathLike[str] | None = None,
    image_store: str | os.PathLike[str] | None = None,
) -> Config:
    """Build the effective configuration from file, environment and explicit overrides."""
    source = Path(path) if path is not None else find_config_file()
    storage: dict[str, Any] = {}
    if source is not None:
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read configuration {source}: {e}") from e
        storage = parse_config(text, source)
    where = str(source) if source else "configuration"

    file_driver = storage.get("driver")
    if file_driver is not None:
        _expect(file_driver, str, f"{where}: storage.driver")
    file_driver = file_driver or None
    env_driver = os.environ.get("LAMINA_DRIVER") or None
    chosen_driver = driver or env_driver or file_driver

    root_v = root if root is not None else storage.get("root")
    runroot_v = runroot if runroot is not None else storage.get("runroot")
    if root_v is not None and not isinstance(root_v, (str, os.PathLike)):
        raise ConfigError(f"{where}: storage.root must be a string")
    if runroot_v is not None and not isinstance(runroot_v, (str, os.PathLike)):
        raise ConfigError(f"{where}: storage.runroot must be a string")
    root_p = Path(root_v) if root_v else default_root()
    runroot_p = Path(runroot_v) if runroot_v else default_runroot()
    if not root_p.is_absolute():
        root_p = Path.cwd() / root_p
    if not runroot_p.is_absolute():
        runroot_p = Path.cwd() / runroot_p

    prio = storage.get("driver_priority", list(DEFAULT_PRIORITY))
    _expect(prio, list, f"{where}: storage.driver_priority")
    for p in prio:
        _expect(p, str, f"{where}: storage.driver_priority entry")

    options = storage.get("options", {})
    _expect(options, dict, f"{where}: [storage.options]")
    for name, table in options.items():
        _expect(table, dict, f"{where}: [storage.options.{name}]")

    shared = storage.get("additional_image_stores", [])
    _expect(shared, list, f"{where}: storage.additional_image_stores")
    for entry in shared:
        _expect(entry, str, f"{where}: storage.additional_image_stores entry")
        if not entry.startswith("/"):
            raise ConfigError(f"{where}: storage.additional_image_stores entry {entry!r} is not an absolute path")
        if Path(entry) == root_p:
            raise ConfigError(f"{where}: storage.additional_image_stores names the store's own root {entry}")

    # (--image-store, relative to the working directory like --root; the file's must be absolute)
    images_v = os.path.abspath(image_store) if image_store else storage.get("image_store") or None
    if images_v is not None:
        _expect(images_v, str, f"{where}: storage.image_store")
        if not images_v.startswith("/"):
            raise ConfigError(f"{where}: storage.image_store {images_v!r} is not an absolute path")
        image_p = Path(os.path.normpath(images_v))
        if image_p == root_p or root_p in image_p.parents or image_p in root_p.parents:
            raise ConfigError(f"{where}: storage.image_store {images_v} must lie apart from the root {root_p} "
                              "(neither inside the other)")
        if str(image_p) in {os.path.normpath(e) for e in shared}:
            raise ConfigError(f"{where}: storage.image_store {images_v} is also an additional image store")

    limits_t = storage.get("limits", {})
    _expect(limits_t, dict, f"{where}: [storage.limits]")
    unknown = sorted(set(limits_t) - {"max_layer_bytes", "max_layer_entries"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [storage.limits]: {', '.join(unknown)}")
    limits = Limits(
        max_layer_bytes=_positive(limits_t.get("max_layer_bytes", Limits.max_layer_bytes), where),
        max_layer_entries=_positive(limits_t.get("max_layer_entries", Limits.max_layer_entries), where),
    )
    return Config(
        root=root_p,
        runroot=runroot_p,
        driver=chosen_driver,
        driver_priority=tuple(prio),
        driver_options={k: dict(v) for k, v in options.items()},
        limits=limits,
        source=source,
        keep_layer_blobs=bool(storage.get("keep_layer_blobs", True)),
        runtime=str(storage.get("runtime", "runc")),
        registry=_registry_config(storage.get("registry", {})),
        additional_image_stores=tuple(Path(p) for p in dict.fromkeys(shared)),
        max_events=_positive(storage.get("max_events", 10_000), f"{where}: storage.max_events"),
        image_store=Path(os.path.normpath(images_v)) if images_v else None,
    )


def _registry_config(values: dict[str, Any]) -> RegistryConfig:
    v = dict(values)
    for key in ("registries", "insecure_registries"):
        if key in v:
            v[key] = tuple(v[key])
    return RegistryConfig(**v)


def _positive(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: must be a positive integer, got {value!r}")
    return value


# -- [[registry]] ---------------------------------------------------------------------------------------
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?", re.ASCII)
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)


def _location_problem(value: str) -> str | None:
    """Why ``value`` is not ``host[:port][/path]`` (the path as repository components), or None."""
    if "://" in value:
        return "must not have a scheme (write host[:port][/path])"
    host, _, path = value.partition("/")
    if _HOST_RE.fullmatch(host) is None:
        return "must be host[:port][/path]"
    if path:
        for component in path.split("/"):
            if _COMPONENT_RE.fullmatch(component) is None:
                return f"has an invalid repository path component {component!r}"
    return None


def _registry_tables(tables: Any, where: str) -> tuple[RegistrySettings, ...]:
    _expect(tables, list, f"{where}: [[registry]]")
    out: list[RegistrySettings] = []
    seen: set[str] = set()
    for n, table in enumerate(tables, 1):
        at = f"{where}: registry #{n}"
        _expect(table, dict, at)
        unknown = sorted(set(table) - {"prefix", "location", "insecure", "blocked", "mirror"})
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(unknown)}")
        location = _expect(table.get("location", ""), str, f"{at}: location")
        location = location.rstrip("/")
        prefix = _expect(table.get("prefix", ""), str, f"{at}: prefix").rstrip("/")
        if location:
            problem = _location_problem(location)
            if problem:
                raise ConfigError(f"{at}: location {location!r} {problem}")
        if prefix.startswith("*."):
            if _HOST_RE.fullmatch(prefix[2:]) is None or ":" in prefix[2:]:
                raise ConfigError(f"{at}: prefix {prefix!r}: a wildcard prefix is *.domain, without port or path")
        elif prefix:
            problem = _location_problem(prefix)
            if problem:
                raise ConfigError(f"{at}: prefix {prefix!r} {problem}")
        if not location and not prefix.startswith("*."):
            raise ConfigError(f"{at}: needs a location unless its prefix is *.domain")
        prefix = prefix or location
        if prefix == "index.docker.io" or prefix.startswith("index.docker.io/"):
            prefix = "docker.io" + prefix[len("index.docker.io"):]  # names are matched in their normalized form
        if prefix in seen:
            raise ConfigError(f"{at}: prefix {prefix!r} is given by another [[registry]] too")
        seen.add(prefix)
        flags: dict[str, bool] = {}
        for key in ("insecure", "blocked"):
            flags[key] = bool(_expect(table.get(key, False), bool, f"{at}: {key}"))
        mirrors: list[MirrorSettings] = []
        for m, mirror in enumerate(_expect(table.get("mirror", []), list, f"{at}: mirror"), 1):
            mat = f"{at}: mirror #{m}"
            _expect(mirror, dict, mat)
            unknown = sorted(set(mirror) - {"location", "insecure", "pull_from_mirror"})
            if unknown:
                raise ConfigError(f"{mat}: unknown key(s) {', '.join(unknown)}")
            if "location" not in mirror:
                raise ConfigError(f"{mat}: needs a location")
            mloc = _expect(mirror["location"], str, f"{mat}: location").rstrip("/")
            problem = _location_problem(mloc)
            if problem:
                raise ConfigError(f"{mat}: location {mloc!r} {problem}")
            mode = _expect(mirror.get("pull_from_mirror", "all"), str, f"{mat}: pull_from_mirror")
            if mode not in PULL_FROM_MIRROR:
                raise ConfigError(f"{mat}: pull_from_mirror must be one of {', '.join(PULL_FROM_MIRROR)}, got {mode!r}")
            minsecure = bool(_expect(mirror.get("insecure", False), bool, f"{mat}: insecure"))
            mirrors.append(MirrorSettings(mloc, minsecure, mode))
        out.append(RegistrySettings(prefix, location, flags["insecure"], flags["blocked"], tuple(mirrors)))
    return tuple(out)

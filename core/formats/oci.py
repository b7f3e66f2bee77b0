"""OCI and Docker schema2 documents: media types, descriptors, manifests, indexes, image configs and platforms.

Parsing is strict and total: every malformed, mistyped or oversized document raises
:class:`~lamina.errors.InvalidDocument` with a one-line message naming the offending field, never a raw
``ValueError``/``KeyError``/``TypeError``. The rules follow the OCI image spec and what containerd and docker
accept:

* a document is at most :data:`MAX_DOCUMENT_BYTES`, valid UTF-8, one JSON object without duplicate keys;
* ``schemaVersion`` is 2 (Docker schema1 is refused outright);
* a declared ``mediaType`` must agree with the media type the caller got it under, and with the content: an
  index carries no ``config``/``layers`` and a manifest no ``manifests`` ("media type disagrees with content");
* a manifest's config is an OCI or Docker image config, each layer an OCI or Docker layer type.

Platform matching follows containerd's ``platforms.Only``: the requested platform, normalized, plus the older
variants it can run (amd64 v3 also runs v2 and v1 and 386, arm64 runs arm v8 down to v5, arm v7 runs v6 and
v5), best first; with docker's ``OnlyPlatformWithFallback`` on top, so a candidate that names no CPU variant
matches on OS and architecture alone.

Documents lamina writes come from :func:`build_manifest` and :func:`build_index`: compact JSON with the keys in
the conventional order, so the same input always gives the same bytes and the same digest.
"""

from __future__ import annotations

import json
import platform as _host
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, NoReturn
from urllib.parse import quote, unquote

from lamina.digest import parse_digest, sha256_digest
from lamina.errors import DigestError, FormatError, InvalidDocument, PlatformNotFound

# -- media types -------------------------------------------------------------------------------------------

MEDIA_TYPE_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX: Final = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER: Final = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_LAYER_NONDISTRIBUTABLE: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MEDIA_TYPE_DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER: Final = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"

Compression = Literal["gzip", "zstd", "none"]

_LAYER_COMPRESSION: Final[dict[str, Compression]] = {
    MEDIA_TYPE_LAYER: "none",
    MEDIA_TYPE_LAYER_GZIP: "gzip",
    MEDIA_TYPE_LAYER_ZSTD: "zstd",
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE: "none",
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP: "gzip",
    MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD: "zstd",
    MEDIA_TYPE_DOCKER_LAYER: "none",
    MEDIA_TYPE_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN: "none",
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP: "gzip",
}

MANIFEST_TYPES: Final = frozenset({MEDIA_TYPE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
INDEX_TYPES: Final = frozenset({MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST})
CONFIG_TYPES: Final = frozenset({MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG})
LAYER_TYPES: Final = frozenset(_LAYER_COMPRESSION)
NON_DISTRIBUTABLE_TYPES: Final = frozenset(
    {
        MEDIA_TYPE_LAYER_NONDISTRIBUTABLE,
        MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_GZIP,
        MEDIA_TYPE_LAYER_NONDISTRIBUTABLE_ZSTD,
        MEDIA_TYPE_DOCKER_LAYER_FOREIGN,
        MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP,
    }
)
SCHEMA1_TYPES: Final = frozenset({MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST, MEDIA_TYPE_DOCKER_SCHEMA1_SIGNED_MANIFEST})

#: Annotation buildkit puts on the index entry of an attestation (provenance, SBOM) manifest.
ANNOTATION_REFERENCE_TYPE: Final = "vnd.docker.reference.type"
ATTESTATION_MANIFEST: Final = "attestation-manifest"

#: Largest manifest, index or image config lamina parses or writes.
MAX_DOCUMENT_BYTES: Final = 4 * 1024 * 1024
#: Largest descriptor size: JSON numbers are only exact up to 2**53.
MAX_DESCRIPTOR_SIZE: Final = 2**53

_SCHEMA1_MESSAGE: Final = "schema1 manifests are not supported"
# RFC 6838 section 4.2 restricted names, as the OCI descriptor spec writes them.
_MEDIA_TYPE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def is_layer_type(media_type: str) -> bool:
    """True for the OCI and Docker layer media types lamina can unpack."""
    return media_type in LAYER_TYPES


def is_manifest_type(media_type: str) -> bool:
    """True for an OCI image manifest or a Docker schema2 manifest."""
    return media_type in MANIFEST_TYPES


def is_index_type(media_type: str) -> bool:
    """True for an OCI image index or a Docker schema2 manifest list."""
    return media_type in INDEX_TYPES


def is_config_type(media_type: str) -> bool:
    """True for an OCI or Docker image config."""
    return media_type in CONFIG_TYPES


def is_non_distributable(media_type: str) -> bool:
    """True for layers registries may decline to serve (OCI non-distributable, Docker foreign)."""
    return media_type in NON_DISTRIBUTABLE_TYPES


def layer_compression(media_type: str) -> Compression:
    """The compression of a layer media type; :class:`InvalidDocument` for anything that is not a layer."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except (KeyError, TypeError):
        raise InvalidDocument(f"{_show(media_type)} is not a layer media type") from None


def digest_of(data: bytes) -> str:
    """The sha256 digest of a document's exact bytes: the name it is stored and referenced under."""
    return sha256_digest(bytes(data))


# -- field validation --------------------------------------------------------------------------------------


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bad(where: str, expected: str, value: object) -> NoReturn:
    raise InvalidDocument(f"{where} must be {expected}, got {_json_type(value)}")


def _check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        _bad(where, "a string", value)
    return value


def _opt_str(obj: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    """An optional string member: absent or null gives None (Go's ``omitempty`` semantics)."""
    value = obj.get(key)
    return None if value is None else _check_str(value, prefix + key)


def _check_str_list(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        _bad(where, "an array of strings", value)
    for i, item in enumerate(value):
        _check_str(item, f"{where}[{i}]")
    return tuple(value)


def _check_str_map(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        _bad(where, "an object of strings", value)
    out: dict[str, str] = {}
    for key, item in value.items():
        _check_str(key, f"{where} key")
        out[key] = _check_str(item, f"{where}[{key!r}]")
    return out


def _check_media_type(value: object, where: str) -> str:
    text = _check_str(value, where)
    if _MEDIA_TYPE_RE.fullmatch(text) is None:
        raise InvalidDocument(f"{where} {_show(text)} is not a media type")
    return text


def _check_digest(value: object, where: str) -> str:
    try:
        digest = parse_digest(value)  # type: ignore[arg-type]  # parse_digest rejects non-strings itself
    except DigestError as e:
        raise InvalidDocument(f"{where}: {e.message}") from e
    if digest.endswith("\n"):  # the digest regex's "$" also matches before a final newline
        raise InvalidDocument(f"{where}: invalid digest {_show(value)}")
    return digest


def _check_size(value: object, where: str) -> int:
    # bool is an int subclass, float 1.0 would round-trip as 1: neither is a size.
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(where, "an integer", value)
    if value < 0:
        raise InvalidDocument(f"{where} must not be negative, got {value}")
    if value > MAX_DESCRIPTOR_SIZE:
        raise InvalidDocument(f"{where} is larger than 2**53")
    return value


def _check_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(where, "an object", value)
    return value


# -- JSON ---------------------------------------------------------------------------------------------------


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidDocument(f"duplicate key {_show(key)} in JSON object")
        out[key] = value
    return out


def _reject_constant(name: str) -> NoReturn:
    raise InvalidDocument(f"{name} is not valid JSON")


def _load_document(data: bytes, what: str) -> tuple[bytes, dict[str, Any]]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidDocument(f"{what} must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise InvalidDocument(f"{what} is {len(raw)} bytes, over the {MAX_DOCUMENT_BYTES} byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidDocument(f"{what} is not valid UTF-8 (byte {e.start})") from e
    try:
        doc = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InvalidDocument(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except InvalidDocument as e:
        raise InvalidDocument(f"{what}: {e.message}") from e
    except (ValueError, RecursionError) as e:  # integer too long to convert, nesting too deep
        raise InvalidDocument(f"{what} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise InvalidDocument(f"{what} must be a JSON object, got {_json_type(doc)}")
    return raw, doc


def _dump(doc: Mapping[str, Any], what: str) -> bytes:
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidDocument(f"{what} would be {len(data)} bytes, over the {MAX_DOCUMENT_BYTES} byte limit")
    return data


# -- platforms ----------------------------------------------------------------------------------------------

# Go's GOOS and GOARCH lists (go/build/syslist.go), as containerd uses them to read one-word specifiers.
_KNOWN_OS: Final = frozenset(
    {"aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js", "linux", "nacl", "netbsd",
     "openbsd", "plan9", "solaris", "wasip1", "windows", "zos"}
)  # fmt: skip
_KNOWN_ARCH: Final = frozenset(
    {"386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "loong64", "mips", "mipsle", "mips64",
     "mips64le", "mips64p32", "mips64p32le", "ppc", "ppc64", "ppc64le", "riscv", "riscv64", "s390", "s390x",
     "sparc", "sparc64", "wasm"}
)  # fmt: skip
_OS_SPEC_RE: Final = re.compile(r"([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%-]*)((?:\+[A-Za-z0-9_.%-]+)*)\))?")
_PART_SPEC_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_BAD_PERCENT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LEVEL_RE: Final = re.compile(r"v?(\d{1,2})")
_ARM64_VARIANT_RE: Final = re.compile(r"v(\d{1,2})(?:\.(\d{1,2}))?")


@dataclass(frozen=True)
class Platform:
    """An OCI platform. Values are kept as declared; :meth:`normalized` gives the canonical form.

    Empty strings for ``variant`` and ``os_version`` are stored as None, ``os_features`` as a tuple.
    """

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.variant == "":
            object.__setattr__(self, "variant", None)
        if self.os_version == "":
            object.__setattr__(self, "os_version", None)
        if not isinstance(self.os_features, tuple):
            object.__setattr__(self, "os_features", tuple(self.os_features))

    def __str__(self) -> str:
        return format_platform(self)

    def normalized(self) -> Platform:
        """The canonical form containerd compares: ``x86_64`` is amd64, ``aarch64`` arm64, arm64/v8 is arm64,
        amd64/v1 is amd64, plain arm is arm/v7; OS features sorted and unique."""
        os_name = self.os.lower()
        if os_name == "macos":
            os_name = "darwin"
        arch, variant = _normalize_arch(self.architecture, self.variant)
        return Platform(os_name, arch, variant, self.os_version, tuple(sorted(set(self.os_features))))

    @classmethod
    def from_json(cls, obj: object, *, where: str = "platform") -> Platform:
        doc = _check_object(obj, where)
        arch = _check_str(doc.get("architecture"), f"{where}.architecture")
        os_name = _check_str(doc.get("os"), f"{where}.os")
        features = doc.get("os.features")
        return cls(
            os=os_name,
            architecture=arch,
            variant=_opt_str(doc, "variant", f"{where}."),
            os_version=_opt_str(doc, "os.version", f"{where}."),
            os_features=() if features is None else _check_str_list(features, f"{where}.os.features"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out


def _normalize_arch(arch: str, variant: str | None) -> tuple[str, str | None]:
    arch = arch.lower()
    var = (variant or "").lower()
    if arch in ("i386", "i486", "i586", "i686"):
        return "386", None
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", None if var in ("", "v1") else var
    if arch in ("aarch64", "arm64"):
        return "arm64", None if var in ("", "8", "v8") else var
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if var in ("", "7"):
            return "arm", "v7"
        if var in ("5", "6", "8"):
            return "arm", "v" + var
    return arch, var or None


def _decode_os_option(value: str, spec: str) -> str:
    if "%" not in value:
        return value
    if _BAD_PERCENT_RE.search(value):
        raise FormatError(f"invalid platform {_show(spec)}: bad percent escape in {_show(value)}")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError as e:
        raise FormatError(f"invalid platform {_show(spec)}: percent escape is not UTF-8") from e


def _encode_os_option(value: str) -> str:
    # Everything outside the specifier alphabet, so any value survives the trip through parse_platform.
    return quote(value, safe="", errors="surrogatepass").replace("~", "%7E")


def parse_platform(spec: str) -> Platform:
    """Parse a platform specifier, containerd style, into its normalized platform.

    ``<os>``, ``<arch>``, ``<os>/<arch>`` or ``<os>/<arch>/<variant>``, where ``<os>`` may carry an OS version
    and features: ``windows(10.0.17763+win32k)/amd64``. A lone OS takes the host's architecture, a lone
    architecture the host's OS. Raises :class:`FormatError` for anything else.
    """
    if not isinstance(spec, str):
        raise FormatError(f"platform must be a string, got {type(spec).__name__}")
    if "*" in spec:
        raise FormatError(f"invalid platform {_show(spec)}: wildcards are not supported")
    parts = spec.split("/")
    if len(parts) > 3:
        raise FormatError(f"invalid platform {_show(spec)}: expected os/arch/variant at most")
    m = _OS_SPEC_RE.fullmatch(parts[0])
    if m is None:
        raise FormatError(f"invalid platform {_show(spec)}: bad OS component {_show(parts[0])}")
    for part in parts[1:]:
        if _PART_SPEC_RE.fullmatch(part) is None:
            raise FormatError(f"invalid platform {_show(spec)}: bad component {_show(part)}")
    os_name = m.group(1).lower()
    if os_name == "macos":
        os_name = "darwin"
    os_version = _decode_os_option(m.group(2) or "", spec) or None
    features = tuple(_decode_os_option(f, spec) for f in (m.group(3) or "").split("+")[1:])
    has_options = m.group(2) is not None
    if len(parts) == 1:
        host = host_platform()
        if os_name in _KNOWN_OS:
            return Platform(os_name, host.architecture, host.variant, os_version, features).normalized()
        arch, variant = _normalize_arch(parts[0], None)
        if has_options or arch not in _KNOWN_ARCH:
            raise FormatError(f"invalid platform {_show(spec)}: unknown operating system or architecture")
        return Platform(host.os, arch, variant, host.os_version).normalized()
    variant = parts[2] if len(parts) == 3 else None
    return Platform(os_name, parts[1], variant, os_version, features).normalized()


def format_platform(p: Platform) -> str:
    """``os[(version+features)]/arch[/variant]``, the inverse of :func:`parse_platform`; ``unknown`` without OS."""
    if not p.os:
        return "unknown"
    features = "".join("+" + _encode_os_option(f) for f in sorted(p.os_features))
    options = _encode_os_option(p.os_version or "") + features
    head = f"{p.os}({options})" if options else p.os
    return "/".join(part for part in (head, p.architecture, p.variant) if part)


def _pointer_size() -> int:
    return struct.calcsize("P")


def host_platform() -> Platform:
    """The platform of this host, normalized, as containerd's ``platforms.DefaultSpec`` would see it."""
    os_name = _host.system().lower() or "linux"
    if os_name == "macos":
        os_name = "darwin"
    machine = _host.machine().lower()
    arm = re.fullmatch(r"armv(\d+)[a-z]*", machine)
    arch: str
    variant: str | None
    if arm is not None:
        arch, variant = "arm", "v" + arm.group(1)
    else:
        arch, variant = _normalize_arch({"loongarch64": "loong64"}.get(machine, machine), None)
    if _pointer_size() == 4:  # a 32-bit interpreter on a 64-bit kernel runs 32-bit images
        if arch == "amd64":
            arch, variant = "386", None
        elif arch == "arm64":
            arch, variant = "arm", "v8"
    os_version = _host.version() if os_name == "windows" else None
    return Platform(os_name, arch, variant, os_version).normalized()


def _compatible(p: Platform) -> list[Platform]:
    """containerd's platform vector: ``p`` (normalized) first, then the older platforms it can also run."""
    out = [p]
    if p.architecture == "amd64":
        level = _LEVEL_RE.fullmatch(p.variant or "v1")
        if level is not None:
            out += [replace(p, variant=f"v{n}" if n > 1 else None) for n in range(int(level.group(1)) - 1, 0, -1)]
        out.append(replace(p, architecture="386", variant=None))
    elif p.architecture == "arm":
        level = _LEVEL_RE.fullmatch(p.variant or "")
        if level is not None:
            out += [replace(p, variant=f"v{n}") for n in range(int(level.group(1)) - 1, 4, -1)]
    elif p.architecture == "arm64":
        m = _ARM64_VARIANT_RE.fullmatch(p.variant or "v8")
        if m is None or int(m.group(1)) < 8:
            out += _compatible(replace(p, architecture="arm"))
        else:
            major, minor = int(m.group(1)), int(m.group(2) or 0)
            if major == 9:
                # v9.0 branched from v8.5: v9.x also runs v9.{x-1..0} and v8.{x+5..0}
                out += [replace(p, variant=f"v9.{n}" if n else "v9") for n in range(minor - 1, -1, -1)]
                major, minor = 8, minor + 5
                out.append(replace(p, variant=f"v8.{minor}"))
            out += [replace(p, variant=f"v{major}.{n}" if n else f"v{major}") for n in range(minor - 1, -1, -1)]
            out += _compatible(replace(p, architecture="arm", variant="v8"))
    return [q.normalized() for q in out]


def _windows_build(version: str | None) -> tuple[int, int, int] | None:
    parts = (version or "").split(".")
    if len(parts) < 3 or not all(x.isascii() and x.isdigit() and len(x) <= 6 for x in parts[:3]):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


_WINDOWS_LTSC_2022: Final = 20348


def _windows_version_ok(host: str | None, candidate: str | None) -> bool:
    """containerd's Windows rule: same major.minor; before Server 2022 the same build, from it on any build
    between Server 2022's and the host's (stable ABI)."""
    want = _windows_build(host)
    if want is None or not candidate:
        return True
    got = _windows_build(candidate) or (0, 0, 0)
    if want[:2] != got[:2]:
        return False
    if want[2] < _WINDOWS_LTSC_2022:
        return want[2] == got[2]
    return _WINDOWS_LTSC_2022 <= got[2] <= want[2]


def _same_platform(want: Platform, got: Platform) -> bool:
    """Equality of normalized platforms; the candidate's OS features must be a subset of the wanted ones."""
    if (want.os, want.architecture, want.variant) != (got.os, got.architecture, got.variant):
        return False
    if want.os == "windows" and not _windows_version_ok(want.os_version, got.os_version):
        return False
    return set(got.os_features) <= set(want.os_features)


class PlatformMatcher:
    """containerd's ``platforms.Only(p)`` with docker's ``OnlyPlatformWithFallback`` on top.

    A candidate matches when it equals ``p`` or one of the older platforms ``p`` can run (normalized
    comparison), or, having no CPU variant at all, when its OS and architecture equal ``p``'s (docker's
    fallback; lamina still applies the Windows OS version and OS feature checks there).
    """

    def __init__(self, platform: Platform) -> None:
        self.platform = platform.normalized()
        self._vector = _compatible(self.platform)
        self._without_variant = replace(self.platform, variant=None)

    def __repr__(self) -> str:
        return f"PlatformMatcher({format_platform(self.platform)!r})"

    def rank(self, candidate: Platform) -> int | None:
        """0 for the best possible candidate, larger for less preferred ones, None for no match."""
        got = candidate.normalized()
        for i, want in enumerate(self._vector):
            if _same_platform(want, got):
                return i
        # docker's fallback for a candidate declared without a variant; OS version and features still count
        if candidate.variant is None and _same_platform(self._without_variant, replace(got, variant=None)):
            return len(self._vector)
        return None

    def match(self, candidate: Platform) -> bool:
        return self.rank(candidate) is not None

    def less(self, a: Platform, b: Platform) -> bool:
        """True when ``a`` should be preferred to ``b``: a match beats no match, a closer match a looser one."""
        ra, rb = self.rank(a), self.rank(b)
        if ra is None:
            return False
        return rb is None or ra < rb


# -- descriptors and documents -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """A typed, sized, content-addressed reference to a blob. Hashable on (media_type, digest, size)."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_media_type(self.media_type, "descriptor media type")
        _check_digest(self.digest, "descriptor digest")
        _check_size(self.size, "descriptor size")
        object.__setattr__(self, "annotations", _check_str_map(self.annotations, "descriptor annotations"))
        object.__setattr__(self, "urls", _check_str_list(self.urls, "descriptor urls"))
        if self.platform is not None and not isinstance(self.platform, Platform):
            raise InvalidDocument(f"descriptor platform must be a Platform, got {type(self.platform).__name__}")

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size))

    @classmethod
    def from_json(cls, obj: object, *, where: str = "descriptor") -> Descriptor:
        """Validate and build a descriptor from its JSON object; unknown members are ignored, as OCI asks."""
        doc = _check_object(obj, where)
        for key in ("mediaType", "digest", "size"):
            if key not in doc:
                raise InvalidDocument(f"{where} has no {key}")
        annotations = doc.get("annotations")
        platform = doc.get("platform")
        urls = doc.get("urls")
        return cls(
            media_type=_check_media_type(doc["mediaType"], f"{where}.mediaType"),
            digest=_check_digest(doc["digest"], f"{where}.digest"),
            size=_check_size(doc["size"], f"{where}.size"),
            annotations={} if annotations is None else _check_str_map(annotations, f"{where}.annotations"),
            platform=None if platform is None else Platform.from_json(platform, where=f"{where}.platform"),
            urls=() if urls is None else _check_str_list(urls, f"{where}.urls"),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object, members in the image-spec order, empty optional members left out."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema2) and the exact bytes it was parsed from."""

    schema_version: int
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str]
    raw: bytes

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def digest(self) -> str:
        return digest_of(self.raw)


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker schema2) and the exact bytes it was parsed from."""

    schema_version: int
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str]
    raw: bytes

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def digest(self) -> str:
        return digest_of(self.raw)


def _clean_hint(media_type: str | None) -> str | None:
    """A media type as a caller got it (possibly a Content-Type header): parameters dropped, lower case."""
    if media_type is None:
        return None
    if not isinstance(media_type, str):
        raise InvalidDocument(f"media type must be a string, got {type(media_type).__name__}")
    return media_type.split(";", 1)[0].strip().lower()


def _parse(data: bytes, hint: str | None) -> Manifest | Index:
    hint = _clean_hint(hint)
    if hint in SCHEMA1_TYPES:
        raise InvalidDocument(_SCHEMA1_MESSAGE)
    raw, doc = _load_document(data, "document")
    version = doc.get("schemaVersion")
    if version == 1 and not isinstance(version, bool) and isinstance(version, int):
        raise InvalidDocument(_SCHEMA1_MESSAGE)
    declared = doc.get("mediaType")
    if declared is not None:
        _check_str(declared, "mediaType")
        if declared in SCHEMA1_TYPES:
            raise InvalidDocument(_SCHEMA1_MESSAGE)
        if hint is not None and declared.lower() != hint:
            raise InvalidDocument(f"document media type {_show(declared)} disagrees with {_show(hint)}")
    if isinstance(version, bool) or not isinstance(version, int) or version != 2:
        raise InvalidDocument(f"schemaVersion must be 2, got {_show(version) if version is not None else 'none'}")

    has_index_members = "manifests" in doc
    has_manifest_members = "config" in doc or "layers" in doc
    media_type = declared if declared is not None else hint
    if media_type is None:
        if has_index_members and has_manifest_members:
            raise InvalidDocument("document has both manifests and config/layers: neither a manifest nor an index")
        if has_index_members:
            media_type = MEDIA_TYPE_INDEX
        elif has_manifest_members:
            media_type = MEDIA_TYPE_MANIFEST
        else:
            raise InvalidDocument("document has neither manifests nor config/layers")

    if is_manifest_type(media_type):
        if has_index_members:
            raise InvalidDocument(f"media type disagrees with content: {media_type} document has manifests")
        return _build_manifest_from(doc, raw, media_type)
    if is_index_type(media_type):
        if has_manifest_members:
            raise InvalidDocument(f"media type disagrees with content: {media_type} document has config or layers")
        return _build_index_from(doc, raw, media_type)
    raise InvalidDocument(f"unsupported document media type {_show(media_type)}")


def _annotations_of(doc: Mapping[str, Any]) -> dict[str, str]:
    value = doc.get("annotations")
    return {} if value is None else _check_str_map(value, "annotations")


def _build_manifest_from(doc: dict[str, Any], raw: bytes, media_type: str) -> Manifest:
    if "config" not in doc:
        raise InvalidDocument("manifest has no config")
    config = Descriptor.from_json(doc["config"], where="config")
    if not is_config_type(config.media_type):
        raise InvalidDocument(f"config media type {_show(config.media_type)} is not an image config")
    layers_json = doc.get("layers")
    if not isinstance(layers_json, list):
        if "layers" not in doc:
            raise InvalidDocument("manifest has no layers")
        _bad("layers", "an array", layers_json)
    layers = tuple(Descriptor.from_json(d, where=f"layers[{i}]") for i, d in enumerate(layers_json))
    for i, layer in enumerate(layers):
        if not is_layer_type(layer.media_type):
            raise InvalidDocument(f"layers[{i}] media type {_show(layer.media_type)} is not a layer type")
    return Manifest(2, media_type, config, layers, _annotations_of(doc), raw)


def _build_index_from(doc: dict[str, Any], raw: bytes, media_type: str) -> Index:
    manifests_json = doc.get("manifests")
    if not isinstance(manifests_json, list):
        if "manifests" not in doc:
            raise InvalidDocument("index has no manifests")
        _bad("manifests", "an array", manifests_json)
    manifests = tuple(Descriptor.from_json(d, where=f"manifests[{i}]") for i, d in enumerate(manifests_json))
    return Index(2, media_type, manifests, _annotations_of(doc), raw)


def parse_document(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or an index, deciding which from the declared ``mediaType``, the ``media_type`` the
    caller got the document under (a Content-Type header will do) or, lacking both, its members."""
    return _parse(data, media_type)


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest:
    """Parse an image manifest; :class:`InvalidDocument` for an index or anything malformed."""
    if (hint := _clean_hint(media_type)) is not None and hint not in MANIFEST_TYPES and hint not in SCHEMA1_TYPES:
        raise InvalidDocument(f"media type {_show(media_type)} is not an image manifest")
    result = _parse(data, media_type)
    if not isinstance(result, Manifest):
        raise InvalidDocument(f"expected an image manifest, got {result.media_type}")
    return result


def parse_index(data: bytes, media_type: str | None = None) -> Index:
    """Parse an image index or manifest list; :class:`InvalidDocument` for a manifest or anything malformed."""
    if (hint := _clean_hint(media_type)) is not None and hint not in INDEX_TYPES and hint not in SCHEMA1_TYPES:
        raise InvalidDocument(f"media type {_show(media_type)} is not an image index")
    result = _parse(data, media_type)
    if not isinstance(result, Index):
        raise InvalidDocument(f"expected an image index, got {result.media_type}")
    return result


# -- building -----------------------------------------------------------------------------------------------


def _descriptor_arg(value: object, where: str) -> Descriptor:
    if not isinstance(value, Descriptor):
        raise InvalidDocument(f"{where} must be a Descriptor, got {type(value).__name__}")
    return value


def _annotations_arg(annotations: Mapping[str, str] | None, media_type: str) -> dict[str, str] | None:
    if not annotations:
        return None
    if media_type.startswith("application/vnd.docker."):
        raise InvalidDocument(f"{media_type} documents carry no annotations")
    return dict(sorted(_check_str_map(annotations, "annotations").items()))


def build_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    media_type: str = MEDIA_TYPE_MANIFEST,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize a manifest: compact JSON, keys ``schemaVersion, mediaType, config, layers, annotations``."""
    if not is_manifest_type(media_type):
        raise InvalidDocument(f"{_show(media_type)} is not an image manifest media type")
    config = _descriptor_arg(config, "config")
    if not is_config_type(config.media_type):
        raise InvalidDocument(f"config media type {_show(config.media_type)} is not an image config")
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise InvalidDocument(f"layers must be a sequence of descriptors, got {type(layers).__name__}")
    layer_list = [_descriptor_arg(d, f"layers[{i}]") for i, d in enumerate(layers)]
    for i, layer in enumerate(layer_list):
        if not is_layer_type(layer.media_type):
            raise InvalidDocument(f"layers[{i}] media type {_show(layer.media_type)} is not a layer type")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layer_list],
    }
    if (notes := _annotations_arg(annotations, media_type)) is not None:
        doc["annotations"] = notes
    return _dump(doc, "manifest")


def build_index(
    manifests: Sequence[Descriptor],
    annotations: Mapping[str, str] | None = None,
    *,
    media_type: str = MEDIA_TYPE_INDEX,
) -> bytes:
    """Serialize an index: compact JSON, keys ``schemaVersion, mediaType, manifests, annotations``."""
    if not is_index_type(media_type):
        raise InvalidDocument(f"{_show(media_type)} is not an image index media type")
    if isinstance(manifests, str | bytes) or not isinstance(manifests, Sequence):
        raise InvalidDocument(f"manifests must be a sequence of descriptors, got {type(manifests).__name__}")
    entries = [_descriptor_arg(d, f"manifests[{i}]") for i, d in enumerate(manifests)]
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "manifests": [d.to_json() for d in entries]}
    if (notes := _annotations_arg(annotations, media_type)) is not None:
        doc["annotations"] = notes
    return _dump(doc, "index")


# -- selecting from an index -------------------------------------------------------------------------------


def is_attestation(desc: Descriptor) -> bool:
    """An attestation (provenance, SBOM) manifest that rides along in an index: never an image to run."""
    if desc.annotations.get(ANNOTATION_REFERENCE_TYPE) == ATTESTATION_MANIFEST:
        return True
    return desc.platform is not None and desc.platform.os == "unknown" and desc.platform.architecture == "unknown"


def select_manifest(
    index: Index, platform: Platform | None = None, read: Callable[[Descriptor], bytes] | None = None
) -> Descriptor:
    """The index entry best matching ``platform`` (default: the host's), by :class:`PlatformMatcher` order.

    Only manifest and index entries are candidates; attestation manifests never are. Among equally good
    matches the first in the index wins. For a manifest entry without a platform, ``read`` (the verified
    bytes of a blob, by its descriptor) gives its manifest and config, and the config's platform is ranked
    like a declared one (containerd's rule); without ``read``, or for an index entry, an entry without a
    platform is taken only when no entry with one matches. Raises :class:`PlatformNotFound` naming the
    platforms the index offers.
    """
    want = host_platform() if platform is None else platform
    matcher = PlatformMatcher(want)
    best: Descriptor | None = None
    best_rank = 0
    unplatformed: Descriptor | None = None
    offered: list[str] = []
    for desc in index.manifests:
        if is_attestation(desc) or not (is_manifest_type(desc.media_type) or is_index_type(desc.media_type)):
            continue
        declared = desc.platform
        if declared is None and read is not None and is_manifest_type(desc.media_type):
            declared = config_platform(read, desc)
        if declared is None:
            unplatformed = unplatformed or desc
            continue
        if (name := format_platform(declared)) not in offered:
            offered.append(name)
        rank = matcher.rank(declared)
        if rank is not None and (best is None or rank < best_rank):
            best, best_rank = desc, rank
    if best is not None:
        return best
    if unplatformed is not None:
        return unplatformed
    available = ", ".join(offered) if offered else "none"
    raise PlatformNotFound(f"no manifest for platform {format_platform(matcher.platform)}; available: {available}")


def config_platform(read: Callable[[Descriptor], bytes], desc: Descriptor) -> Platform:
    """The platform the config of the manifest ``desc`` declares; ``read`` gives a blob's verified bytes."""
    manifest = parse_manifest(read(desc), desc.media_type)
    return parse_config(read(manifest.config)).platform


# -- image config -------------------------------------------------------------------------------------------

# Members of the inner "config" object and the JSON type docker's Go structs give them (null always allowed).
_CONFIG_STR: Final = ("User", "WorkingDir", "StopSignal", "Hostname", "Domainname", "Image", "MacAddress")
_CONFIG_STR_LIST: Final = ("Env", "Entrypoint", "Cmd", "OnBuild", "Shell")
_CONFIG_OBJECT: Final = ("ExposedPorts", "Volumes", "Healthcheck")
_CONFIG_BOOL: Final = ("ArgsEscaped", "AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin", "StdinOnce")
_HISTORY_STR: Final = ("created", "author", "created_by", "comment")


def _check_inner_config(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    inner = _check_object(value, "config")
    for key in _CONFIG_STR:
        if inner.get(key) is not None:
            _check_str(inner[key], f"config.{key}")
    for key in _CONFIG_STR_LIST:
        if inner.get(key) is not None:
            _check_str_list(inner[key], f"config.{key}")
    for key in _CONFIG_OBJECT:
        if inner.get(key) is not None:
            _check_object(inner[key], f"config.{key}")
    for key in _CONFIG_BOOL:
        if inner.get(key) is not None and not isinstance(inner[key], bool):
            _bad(f"config.{key}", "a boolean", inner[key])
    if inner.get("Labels") is not None:
        _check_str_map(inner["Labels"], "config.Labels")
    return inner


def check_container_config(value: object, where: str = "config") -> dict[str, Any]:
    """Validate a container config object (an image config's ``config`` or ``container_config``, docker's
    ``container.Config`` as JSON): each member docker types is of that type. Returns it."""
    if not isinstance(value, dict):
        _bad(where, "an object", value)
    try:
        return _check_inner_config(value)
    except InvalidDocument as e:
        raise InvalidDocument(e.message.replace("config.", f"{where}.", 1)) from None


def _check_history(value: object) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        _bad("history", "an array", value)
    for i, entry in enumerate(value):
        _check_object(entry, f"history[{i}]")
        for key in _HISTORY_STR:
            if entry.get(key) is not None:
                _check_str(entry[key], f"history[{i}].{key}")
        if entry.get("empty_layer") is not None and not isinstance(entry["empty_layer"], bool):
            _bad(f"history[{i}].empty_layer", "a boolean", entry["empty_layer"])
    return tuple(value)


@dataclass(frozen=True)
class ImageConfig:
    """An image config (OCI or Docker): the exact bytes, the parsed document and its validated members."""

    raw: bytes
    doc: dict[str, Any]
    architecture: str
    os: str
    variant: str | None
    os_version: str | None
    os_features: tuple[str, ...]
    created: str | None
    author: str | None
    config: dict[str, Any]
    diff_ids: tuple[str, ...]
    history: tuple[dict[str, Any], ...]

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def digest(self) -> str:
        """The config's digest, which is the image ID."""
        return digest_of(self.raw)

    @property
    def labels(self) -> dict[str, str]:
        labels = self.config.get("Labels")
        return dict(labels) if labels else {}

    @property
    def platform(self) -> Platform:
        """The platform as the config declares it (not normalized)."""
        return Platform(self.os, self.architecture, self.variant, self.os_version, self.os_features)

    def non_empty_history_count(self) -> int:
        """History entries that made a layer. Docker tolerates this differing from ``len(diff_ids)``."""
        return sum(1 for entry in self.history if not entry.get("empty_layer"))


def parse_config(data: bytes) -> ImageConfig:
    """Parse and validate an image config; :class:`InvalidDocument` on anything malformed.

    An ``os`` or ``architecture`` left out (absent, null or empty, as Go writes an unset string) is the
    host's, as docker takes it; a missing architecture brings the host's CPU variant unless one is declared.
    The bytes, and so the image ID, stay as they are.
    """
    raw, doc = _load_document(data, "image config")
    host = host_platform()
    os_name = _opt_str(doc, "os") or host.os
    architecture = _opt_str(doc, "architecture")
    variant = _opt_str(doc, "variant") or (None if architecture else host.variant)
    rootfs = doc.get("rootfs")
    if rootfs is None:
        raise InvalidDocument("image config has no rootfs")
    _check_object(rootfs, "rootfs")
    if rootfs.get("type") != "layers":
        raise InvalidDocument(f"rootfs.type must be 'layers', got {_show(rootfs.get('type'))}")
    diff_ids_json = rootfs.get("diff_ids")
    diff_ids: tuple[str, ...] = ()
    if diff_ids_json is not None:  # Go writes a nil slice as null or leaves it out
        _check_str_list(diff_ids_json, "rootfs.diff_ids")
        diff_ids = tuple(_check_digest(d, f"rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids_json))
    features = doc.get("os.features")
    return ImageConfig(
        raw=raw,
        doc=doc,
        architecture=architecture or host.architecture,
        os=os_name,
        variant=variant,
        os_version=_opt_str(doc, "os.version") or None,
        os_features=() if features is None else _check_str_list(features, "os.features"),
        created=_opt_str(doc, "created"),
        author=_opt_str(doc, "author"),
        config=_check_inner_config(doc.get("config")),
        diff_ids=diff_ids,
        history=_check_history(doc.get("history")),
    )

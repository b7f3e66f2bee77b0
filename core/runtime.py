"""From a mounted root filesystem and an image config to a running OCI container.

Three pure steps, with no knowledge of lamina's stores (the caller mounts the root filesystem and
passes its path):

* :func:`build_spec` turns an image config (the inner ``config`` section: Entrypoint, Cmd, Env,
  WorkingDir, User) plus ``docker run``-style overrides into an OCI runtime-spec 1.0 ``config.json``
  document; :func:`resolve_user` is its USER resolution, reading the image's ``/etc/passwd`` and
  ``/etc/group`` without ever leaving the root filesystem.
* :func:`write_bundle` writes that document into a bundle directory (the root filesystem is referenced
  by absolute path, never copied).
* :func:`rootless_user_namespace` tells whether the caller needs a user namespace to run a container
  (not root, or root only inside a user namespace) and which ids it can map; :func:`build_spec` then
  writes a rootless spec.
* :func:`run_bundle` runs the bundle with an OCI runtime (runc; crun is accepted by name), streams the
  container's output, returns its exit code and always removes the runtime's state for the container.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import pwd
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from lamina.errors import ContainerError, FormatError, ImageError, RuntimeFailure, UnsafePathError

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH",
    "IdMap",
    "RuntimeFailure",
    "UserNamespace",
    "build_spec",
    "in_user_namespace",
    "resolve_user",
    "rootless_user_namespace",
    "run_bundle",
    "write_bundle",
]


OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
# `runc spec`'s defaults, plus powercap which docker also masks.
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
NOFILE_SOFT = 1024
NOFILE_HARD_CAP = 1 << 16

MAX_ID = 4294967294  # 2^32 - 2: (uid_t)-1 means "unchanged" to the kernel
MAX_ACCOUNT_FILE = 1 << 20
MAX_NAME = 256
MAX_PATH = 4096
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]*\$?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
_CONTAINER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_ENV_KEY_RE = re.compile(r"[^=\x00]+")

Network = Literal["none", "host"]
Stream = int | IO[Any] | None


# --------------------------------------------------------------------------------------------------
# USER resolution


def _parse_id(text: str, what: str) -> int:
    if len(text) > 10:
        raise FormatError(f"{what} {text[:20]!r} is out of range (0..{MAX_ID})")
    value = int(text)
    if value > MAX_ID:
        raise FormatError(f"{what} {text} is out of range (0..{MAX_ID})")
    return value


def _check_part(text: str, what: str) -> None:
    """Reject a user or group part that is neither a plain ID nor a plausible account name."""
    if not text:
        raise FormatError(f"empty {what} in USER")
    if len(text) > MAX_NAME:
        raise FormatError(f"{what} in USER is too long ({len(text)} characters, at most {MAX_NAME})")
    if text.isascii() and text.isdigit():
        return
    if re.fullmatch(r"[+-][0-9]+", text):
        raise FormatError(f"{what} {text!r} in USER is not a valid ID (0..{MAX_ID})")
    if not _NAME_RE.fullmatch(text):
        raise FormatError(f"{what} {text!r} in USER is not a valid name or numeric ID")


def _open_account_file(root_fd: int, name: str) -> bytes | None:
    """Read ``etc/<name>`` below ``root_fd`` without following a symlink or opening a non-file.

    Returns None when the file (or ``etc``) does not exist.
    """
    display = f"/etc/{name}"
    try:
        etc_fd = os.open("etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise UnsafePathError("refusing to read the image's /etc: it is a symlink or not a directory") from e
        raise ImageError(f"cannot open the image's /etc: {e.strerror}") from e
    try:
        # First look without opening for read: a device or FIFO is never opened at all.
        try:
            path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=etc_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ImageError(f"cannot open the image's {display}: {e.strerror}") from e
        try:
            st = os.fstat(path_fd)
        finally:
            os.close(path_fd)
        _check_regular(st, display)
        # Now open it for real; O_NONBLOCK so that a FIFO swapped in meanwhile cannot block us.
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=etc_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(f"refusing to read the image's {display}: it is a symlink") from e
            raise ImageError(f"cannot open the image's {display}: {e.strerror}") from e
        try:
            st2 = os.fstat(fd)
            _check_regular(st2, display)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafePathError(f"the image's {display} changed while being read")
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_ACCOUNT_FILE:
                    raise UnsafePathError(f"the image's {display} is larger than {MAX_ACCOUNT_FILE} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as e:
            raise ImageError(f"cannot read the image's {display}: {e.strerror}") from e
        finally:
            os.close(fd)
    finally:
        os.close(etc_fd)


def _check_regular(st: os.stat_result, display: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"refusing to read the image's {display}: it is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"refusing to read the image's {display}: it is not a regular file")


def _account_lines(data: bytes | None) -> Iterable[list[str]]:
    if data is None:
        return
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").strip()
        if not line or line.startswith(("#", "+", "-")):
            continue
        yield line.split(":")


def _entry_id(text: str) -> int | None:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > MAX_ID:
        return None
    return int(text)


def resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int]]:
    """Resolve a Dockerfile ``USER`` value against the image's account files.

    Accepts ``""`` (root), ``name``, ``uid``, ``name:group``, ``uid:gid``, ``uid:group`` and ``name:gid``.
    Returns ``(uid, gid, supplementary gids)``; the supplementary groups are those of ``/etc/group``
    listing the user by name, without the primary group. A numeric uid needs no passwd entry (its gid
    is then 0 unless given). ``/etc/passwd`` and ``/etc/group`` are read relative to the root
    filesystem: a symlink on the way, a non-regular file or an oversized file is refused.
    """
    if not isinstance(user, str):
        raise FormatError("USER must be a string")
    if user == "":
        return 0, 0, []
    if len(user) > 2 * MAX_NAME + 1:
        raise FormatError(f"USER is too long ({len(user)} characters)")
    if "\x00" in user or any(c.isspace() for c in user):
        raise FormatError(f"USER {user!r} contains whitespace or a NUL byte")
    user_part, sep, group_part = user.partition(":")
    _check_part(user_part, "user")
    if sep:
        _check_part(group_part, "group")
    user_numeric = user_part.isdigit()
    group_numeric = bool(sep) and group_part.isdigit()
    uid_value = _parse_id(user_part, "uid") if user_numeric else None
    gid_value = _parse_id(group_part, "gid") if group_numeric else None

    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open root filesystem {rootfs}: {e.strerror}") from e
    try:
        # Even for uid:gid: the passwd entry's name is what supplementary groups list.
        passwd = _open_account_file(root_fd, "passwd")
        group = _open_account_file(root_fd, "group")
    finally:
        os.close(root_fd)

    name: str | None = None
    uid: int | None = None
    gid = 0
    for fields in _account_lines(passwd):
        if len(fields) < 4:
            continue
        entry_uid = _entry_id(fields[2])
        if fields[0] == user_part or (user_numeric and entry_uid is not None and entry_uid == uid_value):
            entry_gid = _entry_id(fields[3])
            if entry_uid is None or entry_gid is None:
                raise FormatError(f"the image's /etc/passwd entry for {fields[0]!r} has an invalid uid or gid")
            name, uid, gid = fields[0], entry_uid, entry_gid
            break
    if uid is None:
        if not user_numeric:
            where = "has no /etc/passwd" if passwd is None else "has no such user in /etc/passwd"
            raise ImageError(f"unable to find user {user_part!r}: the image {where}")
        assert uid_value is not None
        uid = uid_value

    groups: list[tuple[str, int, list[str]]] = []
    for fields in _account_lines(group):
        if len(fields) < 3:
            continue
        entry_gid = _entry_id(fields[2])
        if entry_gid is None:
            continue
        members = [m.strip() for m in fields[3].split(",")] if len(fields) > 3 else []
        groups.append((fields[0], entry_gid, members))

    if sep:
        if group_numeric:
            assert gid_value is not None
            gid = gid_value
        else:
            found = next((g for g in groups if g[0] == group_part), None)
            if found is None:
                where = "has no /etc/group" if group is None else "has no such group in /etc/group"
                raise ImageError(f"unable to find group {group_part!r}: the image {where}")
            gid = found[1]

    extra: list[int] = []
    if name is not None:
        for _, entry_gid, members in groups:
            if name in members and entry_gid != gid and entry_gid not in extra:
                extra.append(entry_gid)
    return uid, gid, extra


# --------------------------------------------------------------------------------------------------
# rootless: the user namespace a container gets when the caller is not (fully) root


@dataclass(frozen=True)
class IdMap:
    """``size`` ids from ``container_id`` on inside the container are ``host_id`` on in the caller's namespace."""

    container_id: int
    host_id: int
    size: int

    def doc(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


@dataclass(frozen=True)
class UserNamespace:
    """The uid and gid mappings of a rootless container's user namespace."""

    uid_mappings: tuple[IdMap, ...]
    gid_mappings: tuple[IdMap, ...]

    @staticmethod
    def _maps(mappings: tuple[IdMap, ...], value: int) -> bool:
        return any(m.container_id <= value < m.container_id + m.size for m in mappings)

    def maps_uid(self, uid: int) -> bool:
        return self._maps(self.uid_mappings, uid)

    def maps_gid(self, gid: int) -> bool:
        return self._maps(self.gid_mappings, gid)


def _read_id_map(kind: str) -> list[tuple[int, int, int]]:
    """This process's ``/proc/self/{uid,gid}_map``: (inside, outside, count) triples; [] if unreadable."""
    try:
        with open(f"/proc/self/{kind}_map") as f:
            text = f.read()
    except OSError:
        return []
    out: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(x.isdigit() for x in fields):
            out.append((int(fields[0]), int(fields[1]), int(fields[2])))
    return out


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one (its uid map is not
    the full identity map, the test runc and rootlesskit use)."""
    current = _read_id_map("uid")
    return bool(current) and current != [(0, 0, 4294967295)]


def _subordinate_ranges(path: str, name: str | None, own_id: int) -> list[tuple[int, int]]:
    """The ``(start, count)`` ranges ``/etc/subuid``-style ``path`` grants the user (by name or id)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ACCOUNT_FILE)
    except OSError:
        return []
    keys = {str(own_id)} | ({name} if name else set())
    ranges: list[tuple[int, int]] = []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        fields = raw.strip().split(":")
        if len(fields) != 3 or fields[0] not in keys:
            continue
        start, count = _entry_id(fields[1]), _entry_id(fields[2])
        if start is None or not count or start + count > MAX_ID + 1:
            continue
        ranges.append((start, count))
    return ranges


def _rootless_map(own_id: int, name: str | None, subid_file: str, tool: str) -> tuple[IdMap, ...]:
    """Container id 0 is the caller; 1..N are its subordinate ids when it has some and ``tool``
    (newuidmap/newgidmap, which the runtime calls to write such a mapping) is installed."""
    maps = [IdMap(0, own_id, 1)]
    if shutil.which(tool) is None:
        return tuple(maps)
    next_id = 1
    for start, count in _subordinate_ranges(subid_file, name, own_id):
        if any(start < m.host_id + m.size and m.host_id < start + count for m in maps):
            continue  # a repeated or overlapping entry: a host id may be mapped only once
        count = min(count, MAX_ID + 1 - next_id)
        if count <= 0:
            break
        maps.append(IdMap(next_id, start, count))
        next_id += count
    return tuple(maps)


def rootless_user_namespace(*, subordinate_ids: bool = True) -> UserNamespace | None:
    """The user namespace a container needs for this caller, or None for real root (none needed).

    * An ordinary user: the container's root is the caller's uid and gid; with ``subordinate_ids``,
      ranges ``/etc/subuid`` and ``/etc/subgid`` grant the user become container ids 1..N when
      newuidmap and newgidmap are installed (as ``podman`` does; runc calls those tools itself).
    * Root inside a user namespace (``unshare -rm``): every id mapped here is mapped again, unchanged,
      so the container's root is this namespace's root.
    * Another uid inside a user namespace: that uid alone, as the container's root.
    """
    euid, egid = os.geteuid(), os.getegid()
    nested = in_user_namespace()
    if euid == 0 and not nested:
        return None
    if euid == 0:
        uids = tuple(IdMap(inside, inside, count) for inside, _, count in _read_id_map("uid"))
        gids = tuple(IdMap(inside, inside, count) for inside, _, count in _read_id_map("gid"))
        return UserNamespace(uids or (IdMap(0, 0, 1),), gids or (IdMap(0, 0, 1),))
    if nested or not subordinate_ids:
        return UserNamespace((IdMap(0, euid, 1),), (IdMap(0, egid, 1),))
    try:
        name: str | None = pwd.getpwuid(euid).pw_name
    except KeyError:
        name = None
    return UserNamespace(_rootless_map(euid, name, "/etc/subuid", "newuidmap"),
                         _rootless_map(egid, name, "/etc/subgid", "newgidmap"))


# --------------------------------------------------------------------------------------------------
# config.json


def _str_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{what} must be a list of strings")
    for v in value:
        if "\x00" in v:
            raise FormatError(f"{what} contains a NUL byte")
    return list(value)


def _merge_env(env: dict[str, str], entries: Sequence[str], what: str) -> None:
    for entry in entries:
        if not isinstance(entry, str):
            raise FormatError(f"{what} entries must be strings")
        key, sep, value = entry.partition("=")
        if not sep or not _ENV_KEY_RE.fullmatch(key) or "\x00" in value:
            raise FormatError(f"{what} entry {entry[:64]!r} is not of the form KEY=value")
        env[key] = value


def _normalize_cwd(path: str, what: str) -> str:
    if not isinstance(path, str):
        raise FormatError(f"{what} must be a string")
    if "\x00" in path or len(path) > MAX_PATH:
        raise FormatError(f"{what} contains a NUL byte or is too long")
    if not path.startswith("/"):
        raise FormatError(f"{what} {path[:64]!r} is not an absolute path")
    normalized = posixpath.normpath(path)
    return "/" + normalized.lstrip("/")


def _nofile_limits() -> tuple[int, int]:
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        hard = NOFILE_SOFT
    if hard < 0 or hard == resource.RLIM_INFINITY:
        hard = NOFILE_HARD_CAP
    hard = min(hard, NOFILE_HARD_CAP)
    return min(NOFILE_SOFT, hard), hard


def build_spec(rootfs: str, image_config: Mapping[str, Any], *, args: Sequence[str] | None = None,
               env: Sequence[str] = (), workdir: str | None = None, user: str | None = None,
               hostname: str | None = None, network: Network = "none", terminal: bool = False,
               readonly: bool = False, userns: UserNamespace | None = None) -> dict[str, Any]:
    """Build an OCI runtime-spec ``config.json`` document for running an image on ``rootfs``.

    ``args`` replaces the image's Cmd (the Entrypoint stays, as with ``docker run IMAGE ARGS``);
    ``env`` entries (``KEY=value``) override the image's; ``workdir`` and ``user`` override WorkingDir
    and User. ``hostname`` defaults to a random 12-hex-digit name. ``network="none"`` gives the
    container its own network namespace (loopback only), ``"host"`` shares the host's and binds its
    ``/etc/resolv.conf`` and ``/etc/hosts`` read-only.

    ``userns`` (from :func:`rootless_user_namespace`) makes a rootless spec, as ``runc spec --rootless``
    does: a user namespace with those mappings, no cgroup device rules, no ``gid=`` on ``/dev/pts``
    unless that group is mapped, and the host's ``/sys`` bound recursively for ``network="host"``. The
    container's user and groups must be mapped.
    """
    if not isinstance(image_config, Mapping):
        raise FormatError("the image config must be a JSON object")
    if network not in ("none", "host"):
        raise FormatError(f"unsupported network mode {network!r} (use 'none' or 'host')")
    root = os.path.abspath(rootfs)
    if not os.path.isdir(root):
        raise ImageError(f"root filesystem {root} is not a directory")

    entrypoint = _str_list(image_config.get("Entrypoint"), "Entrypoint")
    cmd = _str_list(image_config.get("Cmd"), "Cmd")
    if args is not None:
        cmd = _str_list(list(args), "the command")
    argv = entrypoint + cmd
    if not argv:
        raise ImageError("no command to run: the image has no Entrypoint or Cmd and none was given")
    if not argv[0]:
        raise FormatError("the command to run is an empty string")

    if hostname is None:
        hostname = secrets.token_hex(6)
    if len(hostname) > 64 or not _HOSTNAME_RE.fullmatch(hostname):
        raise FormatError(f"invalid hostname {hostname[:70]!r}")

    environment: dict[str, str] = {}
    _merge_env(environment, _str_list(image_config.get("Env"), "Env"), "the image's Env")
    environment.setdefault("PATH", DEFAULT_PATH)
    environment.setdefault("HOSTNAME", hostname)
    if terminal:
        environment.setdefault("TERM", "xterm")
    _merge_env(environment, list(env), "the environment")

    image_workdir = image_config.get("WorkingDir") or ""
    if workdir is not None:
        cwd = _normalize_cwd(workdir, "the working directory")
    elif image_workdir:
        cwd = _normalize_cwd(image_workdir, "the image's WorkingDir")
    else:
        cwd = "/"

    user_spec = user if user is not None else (image_config.get("User") or "")
    if not isinstance(user_spec, str):
        raise FormatError("the image's User must be a string")
    uid, gid, extra_gids = resolve_user(root, user_spec)
    user_doc: dict[str, Any] = {"uid": uid, "gid": gid}
    if extra_gids:
        user_doc["additionalGids"] = extra_gids

    if userns is not None:
        for what, value, mapped in [("uid", uid, userns.maps_uid(uid)), ("gid", gid, userns.maps_gid(gid)),
                                    *(("group", g, userns.maps_gid(g)) for g in extra_gids)]:
            if not mapped:
                raise ContainerError(f"{what} {value} is not mapped in the rootless container's user namespace "
                                     "(grant the user subordinate ids in /etc/subuid and /etc/subgid, "
                                     "and install newuidmap/newgidmap)")

    soft, hard = _nofile_limits()
    caps = list(DEFAULT_CAPABILITIES)

    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    ]
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    if network == "host":
        # sysfs cannot show another network namespace's devices; bind the host's, read-only (recursively
        # in a user namespace, which may not split the host's /sys from the mounts on it).
        mounts.append({"destination": "/sys", "type": "bind", "source": "/sys",
                       "options": ["rbind" if userns else "bind", "nosuid", "noexec", "nodev", "ro"]})
        for name in ("/etc/resolv.conf", "/etc/hosts"):
            if os.path.isfile(name):
                mounts.append({"destination": name, "type": "bind", "source": os.path.realpath(name),
                               "options": ["bind", "nosuid", "noexec", "nodev", "ro"]})
    else:
        namespaces.append({"type": "network"})
        mounts.append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                       "options": ["nosuid", "noexec", "nodev", "ro"]})

    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if userns is not None:
        # Device cgroup rules need root; the user namespace keeps device nodes out of reach anyway.
        del linux["resources"]
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [m.doc() for m in userns.uid_mappings]
        linux["gidMappings"] = [m.doc() for m in userns.gid_mappings]
        if not userns.maps_gid(5):
            for m in mounts:
                if m["type"] == "devpts":
                    m["options"] = [o for o in m["options"] if o != "gid=5"]

    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal,
            "user": user_doc,
            "args": argv,
            "env": [f"{k}={v}" for k, v in environment.items()],
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": list(caps), "permitted": list(caps)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}],
            "noNewPrivileges": True,
        },
        "root": {"path": root, "readonly": readonly},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }


def write_bundle(bundle_dir: str, spec: Mapping[str, Any]) -> None:
    """Write ``spec`` as ``<bundle_dir>/config.json`` (creating the directory); the rootfs is not copied."""
    root = spec.get("root") if isinstance(spec, Mapping) else None
    path = root.get("path") if isinstance(root, Mapping) else None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise FormatError("the runtime spec's root.path must be an absolute path to the mounted rootfs")
    try:
        data = json.dumps(spec, indent=2, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise FormatError(f"the runtime spec cannot be written as JSON: {e}") from e
    tmp = None
    try:
        os.makedirs(bundle_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=bundle_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(bundle_dir, "config.json"))
        tmp = None
    except OSError as e:
        raise ContainerError(f"cannot write the bundle's config.json in {bundle_dir}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------------
# running


def _find_runtime(runtime: str) -> str:
    if not runtime or "\x00" in runtime:
        raise RuntimeFailure("no OCI runtime named")
    found = shutil.which(runtime)
    if found is None:
        raise RuntimeFailure(f"OCI runtime {runtime!r} not found on PATH; install it (e.g. the runc or crun "
                             "package) or choose another runtime")
    return found


def _runtime_error(log_path: str) -> str:
    """The runtime's last error message from its JSON log, or its last log line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    last = ""
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            last = last or line
            continue
        if isinstance(entry, dict):
            msg = str(entry.get("msg") or entry.get("message") or "")
            if entry.get("level") in ("error", "fatal", "panic") and msg:
                return msg
            last = last or msg
    return last


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _quietly(base: list[str], *args: str, timeout: float) -> None:
    """Run a runtime subcommand for its effect alone: its output and failure are not ours to report."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([*base, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout, check=False)


def _force_delete(base: list[str], container_id: str) -> None:
    _quietly(base, "delete", "--force", container_id, timeout=30)


def _kill(base: list[str], container_id: str) -> None:
    """SIGKILL to the container's init (the end of its PID namespace): the runtime's foreground ``run``
    then reaps it and removes the container itself, without the freeze that a forced delete may wait on."""
    _quietly(base, "kill", container_id, "KILL", timeout=10)


def run_bundle(bundle_dir: str, container_id: str, *, runtime: str = "runc", runtime_root: str | None = None,
               stdin: Stream = None, stdout: Stream = None, stderr: Stream = None) -> int:
    """Run the bundle in ``bundle_dir`` as container ``container_id`` and return its exit code.

    The container's stdio is the given streams (an fd, a file object, or None to inherit ours). The
    process's exit code comes back as is, 128+N when it died of signal N. A runtime missing from PATH,
    or one that fails before the container's process started (bad config, missing executable, ...),
    raises :class:`RuntimeFailure` with the runtime's own error message. Whatever happens, including
    KeyboardInterrupt, the runtime's state for ``container_id`` is force-deleted afterwards.
    """
    if not isinstance(container_id, str) or not _CONTAINER_ID_RE.fullmatch(container_id):
        raise RuntimeFailure(f"invalid container ID {str(container_id)[:64]!r}: use letters, digits, '_', '.', '-'")
    bundle = os.path.abspath(bundle_dir)
    if not os.path.isfile(os.path.join(bundle, "config.json")):
        raise RuntimeFailure(f"{bundle} is not an OCI bundle: it has no config.json")
    exe = _find_runtime(runtime)
    base = [exe]
    if runtime_root is not None:
        base += [f"--root={os.path.abspath(runtime_root)}"]
    try:
        work = tempfile.mkdtemp(prefix="lamina-run-")
    except OSError as e:
        raise RuntimeFailure(f"cannot create a temporary directory: {e.strerror}") from e
    try:
        pid_file = os.path.join(work, "pid")
        log_file = os.path.join(work, "log")
        cmd = [*base, f"--log={log_file}", "--log-format=json", "run", "--bundle", bundle,
               "--pid-file", pid_file, container_id]
        try:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr)
        except OSError as e:
            raise RuntimeFailure(f"cannot start OCI runtime {runtime!r}: {e.strerror}") from e
        try:
            rc = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, ...): kill the container and let the runtime finish; failing that, a
            # forced delete, and the runtime goes too. (The forced delete in ``finally`` makes sure.)
            _kill(base, container_id)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _force_delete(base, container_id)
                proc.kill()
                proc.wait()
            raise
        started = os.path.exists(pid_file)
        if rc == 0:
            return 0
        if not started:
            message = _runtime_error(log_file)
            status = f"exit status {rc}" if rc > 0 else f"killed by {_signal_name(-rc)}"
            raise RuntimeFailure(f"{runtime} failed to start container {container_id} ({status})"
                                 + (f": {message}" if message else ""))
        return rc if rc > 0 else 128 - rc
    finally:
        _force_delete(base, container_id)
        shutil.rmtree(work, ignore_errors=True)

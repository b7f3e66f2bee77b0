"""Linux mount primitives: mount(2)/umount2(2), the new mount API and the mount table.

No filesystem-specific logic lives here; drivers describe what to mount and call these.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

MS_RDONLY = 0x1
MNT_DETACH = 0x2
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
# The new mount API has the same syscall numbers on every architecture.
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                        data.encode() if data else None), f"mount {fstype}", target)


def umount(target: str, flags: int = MNT_DETACH) -> None:
    _check(libc().umount2(target.encode(), flags), "umount", target)


def new_mount_api(fstype: str, target: str, strings: list[tuple[str, str]], flags: list[str],
                  readonly: bool = False) -> None:
    """Mount with fsopen/fsconfig/fsmount/move_mount; options may repeat (overlay's ``lowerdir+``)."""
    c = libc()
    c.syscall.restype = ctypes.c_long
    fs = _check(c.syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen {fstype}")
    try:
        for key, value in strings:
            _check(c.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
                   f"fsconfig {key}={value}")
        for key in flags:
            _check(c.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, key.encode(), None, 0), f"fsconfig {key}")
        _check(c.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), f"create {fstype}", target)
        mfd = _check(c.syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY if readonly else 0),
                     "fsmount", target)
        try:
            _check(c.syscall(SYS_MOVE_MOUNT, mfd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                   "move_mount", target)
        finally:
            os.close(mfd)
    finally:
        os.close(fs)


def has_new_mount_api() -> bool:
    c = libc()
    c.syscall.restype = ctypes.c_long
    fd = c.syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC)
    if fd >= 0:
        os.close(fd)
        return True
    return ctypes.get_errno() not in (errno.ENOSYS,)  # EPERM etc.: the API exists


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str
    super_options: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo(pid: str = "self") -> list[MountEntry]:
    out = []
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a = left.split()
            b = right.split()
            if len(a) < 6 or len(b) < 3:
                continue
            out.append(MountEntry(int(a[0]), _unescape(a[4]), b[0], _unescape(b[1]), a[5], b[2]))
    return out


def is_mountpoint(path: str, fstype: str | None = None) -> bool:
    real = os.path.realpath(path)
    return any(m.mountpoint == real and (fstype is None or m.fstype == fstype) for m in mountinfo())


def fs_type_of(path: str) -> str:
    """Filesystem type of the mount that holds ``path``."""
    real = os.path.realpath(path)
    best = ""
    kind = "unknown"
    for m in mountinfo():
        mp = m.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, kind = mp, m.fstype
    return kind

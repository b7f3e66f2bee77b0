"""Type stub of lamina's optional C accelerator (core/_native.c)."""

from typing import Any

SLOW: int
PARENT: int
OWNER: int

def run(
    buf: bytes,
    pos: int,
    head: bytes | None,
    pfd: int,
    preal: bytes,
    is_root: bool,
    euid: int,
    egid: int,
    sgid: bool,
    umask: int,
    max_entries: int,
    raw: bytearray | None,
    out: bytearray | None,
    rec_index: int,
    log: bytearray,
) -> tuple[int, int, int, int, int, Any]: ...
def tune_malloc() -> None: ...

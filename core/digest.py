"""Digests, DiffIDs and ChainIDs.

A *DiffID* is the sha256 digest of a layer's uncompressed tar stream. A *ChainID* names a layer together
with all its parents, per the OCI image spec::

    ChainID(L0)      = DiffID(L0)
    ChainID(L0..Ln)  = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NewType

from lamina.errors import DigestError

Digest = NewType("Digest", str)
DiffID = NewType("DiffID", str)
ChainID = NewType("ChainID", str)

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")


def parse_digest(value: str) -> Digest:
    """Validate ``algorithm:hex``; raise :class:`DigestError` on anything else."""
    if not isinstance(value, str):
        raise DigestError(f"digest must be a string, got {type(value).__name__}")
    m = _DIGEST_RE.fullmatch(value)
    if m is None or len(m.group(2)) != _ALGORITHMS[m.group(1)]:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise DigestError(f"invalid digest {shown!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return Digest(value)


def sha256_digest(data: bytes) -> Digest:
    import hashlib  # here: naming digests needs no OpenSSL

    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def chain_id(parent: ChainID | None, diff_id: DiffID) -> ChainID:
    if parent is None:
        return ChainID(diff_id)
    return ChainID(sha256_digest(f"{parent} {diff_id}".encode()))


def chain_ids(diff_ids: Iterable[DiffID]) -> list[ChainID]:
    out: list[ChainID] = []
    parent: ChainID | None = None
    for d in diff_ids:
        parent = chain_id(parent, d)
        out.append(parent)
    return out


def short(digest: str, n: int = 12) -> str:
    return digest.split(":", 1)[-1][:n]

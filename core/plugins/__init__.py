"""Driver plugins: the hook specifications and the discovery of built-in and third-party drivers."""

from __future__ import annotations

from typing import Any


class OpStats:
    """Calls, errors and wall time of one operation hook or service operation (``lamina info``). Kept
    here, outside discovery, so that timing a service call imports no plugin machinery."""

    __slots__ = ("calls", "errors", "max_s", "total_s")

    def __init__(self, calls: int = 0, errors: int = 0, total_s: float = 0.0, max_s: float = 0.0) -> None:
        self.calls = calls
        self.errors = errors
        self.total_s = total_s
        self.max_s = max_s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpStats):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"OpStats({self.calls}, {self.errors}, {self.total_s}, {self.max_s})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": self.errors,
            "total_ms": round(self.total_s * 1000, 3),
            "max_ms": round(self.max_s * 1000, 3),
        }

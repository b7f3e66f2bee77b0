"""Points in time as docker's filters and options take them (``until=``, ``--since``, ``--until``).

A value is a duration before now in Go's notation (``90s``, ``10m``, ``1h30m``, ``1.5h``), a Unix time in
seconds (``1700000000``, ``1700000000.5``), or a date and time in RFC 3339 or one of its shorter forms
(``2026-12-01``, ``2026-12-01T10:00``, ``2026-12-01T10:00:00Z``, ``2026-12-01T10:00:00+01:00``); a time
without an offset is local time, as docker reads it.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from lamina.errors import BadTime

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_UNIX = re.compile(r"\d{1,12}(?:\.\d{1,9})?")


def parse_duration(text: str) -> float:
    """A Go duration (``1h30m``) in seconds."""
    if not _DURATION.fullmatch(text):
        raise BadTime(f"invalid duration {text[:40]!r}: use a number with a unit, e.g. 90s, 10m, 24h")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def parse_time(text: str, now: float | None = None) -> float:
    """The Unix time ``text`` means (see the module's documentation)."""
    value = text.strip()
    if not value:
        raise BadTime("empty time: give a duration (10m), a Unix time or a date (2026-12-01T10:00:00Z)")
    if _DURATION.fullmatch(value):
        return (time.time() if now is None else now) - parse_duration(value)
    if _UNIX.fullmatch(value):
        return float(value)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()
    except ValueError:
        raise BadTime(
            f"invalid time {value[:40]!r}: give a duration (10m), a Unix time or a date (2026-12-01T10:00:00Z)"
        ) from None

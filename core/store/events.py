"""The event log: what was done to images, containers and layers, for ``lamina events``.

Events live in the run root's database (``mounts.db``, table ``events``), so every process sharing the store
sees them and they go with the other volatile state on reboot. Each is one row, appended in a short
transaction of its own once the action it tells of has succeeded; its ``seq`` (AUTOINCREMENT, never reused)
orders the log, and a follower reads "rows after the last one seen". The log keeps the newest
``max_events`` rows: every :data:`TRIM_EVERY`-th append deletes the older ones.

Events are a record, not part of the action: a store (or run root) that takes no writes records nothing,
and an append that fails is logged at debug level and dropped; it never fails the action.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError

if TYPE_CHECKING:
    from lamina.store.db import Database

log = logging.getLogger("lamina.store.events")

TYPES = ("image", "container", "layer")
FILTER_KEYS = ("type", "event", "image", "container", "layer")
DEFAULT_MAX_EVENTS = 10_000
TRIM_EVERY = 100
POLL_S = 0.1  # how often a follower looks for new rows (a cheap check of the database's data_version)
_BATCH = 500


class EventError(LaminaError):
    """A bad ``--filter``."""


@dataclass(frozen=True)
class Event:
    seq: int
    time_ns: int
    type: str
    action: str
    id: str
    name: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    def as_docker(self) -> dict[str, Any]:
        """Docker's shape of an event message (``docker events --format json``)."""
        attrs = dict(self.attributes)
        if self.name:
            attrs["name"] = self.name
        return {
            "Type": self.type,
            "Action": self.action,
            "Actor": {"ID": self.id, "Attributes": attrs},
            "scope": "local",
            "time": self.time_ns // 1_000_000_000,
            "timeNano": self.time_ns,
        }

    def line(self) -> str:
        """One line: ``TIME TYPE ACTION ID [NAME] [(k=v, ...)]``, the time in UTC with nanoseconds."""
        secs, ns = divmod(self.time_ns, 1_000_000_000)
        stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"
        out = [stamp, self.type, self.action, self.id or "-"]
        if self.name:
            out.append(self.name)
        if self.attributes:
            out.append("(" + ", ".join(f"{k}={v}" for k, v in sorted(self.attributes.items())) + ")")
        return " ".join(out)


# -- filters -----------------------------------------------------------------------------------------------
def parse_filters(items: list[str] | dict[str, list[str]] | None) -> dict[str, list[str]]:
    """``key=value`` filters (or a dict of them) checked: keys of :data:`FILTER_KEYS`, types of :data:`TYPES`.
    Values of one key are alternatives; different keys must all match."""
    out: dict[str, list[str]] = {}
    pairs: list[tuple[str, str]] = []
    if isinstance(items, dict):
        pairs = [(k, v) for k, vs in items.items() for v in vs]
    else:
        for item in items or []:
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise EventError(f"invalid filter {item!r}: give key=value")
            pairs.append((key.strip(), value.strip()))
    for key, value in pairs:
        if key not in FILTER_KEYS:
            raise EventError(f"invalid filter {key!r}: lamina events filters on {', '.join(FILTER_KEYS)}")
        if key == "type" and value not in TYPES:
            raise EventError(f"invalid event type {value!r}: one of {', '.join(TYPES)}")
        out.setdefault(key, []).append(value)
    return out


def _strip_tag(name: str) -> str:
    """``repo:tag`` → ``repo`` (a registry's port is not a tag); ``repo@digest`` → ``repo``."""
    name = name.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _id_match(wanted: str, full: str) -> bool:
    """An ID given whole, or by a prefix of at least 3 hex digits (with or without ``sha256:``)."""
    if not full:
        return False
    hexid = full.split(":", 1)[-1]
    bare = wanted.split(":", 1)[-1] if wanted.startswith("sha256:") else wanted
    return wanted == full or (len(bare) >= 3 and re.fullmatch(r"[0-9a-f]+", bare) is not None
                              and hexid.startswith(bare))


def _name_match(wanted: list[str], name: str) -> bool:
    return bool(name) and any(w in (name, _strip_tag(name)) for w in wanted)


def matches(ev: Event, filters: dict[str, list[str]]) -> bool:
    """Whether ``ev`` passes ``filters`` (see :func:`parse_filters`). ``image=`` matches an image event by ID
    or name (with or without its tag) and a container event by its image; ``container=`` and ``layer=`` by
    ID (or prefix) or name. Names are compared as lamina shows them (``busybox:latest``, ``example.com/a:1``);
    the caller normalizes what the user typed (see ``ImageService.events``)."""
    if "type" in filters and ev.type not in filters["type"]:
        return False
    if "event" in filters and ev.action not in filters["event"]:
        return False
    for key in ("container", "layer"):
        if key in filters:
            wanted = filters[key]
            if ev.type != key or not (any(_id_match(w, ev.id) for w in wanted) or _name_match(wanted, ev.name)):
                return False
    if "image" in filters:
        wanted = filters["image"]
        if ev.type == "image":
            hit = any(_id_match(w, ev.id) for w in wanted) or _name_match(wanted, ev.name)
        else:
            img = ev.attributes.get("image", "")
            hit = _name_match(wanted, img) or any(_id_match(w, ev.attributes.get("imageID", "")) for w in wanted)
        if not hit:
            return False
    return True


# -- the log -----------------------------------------------------------------------------------------------
class EventLog:
    """The ``events`` table of a store's run root database."""

    def __init__(self, db: Database, *, read_only: bool, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.db = db
        self.max_events = max_events
        # A read-only store records nothing; nor does a run root that takes no writes
        self.records = not read_only and db.run_refusal is None
        self._appended = 0  # this process's appends (data_version does not count a connection's own)

    def append(self, type: str, action: str, id: str, name: str = "", attributes: dict[str, str] | None = None) -> None:
        """Add one event now: a short transaction of its own. Never raises for the database's sake."""
        if not self.records:
            return
        attrs = json.dumps({k: str(v) for k, v in (attributes or {}).items()}, sort_keys=True)
        try:
            with self.db.tx(runroot=True) as mdb:
                cur = mdb.execute(
                    "INSERT INTO events (time_ns, type, action, id, name, attrs) VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time_ns(), type, action, id, name, attrs),
                )
                seq = int(cur.lastrowid or 0)
                if seq % TRIM_EVERY == 0:
                    mdb.execute("DELETE FROM events WHERE seq <= ?", (seq - self.max_events,))
            self._appended += 1
        except (LaminaError, sqlite3.Error) as e:
            log.debug("event %s %s %s not recorded: %s", type, action, id, e)

    def last_seq(self) -> int:
        row = self._query("SELECT MAX(seq) FROM events", ())
        return int(row[0][0] or 0) if row else 0

    def after(self, seq: int, *, since_ns: int | None = None, limit: int = _BATCH) -> list[Event]:
        """The events after ``seq`` (at or after ``since_ns``), oldest first, at most ``limit``."""
        if since_ns is None:
            rows = self._query("SELECT seq, time_ns, type, action, id, name, attrs FROM events WHERE seq > ?"
                               " ORDER BY seq LIMIT ?", (seq, limit))
        else:
            rows = self._query("SELECT seq, time_ns, type, action, id, name, attrs FROM events WHERE seq > ?"
                               " AND time_ns >= ? ORDER BY seq LIMIT ?", (seq, since_ns, limit))
        return [Event(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            return self.db.query(sql, params, runroot=True)
        except LaminaError as e:
            if "no such table" in e.message:  # a read-only run root made by an older lamina
                return []
            raise

    def version(self) -> tuple[int, int]:
        """Changes whenever any process may have appended (SQLite's ``data_version``, plus this process's own)."""
        row = self._query("PRAGMA data_version", ())
        return (int(row[0][0]) if row else 0, self._appended)

    def read(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        filters: dict[str, list[str]] | None = None,
        follow: bool = False,
        poll_s: float = POLL_S,
    ) -> Iterator[Event]:
        """The events from ``since_ns`` up to ``until_ns``, oldest first, that pass ``filters``: without
        ``since_ns`` all kept, or (docker's rule) only new ones when following without ``until_ns`` either.
        With ``follow`` it waits for new ones, until ``until_ns`` has passed when given, else for as long as
        the caller iterates."""
        # where "new" starts is fixed now, not when the caller first asks for an event
        seq = self.last_seq() if follow and since_ns is None and until_ns is None else 0
        return self._read(seq, since_ns, until_ns, filters or {}, follow, poll_s)

    def _read(self, seq: int, since_ns: int | None, until_ns: int | None, filters: dict[str, list[str]],
              follow: bool, poll_s: float) -> Iterator[Event]:
        while True:
            seen = self.version()
            batch = self.after(seq, since_ns=since_ns)
            for ev in batch:
                seq = ev.seq
                if until_ns is not None and ev.time_ns > until_ns:
                    return
                if matches(ev, filters):
                    yield ev
            if len(batch) == _BATCH:
                continue
            if not follow or (until_ns is not None and time.time_ns() > until_ns):
                return
            while self.version() == seen:
                if until_ns is not None and time.time_ns() > until_ns:
                    break
                time.sleep(poll_s)

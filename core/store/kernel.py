"""The store kernel: one object that owns a store's integrity.

:class:`Store` opens the database, selects the driver (started as a new store opens, else when first
needed: a command that only reads records never starts it), and holds the layer, image and container
stores, which share its database and its driver. It is the one place that finishes off what killed
processes left (:meth:`Store.recover`), hands out leases (:meth:`Store.lease`) and collects what nothing
references any more (:meth:`Store.collect`). Everything above it (``ImageService``, image operations,
registries) goes through these objects and never through SQL.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.config import Config
from lamina.contract import Driver, DriverInfo
from lamina.errors import DriverConflict, DriverUnsupported, LaminaError, StoreError, shown, write_failure
from lamina.store.db import IMAGE_STORE_SCHEMA, Database, counted_as_gone, owner_alive
from lamina.store.layers import LayerStore
from lamina.store.leases import Lease, end_leases

if TYPE_CHECKING:
    from lamina.plugins import OpStats
    from lamina.plugins.active import ActiveDriver
    from lamina.plugins.discovery import DriverCatalog
    from lamina.store.check import CheckReport
    from lamina.store.containers import ContainerStore
    from lamina.store.events import EventLog
    from lamina.store.images import ImageStore

log = logging.getLogger("lamina.store")


class Store:
    def __init__(self, config: Config, *, catalog: DriverCatalog | None = None, recover: bool = True,
                 shared: bool = False) -> None:
        """Open the store; unless ``recover`` is False (``system check``, which reports what killed
        processes left), finish off what they left first. A ``shared`` store (an additional image store)
        is only read, whatever its file system allows: no directory, lock, recovery or run root of its own."""
        self.config = config
        self.recovers = recover and not shared
        self.shared = shared
        self.root = config.root
        self.runroot = config.runroot
        if shared:
            try:
                found = (self.root / "lamina.db").is_file()
            except OSError as e:
                raise StoreError(f"cannot read additional image store {self.root}: {e.strerror or e}") from e
            if not found:
                raise StoreError(f"additional image store {self.root} is not a lamina store (no lamina.db)")
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.runroot.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as e:
                raise StoreError(f"cannot create store directories under {e.filename}: {e.strerror}") from e
        self.db = Database(self.root, self.runroot, shared=shared)
        # A store whose filesystem takes no writes (read-only, or too full to open the database for writing)
        # opens for reading: no probe, no recovery, no timings; every write fails with the reason.
        self.read_only = self.db.refusal is not None
        self._closed = False
        self._closing = False
        self._starting = threading.Lock()
        self._catalog = catalog
        self._partial = False
        try:
            meta = self.db.get_metas("driver", "image_store", "image_store_token")
            stored = meta.get("driver")
            # Where image layers and blobs live: the image store (``[storage] image_store``), else the root.
            self.image_root: Path | None = self._image_root(stored, meta.get("image_store"),
                                                            meta.get("image_store_token"))
            if stored and not self.read_only and (self.root / "migrate").is_dir():
                from lamina.store.migrate import finish_switch

                finish_switch(self.root, self.runroot, self.db, stored, self.image_root)  # a switch not yet finished
            wanted = self.config.driver
            if wanted and stored and wanted != stored:
                raise DriverConflict(
                    f"store {self.root} was created with driver {stored!r}, not {wanted!r}; "
                    f"use --driver {stored} or another --root"
                )
            # Hook timings of the driver and operation timings of the service, saved at close.
            self.timings: dict[str, OpStats] = {}
            self._driver: ActiveDriver | None = None
            if stored is None:
                self._driver = self._start_driver()  # a new store: its driver is chosen, probed and recorded now
            self.layers = LayerStore(self)
            self._images: ImageStore | None = None
            self._containers: ContainerStore | None = None
            self._events: EventLog | None = None
            if self.recovers:
                self.recover()
        except BaseException:
            self.db.close()
            raise

    # -- the parts ------------------------------------------------------------------------------------
    @property
    def images(self) -> ImageStore:
        if self._images is None:
            from lamina.store.images import ImageStore

            self._images = ImageStore(self)
        return self._images

    @property
    def events(self) -> EventLog:
        """The event log (in the run root's database), made on first use."""
        if self._events is None:
            from lamina.store.events import EventLog

            self._events = EventLog(self.db, read_only=self.read_only, max_events=self.config.max_events)
        return self._events

    @property
    def containers(self) -> ContainerStore:
        if self._containers is None:
            from lamina.store.containers import ContainerStore

            self._containers = ContainerStore(self)
        return self._containers

    # -- the driver -----------------------------------------------------------------------------------
    @property
    def driver(self) -> ActiveDriver:
        """The store's driver, started on first use: commands that only read records (listings,
        inspection) neither discover plugins nor start the driver of a store that has one recorded."""
        if self._driver is None:
            with self._starting:  # threads of one process share one driver
                if self._closed:
                    raise StoreError("the store is closed")
                if self._driver is None:
                    self._driver = self._start_driver()
        return self._driver

    @property
    def driver_started(self) -> bool:
        return self._driver is not None

    @property
    def catalog(self) -> DriverCatalog:
        """The drivers found here (discovered on first use: only the store's own when it names one)."""
        if self._catalog is None:
            from lamina.plugins.discovery import discover

            only = self.config.driver or self.stored_driver()
            self._catalog = discover(only=only)
            self._partial = only is not None  # the other built-in drivers were not imported
        return self._catalog

    def stored_driver(self) -> str | None:
        return self.db.get_meta("driver")

    def _image_root(self, stored_driver: str | None, recorded: str | None, token: str | None) -> Path | None:
        """The store's image store, which is sticky: recorded in the database when the store is made with
        one, and used from then on, whether the configuration names it or not (a store made without one
        keeps its images under the root for good). It must bear this store's mark (:data:`CLAIM`): an
        image store serves one store, and one that lost its mark (not mounted, say) is refused, so that no
        check counts its layers as missing."""
        wanted = None if self.shared else self.config.image_store
        if recorded is not None:
            if wanted is not None and Path(recorded) != wanted:
                raise StoreError(f"store {self.root} keeps its images in {recorded}, not {wanted}; "
                                 f"set image_store to {recorded} or use another root")
            claim = _read_claim(Path(recorded))
            if claim is None or claim[0] != token:
                whose = "bears no mark of it (is it mounted?)" if claim is None else \
                    f"belongs to the store at {shown(claim[1])}"
                kind = "additional image store" if self.shared else "store"
                raise StoreError(f"{kind} {self.root} keeps its images in {recorded}, which {whose}")
            return Path(recorded)
        if wanted is None:
            return None
        if stored_driver is not None:
            raise StoreError(f"store {self.root} keeps its images under its root; image_store is set when a "
                             "store is made")
        real, mine = os.path.realpath(wanted), os.path.realpath(self.root)
        if real == mine or real.startswith(mine + "/") or mine.startswith(real + "/"):
            raise StoreError(f"image_store {wanted} must lie apart from the store root {self.root}")
        named = self.catalog.drivers.get(self.config.driver) if self.config.driver else None
        if named is not None and not named.cls.keeps_images_apart:  # refused before it leaves a mark
            raise _cannot_keep_apart(f"driver {self.config.driver!r}")
        self._claim_image_root(wanted)
        return wanted  # recorded with the driver, when the store is made

    def _same_image_root(self, recorded: str | None) -> None:
        if recorded != (None if self.image_root is None else str(self.image_root)):
            made = f"image_store {recorded}" if recorded else "no image_store"
            raise StoreError(f"store {self.root} was just made by another command, with {made}; run this one again")

    def _claim_image_root(self, path: Path) -> None:
        """Before a new store is made with an image store: give the store its token (committed first, so
        that a kill at any later point leaves a mark the next attempt knows as its own), then mark the image
        store with it, created only if absent: of two stores naming one image store, exactly one gets it, and
        the other is refused before it records anything. The commands making this same store share the
        token."""
        import secrets

        from lamina.fs.ops import write_atomic

        with self.db.tx() as db:  # (on a database that takes no writes: the refusal, before any directory)
            row = db.execute("SELECT value FROM meta WHERE key='image_store_token'").fetchone()
            token = row[0] if row else secrets.token_hex(16)
            if row is None:
                db.execute("INSERT INTO meta VALUES ('image_store_token', ?)", (token,))
        claim = _read_claim(path)
        if claim is None:
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
                # (durable: the mark lasts as long as the commit that records the image store)
                if not write_atomic(path / CLAIM, f"{token} {self.root}\n".encode(), exclusive=True, durable=True):
                    claim = _read_claim(path)  # another store's, made this instant (or this store's)
            except OSError as e:
                raise write_failure(e, f"marking the image store {path}") from e
        if claim is not None and claim[0] != token:
            raise StoreError(f"image store {path} belongs to the store at {shown(claim[1])}, not {self.root}")

    def _probe(self, info: DriverInfo) -> None:
        probe(info.cls, self.root, self.image_root, self.config.options_for(info.cls.name))

    def _start_driver(self) -> ActiveDriver:
        from lamina.plugins.active import ActiveDriver
        from lamina.plugins.discovery import activate, discover, lookup

        meta = self.db.get_metas("driver", "image_store")
        existing = meta.get("driver")
        if existing is not None:  # (made by another command since this one opened it, maybe without one)
            self._same_image_root(meta.get("image_store"))
        wanted = self.config.driver
        if wanted and existing and wanted != existing:
            raise DriverConflict(
                f"store {self.root} was created with driver {existing!r}, not {wanted!r}; "
                f"use --driver {existing} or another --root"
            )
        name = wanted or existing
        if name:
            if name not in self.catalog.drivers and self._partial:
                self._catalog = discover()  # the full list, for the error naming the drivers there are
            info = lookup(self.catalog, name)
            try:
                if not self.read_only:
                    self._probe(info)
            except DriverUnsupported as e:
                if not existing and self._partial:
                    self._catalog = discover()  # the hint names another installed driver
                others = [n for n in self.config.driver_priority if n != name and n in self.catalog.drivers]
                hint = f"; try --driver {others[0]}" if others and not existing else ""
                raise DriverUnsupported(f"driver {name!r} is not supported here: {e.message}{hint}") from e
        else:
            reasons: list[str] = []
            found: DriverInfo | None = None
            for cand in self.config.driver_priority:
                ci = self.catalog.drivers.get(cand)
                if ci is None:
                    reasons.append(f"{cand}: not installed")
                    continue
                try:
                    self._probe(ci)
                except DriverUnsupported as e:
                    reasons.append(f"{cand}: {e.message}")
                    continue
                found = ci
                break
            if found is None:
                raise DriverUnsupported("no storage driver in driver_priority works here: " + "; ".join(reasons))
            info = found
        name = info.cls.name
        home = self.root / name
        runhome = self.runroot / name
        refused = self.db.refused()
        if existing is None and refused is not None:
            raise refused  # a new store cannot be made on a filesystem that takes no writes
        image_home = None if self.image_root is None else self.image_root / name
        if image_home is not None and not info.cls.keeps_images_apart:
            raise _cannot_keep_apart(f"driver {name!r}")
        try:
            if not self.shared:
                home.mkdir(exist_ok=True, mode=0o700)
                if image_home is not None:
                    image_home.mkdir(exist_ok=True, mode=0o700)
            runhome.mkdir(parents=self.shared, exist_ok=True, mode=0o700)
        except OSError as e:
            raise write_failure(e, f"creating the driver's directories under {e.filename}") from e
        try:
            instance = info.cls.__new__(info.cls)
            instance.read_only = self.shared
            instance.image_home = image_home
            instance.__init__(home, runhome, self.config.options_for(name))  # type: ignore[misc]
        except LaminaError:
            raise
        except Exception as e:
            raise DriverUnsupported(f"driver {name!r} from {info.source} failed to start: {e}") from e
        if existing is None:
            with self.db.tx() as db:
                row = db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('driver', ?)", (name,))
                    if self.image_root is not None:  # (marked with this store's token by _image_root)
                        db.execute("INSERT INTO meta VALUES ('image_store', ?)", (str(self.image_root),))
                        db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(IMAGE_STORE_SCHEMA),))
                else:
                    if row[0] != name:
                        raise DriverConflict(f"store {self.root} was just created with driver {row[0]!r}")
                    theirs = db.execute("SELECT value FROM meta WHERE key='image_store'").fetchone()
                    self._same_image_root(theirs[0] if theirs else None)
        pm, observer = activate(info, instance, self.catalog.observers)
        observer.stats = self.timings
        return ActiveDriver(info, instance, pm, observer)

    # -- leases and collection ------------------------------------------------------------------------
    def lease(self, *, reading: bool = False) -> Lease:
        """A new lease owned by this process; use it as a context manager (it ends itself). A lease for
        ``reading`` (a save or push) holds nothing in a read-only store, where nothing can be removed."""
        return Lease(self, inert=reading and self.read_only)

    def collect(self, cache_ids: list[str]) -> list[str]:
        """Remove those of ``cache_ids`` (then their parents) that nothing uses. Returns the ChainIDs removed."""
        return [str(c) for c in self.layers.collect(cache_ids)]

    # -- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Finish off what processes that no longer run left behind: their leases, their incomplete or
        half-removed layers and containers, layers nothing keeps, and their mount references. Returns one
        line for each kind of thing done.

        Cheap when nothing is unfinished: a few indexed reads, no write lock. A read-only store is left as
        it is (its readers see committed rows only)."""
        if self.read_only:
            return []
        dead = [
            lid for lid, pid, start in self.db.query("SELECT id, owner_pid, owner_start FROM leases")
            if not owner_alive(pid, start)
        ]
        done: list[str] = []
        # mounts first: a layer that only a dead process's mount kept is then collected below
        reclaimed = self.layers.reclaim_mounts()
        if reclaimed:
            done.append(f"dropped the mount references of {reclaimed} process{'es' if reclaimed > 1 else ''} "
                        "or layers that are gone")
        if dead:
            removed = end_leases(self, dead)
            done.append(f"ended {len(dead)} lease{'s' if len(dead) > 1 else ''} of processes that are gone")
            done += [f"removed unused layer {_short(c)}" for c in removed]
        if self.db.one("SELECT 1 FROM containers WHERE state != 'committed' AND state != 'created' LIMIT 1"):
            done += [f"finished off container {cid[:12]}" for cid in self.containers.recover()]
        done += [f"removed incomplete layer {lid[:12]}" for lid in self.layers.recover()]
        done += [f"removed unused layer {_short(c)}" for c in self.layers.collect_orphans()]
        return done

    # -- checking -------------------------------------------------------------------------------------
    def check(self, *, quick: bool = False, repair: bool = False, force: bool = False) -> CheckReport:
        """Is the store sound (``lamina system check``); with ``repair``, remove what is not (see
        :mod:`lamina.store.check`)."""
        from lamina.store.check import run

        return run(self, quick=quick, repair_it=repair, force=force)

    def close(self, *, abandon: bool = False) -> None:
        """Release the driver and close the databases. With ``abandon`` (an interrupt stopped this process's
        work on the store wherever it was), first finish off what that work left, as the next process would
        for a dead one: a transaction cut short, leases, incomplete layers and containers, partial blobs.
        Closing a closed store does nothing."""
        if self._closed or self._closing:
            return
        self._closing = True  # the driver may still start for the recovery below
        try:
            if abandon and not self.read_only:
                self.db.rollback()
                try:
                    with counted_as_gone():
                        self.recover()
                        self.images.content.clean_ingest(lambda pid: owner_alive(pid, None))
                except LaminaError as e:  # the next process finishes it off
                    log.warning("could not yet clean up after the interrupted operation: %s", e)
            if self._driver is not None:
                self._driver.cleanup()
            self.layers.save_timings()
        finally:
            self._closed = True
            self.db.close()


def probe(cls: type[Driver], root: Path, image_root: Path | None, options: dict[str, Any]) -> None:
    """Raise DriverUnsupported when driver ``cls`` cannot work in a store at ``root`` that keeps its images
    in ``image_root`` (None: under the root): its probe of each place, and whether it keeps them apart."""
    cls.probe(root / cls.name, options)
    if image_root is not None:
        if not cls.keeps_images_apart:
            raise _cannot_keep_apart("it")
        cls.probe(image_root / cls.name, options)


def _cannot_keep_apart(who: str) -> DriverUnsupported:
    return DriverUnsupported(f"{who} cannot keep image layers apart from containers' (storage.image_store)")


CLAIM = "lamina-image-store"  # in an image store: "<token> <root>" of the store it serves


def _read_claim(path: Path) -> tuple[str, str] | None:
    try:
        token, _, root = (path / CLAIM).read_text(encoding="utf-8").strip().partition(" ")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cannot read {path / CLAIM}: {getattr(e, 'strerror', None) or e}") from e
    return token, root


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]

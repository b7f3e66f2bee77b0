"""Invariants of a lamina store at rest (no lamina process running), checked from the outside.

Reads ``root/lamina.db`` and ``runroot/mounts.db`` read-only with sqlite3, looks at the driver's and the
content store's files, reads /proc/self/mountinfo, and exports layers through the CLI. Imports nothing from
lamina, so it keeps working while lamina's modules move.

On-disk layouts relied on (see drivers/vfs.py, drivers/overlay.py and core/content.py):

- every tree driver's read-only layer: ``root/tar-split/<cache-id>.tsr`` (the exact-export record lamina
  keeps; ``.tsr.sup`` beside it for superseded payloads);
- vfs: ``root/vfs/dir/<cache-id>/`` (the tree) and ``root/vfs/records/<cache-id>.tsr`` (exact re-export
  record; read-only layers only);
- overlay: ``root/overlay/<cache-id>/{diff,work,merged,link[,lower][,rw][,tarsplit]}``,
  ``root/overlay/l/<short>`` -> ``../<cache-id>/diff``, plus ``mode`` and ``.probe-ok``;
- content: ``root/content/blobs/<algo>/<hex>`` and ``root/content/ingest/`` (partial writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

# Driver directory entries that are not layers.
_OVERLAY_FIXED = {"l", "mode", ".probe-ok"}


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        yield db


def _chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    parent: str | None = None
    for d in diff_ids:
        parent = d if parent is None else "sha256:" + hashlib.sha256(f"{parent} {d}".encode()).hexdigest()
        out.append(parent)
    return out


def _mounts_under(*dirs: Path) -> list[str]:
    prefixes = [str(d.resolve()) for d in dirs]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if any(target == p or target.startswith(p + "/") for p in prefixes):
                found.append(target)
    return found


def _export_sha256(root: Path, runroot: Path, driver: str, chain: str, out: Path) -> str:
    """sha256 of ``lamina layer export CHAIN``, or an error text starting with 'error'."""
    cmd = [sys.executable, "-m", "lamina", "--root", str(root), "--runroot", str(runroot), "--driver", driver,
           "layer", "export", chain, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"error: {proc.stderr.strip()}"
    h = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    out.unlink()
    return "sha256:" + h.hexdigest()


def check_store(root: Path, runroot: Path, driver: str, *, export: Callable[[str], str] | None = None,
                image_root: Path | None = None) -> list[str]:
    """Every problem found in the store at ``root`` (runroot ``runroot``, driver ``driver``, image store
    ``image_root``: image layers, blobs and records there, containers' layers under the root); [] when sound.

    The database and file checks run first, on the store as it was left; the layer exports (which open the
    store through the CLI, and so run its recovery) run last. ``export`` (ChainID -> sha256 of the layer's
    export, or an error text) replaces ``lamina layer export`` for them: an ImageService in the caller's
    process saves a start-up per layer.
    """
    problems: list[str] = []
    db_path = root / "lamina.db"
    mdb_path = runroot / "mounts.db"
    if not db_path.exists():
        return [f"no store database at {db_path}"]

    with _read_only(db_path) as db:
        problems += [f"lamina.db integrity: {r[0]}" for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"lamina.db foreign key violation: {tuple(r)}" for r in db.execute("PRAGMA foreign_key_check")]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

        def rows(table: str, columns: str) -> list[tuple[Any, ...]]:
            # a store only layer commands have used has no image or container tables yet
            return db.execute(f"SELECT {columns} FROM {table}").fetchall() if table in tables else []

        layers = {r[0]: r for r in rows("layers", "id, chain_id, diff_id, parent, state, rw, refs")}
        by_chain = {r[1]: r for r in layers.values() if r[1] is not None}
        images = rows("images", "id, top_layer")
        containers = rows("containers", "id, name, state, init_layer, rw_layer")
        leases = rows("leases", "id, owner_pid")
        layer_leases = rows("lease_layers", "layer, lease")
        content_leases = rows("lease_blobs", "digest, lease")
        image_blobs = {r[0] for r in rows("image_blobs", "digest")}
        names = rows("image_names", "name, image_id")
        stored_driver = db.execute("SELECT value FROM meta WHERE key='driver'").fetchone()

    if stored_driver is None or stored_driver[0] != driver:
        problems.append(f"store driver is {stored_driver[0] if stored_driver else None!r}, expected {driver!r}")

    # -- row states and leases --------------------------------------------------------------------------
    for lid, _chain, _diff, parent, state, rw, _refs in layers.values():
        if state != "committed":
            problems.append(f"layer row {lid[:12]} is {state!r}")
        if parent is not None and parent not in layers:
            problems.append(f"layer {lid[:12]} has a missing parent {parent[:12]}")
        if not rw and _chain is None:
            problems.append(f"layer {lid[:12]} has no ChainID")
    for cid, name, state, _init, _rw in containers:
        if state != "created":
            problems.append(f"container {name or cid[:12]} is {state!r}")
    problems += [f"lease {lease[:12]} left by pid {pid}" for lease, pid in leases]
    problems += [f"layer lease left on {lid[:12]} by lease {lease[:12]}" for lid, lease in layer_leases]
    problems += [f"content lease left on {d} by lease {lease[:12]}" for d, lease in content_leases]
    image_ids = {i[0] for i in images}
    problems += [f"name {n} points at missing image {i}" for n, i in names if i not in image_ids]

    # -- images: their whole chain is stored and matches their config ------------------------------------
    images_at = image_root or root
    blobs_dir = images_at / "content" / "blobs"
    wanted_chains: dict[str, str] = {}  # chain -> diff_id, every layer of every image
    for iid, top in images:
        cfg_path = blobs_dir / iid.replace(":", "/", 1)
        try:
            cfg = json.loads(cfg_path.read_bytes())
            diff_ids = [str(d) for d in cfg["rootfs"]["diff_ids"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"image {iid}: config unreadable: {e}")
            continue
        chains = _chain_ids(diff_ids)
        if (chains[-1] if chains else None) != top:
            problems.append(f"image {iid}: top_layer {top} is not its config's top ChainID")
        for chain, diff_id in zip(chains, diff_ids, strict=True):
            wanted_chains[chain] = diff_id
        # walk down from the top row: every parent committed, ChainIDs as the config says
        row = by_chain.get(top) if top else None
        for chain in reversed(chains):
            if row is None or row[1] != chain:
                problems.append(f"image {iid}: layer {chain} is missing")
                break
            if row[4] != "committed":
                problems.append(f"image {iid}: layer {chain} is {row[4]!r}")
            if row[2] != wanted_chains[chain]:
                problems.append(f"image {iid}: layer {chain} has DiffID {row[2]}, config says {wanted_chains[chain]}")
            row = layers.get(row[3]) if row[3] else None
        else:
            if row is not None:
                problems.append(f"image {iid}: its bottom layer has a parent {row[0][:12]}")

    # -- reference counts cover the users -----------------------------------------------------------------
    users: dict[str, int] = {}
    for _iid, top in images:
        if top and top in by_chain:
            users[by_chain[top][0]] = users.get(by_chain[top][0], 0) + 1
    rw_owner: dict[str, str] = {}
    for cid, name, _state, init, rw in containers:
        label = name or cid[:12]
        if init not in layers:
            problems.append(f"container {label}: init layer {str(init)[:12]} is missing")
        else:
            users[init] = users.get(init, 0) + 1
        if rw not in layers:
            problems.append(f"container {label}: read-write layer {str(rw)[:12]} is missing")
        else:
            rw_owner[rw] = label
            if layers[rw][3] != init:
                problems.append(f"container {label}: read-write layer's parent is not its init layer")
    for lid, n in users.items():
        if layers[lid][6] < n:
            problems.append(f"layer {layers[lid][1]} has refs {layers[lid][6]} but {n} users (images, containers)")
    children = {r[3] for r in layers.values() if r[3] is not None}
    for lid, chain, _diff, _parent, state, rw, refs in layers.values():
        if rw and lid not in rw_owner:
            problems.append(f"read-write layer {lid[:12]} belongs to no container")
        if not rw and state == "committed" and refs == 0 and lid not in children:
            problems.append(f"layer {chain} has no reference and no child (garbage)")

    # -- nothing mounted ------------------------------------------------------------------------------------
    if mdb_path.exists():
        with _read_only(mdb_path) as mdb:
            problems += [f"mounts.db integrity: {r[0]}" for r in mdb.execute("PRAGMA integrity_check")
                         if r[0] != "ok"]
            problems += [f"mount reference left: layer {r[0][:12]} holder {r[1]} count {r[2]}"
                         for r in mdb.execute("SELECT id, holder, count FROM mount_refs")]
    problems += [f"mounted: {m}" for m in _mounts_under(root, runroot)]

    # -- no orphans on disk -------------------------------------------------------------------------------
    problems += _driver_orphans(root / driver, driver, layers, None if image_root is None else image_root / driver)
    blob_files: set[str] = set()
    if blobs_dir.is_dir():
        for algo in os.listdir(blobs_dir):
            for name in os.listdir(blobs_dir / algo):
                blob_files.add(f"{algo}:{name}")
    problems += [f"blob {d} is named by no image" for d in sorted(blob_files - image_blobs)]
    problems += [f"image {iid}: config blob is missing" for iid in sorted(image_ids) if iid not in blob_files]
    ingest = images_at / "content" / "ingest"
    if ingest.is_dir():
        problems += [f"partial blob left in ingest: {n}" for n in sorted(os.listdir(ingest))]

    # -- every image layer exports to its DiffID (opens the store: last) --------------------------------------
    with tempfile.TemporaryDirectory(prefix="lamina-check-") as td:
        for chain, diff_id in sorted(wanted_chains.items()):
            if chain not in by_chain:
                continue  # already reported as missing
            got = export(chain) if export else _export_sha256(root, runroot, driver, chain, Path(td) / "layer.tar")
            if got != diff_id:
                problems.append(f"layer {chain} exports to {got}, not its DiffID {diff_id}")
    return problems


def _listing(d: Path) -> set[str]:
    return set(os.listdir(d)) if d.is_dir() else set()


def _driver_orphans(home: Path, driver: str, layers: dict[str, tuple[Any, ...]],
                    image_home: Path | None = None) -> list[str]:
    """Driver files without a layer row, and layer rows without their driver files; with an image home,
    also any layer that is not where it belongs (read-write layers in the home, the others in the image
    home)."""
    problems: list[str] = []
    committed_ro = {lid for lid, r in layers.items() if not r[5] and r[4] == "committed"}
    if image_home is not None:
        sub = "dir" if driver == "vfs" else ""
        rw_here, ro_here = _listing(home / sub), _listing(image_home / sub)
        problems += [f"read-write layer {lid[:12]} is not in the home" for lid, r in layers.items()
                     if r[5] and lid not in rw_here]
        problems += [f"image layer {lid[:12]} is not in the image home" for lid, r in layers.items()
                     if not r[5] and lid not in ro_here]
    homes = [home] if image_home is None else [home, image_home]
    if driver == "vfs":
        dirs = set().union(*(_listing(h / "dir") for h in homes))
        problems += [f"vfs directory {n} has no layer row" for n in sorted(dirs - set(layers))]
        problems += [f"layer {lid[:12]} has no vfs directory" for lid in sorted(set(layers) - dirs)]
    elif driver == "overlay":
        dirs = set().union(*(_listing(h) for h in homes)) - _OVERLAY_FIXED
        problems += [f"overlay entry {n} has no layer row" for n in sorted(dirs - set(layers))]
        problems += [f"layer {lid[:12]} has no overlay directory" for lid in sorted(set(layers) - dirs)]
        links: dict[str, str] = {}
        for short in os.listdir(home / "l") if (home / "l").is_dir() else []:
            target = os.readlink(home / "l" / short)
            links[short] = target
            parts = target.split("/")
            if len(parts) != 3 or parts[0] != ".." or parts[2] != "diff" or parts[1] not in layers:
                problems.append(f"overlay link l/{short} -> {target} names no layer")
        for lid in sorted(set(layers) & dirs):
            d = home / lid if image_home is None or not (image_home / lid).exists() else image_home / lid
            try:
                short = (d / "link").read_text().strip()
            except OSError:
                problems.append(f"overlay layer {lid[:12]} has no link file")
                continue
            if links.get(short) != f"../{lid}/diff":
                problems.append(f"overlay layer {lid[:12]}: l/{short} is not its link")
            if bool(layers[lid][5]) != (d / "rw").exists():
                problems.append(f"overlay layer {lid[:12]}: rw marker does not match its row")
    else:
        problems.append(f"no orphan check for driver {driver!r}")
    store_records = (home if image_home is None else image_home).parent / "tar-split"
    records = {n for n in os.listdir(store_records) if n.endswith(".tsr")} if store_records.is_dir() else set()
    expected = {f"{lid}.tsr" for lid in committed_ro}
    problems += [f"tar-split record {n} has no read-only layer row" for n in sorted(records - expected)]
    problems += [f"layer {n[:12]} has no tar-split record" for n in sorted(expected - records)]
    return problems

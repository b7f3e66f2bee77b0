"""``lamina info``, ``lamina drivers`` and the ``lamina system`` group (``check``): the store and the
storage drivers."""

from __future__ import annotations

import sys
from typing import Any

import click

from lamina import __version__
from lamina.cli.app import Globals, cli, emit, fail, format_option, human, print_table


@cli.command()
@format_option
@click.pass_obj
def info(g: Globals) -> None:
    """Show the store, its driver's status and per-operation timings."""
    with g.open() as svc:
        status = svc.layer_store_status()
        caps = svc.capabilities().as_dict()
        svc_usage = svc.layer_disk_usage()  # recorded sizes, as system df counts them
        data = {
            "store": dict(status),
            "capabilities": caps,
            "disk_usage": svc_usage,
            "timings": svc.recorded_timings(),
            "version": __version__,
        }

    def table() -> None:
        for k, v in status:
            click.echo(f"{k}: {v}")
        click.echo("Capabilities: " + ", ".join(k for k, v in caps.items() if v))
        click.echo(f"Disk usage: {human(svc_usage)}")

    emit(g, data, table)


@cli.command()
@format_option
@click.pass_obj
def drivers(g: Globals) -> None:
    """List the storage drivers installed, where they come from, whether they work here and what their
    probes found."""
    from lamina.config import load_config
    from lamina.service import ImageService

    cfg = load_config(g.config, driver=g.driver, root=g.root, runroot=g.runroot)
    rows = ImageService.available_drivers(cfg)

    def findings(r: dict[str, Any]) -> str:
        return str(r["reason"]) or "; ".join(f"{k}: {v}" for k, v in r.get("details", {}).items())

    emit(g, rows, lambda: print_table(
        [[r["name"], r["source"], "yes" if r["supported"] else "no", findings(r)] for r in rows],
        ["NAME", "SOURCE", "SUPPORTED", "WHY NOT / DETAILS"]))


@cli.group()
def system() -> None:
    """Manage the store as a whole."""


_HEADINGS = {
    "database": "Damaged database",
    "layer": "Damaged layers",
    "image": "Damaged images",
    "container": "Damaged containers",
    "blob": "Damaged blobs",
    "orphan": "Orphaned data",
    "leftover": "Leftovers of interrupted operations",
}


@system.command()
@click.option("--quick", is_flag=True, help="Check rows and presence only; read no file contents.")
@click.option("--repair", "-r", is_flag=True,
              help="Remove orphans and leftovers, and damaged layers and images with the images that need them.")
@click.option("--force", "-f", is_flag=True,
              help="With --repair, also remove containers that need what is damaged (not running or mounted ones).")
@format_option
@click.pass_obj
def check(g: Globals, quick: bool, repair: bool, force: bool) -> None:
    """Check the store's consistency: databases, layers (read back against their DiffIDs without --quick),
    images, containers, blobs, orphans and leftovers of interrupted operations. One line per problem.

    Exit status: 0 sound, 1 problems found (or left after --repair), 2 the check itself failed."""
    from lamina.errors import LaminaError

    if force and not repair:
        fail("--force only goes with --repair", 2)
    try:
        with g.open(recover=False) as svc:
            report = svc.check(quick=quick, repair=repair, force=force)
    except LaminaError as e:
        fail(f"check failed: {e.message}", 2)

    def table() -> None:
        for kind, heading in _HEADINGS.items():
            found = [p for p in report.problems if p.kind == kind]
            if found:
                click.echo(f"{heading}:")
                for p in found:
                    click.echo(f"  {p}")
        if report.repaired:
            click.echo("Repair:")
            for line in report.removed:
                click.echo(f"  {line}")
            for p in report.left:
                click.echo(f"  still: {p}")
        n, left = len(report.problems), len(report.left)
        if not n:
            click.echo("No problems found")
        elif report.repaired:
            click.echo(f"{n} problem{'s' if n > 1 else ''} found, {left or 'none'} left after repair")
        else:
            can = sum(1 for p in report.problems if p.fix is not None)
            click.echo(f"{n} problem{'s' if n > 1 else ''} found; {can} can be repaired with --repair")

    emit(g, report.as_dict(), table)
    if not report.sound:
        sys.exit(1)


@system.command()
@click.option("-v", "--verbose", is_flag=True,
              help="Per image and per container; measures containers' read-write layers.")
@format_option
@click.pass_obj
def df(g: Globals, verbose: bool) -> None:
    """Show the store's disk usage: images, containers, layers and the content store (count, active, size,
    reclaimable), from the sizes recorded when layers were committed: no layer is read."""
    from lamina.cli.app import ago

    with g.open() as svc:
        usage = svc.disk_usage(verbose=verbose)

    def size(n: int | None) -> str:
        return "-" if n is None else human(n)

    def table() -> None:
        rows = []
        for r in usage.rows:
            part = "" if not r.size or r.reclaimable is None else f" ({100 * r.reclaimable // r.size}%)"
            rows.append([r.kind, str(r.total), str(r.active), size(r.size), size(r.reclaimable) + part])
        print_table(rows, ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"])
        if not verbose:
            return
        from lamina.formats.reference import parse_normalized

        click.echo("\nImages space usage:\n")
        irows = []
        for i in usage.images:
            tags = [parse_normalized(n).familiar() for n in i.names if "@" not in n] or ["<none>:<none>"]
            for t in tags:
                repo, _, tag = t.rpartition(":")
                irows.append([repo, tag, i.id.split(":", 1)[1][:12], ago(i.created), human(i.size),
                              human(i.shared_size), human(i.unique_size), str(i.containers)])
        print_table(irows, ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE",
                            "CONTAINERS"])
        click.echo("\nContainers space usage:\n")
        print_table([[c.id[:12], c.image_id.split(":", 1)[1][:12], size(c.size_rw), c.status, c.name or ""]
                     for c in usage.containers], ["CONTAINER ID", "IMAGE", "SIZE", "STATUS", "NAMES"])

    emit(g, usage.as_dict(), table)


@system.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Remove every image no container uses, not only untagged ones.")
@click.option("-f", "--force", is_flag=True, help="Accepted for docker's scripts; lamina never asks.")
@format_option
@click.pass_obj
def prune(g: Globals, all_: bool, force: bool) -> None:
    """Remove stopped containers, then images without a tag (with -a, every image no container uses), then
    layers and blobs nothing references and partial downloads; prints what went and the space reclaimed."""
    from lamina.cli.images import print_prune

    with g.open() as svc:
        out = svc.system_prune(all=all_)

    def table() -> None:
        if out["ContainersDeleted"]:
            click.echo("Deleted Containers:")
            for cid in out["ContainersDeleted"]:
                click.echo(cid)
            click.echo("")
        if out["LayersDeleted"] or out["BlobsDeleted"] or out["PartialDownloadsDeleted"]:
            click.echo("Deleted Layers and Blobs:")
            for d in [*out["LayersDeleted"], *out["BlobsDeleted"]]:
                click.echo(d)
            for d in out["PartialDownloadsDeleted"]:
                click.echo(f"{d} (partial download)")
            click.echo("")
        print_prune(out["ImagesDeleted"], out["SpaceReclaimed"])

    emit(g, out, table)

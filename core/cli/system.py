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
        svc_usage = svc.layer_disk_usage()
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

"""``lamina info`` and ``lamina drivers``: the store and the storage drivers."""

from __future__ import annotations

from typing import Any

import click

from lamina import __version__
from lamina.cli.app import Globals, cli, emit, format_option, human, print_table


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

"""``lamina info``, ``lamina drivers`` and the ``lamina system`` group (``check``, ``migrate``, ...): the
store and the storage drivers."""

from __future__ import annotations

import sys
from typing import Any

import click

from lamina import __version__
from lamina.cli.app import Globals, cli, emit, fail, format_option, human, print_table


@cli.command()
@lambda f: format_option(f, ("table", "json", "prometheus"))
@click.pass_obj
def info(g: Globals) -> None:
    """Show the store, its driver's status and the timings of lamina's operations (image.pull,
    container.create, ...) and of the driver's hooks, summed over every process since the run root was made.

    --format prometheus prints them, with the numbers of images, layers and containers and the disk usage,
    in Prometheus' text exposition format (for node_exporter's textfile collector)."""
    with g.open() as svc:
        status = svc.layer_store_status()
        caps = svc.capabilities().as_dict()
        svc_usage = svc.layer_disk_usage()  # recorded sizes, as system df counts them
        timings = svc.recorded_timings()
        data: dict[str, Any] = {
            "store": dict(status),
            "capabilities": caps,
            "disk_usage": svc_usage,
            "timings": timings,
            "version": __version__,
        }
        if g.format == "prometheus":
            counts = {"images": svc.count_images(), "layers": svc.layer_store.count(),
                      "containers": len(svc.containers())}
    if g.format == "prometheus":
        click.echo(_prometheus(data, counts), nl=False)
        return

    def table() -> None:
        for k, v in status:
            click.echo(f"{k}: {v}")
        click.echo("Capabilities: " + ", ".join(k for k, v in caps.items() if v))
        click.echo(f"Disk usage: {human(svc_usage)}")
        ops = {k: v for k, v in timings.items() if "." in k}
        if ops:
            click.echo("Operations:")
            for op, t in ops.items():
                click.echo(f"  {op}: {t['calls']} calls, {t['errors']} errors, {t['total_ms']:.1f} ms in all, "
                           f"{t['max_ms']:.1f} ms at most")

    emit(g, data, table)


def _prometheus(data: dict[str, Any], counts: dict[str, int]) -> str:
    """``info``'s numbers in Prometheus' text exposition format (version 0.0.4). Timings named ``kind.verb``
    are lamina's operations (``op`` label); the others are the driver's hooks (``hook`` label)."""

    def label(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    out: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, float | int]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value!r}" for labels, value in samples)

    timings: dict[str, dict[str, Any]] = data["timings"]
    for prefix, key, what in (("lamina_operation", "op", "lamina operation"),
                              ("lamina_driver_hook", "hook", "storage driver hook")):
        rows = [(f'{{{key}="{label(k)}"}}', v) for k, v in sorted(timings.items()) if ("." in k) == (key == "op")]
        since = "by every process since the run root was created"
        family(f"{prefix}_calls_total", "counter", f"Calls of a {what} {since}.",
               [(lb, int(v["calls"])) for lb, v in rows])
        family(f"{prefix}_errors_total", "counter", f"Calls of a {what} that failed, {since}.",
               [(lb, int(v["errors"])) for lb, v in rows])
        family(f"{prefix}_seconds_total", "counter", f"Wall time spent in a {what} {since}.",
               [(lb, round(float(v["total_ms"]) / 1000, 6)) for lb, v in rows])
        family(f"{prefix}_max_seconds", "gauge", f"The longest call of a {what} {since}.",
               [(lb, round(float(v["max_ms"]) / 1000, 6)) for lb, v in rows])
    for what, n in counts.items():
        family(f"lamina_{what}", "gauge", f"{what.capitalize()} in the store.", [("", n)])
    family("lamina_disk_bytes", "gauge", "Bytes the store's layers take on disk.", [("", int(data["disk_usage"]))])
    store = data["store"]
    family("lamina_info", "gauge", "The lamina version and the store's driver and root.",
           [(f'{{version="{label(data["version"])}",driver="{label(store["Storage Driver"])}",'
             f'root="{label(store["Root"])}"}}', 1)])
    return "\n".join(out) + "\n"


@cli.command()
@format_option
@click.pass_obj
def drivers(g: Globals) -> None:
    """List the storage drivers installed, where they come from, whether they work here and what their
    probes found."""
    from lamina.config import load_config
    from lamina.service import ImageService

    cfg = load_config(g.config, driver=g.driver, root=g.root, runroot=g.runroot, image_store=g.image_store)
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

    with g.open() as svc:  # (the table without -v shows the summary rows alone)
        usage = svc.disk_usage(verbose=verbose) if verbose or g.format == "json" else svc.usage_summary()

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


@system.command()
@click.option("--driver", "new_driver", required=True, metavar="NAME", help="The driver to move the store to.")
@click.option("--containers", is_flag=True, help="Move the containers too, with their changes (not running ones).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@format_option
@click.pass_obj
def migrate(g: Globals, new_driver: str, containers: bool, quiet: bool) -> None:
    """Move every layer of the store (and with --containers every container) to another storage driver, in
    place: images keep their IDs, names, manifests and blobs. The store works on the old driver until the
    switch at the end; killed at any point, running the command again finishes the job. A store with
    containers is refused without --containers."""
    def say(line: str) -> None:
        if not quiet:
            click.echo(line, err=True)

    with g.open() as svc:
        result = svc.migrate_driver(new_driver, containers=containers, progress=say)

    def table() -> None:
        if result["migrated"]:
            click.echo(f"Migrated {result['images']} images, {result['layers']} layers and {result['containers']}"
                       f" containers from {result['from']} to {result['to']}")
        else:
            click.echo(f"The store already uses driver {result['to']}")

    emit(g, result, table)

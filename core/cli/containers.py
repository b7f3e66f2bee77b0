"""Container commands: ``create``, ``ps``, ``mount``, ``umount``, ``diff``, ``commit``, ``rm``, ``squash``,
``run`` and ``bundle``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from lamina.cli.app import Globals, ago, cli, emit, format_option, print_lines, print_table


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    from lamina.errors import ContainerError

    out = {}
    for v in values:
        k, _, val = v.partition("=")
        if not k:
            raise ContainerError(f"bad label {v!r}: use key=value")
        out[k] = val
    return out


@cli.command()
@click.argument("image", metavar="IMAGE")
@click.option("--name", metavar="NAME", help="A unique name for the container.")
@click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Container label; repeatable.")
@format_option
@click.pass_obj
def create(g: Globals, image: str, name: str | None, labels: tuple[str, ...]) -> None:
    """Create a container (an init layer and a read-write layer on IMAGE); prints its ID."""
    with g.open() as svc:
        c = svc.create_container(image, name=name, labels=_labels(labels))
    emit(g, c.as_dict(), lambda: click.echo(c.id))


@cli.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers, not only running ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print container IDs only.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs.")
@format_option
@click.pass_obj
def ps(g: Globals, all_: bool, quiet: bool, no_trunc: bool) -> None:
    """List containers."""
    from lamina.formats.reference import parse_normalized

    with g.open() as svc:
        items = [c for c in svc.containers() if all_ or c.status == "running"]
        names = {}
        for c in items:
            tags = svc.image_tags(c.image_id)  # none for an image removed with --force: its ID is shown
            names[c.id] = parse_normalized(tags[0]).familiar() if tags else c.image_id.split(":")[1][:12]
    if quiet and g.format == "table":
        print_lines(c.id if no_trunc else c.short_id for c in items)
        return

    def status(c: Any) -> str:
        return f"Exited ({c.exit_code})" if c.status == "exited" and c.exit_code is not None else c.status.title()

    emit(g, [c.as_dict() for c in items], lambda: print_table(
        [[c.id if no_trunc else c.short_id, names[c.id], ago(c.created), status(c), c.name or ""] for c in items],
        ["CONTAINER ID", "IMAGE", "CREATED", "STATUS", "NAMES"]))


@cli.command("mount")
@click.argument("ref", metavar="CONTAINER")
@format_option
@click.pass_obj
def mount_(g: Globals, ref: str) -> None:
    """Mount a container's root filesystem and print its path; it stays mounted until `umount`."""
    with g.open() as svc:
        path = svc.mount(ref)
    emit(g, {"path": path}, lambda: click.echo(path))


@cli.command("umount")
@click.argument("ref", metavar="CONTAINER")
@click.option("-f", "--force", is_flag=True, help="Drop every mount reference and unmount.")
@format_option
@click.pass_obj
def umount_(g: Globals, ref: str, force: bool) -> None:
    """Drop one mount reference on a container; the last one unmounts it."""
    with g.open() as svc:
        left = svc.unmount(ref, force=force)
    emit(g, {"mounts_left": left}, lambda: None)


@cli.command("diff")
@click.argument("ref", metavar="CONTAINER")
@format_option
@click.pass_obj
def diff_(g: Globals, ref: str) -> None:
    """List what a container added (A), changed (C) and deleted (D) in its image."""
    with g.open() as svc:
        changes = svc.changes(ref)
    emit(g, [{"kind": c.kind, "path": c.path} for c in changes], lambda: print_lines(str(c) for c in changes))


@cli.command()
@click.argument("ref", metavar="CONTAINER")
@click.argument("image", required=False, metavar="[IMAGE]")
@click.option("-a", "--author", default="", help="Author of the new image.")
@click.option("-m", "--message", default="", help="Commit message (the history entry's comment).")
@click.option("-c", "--change", "changes", multiple=True, metavar="INSTRUCTION",
              help="Dockerfile instruction to apply to the config (CMD, ENV, ...); repeatable.")
@format_option
@click.pass_obj
def commit(g: Globals, ref: str, image: str | None, author: str, message: str, changes: tuple[str, ...]) -> None:
    """Make a new image from a container's changes; prints the image ID."""
    with g.open() as svc:
        img = svc.commit_image(ref, image, author=author, message=message, changes=list(changes))
    emit(g, {"Id": img.id, "RepoTags": img.repo_tags}, lambda: click.echo(img.id))


@cli.command()
@click.argument("refs", metavar="CONTAINER...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove mounted containers too (they are unmounted).")
@format_option
@click.pass_obj
def rm(g: Globals, refs: tuple[str, ...], force: bool) -> None:
    """Remove containers and their layers."""
    removed = []
    with g.open() as svc:
        for r in refs:
            removed.append(svc.remove_container(r, force=force))
    emit(g, {"removed": removed}, lambda: print_lines(removed))


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("parent", required=False, metavar="[PARENT]")
@format_option
@click.pass_obj
def squash(g: Globals, ref: str, parent: str | None) -> None:
    """Make a new image with IMAGE's layers above PARENT (or all of them) merged into one; prints its ID."""
    with g.open() as svc:
        img = svc.squash_image(ref, parent)
    emit(g, {"Id": img.id}, lambda: click.echo(img.id))


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable."),
        click.option("-w", "--workdir", metavar="DIR", help="Working directory inside the container."),
        click.option("-u", "--user", metavar="USER[:GROUP]", help="User (name or uid), resolved in the image."),
        click.option("--network", type=click.Choice(["none", "host"]), default="none", show_default=True,
                     help="Network namespace: none (loopback only) or the host's."),
    ]):
        f = opt(f)
    return f


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image", metavar="IMAGE")
@click.argument("command", nargs=-1, metavar="[COMMAND [ARG...]]")
@click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits.")
@click.option("--name", metavar="NAME", help="A unique name for the container.")
@_run_options
@click.pass_obj
def run(g: Globals, image: str, command: tuple[str, ...], remove: bool, name: str | None, env: tuple[str, ...],
        workdir: str | None, user: str | None, network: str) -> None:
    """Run a command in a new container (through the OCI runtime, runc by default); exits with its code.

    Without root (or as root inside a user namespace) the container gets a user namespace whose root is
    the caller, plus the caller's /etc/subuid and /etc/subgid ranges when newuidmap/newgidmap exist.
    """
    with g.open() as svc:
        _, code = svc.run_container(image, list(command) or None, name=name, remove=remove, env=list(env),
                                    workdir=workdir, user=user, network=network)
    sys.exit(code)


@cli.command()
@click.argument("ref", metavar="CONTAINER")
@click.argument("directory", type=click.Path(file_okay=False), metavar="DIR")
@click.argument("command", nargs=-1, metavar="[COMMAND [ARG...]]")
@_run_options
@format_option
@click.pass_obj
def bundle(g: Globals, ref: str, directory: str, command: tuple[str, ...], env: tuple[str, ...],
           workdir: str | None, user: str | None, network: str) -> None:
    """Write an OCI runtime bundle for CONTAINER in DIR (config.json; root.path is the mounted container).

    The container stays mounted for the runtime; `lamina umount CONTAINER` afterwards.
    """
    with g.open() as svc:
        spec = svc.bundle(ref, directory, args=list(command) or None, env=list(env), workdir=workdir, user=user,
                          network=network)
    emit(g, spec, lambda: click.echo(os.path.abspath(directory)))

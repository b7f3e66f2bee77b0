"""Image commands: ``load``, ``save``, ``import``, ``images``, ``inspect``, ``history``, ``tag``, ``untag``, ``rmi``
``manifest inspect`` and ``copy``."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from lamina.cli.app import (
    Globals,
    Progress,
    ago,
    cli,
    emit,
    format_option,
    human,
    print_lines,
    print_table,
    to_platform,
)

if TYPE_CHECKING:
    from lamina.config import Config


@cli.command()
@click.option("-i", "--input", "path", required=True, type=click.Path(), metavar="PATH",
              help="docker-archive or OCI layout: a directory or a tar file (detected automatically).")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pick from an index (default: this host).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@format_option
@click.pass_obj
def load(g: Globals, path: str, platform: str | None, quiet: bool) -> None:
    """Load images from a docker-archive or an OCI image layout."""
    plat = to_platform(platform)
    progress = None if quiet else Progress()
    with g.open() as svc:
        loaded = svc.load_image(path, platform=plat, progress=progress)
        data = [{"Id": r.image.id, "Names": list(r.image.names)} for r in loaded]
        from lamina.formats.reference import parse_normalized

        lines = []
        for r in loaded:
            tags = [parse_normalized(n).familiar() for n in r.image.tags]
            lines += [f"Loaded image: {t}" for t in tags] or [f"Loaded image ID: {r.image.id}"]
    emit(g, data, lambda: print_lines(lines))


def _other_store(g: Globals, path: str, *, existing: bool) -> Config:
    """A store given by its root on the command line: its own driver (the one it was made with) and its own
    run root (the configured one for the configured root, else one under it named after the root); no
    additional image stores."""
    import dataclasses
    import hashlib
    from pathlib import Path

    from lamina.config import load_config
    from lamina.errors import StoreError

    base = load_config(g.config, driver=g.driver, root=g.root, runroot=g.runroot, image_store=g.image_store)
    root = Path(os.path.abspath(path))
    made = (root / "lamina.db").is_file()
    if existing and not made:
        raise StoreError(f"no lamina store at {path}")
    runroot = base.runroot if root == base.root else \
        base.runroot / "stores" / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    return dataclasses.replace(base, root=root, runroot=runroot, driver=None if made else base.driver,
                               additional_image_stores=(), image_store=base.image_store if root == base.root else None)


@cli.command(name="copy")
@click.argument("src", metavar="SRC-STORE", type=click.Path())
@click.argument("dest", metavar="DEST-STORE", type=click.Path())
@click.argument("refs", metavar="[IMAGE...]", nargs=-1)
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@format_option
@click.pass_obj
def copy_cmd(g: Globals, src: str, dest: str, refs: tuple[str, ...], quiet: bool) -> None:
    """Copy images (all of them when none is named) from one store to another, given by their root
    directories, without an archive between: the same IDs, names, manifests and blobs; layers the
    destination has are not applied again. Each store keeps its own driver (--driver: for a new DEST). SRC is
    only read, as an additional image store is."""
    from lamina.service import ImageService
    from lamina.store.kernel import Store

    progress = None if quiet else Progress()
    with ImageService(Store(_other_store(g, src, existing=True), shared=True)) as source, \
            ImageService.open(_other_store(g, dest, existing=False)) as target:
        copied = source.copy_images(target, list(refs), progress=progress)
        data = [{"Id": c.image.id, "Names": list(c.image.names), "LayersApplied": c.applied} for c in copied]
    emit(g, data, lambda: print_lines(
        f"Copied image {c.image.id.split(':')[-1][:12]}" + (f" ({', '.join(c.image.tags)})" if c.image.tags else "")
        for c in copied))


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(), metavar="PATH", help="Where to write.")
@click.option("--format", "archive_format", type=click.Choice(["docker-archive", "oci-dir", "oci-archive"]),
              default="docker-archive", show_default=True, help="Archive format.")
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.pass_obj
def save(g: Globals, output: str, archive_format: str, refs: tuple[str, ...]) -> None:
    """Save images as a docker-archive, an OCI layout directory or an OCI layout tar.

    A repository given without tag or digest saves every tagged image of it, under each of its tags.
    """
    with g.open() as svc:
        svc.export_image(list(refs), output, archive_format)
    emit(g, {"output": output, "format": archive_format}, lambda: None)


@cli.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("ref", required=False, metavar="[REFERENCE]")
@click.option("-c", "--change", "changes", multiple=True, metavar="INSTRUCTION",
              help="Dockerfile instruction to apply (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, WORKDIR, VOLUME, "
                   "STOPSIGNAL); repeatable.")
@click.option("-m", "--message", default="", help="Comment for the history entry.")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform recorded in the config (default: host).")
@format_option
@click.pass_obj
def import_(g: Globals, file: str, ref: str | None, changes: tuple[str, ...], message: str,
            platform: str | None) -> None:
    """Create a one-layer image from a root filesystem tarball (- for stdin); prints the image ID."""
    from lamina.errors import FormatError

    plat = to_platform(platform)
    with g.open() as svc:
        if file == "-":
            img = svc.import_image(sys.stdin.buffer, ref, changes=list(changes), message=message, platform=plat)
        else:
            try:
                f = open(file, "rb")  # noqa: SIM115 - closed below
            except OSError as e:
                raise FormatError(f"cannot open {file}: {e.strerror}") from e
            with f:
                img = svc.import_image(f, ref, changes=list(changes), message=message, platform=plat)
    emit(g, {"Id": img.id, "RepoTags": img.repo_tags}, lambda: click.echo(img.id))


def _filters(values: tuple[str, ...]) -> dict[str, list[str]]:
    from lamina.errors import ImageError

    out: dict[str, list[str]] = {}
    for v in values:
        key, eq, val = v.partition("=")
        if not eq or not key:
            raise ImageError(f"bad filter {v!r}: use key=value")
        out.setdefault(key, []).append(val)
    return out


@cli.command()
@click.option("-a", "--all", "all_", is_flag=True, help="Show intermediate images too.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="dangling=true|false, label=KEY[=VALUE], before=IMAGE, since=IMAGE, reference=PATTERN.")
@click.option("--digests", is_flag=True, help="Show digests.")
@click.option("-q", "--quiet", is_flag=True, help="Print image IDs only.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate IDs.")
@format_option
@click.pass_obj
def images(g: Globals, all_: bool, filters: tuple[str, ...], digests: bool, quiet: bool, no_trunc: bool) -> None:
    """List images."""
    with g.open() as svc:
        items = svc.images(_filters(filters), all=all_)

    def ident(i: str) -> str:
        return i if no_trunc else i.split(":", 1)[1][:12]

    if quiet and g.format == "table":
        print_lines(dict.fromkeys(ident(s.id) for s in items))
        return
    def table() -> None:
        import time

        rows = []
        shared = any(s.store for s in items)  # a column only when additional image stores contribute
        now = time.time()
        for s in items:
            tags = s.repo_tags or ["<none>:<none>"]
            dig = {d.split("@", 1)[0]: d.split("@", 1)[1] for d in s.repo_digests}
            for t in tags:
                repo, _, tag = t.rpartition(":")
                row = [repo, tag]
                if digests:
                    row.append(dig.get(repo, "<none>"))
                row += [ident(s.id), ago(s.created, now), human(s.size)] + ([s.store or "-"] if shared else [])
                rows.append(row)
        headers = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else []) + ["IMAGE ID", "CREATED", "SIZE"] \
            + (["STORE"] if shared else [])
        print_table(rows, headers)

    emit(g, [s.as_dict() for s in items] if g.format == "json" else None, table)


@cli.command()
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.pass_obj
def inspect(g: Globals, refs: tuple[str, ...]) -> None:
    """Show images' details as JSON."""
    import json

    with g.open() as svc:
        out = [svc.inspect_image(r) for r in refs]
    click.echo(json.dumps(out, indent=2))


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.option("--no-trunc", is_flag=True, help="Do not truncate output.")
@format_option
@click.pass_obj
def history(g: Globals, ref: str, no_trunc: bool) -> None:
    """Show the history of an image, newest first."""
    from lamina.images.transfer import parse_time

    with g.open() as svc:
        items = svc.image_history(ref)

    def cut(text: str, n: int) -> str:
        return text if no_trunc or len(text) <= n else text[: n - 3] + "..."

    rows = [[h["Id"] if no_trunc or h["Id"] == "<missing>" else h["Id"].split(":", 1)[1][:12],
             ago(parse_time(h["Created"])), cut(h["CreatedBy"], 45), human(h["Size"]), cut(h["Comment"], 30)]
            for h in items]
    emit(g, items, lambda: print_table(rows, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]))


@cli.command()
@click.argument("source", metavar="SOURCE")
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@format_option
@click.pass_obj
def tag(g: Globals, source: str, targets: tuple[str, ...]) -> None:
    """Give an image more names."""
    with g.open() as svc:
        names = [svc.tag_image(source, t) for t in targets]
    emit(g, {"names": names}, lambda: None)


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@format_option
@click.pass_obj
def untag(g: Globals, ref: str, names: tuple[str, ...]) -> None:
    """Remove names from an image; an image left without a name (and no children) is deleted."""
    out: list[dict[str, str]] = []
    with g.open() as svc:
        for n in names:
            out += svc.untag_image(ref, n)
    emit(g, out, lambda: print_lines(f"{k}: {v}" for d in out for k, v in d.items()))


@cli.command()
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True,
              help="Override soft conflicts: names in several repositories, stopped containers (the image then loses "
                   "only its names). Deleting an image with child images or running containers is still refused.")
@click.option("--no-prune", is_flag=True, help="Keep untagged parent images.")
@format_option
@click.pass_obj
def rmi(g: Globals, refs: tuple[str, ...], force: bool, no_prune: bool) -> None:
    """Remove images: by name untags (deleting the image with its last name), by ID deletes."""
    out: list[dict[str, str]] = []
    with g.open() as svc:
        for r in refs:
            out += svc.image_delete(r, force=force, prune=not no_prune)
    emit(g, out, lambda: print_lines(f"{k}: {v}" for d in out for k, v in d.items()))


@cli.group()
def image() -> None:
    """Manage images (prune); the other image verbs are top-level commands."""


@image.command("prune")
@click.option("-a", "--all", "all_", is_flag=True, help="Remove every image no container uses, not only untagged ones.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="until=DURATION|TIME (created before), label=KEY[=VALUE], label!=KEY[=VALUE]; repeatable.")
@click.option("-f", "--force", is_flag=True, help="Accepted for docker's scripts; lamina never asks.")
@format_option
@click.pass_obj
def image_prune(g: Globals, all_: bool, filters: tuple[str, ...], force: bool) -> None:
    """Remove images without a tag (with -a, every image) that no container uses; prints what went and the
    space reclaimed."""
    wanted = _filters(filters)
    if all_:
        wanted["dangling"] = ["false"]
    with g.open() as svc:
        report = svc.images_prune(wanted)
    emit(g, report.as_dict(), lambda: print_prune(report.deleted, report.reclaimed))


def print_prune(deleted: list[dict[str, str]], reclaimed: int) -> None:
    if deleted:
        click.echo("Deleted Images:")
        for entry in deleted:
            for k, v in entry.items():
                click.echo(f"{k.lower()}: {v}")
        click.echo("")
    click.echo(f"Total reclaimed space: {human(reclaimed)}")



@cli.group()
def manifest() -> None:
    """Image manifests as stored."""


@manifest.command("inspect")
@click.argument("ref", metavar="IMAGE")
@click.pass_obj
def manifest_inspect(g: Globals, ref: str) -> None:
    """Print the manifest an image came with, or the index it was selected from, exactly as stored.

    An image made here (commit, import) or loaded from a docker-archive has none until a save or push
    makes one.
    """
    with g.open() as svc:
        raw = svc.graph.target_bytes(ref)
    sys.stdout.buffer.write(raw)
    if sys.stdout.isatty() and not raw.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.buffer.flush()

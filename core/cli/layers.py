"""``lamina layers`` and the ``lamina layer`` group: add, export, rm, mount, umount and diff single layers."""

from __future__ import annotations

import os
import sys

import click

from lamina.cli.app import Globals, cli, emit, format_option, human, print_lines, print_table


@cli.command()
@click.option("-q", "--quiet", is_flag=True, help="Print ChainIDs only.")
@format_option
@click.pass_obj
def layers(g: Globals, quiet: bool) -> None:
    """List the committed layers."""
    from lamina.digest import short

    with g.open() as svc:
        items = svc.layers()
    if quiet and g.format == "table":
        for layer in items:
            click.echo(layer.chain_id)
        return
    emit(g, [x.as_dict() for x in items] if g.format == "json" else None, lambda: print_table(
        [[short(x.chain_id), short(x.diff_id), short(x.parent) if x.parent else "-", human(x.size),
          str(x.refs)] for x in items],
        ["CHAIN ID", "DIFF ID", "PARENT", "SIZE", "REFS"]))


@cli.group()
def layer() -> None:
    """Add, export and remove single layers."""


@layer.command("add")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--parent", metavar="CHAIN", help="ChainID (or unique prefix) of the parent layer.")
@click.option("--diff-id", metavar="DIGEST", help="Fail unless the uncompressed tar has this digest.")
@format_option
@click.pass_obj
def layer_add(g: Globals, file: str, parent: str | None, diff_id: str | None) -> None:
    """Register FILE (a tar, gzip/zstd/xz/bzip2 or plain; - for stdin) as a layer."""
    from lamina.digest import parse_digest
    from lamina.errors import FormatError

    if diff_id is not None:
        parse_digest(diff_id)
    with g.open() as svc:
        parent_chain = svc.get_layer(parent).chain_id if parent else None
        if file == "-":
            new = svc.register_layer(sys.stdin.buffer, parent_chain, expected_diff_id=diff_id)
        else:
            try:
                f = open(file, "rb")  # noqa: SIM115 - closed below; only the open itself is translated
            except OSError as e:
                raise FormatError(f"cannot open {file}: {e.strerror}") from e
            with f:
                new = svc.register_layer(f, parent_chain, expected_diff_id=diff_id)
    emit(g, new.as_dict(), lambda: click.echo(new.chain_id))


@layer.command("export")
@click.argument("ref", metavar="CHAIN")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file (- for stdout).")
@format_option
@click.pass_obj
def layer_export(g: Globals, ref: str, output: str) -> None:
    """Write the exact tar stream of a layer (its sha256 is the layer's DiffID)."""
    from lamina.errors import ExportError

    with g.open() as svc:
        stream = svc.export_layer(ref)
        if output == "-":
            out = sys.stdout.buffer
            while chunk := stream.read(1 << 20):
                out.write(chunk)
            out.flush()
            return
        tmp = f"{output}.lamina-tmp-{os.getpid()}"
        try:
            copy = getattr(stream, "copy_to", None)  # an exact stream: file bodies copied by the kernel
            if copy is not None:
                with open(tmp, "w+b", buffering=0) as raw:
                    copy(raw.fileno())
            else:
                with open(tmp, "wb") as f:
                    while chunk := stream.read(1 << 20):
                        f.write(chunk)
            os.replace(tmp, output)
        except OSError as e:
            raise ExportError(f"cannot write {output}: {e.strerror}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@layer.command("rm")
@click.argument("refs", metavar="CHAIN...", nargs=-1, required=True)
@format_option
@click.pass_obj
def layer_rm(g: Globals, refs: tuple[str, ...]) -> None:
    """Release a reference on each layer; a layer nothing else uses is deleted."""
    removed: list[str] = []
    with g.open() as svc:
        for ref in refs:
            removed.extend(svc.release_layer(ref))
    emit(g, {"removed": removed}, lambda: print_lines(f"removed {c}" for c in removed))


@layer.command("mount")
@click.argument("ref", metavar="CHAIN")
@format_option
@click.pass_obj
def layer_mount(g: Globals, ref: str) -> None:
    """Mount a layer's whole tree and print its path; it stays mounted until `layer umount`."""
    with g.open() as svc:
        path = svc.mount_layer(ref)
    emit(g, {"path": path}, lambda: click.echo(path))


@layer.command("umount")
@click.argument("ref", metavar="CHAIN")
@click.option("-f", "--force", is_flag=True, help="Drop every mount reference and unmount.")
@format_option
@click.pass_obj
def layer_umount(g: Globals, ref: str, force: bool) -> None:
    """Drop one mount reference on a layer; the last one unmounts it."""
    with g.open() as svc:
        left = svc.unmount_layer(ref, force=force)
    emit(g, {"mounts_left": left}, lambda: None)


@layer.command("diff")
@click.argument("ref", metavar="CHAIN")
@format_option
@click.pass_obj
def layer_diff(g: Globals, ref: str) -> None:
    """List what a layer adds (A), changes (C) and deletes (D) relative to its parent."""
    with g.open() as svc:
        changes = svc.layer_changes(ref)
    emit(g, [{"kind": c.kind, "path": c.path} for c in changes],
         lambda: print_lines(str(c) for c in changes))

"""The ``lamina`` command line: a thin click layer over :class:`lamina.ImageService`.

Heavy modules (the store, drivers, compression libraries) are imported inside the commands, so
``lamina --version`` and ``lamina --help`` stay fast. Errors print one line; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import click

from lamina import __version__

if TYPE_CHECKING:
    from lamina.service import ImageService


@dataclass
class Globals:
    config: str | None
    root: str | None
    runroot: str | None
    driver: str | None
    format: str
    debug: bool

    def open(self) -> ImageService:
        from lamina.service import ImageService

        return ImageService.open(config_path=self.config, driver=self.driver, root=self.root, runroot=self.runroot)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1000
    return str(n)


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    for r in [headers, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _lines(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def _emit(g: Globals, data: Any, table: Callable[[], None]) -> None:
    if g.format == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        table()


def format_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--format`` on a command too (``lamina info --format json``), overriding the global one."""

    def set_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None and isinstance(ctx.obj, Globals):
            ctx.obj.format = value

    return click.option("--format", "fmt_local", type=click.Choice(["table", "json"]), default=None,
                        expose_value=False, callback=set_format, help="Output format.")(f)


class LaminaGroup(click.Group):
    """Turns lamina's errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        from lamina.errors import LaminaError

        debug = "--debug" in sys.argv or os.environ.get("LAMINA_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except LaminaError as e:
            if debug:
                traceback.print_exc()
            _fail(e.message)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            sys.exit(141)
        except Exception as e:
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for details)", 2)


@click.group(cls=LaminaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lamina")
@click.option("--config", "config", metavar="FILE", help="Configuration file (default: $LAMINA_CONFIG, "
              "/etc/lamina/storage.toml, $XDG_CONFIG_HOME/lamina/storage.toml).")
@click.option("--root", metavar="DIR", help="Store root directory.")
@click.option("--runroot", metavar="DIR", help="Directory for volatile state (mount counts).")
@click.option("--driver", metavar="NAME", help="Storage driver (also $LAMINA_DRIVER).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, root: str | None, runroot: str | None, driver: str | None,
        fmt: str, debug: bool) -> None:
    """lamina: container image and layer storage with pluggable drivers."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    ctx.obj = Globals(config, root, runroot, driver, fmt, debug)


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
            "timings": svc.layer_store.recorded_timings(),
            "version": __version__,
        }

    def table() -> None:
        for k, v in status:
            click.echo(f"{k}: {v}")
        click.echo("Capabilities: " + ", ".join(k for k, v in caps.items() if v))
        click.echo(f"Disk usage: {_human(svc_usage)}")

    _emit(g, data, table)


@cli.command()
@format_option
@click.pass_obj
def drivers(g: Globals) -> None:
    """List the storage drivers installed, where they come from, whether they work here and what their
    probes found."""
    from lamina.config import load_config
    from lamina.errors import DriverUnsupported
    from lamina.plugins.discovery import discover

    cfg = load_config(g.config, driver=g.driver, root=g.root, runroot=g.runroot)
    cat = discover()
    rows: list[dict[str, Any]] = []
    for name, info_ in sorted(cat.drivers.items()):
        reason = ""
        details: list[tuple[str, str]] = []
        try:
            info_.cls.probe(cfg.root / name, cfg.options_for(name))
            ok = True
            details = info_.cls.probe_details(cfg.root / name, cfg.runroot / name, cfg.options_for(name))
        except DriverUnsupported as e:
            ok, reason = False, e.message
        rows.append({"name": name, "source": info_.source, "supported": ok, "reason": reason,
                     "description": info_.cls.description, "details": dict(details)})
    for b in cat.broken:
        rows.append({"name": ",".join(b.names) or "?", "source": b.source, "supported": False,
                     "reason": b.error, "description": "broken plugin"})

    def findings(r: dict[str, Any]) -> str:
        return str(r["reason"]) or "; ".join(f"{k}: {v}" for k, v in r.get("details", {}).items())

    _emit(g, rows, lambda: _table(
        [[r["name"], r["source"], "yes" if r["supported"] else "no", findings(r)] for r in rows],
        ["NAME", "SOURCE", "SUPPORTED", "WHY NOT / DETAILS"]))


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
    _emit(g, [x.as_dict() for x in items], lambda: _table(
        [[short(x.chain_id), short(x.diff_id), short(x.parent) if x.parent else "-", _human(x.size),
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
    _emit(g, new.as_dict(), lambda: click.echo(new.chain_id))


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
    _emit(g, {"removed": removed}, lambda: _lines(f"removed {c}" for c in removed))


@layer.command("mount")
@click.argument("ref", metavar="CHAIN")
@format_option
@click.pass_obj
def layer_mount(g: Globals, ref: str) -> None:
    """Mount a layer's whole tree and print its path; it stays mounted until `layer umount`."""
    with g.open() as svc:
        path = svc.mount_layer(ref)
    _emit(g, {"path": path}, lambda: click.echo(path))


@layer.command("umount")
@click.argument("ref", metavar="CHAIN")
@click.option("-f", "--force", is_flag=True, help="Drop every mount reference and unmount.")
@format_option
@click.pass_obj
def layer_umount(g: Globals, ref: str, force: bool) -> None:
    """Drop one mount reference on a layer; the last one unmounts it."""
    with g.open() as svc:
        left = svc.unmount_layer(ref, force=force)
    _emit(g, {"mounts_left": left}, lambda: None)


@layer.command("diff")
@click.argument("ref", metavar="CHAIN")
@format_option
@click.pass_obj
def layer_diff(g: Globals, ref: str) -> None:
    """List what a layer adds (A), changes (C) and deletes (D) relative to its parent."""
    with g.open() as svc:
        changes = svc.layer_changes(ref)
    _emit(g, [{"kind": c.kind, "path": c.path} for c in changes],
          lambda: _lines(str(c) for c in changes))


# -- images -----------------------------------------------------------------------------------------------
def _ago(ts: float | None) -> str:
    import time

    if ts is None:
        return "unknown"
    d = max(0.0, time.time() - ts)
    for unit, secs in (("years", 31536000), ("months", 2592000), ("weeks", 604800), ("days", 86400),
                       ("hours", 3600), ("minutes", 60)):
        if d >= 2 * secs:
            return f"{int(d // secs)} {unit} ago"
    return "About a minute ago" if d >= 60 else "Less than a minute ago"


def _platform(value: str | None) -> Any:
    if value is None:
        return None
    from lamina.formats.oci import parse_platform

    return parse_platform(value)


class _Progress:
    """Per-layer progress on a terminal (stderr); silent otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def __call__(self, ev: dict[str, Any]) -> None:
        if not self.tty or ev.get("event") != "layer":
            return
        from lamina.digest import short

        head = f"layer {ev['index']}/{ev['count']} {short(ev['diff_id'])}"
        status = ev.get("status")
        if status == "applying":
            total = ev.get("size")
            done = _human(int(ev.get("done", 0)))
            line = f"{head}: applying {done}" + (f" / {_human(total)}" if total else "")
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write("\r\x1b[2K" + f"{head}: {'already present' if status == 'exists' else 'done'}\n")
        sys.stderr.flush()


@cli.command()
@click.option("-i", "--input", "path", required=True, type=click.Path(), metavar="PATH",
              help="docker-archive or OCI layout: a directory or a tar file (detected automatically).")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pick from an index (default: this host).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@format_option
@click.pass_obj
def load(g: Globals, path: str, platform: str | None, quiet: bool) -> None:
    """Load images from a docker-archive or an OCI image layout."""
    plat = _platform(platform)
    progress = None if quiet else _Progress()
    with g.open() as svc:
        loaded = svc.load_image(path, platform=plat, progress=progress)
        data = [{"Id": r.image.id, "Names": list(r.image.names)} for r in loaded]
        from lamina.formats.reference import parse_normalized

        lines = []
        for r in loaded:
            tags = [parse_normalized(n).familiar() for n in r.image.tags]
            lines += [f"Loaded image: {t}" for t in tags] or [f"Loaded image ID: {r.image.id}"]
    _emit(g, data, lambda: _lines(lines))


@cli.command()
@click.option("-o", "--output", required=True, type=click.Path(), metavar="PATH", help="Where to write.")
@click.option("--format", "archive_format", type=click.Choice(["docker-archive", "oci-dir", "oci-archive"]),
              default="docker-archive", show_default=True, help="Archive format.")
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.pass_obj
def save(g: Globals, output: str, archive_format: str, refs: tuple[str, ...]) -> None:
    """Save images as a docker-archive, an OCI layout directory or an OCI layout tar."""
    with g.open() as svc:
        svc.export_image(list(refs), output, archive_format)
    _emit(g, {"output": output, "format": archive_format}, lambda: None)


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

    plat = _platform(platform)
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
    _emit(g, {"Id": img.id, "RepoTags": img.repo_tags}, lambda: click.echo(img.id))


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
        _lines(dict.fromkeys(ident(s.id) for s in items))
        return
    rows = []
    for s in items:
        tags = s.repo_tags or ["<none>:<none>"]
        dig = {d.split("@", 1)[0]: d.split("@", 1)[1] for d in s.repo_digests}
        for t in tags:
            repo, _, tag = t.rpartition(":")
            row = [repo, tag]
            if digests:
                row.append(dig.get(repo, "<none>"))
            row += [ident(s.id), _ago(s.created), _human(s.size)]
            rows.append(row)
    headers = ["REPOSITORY", "TAG"] + (["DIGEST"] if digests else []) + ["IMAGE ID", "CREATED", "SIZE"]
    _emit(g, [s.as_dict() for s in items], lambda: _table(rows, headers))


@cli.command()
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.pass_obj
def inspect(g: Globals, refs: tuple[str, ...]) -> None:
    """Show images' details as JSON."""
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
             _ago(parse_time(h["Created"])), cut(h["CreatedBy"], 45), _human(h["Size"]), cut(h["Comment"], 30)]
            for h in items]
    _emit(g, items, lambda: _table(rows, ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]))


@cli.command()
@click.argument("source", metavar="SOURCE")
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@format_option
@click.pass_obj
def tag(g: Globals, source: str, targets: tuple[str, ...]) -> None:
    """Give an image more names."""
    with g.open() as svc:
        names = [svc.tag_image(source, t) for t in targets]
    _emit(g, {"names": names}, lambda: None)


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
    _emit(g, out, lambda: _lines(f"{k}: {v}" for d in out for k, v in d.items()))


@cli.command()
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Remove an image referenced in several repositories.")
@click.option("--no-prune", is_flag=True, help="Keep untagged parent images.")
@format_option
@click.pass_obj
def rmi(g: Globals, refs: tuple[str, ...], force: bool, no_prune: bool) -> None:
    """Remove images: by name untags (deleting the image with its last name), by ID deletes."""
    out: list[dict[str, str]] = []
    with g.open() as svc:
        for r in refs:
            out += svc.image_delete(r, force=force, prune=not no_prune)
    _emit(g, out, lambda: _lines(f"{k}: {v}" for d in out for k, v in d.items()))


# -- containers -------------------------------------------------------------------------------------------
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
    _emit(g, c.as_dict(), lambda: click.echo(c.id))


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
            try:
                tags = svc.image_store.get(c.image_id).tags
            except Exception:  # an image removed with --force: show its ID
                tags = ()
            names[c.id] = parse_normalized(tags[0]).familiar() if tags else c.image_id.split(":")[1][:12]
    if quiet and g.format == "table":
        _lines(c.id if no_trunc else c.short_id for c in items)
        return

    def status(c: Any) -> str:
        return f"Exited ({c.exit_code})" if c.status == "exited" and c.exit_code is not None else c.status.title()

    _emit(g, [c.as_dict() for c in items], lambda: _table(
        [[c.id if no_trunc else c.short_id, names[c.id], _ago(c.created), status(c), c.name or ""] for c in items],
        ["CONTAINER ID", "IMAGE", "CREATED", "STATUS", "NAMES"]))


@cli.command("mount")
@click.argument("ref", metavar="CONTAINER")
@format_option
@click.pass_obj
def mount_(g: Globals, ref: str) -> None:
    """Mount a container's root filesystem and print its path; it stays mounted until `umount`."""
    with g.open() as svc:
        path = svc.mount(ref)
    _emit(g, {"path": path}, lambda: click.echo(path))


@cli.command("umount")
@click.argument("ref", metavar="CONTAINER")
@click.option("-f", "--force", is_flag=True, help="Drop every mount reference and unmount.")
@format_option
@click.pass_obj
def umount_(g: Globals, ref: str, force: bool) -> None:
    """Drop one mount reference on a container; the last one unmounts it."""
    with g.open() as svc:
        left = svc.unmount(ref, force=force)
    _emit(g, {"mounts_left": left}, lambda: None)


@cli.command("diff")
@click.argument("ref", metavar="CONTAINER")
@format_option
@click.pass_obj
def diff_(g: Globals, ref: str) -> None:
    """List what a container added (A), changed (C) and deleted (D) in its image."""
    with g.open() as svc:
        changes = svc.changes(ref)
    _emit(g, [{"kind": c.kind, "path": c.path} for c in changes], lambda: _lines(str(c) for c in changes))


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
    _emit(g, {"Id": img.id, "RepoTags": img.repo_tags}, lambda: click.echo(img.id))


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
    _emit(g, {"removed": removed}, lambda: _lines(removed))


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("parent", required=False, metavar="[PARENT]")
@format_option
@click.pass_obj
def squash(g: Globals, ref: str, parent: str | None) -> None:
    """Make a new image with IMAGE's layers above PARENT (or all of them) merged into one; prints its ID."""
    with g.open() as svc:
        img = svc.squash_image(ref, parent)
    _emit(g, {"Id": img.id}, lambda: click.echo(img.id))


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
    """Run a command in a new container (through the OCI runtime, runc by default); exits with its code."""
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
    _emit(g, spec, lambda: click.echo(os.path.abspath(directory)))


# -- registries -------------------------------------------------------------------------------------------
def _creds(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    from lamina.errors import LaminaError

    user, sep, password = value.partition(":")
    if not sep or not user:
        raise LaminaError("--creds must be USER:PASSWORD")
    return user, password


class _TlsVerify(click.ParamType):  # type: ignore[type-arg]
    name = "bool"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        self.fail(f"{value!r} is not true or false", param, ctx)


_TLS = _TlsVerify()


def _registry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--creds", metavar="USER:PASSWORD", help="Credentials for the registry.")(f)
    return _tls_option(
        "Require HTTPS with a valid certificate (default: yes, except loopback and [images] "
        "insecure_registries); --tls-verify=false allows plain HTTP."
    )(f)


def _tls_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--tls-verify``, ``--tls-verify=true`` or ``--tls-verify=false`` (podman's spelling)."""
    return click.option("--tls-verify", "tls_verify", type=_TLS, default=None, metavar="[=true|false]", help=help)


_TLS_COMMANDS = ("pull", "push", "login")


def _bare_tls_verify(args: list[str]) -> list[str]:
    """A bare ``--tls-verify`` (podman's spelling of true) of pull/push/login becomes ``--tls-verify=true``."""
    if not any(a in _TLS_COMMANDS for a in args):
        return args
    out: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        out.append("--tls-verify=true" if a == "--tls-verify" else a)
    return out


class _TransferProgress(_Progress):
    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("event") == "blob" and self.tty:
            from lamina.digest import short

            sys.stderr.write(f"blob {short(ev['digest'])}: {ev['status']}\n")
            return
        super().__call__(ev)


@cli.command()
@click.argument("name", metavar="IMAGE")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Platform to pull from an index (default: host).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_registry_options
@format_option
@click.pass_obj
def pull(g: Globals, name: str, platform: str | None, quiet: bool, tls_verify: bool | None, creds: str | None) -> None:
    """Pull an image from a registry (unqualified names try [images] registries in order); prints its ID."""
    with g.open() as svc:
        img = svc.pull_image(
            name,
            platform=_platform(platform),
            tls_verify=tls_verify,
            creds=_creds(creds),
            progress=None if quiet else _TransferProgress(),
        )
    _emit(g, {"Id": img.id, "RepoTags": img.repo_tags, "RepoDigests": img.repo_digests}, lambda: click.echo(img.id))


@cli.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("dest", required=False, metavar="[DESTINATION]")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@_registry_options
@format_option
@click.pass_obj
def push(g: Globals, ref: str, dest: str | None, quiet: bool, tls_verify: bool | None, creds: str | None) -> None:
    """Push an image to a registry (to DESTINATION, default its name); prints the manifest digest."""
    with g.open() as svc:
        digest = svc.push_image(
            ref, dest, tls_verify=tls_verify, creds=_creds(creds), progress=None if quiet else _TransferProgress()
        )
    _emit(g, {"digest": digest}, lambda: click.echo(digest))


@cli.command()
@click.argument("host", metavar="REGISTRY")
@click.option("-u", "--username", required=True, help="User name.")
@click.option("-p", "--password", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@_tls_option("See `lamina pull --help`.")
@click.pass_obj
def login(g: Globals, host: str, username: str, password: str | None, password_stdin: bool,
          tls_verify: bool | None) -> None:
    """Check credentials against a registry and store them for later pulls and pushes."""
    from lamina.errors import LaminaError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if password is None:
        if not sys.stdin.isatty():
            raise LaminaError("no password: use --password-stdin or --password")
        password = click.prompt("Password", hide_input=True)
    with g.open() as svc:
        svc.login(host, username, password, tls_verify=tls_verify)
    click.echo("Login Succeeded!")


@cli.command()
@click.argument("host", metavar="REGISTRY")
def logout(host: str) -> None:
    """Forget the credentials stored for a registry."""
    from lamina.errors import LaminaError
    from lamina.registry import auth

    if not auth.logout(host):
        raise LaminaError(f"not logged in to {host}")
    click.echo(f"Removed login credentials for {host}")


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = _bare_tls_verify(list(argv) if argv is not None else sys.argv[1:])
        cli.main(args=args, prog_name="lamina", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see 'lamina {e.ctx.command_path.partition(' ')[2]} --help')".replace("  ", " ") if e.ctx else ""
        _fail(f"{e.format_message()}{hint}", 2)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

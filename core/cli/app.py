"""The ``lamina`` click group, its global options and the helpers every command module shares.

Only :mod:`click` and the standard library's light modules are imported here; :mod:`json`,
:mod:`traceback` and everything of lamina's beyond ``__version__`` are imported where they are used.
"""

from __future__ import annotations

import os
import signal
import sys
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
    image_store: str | None = None

    def open(self, *, recover: bool = True) -> ImageService:
        from lamina.service import ImageService

        return ImageService.open(config_path=self.config, driver=self.driver, root=self.root, runroot=self.runroot,
                                 image_store=self.image_store, recover=recover)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command is, so that everything it started is undone on the way
    out (see :func:`stop_on_signals`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM stop the command: the first one raises :class:`Interrupted` in the main thread,
    and later ones are ignored while the command cleans up (SIGKILL still ends it at once; the next command
    then finishes off what it left)."""
    fired: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def interrupted(e: KeyboardInterrupt) -> NoReturn:
    """Exit as a command stopped by a signal does: one line, status 128 + the signal's number."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    fail(f"interrupted by {signal.Signals(signum).name}", 128 + signum)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.3g}{unit}"
        size /= 1000
    return str(n)


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in [headers, *rows]))  # one write: a listing of thousands of rows


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        click.echo(line)


def emit(g: Globals, data: Any, table: Callable[[], None]) -> None:
    if g.format == "json":
        click.echo(json_text(data))
    else:
        table()


class _NotPlain(Exception):
    """A value :func:`json_text` leaves to :func:`json.dumps`."""


def json_text(data: Any) -> str:
    """``json.dumps(data, indent=2, sort_keys=True)``, the same text, at about twice its speed: with an
    indent the standard library encodes in Python, one generator per container; here one function appends
    to a list and strings are escaped by the C escaper. A listing of ten thousand images is the case. A value
    other than dict (str keys), list, tuple, str, int, float, bool or None goes to :func:`json.dumps`."""
    import json
    from json.encoder import c_make_encoder as c_encoder  # type: ignore[attr-defined]
    from json.encoder import encode_basestring_ascii as escape

    out: list[str] = []
    put = out.append
    flat_encoders: dict[str, Callable[[Any, int], list[str]]] = {}
    flat = (str, int, float, type(None), bool)  # (floats: the C encoder writes them as json.dumps does)

    def encode(o: Any, indent: str) -> None:
        t = type(o)
        if t is dict:
            if not o:
                put("{}")
                return
            inner = indent + "  "
            if c_encoder is not None and all(type(v) in flat for v in o.values()) and \
                    all(type(k) is str for k in o):
                # every member on a line of its own: the C encoder's item separator does the indenting
                enc = flat_encoders.get(inner)
                if enc is None:
                    enc = flat_encoders[inner] = c_encoder(None, None, escape, None, ": ", ",\n" + inner,
                                                           True, False, True)
                put("{\n" + inner + "".join(enc(o, 0))[1:-1] + "\n" + indent + "}")
                return
            sep = "{\n" + inner
            for k in sorted(o):
                if type(k) is not str:
                    raise _NotPlain
                v = o[k]
                tv = type(v)
                if tv is str:  # (strings and ints inline: most of a listing)
                    put(sep + escape(k) + ": " + escape(v))
                elif tv is int:
                    put(sep + escape(k) + ": " + int.__repr__(v))
                else:
                    put(sep + escape(k) + ": ")
                    encode(v, inner)
                sep = ",\n" + inner
            put("\n" + indent + "}")
        elif t is list or t is tuple:
            if not o:
                put("[]")
                return
            inner = indent + "  "
            sep = "[\n" + inner
            for v in o:
                if type(v) is str:
                    put(sep + escape(v))
                else:
                    put(sep)
                    encode(v, inner)
                sep = ",\n" + inner
            put("\n" + indent + "]")
        elif t is str:
            put(escape(o))
        elif t is int:
            put(int.__repr__(o))
        elif o is None:
            put("null")
        elif o is True:
            put("true")
        elif o is False:
            put("false")
        elif t is float and o == o and o not in (float("inf"), float("-inf")):
            put(float.__repr__(o))
        else:
            raise _NotPlain

    try:
        encode(data, "")
    except _NotPlain:
        return json.dumps(data, indent=2, sort_keys=True)
    return "".join(out)


def format_option(f: Callable[..., Any], choices: Sequence[str] = ("table", "json")) -> Callable[..., Any]:
    """``--format`` on a command too (``lamina info --format json``), overriding the global one; a command may
    offer more ``choices`` than the global option's (``info --format prometheus``)."""

    def set_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None and isinstance(ctx.obj, Globals):
            ctx.obj.format = value

    return click.option("--format", "fmt_local", type=click.Choice(list(choices)), default=None,
                        expose_value=False, callback=set_format, help="Output format.")(f)


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago ``ts`` was, in docker's words; ``now``: the time to count from (default: the clock's)."""
    import time

    if ts is None:
        return "unknown"
    d = max(0.0, (time.time() if now is None else now) - ts)
    for unit, secs in (("years", 31536000), ("months", 2592000), ("weeks", 604800), ("days", 86400),
                       ("hours", 3600), ("minutes", 60)):
        if d >= 2 * secs:
            return f"{int(d // secs)} {unit} ago"
    return "About a minute ago" if d >= 60 else "Less than a minute ago"


def to_platform(value: str | None) -> Any:
    """The ``--platform OS/ARCH[/VARIANT]`` of a command, parsed; None when it was not given."""
    if value is None:
        return None
    from lamina.formats.oci import parse_platform

    return parse_platform(value)


_FINISHED = {"exists": "already present", "adopted": "used in place"}  # a layer's last status, as shown


class Progress:
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
            done = human(int(ev.get("done", 0)))
            line = f"{head}: applying {done}" + (f" / {human(total)}" if total else "")
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write("\r\x1b[2K" + f"{head}: {_FINISHED.get(str(status), 'done')}\n")
        sys.stderr.flush()


class LaminaGroup(click.Group):
    """Turns lamina's errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        from lamina.errors import LaminaError

        debug = "--debug" in sys.argv or os.environ.get("LAMINA_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except LaminaError as e:
            if debug:
                import traceback

                traceback.print_exc()
            fail(e.message)
        except KeyboardInterrupt as e:
            interrupted(e)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            sys.exit(141)
        except Exception as e:
            if debug:
                import traceback

                traceback.print_exc()
            from lamina.errors import shorten

            what = shorten(" ".join(str(e).split()))  # one bounded line, as for lamina's own errors
            fail(f"internal error: {type(e).__name__}: {what} (run with --debug for details)", 2)


@click.group(cls=LaminaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lamina")
@click.option("--config", "config", metavar="FILE", help="Configuration file (default: $LAMINA_CONFIG, "
              "/etc/lamina/storage.toml, $XDG_CONFIG_HOME/lamina/storage.toml).")
@click.option("--root", metavar="DIR", help="Store root directory.")
@click.option("--runroot", metavar="DIR", help="Directory for volatile state (mount counts, timings, events).")
@click.option("--image-store", metavar="DIR", help="Directory for image layers and blobs, apart from containers' "
              "layers in the root (a store made with one keeps it).")
@click.option("--driver", metavar="NAME", help="Storage driver (also $LAMINA_DRIVER).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, root: str | None, runroot: str | None, image_store: str | None,
        driver: str | None, fmt: str, debug: bool) -> None:
    """lamina: container image and layer storage with pluggable drivers."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    ctx.obj = Globals(config, root, runroot, driver, fmt, debug, image_store)

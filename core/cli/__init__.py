"""The ``lamina`` command line: a thin click layer over :class:`lamina.ImageService`.

One module per group of commands, each registering its commands on the click group when imported:

- :mod:`lamina.cli.app` -- the ``lamina`` group (global options, :class:`~lamina.cli.app.Globals`, error
  handling) and the helpers the command modules share (output formats, tables, sizes, ages, progress);
- :mod:`lamina.cli.system` -- ``info``, ``drivers`` and the ``system`` group (``check``, ``df``, ``prune``,
  ``migrate``);
- :mod:`lamina.cli.layers` -- ``layers`` and the ``layer`` group (``add``, ``export``, ``rm``, ``mount``,
  ``umount``, ``diff``);
- :mod:`lamina.cli.images` -- ``load``, ``save``, ``import``, ``images``, ``inspect``, ``history``, ``tag``,
  ``untag``, ``rmi``, ``manifest inspect``, ``copy`` and the ``image`` group (``prune``);
- :mod:`lamina.cli.containers` -- ``create``, ``ps``, ``mount``, ``umount``, ``diff``, ``commit``, ``rm``,
  ``squash``, ``run``, ``bundle``;
- :mod:`lamina.cli.registry` -- ``pull``, ``push``, ``login``, ``logout``;
- :mod:`lamina.cli.events` -- ``events``;
- this module -- :func:`main`, the entry point (``lamina`` and ``python -m lamina``).

Heavy modules (the store, drivers, compression libraries) are imported inside the commands, so
``lamina --version`` and ``lamina --help`` stay fast. Errors print one line; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from lamina.cli import containers, events, images, layers, registry, system  # noqa: F401 - registers the commands
from lamina.cli.app import cli, fail, interrupted, stop_on_signals

__all__ = ["cli", "main"]

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


def main(argv: Sequence[str] | None = None) -> None:
    stop_on_signals()
    try:
        args = _bare_tls_verify(list(argv) if argv is not None else sys.argv[1:])
        cli.main(args=args, prog_name="lamina", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see 'lamina {e.ctx.command_path.partition(' ')[2]} --help')".replace("  ", " ") if e.ctx else ""
        fail(f"{e.format_message()}{hint}", 2)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # click turns one met outside a command into Abort
            interrupted(e.__context__)
        fail("aborted", 1)
    except KeyboardInterrupt as e:
        interrupted(e)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()

"""Running a ``lamina`` command line: every command module registered on the click group, a bare
``--tls-verify`` made explicit, click's errors turned into one line, SIGINT and SIGTERM into a clean stop."""


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


def write_help() -> None:
    """Store ``lamina --help`` as click renders it (``python -m lamina.cli.entry --write-help``)."""
    import contextlib
    import io
    from pathlib import Path

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    module = Path(__file__).with_name("_help.py")
    head = module.read_text().split("TEXT = ", 1)[0]
    module.write_text(head + "TEXT = " + "'''" + out.getvalue() + "'''" + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write-help"]:
    write_help()

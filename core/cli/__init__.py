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
- :mod:`lamina.cli.entry` -- what runs a command line: click's errors turned into one line, signals;
- this module -- :func:`main`, the entry point (``lamina`` and ``python -m lamina``), which answers
  ``--version`` before anything else is imported.

Heavy modules (the store, drivers, compression libraries) are imported inside the commands, so
``lamina --version`` and ``lamina --help`` stay fast. Errors print one line; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["cli", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lamina`` command. ``lamina --version`` answers here, importing neither click nor the store."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if args == ["--version"]:
        from lamina import __version__

        sys.stdout.write(f"lamina, version {__version__}\n")
        return
    if args in (["--help"], ["-h"]) and _columns() >= 80:  # click's rendering, stored (lamina.cli._help)
        from lamina.cli._help import TEXT

        sys.stdout.write(TEXT)
        return
    from lamina.cli.entry import main as run

    run(args)


def _columns() -> int:
    """The width click formats help for, as :func:`shutil.get_terminal_size` finds it (80 when unknown)."""
    import os

    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (OSError, ValueError):
        return 80


def __getattr__(name: str) -> Any:
    if name == "cli":  # the click group, with every command registered
        from lamina.cli.entry import cli

        return cli
    raise AttributeError(f"module 'lamina.cli' has no attribute {name!r}")

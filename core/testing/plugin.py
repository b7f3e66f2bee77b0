"""pytest plugin (entry point ``pytest11``): the ``--lamina-driver`` option for the conformance kit."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lamina")
    group.addoption("--lamina-driver", action="store", default=None, metavar="NAME",
                    help="run lamina.testing's conformance kit against this storage driver")

"""The differential test: random layer stacks on vfs, overlay and tarball against the reference model of
the OCI rules (``fidelity_model``): files, directories, symlinks that later layers write through, hard
links, whiteouts and opaque markers in every order, xattrs, modes and owners, with names from a
three-letter alphabet so they collide. Every merged tree must equal the model's, vfs and overlay must
report the same changes, and every driver must accept or refuse each layer as the model does.

A derandomized sample runs here (``LAMINA_FIDELITY_EXAMPLES``, default 300); ``bench/fidelity.py`` runs
more, from any seed.
"""

from __future__ import annotations

import os

import pytest
from fidelity_model import STACKS, Op, check_stack
from hypothesis import HealthCheck, given, settings

from lamina.testing import require_root

EXAMPLES = int(os.environ.get("LAMINA_FIDELITY_EXAMPLES", "300"))


@pytest.mark.root
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(stack=STACKS)
def test_random_stacks_agree_with_the_rules_on_every_driver(stack: list[list[Op]]) -> None:
    require_root()  # overlay mounts
    check_stack(stack)

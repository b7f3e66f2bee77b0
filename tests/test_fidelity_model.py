"""The reference model of how layers make a tree (``fidelity_model``), on the OCI spec's cases: the
model ``bench/fidelity.py`` compares the drivers with must itself be right."""

from __future__ import annotations

import pytest
from fidelity_model import Invalid, Op, apply_layer


def test_model_follows_the_spec_examples() -> None:
    """The model itself, on the cases the issue lists (so a wrong model cannot pass the drivers)."""
    lower = apply_layer({}, [Op("dir", "a"), Op("dir", "a/b"), Op("dir", "a/b/c"), Op("file", "a/b/c/bar")])
    # an opaque marker after the layer's own entries still hides only the lower ones
    up = apply_layer(lower, [Op("dir", "a"), Op("dir", "a/b"), Op("dir", "a/b/c"), Op("file", "a/b/c/foo"),
                             Op("opaque", "a")])
    assert "a/b/c/foo" in up and "a/b/c/bar" not in up
    # a whiteout never hides the same layer's entry
    assert "foo" in apply_layer({}, [Op("file", "foo"), Op("whiteout", "foo")])
    # writing below a lower symlink lands at its target
    usr = apply_layer({}, [Op("dir", "usr"), Op("dir", "usr/lib"), Op("symlink", "lib", target="usr/lib")])
    up = apply_layer(usr, [Op("dir", "lib/systemd"), Op("file", "lib/systemd/a.service")])
    assert "usr/lib/systemd/a.service" in up and up["lib"].kind == "symlink"
    with pytest.raises(Invalid):
        apply_layer({}, [Op("file", "f"), Op("file", "f/g")])

"""lamina.testing: the conformance kit every storage driver must pass.

Use it from a driver package's tests in one of two ways::

    # tests/test_conformance.py
    from lamina.testing import DriverConformance

    class TestMyDriver(DriverConformance):
        driver = "mydriver"            # the name your driver registers

or, with nothing to write, ``pytest --pyargs lamina.testing --lamina-driver mydriver``.

Checks that need a capability the driver does not claim (mounting, read-write layers) skip with that
reason; checks that need root skip when not root -- except under ``CI=true``, where such a skip fails.
"""

from lamina.testing.helpers import TarBuilder, require_root, require_tool, tree_snapshot
from lamina.testing.kit import DriverConformance

__all__ = ["DriverConformance", "TarBuilder", "require_root", "require_tool", "tree_snapshot"]

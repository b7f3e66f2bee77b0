"""The conformance kit every lamina driver must pass, run against this one."""

from __future__ import annotations

from lamina.testing import DriverConformance


class TestHardlink(DriverConformance):
    driver = "hardlink"


class TestHardlinkCopyBelow(DriverConformance):
    """The kit again with every small file copied instead of linked (the ``copy_below`` option)."""

    driver = "hardlink"
    driver_options = {"copy_below": 4096}

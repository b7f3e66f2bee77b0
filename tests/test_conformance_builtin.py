"""The conformance kit against every built-in driver."""

from lamina.testing import DriverConformance


class TestVfs(DriverConformance):
    driver = "vfs"


class TestTarball(DriverConformance):
    driver = "tarball"


class TestOverlay(DriverConformance):
    driver = "overlay"

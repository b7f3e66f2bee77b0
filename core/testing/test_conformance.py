"""Collected by ``pytest --pyargs lamina.testing --lamina-driver NAME``."""

from __future__ import annotations

import pytest

from lamina.testing.kit import DriverConformance


class TestConformance(DriverConformance):
    @pytest.fixture
    def lamina_driver(self, request: pytest.FixtureRequest) -> str:
        name = request.config.getoption("--lamina-driver", default=None)
        if not name:
            pytest.skip("pass --lamina-driver NAME to run the conformance kit")
        return str(name)

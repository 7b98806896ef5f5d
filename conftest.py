"""Shared pytest set-up for the tests and the doctests of agentguard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts with structlog unconfigured (``capture_logs`` leaves it configured),
    so agentguard's events go to stdlib logging unless a test captures them."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()

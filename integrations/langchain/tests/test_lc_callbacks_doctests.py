"""The docstring examples of the callback handlers, the middleware and the event drivers run
(the package is not in the doctest paths of the root configuration)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["_callbacks", "_middleware"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"agentguard_langchain.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

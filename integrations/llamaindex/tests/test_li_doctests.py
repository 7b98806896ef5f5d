"""The docstring examples of agentguard_llamaindex run (the package is not in the doctest
paths of the root configuration)."""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Iterator

import pytest
from li_support import clean_llamaindex_state


@pytest.fixture(autouse=True)
def _detach_instrumentation() -> Iterator[None]:
    yield from clean_llamaindex_state()


MODULES = ["_common", "_handler", "_llm", "_agent", "testing"]


@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"agentguard_llamaindex.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

"""Every LlamaIndex test ends by detaching the handlers it attached and collecting what
LlamaIndex leaves to the garbage collector (see :func:`li_support.clean_llamaindex_state`), so
a leaked aiosqlite connection or event loop never warns inside a later, unrelated test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from li_support import clean_llamaindex_state


@pytest.fixture(autouse=True)
def _clean_llamaindex_state() -> Iterator[None]:
    yield from clean_llamaindex_state()

"""examples/llamaindex_rag.py is a real use case: run it and check what it claims."""

from __future__ import annotations

import re
import runpy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from llama_index.core.schema import MetadataMode

import agentguard as ag

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "llamaindex_rag.py"


def test_the_rag_example_trims_to_budget_and_reports_the_spend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out: dict[str, Any] = runpy.run_path(str(EXAMPLE))["main"]()
    printed = capsys.readouterr().out
    task, response, trim = out["task"], out["response"], out["trim"]

    kept = response.source_nodes
    sources = [n.node.metadata["source"] for n in kept]
    assert len(out["retrieved"]) == 10
    # one copy of the refunds article is kept; its exact copy and its revision are dropped
    assert sum(s.startswith("help/refunds") for s in sources) == 1
    assert "help/returns" in sources and "help/exchanges" in sources
    (cut,) = [n for n in kept if n.node.metadata.get("agentguard_truncated")]
    assert cut.node.metadata["source"] == "help/exchanges"
    counter = ag.counter_for("gpt-4o-mini")
    assert sum(counter.count(n.node.get_content(MetadataMode.LLM)) for n in kept) <= 240

    assert trim.attrs["budget_tokens"] == 240
    assert trim.attrs["chunks_in"] == 10
    assert trim.attrs["chunks_kept"] == len(kept)
    assert trim.attrs["tokens_saved"] > 300
    assert trim.attrs["saved_usd"] == trim.attrs["tokens_saved"] * Decimal("0.15") / 10**6
    assert task.saved_usd == trim.attrs["saved_usd"]

    # one LLM call, charged at gpt-4o-mini's prices for the tokens it reported
    assert task.model_calls == 1
    usage = task.usage
    assert (
        task.cost_usd
        == (usage.input_tokens * Decimal("0.15") + usage.output_tokens * Decimal("0.60")) / 10**6
    )
    assert usage.input_tokens < 450  # the trimmed context, not the ~650 tokens retrieved

    assert re.search(r"help/exchanges +cut", printed)
    assert f"{trim.attrs['tokens_saved']} saved" in printed
    assert f"spend: ${task.cost_usd}" in printed

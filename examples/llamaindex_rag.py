"""Keep a RAG query engine's context inside a token budget with TokenBudgetPostprocessor.

A help-centre assistant answers a question from a ``VectorStoreIndex`` of 14 articles. The
retriever returns its 10 best matches, ~570 tokens with their ``source`` headers, but the
policy allows 240 tokens of context per question: ``TokenBudgetPostprocessor`` drops the
duplicate and the near-duplicate article, keeps the best that fit and cuts the last one at a
sentence end (the 240 tokens cover each node's ``source: ...`` header too, as the LLM reads
it). The guard records the trim (tokens and dollars saved) and meters the LLM call
(``BudgetedLLM``), so the printout shows what was trimmed and what the question cost.

Offline: a hashed n-gram embedding (``HashingEmbedding``) stands in for an embedding model (use
``OpenAIEmbedding()`` or any other in production) and a scripted LLM for the provider.

Run: ``.venv/bin/python examples/llamaindex_rag.py``
"""

from __future__ import annotations

from typing import Any

from llama_index.core import Document, VectorStoreIndex

import agentguard as ag
from agentguard_llamaindex import BudgetedLLM, TokenBudgetPostprocessor
from agentguard_llamaindex.testing import HashingEmbedding, ScriptedLLM

MODEL = "gpt-4o-mini"
QUESTION = "How long does a refund take after I return an order?"

REFUNDS = (
    "Refunds are issued to the original payment method once the returned order reaches our "
    "warehouse and passes inspection. Inspection takes up to two business days. Card refunds "
    "then take three to five business days to appear on a statement, bank transfers up to "
    "seven. Store credit is available immediately after inspection. You receive an email at "
    "each step, with the refund amount and the reference to quote if you contact support."
)
ARTICLES = {
    "refunds": REFUNDS,
    "refunds-2023": REFUNDS + " This page was updated in March 2023.",
    "refunds-mirror": REFUNDS,
    "returns": (
        "You can return most items within 30 days of delivery. Start a return from the order "
        "page, print the prepaid label and drop the parcel at any partner point. Items must be "
        "unused and in their original packaging. Returns of opened software, gift cards and "
        "personalised items are not accepted. Once the parcel is scanned, the return appears "
        "as in transit on the order page and the refund process starts when it arrives."
    ),
    "exchanges": (
        "To exchange an item for another size or colour, start a return and place a new order: "
        "this is the fastest way to get the new item. If the price differs, the difference is "
        "refunded or charged when the returned order is inspected. Exchanges of items bought "
        "on sale are treated like any other return and refund."
    ),
    "damaged": (
        "If an order arrives damaged, report it within 14 days with a photo of the item and "
        "the packaging. We send a replacement at no cost, or refund the order in full if the "
        "item is out of stock. You do not need to return a damaged item unless we ask for it."
    ),
    "shipping": (
        "Standard shipping takes two to four business days, express shipping one business day "
        "for orders placed before 2 pm. Orders over 50 euros ship free. Tracking links are "
        "emailed when the parcel leaves the warehouse."
    ),
    "payment": (
        "We accept cards, bank transfers and gift cards. Card payments are authorised when "
        "you order and captured when the order ships. Bank transfers must arrive within five "
        "days or the order is cancelled and any amount received is refunded."
    ),
    "gift-cards": (
        "Gift cards are valid for two years and can pay for any order, in full or in part. "
        "They cannot be refunded or exchanged for cash. A lost gift card can be blocked and "
        "reissued if you have the order number of its purchase."
    ),
    "accounts": (
        "You can change your email address and password from the account page. Deleting an "
        "account removes your order history after any open return or refund is completed."
    ),
    "warranty": (
        "Electronics carry a two-year warranty against manufacturing defects. Contact support "
        "with the order number; we arrange a repair, a replacement or a refund if neither is "
        "possible within 30 days."
    ),
    "privacy": (
        "We keep order data for as long as the law requires for invoices and warranty claims. "
        "You can download or delete your personal data from the account page at any time."
    ),
    "stores": (
        "Our stores in Lyon, Porto and Ghent accept returns of online orders. The store "
        "inspects the item on the spot, so the refund starts the same day."
    ),
    "newsletter": (
        "The newsletter comes once a week with new arrivals and offers. Unsubscribe with the "
        "link at the bottom of any issue."
    ),
}


def main() -> dict[str, Any]:
    guard = ag.Guard(
        ag.Policy(max_cost_usd="0.01", context_budget_tokens=240, max_output_tokens=200),
        traces="memory",
    )
    docs = [Document(text=t, metadata={"source": f"help/{k}"}) for k, t in ARTICLES.items()]
    index = VectorStoreIndex.from_documents(docs, embed_model=HashingEmbedding())
    answer = "Refunds reach your card three to five business days after inspection."
    llm = BudgetedLLM(guard=guard, llm=ScriptedLLM(model=MODEL, replies=[answer]))
    engine = index.as_query_engine(
        llm=llm,
        similarity_top_k=10,
        node_postprocessors=[TokenBudgetPostprocessor(guard=guard, model=MODEL)],
    )
    retrieved = index.as_retriever(similarity_top_k=10).retrieve(QUESTION)

    with guard.task("help-42", feature="help-centre") as task:
        response = engine.query(QUESTION)

    (trim,) = [s for s in guard.sink.spans if s.kind == "trim"]  # type: ignore[attr-defined]
    kept = {n.node.node_id: n for n in response.source_nodes}
    print(f"Q: {QUESTION}\nA: {response}\n")
    print(f"retrieved {len(retrieved)} articles, kept {len(kept)}:")
    for n in retrieved:
        mine = kept.get(n.node.node_id)
        state = "dropped"
        if mine is not None:
            state = "cut" if mine.node.metadata.get("agentguard_truncated") else "kept"
        print(f"  {n.score:5.3f}  {n.node.metadata['source']:<20} {state}")
    print(
        f"context: {trim.attrs['tokens_kept']} of {trim.attrs['tokens_in']} tokens kept, "
        f"{trim.attrs['tokens_saved']} saved (${trim.attrs['saved_usd']:.8f} of input)"
    )
    print(
        f"spend: ${task.cost_usd} for {task.model_calls} call(s), "
        f"{task.usage.input_tokens} input + {task.usage.output_tokens} output tokens"
    )
    return {"task": task, "response": response, "retrieved": retrieved, "trim": trim}


if __name__ == "__main__":
    main()

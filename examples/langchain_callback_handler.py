"""Meter and cap any LangChain chain with one callback handler.

A support FAQ chain (prompt | model | parser) answers a batch of questions for one team under
a small daily team budget. ``AgentGuardCallbackHandler`` meters every call (cache tokens
included), charges each question to its own task, and stops the batch cleanly once the team's
budget is spent. Offline: a scripted model stands in for the provider.

Run: ``.venv/bin/python examples/langchain_callback_handler.py``
"""

from __future__ import annotations

from decimal import Decimal

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import agentguard as ag
from agentguard_langchain import AgentGuardCallbackHandler
from agentguard_langchain.testing import ScriptedChatModel

QUESTIONS = [f"Question {i}: how do I change the delivery address of my order?" for i in range(40)]


def main() -> dict[str, object]:
    guard = ag.Guard(
        ag.Policy(
            max_cost_usd="0.01",  # per question
            budgets=[ag.Budget(scope="team", max_cost_usd="0.002", window="day")],
        ),
        traces="memory",
    )
    model = ScriptedChatModel(model_name="gpt-4o-mini", reply_tokens=120, cached_fraction=0.5)
    chain = (
        ChatPromptTemplate.from_messages(
            [("system", "You answer shop FAQs in two sentences."), ("user", "{q}")]
        )
        | model.bind(max_tokens=150)
        | StrOutputParser()
    )
    answered = 0
    spent = Decimal(0)
    for i, q in enumerate(QUESTIONS):
        handler = AgentGuardCallbackHandler(guard, task_id=f"faq-{i}", tags={"team": "cx"})
        try:
            chain.invoke({"q": q}, config={"callbacks": [handler]})
        except ag.BudgetExceeded as exc:
            print(f"stopped at question {i}: {exc}")
            break
        answered += 1
    for rec in guard.sink.tasks:  # type: ignore[attr-defined]
        spent += rec.cost_usd or 0
    print(f"answered {answered} questions for ${spent} (team budget $0.002/day)")
    return {"answered": answered, "spent": spent, "guard": guard}


if __name__ == "__main__":
    main()

"""A scripted LlamaIndex LLM for the RAG tests: reranks and answers from what it is sent.

``ScriptedRagLLM`` is a real ``CustomLLM`` (a completion model, as LlamaIndex's ``MockLLM``)
that behaves like a provider without a network:

* asked to pick documents (``LLMRerank``'s choice-select prompt), it scores each numbered
  document by the question's word stems it contains and answers ``Doc: n, Relevance: r`` lines,
  best first, leaving out documents that share nothing with the question;
* asked a question over a context (the query engine's QA prompt), it answers with the context
  sentence that shares the most stems with the question;
* it reports OpenAI-shaped usage in ``raw["usage"]``: prompt tokens counted with the model's
  tokenizer, completion tokens of the answer, which is cut at the call's ``max_tokens``;
* inside an agentguard task it drives the core event API as an adapter does (as
  ``agentguard.testing.ScriptedModel`` does): ``start_model_call`` before, ``end(usage)`` after,
  so the task's spend is the price of exactly the tokens it was sent and wrote.

Every call is kept in ``calls``: the prompt, the reply and the usage reported.
"""

from __future__ import annotations

import re
from typing import Any

from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

import agentguard as ag
from agentguard_llamaindex.testing import features

_DOCUMENT = re.compile(r"^Document (\d+):\n", re.MULTILINE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]")
_RERANK_MARK = "Respond with the numbers of the documents"


def _stems(text: str) -> set[str]:
    return {f for f in features(text) if f.startswith("w:")}


def rerank_reply(prompt: str) -> str:
    """Answer an ``LLMRerank`` choice-select prompt: relevance 1-10 by shared stems."""
    body = prompt.rsplit("Let's try this now:", 1)[-1]
    context, _, question = body.rpartition("\nQuestion: ")
    wanted = _stems(question.split("\nAnswer:", 1)[0])
    marks = list(_DOCUMENT.finditer(context))
    scored: list[tuple[int, int]] = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(context)
        shared = len(wanted & _stems(context[mark.end() : end]))
        if shared:
            scored.append((shared, int(mark.group(1))))
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    top = scored[0][0] if scored else 1
    return "\n".join(f"Doc: {n}, Relevance: {max(1, round(10 * s / top))}" for s, n in scored)


def answer_reply(prompt: str) -> str:
    """Answer a QA prompt with the context sentence sharing the most stems with the query."""
    context, _, query = prompt.rpartition("Query: ")
    wanted = _stems(query.split("\n", 1)[0])
    best, best_shared = "I cannot tell from the context.", 0
    for sentence in _SENTENCE.findall(context):
        shared = len(wanted & _stems(sentence))
        if shared > best_shared:
            best, best_shared = sentence.strip(), shared
    return best


class ScriptedRagLLM(CustomLLM):
    """A completion model that reranks and answers from its prompt (see the module docstring).

    Example:
        >>> llm = ScriptedRagLLM()
        >>> llm.complete("Beans brown when roasted. Tea is green.\\nQuery: roasted beans?").text
        'Beans brown when roasted.'
        >>> llm.last_usage["prompt_tokens"] > 0
        True
    """

    model: str = "gpt-4o-mini"
    context_window: int = 128_000
    max_tokens: int | None = None

    _calls: list[tuple[str, str, dict[str, int]]] = PrivateAttr(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "ScriptedRagLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_tokens or 256,
            is_chat_model=False,
            model_name=self.model,
        )

    @property
    def calls(self) -> list[tuple[str, str, dict[str, int]]]:
        """Every call, in order: (prompt, reply, usage reported in the OpenAI shape)."""
        return self._calls

    @property
    def prompts(self) -> list[str]:
        """Every prompt received, in order."""
        return [prompt for prompt, _, _ in self._calls]

    @property
    def last_usage(self) -> dict[str, int]:
        """The usage reported for the last call."""
        return self._calls[-1][2]

    def _reply(self, prompt: str, max_tokens: int | None) -> tuple[str, dict[str, int]]:
        text = rerank_reply(prompt) if _RERANK_MARK in prompt else answer_reply(prompt)
        counter = ag.counter_for(self.model)
        if max_tokens is not None:
            tokens = counter.encode(text)
            if len(tokens) > max_tokens:
                text = counter.decode(tokens[:max_tokens])
        sent, wrote = counter.count(prompt), counter.count(text)
        return text, {
            "prompt_tokens": sent,
            "completion_tokens": wrote,
            "total_tokens": sent + wrote,
        }

    def _call(self, prompt: str) -> CompletionResponse:
        task = ag.current_task()
        if task is None:
            text, usage = self._reply(prompt, self.max_tokens)
        else:
            call = task.start_model_call(
                self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=self.max_tokens,
            )
            try:
                text, usage = self._reply(prompt, call.max_tokens)
            except BaseException as exc:
                call.fail(exc)
                raise
            call.end(usage, output_text=text)
        self._calls.append((prompt, text, usage))
        return CompletionResponse(text=text, raw={"model": self.model, "usage": usage})

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._call(prompt)

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        response = self._call(prompt)

        def gen() -> CompletionResponseGen:
            yield response

        return gen()

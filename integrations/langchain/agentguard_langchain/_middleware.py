"""``AgentGuardMiddleware``: agentguard inside ``langchain.agents.create_agent``.

The middleware translates the agent loop into the task's event API and the guard's decisions
back into agent actions; it holds no budget arithmetic of its own:

==========================  ================================================================
guard decision              what the agent does
==========================  ================================================================
``allow``                   the model call goes ahead with ``max_tokens`` bound
``downgrade``               the call goes to the cheaper model mapped to the rung's id
                            (``request.override(model=...)``)
``finish``                  one last call — the finish model, ``tool_choice="none"``, the final
                            answer's output cap — then the run ends (the final ``AIMessage`` has
                            no tool calls and carries a note saying the budget ended the run)
``block`` (tool)            the tool does not run; the model gets an error ``ToolMessage``
``stop``                    ``BudgetExceeded`` propagates out of ``invoke`` (``exit_behavior=
                            "error"``), or the run ends with an ``AIMessage`` saying why
                            (``"end"``)
==========================  ================================================================
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, NotRequired

from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    PrivateStateAttr,
)
from langchain.agents.structured_output import ProviderStrategy
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.channels.untracked_value import UntrackedValue
from langgraph.errors import GraphBubbleUp
from langgraph.types import Command

from agentguard import BudgetExceeded, InvalidUsage, PolicyError, current_task
from agentguard.adapter import NO_KW, Steps, adrive, drive
from agentguard_langchain._common import metered_here, output_cap, usage_of

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.runtime import Runtime

    from agentguard import Guard, ModelCall, Policy, Task, ToolCall

__all__ = ["DEFAULT_FINISH_MESSAGE", "AgentGuardMiddleware", "AgentGuardState"]

_log = logging.getLogger("agentguard")

#: The note added to the final answer of a run the budget ended (``{reason}``, ``{limit}``).
DEFAULT_FINISH_MESSAGE: Final = "[agentguard: the run's budget ended the run here — {reason}]"
_STOP_MESSAGE = "[agentguard: the run's budget stopped the run — {error}]"
_RUN_KEY = "agentguard_run"
_CLOSED_KEPT = 256  # recently closed runs remembered, for a retry that comes after an error


class AgentGuardState(AgentState[Any]):
    """Agent state with the middleware's private run key (not checkpointed, not in output)."""

    agentguard_run: NotRequired[Annotated[str, UntrackedValue, PrivateStateAttr]]


@dataclass(slots=True)
class _Run:
    """One agent run and the task it charges."""

    task: Task
    owned: bool  # opened by the middleware (closed by it) or the user's current task
    key: str
    final_done: bool = False  # the graceful final call was made
    after_final: int = 0
    stopped: BudgetExceeded | None = None  # a stop ended the run (exit_behavior="end")
    closed_on_error: bool = False
    warned: bool = False
    checked: set[str] = field(default_factory=set)
    model_id: str | None = None  # the model of the run's last call (tokenizer for trimming)
    # each message of the conversation as the mapping the guard counts, made once per run


@dataclass(slots=True)
class _Step:
    """A planned model call: its reservation and the request to send."""

    call: ModelCall
    request: ModelRequest[Any]
    final: bool = False
    reason: str = ""
    limit: str | None = None


def _thread_id(runtime: Any) -> str | None:
    info = getattr(runtime, "execution_info", None)
    tid = getattr(info, "thread_id", None)
    return str(tid) if tid else None


def refused_tool_call(
    call: Mapping[str, Any], *, blocked: str | None = None, stopped: object = None
) -> ToolMessage:
    """The error ``ToolMessage`` a model gets for a tool call the budget did not let run:
    ``blocked`` by a tool cap (the decision's reason), or not run because the budget
    ``stopped`` the run (the ``BudgetExceeded``)."""
    name = call["name"]
    if blocked is not None:
        content = (
            f"Tool call blocked by the budget: {blocked}. "
            f"Do not call '{name}' again; answer with what you have."
        )
    else:
        content = f"Not run: the run's budget stopped it ({stopped})."
    return ToolMessage(content=content, tool_call_id=call["id"] or "", name=name, status="error")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _note(message: AIMessage, note: str) -> str | list[str | dict[str, Any]]:
    content = message.content
    if isinstance(content, str):
        return f"{content}\n\n{note}" if content else note
    return [*content, {"type": "text", "text": note}]


class AgentGuardMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Keeps a ``create_agent`` run inside its budget: meters every model and tool call, caps
    output, swaps to cheaper models down the policy's ladder and ends the run gracefully.

    Each agent run charges a task: the current one when the caller opened
    ``with guard.task(...)`` around ``invoke``, otherwise a task the middleware opens when the
    run starts and closes when it ends (also when it fails).

    Put it first in ``middleware=[...]`` so retries and fallbacks run inside it: every attempt
    is then part of one metered call and an error that escapes it has really ended the run.

    Args:
        guard: the :class:`agentguard.Guard` whose policy and budgets apply.
        models: the ladder's model ids (``Downgrade.to``, ``finish_model``) mapped to *unbound*
            chat models; the agent binds tools and the output cap on every call. A rung whose id
            is the agent's own model needs no entry.
        task_id: the id of the tasks the middleware opens: a string (runs with the same id
            share one budget), a callable ``(state, runtime) -> str``, or ``None`` for a fresh
            id per run.
        tags: attribution tags for the tasks the middleware opens (``feature="support"``).
        finish_message: the note added to the final answer when the budget ends a run
            (``{reason}`` and ``{limit}`` are filled in); ``None`` adds none. The note is also
            in ``response_metadata["agentguard"]``.
        exit_behavior: at a hard stop, ``"error"`` raises :class:`agentguard.BudgetExceeded`
            out of ``invoke``; ``"end"`` ends the run with an ``AIMessage`` saying why. Default:
            ``"end"`` under ``on_limit="finish"``, else ``"error"``.
        trim_tool_results: fit each tool result into the policy's ``context_budget_tokens``
            (paragraphs kept in order, near-duplicates dropped, the last one cut at a sentence
            end; see :meth:`agentguard.Task.trim`) before it enters the conversation, so no
            later call pays for the excess. Off by default: a cut JSON result is no longer
            JSON.

    Raises:
        PolicyError: a mapped model is not an unbound chat model or cannot call tools. A ladder
            rung with no mapped model is refused at the run's first model call, before any
            spend (only then is the agent's own model known).

    Example:
        >>> import agentguard as ag
        >>> from langchain.agents import create_agent
        >>> from langchain_core.tools import tool
        >>> from agentguard_langchain import AgentGuardMiddleware
        >>> from agentguard_langchain.testing import ScriptedChatModel
        >>> @tool
        ... def search(query: str) -> str:
        ...     '''Search the order system.'''
        ...     return "order 1182: shipped late"
        >>> guard = ag.Guard(
        ...     ag.Policy(
        ...         max_cost_usd="0.02",
        ...         downgrade=[ag.Downgrade(at=0.6, to="gpt-4o-mini")],
        ...         on_limit="finish",
        ...     ),
        ...     traces=False,
        ... )
        >>> agent = create_agent(
        ...     model=ScriptedChatModel(model_name="gpt-4o"),  # calls tools forever
        ...     tools=[search],
        ...     middleware=[
        ...         AgentGuardMiddleware(
        ...             guard, models={"gpt-4o-mini": ScriptedChatModel(model_name="gpt-4o-mini")}
        ...         )
        ...     ],
        ... )
        >>> with guard.task("ticket-42") as task:
        ...     out = agent.invoke({"messages": [{"role": "user", "content": "Where is it?"}]})
        >>> final = out["messages"][-1]
        >>> final.tool_calls, "budget ended the run" in final.text, task.status
        ([], True, 'finished')
        >>> task.cost_usd <= ag.Policy(max_cost_usd="0.02").max_cost_usd
        True
    """

    # the private run key rides in the state; typed as the base state so the middleware mixes
    # with any other in one ``middleware=[...]`` list
    state_schema = AgentGuardState

    def __init__(
        self,
        guard: Guard,
        *,
        models: Mapping[str, BaseChatModel] | None = None,
        task_id: str | Callable[[Mapping[str, Any], Runtime[Any]], str] | None = None,
        tags: Mapping[str, str] | None = None,
        finish_message: str | None = DEFAULT_FINISH_MESSAGE,
        exit_behavior: Literal["end", "error"] | None = None,
        trim_tool_results: bool = False,
    ) -> None:
        super().__init__()
        if exit_behavior not in (None, "end", "error"):
            raise PolicyError("exit_behavior", exit_behavior, "must be 'end', 'error' or None")
        for reserved in ("policy", "parent"):
            if tags and reserved in tags:
                raise PolicyError(f"tags.{reserved}", tags[reserved], "is not a tag name")
        self.guard = guard
        self.models: dict[str, BaseChatModel] = dict(models or {})
        self.task_id = task_id
        self.tags: dict[str, str] = dict(tags or {})
        self._tag_kwargs: dict[str, Any] = dict(self.tags)
        self.finish_message = finish_message
        self.exit_behavior = exit_behavior
        if trim_tool_results and guard.policy.context_budget_tokens is None:
            raise PolicyError(
                "context_budget_tokens",
                None,
                "trim_tool_results=True needs a context budget in the guard's policy",
            )
        self.trim_tool_results = trim_tool_results
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._closed: OrderedDict[str, _Run] = OrderedDict()
        self._model_ids: dict[int, tuple[object, str, int | None]] = {}
        self._tool_schemas: dict[int, tuple[object, str]] = {}
        self._check_models(guard.policy)

    # -- configuration checks ------------------------------------------------------------------

    def _field(self, policy: Policy, model_id: str) -> str:
        for i, rung in enumerate(policy.downgrade):
            if rung.to == model_id:
                return f"downgrade[{i}].to"
        if policy.finish_model == model_id:
            return "finish_model"
        return f"models[{model_id!r}]"

    def _check_models(self, policy: Policy) -> None:
        """Every mapped model is an unbound chat model that can call tools."""
        for model_id, chat in self.models.items():
            where = self._field(policy, model_id)
            if not isinstance(chat, BaseChatModel):
                raise PolicyError(
                    where,
                    model_id,
                    f"mapped to a {type(chat).__name__}: map it to an unbound chat model "
                    "(a BaseChatModel, not the result of bind_tools, bind or "
                    "with_structured_output) — the agent binds tools and the output cap "
                    "on every call",
                )
            profile = chat.profile or {}
            if type(chat).bind_tools is BaseChatModel.bind_tools:
                raise PolicyError(
                    where,
                    model_id,
                    f"the mapped {type(chat).__name__} cannot call tools (it does not implement "
                    "bind_tools), and an agent's model must",
                )
            if profile.get("tool_calling") is False:
                raise PolicyError(
                    where,
                    model_id,
                    f"the mapped {type(chat).__name__} cannot call tools "
                    "(its profile says tool_calling=False), and an agent's model must",
                )

    def _check_run(self, run: _Run, model_id: str, request: ModelRequest[Any]) -> None:
        """Once per run and agent model: every rung the policy can pick has a model, and the
        mapped models can give the structured output the agent asks for."""
        policy = run.task.policy
        provider_format = isinstance(request.response_format, ProviderStrategy)
        key = f"{id(policy)}:{model_id}:{provider_format}"
        if key in run.checked:
            return
        targets = [(f"downgrade[{i}].to", r.to) for i, r in enumerate(policy.downgrade)]
        if policy.finish_model is not None:
            targets.append(("finish_model", policy.finish_model))
        for where, target in targets:
            if target == model_id:
                continue
            chat = self.models.get(target)
            if chat is None:
                raise PolicyError(
                    where,
                    target,
                    f"no chat model is mapped to it: pass models={{{target!r}: <chat model>}} "
                    f"to AgentGuardMiddleware (the agent's own model is {model_id!r})",
                )
            if provider_format and (chat.profile or {}).get("structured_output") is False:
                raise PolicyError(
                    where,
                    target,
                    f"the mapped {type(chat).__name__} has no native structured output "
                    "(its profile says structured_output=False) and the agent's "
                    "response_format is a ProviderStrategy",
                )
        run.checked.add(key)

    def _mapped(self, call: ModelCall) -> Steps[BaseChatModel]:
        """The chat model mapped to the call's rung; a rung with none, or whose model cannot
        hold the request, is not sent (the reservation is released)."""
        target = call.model
        chat = self.models.get(target)
        if chat is None:  # _check_run makes this unreachable for the policy's rungs
            error = PolicyError(
                self._field(call.task.policy, target), target, "no chat model is mapped to it"
            )
            yield (call, "fail", (error,), NO_KW)
            raise error
        window = (chat.profile or {}).get("max_input_tokens")
        if isinstance(window, int) and window < call.input_counted:
            error = PolicyError(
                self._field(call.task.policy, target),
                target,
                f"its context window of {window} tokens cannot hold this request "
                f"(~{call.input_counted} tokens): map a model with a larger window",
            )
            yield (call, "fail", (error,), NO_KW)
            raise error
        return chat

    # -- runs ----------------------------------------------------------------------------------

    def _exit(self, task: Task) -> str:
        if self.exit_behavior is not None:
            return self.exit_behavior
        return "end" if task.policy.on_limit == "finish" else "error"

    def _open_run(self, state: Mapping[str, Any], runtime: Runtime[Any]) -> Steps[dict[str, Any]]:
        tid = _thread_id(runtime)
        key = f"thread:{tid}" if tid else uuid.uuid4().hex
        cur = current_task()
        if cur is not None and cur.guard is self.guard:
            run = _Run(cur, False, key)
        else:
            if callable(self.task_id):
                task_id: str | None = self.task_id(state, runtime)
            else:
                task_id = self.task_id
            task = yield (self.guard, "open_task", (task_id,), self._tag_kwargs)
            run = _Run(task, True, key)
        with self._lock:
            old = self._runs.pop(key, None)
            self._runs[key] = run
        if old is not None and old.owned:  # a run on this thread that never reached its end
            yield (old.task, "close", (), NO_KW)
        return {_RUN_KEY: key}

    def _close_run(self, state: Mapping[str, Any], runtime: Runtime[Any]) -> Steps[None]:
        key = state.get(_RUN_KEY) or (f"thread:{tid}" if (tid := _thread_id(runtime)) else None)
        if key is None:
            return
        with self._lock:
            run = self._runs.pop(key, None)
            self._closed.pop(key, None)
        if run is not None and run.owned:
            yield (run.task, "close", (), NO_KW)

    def _run(self, state: Any, runtime: Any) -> _Run:
        key = state.get(_RUN_KEY) if isinstance(state, Mapping) else None
        run = self._runs.get(key) if key else None
        if run is None and (tid := _thread_id(runtime)):
            run = self._runs.get(f"thread:{tid}")
        if run is None and key:
            run = self._closed.get(key)
            if run is not None and not run.warned:
                run.warned = True
                _log.warning(
                    "agentguard: the run of task %s went on after an error escaped "
                    "AgentGuardMiddleware; its task record was already written. Put "
                    "AgentGuardMiddleware before retry and fallback middleware.",
                    run.task.id,
                )
        if run is None:
            cur = current_task()
            if cur is None or cur.guard is not self.guard:
                raise RuntimeError(
                    "AgentGuardMiddleware found no agent run: use it in "
                    "langchain.agents.create_agent(middleware=[...])"
                )
            run = _Run(cur, False, "")
        return run

    def _abort(self, run: _Run, exc: BaseException) -> Steps[None]:
        """An exception escapes the middleware: the run ends with it (unless it is LangGraph's
        control flow, e.g. an interrupt)."""
        if isinstance(exc, GraphBubbleUp) or run.closed_on_error or not run.key:
            return
        run.closed_on_error = True
        if run.owned:  # the caller's own task is closed by the caller's ``with`` block
            yield (run.task, "close", (exc,), NO_KW)
        with self._lock:
            self._runs.pop(run.key, None)
            self._closed[run.key] = run
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)

    # -- agent hooks ---------------------------------------------------------------------------

    def before_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Start the run: use the caller's current task or open one."""
        return drive(self._open_run(state, runtime))

    async def abefore_agent(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Start the run: use the caller's current task or open one (awaiting the store)."""
        return await adrive(self._open_run(state, runtime))

    def after_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """End the run: close the task the middleware opened."""
        drive(self._close_run(state, runtime))
        return None

    async def aafter_agent(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """End the run: close the task the middleware opened (awaiting the store)."""
        await adrive(self._close_run(state, runtime))
        return None

    # -- model calls ---------------------------------------------------------------------------

    def _model_info(self, model: object) -> tuple[str, int | None]:
        """The model id a chat model calls and its own output cap (cached per instance)."""
        hit = self._model_ids.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1], hit[2]
        ls: Mapping[str, Any] = {}
        get_ls = getattr(model, "_get_ls_params", None)
        if callable(get_ls):
            try:
                ls = get_ls()
            except Exception:  # a provider's ls params are a courtesy, not a contract
                ls = {}
        model_id: object = ls.get("ls_model_name")
        for attr in ("model_name", "model", "model_id"):
            if isinstance(model_id, str) and model_id:
                break
            model_id = getattr(model, attr, None)
        if not isinstance(model_id, str) or not model_id:
            raise PolicyError(
                "model",
                type(model).__name__,
                "cannot tell which model this chat model calls (no ls_model_name, model_name "
                "or model): the guard prices calls by model id",
            )
        cap = ls.get("ls_max_tokens")
        own = output_cap(cap)
        self._model_ids[id(model)] = (model, model_id, own)
        return model_id, own

    def _schemas(self, tools: Sequence[BaseTool | dict[str, Any]]) -> list[str]:
        """Tools as compact OpenAI JSON schemas, for counting (converted once per tool)."""
        out = []
        for t in tools:
            if isinstance(t, dict):
                out.append(_dumps(t))
                continue
            hit = self._tool_schemas.get(id(t))
            if hit is None or hit[0] is not t:
                hit = (t, _dumps(convert_to_openai_tool(t)))
                self._tool_schemas[id(t)] = hit
            out.append(hit[1])
        return out

    def _end_message(self, run: _Run, exc: BudgetExceeded) -> ExtendedModelResponse[Any]:
        """End the run with an ``AIMessage`` saying why (``exit_behavior="end"``)."""
        run.stopped = run.stopped or exc
        msg = AIMessage(
            content=_STOP_MESSAGE.format(error=exc),
            response_metadata={
                "agentguard": {
                    "ended_by": "stop",
                    "limit": exc.limit,
                    "reason": str(exc),
                    "task_id": run.task.id,
                }
            },
        )
        return ExtendedModelResponse(
            model_response=ModelResponse(result=[msg]), command=Command(update={"jump_to": "end"})
        )

    def _begin_model(
        self, run: _Run, request: ModelRequest[Any]
    ) -> Steps[_Step | ExtendedModelResponse[Any]]:
        """Decide and reserve the call (the events one body for the sync and async gate); an
        exception that escapes ends the run."""
        task = run.task
        try:
            if run.stopped is not None:
                return self._end_message(run, run.stopped)
            if run.final_done:
                run.after_final += 1
                if run.after_final > 1:  # the graph keeps coming back: break the loop
                    raise BudgetExceeded(
                        "finished",
                        None,
                        None,
                        task_id=task.id,
                        detail="the run already made its graceful final call",
                    )
                exc = BudgetExceeded(
                    "finished", None, None, task_id=task.id, detail="the run already ended"
                )
                return self._end_message(run, exc)
            model_id, own_cap = self._model_info(request.model)
            run.model_id = model_id
            self._check_run(run, model_id, request)
            # the message objects themselves: the counter keeps each one's count, so an
            # agent's history is read once, not on every call
            system = request.system_message
            messages = [system, *request.messages] if system is not None else request.messages
            tools = self._schemas(request.tools) if request.tools else None
            settings = request.model_settings
            cap = output_cap(
                settings.get("max_tokens", settings.get("max_completion_tokens", own_cap))
            )
            ask = {"messages": messages, "tools": tools, "max_tokens": cap}
            try:
                step = yield (task, "step", ("agent",), NO_KW)
                if step.action == "finish":
                    reason, limit = step.reason, step.limit
                    ask["finish"] = True
                    call = yield (task, "start_model_call", (model_id,), ask)
                else:
                    call = yield (task, "start_model_call", (model_id,), ask)
                    if call.decision.action != "finish":
                        chat = request.model
                        if call.model != model_id:
                            chat = yield from self._mapped(call)
                        return _Step(call, self._bind(request, call, chat, final=False))
                    reason, limit = call.decision.reason, call.decision.limit
                    ask = {**ask, "max_tokens": call.max_tokens, "finish": True}
                    call = yield (task, "start_model_call", (call.model,), ask)
            except BudgetExceeded as exc:
                if self._exit(task) == "error":
                    raise
                return self._end_message(run, exc)
            chat = request.model
            if call.model != model_id:
                chat = yield from self._mapped(call)
            req = self._bind(request, call, chat, final=True)
            return _Step(call, req, final=True, reason=reason, limit=limit)
        except BaseException as exc:
            yield from self._abort(run, exc)
            raise

    def _bind(
        self, request: ModelRequest[Any], call: ModelCall, chat: BaseChatModel, *, final: bool
    ) -> ModelRequest[Any]:
        """The request with the guard's decision applied: model, output cap, tool choice."""
        cap = call.max_tokens
        if chat is not request.model:
            own = self._model_info(chat)[1]
            if own is not None and (cap is None or own < cap):
                cap = own  # the mapped model's own, smaller cap still holds
        if cap is None and chat is request.model and not final:
            return request
        settings = dict(request.model_settings)
        if cap is not None:
            key = "max_completion_tokens" if "max_completion_tokens" in settings else "max_tokens"
            settings[key] = cap
        if final:
            return request.override(model=chat, model_settings=settings, tool_choice="none")
        return request.override(model=chat, model_settings=settings)

    def _failed(self, run: _Run, call: ModelCall | ToolCall, exc: BaseException) -> Steps[None]:
        """The call raised: release it, and the run ends with the exception."""
        yield (call, "fail", (exc,), NO_KW)
        yield from self._abort(run, exc)

    # Ending a call is one event: no generator on this hot path, but pure halves around it
    # (``_ended``: what to charge; ``_answer``: what the agent gets) joined by the sync and the
    # async hook.

    @staticmethod
    def _ended(step: _Step, response: ModelResponse[Any]) -> tuple[AIMessage | None, Any, Any]:
        """The answer, and the usage and keywords ``call.end`` charges it with."""
        ai = next((m for m in response.result if isinstance(m, AIMessage)), None)
        usage: Any = None
        reported: str | None = None
        if ai is not None:
            try:
                usage = usage_of(ai)
            except InvalidUsage:
                usage = ai.usage_metadata  # the guard charges the call's bound and logs it
            name = ai.response_metadata.get("model_name") or ai.response_metadata.get("model")
            reported = name if isinstance(name, str) and name != step.call.model else None
        text = ai.text if ai is not None and usage is None else None
        return ai, usage, {"output_text": text, "model": reported}

    def _answer(
        self,
        run: _Run,
        step: _Step,
        request: ModelRequest[Any],
        response: ModelResponse[Any],
        ai: AIMessage | None,
    ) -> ModelResponse[Any] | ExtendedModelResponse[Any]:
        if not step.final:
            return response
        run.final_done = True
        result = list(response.result)
        if ai is not None:
            result[result.index(ai)] = self._final_message(run, step, request, ai)
        return ExtendedModelResponse(
            model_response=ModelResponse(
                result=result, structured_response=response.structured_response
            ),
            command=Command(update={"jump_to": "end"}),
        )

    def _final_message(
        self, run: _Run, step: _Step, request: ModelRequest[Any], ai: AIMessage
    ) -> AIMessage:
        """The final answer: no calls to the agent's tools, a note that the budget ended it."""
        names = {t.get("name") if isinstance(t, dict) else t.name for t in request.tools}
        kept = [tc for tc in ai.tool_calls if tc["name"] not in names]
        meta = {
            **ai.response_metadata,
            "agentguard": {
                "ended_by": "finish",
                "limit": step.limit,
                "reason": step.reason,
                "task_id": run.task.id,
            },
        }
        update: dict[str, Any] = {"tool_calls": kept, "response_metadata": meta}
        if len(kept) != len(ai.tool_calls):
            update["invalid_tool_calls"] = []
        if self.finish_message is not None:
            note = self.finish_message.format(reason=step.reason, limit=step.limit)
            update["content"] = _note(ai, note)
        return ai.model_copy(update=update)

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]:
        """Decide, reserve and bind the call; meter what it used; end the run when told to."""
        run = self._run(request.state, request.runtime)
        step = drive(self._begin_model(run, request))
        if not isinstance(step, _Step):
            return step
        try:
            with metered_here():
                response = handler(step.request)
        except BaseException as exc:
            drive(self._failed(run, step.call, exc))
            raise
        ai, usage, kw = self._ended(step, response)
        step.call.end(usage, **kw)
        return self._answer(run, step, step.request, response, ai)

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]:
        """Async :meth:`wrap_model_call`: every budget-store operation is awaited."""
        run = self._run(request.state, request.runtime)
        step = await adrive(self._begin_model(run, request))
        if not isinstance(step, _Step):
            return step
        try:
            with metered_here():
                response = await handler(step.request)
        except BaseException as exc:
            await adrive(self._failed(run, step.call, exc))
            raise
        ai, usage, kw = self._ended(step, response)
        await step.call.aend(usage, **kw)
        return self._answer(run, step, step.request, response, ai)

    # -- tool calls ----------------------------------------------------------------------------

    def _begin_tool(self, run: _Run, request: ToolCallRequest) -> Steps[ToolCall | ToolMessage]:
        """Count the call against the tool caps; an exception that escapes ends the run."""
        if run.stopped is not None:
            return refused_tool_call(request.tool_call, stopped=run.stopped)
        try:
            try:
                tool = yield (run.task, "start_tool_call", (request.tool_call["name"],), NO_KW)
            except BudgetExceeded as exc:
                return self._tool_stopped(run, request, exc)
            return self._tool_allowed(request, tool)
        except BaseException as exc:
            yield from self._abort(run, exc)
            raise

    def _tool_stopped(
        self, run: _Run, request: ToolCallRequest, exc: BudgetExceeded
    ) -> ToolMessage:
        if self._exit(run.task) == "error":
            raise exc
        run.stopped = exc
        return refused_tool_call(request.tool_call, stopped=exc)

    @staticmethod
    def _tool_allowed(request: ToolCallRequest, tool: ToolCall) -> ToolCall | ToolMessage:
        if tool.allowed:
            return tool
        return refused_tool_call(request.tool_call, blocked=tool.decision.reason)

    def _trimmed(self, run: _Run, result: ToolMessage | Command[Any]) -> ToolMessage | Command[Any]:
        """The tool result fitted into the context budget (``trim_tool_results``)."""
        if (
            not self.trim_tool_results
            or not isinstance(result, ToolMessage)
            or not isinstance(result.content, str)
            or result.status == "error"
        ):
            return result
        task = run.task
        if task.policy.context_budget_tokens is None:
            return result
        paragraphs = [p for p in result.content.split("\n\n") if p.strip()]
        trim = task.trim(paragraphs, model=run.model_id, keep_order=True)
        if not trim.tokens_saved:
            return result
        kept = "\n\n".join(c.text for c in trim.kept)
        note = (
            f"[agentguard: tool result trimmed to {trim.tokens_kept} of {trim.tokens_in} "
            "tokens by the context budget]"
        )
        meta = {
            **result.response_metadata,
            "agentguard": {"tokens_in": trim.tokens_in, "tokens_kept": trim.tokens_kept},
        }
        content = f"{kept}\n\n{note}" if kept else note
        return result.model_copy(update={"content": content, "response_metadata": meta})

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """Count the call against the tool caps; a blocked call returns an error message."""
        run = self._run(request.state, request.runtime)
        tool = drive(self._begin_tool(run, request))
        if isinstance(tool, ToolMessage):
            return tool
        try:
            with metered_here():  # a callback handler on the same run does not count it again
                result = handler(request)
        except BaseException as exc:
            drive(self._failed(run, tool, exc))
            raise
        tool.end()
        return self._trimmed(run, result)

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async :meth:`wrap_tool_call`."""
        run = self._run(request.state, request.runtime)
        tool = await adrive(self._begin_tool(run, request))
        if isinstance(tool, ToolMessage):
            return tool
        try:
            with metered_here():
                result = await handler(request)
        except BaseException as exc:
            await adrive(self._failed(run, tool, exc))
            raise
        await tool.aend()
        return self._trimmed(run, result)

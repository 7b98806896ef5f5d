"""Shared pieces of the LangGraph tests: a scripted model with unique message ids, a tool,
and a hand-written ReAct graph built on a GraphGuard."""

from __future__ import annotations

import threading
import time
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agentguard_langchain.testing import ScriptedChatModel
from agentguard_langgraph import BudgetState, GraphGuard


class Scripted(ScriptedChatModel):
    """``ScriptedChatModel`` whose message ids are unique across instances (``add_messages``
    replaces a message whose id it has seen, and a downgraded run talks to two models), and
    which counts how many of its calls were in flight together."""

    def _answer(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        msg = super()._answer(messages, kwargs)
        msg.id = f"{self._uid}-{msg.id}"
        return msg

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self.__dict__["_flight"] = [0, 0, threading.Lock()]

    @property
    def max_in_flight(self) -> int:
        return int(self.__dict__["_flight"][1])

    def _enter(self) -> None:
        f = self.__dict__["_flight"]
        with f[2]:
            f[0] += 1
            f[1] = max(f[1], f[0])

    def _leave(self) -> None:
        f = self.__dict__["_flight"]
        with f[2]:
            f[0] -= 1

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self._enter()
        try:
            return super()._generate(*args, **kwargs)
        finally:
            self._leave()

    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        self._enter()
        try:
            return await super()._agenerate(*args, **kwargs)
        finally:
            self._leave()


@tool
def search(query: str) -> str:
    """Search the order system."""
    time.sleep(0)
    return "order 1182: shipped late; carrier lost the parcel for two days"


class State(MessagesState, BudgetState):
    pass


def react_graph(
    gg: GraphGuard, model: ScriptedChatModel, *, steps_in: str = "route", **compile_kw: Any
) -> Any:
    """A hand-written ReAct graph: the gate on the agent node, the tool gate, and either the
    budget route before every agent step and a finishing node (``steps_in="route"``) or the
    bare graph's plain edges with the steps counted by the agent node's wrapper
    (``steps_in="node"``)."""
    llm = gg.chat_model(model).bind_tools([search])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    b = StateGraph(State)
    if steps_in == "node":
        b.add_node(
            "agent", RunnableLambda(gg.node(agent, step=True), afunc=gg.node(aagent, step=True))
        )
        b.add_node("tools", gg.tool_node([search]))
        b.add_edge(START, "agent")
        b.add_conditional_edges("agent", tools_condition)
        b.add_edge("tools", "agent")
        return b.compile(**compile_kw)
    paths = gg.path_map(continue_to="agent", finish_to="finish")
    b.add_node("agent", RunnableLambda(gg.node(agent), afunc=gg.node(aagent)))
    b.add_node("tools", gg.tool_node([search]))
    b.add_node("finish", gg.finish_node(model, tools=[search]))
    b.add_conditional_edges(START, gg.route, paths)
    b.add_conditional_edges("agent", tools_condition)
    b.add_conditional_edges("tools", gg.route, paths)
    b.add_edge("finish", END)
    return b.compile(**compile_kw)


def bare_react_graph(model: ScriptedChatModel) -> Any:
    """``react_graph``'s shape without agentguard: plain model, ``ToolNode``, plain edges."""
    llm = model.bind_tools([search])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    async def aagent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await llm.ainvoke(state["messages"])]}

    b = StateGraph(MessagesState)
    b.add_node("agent", RunnableLambda(agent, afunc=aagent))
    b.add_node("tools", ToolNode([search]))
    b.add_edge(START, "agent")
    b.add_conditional_edges("agent", tools_condition)
    b.add_edge("tools", "agent")
    return b.compile()


def user(text: str = "Where is order 1182?") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}

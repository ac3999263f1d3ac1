"""Streaming output parsing in the worker: splits an engine's text into content, reasoning and tool
calls (OpenAI's streaming shape) as it arrives, holding back only text that may start a tag.

Parsers are chosen per model like vLLM's --tool-call-parser and --reasoning-parser: the tool-call
syntaxes "hermes", "llama3_json" and "mistral", plus the forced modes of tool_choice (NAMED: the
whole output is one call's arguments; REQUIRED: a JSON array of calls), and the "think" reasoning
syntax. Output that looks like a tool call but is malformed is returned as content, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable
from typing import Any, Literal, Protocol

from services.worker.engine.interface import FinishReason, GenerationChunk, ToolCallDelta
from services.worker.engine.tools import ToolChoice, ToolChoiceMode

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
REASONING_PARSERS = ("think",)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
LLAMA3_PYTHON_TAG = "<|python_tag|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What the parsers read: the detokenizer keeps these even where the tokenizer flags them special.
OUTPUT_MARKERS = (
    HERMES_OPEN,
    HERMES_CLOSE,
    MISTRAL_TAG,
    LLAMA3_PYTHON_TAG,
    THINK_OPEN,
    THINK_CLOSE,
)

_WHITESPACE = " \t\r\n"
_ARGUMENT_KEYS = ("arguments", "parameters")

# A parsing event: ("content", text), ("start", function name) or ("args", arguments fragment).
_Event = tuple[Literal["content", "start", "args"], str]


def detect_tool_call_parser(chat_template: str) -> str:
    """The tool-call syntax a chat template teaches its model; hermes when it teaches none, since
    the worker then describes the tools with Hermes-style instructions (prompts.py)."""
    if HERMES_OPEN in chat_template:
        return "hermes"
    if MISTRAL_TAG in chat_template:
        return "mistral"
    if LLAMA3_PYTHON_TAG in chat_template:
        return "llama3_json"
    return "hermes"


def detect_reasoning_parser(chat_template: str) -> str:
    """ "think" for templates that know <think> blocks, else "" (no reasoning split)."""
    return "think" if THINK_OPEN in chat_template else ""


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


class OutputParser:
    """Turns an engine's chunks into chunks whose `text` is content only, with `reasoning_text`
    and `tool_calls` filled in. One per request; feed every chunk in order to `parse`."""

    def __init__(
        self,
        tool_syntax: str | None = None,
        *,
        reasoning: bool = False,
        start_in_reasoning: bool = False,
        tool_choice: ToolChoice | None = None,
        call_id: Callable[[], str] = new_call_id,
    ) -> None:
        """`tool_syntax`: one of TOOL_CALL_PARSERS, or None for plain text; a forced tool_choice
        (REQUIRED, NAMED) overrides it. `reasoning`: split <think> blocks."""
        choice = tool_choice or ToolChoice(ToolChoiceMode.AUTO)
        self._tools: _ToolSyntax
        if choice.mode is ToolChoiceMode.NAMED:
            self._tools = _NamedSyntax(choice.name)
        elif choice.mode is ToolChoiceMode.REQUIRED:
            self._tools = _CallList(brackets=True, separator=",")
        elif choice.mode is ToolChoiceMode.NONE or tool_syntax is None:
            self._tools = _PlainText()
        else:
            self._tools = _syntax(tool_syntax)
        self._think = _ThinkSplitter(start_in_reasoning) if reasoning else None
        self._single_call = not choice.parallel_tool_calls
        self._call_id = call_id
        self._calls = 0  # tool calls started (kept or not)
        self._current = -1  # index of the call receiving "args" events; -1: a dropped one
        self._seen_text = False

    @property
    def tool_calls(self) -> int:
        """How many tool calls have been emitted so far."""
        return min(self._calls, 1) if self._single_call else self._calls

    def parse(self, chunk: GenerationChunk) -> GenerationChunk:
        """The parsed counterpart of `chunk` (token ids, logprobs and usage pass through); the
        last chunk (finish_reason set) flushes whatever was held back."""
        if chunk.reasoning_open and self._think is not None and not self._seen_text:
            self._think.open()
        if chunk.is_prompt_echo:
            return chunk
        self._seen_text = self._seen_text or bool(chunk.text)
        final = chunk.finish_reason is not None
        if self._think is not None:
            pieces = self._think.feed(chunk.text)
            if final:
                pieces += self._think.finish()
        else:
            pieces = [("content", chunk.text)]
        reasoning: list[str] = []
        events: list[_Event] = []
        for kind, text in pieces:
            if kind == "reasoning":
                reasoning.append(text)
            elif text:
                events += self._tools.feed(text)
        if final:
            events += self._tools.finish()
        content, deltas = self._apply(events)
        parsed = dataclasses.replace(
            chunk,
            text=content,
            reasoning_text=chunk.reasoning_text + "".join(reasoning),
            tool_calls=[*chunk.tool_calls, *deltas],
        )
        if final and chunk.finish_reason is FinishReason.STOP and self.tool_calls:
            parsed.finish_reason = FinishReason.TOOL_CALLS
        return parsed

    def _apply(self, events: list[_Event]) -> tuple[str, list[ToolCallDelta]]:
        """Content text and tool-call deltas; a call's pieces within one chunk merge into one
        delta, and calls beyond the first are dropped when parallel calls are off."""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        for kind, value in events:
            if kind == "content":
                content.append(value)
            elif kind == "start":
                index = self._calls
                self._calls += 1
                if self._single_call and index > 0:
                    self._current = -1
                    continue
                self._current = index
                deltas.append(ToolCallDelta(index=index, id=self._call_id(), name=value))
            elif self._current >= 0 and value:
                if deltas and deltas[-1].index == self._current:
                    last = deltas[-1]
                    deltas[-1] = dataclasses.replace(last, arguments=last.arguments + value)
                else:
                    deltas.append(ToolCallDelta(index=self._current, arguments=value))
        return "".join(content), deltas


def create_output_parser(
    tool_call_parser: str,
    reasoning_parser: str,
    tool_choice: ToolChoice,
    *,
    start_in_reasoning: bool = False,
) -> OutputParser:
    """The parser for one request: the model's parsers (from its ModelDescription) and the
    request's tool choice (NONE and AUTO without tools leave tool-call syntax alone)."""
    syntax = None
    if tool_choice.mode is not ToolChoiceMode.NONE:
        syntax = tool_call_parser or "hermes"
    return OutputParser(
        syntax,
        reasoning=reasoning_parser == "think",
        start_in_reasoning=start_in_reasoning,
        tool_choice=tool_choice,
    )


# -- reasoning ------------------------------------------------------------------------------


class _ThinkSplitter:
    """Text between <think> and </think> is reasoning; partial tags at a chunk's end are held."""

    def __init__(self, in_reasoning: bool) -> None:
        self._in_reasoning = in_reasoning
        self._held = ""
        # After </think> the answer usually starts with blank lines that belong to neither part.
        self._strip_leading = False

    def open(self) -> None:
        """The prompt opened the block: the output starts as reasoning."""
        self._in_reasoning = True

    def feed(self, text: str) -> list[tuple[str, str]]:
        buffer = self._held + text
        self._held = ""
        out: list[tuple[str, str]] = []
        while buffer:
            tag = THINK_CLOSE if self._in_reasoning else THINK_OPEN
            kind = "reasoning" if self._in_reasoning else "content"
            at = buffer.find(tag)
            if at >= 0:
                self._emit(out, kind, buffer[:at])
                buffer = buffer[at + len(tag) :]
                self._in_reasoning = not self._in_reasoning
                self._strip_leading = True
                continue
            keep = _partial_suffix(buffer, tag)
            self._emit(out, kind, buffer[: len(buffer) - keep])
            self._held = buffer[len(buffer) - keep :]
            break
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, "reasoning" if self._in_reasoning else "content", self._held)
        self._held = ""
        return out

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip(_WHITESPACE)
            if text:
                self._strip_leading = False
        if text:
            out.append((kind, text))


# -- tool-call syntaxes ---------------------------------------------------------------------


class _ToolSyntax(Protocol):
    def feed(self, text: str) -> list[_Event]: ...

    def finish(self) -> list[_Event]: ...


def _syntax(name: str) -> _ToolSyntax:
    if name == "hermes":
        return _HermesSyntax()
    if name == "llama3_json":
        return _Llama3JsonSyntax()
    if name == "mistral":
        return _MistralSyntax()
    raise ValueError(f"unknown tool-call parser {name!r}: expected one of {TOOL_CALL_PARSERS}")


class _PlainText:
    def feed(self, text: str) -> list[_Event]:
        return [("content", text)] if text else []

    def finish(self) -> list[_Event]:
        return []


class _NamedSyntax:
    """tool_choice names the function: the whole output (grammar-forced) is its arguments."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._started = False

    def feed(self, text: str) -> list[_Event]:
        events: list[_Event] = []
        if not self._started:
            self._started = True
            events.append(("start", self._name))
        if text:
            events.append(("args", text))
        return events

    def finish(self) -> list[_Event]:
        return [] if self._started else self.feed("")


class _HermesSyntax:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks; text outside is content."""

    def __init__(self) -> None:
        self._state: Literal["text", "call", "after"] = "text"
        self._buffer = ""
        self._call: _CallScanner | None = None

    def feed(self, text: str) -> list[_Event]:
        self._buffer += text
        events: list[_Event] = []
        while True:
            if self._state == "text":
                at = self._buffer.find(HERMES_OPEN)
                if at >= 0:
                    _content(events, self._buffer[:at])
                    self._buffer = self._buffer[at + len(HERMES_OPEN) :]
                    self._state, self._call = "call", _CallScanner()
                    continue
                keep = _partial_suffix(self._buffer, HERMES_OPEN)
                _content(events, self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return events
            if self._state == "call":
                assert self._call is not None
                call, data = self._call, self._buffer
                self._buffer = ""
                if not call.failed:
                    events += call.feed(data)
                    if call.done:
                        self._buffer, self._state = call.rest, "after"
                        continue
                    if not call.failed:
                        return events
                    data = ""
                # Malformed: skip to the closing tag; unless arguments already streamed, the
                # whole block is content.
                call.raw += data
                at = call.raw.find(HERMES_CLOSE)
                if at < 0:
                    return events
                end = at + len(HERMES_CLOSE)
                if not call.started:
                    _content(events, HERMES_OPEN + call.raw[:end])
                self._buffer, self._state = call.raw[end:], "text"
                continue
            # After a call's object: whitespace, then the closing tag (or more text).
            rest = self._buffer.lstrip(_WHITESPACE)
            if not rest or HERMES_CLOSE.startswith(rest) or HERMES_OPEN.startswith(rest):
                self._buffer = rest
                return events
            if rest.startswith(HERMES_CLOSE):
                self._buffer = rest[len(HERMES_CLOSE) :]
                continue
            self._buffer, self._state = rest, "text"

    def finish(self) -> list[_Event]:
        events: list[_Event] = []
        if self._state == "text":
            _content(events, self._buffer)
        elif self._state == "call":
            assert self._call is not None
            if not self._call.started:
                _content(events, HERMES_OPEN + self._call.raw)
        elif not HERMES_CLOSE.startswith(self._buffer):
            _content(events, self._buffer)
        self._buffer = ""
        return events


class _MistralSyntax:
    """Content, then [TOOL_CALLS] and a JSON array of {"name", "arguments"} objects."""

    def __init__(self) -> None:
        self._buffer = ""
        self._calls: _CallList | None = None

    def feed(self, text: str) -> list[_Event]:
        if self._calls is not None:
            return self._calls.feed(text)
        self._buffer += text
        events: list[_Event] = []
        at = self._buffer.find(MISTRAL_TAG)
        if at >= 0:
            _content(events, self._buffer[:at])
            rest = self._buffer[at + len(MISTRAL_TAG) :]
            self._buffer = ""
            self._calls = _CallList(brackets=True, separator=",", prefix=MISTRAL_TAG)
            return events + self._calls.feed(rest)
        keep = _partial_suffix(self._buffer, MISTRAL_TAG)
        _content(events, self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return events

    def finish(self) -> list[_Event]:
        if self._calls is not None:
            return self._calls.finish()
        events: list[_Event] = []
        _content(events, self._buffer)
        return events


class _Llama3JsonSyntax:
    """Output that starts with <|python_tag|> or "{" is calls separated by ";"; other output is
    content from its first character."""

    def __init__(self) -> None:
        self._buffer = ""
        self._mode: Literal["undecided", "content", "calls"] = "undecided"
        self._calls: _CallList | None = None

    def feed(self, text: str) -> list[_Event]:
        if self._mode == "content":
            return [("content", text)] if text else []
        if self._calls is not None:
            return self._calls.feed(text)
        self._buffer += text
        start = self._buffer.lstrip(_WHITESPACE)
        if not start or (LLAMA3_PYTHON_TAG.startswith(start) and start != LLAMA3_PYTHON_TAG):
            return []
        buffered, self._buffer = self._buffer, ""
        if start.startswith(LLAMA3_PYTHON_TAG) or start.startswith("{"):
            at = buffered.find(start)
            skip = len(LLAMA3_PYTHON_TAG) if start.startswith(LLAMA3_PYTHON_TAG) else 0
            prefix = buffered[: at + skip]
            self._mode = "calls"
            self._calls = _CallList(brackets=False, separator=";", prefix=prefix)
            return self._calls.feed(buffered[at + skip :])
        self._mode = "content"
        return [("content", buffered)]

    def finish(self) -> list[_Event]:
        if self._calls is not None:
            return self._calls.finish()
        events: list[_Event] = []
        _content(events, self._buffer)
        return events


class _CallList:
    """A sequence of call objects: a JSON array ("[...]" with ","), or bare objects separated by
    `separator`. Once something fails to parse, the unparsed text is content from there on (all
    of it, with `prefix`, when no call had started)."""

    def __init__(self, *, brackets: bool, separator: str, prefix: str = "") -> None:
        self._separator = separator
        self._state: Literal["open", "item", "separator", "done", "content"] = (
            "open" if brackets else "item"
        )
        self._brackets = brackets
        self._buffer = ""
        self._raw = prefix  # everything so far, until a call starts: the fallback content
        self._item: _CallScanner | None = None
        self._started = False

    def feed(self, text: str) -> list[_Event]:
        if self._state == "content":
            return [("content", text)] if text else []
        if not self._started:
            self._raw += text
        self._buffer += text
        events: list[_Event] = []
        while True:
            if self._item is not None:
                item, data = self._item, self._buffer
                self._buffer = ""
                events += item.feed(data)
                self._started = self._started or item.started
                if item.failed:
                    return events + self._fail(item.rest if item.started else item.raw)
                if not item.done:
                    return events
                self._item, self._buffer, self._state = None, item.rest, "separator"
                continue
            if self._state in ("content", "done"):
                rest = self._buffer.lstrip(_WHITESPACE)
                self._buffer = ""
                if rest:
                    events += self._fail(rest)
                return events
            rest = self._buffer.lstrip(_WHITESPACE)
            if not rest:
                self._buffer = ""
                return events
            first = rest[0]
            if self._state == "open" and first == "[":
                self._buffer, self._state = rest[1:], "item"
            elif self._state == "item" and first == "{":
                self._buffer, self._item = rest, _CallScanner()
            elif self._state == "separator" and first == self._separator:
                self._buffer, self._state = rest[1:], "item"
            elif self._brackets and self._state in ("item", "separator") and first == "]":
                self._buffer, self._state = rest[1:], "done"
            else:
                return events + self._fail(rest)

    def _fail(self, text: str) -> list[_Event]:
        """The rest is content: everything since the start if no call started, else `text`."""
        self._state, self._item = "content", None
        fallback = text if self._started else self._raw
        self._raw = ""
        return [("content", fallback)] if fallback else []

    def finish(self) -> list[_Event]:
        if self._state == "content":
            return []
        if self._item is not None and self._item.started:
            return []
        if not self._started:
            return self._fail("")
        rest = self._item.raw if self._item is not None else self._buffer
        rest = rest.strip(_WHITESPACE)
        self._state, self._item = "content", None
        return [("content", rest)] if rest else []


class _Failed(Exception):
    """The text is not a call object."""


class _CallScanner:
    """Parses one {"name": ..., "arguments"|"parameters": {...}} object incrementally, streaming
    the arguments as they arrive (the call starts once its name is known and its arguments begin).
    Other keys are skipped. After `done` or `failed`, `rest` is the text past the object (or past
    the point of failure)."""

    def __init__(self) -> None:
        self.raw = ""  # everything fed, for the fallback to content
        self._pos = 0
        self._state: Literal["open", "key", "colon", "value", "args", "after", "done"] = "open"
        self._key = ""
        self._name: str | None = None
        self._held_args: str | None = None  # complete arguments seen before the name
        self._seen_args = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.started = False
        self.failed = False

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def rest(self) -> str:
        return self.raw[self._pos :]

    def feed(self, text: str) -> list[_Event]:
        self.raw += text
        events: list[_Event] = []
        try:
            self._run(events)
        except _Failed:
            self.failed = True
        return events

    def _run(self, events: list[_Event]) -> None:
        buffer = self.raw
        while self._state != "done":
            if self._state == "args":
                self._stream_args(events)
                if self._state == "args":
                    return
                continue
            while self._pos < len(buffer) and buffer[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos >= len(buffer):
                return
            char = buffer[self._pos]
            if self._state == "open":
                _expect(char == "{")
                self._pos += 1
                self._state = "key"
            elif self._state == "key":
                _expect(char == '"')
                end = _string_end(buffer, self._pos)
                if end is None:
                    return
                self._key = _loads(buffer[self._pos : end])
                self._pos, self._state = end, "colon"
            elif self._state == "colon":
                _expect(char == ":")
                self._pos += 1
                self._state = "value"
            elif self._state == "value":
                if not self._value(buffer, char, events):
                    return
            else:  # after a member
                if char == ",":
                    self._pos += 1
                    self._state = "key"
                else:
                    _expect(char == "}")
                    self._pos += 1
                    self._close(events)

    def _value(self, buffer: str, char: str, events: list[_Event]) -> bool:
        """Consume the current member's value; False to wait for more text."""
        if self._key == "name" and self._name is None:
            _expect(char == '"')
            end = _string_end(buffer, self._pos)
            if end is None:
                return False
            name = _loads(buffer[self._pos : end])
            _expect(isinstance(name, str) and bool(name))
            self._name, self._pos, self._state = name, end, "after"
            if self._held_args is not None:
                self._start(events, self._held_args)
            return True
        if self._key in _ARGUMENT_KEYS and not self._seen_args:
            self._seen_args = True
            if char == "{" and self._name is not None:
                self._start(events, "")
                self._state = "args"
                return True
            end = _value_end(buffer, self._pos)
            if end is None:
                self._seen_args = False
                return False
            value = _loads(buffer[self._pos : end])
            if isinstance(value, str):  # arguments given as JSON text
                text, value = value, _loads(value)
            else:
                text = buffer[self._pos : end]
            _expect(isinstance(value, dict))
            self._pos, self._state = end, "after"
            if self._name is not None:
                self._start(events, text)
            else:
                self._held_args = text
            return True
        end = _value_end(buffer, self._pos)
        if end is None:
            return False
        _loads(buffer[self._pos : end])
        self._pos, self._state = end, "after"
        return True

    def _stream_args(self, events: list[_Event]) -> None:
        """Send the arguments object's text up to what has arrived, tracking its depth."""
        buffer, start = self.raw, self._pos
        index = start
        while index < len(buffer):
            char = buffer[index]
            index += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "after"
                    break
        if index > start:
            events.append(("args", buffer[start:index]))
        self._pos = index

    def _start(self, events: list[_Event], arguments: str) -> None:
        assert self._name is not None
        self.started = True
        events.append(("start", self._name))
        if arguments:
            events.append(("args", arguments))

    def _close(self, events: list[_Event]) -> None:
        _expect(self._name is not None)
        if not self.started:
            self._start(events, self._held_args if self._held_args is not None else "{}")
        self._state = "done"


def _expect(ok: bool) -> None:
    if not ok:
        raise _Failed


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise _Failed from error


def _string_end(text: str, start: int) -> int | None:
    """The index past the JSON string opening at `start`; None when it has not closed yet."""
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            return index + 1
        index += 1
    return None


def _value_end(text: str, start: int) -> int | None:
    """The index past the JSON value starting at `start`; None when it may not be complete."""
    first = text[start]
    if first == '"':
        return _string_end(text, start)
    if first in "{[":
        depth, index, in_string, escaped = 0, start, False, False
        while index < len(text):
            char = text[index]
            index += 1
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return index
        return None
    index = start
    while index < len(text) and text[index] not in ",}]" + _WHITESPACE:
        index += 1
    return index if index < len(text) else None


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (to hold back)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _content(events: list[_Event], text: str) -> None:
    if text:
        events.append(("content", text))

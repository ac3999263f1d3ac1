"""POST /v1/responses: the OpenAI Responses API, stateless, as one chat Generate call upstream.

Stateless: nothing is stored. `store` is accepted and ignored, and what needs a stored response
(`previous_response_id`, `conversation`, `background`) is refused with a 400; a client replays the
conversation in `input` instead (its earlier output items included, which are accepted as input).

The worker's messages become output items in the order they arrive: a reasoning item (reasoning
text), a message (text), then one function_call item per tool call. The same builder produces the
stream events and the final response, so a streamed response ends exactly as the plain one reads.
Streams are primed as every stream is (http_helpers.py: an early failure is a plain HTTP error); a
failure after the stream started is sent as an `error` event, which ends it. Finish reasons (as
translation.py names them): "length" -> "incomplete" with reason "max_output_tokens"; "abort" (the
worker gave up, e.g. draining) -> "incomplete" without a reason, so a cut-short answer never passes
for a finished one.

Roles, tool definitions, tool choices and text.format constraints are built by the functions chat
uses (translation.py, tools.py, structured.py); what is read here are the Responses API's own
shapes (input items, flat function tools, text.format).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from pydantic import BaseModel, ValidationError

from chatfleet.v1 import worker_pb2
from services.common.errors import ChatfleetError, InvalidRequestError
from services.gateway.clients import Upstream
from services.gateway.errors import APIError, from_validation_errors, to_api_error
from services.gateway.http_helpers import (
    EventStream,
    HandledError,
    RequestContext,
    RouteTimeouts,
    chained,
    first_item,
    merge_streams,
)
from services.gateway.responses_protocol import (
    RESPONSES_FIELD_NAMES,
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolEcho,
    FunctionToolParam,
    IncompleteDetails,
    InputMessageItem,
    InputTextPart,
    InputTokensDetails,
    ItemStatus,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTextPart,
    ReasoningItem,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ReasoningTextPart,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponsesUsage,
    StreamEvent,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    TextFormatText,
)
from services.gateway.structured import WORKER_CONSTRAINT_PARAM, text_format_constraint
from services.gateway.tools import TOOL_CHOICE_MODES, tool_choice, tool_definition
from services.gateway.translation import ROLES, finish_reason, unsupported

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Worker parameters that are spelled differently in a Responses request.
_PARAM_NAMES = {WORKER_CONSTRAINT_PARAM: "text.format"}
# Finish reasons that leave a response incomplete -> its incomplete_details.reason.
_INCOMPLETE_REASONS: dict[str, Literal["max_output_tokens"] | None] = {
    "length": "max_output_tokens",
    "abort": None,
}


class ResponsesServing:
    """The handler of POST /v1/responses; one per app, sharing the chat routes' upstream."""

    def __init__(self, upstream: Upstream, timeouts: RouteTimeouts | None = None) -> None:
        self.upstream = upstream
        self.timeouts = timeouts or RouteTimeouts()

    async def create_response(
        self, request: ResponsesRequest, ctx: RequestContext
    ) -> ResponseObject | EventStream:
        generate = to_generate_request(request)
        generate.request_id = ctx.request_id
        deadline = self.timeouts.generation(request.stream, ctx)
        merged = merge_streams(
            [self.upstream.generate(generate, deadline=deadline, metadata=ctx.metadata)]
        )
        shell = _ResponseShell.of(request)
        builder = _OutputBuilder()
        if request.stream:
            try:
                first = await first_item(merged, self.timeouts.first_token)
            except grpc.aio.AioRpcError as error:
                raise _api_error(error) from None
            return EventStream(_stream_events(shell, builder, first, merged), merged.aclose)
        try:
            async with aclosing(merged):
                async for _, message in merged:
                    builder.add(message)
        except grpc.aio.AioRpcError as error:
            raise _api_error(error) from None
        builder.close()
        return builder.response(shell)


def _api_error(error: APIError | ChatfleetError | grpc.aio.AioRpcError) -> APIError:
    """The gateway's one error mapping, with worker parameter names put in Responses terms."""
    api_error = to_api_error(error)
    if api_error.param is not None:
        head = api_error.param.partition(".")[0]
        if head in _PARAM_NAMES:
            api_error.param = _PARAM_NAMES[head]
    return api_error


# --- request translation --------------------------------------------------------------------------


def to_generate_request(request: ResponsesRequest) -> worker_pb2.GenerateRequest:
    """The chat Generate call answering a Responses request (request_id left to the caller)."""
    _reject_unsupported(request)
    tools = _tools(request.tools)
    messages = []
    if request.instructions:
        messages.append(worker_pb2.ChatMessage(role="system", content=request.instructions))
    messages.extend(_input_messages(request.input))
    generate = worker_pb2.GenerateRequest(
        model=request.model,
        chat=worker_pb2.ChatMessages(
            messages=messages, tools=[_tool_definition(tool) for tool in tools]
        ),
    )
    if request.temperature is not None:
        generate.sampling.temperature = request.temperature
    if request.top_p is not None:
        generate.sampling.top_p = request.top_p
    if request.max_output_tokens is not None:
        generate.stopping.max_tokens = request.max_output_tokens
    choice = _tool_choice(request.tool_choice, tools, request.parallel_tool_calls)
    if choice is not None:
        generate.tool_choice.CopyFrom(choice)
    constraint = _constraint(request.text.format if request.text else None)
    if constraint is not None:
        generate.constraint.CopyFrom(constraint)
    return generate


def _reject_unsupported(request: ResponsesRequest) -> None:
    stateless = "responses are not stored; send the whole conversation in 'input'"
    if request.previous_response_id is not None:
        raise unsupported("previous_response_id", stateless)
    if request.conversation is not None:
        raise unsupported("conversation", stateless)
    if request.background:
        raise unsupported("background", "responses are answered while the request is open")
    if request.prompt is not None:
        raise unsupported("prompt", "stored prompt templates are not available")
    if request.top_logprobs:
        raise unsupported("top_logprobs", "logprobs are not available on this route")
    if request.reasoning is not None:
        # Reasoning models think as their template and parser say; there is no budget to set.
        logger.warning(
            "ignoring 'reasoning' (effort %r): not configurable", request.reasoning.effort
        )


def _validated(model: type[M], value: Any, where: tuple[str | int, ...]) -> M:
    """`value` as `model`, failures reported at `where` through the gateway's error mapping."""
    try:
        return model.model_validate(value)
    except ValidationError as error:
        errors = [
            {**entry, "loc": (*where, *entry["loc"])} for entry in error.errors(include_url=False)
        ]
        raise from_validation_errors(errors, RESPONSES_FIELD_NAMES) from None


def _param(where: Sequence[str | int]) -> str:
    path = ""
    for part in where:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _object(value: Any, where: tuple[str | int, ...], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{_param(where)}' must be {what}.", param=_param(where))
    return value


def _input_messages(value: str | list[Any]) -> list[worker_pb2.ChatMessage]:
    if isinstance(value, str):
        return [worker_pb2.ChatMessage(role="user", content=value)]
    if not value:
        raise InvalidRequestError("'input' must not be empty.", param="input")
    messages: list[worker_pb2.ChatMessage] = []
    names: dict[str, str] = {}  # call_id -> function name, for the tool turns
    for i, raw in enumerate(value):
        where: tuple[str | int, ...] = ("input", i)
        item = _object(raw, where, "an object (a message or a function call item)")
        kind = item.get("type", "message")
        if kind == "message":
            message = _validated(InputMessageItem, item, where)
            messages.append(
                worker_pb2.ChatMessage(role=ROLES[message.role], content=_text(message.content))
            )
        elif kind == "function_call":
            call = _validated(FunctionCallItem, item, where)
            names[call.call_id] = call.name
            tool_call = worker_pb2.ToolCall(
                id=call.call_id, name=call.name, arguments=call.arguments
            )
            last = messages[-1] if messages else None
            # Calls that follow an assistant turn (its text, or other calls) belong to that turn.
            if last is not None and last.role == "assistant":
                last.tool_calls.append(tool_call)
            else:
                messages.append(worker_pb2.ChatMessage(role="assistant", tool_calls=[tool_call]))
        elif kind == "function_call_output":
            result = _validated(FunctionCallOutputItem, item, where)
            messages.append(
                worker_pb2.ChatMessage(
                    role="tool",
                    content=_text(result.output),
                    tool_call_id=result.call_id,
                    name=names.get(result.call_id, ""),
                )
            )
        elif kind == "reasoning":
            # Earlier reasoning sent back: chat templates drop past thinking, and so do we.
            continue
        else:
            raise InvalidRequestError(
                f"Input items of type {kind!r} are not supported: only messages, function_call "
                "and function_call_output items are.",
                param=_param((*where, "type")),
            )
    return messages


def _text(content: str | list[InputTextPart]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def _tools(raw: list[Any] | None) -> list[FunctionToolParam]:
    tools = []
    for i, value in enumerate(raw or ()):
        where: tuple[str | int, ...] = ("tools", i)
        tool = _object(value, where, "an object")
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"Tools of type {tool.get('type')!r} are not supported: only 'function' tools are.",
                param=_param((*where, "type")),
            )
        tools.append(_validated(FunctionToolParam, tool, where))
    names = [tool.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequestError(
                f"Two tools are named {name!r}.", param=_param(("tools", i, "name"))
            )
    return tools


def _strict(tool: FunctionToolParam) -> bool:
    return True if tool.strict is None else tool.strict


def _tool_definition(tool: FunctionToolParam) -> worker_pb2.ToolDefinition:
    # Empty parameters ({}) are sent as none, as this route always has.
    return tool_definition(
        tool.name, tool.description, tool.parameters or None, strict=_strict(tool)
    )


def _tool_choice(
    value: Any, tools: Sequence[FunctionToolParam], parallel: bool | None
) -> worker_pb2.ToolChoice | None:
    """The worker's ToolChoice; None when there are no tools (and none was asked for)."""
    if value is None:
        return tool_choice("auto", parallel) if tools else None
    if isinstance(value, str):
        if value not in TOOL_CHOICE_MODES:
            raise InvalidRequestError(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                '{"type": "function", "name": ...}.',
                param="tool_choice",
            )
        if value == "required" and not tools:
            raise InvalidRequestError(
                "'tool_choice' is 'required' but no tools were given.", param="tool_choice"
            )
        return tool_choice(value, parallel) if tools else None
    named = _object(value, ("tool_choice",), 'a string or {"type": "function", "name": ...}')
    if named.get("type") != "function":
        raise InvalidRequestError(
            f"'tool_choice' of type {named.get('type')!r} is not supported: only 'function' is.",
            param="tool_choice.type",
        )
    name = named.get("name")
    if not isinstance(name, str) or name not in {tool.name for tool in tools}:
        raise InvalidRequestError(
            f"'tool_choice.name' must name one of the function tools, got {name!r}.",
            param="tool_choice.name",
        )
    return tool_choice(None, parallel, name=name)


def _constraint(value: dict[str, Any] | None) -> worker_pb2.OutputConstraint | None:
    if value is None:
        return None
    where: tuple[str | int, ...] = ("text", "format")
    kind = value.get("type")
    if kind == "text":
        _validated(TextFormatText, value, where)
        return text_format_constraint(kind)
    if kind == "json_object":
        _validated(TextFormatJSONObject, value, where)
        return text_format_constraint(kind)
    if kind == "json_schema":
        schema = _validated(TextFormatJSONSchema, value, where)
        return text_format_constraint(kind, schema.schema_)
    raise InvalidRequestError(
        f"'text.format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
        param="text.format.type",
    )


# --- response shaping -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResponseShell:
    """The parts of a response known before generation: ids and the request's settings echoed."""

    id: str
    created_at: int
    echo: dict[str, Any]

    @classmethod
    def of(cls, request: ResponsesRequest) -> _ResponseShell:
        tools = [
            FunctionToolEcho(
                name=tool.name,
                description=tool.description,
                parameters=tool.parameters,
                strict=_strict(tool),
            )
            for tool in _tools(request.tools)
        ]
        text_format = request.text.format if request.text and request.text.format else None
        echo = {
            "model": request.model,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "tools": tools,
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "text": {"format": text_format or {"type": "text"}},
            "metadata": request.metadata or {},
            "user": request.user,
            "truncation": request.truncation or "disabled",
        }
        return cls(f"resp_{uuid.uuid4().hex}", int(time.time()), echo)

    def response(self, **fields: Any) -> ResponseObject:
        return ResponseObject(id=self.id, created_at=self.created_at, **self.echo, **fields)


@dataclass
class _OpenItem:
    """The output item being built, and its text so far (joined once, when it is closed)."""

    item: OutputItem
    index: int
    pieces: list[str] = field(default_factory=list)
    tool_call_index: int | None = None


@dataclass
class _OutputBuilder:
    """Turns the worker's messages into output items, and the events of a stream building them."""

    items: list[OutputItem] = field(default_factory=list)
    finish: int = worker_pb2.FINISH_REASON_UNSPECIFIED
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    _open: _OpenItem | None = None

    def add(self, message: worker_pb2.GenerateResponse) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if message.reasoning_text:
            events += self._reasoning(message.reasoning_text)
        if message.text:
            events += self._text(message.text)
        for delta in message.tool_calls:
            events += self._tool_call(delta)
        if message.finish_reason:
            self.finish = message.finish_reason
            self.input_tokens = message.usage.prompt_tokens
            self.cached_tokens = message.cached_prompt_tokens
            self.output_tokens = message.usage.completion_tokens
        return events

    def close(self) -> list[StreamEvent]:
        """Finish the last item; an answer with no output at all gets an empty message."""
        events: list[StreamEvent] = []
        if not self.items:
            events += self._open_item(OutputMessage(id=_item_id("msg")))
        events += self._close(self._last_status())
        return events

    def status(self) -> ResponseStatus:
        return "incomplete" if finish_reason(self.finish) in _INCOMPLETE_REASONS else "completed"

    def response(self, shell: _ResponseShell) -> ResponseObject:
        details = None
        reason = finish_reason(self.finish)
        if reason in _INCOMPLETE_REASONS:
            details = IncompleteDetails(reason=_INCOMPLETE_REASONS[reason])
        return shell.response(
            status=self.status(),
            incomplete_details=details,
            output=list(self.items),
            usage=ResponsesUsage(
                input_tokens=self.input_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=self.cached_tokens),
                output_tokens=self.output_tokens,
                total_tokens=self.input_tokens + self.output_tokens,
            ),
        )

    def _last_status(self) -> ItemStatus:
        return "incomplete" if self.status() == "incomplete" else "completed"

    # --- items ---

    def _reasoning(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = self._open
        if current is None or not isinstance(current.item, ReasoningItem):
            events += self._close("completed")
            events += self._open_item(ReasoningItem(id=_item_id("rs")))
            current = self._open
        assert current is not None
        current.pieces.append(text)
        events.append(
            ReasoningTextDeltaEvent(item_id=current.item.id, output_index=current.index, delta=text)
        )
        return events

    def _text(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = self._open
        if current is None or not isinstance(current.item, OutputMessage):
            events += self._close("completed")
            events += self._open_item(OutputMessage(id=_item_id("msg")))
            current = self._open
        assert current is not None
        current.pieces.append(text)
        events.append(
            OutputTextDeltaEvent(item_id=current.item.id, output_index=current.index, delta=text)
        )
        return events

    def _tool_call(self, delta: worker_pb2.ToolCallDelta) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = self._open
        if current is None or current.tool_call_index != delta.index:
            events += self._close("completed")
            call = OutputFunctionCall(
                id=_item_id("fc"), call_id=delta.id or _item_id("call"), name=delta.name
            )
            events += self._open_item(call)
            current = self._open
            assert current is not None
            current.tool_call_index = delta.index
        if delta.arguments:
            current.pieces.append(delta.arguments)
            events.append(
                FunctionCallArgumentsDeltaEvent(
                    item_id=current.item.id, output_index=current.index, delta=delta.arguments
                )
            )
        return events

    def _open_item(self, item: OutputItem) -> list[StreamEvent]:
        index = len(self.items)
        self.items.append(item)
        self._open = _OpenItem(item, index)
        events: list[StreamEvent] = [
            OutputItemEvent(
                type="response.output_item.added", output_index=index, item=item.model_copy()
            )
        ]
        if isinstance(item, OutputMessage):
            events.append(_part_event("added", item.id, index, OutputTextPart()))
        elif isinstance(item, ReasoningItem):
            events.append(_part_event("added", item.id, index, ReasoningTextPart()))
        return events

    def _close(self, status: ItemStatus) -> list[StreamEvent]:
        current, self._open = self._open, None
        if current is None:
            return []
        item, index = current.item, current.index
        text = "".join(current.pieces)
        item.status = status
        events: list[StreamEvent] = []
        if isinstance(item, OutputMessage):
            part = OutputTextPart(text=text)
            item.content = [part]
            events.append(OutputTextDoneEvent(item_id=item.id, output_index=index, text=text))
            events.append(_part_event("done", item.id, index, part))
        elif isinstance(item, ReasoningItem):
            reasoning = ReasoningTextPart(text=text)
            item.content = [reasoning]
            events.append(ReasoningTextDoneEvent(item_id=item.id, output_index=index, text=text))
            events.append(_part_event("done", item.id, index, reasoning))
        else:
            item.arguments = text
            events.append(
                FunctionCallArgumentsDoneEvent(
                    item_id=item.id, output_index=index, name=item.name, arguments=text
                )
            )
        events.append(
            OutputItemEvent(
                type="response.output_item.done", output_index=index, item=item.model_copy()
            )
        )
        return events


def _part_event(
    stage: str, item_id: str, index: int, part: OutputTextPart | ReasoningTextPart
) -> ContentPartEvent:
    return ContentPartEvent(
        type="response.content_part.added" if stage == "added" else "response.content_part.done",
        item_id=item_id,
        output_index=index,
        part=part.model_copy(),
    )


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- streaming ------------------------------------------------------------------------------------


def _numbered() -> Callable[[StreamEvent], str]:
    """An SSE writer numbering the events of one stream from 0."""
    counter = itertools.count()

    def sse(event: StreamEvent) -> str:
        event.sequence_number = next(counter)
        return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"

    return sse


async def _stream_events(
    shell: _ResponseShell,
    builder: _OutputBuilder,
    first: tuple[int, worker_pb2.GenerateResponse] | None,
    merged: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
) -> AsyncGenerator[str, None]:
    sse = _numbered()
    try:
        started = shell.response(status="in_progress")
        yield sse(ResponseLifecycleEvent(type="response.created", response=started))
        yield sse(ResponseLifecycleEvent(type="response.in_progress", response=started))
        async for _, message in chained(first, merged):
            for event in builder.add(message):
                yield sse(event)
        for event in builder.close():
            yield sse(event)
        final = builder.response(shell)
        if final.status == "completed":
            yield sse(ResponseLifecycleEvent(type="response.completed", response=final))
        else:
            yield sse(ResponseLifecycleEvent(type="response.incomplete", response=final))
    except HandledError as error:
        api_error = _api_error(error)
        logger.warning("response stream failed after it started: %s", api_error.message)
        yield sse(ErrorEvent(code=api_error.code, message=api_error.message, param=api_error.param))
    finally:
        await merged.aclose()

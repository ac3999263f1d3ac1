"""The handler of POST /v1/chat/completions (and FastChat's /api/v1/chat/completions, and the web
UI's arena answers): check a chat request, translate it to Generate calls, reply in one piece or as
a stream of chunks.

Choices: `n` runs that many Generate calls concurrently, choice i with seed+i when a seed is given.
Streams are primed and timed as http_helpers.py describes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.clients import Upstream
from services.gateway.http_helpers import (
    SSE_DONE,
    EventStream,
    HandledError,
    RequestContext,
    RouteTimeouts,
    chained,
    first_item,
    merge_streams,
    sse,
    sse_error,
)
from services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    DeltaMessage,
)
from services.gateway.structured import output_constraint
from services.gateway.tools import chat_tools
from services.gateway.translation import (
    GeneratedChoice,
    chat_logprobs,
    choice_request,
    constrain,
    conversation,
    finish_reason,
    stopping,
    unsupported,
    usage,
    with_client_params,
    worker_param_renames,
)


class ChatServing:
    """Chat completions; one per app, holding the upstream clients."""

    def __init__(self, upstream: Upstream, timeouts: RouteTimeouts | None = None) -> None:
        self.upstream = upstream
        self.timeouts = timeouts or RouteTimeouts()

    async def create_chat_completion(
        self, request: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | EventStream:
        _reject_unsupported_chat(request)
        n = request.n or 1
        tools = chat_tools(request)
        constraint = output_constraint(request)
        base = worker_pb2.GenerateRequest(
            model=request.model,
            chat=conversation(request, tools),
            stopping=stopping(request, request.max_completion_tokens or request.max_tokens),
        )
        if tools.choice is not None:
            base.tool_choice.CopyFrom(tools.choice)
        constrain(base, constraint, tools)
        if request.logprobs:
            base.logprobs.enabled = True
            base.logprobs.top_logprobs = request.top_logprobs or 0
        deadline = self.timeouts.generation(request.stream, ctx)
        renames = worker_param_renames(constraint, tools)
        calls = [
            with_client_params(
                self.upstream.generate(
                    choice_request(
                        base, request, ctx.request_id, index=i, seed_offset=i, many=n > 1
                    ),
                    deadline=deadline,
                    metadata=ctx.metadata,
                ),
                renames,
            )
            for i in range(n)
        ]
        merged = merge_streams(calls)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if request.stream:
            first = await first_item(merged, self.timeouts.first_token)
            events = _chat_events(request, response_id, created, n, first, merged)
            return EventStream(events, merged.aclose)

        choices = [GeneratedChoice() for _ in range(n)]
        async with aclosing(merged):
            async for index, message in merged:
                choices[index].add(message)
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=choice.chat_message(),
                    logprobs=chat_logprobs(choice.logprobs) if request.logprobs else None,
                    finish_reason=choice.finish_reason(),
                )
                for i, choice in enumerate(choices)
            ],
            usage=usage(choices, prompts=[choices[0]]),
        )


async def _chat_events(
    request: ChatCompletionRequest,
    response_id: str,
    created: int,
    n: int,
    first: tuple[int, worker_pb2.GenerateResponse] | None,
    merged: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
) -> AsyncGenerator[str, None]:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    has_tools = bool(request.tools or request.functions)

    def chunk(choices: list[ChatCompletionStreamChoice]) -> str:
        return sse(
            ChatCompletionChunk(
                id=response_id, created=created, model=request.model, choices=choices
            ),
            include_usage,
        )

    choices = [GeneratedChoice() for _ in range(n)]
    try:
        for i in range(n):
            # With tools the answer may be calls only, whose content stays null (as OpenAI's).
            delta = DeltaMessage(role="assistant", content=None if has_tools else "")
            yield chunk([ChatCompletionStreamChoice(index=i, delta=delta)])
        async for index, message in chained(first, merged):
            tool_calls = choices[index].add(message)
            reasoning = message.reasoning_text or None
            if message.text or message.logprobs or reasoning or tool_calls:
                # content "" only on a chunk that carries nothing else (logprobs alone).
                text = message.text or (None if reasoning or tool_calls else "")
                yield chunk(
                    [
                        ChatCompletionStreamChoice(
                            index=index,
                            delta=DeltaMessage(
                                content=text,
                                reasoning_content=reasoning,
                                tool_calls=tool_calls or None,
                            ),
                            logprobs=chat_logprobs(message.logprobs) if request.logprobs else None,
                        )
                    ]
                )
            if message.finish_reason:
                yield chunk(
                    [
                        ChatCompletionStreamChoice(
                            index=index,
                            delta=DeltaMessage(),
                            finish_reason=finish_reason(message.finish_reason),
                        )
                    ]
                )
        if include_usage:
            final = ChatCompletionChunk(
                id=response_id,
                created=created,
                model=request.model,
                choices=[],
                usage=usage(choices, prompts=[choices[0]]),
            )
            yield sse(final, include_usage)
    except HandledError as error:
        yield sse_error(error)
    finally:
        await merged.aclose()
    yield SSE_DONE


def _reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.audio is not None:
        raise unsupported("audio", "only text output is available")
    if request.modalities not in (None, ["text"]):
        raise unsupported("modalities", 'only ["text"] is available')
    if request.prediction is not None:
        raise unsupported("prediction", "predicted outputs are not available")
    if request.reasoning_effort is not None:
        raise unsupported("reasoning_effort", "the models do not take a reasoning budget")
    if request.web_search_options is not None:
        raise unsupported("web_search_options", "web search is not available")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError(
            "'logprobs' must be true when 'top_logprobs' is given.", param="top_logprobs"
        )

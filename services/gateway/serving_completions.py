"""The handler of POST /v1/completions (the legacy text completions): check a request, run one
Generate call per prompt and choice, reply in one piece or as a stream of chunks.

Choices: `n` (times each prompt) runs that many Generate calls concurrently, choice i with seed+i
when a seed is given. `echo` with logprobs scores the prompt (lm-eval's loglikelihood). Streams are
primed and timed as http_helpers.py describes.
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
    CompletionChoice,
    CompletionChunk,
    CompletionPrompt,
    CompletionRequest,
    CompletionResponse,
)
from services.gateway.structured import output_constraint
from services.gateway.translation import (
    GeneratedChoice,
    choice_request,
    constrain,
    finish_reason,
    legacy_logprobs,
    stopping,
    unsupported,
    usage,
    with_client_params,
    worker_param_renames,
)

# OpenAI's default for the legacy completions endpoint (chat has no default: up to the context).
DEFAULT_COMPLETION_MAX_TOKENS = 16


class CompletionServing:
    """Text completions; one per app, holding the upstream clients."""

    def __init__(self, upstream: Upstream, timeouts: RouteTimeouts | None = None) -> None:
        self.upstream = upstream
        self.timeouts = timeouts or RouteTimeouts()

    async def create_completion(
        self, request: CompletionRequest, ctx: RequestContext
    ) -> CompletionResponse | EventStream:
        _reject_unsupported_completion(request)
        n = request.n or 1
        prompts = _completion_prompts(request.prompt)
        constraint = output_constraint(request)
        renames = worker_param_renames(constraint, None)
        max_tokens = (
            DEFAULT_COMPLETION_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        )
        deadline = self.timeouts.generation(request.stream, ctx)
        calls = []
        for p, prompt in enumerate(prompts):
            base = worker_pb2.GenerateRequest(
                model=request.model,
                stopping=stopping(request, max_tokens),
                echo=bool(request.echo),
            )
            if isinstance(prompt, str):
                base.text = prompt
            else:
                base.token_ids.ids.extend(prompt)
            if request.logprobs is not None:
                base.logprobs.enabled = True
                base.logprobs.top_logprobs = request.logprobs
                # Scoring a prompt (lm-eval's loglikelihood): its logprobs come with the echo.
                base.logprobs.prompt = bool(request.echo)
            constrain(base, constraint, None)
            many = len(prompts) * n > 1
            for j in range(n):
                call = choice_request(
                    base, request, ctx.request_id, index=p * n + j, seed_offset=j, many=many
                )
                stream = self.upstream.generate(call, deadline=deadline, metadata=ctx.metadata)
                calls.append(with_client_params(stream, renames))
        merged = merge_streams(calls)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if request.stream:
            first = await first_item(merged, self.timeouts.first_token)
            events = _completion_events(request, response_id, created, n, len(calls), first, merged)
            return EventStream(events, merged.aclose)

        choices = [GeneratedChoice() for _ in calls]
        async with aclosing(merged):
            async for index, message in merged:
                choices[index].add(message)
        return CompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=choice.text(),
                    logprobs=choice.legacy_logprobs() if request.logprobs is not None else None,
                    finish_reason=choice.finish_reason(),
                )
                for i, choice in enumerate(choices)
            ],
            usage=usage(choices, prompts=choices[::n]),
        )


async def _completion_events(
    request: CompletionRequest,
    response_id: str,
    created: int,
    n: int,
    total: int,
    first: tuple[int, worker_pb2.GenerateResponse] | None,
    merged: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
) -> AsyncGenerator[str, None]:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    choices = [GeneratedChoice() for _ in range(total)]
    try:
        async for index, message in chained(first, merged):
            choice = choices[index]
            offset = choice.text_length
            choice.add(message)
            if not (message.text or message.logprobs or message.finish_reason):
                continue
            logprobs = None
            if request.logprobs is not None:
                logprobs = legacy_logprobs(list(message.logprobs), offset)
            finish = None
            if message.finish_reason:
                finish = finish_reason(message.finish_reason)
            yield sse(
                CompletionChunk(
                    id=response_id,
                    created=created,
                    model=request.model,
                    choices=[
                        CompletionChoice(
                            index=index,
                            text=message.text,
                            logprobs=logprobs,
                            finish_reason=finish,
                        )
                    ],
                ),
                include_usage,
            )
        if include_usage:
            final = CompletionChunk(
                id=response_id,
                created=created,
                model=request.model,
                choices=[],
                usage=usage(choices, prompts=choices[::n]),
            )
            yield sse(final, include_usage)
    except HandledError as error:
        yield sse_error(error)
    finally:
        await merged.aclose()
    yield SSE_DONE


def _reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.suffix:
        raise unsupported("suffix", "insertion (fill in the middle) is not available")
    if request.best_of not in (None, 1, request.n or 1):
        raise unsupported("best_of", "best_of must be left out or equal n")
    if request.max_tokens == 0 and not request.echo:
        raise InvalidRequestError(
            "'max_tokens' may be 0 only with 'echo': it scores the prompt without generating.",
            param="max_tokens",
        )


def _completion_prompts(prompt: CompletionPrompt) -> list[str | list[int]]:
    """One entry per prompt: a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("'prompt' must not be empty.", param="prompt")
    prompts: list[str | list[int]] = []
    ids: list[int] = []
    for i, item in enumerate(prompt):
        if isinstance(item, int):
            ids.append(item)
            continue
        if isinstance(item, list) and not item:
            raise InvalidRequestError("A token id prompt must not be empty.", param=f"prompt[{i}]")
        prompts.append(item)  # type: ignore[arg-type]  # a str or a list of ints
    # pydantic guarantees a list of ints, of strings or of int lists: never a mix.
    return [ids] if ids else prompts

"""The default models through the engine (slow: loads the real SmolLM2 and all-MiniLM-L6-v2)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from services.worker.default_models import default_model_specs
from services.worker.engine.detokenizer import IncrementalDetokenizer, make_decode_fn
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import (
    ChatMessage,
    Engine,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions

# One event loop for the module, so each model loads once.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def specs() -> list:  # type: ignore[type-arg]
    try:
        return default_model_specs()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chat(specs: list) -> AsyncIterator[Engine]:  # type: ignore[type-arg]
    engine = create_engine(specs[0], EngineOptions())
    await engine.start()
    yield engine
    await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedder(specs: list) -> AsyncIterator[Engine]:  # type: ignore[type-arg]
    engine = create_engine(specs[1], EngineOptions())
    await engine.start()
    yield engine
    await engine.stop()


async def test_smollm2_knows_the_capital_of_france(chat: Engine) -> None:
    assert chat.description.name == "SmolLM2-135M-Instruct"
    assert chat.description.context_length == 8192
    request = GenerationRequest(
        request_id="paris",
        prompt=[ChatMessage("user", "What is the capital of France?")],
        sampling=SamplingParams(temperature=0.0),
        stopping=StoppingParams(max_tokens=24),
    )
    text = ""
    async for chunk in chat.generate(request):
        text += chunk.text
    assert "Paris" in text
    assert chunk.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_smollm2_tokenizer_streams_like_a_full_decode(chat: Engine) -> None:
    ids = await chat.tokenize("Ça va? 日本語 🙂 naïve — «quotes»")
    tokenizer = chat._loaded.tokenizer  # type: ignore[attr-defined]
    detok = IncrementalDetokenizer(make_decode_fn(tokenizer))
    text = "".join(detok.step(t) for t in ids) + detok.flush()
    assert text == "Ça va? 日本語 🙂 naïve — «quotes»"


async def test_minilm_similar_sentences_are_closer(embedder: Engine) -> None:
    vectors, _ = await embedder.embed(
        [
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Quarterly revenue grew by eight percent.",
        ]
    )

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert all(math.isclose(cosine(v, v), 1.0, rel_tol=1e-5) for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2

"""An encoder (BERT-like) folder becomes an embedding-only engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from models import save_tiny_bert
from transformers import AutoModel, AutoTokenizer

from services.common.errors import InvalidRequestError
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import ChatMessage, Engine, GenerationRequest
from services.worker.engine.loading import EngineOptions, ModelSpec


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), max_positions=64)


@pytest.fixture
async def engine(bert_dir: Path) -> AsyncIterator[Engine]:
    engine = create_engine(ModelSpec(str(bert_dir), ("bert", "mini")), EngineOptions(threads=1))
    await engine.start()
    yield engine
    await engine.stop()


async def test_description(engine: Engine) -> None:
    d = engine.description
    assert (d.name, d.aliases) == ("bert", ("mini",))
    assert d.supports_embeddings and not d.supports_generate and not d.supports_chat
    assert d.context_length == 64


async def test_embeddings_are_normalised_mean_pools(engine: Engine, bert_dir: Path) -> None:
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "paris"]
    vectors, tokens = await engine.embed(texts)
    assert vectors == (await engine.embed(texts))[0]
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = AutoModel.from_pretrained(bert_dir).eval()
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    assert tokens == sum(len(ids) for ids in encoded)
    for ids, vector in zip(encoded, vectors, strict=True):
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        assert torch.allclose(torch.tensor(vector), expected, atol=1e-5)
        assert torch.tensor(vector).norm().item() == pytest.approx(1.0, abs=1e-5)


async def test_long_input_keeps_its_closing_sep(engine: Engine) -> None:
    _, tokens = await engine.embed(["hello " * 200])
    assert tokens == 64


async def test_generation_and_chat_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as err:
        async for _ in engine.generate(GenerationRequest("g", "hello")):
            pass
    assert err.value.param == "model"
    with pytest.raises(InvalidRequestError) as err:
        await engine.tokenize([ChatMessage("user", "hello")])
    assert err.value.param == "messages"
    assert (await engine.tokenize("hello world"))[0] == 2  # [CLS]

"""The default model's GGUF tokenizer is converted once, then read back from the cache: the same
tokens and chat template either way, and a damaged cache only costs a new conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import transformers

from services.worker.default_models import default_model_specs
from services.worker.engine.loading import _load_tokenizer, resolve_source, tokenizer_cache_root

pytestmark = pytest.mark.integration

TEXT = "Hello wörld: 12 345 — code ```py\nprint('x')\n```"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATFLEET_CACHE_DIR", str(tmp_path))
    source = resolve_source(default_model_specs()[0].path)
    sources: list[str] = []
    original = transformers.AutoTokenizer.from_pretrained

    def recording(path: Any, *args: Any, **kwargs: Any) -> Any:
        sources.append("gguf" if kwargs.get("gguf_file") else "cache")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)

    converted = _load_tokenizer(source)
    cached = _load_tokenizer(source)
    assert sources == ["gguf", "cache"]
    assert [p.name for p in tokenizer_cache_root().iterdir()] != []
    assert cached.encode(TEXT) == converted.encode(TEXT)
    assert cached.apply_chat_template(MESSAGES, add_generation_prompt=True) == (
        converted.apply_chat_template(MESSAGES, add_generation_prompt=True)
    )
    assert (cached.eos_token_id, cached.bos_token_id) == (
        converted.eos_token_id,
        converted.bos_token_id,
    )

    # A damaged cache entry is ignored (with a warning) and the GGUF converted again.
    for entry in tokenizer_cache_root().iterdir():
        (entry / "tokenizer.json").write_text("{not json")
    again = _load_tokenizer(source)
    assert sources[2:] == ["cache", "gguf"]
    assert again.encode(TEXT) == converted.encode(TEXT)

"""Sentence embeddings: mean of the last hidden state over real tokens, L2-normalised.

Truncation rule: a text longer than the model's context keeps its first `context_length` tokens,
and when the tokenizer ends every text with a special token (BERT's [SEP]) that token is kept as
the last one. Encoders use their embedding context (all-MiniLM-L6-v2: 256 tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from services.common.errors import InvalidRequestError

# Inputs are sorted by length and forwarded in batches of at most this many (padded) tokens.
MAX_BATCH_TOKENS = 8_192


def validate_inputs(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or len(texts) == 0:
        raise InvalidRequestError("input must be a non-empty list of strings", param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InvalidRequestError(f"input[{i}] is empty", param="input")


def tokenize_for_embedding(
    tokenizer: Any, texts: Sequence[str], context_length: int
) -> list[list[int]]:
    """Token ids per text (with the tokenizer's special tokens), truncated by the module's rule."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", ()))
    out: list[list[int]] = []
    for ids in encoded:
        ids = list(ids)
        if len(ids) > context_length:
            if ids[-1] in special:
                ids = [*ids[: context_length - 1], ids[-1]]
            else:
                ids = ids[:context_length]
        out.append(ids)
    return out


@torch.inference_mode()
def embed_token_ids(
    encoder: Callable[..., Any],
    batch: Sequence[Sequence[int]],
    device: torch.device,
    pad_id: int = 0,
) -> list[list[float]]:
    """Embeddings of pre-tokenized inputs, in input order. `encoder` returns last_hidden_state
    (a base model: BertModel, or a causal LM's decoder stack)."""
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]), reverse=True)
    vectors: list[torch.Tensor | None] = [None] * len(batch)
    start = 0
    while start < len(order):
        # The longest input comes first, so it sets the padded width of this group.
        width = len(batch[order[start]])
        size = max(1, MAX_BATCH_TOKENS // max(width, 1))
        group = order[start : start + size]
        start += len(group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            n = len(batch[i])
            ids[row, :n] = torch.tensor(batch[i], dtype=torch.long)
            mask[row, :n] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        normalised = F.normalize(pooled, p=2.0, dim=-1).cpu()
        for row, i in enumerate(group):
            vectors[i] = normalised[row]
    return torch.stack([v for v in vectors if v is not None]).tolist()

"""Next-token selection for a batch: one [B, V] logits tensor, per-row parameters and generators.

Order, as in HF generate and vLLM: repetition/presence/frequency penalties, logit_bias, min_tokens
suppression, the structured-output mask, (logprobs are read here), temperature, top-k, top-p,
min-p, then one draw per row from the row's own torch.Generator (greedy rows take the argmax).
Logprobs are therefore log_softmax of the penalised logits before temperature and truncation: the
model's own view of each token, which does not change with the sampling knobs. Each step of
processing touches only the rows that use it, so a row's result never depends on its batch.
The parameters' ranges are checked before a request is admitted (validation.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from services.worker.engine.constraints import SequenceConstraint, TokenMasker
from services.worker.engine.interface import SamplingParams

_NEG_INF = float("-inf")


class SamplingState:
    """One sequence's sampling parameters and the history the penalties need, kept across steps."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        vocab_size: int,
        prompt_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
        top_logprobs: int | None = None,
        suppress_ids: Iterable[int] = (),
        min_tokens: int = 0,
        logit_bias: Sequence[tuple[int, float]] = (),
        constraint: SequenceConstraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint  # the output grammar's matcher, advanced by record()
        self.greedy = params.temperature == 0.0
        self.top_logprobs = top_logprobs  # None: no logprobs; k: chosen token + k alternatives
        self.min_tokens = min_tokens
        self.num_output = 0
        # EOS and stop token ids are masked until min_tokens tokens exist.
        self.suppress_ids = (
            torch.tensor(sorted(set(suppress_ids)), dtype=torch.long, device=device)
            if min_tokens > 0
            else None
        )
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()  # non-deterministic
            else:
                self.generator.manual_seed(params.seed % 2**64)
        self.prompt_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        uses_repetition = params.repetition_penalty != 1.0
        if uses_repetition:
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            self.prompt_mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
        if uses_repetition or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        # Additive biases; a repeated id keeps its last value, as a JSON object's key would.
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        if logit_bias:
            biases = dict(logit_bias)
            self.bias_ids = torch.tensor(list(biases), dtype=torch.long, device=device)
            self.bias_values = torch.tensor(
                list(biases.values()), dtype=torch.float32, device=device
            )

    @property
    def has_penalties(self) -> bool:
        return self.output_counts is not None

    @property
    def suppressing(self) -> bool:
        return self.suppress_ids is not None and self.num_output < self.min_tokens

    def record(self, token_id: int) -> None:
        """Account for the token just chosen."""
        self.num_output += 1
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.constraint is not None:
            self.constraint.consume(token_id)


@dataclass(frozen=True)
class RowLogprobs:
    logprob: float  # of the chosen token
    top_ids: list[int]  # most likely first
    top_logprobs: list[float]


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]  # per row; None where not asked for


def sample(
    logits: torch.Tensor, rows: Sequence[SamplingState], masker: TokenMasker | None = None
) -> SampleOutput:
    """Pick one token per row of `logits` ([B, V], modified in place) and record it in `rows`.
    `masker` applies the grammar masks of constrained rows (one is made when none is given)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
    if logits.dtype != torch.float32:
        logits = logits.float()
    _apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        if row.bias_ids is not None:
            assert row.bias_values is not None
            logits[i, row.bias_ids] += row.bias_values
        if row.suppressing:
            assert row.suppress_ids is not None
            logits[i, row.suppress_ids] = _NEG_INF
    constrained = [(i, row.constraint) for i, row in enumerate(rows) if row.constraint is not None]
    if constrained:
        if masker is None:
            masker = TokenMasker(logits.shape[1])
        masker.apply(logits, constrained)

    logprob_rows = [i for i, row in enumerate(rows) if row.top_logprobs is not None]
    logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

    sampled_rows = [i for i, row in enumerate(rows) if not row.greedy]
    if not sampled_rows:
        tokens = logits.argmax(dim=-1)
    else:
        picked = _sample_rows(logits[sampled_rows], [rows[i] for i in sampled_rows])
        if len(sampled_rows) == len(rows):
            tokens = picked
        else:
            tokens = logits.argmax(dim=-1)
            tokens[sampled_rows] = picked
    token_ids: list[int] = tokens.tolist()

    out_logprobs: list[RowLogprobs | None] = [None] * len(rows)
    if logprobs is not None:
        chosen = logprobs.gather(1, tokens[logprob_rows].unsqueeze(1)).squeeze(1).tolist()
        k = max(rows[i].top_logprobs or 0 for i in logprob_rows)
        top_values: list[list[float]] = [[] for _ in logprob_rows]
        top_indices: list[list[int]] = [[] for _ in logprob_rows]
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            top_values, top_indices = top.values.tolist(), top.indices.tolist()
        for j, i in enumerate(logprob_rows):
            n = rows[i].top_logprobs or 0
            out_logprobs[i] = RowLogprobs(chosen[j], top_indices[j][:n], top_values[j][:n])

    for row, token_id in zip(rows, token_ids, strict=True):
        row.record(token_id)
    return SampleOutput(token_ids, out_logprobs)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingState]) -> None:
    index = [i for i, row in enumerate(rows) if row.has_penalties]
    if not index:
        return
    device = logits.device
    counts = torch.stack([rows[i].output_counts for i in index])  # type: ignore[misc]
    sub = logits[index]
    params = [rows[i].params for i in index]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
    if bool((repetition != 1.0).any()):
        # CTRL: divide positive logits, multiply negative ones, for tokens of prompt or output.
        prompt_masks = [
            rows[i].prompt_mask
            if rows[i].prompt_mask is not None
            else torch.zeros(logits.shape[1], dtype=torch.bool, device=device)
            for i in index
        ]
        seen = torch.stack(prompt_masks) | (counts > 0)  # type: ignore[arg-type]
        penalised = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, penalised, sub)
    # OpenAI: subtract frequency * count and presence * [count > 0], over output tokens only.
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
    presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
    sub = sub - frequency * counts - presence * (counts > 0).float()
    logits[index] = sub


def _sample_rows(logits: torch.Tensor, rows: Sequence[SamplingState]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over [b, V], then one draw per row with its generator."""
    device = logits.device
    params = [row.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    logits = logits / temperature
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    k = torch.tensor(top_k, device=device) if any(x < vocab for x in top_k) else None
    p = (
        torch.tensor([q.top_p for q in params], device=device)
        if any(q.top_p < 1.0 for q in params)
        else None
    )
    if k is not None or p is not None:
        logits = _apply_top_k_top_p(logits, k, p)
    if any(q.min_p > 0.0 for q in params):
        min_p = torch.tensor([q.min_p for q in params], device=device).unsqueeze(1)
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    probs = logits.softmax(dim=-1)
    # One draw per row from the row's own generator: a seeded request gets the same tokens
    # whatever else is in the batch.
    picked = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    return torch.cat(picked)


def _apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    if p is None:
        assert k is not None
        # top-k alone: one partial sort up to the largest k, then a per-row threshold.
        top = logits.topk(int(k.max()), dim=-1).values
        threshold = top.gather(1, (k - 1).unsqueeze(1))
        return logits.masked_fill(logits < threshold, _NEG_INF)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if k is not None:
        threshold = sorted_logits.gather(1, (logits.shape[1] - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < threshold, _NEG_INF)
    # Drop the low tail whose total probability stays within 1 - top_p; always keep the top token.
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)

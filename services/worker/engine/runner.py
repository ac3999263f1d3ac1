"""Model runners: one forward pass per engine step over every running sequence.

A step is a list of `ForwardItem`s: one token for each decoding sequence plus prompt chunks of
sequences being prefilled. `PackedRunner` runs them as ONE forward of the packed tokens (no
padding) over a KV cache of dense per-sequence rows, for Llama-family decoders; `HFRunner` is the
generic fallback that forwards each sequence through transformers with its own DynamicCache.

With prefix caching (PackedRunner only), full blocks of every sequence's computed tokens are
copied into a `PrefixCache` after the forward that computed them, and a new sequence whose
tokens start with cached blocks gets their keys and values copied into its row instead of
computing them (`reuse_prefix`). The store lives inside the same KV budget as the rows: it gets
whatever the rows leave and is evicted (least recently used first) before any sequence waits.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from services.worker.engine.attention import (
    CpuAttention,
    LayerGlue,
    load_cpu_attention,
    load_layer_glue,
    scores_needed,
)
from services.worker.engine.prefix_cache import BLOCK_SIZE, CachedBlock, PrefixCache
from services.worker.engine.quantization import (
    BF16Linear,
    Int4Linear,
    Int8Linear,
    RowSplit,
    SplitLinear,
    cat_optional,
)

logger = logging.getLogger(__name__)

# Decoder layers these architectures share: pre-norm attention (optionally with per-head q/k
# norms) and MLP blocks, rotary positions, no sliding window.
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Cache capacity grows in steps of this many positions, so reallocations stay rare.
CAPACITY_QUANTUM = 256


class CacheFullError(RuntimeError):
    """The KV cache budget cannot hold what the step needs; the scheduler must preempt."""


# Attention is computed per block of this many positions (the prefix cache's block, so a cached
# prefix ends on a boundary), each block's queries over the keys up to the block's end.
ATTENTION_BLOCK = BLOCK_SIZE
# SDPA's CPU kernel computes one or two queries another way than three or more.
MIN_QUERY_ROWS = 3


@dataclass(frozen=True)
class _AttentionGroup:
    """One SDPA call: packed query rows [start, end) (or the rows `take`, padded), of cache row
    `row`, over its first `length` positions, under `mask`."""

    start: int
    end: int
    take: torch.Tensor | None
    row: int
    length: int
    mask: torch.Tensor


@dataclass(frozen=True)
class ForwardItem:
    """Tokens of one sequence to run this step."""

    key: Hashable  # the sequence: its cache row
    token_ids: Sequence[int]  # one token when decoding, a prompt chunk when prefilling
    start: int  # position of token_ids[0]; the cache already holds positions [0, start)
    want_logits: bool  # return the logits after the last token (the sequence samples next)
    # Return the logits after EVERY token of the item (prompt logprobs); they include the last
    # token's, so such an item yields len(token_ids) rows whatever want_logits says.
    all_logits: bool = False
    # Positions from here on hold generated tokens, the rest prompt tokens (None: all prompt).
    # Under int4 quantization they take the 4-bit kernel, prompt positions the bf16 one.
    prompt_length: int | None = None

    @property
    def logit_rows(self) -> int:
        """Rows of forward()'s result that belong to this item."""
        if self.all_logits:
            return len(self.token_ids)
        return 1 if self.want_logits else 0


class ModelRunner(abc.ABC):
    """Runs steps of a causal LM and owns the KV cache of every running sequence."""

    max_cache_tokens: int

    @abc.abstractmethod
    def fits(self, lengths: Sequence[int]) -> bool:
        """Whether sequences of these total lengths fit in the cache together."""

    @abc.abstractmethod
    def release(self, key: Hashable) -> None:
        """Forget a sequence and free its cache (no-op for an unknown key)."""

    @abc.abstractmethod
    def cache_tokens_used(self) -> int:
        """Positions of the cache budget the cached sequences take, as `fits` counts them. Safe
        to call from another thread (a metrics scrape) while the engine thread runs."""

    @abc.abstractmethod
    def forward(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        """Run one step; logits [n, V]: `item.logit_rows` rows per item, in item order."""

    @property
    def prefix_caching(self) -> bool:
        """Whether `reuse_prefix` can find anything (runners without a prefix cache: never)."""
        return False

    def reuse_prefix(
        self, key: Hashable, token_ids: Sequence[int], prompt_length: int | None = None
    ) -> int:
        """For a sequence without a cache row: load the keys and values of the longest cached
        prefix of `token_ids` (all but its last token at most; under int4 quantization with
        bf16 prompts, its first `prompt_length` at most: cached blocks hold prompt positions)
        into a new row for `key`; the positions loaded, 0 when nothing is cached (no row is
        made then)."""
        return 0

    def prefix_cache_tokens(self) -> int:
        """Positions of the KV budget the prefix cache holds (evictable at any time)."""
        return 0


def packed_unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why PackedRunner can't run this model, or None when it can."""
    config = model.config
    if config.model_type not in PACKED_MODEL_TYPES:
        return f"model type {config.model_type!r} has no packed implementation"
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", window is not None)
    if window is not None and use_window:
        return "sliding-window attention is not supported by the packed runner"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "only full attention layers are supported by the packed runner"
    return None


class PackedRunner(ModelRunner):
    """All items of a step in one forward over the packed tokens [N].

    Linear layers and norms see the N tokens as one matrix, so the weights are read once per
    step whatever the batch. Attention runs per sequence and per block of ATTENTION_BLOCK
    positions (`_attention_groups`), so a position's attention never depends on the batch, the
    prefill chunking or the prefix cache. The cache keeps each sequence's keys and values
    contiguous in its own row of [rows, kv_heads, capacity, head_dim] tensors; rows stay
    dense (a freed row is filled by the last one) so attention reads plain views, never gathers.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        max_rows: int,
        max_cache_tokens: int,
        *,
        prefix_caching: bool = False,
        attention_kernel: bool = True,
        kv_dtype: torch.dtype | None = None,
        fused_layers: bool = True,
    ) -> None:
        reason = packed_unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        config = model.config
        self.model = model
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.max_rows = max_rows
        self.max_cache_tokens = max_cache_tokens
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scaling = self.layers[0].self_attn.scaling
        self.device = model.device
        self.dtype = model.dtype
        # Keys and values may be stored narrower than the activations (bf16 for a float32
        # model whose products are approximate anyway): half the memory and the attention reads.
        self.kv_dtype = kv_dtype or self.dtype
        self.context_length = int(config.max_position_embeddings)
        self._row_of: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []  # row -> key
        self._length: dict[Hashable, int] = {}  # positions held in the cache, per sequence
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._capacity = 0
        self._allocated_rows = 0
        # Prefix caching: the store, each sequence's tokens in its row (None: not known, so
        # never cached) and the cached blocks its row's full blocks are (a prefix of them).
        self._prefix = PrefixCache() if prefix_caching else None
        if self._prefix is not None:
            self._prefix.set_limit(max_cache_tokens)
        self._tokens: dict[Hashable, list[int] | None] = {}
        self._chains: dict[Hashable, list[CachedBlock]] = {}
        # One product for q, k and v and one for the MLP's gate and up projections: fewer,
        # larger matrix products per layer. The original modules become views of the fused
        # weights, so no memory is duplicated and transformers' own forward still works.
        self._qkv = [
            fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in self.layers
        ]
        self._gate_up = [
            fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers
        ]
        self._q_size = self.num_heads * self.head_dim
        self._kv_size = self.num_kv_heads * self.head_dim
        self._intermediate = self.layers[0].mlp.gate_proj.out_features
        # Per-head q/k norms (Qwen3) sit between the projection and the rotation; without them
        # q and k are rotated together, in one pass over both.
        self._qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        # int4 quantization with bf16 prompts: generated and prompt positions take different
        # kernels (SplitLinear), so only blocks of prompt positions are the same as a later
        # prompt would compute. (With 4-bit prompts no layer is split.)
        self._split = any(isinstance(m, SplitLinear) for m in model.modules())
        # On the CPU, attention is one batch-invariant kernel call per layer (attention.py);
        # elsewhere, or where it cannot be built, SDPA per block (_attention_groups).
        self._attention: CpuAttention | None = None
        if (
            attention_kernel
            and self.device.type == "cpu"
            and CpuAttention.supports(
                self.dtype, self.num_heads, self.num_kv_heads, self.head_dim, self.kv_dtype
            )
        ):
            self._attention = load_cpu_attention()
        self._scores = torch.empty(0)
        # bf16 products over a bf16 cache (the served bf16 and int4 modes): the small operations
        # between the products in three compiled calls a layer (`_fused_layers`).
        self._glue: LayerGlue | None = None
        if fused_layers and self._attention is not None and self._glue_applies():
            self._glue = load_layer_glue()
        # The bf16 output layer's plain matrix (int4: the prompt rows'), to recompute near-ties
        # in float32; the norms' (weight, eps), looked up once.
        self._logits_weight: torch.Tensor | None = None
        self._norms: list[tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]]] = []
        if self._glue is not None:
            self._norms = [
                (_norm_of(layer.input_layernorm), _norm_of(layer.post_attention_layernorm))
                for layer in self.layers
            ]
            head = self.model.lm_head
            head = head.prompt if isinstance(head, SplitLinear) else head
            assert isinstance(head, BF16Linear)
            self._logits_weight = head.weight_bf16().contiguous()

    def _glue_applies(self) -> bool:
        """Whether the model is what LayerGlue computes: float32 activations, bf16 products
        (pre-packed, or int4's split layers), a bf16 cache, Llama RMS norms, SiLU-gated MLPs,
        no q/k norms."""
        layers = [*self._qkv, *self._gate_up, self.model.lm_head]
        norms = [self.decoder.norm]
        for layer in self.layers:
            layers += [layer.self_attn.o_proj, layer.mlp.down_proj]
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        return (
            self.dtype == torch.float32
            and self.kv_dtype == torch.bfloat16
            and not self._qk_norm
            and all(_takes_bf16(m) for m in layers)
            and all(_rms_norm_parameters(n) is not None for n in norms)
            and getattr(self.model.config, "hidden_act", None) in ("silu", "swish")
            and LayerGlue.supports(self.model.config.hidden_size, self._intermediate, self.head_dim)
        )

    @property
    def fused_layers(self) -> bool:
        """Whether steps run the compiled layer glue (`_fused_layers`)."""
        return self._glue is not None

    # -- cache ---------------------------------------------------------------------------

    def fits(self, lengths: Sequence[int]) -> bool:
        if len(lengths) > self.max_rows:
            return False
        return len(lengths) * _round_up(max(lengths, default=0)) <= self.max_cache_tokens

    def cache_tokens_used(self) -> int:
        lengths = list(self._length.values())  # one C-level copy: no lock needed
        return len(lengths) * _round_up(max(lengths, default=0))

    @property
    def prefix_caching(self) -> bool:
        return self._prefix is not None

    def prefix_cache_tokens(self) -> int:
        return 0 if self._prefix is None else self._prefix.tokens

    @property
    def attention_backend(self) -> str:
        """Which attention the runner computes: "kernel" (attention.py) or "sdpa" (per block)."""
        return "kernel" if self._attention is not None else "sdpa"

    def allocated_tokens(self) -> int:
        """Positions the rows' tensors hold (used or not): with the prefix cache's, never more
        than max_cache_tokens."""
        return self._allocated_rows * self._capacity

    def release(self, key: Hashable) -> None:
        if self._prefix is not None and self._row_of.keys() == {key}:
            # The last row: its tensors go, so the whole budget is the store's. Blocks that had
            # no room while the row ran are kept now.
            self._prefix.set_limit(self.max_cache_tokens)
            self._insert_blocks([key])
        row = self._row_of.pop(key, None)
        self._length.pop(key, None)
        self._tokens.pop(key, None)
        self._chains.pop(key, None)
        if row is None:
            return
        last = len(self._keys) - 1
        if row != last:
            moved = self._keys[last]
            for cache in (*self._k, *self._v):
                cache[row].copy_(cache[last])
            self._keys[row] = moved
            self._row_of[moved] = row
        self._keys.pop()
        if not self._keys:
            # Idle: give the memory back rather than keep the peak of the last burst.
            self._k, self._v = [], []
            self._capacity = self._allocated_rows = 0
            if self._prefix is not None:
                self._prefix.set_limit(self.max_cache_tokens)

    def _ensure(self, rows: int, length: int) -> None:
        """Make the cache hold `rows` rows of `length` positions: grow it when it is too small,
        shrink its capacity when a long sequence has left and the budget needs the room."""
        needed = _round_up(length)
        capacity = max(self._capacity, needed)
        if rows * capacity > self.max_cache_tokens:
            capacity = needed
        allocated = max(self._allocated_rows, rows)
        if allocated * capacity > self.max_cache_tokens:
            allocated = rows
        if capacity == self._capacity and allocated == self._allocated_rows:
            return
        if rows * capacity > self.max_cache_tokens:
            raise CacheFullError(
                f"{rows} sequences of {length} positions exceed the KV cache budget "
                f"of {self.max_cache_tokens} tokens"
            )
        # Allocate rows in small groups so a growing batch reallocates only a few times.
        allocated = min(self.max_rows, max(allocated, _round_up(rows, 4)))
        while allocated * capacity > self.max_cache_tokens:
            allocated -= 1
        if self._prefix is not None:
            # The rows come first: cached blocks give up their room before the rows grow.
            self._prefix.set_limit(self.max_cache_tokens - allocated * capacity)
        shape = (allocated, self.num_kv_heads, capacity, self.head_dim)
        used_rows = len(self._keys)
        kept = min(self._capacity, capacity)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            if old is not None and used_rows:
                new[:used_rows, :, :kept].copy_(old[:used_rows, :, :kept])
            return new

        layers = len(self.layers)
        olds_k: list[torch.Tensor | None] = list(self._k) or [None] * layers
        olds_v: list[torch.Tensor | None] = list(self._v) or [None] * layers
        self._k = [grown(old) for old in olds_k]
        self._v = [grown(old) for old in olds_v]
        self._capacity, self._allocated_rows = capacity, allocated
        logger.debug("KV cache now %d rows x %d positions", allocated, capacity)

    # -- forward -------------------------------------------------------------------------

    def forward(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        if self._prefix is None:
            return self._forward(items)
        try:
            logits = self._forward(items)
        except BaseException:
            # The rows may hold half-written positions: they never feed the prefix cache.
            for item in items:
                self._tokens[item.key] = None
            raise
        # Only now is every position the items wrote computed: their full blocks may be shared.
        self._record(items)
        self._insert_blocks([item.key for item in items])
        return logits

    def _forward(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        new_keys = [item.key for item in items if item.key not in self._row_of]
        ends = {**self._length, **{i.key: i.start + len(i.token_ids) for i in items}}
        self._ensure(len(self._keys) + len(new_keys), max(ends.values()))
        for key in new_keys:
            self._row_of[key] = len(self._keys)
            self._keys.append(key)
        self._length = ends

        device = self.device
        tokens = [t for item in items for t in item.token_ids]
        positions = [
            p for item in items for p in range(item.start, item.start + len(item.token_ids))
        ]
        rows = [self._row_of[item.key] for item in items for _ in item.token_ids]
        token_t = torch.tensor(tokens, dtype=torch.long, device=device)
        position_t = torch.tensor(positions, dtype=torch.long, device=device)
        row_t = torch.tensor(rows, dtype=torch.long, device=device)
        kernel = self._attention
        groups = [] if kernel is not None else self._attention_groups(items)
        if kernel is not None:
            needed = scores_needed(self.num_heads, self.num_kv_heads, max(positions))
            if self._scores.numel() < needed:
                self._scores = torch.empty(_round_up(needed), dtype=torch.float32)
        generated = self._generated_rows(items) if self._split else None
        split = None if generated is None else self._row_split(generated)

        hidden = self.decoder.embed_tokens(token_t)  # [N, hidden]
        cos, sin = self.decoder.rotary_emb(hidden, position_t[None, :])
        wanted = self._logit_rows(items)
        if self._glue is not None:
            normed = self._fused_layers(hidden, cos[0], sin[0], row_t, position_t, split)
            if not wanted:
                return hidden.new_empty(0, self.model.config.vocab_size)
            picked = normed[torch.tensor(wanted, dtype=torch.long, device=device)]
            return self._fused_logits(
                picked, None if generated is None else [generated[i] for i in wanted]
            )
        cos = cos[0][:, None, :]  # [N, 1, head_dim]
        # rotate_half(x) * sin == flip_halves(x) * signed_sin, bit for bit (a sign is exact).
        half = self.head_dim // 2
        signed_sin = torch.cat((-sin[0][:, :half], sin[0][:, half:]), dim=-1)[:, None, :]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = _linear(self._qkv[index], _rms_norm(layer.input_layernorm, hidden), split)
            v = qkv[:, self._q_size + self._kv_size :].unflatten(-1, (kv_heads, head_dim))
            if self._qk_norm:
                q = attn.q_norm(qkv[:, : self._q_size].unflatten(-1, (heads, head_dim)))
                k = attn.k_norm(
                    qkv[:, self._q_size : self._q_size + self._kv_size].unflatten(
                        -1, (kv_heads, head_dim)
                    )
                )
                q = q * cos + _flip_halves(q) * signed_sin
                k = k * cos + _flip_halves(k) * signed_sin
            else:
                qk = qkv[:, : self._q_size + self._kv_size].unflatten(
                    -1, (heads + kv_heads, head_dim)
                )
                qk = qk * cos + _flip_halves(qk) * signed_sin
                q, k = qk[:, :heads], qk[:, heads:]
            cache_k, cache_v = self._k[index], self._v[index]
            # Queries keep the model's dtype: rounding them to a bf16 cache's changes answers.
            cache_k[row_t, :, position_t] = k.to(self.kv_dtype)
            cache_v[row_t, :, position_t] = v.to(self.kv_dtype)
            if kernel is not None:
                out = kernel(q, cache_k, cache_v, row_t, position_t, self.scaling, self._scores)
            else:
                out = torch.empty_like(q)
            for group in groups:
                query = q[group.start : group.end] if group.take is None else q[group.take]
                attended = F.scaled_dot_product_attention(
                    query.transpose(0, 1)[None],
                    cache_k[group.row : group.row + 1, :, : group.length].to(q.dtype),
                    cache_v[group.row : group.row + 1, :, : group.length].to(q.dtype),
                    attn_mask=group.mask,
                    scale=self.scaling,
                    enable_gqa=True,
                )
                out[group.start : group.end] = attended[0, :, : group.end - group.start].transpose(
                    0, 1
                )
            hidden = hidden + _linear(attn.o_proj, out.reshape(len(tokens), -1), split)
            mlp = layer.mlp
            gate, up = _linear(
                self._gate_up[index], _rms_norm(layer.post_attention_layernorm, hidden), split
            ).split(self._intermediate, dim=-1)
            hidden = hidden + _linear(mlp.down_proj, mlp.act_fn(gate) * up, split)

        if not wanted:
            return hidden.new_empty(0, self.model.config.vocab_size)
        picked = hidden[torch.tensor(wanted, dtype=torch.long, device=device)]
        picked_split = (
            None if generated is None else self._row_split([generated[i] for i in wanted])
        )
        return _linear(
            self.model.lm_head, _rms_norm(self.decoder.norm, picked), picked_split
        ).float()

    def _fused_layers(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        row_t: torch.Tensor,
        position_t: torch.Tensor,
        split: RowSplit | None,
    ) -> torch.Tensor:
        """The decoder layers over hidden [N, hidden] (float32, updated in place) with the
        layer glue between the bf16 products; the final norm's output [N, hidden] in bf16.
        Rotary positions, cache writes and attention compute what the torch path computes, bit
        for bit; the norms and the activation round differently in the last bits."""
        glue = self._glue
        assert glue is not None
        n = len(hidden)
        heads, bf16 = self.num_heads, torch.bfloat16
        normed = torch.empty(n, hidden.shape[1], dtype=bf16)
        attended = torch.empty(n, heads * self.head_dim, dtype=bf16)
        activated = torch.empty(n, self._intermediate, dtype=bf16)
        queries = torch.empty(n, heads * self.head_dim, dtype=torch.float32)
        cos, sin = cos.contiguous(), sin.contiguous()
        delta: torch.Tensor | None = None
        for index, layer in enumerate(self.layers):
            norm_in, norm_post = self._norms[index]
            glue.add_rms_norm(hidden, delta, *norm_in, normed)
            qkv = _bf16_product(self._qkv[index], normed, split)
            glue.rope_attention(
                qkv, cos, sin, self._k[index], self._v[index], row_t, position_t,
                self.scaling, heads, queries, self._scores, attended,
            )  # fmt: skip
            attention_out = _bf16_product(layer.self_attn.o_proj, attended, split)
            glue.add_rms_norm(hidden, attention_out, *norm_post, normed)
            glue.silu_mul(_bf16_product(self._gate_up[index], normed, split), activated)
            delta = _bf16_product(layer.mlp.down_proj, activated, split)
        return glue.add_rms_norm(hidden, delta, *_norm_of(self.decoder.norm), normed)

    def _fused_logits(self, picked: torch.Tensor, generated: list[bool] | None) -> torch.Tensor:
        """float32 logits of the final norm's bf16 rows; near-ties of bf16 products refined."""
        glue, weight = self._glue, self._logits_weight
        assert glue is not None and weight is not None
        if generated is None:
            logits = _bf16_product(self.model.lm_head, picked, None).float()
            return glue.refine_near_ties(logits, picked, weight)
        # int4: 8-bit weights for generated rows, bf16 for prompt rows (refined: their logits
        # sample a request's first token).
        split = self._row_split(generated)
        logits = _linear(self.model.lm_head, picked.float(), split).float()
        if len(split.prompt):
            logits[split.prompt] = glue.refine_near_ties(
                logits[split.prompt], picked[split.prompt].contiguous(), weight
            )
        return logits

    @staticmethod
    def _logit_rows(items: Sequence[ForwardItem]) -> list[int]:
        """Packed rows whose logits forward() returns: where a token is sampled next (the last
        token of each wanting item) or where an item asks for all of them."""
        wanted: list[int] = []
        cursor = 0
        for item in items:
            cursor += len(item.token_ids)
            wanted.extend(range(cursor - item.logit_rows, cursor))
        return wanted

    @staticmethod
    def _generated_rows(items: Sequence[ForwardItem]) -> list[bool]:
        """Per packed row: whether its position holds a generated token (else a prompt token)."""
        flags: list[bool] = []
        for item in items:
            boundary = item.prompt_length
            end = item.start + len(item.token_ids)
            if boundary is None or boundary >= end:
                flags.extend([False] * len(item.token_ids))
            else:
                first = max(boundary, item.start)
                flags.extend([False] * (first - item.start) + [True] * (end - first))
        return flags

    def _row_split(self, generated: Sequence[bool]) -> RowSplit:
        """The packed rows holding generated tokens, and those holding prompt tokens."""
        device = self.device
        return RowSplit(
            torch.tensor(
                [i for i, g in enumerate(generated) if g], dtype=torch.long, device=device
            ),
            torch.tensor(
                [i for i, g in enumerate(generated) if not g], dtype=torch.long, device=device
            ),
        )

    def _attention_groups(self, items: Sequence[ForwardItem]) -> list[_AttentionGroup]:
        """The attention calls of a step: each item's query rows cut at ATTENTION_BLOCK
        boundaries; a group's rows attend over the keys up to the END of their block, masked
        causally. A position's attention is then one and the same computation whether it is
        decoded, prefilled in one chunk or in several, or follows a cached prefix (whose blocks
        end on these boundaries), and whatever else is in the step: bit for bit, so bf16 greedy
        output does not depend on the batch, the chunking or the prefix cache. Groups of fewer
        than MIN_QUERY_ROWS rows repeat their last row: SDPA takes another path for one or two
        queries, whose results differ in the last bits."""
        device = self.device
        groups: list[_AttentionGroup] = []
        offset = 0
        for item in items:
            row = self._row_of[item.key]
            end_position = item.start + len(item.token_ids)
            position = item.start
            while position < end_position:
                block_end = (position // ATTENTION_BLOCK + 1) * ATTENTION_BLOCK
                stop = min(end_position, block_end)
                count = stop - position
                query_positions = torch.arange(position, stop, device=device)
                take = None
                if count < MIN_QUERY_ROWS:
                    pad = MIN_QUERY_ROWS - count
                    query_positions = torch.cat((query_positions, query_positions[-1:].repeat(pad)))
                    first = offset + position - item.start
                    take = torch.tensor(
                        [*range(first, first + count), *([first + count - 1] * pad)],
                        dtype=torch.long,
                        device=device,
                    )
                mask = torch.arange(block_end, device=device)[None, :] <= query_positions[:, None]
                start = offset + position - item.start
                groups.append(
                    _AttentionGroup(start, start + count, take, row, block_end, mask[None, None])
                )
                position = stop
            offset += len(item.token_ids)
        return groups

    # -- prefix cache --------------------------------------------------------------------

    def reuse_prefix(
        self, key: Hashable, token_ids: Sequence[int], prompt_length: int | None = None
    ) -> int:
        prefix = self._prefix
        if prefix is None or key in self._row_of:
            return 0
        size = prefix.block_size
        shareable = (
            token_ids if not self._split or prompt_length is None else token_ids[:prompt_length]
        )
        chain = prefix.match(shareable)
        # At least the last token is computed: its logits are what the sequence samples from.
        # (A prompt cached whole takes all but the last position of its last block.)
        matched = min(len(chain) * size, len(token_ids) - 1)
        if matched <= 0:
            return 0
        chain = chain[: -(-matched // size)]
        self._ensure(len(self._keys) + 1, max([matched, *self._length.values()]))
        row = len(self._keys)
        self._row_of[key] = row
        self._keys.append(key)
        self._length[key] = matched
        # [blocks, 2 * layers, size, kv_heads, dim] -> [2 * layers, positions, kv_heads, dim]
        stacked = torch.stack([block.kv for block in chain]).transpose(0, 1)
        flat = stacked.reshape(2 * len(self.layers), len(chain) * size, *stacked.shape[-2:])
        for index in range(len(self.layers)):
            self._k[index][row, :, :matched] = flat[2 * index, :matched].transpose(0, 1)
            self._v[index][row, :, :matched] = flat[2 * index + 1, :matched].transpose(0, 1)
        self._tokens[key] = list(token_ids[:matched])
        self._chains[key] = chain[: matched // size]  # the blocks the row holds whole
        return matched

    def _record(self, items: Sequence[ForwardItem]) -> None:
        """Note the tokens whose positions the items computed (under int4 quantization with
        bf16 prompts, only prompt positions: generated ones took another kernel than a prompt
        would)."""
        assert self._prefix is not None
        size = self._prefix.block_size
        for item in items:
            key = item.key
            tokens = self._tokens.get(key, [])
            if tokens is None:
                continue
            chain = self._chains.setdefault(key, [])
            if len(tokens) > item.start:  # positions written again
                del tokens[item.start :]
                del chain[item.start // size :]
            shared = item.token_ids
            if self._split and item.prompt_length is not None:
                shared = shared[: max(0, item.prompt_length - item.start)]
                if not shared:
                    continue
            if len(tokens) < item.start:
                self._tokens[key] = None  # positions of unknown tokens: never shared
                continue
            tokens.extend(shared)
            self._tokens[key] = tokens

    def _insert_blocks(self, keys: Sequence[Hashable]) -> None:
        """Copy the full blocks of these rows that the prefix cache lacks into it (adopting
        identical blocks already there), as far as its room allows."""
        prefix = self._prefix
        assert prefix is not None
        size = prefix.block_size
        growing: list[tuple[Hashable, list[int], list[CachedBlock], int]] = []
        for key in keys:
            tokens = self._tokens.get(key)
            if tokens is None:
                continue
            chain = self._chains.setdefault(key, [])
            full = len(tokens) // size
            if len(chain) >= full:
                continue
            dead = next((i for i, block in enumerate(chain) if not block.alive), len(chain))
            del chain[dead:]  # evicted blocks are put back from the row
            while len(chain) < full:  # blocks another sequence cached already
                start = len(chain) * size
                block = prefix.get(
                    prefix.block_key(chain[-1] if chain else None, tokens[start : start + size])
                )
                if block is None:
                    break
                chain.append(block)
            prefix.touch(chain)
            if len(chain) < full:
                growing.append((key, tokens, chain, full))
        if not growing:
            return
        wanted = sum(full - len(chain) for _, _, chain, full in growing)
        room = prefix.room(wanted, [block for _, _, chain, _ in growing for block in chain])
        plans: list[tuple[list[int], list[CachedBlock], int, int]] = []
        rows: list[int] = []
        starts: list[int] = []
        for key, tokens, chain, full in growing:
            first = len(chain)
            count = min(full - first, room - len(starts))
            if count <= 0:
                break
            plans.append((tokens, chain, first, count))
            rows += [self._row_of[key]] * count
            starts += [(first + j) * size for j in range(count)]
        if not starts:
            return  # no room: the store is full of blocks in use
        device = self.device
        row_t = torch.tensor(rows, dtype=torch.long, device=device)[:, None]
        position_t = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + torch.arange(
            size, device=device
        )
        # One gather per layer for every new block: [blocks, 2 * layers, size, kv_heads, dim].
        kv = torch.empty(
            len(starts),
            2 * len(self.layers),
            size,
            self.num_kv_heads,
            self.head_dim,
            dtype=self.kv_dtype,
            device=device,
        )
        for index in range(len(self.layers)):
            kv[:, 2 * index] = self._k[index][row_t, :, position_t]
            kv[:, 2 * index + 1] = self._v[index][row_t, :, position_t]
        blocks = iter(kv.unbind(0) if len(starts) == 1 else [b.clone() for b in kv.unbind(0)])
        for tokens, chain, first, count in plans:
            for j in range(first, first + count):
                parent = chain[-1] if chain else None
                key_j = prefix.block_key(parent, tokens[j * size : (j + 1) * size])
                chain.append(prefix.add(key_j, next(blocks)))
            prefix.touch(chain)


class HFRunner(ModelRunner):
    """The generic path: each sequence forwarded alone through transformers with its own
    DynamicCache. Correct for any causal LM transformers can load; slower than PackedRunner
    because every sequence reads the weights once per step."""

    def __init__(self, model: PreTrainedModel, max_rows: int, max_cache_tokens: int) -> None:
        self.model = model
        self.max_rows = max_rows
        self.max_cache_tokens = max_cache_tokens
        self._caches: dict[Hashable, Any] = {}
        # Only the last position's logits are needed (as in HF generate), where supported.
        self._forward_kwargs: dict[str, Any] = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(model.forward).parameters
            else {}
        )

    def fits(self, lengths: Sequence[int]) -> bool:
        return len(lengths) <= self.max_rows and sum(lengths) <= self.max_cache_tokens

    def cache_tokens_used(self) -> int:
        caches = list(self._caches.values())  # one C-level copy: no lock needed
        return sum(int(cache.get_seq_length()) for cache in caches)

    def release(self, key: Hashable) -> None:
        self._caches.pop(key, None)

    def forward(self, items: Sequence[ForwardItem]) -> torch.Tensor:
        rows = []
        for item in items:
            cache = self._caches.get(item.key)
            if cache is None or item.start == 0:
                cache = self._caches[item.key] = DynamicCache(config=self.model.config)
            n = len(item.token_ids)
            device = self.model.device
            input_ids = torch.tensor([list(item.token_ids)], dtype=torch.long, device=device)
            out = self.model(
                input_ids=input_ids,
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.arange(item.start, item.start + n, device=device),
                **({} if item.all_logits else self._forward_kwargs),
            )
            if item.logit_rows:
                rows.append(out.logits[0, -item.logit_rows :, :].float())
        if not rows:
            return torch.empty(0, self.model.config.vocab_size)
        return rows[0] if len(rows) == 1 else torch.cat(rows)


def create_runner(
    model: PreTrainedModel,
    max_rows: int,
    max_cache_tokens: int,
    *,
    prefix_caching: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> ModelRunner:
    """The packed runner where the architecture allows it, else the generic one (which has no
    prefix cache and keeps the model's dtype for keys and values)."""
    reason = packed_unsupported_reason(model)
    if reason is None:
        return PackedRunner(
            model, max_rows, max_cache_tokens, prefix_caching=prefix_caching, kv_dtype=kv_dtype
        )
    logger.info("using the per-sequence runner: %s", reason)
    return HFRunner(model, max_rows, max_cache_tokens)


def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One linear layer computing the concatenated outputs of `linears` (all of one type:
    nn.Linear, Int8Linear, BF16Linear or Int4Linear; same input); each original is rebound to a
    view of the fused weights (a packed layer to its columns of the fused product)."""
    if all(isinstance(m, BF16Linear) for m in linears):
        return BF16Linear.fuse([m for m in linears if isinstance(m, BF16Linear)])
    if all(isinstance(m, Int4Linear) for m in linears):
        return Int4Linear.fuse([m for m in linears if isinstance(m, Int4Linear)])
    if all(isinstance(m, SplitLinear) for m in linears):
        return SplitLinear.fuse([m for m in linears if isinstance(m, SplitLinear)])
    if all(isinstance(m, Int8Linear) for m in linears):
        int8 = [m for m in linears if isinstance(m, Int8Linear)]
        fused_int8 = Int8Linear(
            torch.cat([m.weight_int8 for m in int8]),
            torch.cat([m.weight_scale for m in int8]),
            cat_optional([m.bias for m in int8], [m.out_features for m in int8]),
        )
        offset = 0
        for m in int8:
            end = offset + m.out_features
            m.weight_int8 = fused_int8.weight_int8[offset:end]
            m.weight_scale = fused_int8.weight_scale[offset:end]
            if fused_int8.bias is not None:
                m.bias = fused_int8.bias[offset:end]
            offset = end
        return fused_int8
    dense = [m for m in linears if isinstance(m, nn.Linear)]
    if len(dense) != len(linears):
        raise ValueError("cannot fuse a mix of linear layer types")
    weight = torch.cat([m.weight.detach() for m in dense])
    bias = cat_optional(
        [None if m.bias is None else m.bias.detach() for m in dense],
        [m.out_features for m in dense],
    )
    fused = nn.Linear(dense[0].in_features, weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    fused.to(device=weight.device)
    offset = 0
    for linear in dense:
        end = offset + linear.out_features
        linear.weight = nn.Parameter(fused.weight[offset:end], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(fused.bias[offset:end], requires_grad=False)
        offset = end
    return fused


def _linear(layer: nn.Module, x: torch.Tensor, split: RowSplit | None) -> torch.Tensor:
    """layer(x), each row through the kernel its position's token calls for (SplitLinear)."""
    return layer(x, split) if isinstance(layer, SplitLinear) else layer(x)


def _flip_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] along the last dimension (rotate_half without its sign)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def _takes_bf16(layer: nn.Module) -> bool:
    """Whether `_bf16_product` computes the layer."""
    if isinstance(layer, Int4Linear):
        return True
    if isinstance(layer, SplitLinear):
        return isinstance(layer.prompt, BF16Linear) and layer.prompt.weight_packed is not None
    return isinstance(layer, BF16Linear) and layer.weight_packed is not None


def _bf16_product(layer: nn.Module, x: torch.Tensor, split: RowSplit | None) -> torch.Tensor:
    """A pre-packed bf16 (or int4 split) layer's product of bf16 rows, in bf16 (no float32
    round trip)."""
    if isinstance(layer, SplitLinear):
        return layer.bf16_product(x, split)
    assert isinstance(layer, BF16Linear | Int4Linear)
    return layer.bf16_product(x)


def _norm_of(norm: nn.Module) -> tuple[torch.Tensor, float]:
    parameters = _rms_norm_parameters(norm)
    assert parameters is not None
    return parameters


def _rms_norm_parameters(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-family RMSNorm with float32 weights, else None."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.Tensor):
        return None
    return (weight, eps) if weight.dtype == torch.float32 else None


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for the Llama-family RMSNorm, in one fused op where that is bit-identical to
    transformers' (float32; tested), else the module itself."""
    parameters = _rms_norm_parameters(norm)
    if parameters is None or x.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), *parameters)


def _round_up(value: int, quantum: int = CAPACITY_QUANTUM) -> int:
    return -(-value // quantum) * quantum

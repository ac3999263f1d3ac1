"""Prefix caching: the keys and values of full token blocks of earlier sequences, found again by
the exact tokens that precede them (vLLM's automatic prefix caching, with exact keys).

A block is named by (its parent block's id, its own tokens): a chain of blocks from the root
spells a token prefix, so a lookup walks the prompt block by block and stops at the first block
nobody computed. The store only keeps the tensors (their layout is the runner's business) and
evicts least recently used blocks to stay within the room the runner leaves it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

# Tokens per block, as vLLM's default: small enough that most of a shared prefix is reused,
# large enough that the bookkeeping and copies stay cheap.
BLOCK_SIZE = 16
_ROOT_ID = 0

BlockKey = tuple[int, tuple[int, ...]]  # (parent block id, the block's tokens)


@dataclass(eq=False)
class CachedBlock:
    """Keys and values of BLOCK_SIZE positions whose tokens and whole prefix are known."""

    id: int
    key: BlockKey
    kv: torch.Tensor
    alive: bool = True  # False once evicted: sequences holding it must not chain onto it


class PrefixCache:
    """Cached blocks in least-recently-used order, within a token limit the runner sets.

    Whenever a chain is used its blocks are touched deepest first, so a parent is always more
    recent than its children and the least recently used block is always a leaf: eviction never
    strands a reachable block behind a missing parent.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._blocks: OrderedDict[BlockKey, CachedBlock] = OrderedDict()  # oldest first
        self._ids = itertools.count(_ROOT_ID + 1)
        self._limit = 0  # tokens the store may hold
        self.evictions = 0  # blocks evicted since start

    @property
    def tokens(self) -> int:
        """Positions the cached blocks hold (what they take of the KV budget)."""
        return len(self._blocks) * self.block_size

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, tokens: int) -> None:
        """Let the store hold at most `tokens` positions, evicting the least recently used."""
        self._limit = max(0, tokens)
        self._evict(self._limit, protected=())

    def block_key(self, parent: CachedBlock | None, tokens: Sequence[int]) -> BlockKey:
        return (_ROOT_ID if parent is None else parent.id, tuple(tokens))

    def match(self, token_ids: Sequence[int]) -> list[CachedBlock]:
        """The longest chain of cached blocks spelling a prefix of token_ids (full blocks only);
        touched as used."""
        chain: list[CachedBlock] = []
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = chain[-1] if chain else None
            block = self._blocks.get(self.block_key(parent, token_ids[start : start + size]))
            if block is None:
                break
            chain.append(block)
        self.touch(chain)
        return chain

    def get(self, key: BlockKey) -> CachedBlock | None:
        return self._blocks.get(key)

    def touch(self, chain: Sequence[CachedBlock]) -> None:
        """Mark a chain (root first) as just used: deepest first, so parents end up newer."""
        for block in reversed(chain):
            if block.alive:
                self._blocks.move_to_end(block.key)

    def room(self, wanted: int, protected: Iterable[CachedBlock]) -> int:
        """Blocks (up to `wanted`) that may be added now, evicting least recently used blocks
        other than `protected` to make room."""
        capacity = self._limit // self.block_size
        self._evict((capacity - wanted) * self.block_size, protected=set(protected))
        return max(0, min(wanted, capacity - len(self._blocks)))

    def add(self, key: BlockKey, kv: torch.Tensor) -> CachedBlock:
        """Store a new block (the caller made room for it)."""
        block = CachedBlock(next(self._ids), key, kv)
        self._blocks[key] = block
        return block

    def clear(self) -> None:
        for block in self._blocks.values():
            block.alive = False
        self._blocks.clear()

    def _evict(self, tokens: int, protected: set[CachedBlock] | tuple[()]) -> None:
        while self._blocks and self.tokens > tokens:
            key, oldest = next(iter(self._blocks.items()))
            if oldest in protected:
                return  # only blocks the caller is using are left to evict
            del self._blocks[key]
            oldest.alive = False
            self.evictions += 1

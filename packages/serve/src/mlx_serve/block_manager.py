"""Fixed-size KV blocks of one preallocated cache: allocation, reference counts, prefix caching.

A full block is registered under a hash chained from the previous block's hash, its token ids
and the sequence's adapter, so a later sequence with the same prefix (same adapter) reuses it.
Freed blocks keep their contents and hash: they stay reusable until allocation needs them and
evicts them, least recently used first (blocks that hold no cached prefix go first of all).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mlx_serve.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(previous: int | None, token_ids: tuple[int, ...], lora_id: int | None) -> int:
    """Keys and values depend on the adapter too: ``lora_id`` is unique per adapter load."""
    return hash((previous, token_ids, lora_id))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks})")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks, next to be allocated first; a block here may still hold a cached prefix
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found cached

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding the longest cached prefix of ``seq`` (full blocks only, and
        never the last token: it must be computed to give the logits of the next one)."""
        if not self.enable_prefix_caching:
            return []
        tokens = seq.all_token_ids
        found: list[int] = []
        previous = None
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start:start + self.block_size])
            previous = block_hash(previous, chunk, seq.lora_id)
            block_id = self.cached.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != chunk:  # hash collision
                break
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens (after taking ``cached_prefix``
        on its first admission). False, changing nothing, when there are not enough free blocks."""
        num_computed = seq.num_computed_tokens + len(cached_prefix) * self.block_size
        have = len(seq.block_ids) + len(cached_prefix)
        new = max(0, self.blocks_needed(num_computed + num_new_tokens) - have)
        revived = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if new + revived > len(self.free):
            return False
        if cached_prefix or seq.num_computed_tokens == 0:
            self._take_prefix(seq, cached_prefix)
        for _ in range(new):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached prefix this block held
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_ids.append(block_id)
        return True

    def _take_prefix(self, seq: Sequence, cached_prefix: list[int]) -> None:
        for block_id in cached_prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_ids.append(block_id)
            seq.block_hashes.append(block.hash)
        hit = len(cached_prefix) * self.block_size
        seq.num_computed_tokens += hit
        if seq.num_preemptions == 0:  # count each prompt once, not its recomputations
            seq.num_cached_tokens = hit
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step computed tokens of ``seq``: make its newly full blocks findable."""
        if not self.enable_prefix_caching:
            return
        tokens = seq.all_token_ids
        full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), full):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            previous = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(previous, chunk, seq.lora_id)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if h not in self.cached:  # else another block holds the same prefix already
                block.hash, block.token_ids = h, chunk
                self.cached[h] = block.block_id

    def free_sequence(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its blocks keep their cached prefix until evicted."""
        for block_id in reversed(seq.block_ids):  # a prefix's tail is evicted before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        seq.block_ids, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self.free:
            block = self.blocks[block_id]
            self.cached.pop(block.hash, None)
            block.hash, block.token_ids = None, ()

"""Fixed-size KV blocks of one preallocated cache: allocation, reference counts, prefix caching.

A full block is registered under a hash chained from the previous block's hash, its token ids
and the sequence's adapter (and RoPE table, where it depends on the length: ``Sequence.prefix_key``),
so a later sequence with the same prefix (same adapter) reuses it.
Where the shared prefix ends inside a block (a system prompt whose last tokens share a block
with the user's turn; a chat's previous turn, whose last block was partly filled), the matching
leading tokens of a cached block that follows the shared blocks (a full one, or the last block of
a sequence that left) are copied into the new sequence's own block, so only the tokens after
them are computed (token-granular reuse, as SGLang's radix cache; vLLM shares whole blocks).
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
    # its key in BlockManager.followers while it holds reusable tokens: a registered full block
    # (``hash`` set) or the partly filled last block of a sequence that left (no ``hash``)
    follows: tuple | None = None


@dataclass(frozen=True)
class CachedPrefix:
    """What a new sequence takes from the prefix cache: ``block_ids``, shared by reference, then
    the first ``partial_tokens`` tokens of ``partial_block``, copied into a block of its own."""

    block_ids: tuple[int, ...] = ()
    partial_block: int | None = None
    partial_tokens: int = 0

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size + self.partial_tokens


NO_PREFIX = CachedPrefix()


def block_hash(previous: int | None, token_ids: tuple[int, ...], key) -> int:
    """Keys and values depend on the adapter too (``key``: ``Sequence.prefix_key``, whose
    ``lora_id`` is unique per adapter load), and on a length-dependent RoPE's table."""
    return hash((previous, token_ids, key))


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
        # (previous block's hash, adapter, first token) -> registered blocks that follow it: the
        # candidates for a partial match where a shared prefix ends inside a block
        self.followers: dict[tuple, dict[int, None]] = {}
        # (source block, destination block, tokens): KV to copy before the next forward
        self.pending_copies: list[tuple[int, int, int]] = []
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

    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The longest cached prefix of ``seq``: whole blocks, then the longest run of leading
        tokens of a cached block that follows them. Never the last token: it must be computed
        to give the logits of the next one, nor a position whose logits give a prompt
        log-probability the request asks for (``SamplingParams.prompt_logprobs``)."""
        if not self.enable_prefix_caching:
            return NO_PREFIX
        tokens = seq.all_token_ids
        usable = len(tokens) - 1
        if seq.first_scored_logit is not None:
            usable = min(usable, seq.first_scored_logit)
        found: list[int] = []
        previous = None
        for start in range(0, usable - self.block_size + 1, self.block_size):
            chunk = tuple(tokens[start:start + self.block_size])
            h = block_hash(previous, chunk, seq.prefix_key)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:  # hash collision
                break
            found.append(block_id)
            previous = h
        rest = tokens[len(found) * self.block_size:usable][:self.block_size]
        best, best_len = None, 0
        if rest:
            for block_id in self.followers.get((previous, seq.prefix_key, rest[0]), ()):
                length = _common_prefix_length(self.blocks[block_id].token_ids, rest)
                if length > best_len:
                    best, best_len = block_id, length
        return CachedPrefix(tuple(found), best, best_len)

    def allocate(self, seq: Sequence, num_new_tokens: int,
                 cached_prefix: CachedPrefix = NO_PREFIX) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens (after taking ``cached_prefix``
        on its first admission). False, changing nothing, when there are not enough free blocks.
        A partial block's tokens are queued in ``pending_copies``: the caller copies them before
        the next forward writes to any block (until then an evicted source keeps its data)."""
        prefix_tokens = cached_prefix.num_tokens(self.block_size)
        num_computed = seq.num_computed_tokens + prefix_tokens
        have = len(seq.block_ids) + len(cached_prefix.block_ids)
        new = max(0, self.blocks_needed(num_computed + num_new_tokens) - have)
        revived = sum(1 for b in cached_prefix.block_ids if self.blocks[b].ref_count == 0)
        if new + revived > len(self.free):
            return False
        if prefix_tokens or seq.num_computed_tokens == 0:
            self._take_prefix(seq, cached_prefix)
        for _ in range(new):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.follows is not None:  # evict the cached prefix this block held
                self._unregister(block)
            block.ref_count = 1
            seq.block_ids.append(block_id)
        if cached_prefix.partial_tokens:
            destination = seq.block_ids[len(cached_prefix.block_ids)]
            self.pending_copies.append((cached_prefix.partial_block, destination,
                                        cached_prefix.partial_tokens))
        return True

    def take_pending_copies(self) -> list[tuple[int, int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _take_prefix(self, seq: Sequence, cached_prefix: CachedPrefix) -> None:
        for block_id in cached_prefix.block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_ids.append(block_id)
            seq.block_hashes.append(block.hash)
        hit = cached_prefix.num_tokens(self.block_size)
        seq.num_computed_tokens += hit
        # count each prompt once, not its recomputations (preemption; Phi-3's RoPE switch)
        if seq.num_preemptions == 0 and not seq.output_token_ids:
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
            h = block_hash(previous, chunk, seq.prefix_key)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_ids[i]]
            if h not in self.cached:  # else another block holds the same prefix already
                block.hash = h
                self.cached[h] = block.block_id
                self._offer(block, previous, seq.prefix_key, chunk)

    def free_sequence(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its blocks keep their cached prefix until evicted."""
        self.register_full_blocks(seq)  # computed since the last step's registration (drafts)
        self._register_partial_tail(seq)
        for block_id in reversed(seq.block_ids):  # a prefix's tail is evicted before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.follows is None:  # nothing worth keeping: reuse it first
                    self.free.move_to_end(block_id, last=False)
        seq.block_ids, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def _register_partial_tail(self, seq: Sequence) -> None:
        """A leaving sequence's last, partly filled block: its computed tokens stay copyable for
        a later prompt that continues the same text (the next turn of a chat)."""
        index, count = divmod(seq.num_computed_tokens, self.block_size)
        if not self.enable_prefix_caching or count == 0 or len(seq.block_hashes) != index:
            return
        start = index * self.block_size
        self._offer(self.blocks[seq.block_ids[index]], seq.block_hashes[-1] if index else None,
                    seq.prefix_key, tuple(seq.all_token_ids[start:start + count]))

    def _offer(self, block: Block, previous: int | None, key, token_ids: tuple[int, ...]) -> None:
        """Make ``block``'s leading ``token_ids`` findable after the block hashed ``previous``."""
        block.token_ids = token_ids
        block.follows = (previous, key, token_ids[0])
        self.followers.setdefault(block.follows, {})[block.block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes of unused blocks (blocks in use keep theirs)."""
        for block_id in self.free:
            block = self.blocks[block_id]
            if block.follows is not None:
                self._unregister(block)

    def _unregister(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        siblings = self.followers.get(block.follows, {})
        siblings.pop(block.block_id, None)
        if not siblings:
            self.followers.pop(block.follows, None)
        block.hash, block.token_ids, block.follows = None, (), None


def _common_prefix_length(a: tuple[int, ...], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):  # the shorter one bounds the run
        if x != y:
            break
        length += 1
    return length

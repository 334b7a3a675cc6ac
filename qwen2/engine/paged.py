"""Who owns which block of the paged KV cache, and which blocks hold a prefix already computed.

A sequence's block list covers its positions in order. Blocks are counted by reference:
a block full of tokens is immutable and may be shared by every sequence that starts with the
same tokens, so a common system prompt is stored and prefilled once.

Prefix cache. A full block is registered under (the id of the block before it, its tokens),
so a key names the whole token sequence up to the block's end: a lookup follows the chain
from the root, and two sequences share a block only when everything before it agrees too
(keys are compared exactly, no hash can collide). When a sequence ends, its last, partly
filled block is registered the same way under its shorter tokens. A new sequence shares
every full block it finds; where the chain ends it may still match the start of a cached
block (a chat's next turn continues the previous reply mid-block): those keys and values are
copied into a block of its own (copy on write), since the sequence is about to write there.
A sequence run with a LoRA adapter chains from that adapter's own root: its keys and values
differ from the base model's for the same tokens, so only sequences of one adapter share.
Blocks nobody holds stay cached until needed, reused least recently used first; blocks that
hold nothing worth keeping go first.

Not covered: swapping blocks out to host memory (a sequence that loses its blocks is
recomputed; see the engine), sliding-window layers freeing the blocks they no longer read.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from qwen2.model import PagedKVCache

ROOT = 0  # the chain id before a sequence's first block


@dataclass
class Sequence:
    """The blocks of one sequence, and the chain id of its last registered full block."""

    blocks: list[int] = field(default_factory=list)
    chain: int = ROOT
    registered: int = 0  # leading blocks that are in the prefix cache (or taken from it)


class BlockManager:
    def __init__(self, cache: PagedKVCache):
        self.cache, self.size = cache, cache.block_size
        self.refs = [0] * cache.blocks
        # blocks nobody holds, oldest first; block 0 is the cache's padding block and never handed out
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, cache.blocks))
        self.by_key: dict[tuple[int, tuple[int, ...]], int] = {}
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.chain_of: dict[int, int] = {}  # full cached block -> its chain id
        self.children: dict[int, set[tuple[int, ...]]] = {}  # chain id -> token tuples cached after it
        self._chains = itertools.count(ROOT + 1)

    @property
    def usable(self) -> int:
        """Blocks a sequence could ever hold (all but the padding block)."""
        return self.cache.blocks - 1

    @property
    def free(self) -> int:
        """Blocks that can be handed out now (idle ones, cached or not)."""
        return len(self.idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.size)

    # -- the prefix cache ------------------------------------------------------------------
    def match(self, tokens: list[int], limit: int, adapter: int = 0) -> tuple[Sequence, int]:
        """A new sequence holding the cached blocks that start `tokens`, at most `limit` tokens of
        them, computed with the same LoRA adapter (0: none); returns it with the number of tokens it
        need not compute. May allocate one block (the copy-on-write tail), so call it only when a
        block is free."""
        seq = Sequence(chain=ROOT - adapter)  # chain ids of blocks count up from ROOT + 1: no clash
        n = self.extend(seq, tokens, limit, 0)
        want = tokens[n: min(n + self.size, limit)]
        best, length = None, 0
        for cached in self.children.get(seq.chain, ()):
            common = next((i for i, (a, b) in enumerate(zip(cached, want)) if a != b), min(len(cached), len(want)))
            if common > length:
                best, length = cached, common
        if best is not None:
            source = self.by_key[seq.chain, best]
            self._take(source)  # pinned, so allocating the copy cannot evict it
            if self.idle:
                target = self._allocate()
                self.cache.copy_prefix(source, target, length)
                seq.blocks.append(target)
                n += length
            self.release([source])
        return seq, n

    def extend(self, seq: Sequence, tokens: list[int], limit: int, computed: int) -> int:
        """Append the cached full blocks that continue the sequence (it has computed exactly its
        registered blocks), at most `limit` tokens in all; returns the tokens gained."""
        n = computed
        if len(seq.blocks) != seq.registered or computed != seq.registered * self.size:
            return 0
        while n + self.size <= limit:
            block = self.by_key.get((seq.chain, tuple(tokens[n: n + self.size])))
            if block is None:
                break
            self._take(block)
            seq.blocks.append(block)
            seq.chain, seq.registered, n = self.chain_of[block], seq.registered + 1, n + self.size
        return n - computed

    def register(self, seq: Sequence, tokens: list[int], computed: int) -> None:
        """Enter the sequence's newly completed full blocks into the prefix cache."""
        while (seq.registered + 1) * self.size <= computed:
            i = seq.registered
            block, key = seq.blocks[i], (seq.chain, tuple(tokens[i * self.size: (i + 1) * self.size]))
            known = self.by_key.get(key)
            if known is not None:  # computed twice (two sequences at once): keep following the first
                seq.chain = self.chain_of[known]
            elif block not in self.key_of:
                seq.chain = self.chain_of[block] = next(self._chains)
                self._enter(block, key)
            seq.registered += 1

    def register_tail(self, seq: Sequence, tokens: list[int], computed: int) -> None:
        """Cache the sequence's last, partly filled block (call just before releasing it)."""
        n = computed - seq.registered * self.size
        if 0 < n < self.size and len(seq.blocks) > seq.registered:
            block = seq.blocks[seq.registered]
            key = (seq.chain, tuple(tokens[seq.registered * self.size: computed]))
            if key not in self.by_key and block not in self.key_of and self.refs[block] == 1:
                self._enter(block, key)

    def clear(self) -> None:
        """Forget every cached prefix (blocks in use stay with their sequences)."""
        self.by_key.clear(), self.key_of.clear(), self.chain_of.clear(), self.children.clear()

    # -- blocks ----------------------------------------------------------------------------
    def grow(self, seq: Sequence, tokens: int, slot: int) -> bool:
        """Give the sequence blocks for its first `tokens` positions; False when too few are free."""
        need = self.blocks_for(tokens) - len(seq.blocks)
        if need > len(self.idle):
            return False
        for _ in range(need):
            seq.blocks.append(self._allocate())
        self.write_table(seq, slot)
        return True

    def write_table(self, seq: Sequence, slot: int) -> None:
        row = self.cache.tables[slot]
        row.zero_()
        if seq.blocks:
            row[: len(seq.blocks)] = row.new_tensor(seq.blocks)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last one makes it idle, cached blocks kept longest.
        Later blocks of a sequence are released first, so they are also evicted first."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.idle[block] = None
                if block not in self.key_of:
                    self.idle.move_to_end(block, last=False)

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1

    def _allocate(self) -> int:
        block, _ = self.idle.popitem(last=False)
        self._forget(block)
        self.refs[block] = 1
        self.cache.zero_blocks([block])
        return block

    def _enter(self, block: int, key: tuple[int, tuple[int, ...]]) -> None:
        self.by_key[key], self.key_of[block] = block, key
        self.children.setdefault(key[0], set()).add(key[1])

    def _forget(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.by_key[key]
            self.children[key[0]].discard(key[1])
            self.chain_of.pop(block, None)

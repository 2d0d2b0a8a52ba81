"""KVCacheManager: the scheduler's only view of the latent cache.

The scheduler asks to ``allocate_slots`` for a request's next tokens, and ``free``s a request; it gets back
an opaque ``BlockTable`` per request and never sees the pool. Every layer (and every pipeline stage) uses the
same block ids for a sequence, so one table addresses the whole cache.

Automatic prefix caching: at admission ``match_prefix`` gives a request the cached blocks of its longest
cached prefix (whole blocks, never the last token: something must be computed to sample from), and after
each step ``cache_full_blocks`` registers the request's newly computed full blocks for later requests.

With a ``connector`` (kvstore/connector.py: the host tier and the shared store, or a prefill instance) a
device match is extended by a load: ``start_load`` allocates the blocks the connector can fill and hands
them over; the request holds them while they load, and ``finish_loads`` registers those that arrived and
frees the rest. Newly computed full blocks are written through (``connector.save``). A layer-wise load
(``start_load(layerwise=True)``) is scheduled at once: the request counts the blocks as computed, steps that
read them list the load (``wait_loads``), and only a complete load registers them (``finish_loads``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeserve.kvstore.block_pool import BlockPool
from moeserve.kvstore.prefix import ROOT_HASH, block_hashes, chain_hash, prompt_tail

if TYPE_CHECKING:
    from moeserve.kvstore.connector import KVConnector


@dataclass(frozen=True)
class LoadResult:
    request_id: str
    num_cached_tokens: int  # the request's tokens now in the device cache (a waiting load's)
    layerwise: bool
    complete: bool  # every block asked for arrived (a layer-wise load that is not must be recomputed)


@dataclass(frozen=True)
class BlockTable:
    """The physical blocks of one request, in order. Opaque to the scheduler."""

    block_ids: tuple[int, ...]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 connector: KVConnector | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._views: dict[str, BlockTable] = {}  # the last table handed out, while it is unchanged
        self._hashes: dict[str, list[int]] = {}  # request -> prefix hashes of its registered full blocks
        self.num_prefix_query_tokens = 0  # prompt tokens looked up at admission, cumulative
        self.num_prefix_hit_tokens = 0  # of which were found in the device cache
        self.connector = connector if enable_prefix_caching else None
        # request -> (the blocks being loaded, their hashes, the full ones' tokens, the tokens of a prompt tail
        # loaded last (0: none)); and loading requests already freed
        self._loading: dict[str, tuple[list[int], list[int], list[tuple[int, ...]], int]] = {}
        self._freed_while_loading: set[str] = set()
        self._layerwise: dict[str, int] = {}  # request -> its layer-wise load's id, until the load is done

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def match_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Give a request with no blocks yet the cached blocks of its longest cached prefix; returns how many
        tokens they hold (a multiple of block_size, at most len(token_ids) - 1)."""
        assert request_id not in self._tables, f"request {request_id!r} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs  # NOTE: the last token is always recomputed
        blocks, hashes = [], []
        all_hashes = block_hashes(token_ids[:max_blocks * bs], bs)
        for i, h in enumerate(all_hashes):
            block = self.pool.lookup(h, tuple(token_ids[i * bs:(i + 1) * bs]))
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        for b in blocks:
            self.pool.touch(b)
        self.num_prefix_hit_tokens += len(blocks) * bs
        if blocks:
            self._tables[request_id] = blocks
            self._hashes[request_id] = hashes
        self.num_prefix_query_tokens += len(token_ids)
        return len(blocks) * bs

    def start_load(self, request_id: str, token_ids: Sequence[int], kv_transfer: str | None = None,
                   layerwise: bool = False) -> bool:
        """After ``match_prefix``: if the connector can fill the following full blocks, allocate them and
        start their load (True: the request waits for ``finish_loads``, or, when the load is layer-wise --
        ``layerwise`` asked, the plan allows it and the cache holds the whole prompt -- is scheduled at once,
        with ``num_held_tokens`` computed). A connector that ``loads_prompt_tail`` (a prefill instance) is asked
        for the prompt's tail too (``prompt_tail``: one more hash than ``tokens``, loaded last), so that only the
        last token is left to compute."""
        if self.connector is None:
            return False
        bs = self.block_size
        start = len(self._tables.get(request_id, ()))
        max_blocks = (len(token_ids) - 1) // bs
        tail = prompt_tail(token_ids, bs) if kv_transfer and self.connector.loads_prompt_tail else None
        if start >= max_blocks + (tail is not None):
            return False
        parent = self._hashes[request_id][-1] if start else ROOT_HASH
        hashes = block_hashes(token_ids[:max_blocks * bs], bs, start=start, parent=parent)
        tokens = [tuple(token_ids[i * bs:(i + 1) * bs]) for i in range(start, max_blocks)]
        if tail is not None:
            hashes.append(chain_hash(hashes[-1] if hashes else parent, tail[1]))
        plan = self.connector.plan_load(hashes, tokens, kv_transfer)
        n = min(plan.num_blocks, self.pool.num_free) if plan is not None else 0
        if plan is None or n == 0:
            return False
        # NOTE: layer-wise only when the rest of the prompt fits beside the load: the request is then scheduled at
        # once, and never holds loading blocks while it waits for more
        layerwise = layerwise and plan.layerwise and \
            blocks_needed(len(token_ids), bs) - start - n <= self.pool.num_free - n
        blocks = self.pool.allocate(n)
        self._tables.setdefault(request_id, []).extend(blocks)
        self._views.pop(request_id, None)
        self._loading[request_id] = (blocks, hashes[:n], tokens[:n], len(tail[1]) if tail and n == len(hashes) else 0)
        load_id = self.connector.begin_load(request_id, plan, blocks, layerwise)
        if layerwise:
            self._layerwise[request_id] = load_id
        return True

    def num_held_tokens(self, request_id: str) -> int:
        """The tokens of the request's blocks (those matched and those being loaded)."""
        return len(self._tables.get(request_id, ())) * self.block_size

    def is_layerwise(self, request_id: str) -> bool:
        return request_id in self._layerwise

    def wait_loads(self, request_ids: Sequence[str]) -> list[int]:
        """The layer-wise loads still running under these requests (a step that reads them lists them)."""
        if not self._layerwise:  # every step without one: no pass over the batch
            return []
        return [self._layerwise[r] for r in request_ids if r in self._layerwise]

    def finish_loads(self) -> list[LoadResult]:
        """Loads that are done, for each request still here. The blocks that arrived are registered (cached
        for others too); of a waiting load the rest are freed, to be recomputed; a layer-wise load's request
        keeps its table (a short load: the scheduler frees it and recomputes the request)."""
        if self.connector is None or not self._loading:
            return []
        out = []
        for done in self.connector.finished_loads():
            rid = done.request_id
            blocks, hashes, tokens, tail_len = self._loading.pop(rid)
            layerwise = self._layerwise.pop(rid, None) is not None
            table = self._tables[rid]
            got = done.num_blocks
            for block, h, t in zip(blocks[:got], hashes, tokens):  # full blocks only: a tail has no tokens here
                self.pool.register(block, h, t)
            if not layerwise:
                del table[len(table) - len(blocks) + got:]
                self.pool.free(blocks[got:][::-1])
            self._hashes.setdefault(rid, []).extend(hashes[:min(got, len(tokens))])
            if rid in self._freed_while_loading:
                self._freed_while_loading.discard(rid)
                self.free(rid)
                continue
            if not table:
                del self._tables[rid]
            # a tail that arrived holds tail_len tokens of its block (the prompt's last one is computed next)
            short = self.block_size - tail_len if tail_len and got == len(blocks) else 0
            out.append(LoadResult(rid, len(table) * self.block_size - short, layerwise, got == len(blocks)))
        return out

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until a load report arrives (or ``timeout_s`` passes); ``finish_loads`` then takes it."""
        if self.connector is not None:
            self.connector.wait(timeout_s)

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    def hold(self, request_id: str, prompt: Sequence[int]) -> tuple[list[int], list[int]]:
        """A reference to a computed ``prompt``'s blocks short of its last token (and their hashes), kept after
        the request is freed: a prefill instance holds them for a decode instance to pull. The full blocks, and
        the block holding the prompt's tail under the tail's hash (``prompt_tail``). Give them back with
        ``release``."""
        table = self._tables.get(request_id, [])
        hashes = list(self._hashes.get(request_id, ()))[:(len(prompt) - 1) // self.block_size]
        blocks = table[:len(hashes)]
        tail = prompt_tail(prompt, self.block_size)
        if tail is not None and tail[0] == len(hashes) < len(table):  # every full block before it is registered
            blocks.append(table[tail[0]])
            hashes.append(chain_hash(hashes[-1] if hashes else ROOT_HASH, tail[1]))
        self.pool.share(blocks)
        return blocks, hashes

    def release(self, blocks: list[int]) -> None:
        self.pool.free(blocks[::-1])

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's full blocks whose latents are now computed."""
        if not self.enable_prefix_caching or request_id not in self._tables:
            return
        done = self._hashes.setdefault(request_id, [])
        table = self._tables[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        if num_full <= len(done):
            return
        parent = done[-1] if done else ROOT_HASH
        new = block_hashes(token_ids[:num_full * self.block_size], self.block_size, start=len(done), parent=parent)
        tokens = [tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
                  for i in range(len(done), num_full)]
        for i, (h, t) in enumerate(zip(new, tokens), start=len(done)):
            self.pool.register(table[i], h, t)
        if self.connector is not None:
            self.connector.save(table[len(done):num_full], new, tokens)
        done.extend(new)

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> BlockTable | None:
        """Make room for ``num_total_tokens`` tokens of this request in the cache.

        Returns the request's table, or None (and allocates nothing) when too few blocks are free.
        """
        table = self._tables.setdefault(request_id, [])
        missing = -(-num_total_tokens // self.block_size) - len(table)
        if missing <= 0:
            view = self._views.get(request_id)
            if view is not None:  # NOTE: most decode steps: no new block, no new tuple
                return view
        elif missing > self.pool.num_free:
            if not table:
                del self._tables[request_id]
            return None
        else:
            table.extend(self.pool.allocate(missing))
        view = self._views[request_id] = BlockTable(tuple(table))
        return view

    def table(self, request_id: str) -> BlockTable:
        return BlockTable(tuple(self._tables.get(request_id, ())))

    def free(self, request_id: str) -> None:
        """Release every block of the request (idempotent). Its cached blocks stay reusable until evicted;
        the tail goes first (freed in reverse, so it is reused before the shared head). A request whose
        blocks are loading keeps them until the load is done (the ranks are still writing them)."""
        if request_id in self._loading:
            self._freed_while_loading.add(request_id)
            return
        blocks = self._tables.pop(request_id, None)
        self._views.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if blocks:
            self.pool.free(blocks[::-1])

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

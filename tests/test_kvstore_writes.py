"""A rank's store writes below the engine (kvstore/store_writer.py, kvstore/mover.py's save): the write slots reused
and re-encoded in place, copies in runs, whole stored values built on the device, and a save on CUDA that never
waits for the device."""

from __future__ import annotations

import pytest
import torch

from moeserve.kvstore.block_format import BlockLayout, decode_block, encode_block_into
from moeserve.kvstore.latent_cache import allocate_latent_caches
from moeserve.kvstore.mover import BlockMover, MoverCounters, copy_runs
from moeserve.kvstore.prefix import block_hashes
from moeserve.kvstore.store import MemoryStore
from moeserve.kvstore.store_writer import StoreWriter

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUT = BlockLayout("0123456789abcdef0123456789abcdef", "float32", 4, 0, 0, 2, 3)


def test_memory_store_keeps_copies_of_the_views_it_is_given() -> None:
    store, buf = MemoryStore(), bytearray(b"abcd")
    store.put([("k", memoryview(buf))])
    buf[:] = b"wxyz"  # the writer reuses its slot
    assert store.get(["k"]) == [b"abcd"]


@pytest.mark.parametrize("device", DEVICES)
def test_write_slots_reused_many_times_store_every_block_right(device: str) -> None:
    """Two write slots, six blocks saved one after another: each slot is refilled and re-encoded in place, and
    every stored value still decodes to its own block (the store kept what was sent, not the slot)."""
    store = MemoryStore()
    torch.manual_seed(1)
    caches = {i: torch.randn(8, 4, 3).to(device) for i in range(2)}
    mover = BlockMover(caches, LAYOUT, 0, store, write_queue_bytes=2 * LAYOUT.payload_bytes)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(6)]
    hashes = block_hashes([t for block in tokens for t in block], 4)
    for b in range(6):
        mover.save([b], [-1], [hashes[b]], [tokens[b]], [True])
        assert mover.flush()
    assert mover.counters.blocks_written == 6 and mover.counters.writes_dropped == 0
    for b in range(6):
        payload, why = decode_block(store.get([LAYOUT.key(hashes[b])])[0], LAYOUT, hashes[b], tokens[b])
        assert why == "" and payload is not None
        want = torch.stack([caches[i][b] for i in range(2)]).cpu()
        assert bytes(payload) == want.numpy().tobytes()
    mover.close()


def test_copy_runs_group_pairs_consecutive_in_rows_and_slots() -> None:
    assert copy_runs(range(7), [4, 5, 6, 9, 10, 2, 1]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1), (6, 1, 1)]
    assert copy_runs([0, 1, 3, 4], [5, 6, 7, 8]) == [(0, 5, 2), (3, 7, 2)]  # a row skipped ends a run
    assert copy_runs([], []) == [] and copy_runs([2], [7]) == [(2, 7, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_save_on_cuda_never_waits_for_the_device() -> None:
    """A save to the host tier and the store only queues copies: it returns while the device is still busy with
    the work queued before it (a run of write slots' latents is strided, and copy_ into a strided pinned tensor
    went through a pageable buffer and waited). Every block still reaches both places intact. (A first save in a
    process waits once: CUDA loads the gather's kernels at their first use, which waits for the device. That
    save is made first, on other blocks and slots.)"""
    torch.manual_seed(2)
    caches = allocate_latent_caches([0, 1], 16, 4, 3, torch.float32, torch.device("cuda"))
    for cache in caches.values():
        cache.copy_(torch.randn_like(cache))
    store = MemoryStore()
    mover = BlockMover(caches, LAYOUT, 8, store, write_queue_bytes=8 * LAYOUT.payload_bytes)
    tokens = [tuple(range(i * 4, i * 4 + 4)) for i in range(6)]
    hashes = block_hashes([t for block in tokens for t in block], 4)
    blocks, host_slots = [3, 4, 5, 9, 10, 11], [0, 1, 2, 5, 6, 7]
    mover.save([1, 2], [3, 4], [7, 8], [(0,) * 4] * 2, [True, False])
    assert mover.flush()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the step's stream busy for about a second
    busy = torch.cuda.Event()
    busy.record()
    mover.save(blocks, host_slots, hashes, tokens, [True] * 6)
    assert not busy.query(), "the save waited for the device"
    assert mover.flush() and mover.counters.blocks_written == 7
    torch.cuda.synchronize()
    assert mover.host is not None
    for b, slot, h, toks in zip(blocks, host_slots, hashes, tokens):
        want = torch.stack([caches[i][b] for i in range(2)]).cpu()
        assert torch.equal(mover.host[slot], want)
        payload, why = decode_block(store.get([LAYOUT.key(h)])[0], LAYOUT, h, toks)
        assert why == "" and payload is not None and bytes(payload) == want.numpy().tobytes()
    mover.close()


def test_write_values_laid_out_on_the_device_decode_to_their_blocks() -> None:
    """StoreWriter.as_values (an accelerator's save: whole stored values built on the device, so that a run of
    write slots is one copy), run on CPU tensors: each value's latent is its block, in the order asked, and the
    writer's in-place encoding of the header makes it a value that decodes to that block."""
    counters = MoverCounters()
    writer = StoreWriter(MemoryStore(), LAYOUT, (2, 4, 3), torch.float32, False, 4 * LAYOUT.payload_bytes, counters)
    data = torch.randn(3, 2, 4, 3, generator=torch.Generator().manual_seed(4))
    values = writer.as_values(data, [2, 0])
    assert values.shape == (2, LAYOUT.value_bytes) and values.dtype == torch.uint8
    tokens = [tuple(range(4)), tuple(range(4, 8))]
    hashes = block_hashes([t for b in tokens for t in b], 4)
    for value, b, h, toks in zip(values, [2, 0], hashes, tokens):
        raw = value.numpy().copy()
        encode_block_into(LAYOUT, h, toks, memoryview(raw))
        payload, why = decode_block(raw.tobytes(), LAYOUT, h, toks)
        assert why == "" and payload is not None and bytes(payload) == data[b].numpy().tobytes()
    assert writer.take_slots(5) == [0, 1, 2, 3] and counters.writes_dropped == 1  # room for four: one dropped
    assert writer.take_slots(2) == [] and counters.writes_dropped == 3  # the queue is full
    writer.close()

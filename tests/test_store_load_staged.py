"""kvstore/store_load.py's staged way (an accelerator's: values received into a reading thread's slot, then copied
into the caches), run on a CPU against a real ``redis-server``: whole values and layer by layer, bit-equal to what
was stored, layers announced in order, and a corrupt or missing block ending the prefix there."""

from __future__ import annotations

import pytest
import torch
from redis_server import RedisServer

from moeserve.kvstore import store_load
from moeserve.kvstore.block_format import BlockLayout, encode_block
from moeserve.kvstore.latent_cache import allocate_latent_caches
from moeserve.kvstore.prefix import block_hashes
from moeserve.kvstore.store import RedisStore
from moeserve.kvstore.store_load import StoreLoader

pytestmark = pytest.mark.skipif(RedisServer.unavailable() is not None, reason=str(RedisServer.unavailable()))

LAYERS, BLOCK, DIM, N = 3, 4, 8, 10
LAYOUT = BlockLayout("0123456789abcdef0123456789abcdef", "float32", BLOCK, 0, 0, LAYERS, DIM)


@pytest.fixture()
def stored(tmp_path):
    """N blocks of random latent in a fresh redis-server -> (store, server, hashes, tokens, latent [N, L, B, D])."""
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, read_connections=2)
        ids = list(range(1000, 1000 + N * BLOCK))
        hashes = block_hashes(ids, BLOCK)
        tokens = [ids[i * BLOCK:(i + 1) * BLOCK] for i in range(N)]
        latent = torch.randn(N, LAYERS, BLOCK, DIM, generator=torch.Generator().manual_seed(3))
        raw = latent.view(torch.uint8).reshape(N, -1).numpy()
        store.put([(LAYOUT.key(h), encode_block(LAYOUT, h, t, raw[i].data))
                   for i, (h, t) in enumerate(zip(hashes, tokens))])
        yield store, server, hashes, tokens, latent


def loader_for(store: RedisStore, stacked: bool, device: str = "cpu") -> tuple[StoreLoader, list[torch.Tensor]]:
    if stacked:
        by_layer = allocate_latent_caches(list(range(LAYERS)), N + 2, BLOCK, DIM, torch.float32, torch.device(device))
        caches = [by_layer[j] for j in range(LAYERS)]
    else:
        caches = [torch.zeros(N + 2, BLOCK, DIM, device=device) for _ in range(LAYERS)]
    loader = StoreLoader(caches, LAYOUT, store, 2, staged=True)
    loader.chunk_blocks = 1  # a slot holds one block: a span's layer slices go in pieces of three
    return loader, caches


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("stacked", [False, True], ids=["a-tensor-a-layer", "one-tensor"])
@pytest.mark.parametrize("layerwise", [0, 4, 2], ids=["whole-values", "layer-by-layer", "two-layers-a-read"])
def test_staged_loads_are_bit_equal_and_announce_layers_in_order(stored, layerwise: int, stacked: bool,
                                                                 device: str, monkeypatch) -> None:
    """On CUDA, the slots pinned and the copies on the reading threads' own streams. ``layerwise``: the reads a
    layer-wise load makes (``LAYERWISE_READS``; 0: whole values)."""
    monkeypatch.setattr(store_load, "LAYERWISE_READS", layerwise or store_load.LAYERWISE_READS)
    store, _server, hashes, tokens, latent = stored
    loader, caches = loader_for(store, stacked, device)
    blocks = list(range(2, N + 2))
    announced: list[int] = []
    if layerwise:
        result = loader.load_layers(hashes, tokens, blocks, announced.append)
        group = -(-LAYERS // layerwise)  # the layers come in groups, each read as one slice of every value
        assert announced == [min(LAYERS, j + group) for j in range(0, LAYERS, group)] and len(announced) > 1
    else:
        result = loader.load(hashes, tokens, blocks)
    assert (result.num_ok, result.num_corrupt) == (N, 0)
    for j in range(LAYERS):
        assert torch.equal(caches[j][2:].cpu(), latent[:, j])
        assert not caches[j][:2].any()  # nothing outside the blocks asked for
    loader.close()


def test_staged_layerwise_load_ends_at_a_corrupt_or_missing_block(stored) -> None:
    store, server, hashes, tokens, _latent = stored
    key = LAYOUT.key(hashes[6])
    value = bytearray(store.get([key])[0])
    value[-5] ^= 0xFF  # in the last layer's slice of block 6: seen only by the checksum carried to the end
    store.put([(key, bytes(value))])
    loader, _caches = loader_for(store, stacked=True)
    result = loader.load_layers(hashes, tokens, list(range(2, N + 2)), lambda _: None)
    assert (result.num_ok, result.num_corrupt) == (6, 1)
    server.cli("del", LAYOUT.key(hashes[3]))
    result = loader.load_layers(hashes, tokens, list(range(2, N + 2)), lambda _: None)
    assert (result.num_ok, result.num_corrupt) == (3, 0)
    loader.close()

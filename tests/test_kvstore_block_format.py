"""The stored form of a cache block (kvstore/block_format.py): the stable prefix hash, a value's round trip and
every way it can fail to match (a miss with its reason), the in-place encoding a rank's writer uses, and keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.kvstore.block_format import (
    HEADER_BYTES,
    BlockLayout,
    decode_block,
    encode_block,
    encode_block_into,
)
from moeserve.kvstore.prefix import ROOT_HASH, block_hashes, chain_hash
from moeserve.kvstore.store import redact

FP = "0123456789abcdef0123456789abcdef"
LAYOUT = BlockLayout(FP, "float32", 4, 0, 0, 2, 3)


def test_chain_hash_is_pinned_sha256_not_python_hash() -> None:
    """The value is part of the stored keys: other nodes, builds and versions must compute the same."""
    h = block_hashes(list(range(8)), 4)
    assert h == [chain_hash(ROOT_HASH, [0, 1, 2, 3]), chain_hash(h[0], [4, 5, 6, 7])]
    assert all(0 <= x < 1 << 128 for x in h)
    assert f"{h[0]:032x}" == PINNED_FIRST


PINNED_FIRST = "3278359b14fe96887521d386d39ebd9b"  # sha256(le128(0x5EED) + le64 tokens)[:16], little-endian


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=4), st.binary(min_size=96, max_size=96))
def test_block_round_trips_and_any_flipped_byte_is_a_miss(tokens: list[int], payload: bytes) -> None:
    value = encode_block(LAYOUT, 7, tokens, payload)
    got, why = decode_block(value, LAYOUT, 7, tokens)
    assert got is not None and bytes(got) == payload and why == ""
    for pos in (0, 5, HEADER_BYTES - 1, HEADER_BYTES + 2, len(value) - 1):
        bad = bytearray(value)
        bad[pos] ^= 0x01
        assert decode_block(bytes(bad), LAYOUT, 7, tokens)[0] is None


def test_mismatches_are_misses_with_a_reason() -> None:
    tokens, payload = [1, 2, 3, 4], bytes(96)
    value = encode_block(LAYOUT, 7, tokens, payload)
    assert decode_block(None, LAYOUT, 7, tokens) == (None, "missing")
    assert "bytes" in decode_block(value[:-1], LAYOUT, 7, tokens)[1]
    assert "header" in decode_block(value, LAYOUT, 8, tokens)[1]  # another chain hash
    other = BlockLayout(FP, "float32", 4, 1, 2, 2, 3)  # another stage, same size
    assert "header" in decode_block(value, other, 7, tokens)[1]
    assert "token" in decode_block(value, LAYOUT, 7, [1, 2, 3, 5])[1]  # a hash collision
    with pytest.raises(ValueError):
        encode_block(LAYOUT, 7, tokens[:3], payload)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4), st.binary(min_size=96, max_size=96),
       st.integers(0, 2**128 - 1))
def test_a_value_encoded_in_place_is_the_encoded_value(tokens: list[int], payload: bytes, chain: int) -> None:
    """A rank's writer encodes a staged block in place (its latent already after the header and token ids):
    the same bytes as encode_block, whatever the buffer held before."""
    value = bytearray(b"\xee" * LAYOUT.value_bytes)
    value[LAYOUT.head_bytes:] = payload
    encode_block_into(LAYOUT, chain, tokens, memoryview(value))
    assert bytes(value) == encode_block(LAYOUT, chain, tokens, payload)
    with pytest.raises(ValueError):
        encode_block_into(LAYOUT, chain, tokens, memoryview(value)[1:])


def test_keys_name_model_dtype_stage_layers_and_salt() -> None:
    key = LAYOUT.key(255)
    assert key.startswith(f"moeserve:kv1:{FP}:float32:b4:s0:l0-2:") and key.endswith(f"{255:032x}")
    salted = BlockLayout(FP, "float32", 4, 0, 0, 2, 3, salt="tenant-a")
    assert salted.key(255) != key and "tenant-a" not in salted.key(255)
    assert BlockLayout(FP, "bfloat16", 4, 0, 0, 2, 3).key(255) != key
    assert redact("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"

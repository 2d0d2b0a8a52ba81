"""The stored form of one cache block: its key and its value (docs/kvstore.md).

Key: ``moeserve:kv1:<model fingerprint>:<dtype>:b<block size>:s<pp stage>:l<first>-<end layer>[:t<salt tag>]:<chain
hash>``: one key per block and pipeline stage, never per tp rank (every tp rank of a stage holds the same latent).

Value: a fixed little-endian header, the block's token ids, then the raw latent of the block for every layer of
the stage, layer-major ``[num_layers, block_size, kv_dim]`` in the cache dtype. Nothing is pickled. The
header repeats what the key says (fingerprint, layout, chain hash) and an xxh3-128 checksum of everything after
it; a value whose header, token ids or checksum does not match what the reader expects is a miss.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

MAGIC = b"MSKV"
VERSION = 1
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
# magic, version, dtype code, reserved, block_size, layer_start, num_layers, kv_dim, num_tokens, fingerprint,
# chain hash, checksum
_HEADER = struct.Struct("<4sHBBIIIII16s16s16s")
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True)
class BlockLayout:
    """What one stage stores per block: ``num_layers`` layers from ``layer_start``, each ``[block_size, kv_dim]``."""

    fingerprint: str  # 32 hex digits (model_fingerprint)
    dtype: str
    block_size: int
    pp_stage: int
    layer_start: int
    num_layers: int
    kv_dim: int
    salt: str = ""  # a tenant's salt: blocks of other salts are never seen

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported cache dtype {self.dtype!r}")
        if len(bytes.fromhex(self.fingerprint)) != 16:
            raise ValueError("fingerprint must be 32 hex digits")

    @property
    def payload_bytes(self) -> int:
        return self.num_layers * self.block_size * self.kv_dim * DTYPE_SIZES[self.dtype]

    @property
    def head_bytes(self) -> int:
        """The header and the token ids: what comes before the latent."""
        return HEADER_BYTES + 4 * self.block_size

    @property
    def value_bytes(self) -> int:
        return self.head_bytes + self.payload_bytes

    @property
    def key_prefix(self) -> str:
        salt = f":t{hashlib.sha256(self.salt.encode()).hexdigest()[:16]}" if self.salt else ""
        end = self.layer_start + self.num_layers
        return (f"moeserve:kv1:{self.fingerprint}:{self.dtype}:b{self.block_size}:s{self.pp_stage}"
                f":l{self.layer_start}-{end}{salt}:")

    def key(self, chain_hash: int) -> str:
        return f"{self.key_prefix}{chain_hash:032x}"


def _head(layout: BlockLayout, chain_hash: int, checksum: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[layout.dtype], 0, layout.block_size, layout.layer_start,
                        layout.num_layers, layout.kv_dim, layout.block_size, bytes.fromhex(layout.fingerprint),
                        chain_hash.to_bytes(16, "little"), checksum)


def encode_block(layout: BlockLayout, chain_hash: int, tokens: Sequence[int], payload: bytes | memoryview) -> bytes:
    """The value of one block: header, token ids (uint32), payload (``layout.payload_bytes`` raw bytes)."""
    if len(payload) != layout.payload_bytes:
        raise ValueError(f"a stored block holds {layout.payload_bytes} bytes of latent, got {len(payload)}")
    value = bytearray(layout.value_bytes)
    value[layout.head_bytes:] = payload
    encode_block_into(layout, chain_hash, tokens, memoryview(value))
    return bytes(value)


def encode_block_into(layout: BlockLayout, chain_hash: int, tokens: Sequence[int], value: memoryview) -> None:
    """Make ``value`` (``layout.value_bytes`` writable bytes, the payload already in place after the header and
    the token ids) one block's value: write its token ids and its header. No copy of the payload: the writer
    thread of a rank encodes its staged blocks in place (a copy would hold the GIL for a millisecond a block)."""
    if len(tokens) != layout.block_size or len(value) != layout.value_bytes:
        raise ValueError(f"a stored block holds {layout.block_size} tokens and {layout.value_bytes} bytes, "
                         f"got {len(tokens)} and {len(value)}")
    struct.pack_into(f"<{len(tokens)}I", value, HEADER_BYTES, *tokens)
    digest = xxhash.xxh3_128(_head(layout, chain_hash, bytes(16)))
    digest.update(value[HEADER_BYTES:])  # xxhash lets go of the GIL over large buffers
    value[:HEADER_BYTES] = _head(layout, chain_hash, digest.digest())


def check_block(head: bytes | bytearray | memoryview, payload: Sequence[bytes | memoryview], layout: BlockLayout,
                chain_hash: int, tokens: Sequence[int]) -> str:
    """"" when a value read in parts -- ``head`` (its header and token ids), then ``payload`` (its latent,
    in order) -- is this block for this layout, else why it is a miss."""
    if len(head) != layout.head_bytes or sum(len(p) for p in payload) != layout.payload_bytes:
        return f"{len(head) + sum(len(p) for p in payload)} bytes, expected {layout.value_bytes}"
    why = check_head(head, layout, chain_hash, tokens)
    if why:
        return why
    digest = start_checksum(head)
    # NOTE: one update over the joined parts, not one per part: xxhash lets go of the GIL in every update, and
    # with the engine's loop busy each taking back waits up to a switch interval (5 ms); a value read into a CPU
    # cache has a part per layer
    digest.update(payload[0] if len(payload) == 1 else b"".join(payload))
    return checksum_verdict(head, digest)


def start_checksum(head: bytes | bytearray | memoryview) -> xxhash.xxh3_128:
    """The checksum of a value read in order, over its header and token ids (``head``, its checksum field taken as
    zeros, as it was computed): update it with the latent's bytes as they come, then ``checksum_verdict``. A
    header that is not the expected one is caught by ``check_head``."""
    view = memoryview(head)
    digest = xxhash.xxh3_128(bytes(view[:HEADER_BYTES - 16]) + bytes(16))
    digest.update(view[HEADER_BYTES:])
    return digest


def checksum_verdict(head: bytes | bytearray | memoryview, digest: xxhash.xxh3_128) -> str:
    """"" when ``digest`` (``start_checksum(head)`` updated with the whole latent) is the checksum ``head`` stores,
    else why it is a miss."""
    return "" if digest.digest() == bytes(memoryview(head)[HEADER_BYTES - 16:HEADER_BYTES]) else "checksum mismatch"


def check_head(head: bytes | bytearray | memoryview, layout: BlockLayout, chain_hash: int,
               tokens: Sequence[int]) -> str:
    """"" when a value's header and token ids are this block's (its checksum is not checked: a layer-wise load
    checks it once every layer is in), else why it is a miss."""
    view = memoryview(head)
    checksum = bytes(view[HEADER_BYTES - 16:HEADER_BYTES])
    if bytes(view[:HEADER_BYTES]) != _head(layout, chain_hash, checksum):
        return "header does not match (version, model, layout or hash)"
    if bytes(view[HEADER_BYTES:]) != struct.pack(f"<{len(tokens)}I", *tokens):
        return "token ids differ (hash collision)"
    return ""


def decode_block(value: bytes | None, layout: BlockLayout, chain_hash: int,
                 tokens: Sequence[int]) -> tuple[memoryview | None, str]:
    """(the payload, "") when ``value`` is this block for this layout, else (None, why it is a miss)."""
    if value is None:
        return None, "missing"
    if len(value) != layout.value_bytes:
        return None, f"{len(value)} bytes, expected {layout.value_bytes}"
    view = memoryview(value)
    why = check_block(view[:layout.head_bytes], [view[layout.head_bytes:]], layout, chain_hash, tokens)
    return (None, why) if why else (view[layout.head_bytes:], "")


def model_fingerprint(model_dir: Path, load_format: str = "auto", seed: int = 0) -> str:
    """32 hex digits naming the weights: config.json, and each weight file's name, size and first and last
    64 KiB (a dummy model: its seed). Two nodes with copies of one checkpoint agree; any other does not."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    if load_format == "dummy":
        h.update(f"dummy:{seed}".encode())
        return h.hexdigest()[:32]
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return h.hexdigest()[:32]

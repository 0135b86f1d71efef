"""Chunk format: header record, payload size and offsets, checksum checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import make_caches

from pdx.checksum import checksum
from pdx.errors import ChunkFormatError, IntegrityError, LayoutError
from pdx.kernels import (
    HEADER_BYTES,
    ChunkHeader,
    check_payload,
    decode_header,
    encode_header,
    make_header,
    pack,
    payload_bytes,
    payload_offsets,
)
from pdx.layout import KVDtype, KVLayout, MemoryLayout

LAY = KVLayout("m", KVDtype.FP32, num_layers=3, num_kv_heads=4, head_size=8, block_size=4, tp_size=2, tp_rank=1,
               memory_layout=MemoryLayout.HND)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 2), st.integers(0, 2**64 - 1), st.binary(min_size=8, max_size=8))
def test_header_round_trip(tokens: int, h0: int, csum: int, fp: bytes) -> None:
    h = ChunkHeader(fp.hex(), tokens, h0, h0 + 1, tokens * 7, csum)
    data = encode_header(h)
    assert len(data) == HEADER_BYTES
    assert decode_header(data + b"payload follows") == h


def test_header_of_a_packed_chunk() -> None:
    caches = make_caches(LAY, 4, "separate", 3)
    out = bytearray(payload_bytes(LAY, 6))
    pack(caches, LAY, [(2, 1, 3), (0, 0, 3)], out)
    h = make_header(LAY, 6, out)
    assert (h.num_tokens, h.heads, h.payload_bytes) == (6, (2, 4), len(out))
    assert h.fingerprint == LAY.chunk_fingerprint
    assert h.checksum == checksum(out)
    check_payload(h, out)
    out[5] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        check_payload(h, out)
    with pytest.raises(IntegrityError, match="bytes"):
        check_payload(h, out[:-1])
    with pytest.raises(LayoutError, match="payload is"):
        make_header(LAY, 5, out)
    sub = make_header(LAY, 6, bytearray(payload_bytes(LAY, 6, (3, 4))), heads=(3, 4))
    assert sub.fingerprint == LAY.chunk_fingerprint_for_heads(3, 4) != LAY.chunk_fingerprint


@pytest.mark.parametrize("offset", [0, 4, 8, 16, 30, 56, 63])
def test_corrupt_header_is_refused(offset: int) -> None:
    data = bytearray(encode_header(ChunkHeader("00112233aabbccdd", 256, 0, 8, 1 << 20, 42)))
    data[offset] ^= 0x10
    with pytest.raises(ChunkFormatError):
        decode_header(data)


def test_header_errors() -> None:
    with pytest.raises(ChunkFormatError, match="need 64"):
        decode_header(b"PDXC")
    with pytest.raises(ChunkFormatError, match="hex"):
        encode_header(ChunkHeader("not hex!", 1, 0, 1, 1, 1))
    with pytest.raises(ChunkFormatError, match="out of range"):
        encode_header(ChunkHeader("00112233aabbccdd", 2**33, 0, 1, 1, 1))


def test_payload_size_and_offsets_match_the_packed_bytes() -> None:
    assert payload_bytes(LAY, 6) == 6 * LAY.token_bytes() == 6 * 2 * 3 * 2 * 8 * 4
    assert payload_bytes(LAY, 6, (0, 4)) == 2 * payload_bytes(LAY, 6)
    with pytest.raises(LayoutError):
        payload_bytes(LAY, 6, (3, 9))
    caches = make_caches(LAY, 4, "separate", 5)
    out = torch.zeros(payload_bytes(LAY, 4), dtype=torch.uint8)
    pack(caches, LAY, [(3, 0, 4)], out)
    start, end = payload_offsets(LAY, 4, layer=2, kv=1)
    v = out[start:end].view(torch.int32).view(2, 4, 8)  # V: [heads, tokens, dim]
    assert torch.equal(v, caches[2][1, 3].view(torch.int32))  # HND: [2, blocks, heads, block, dim]
    start, end = payload_offsets(LAY, 4, layer=1, kv=0)
    k = out[start:end].view(torch.int32).view(2, 8, 4)  # K: [heads, dim, tokens]
    assert torch.equal(k, caches[1][0, 3].view(torch.int32).transpose(1, 2))
    with pytest.raises(LayoutError):
        payload_offsets(LAY, 4, layer=3, kv=0)

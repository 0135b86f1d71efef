"""Chunk keys are deterministic across processes and differ across layouts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdx.keys import chunk_keys, tail_candidates, tail_key
from pdx.layout import KVDtype, KVLayout, MemoryLayout

LAYOUT = KVLayout("tiny", KVDtype.FP32, num_layers=2, num_kv_heads=4, head_size=32, block_size=16)

SCRIPT = """
import sys
from pdx.keys import chunk_keys, tail_key
from pdx.layout import KVLayout, KVDtype
layout = KVLayout("tiny", KVDtype.FP32, num_layers=2, num_kv_heads=4, head_size=32, block_size=16)
tokens = list(range(1000, 1000 + 1030))
print(",".join(k.hex() for k in chunk_keys(tokens, layout.chunk_fingerprint, 256, namespace="t1")))
"""


def test_same_keys_in_processes_with_different_hash_seeds() -> None:
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, check=True, timeout=60).stdout.strip()
        outputs.add(out)
    assert len(outputs) == 1
    (keys,) = outputs
    assert len(keys.split(",")) == 4  # 1030 tokens -> 4 full chunks of 256
    expected = chunk_keys(list(range(1000, 2030)), LAYOUT.chunk_fingerprint, 256, namespace="t1")
    assert keys == ",".join(k.hex() for k in expected)


@pytest.mark.parametrize(
    "changed",
    [
        {"model_id": "other"},
        {"dtype": KVDtype.BF16},
        {"num_layers": 3},
        {"num_kv_heads": 8},
        {"head_size": 64},
        {"tp_size": 2, "tp_rank": 1},
    ],
)
def test_different_layout_gives_different_keys(changed: dict[str, object]) -> None:
    other = KVLayout(**{**LAYOUT.to_dict(), **changed})  # type: ignore[arg-type]
    tokens = list(range(512))
    assert chunk_keys(tokens, LAYOUT.chunk_fingerprint) != chunk_keys(tokens, other.chunk_fingerprint)


def test_block_size_and_memory_layout_share_chunk_keys_but_not_the_handshake_fingerprint() -> None:
    # Chunks are packed in one canonical order, so their bytes do not depend on the
    # engine's paging; the handshake still tells the engines apart.
    other = KVLayout(**{**LAYOUT.to_dict(), "block_size": 128,  # type: ignore[arg-type]
                        "memory_layout": MemoryLayout.HND})
    assert other.chunk_fingerprint == LAYOUT.chunk_fingerprint
    assert other.fingerprint != LAYOUT.fingerprint


def test_namespace_separates_tenants() -> None:
    tokens = list(range(256))
    assert chunk_keys(tokens, "fp", namespace="a") != chunk_keys(tokens, "fp", namespace="b")


def test_cache_salt_separates_tenants_and_leaves_unsalted_keys_alone() -> None:
    tokens = list(range(600))
    plain = chunk_keys(tokens, "fp", 128)
    a, b = chunk_keys(tokens, "fp", 128, salt="tenant-a"), chunk_keys(tokens, "fp", 128, salt="tenant-b")
    assert len(a) == len(b) == len(plain) == 4
    assert not set(a) & set(b) and not set(a) & set(plain) and not set(b) & set(plain)  # not one chunk shared
    assert chunk_keys(tokens, "fp", 128, salt="tenant-a") == a  # deterministic
    assert chunk_keys(tokens, "fp", 128, salt="") == plain  # no salt: the keys stored chunks already have
    # (namespace, salt) pairs never spell each other's seed
    assert chunk_keys(tokens, "fp", 128, "x|y", salt="") != chunk_keys(tokens, "fp", 128, "x", salt="y")
    assert chunk_keys(tokens, "fp", 128, "ab", salt="c") != chunk_keys(tokens, "fp", 128, "a", salt="bc")
    # tails follow the salt too, with or without the full keys at hand
    ta = tail_key(tokens, 599, "fp", 128, salt="tenant-a")
    assert ta == tail_key(tokens, 599, "fp", 128, full_keys=a, salt="tenant-a")
    assert ta not in (tail_key(tokens, 599, "fp", 128, salt="tenant-b"), tail_key(tokens, 599, "fp", 128))
    assert tail_key(tokens[:100], 99, "fp", 128, salt="s") != tail_key(tokens[:100], 99, "fp", 128)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=600), st.sampled_from([16, 64, 256]))
def test_keys_are_prefix_chained(tokens: list[int], chunk: int) -> None:
    keys = chunk_keys(tokens, "fp", chunk)
    assert len(keys) == len(tokens) // chunk
    # A prompt that extends another shares its leading keys, and only those.
    longer = chunk_keys([*tokens, 7] * 2, "fp", chunk)
    assert longer[: len(keys)] == keys
    assert len(set(keys)) == len(keys)
    if keys:
        changed = list(tokens)
        changed[0] ^= 1
        assert all(a != b for a, b in zip(chunk_keys(changed, "fp", chunk), keys))


def test_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_keys([1, 2, 3], "fp", 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=400), st.sampled_from([16, 64]), st.data())
def test_tail_keys(tokens: list[int], chunk: int, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, len(tokens)))
    key = tail_key(tokens, end, "fp", chunk)
    if end % chunk == 0:
        assert key is None
        return
    assert key is not None
    full = chunk_keys(tokens, "fp", chunk)
    # The given full keys only save hashing; the tail depends on every token before `end` and on none after.
    assert tail_key(tokens, end, "fp", chunk, full_keys=full) == key
    assert tail_key([*tokens[:end], 1, 2, 3], end, "fp", chunk) == key
    assert key not in full
    assert tail_key(tokens, end, "fp", chunk, namespace="other") != key
    changed = list(tokens)
    changed[0] ^= 1
    assert tail_key(changed, end, "fp", chunk) != key
    if end > 1 and (end - 1) % chunk:
        assert tail_key(tokens, end - 1, "fp", chunk) != key


def test_tail_key_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        tail_key([1, 2, 3], 4, "fp", 2)


def test_tail_candidates_are_the_tail_keys_of_every_length_longest_first() -> None:
    tokens = [(i * 31) % 1000 for i in range(300)]
    full = chunk_keys(tokens, "fp", 128, salt="s")
    for index, longest in ((0, 127), (2, 44)):
        cands = tail_candidates(tokens, index, "fp", 128, full_keys=full, salt="s")
        assert [n for n, _ in cands] == list(range(longest, 0, -1))
        assert all(k == tail_key(tokens, index * 128 + n, "fp", 128, salt="s") for n, k in cands)
        # without the full keys at hand, the same keys (the parent is rehashed)
        assert cands == tail_candidates(tokens, index, "fp", 128, salt="s")
    assert tail_candidates(tokens, 2, "fp", 128, full_keys=full, salt="s", min_tokens=40)[-1][0] == 40
    assert tail_candidates(tokens[:256], 2, "fp", 128) == []  # nothing after the last full chunk
    with pytest.raises(ValueError, match="starts past"):
        tail_candidates(tokens, 3, "fp", 128)

"""Deterministic chunk keys.

A chunk's key is a rolling hash: ``key[i] = H(key[i-1] || tokens of chunk i)``
seeded with the chunk fingerprint, an optional namespace (per deployment) and an
optional salt (per request: vLLM's ``cache_salt``, which the proxy sets per tenant).
The same token ids give the same keys in every process and on every machine: the
hash is xxh3-128 over explicit little-endian bytes, never Python's ``hash()``. Two
requests with different salts never share a key, so tenants never share KV.

Full chunks get keys from ``chunk_keys``. A *tail* chunk, the partial chunk after
the last full one, gets its key from ``tail_key``: the same chain, with a tag so a
tail of ``n`` tokens can never collide with a full chunk. A tail is keyed under its
parent (the key of the full chunk before it, or the seed), its length and its own
tokens. Every storing engine leaves its prompt's tail (all of the prompt after the last
full chunk but the last token); P/D hands it to the decode side, and reuse finds it with
``tail_candidates``: a later prompt whose chunk at that position *begins* with the stored
tail probes the keys of every length its tokens allow, longest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NewType

import numpy as np
import xxhash

ChunkKey = NewType("ChunkKey", bytes)

KEY_BYTES = 16
DEFAULT_CHUNK_TOKENS = 256


def chunk_seed(chunk_fingerprint: str, namespace: str = "", salt: str = "") -> bytes:
    """The hash state before the first chunk: fingerprint, namespace and the request's salt.

    Without a salt the seed is what it always was (stored chunks keep their keys). A salt
    is hashed after the unsalted seed, length-prefixed, so no (namespace, salt) pair can
    spell another's seed.
    """
    seed = xxhash.xxh3_128_digest(f"pdx/1|{chunk_fingerprint}|{namespace}".encode())
    if not salt:
        return seed
    raw = salt.encode()
    return xxhash.xxh3_128_digest(b"pdx/salt|" + seed + len(raw).to_bytes(4, "little") + raw)


def chunk_keys(
    token_ids: Sequence[int] | np.ndarray,
    chunk_fingerprint: str,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    namespace: str = "",
    *,
    salt: str = "",
) -> list[ChunkKey]:
    """Keys of every full chunk of ``token_ids``, in order.

    Cost is one xxh3 call per chunk over ``4 * chunk_tokens`` bytes: a 32k-token
    prompt (128 chunks) hashes in tens of microseconds.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    tokens = np.asarray(token_ids, dtype="<u4")
    n_full = len(tokens) // chunk_tokens
    keys: list[ChunkKey] = []
    prev = chunk_seed(chunk_fingerprint, namespace, salt)
    raw = tokens[: n_full * chunk_tokens].tobytes()
    step = chunk_tokens * 4
    for i in range(n_full):
        prev = xxhash.xxh3_128_digest(prev + raw[i * step : (i + 1) * step])
        keys.append(ChunkKey(prev))
    return keys


def tail_key(
    token_ids: Sequence[int] | np.ndarray,
    end: int,
    chunk_fingerprint: str,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    namespace: str = "",
    full_keys: Sequence[bytes] | None = None,
    *,
    salt: str = "",
) -> ChunkKey | None:
    """Key of the tail chunk ``[end // chunk_tokens * chunk_tokens, end)`` of ``token_ids``.

    None when ``end`` is a chunk boundary (there is no tail). ``full_keys`` (the
    ``chunk_keys`` of the same tokens and salt, when the caller has them) saves rehashing
    the chunks before the tail.
    """
    if not 0 <= end <= len(token_ids):
        raise ValueError(f"tail end {end} outside the {len(token_ids)} tokens")
    n_full, n_tail = divmod(end, chunk_tokens)
    if n_tail == 0:
        return None
    if n_full == 0:
        prev = chunk_seed(chunk_fingerprint, namespace, salt)
    elif full_keys is not None and len(full_keys) >= n_full:
        prev = bytes(full_keys[n_full - 1])
    else:
        prev = chunk_keys(np.asarray(token_ids)[: n_full * chunk_tokens], chunk_fingerprint, chunk_tokens,
                          namespace, salt=salt)[-1]
    raw = np.asarray(token_ids, dtype="<u4")[n_full * chunk_tokens : end].tobytes()
    return ChunkKey(xxhash.xxh3_128_digest(b"pdx-tail|" + n_tail.to_bytes(4, "little") + prev + raw))


def tail_candidates(
    token_ids: Sequence[int] | np.ndarray,
    index: int,
    chunk_fingerprint: str,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    namespace: str = "",
    full_keys: Sequence[bytes] | None = None,
    *,
    salt: str = "",
    min_tokens: int = 1,
) -> list[tuple[int, ChunkKey]]:
    """Every tail a stored prompt could have left at chunk ``index`` of ``token_ids``, longest first.

    ``(n, tail_key(token_ids, index * chunk_tokens + n, ...))`` for ``n`` from
    ``min(chunk_tokens - 1, len(token_ids) - index * chunk_tokens)`` down to ``min_tokens``: a
    tail stored under the same parent whose tokens are a prefix of this prompt's tokens there has
    one of these keys. One xxh3 call per length (a few microseconds each); ``full_keys`` as in
    ``tail_key``.
    """
    tokens = np.asarray(token_ids, dtype="<u4")
    base = index * chunk_tokens
    if index < 0 or base > len(tokens):
        raise ValueError(f"chunk {index} starts past the {len(tokens)} tokens")
    longest = min(chunk_tokens - 1, len(tokens) - base)
    if longest < max(1, min_tokens):
        return []
    if index == 0:
        prev = chunk_seed(chunk_fingerprint, namespace, salt)
    elif full_keys is not None and len(full_keys) >= index:
        prev = bytes(full_keys[index - 1])
    else:
        prev = chunk_keys(tokens[:base], chunk_fingerprint, chunk_tokens, namespace, salt=salt)[-1]
    raw = tokens[base : base + longest].tobytes()
    digest = xxhash.xxh3_128_digest
    out: list[tuple[int, ChunkKey]] = []
    for n in range(longest, max(1, min_tokens) - 1, -1):
        out.append((n, ChunkKey(digest(b"pdx-tail|" + n.to_bytes(4, "little") + prev + raw[: 4 * n]))))
    return out


def key_hex(key: bytes) -> str:
    return key.hex()

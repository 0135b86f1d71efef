"""The packed chunk format: payload order, payload size and the fixed-size header.

A chunk is ``num_tokens`` consecutive tokens of one request, all layers' K and V, for a
contiguous range of global KV heads ``[head_start, head_end)`` (``Hc`` heads). The
payload is one contiguous buffer of elements of the KV dtype (fp8 as raw bytes)::

    for layer in range(num_layers):
        K[layer]: [Hc][head_size][num_tokens]     # K stored transposed (dim-major)
        V[layer]: [Hc][num_tokens][head_size]     # V stored token-major

so ``payload[layer][kv]`` is ``Hc * head_size * num_tokens`` elements and the payload is
``num_tokens * layout.token_bytes(Hc)`` bytes, with no padding (a short last chunk is
simply smaller). The order does not depend on the engine's paged layout or block
size, which is why chunk keys can ignore both (``KVLayout.chunk_fingerprint``). K is
dim-major because vLLM's CPU backend keeps K transposed inside each block: packing from
it is then a copy of ``block_size``-long runs instead of a transpose.

The header does not sit in the slab: slabs hold the payload only (a pool slab is
``layout.chunk_bytes(chunk_tokens)`` bytes) and the header's facts travel as metadata
(the store keeps ``checksum`` and ``num_tokens``; the transports carry them in their
messages). ``encode_header``/``decode_header`` give a fixed 64-byte little-endian
record for tiers that keep a chunk as one blob (a file, a Redis value): they write the
header, then the payload.

Pure Python, no torch: the store and the agent may use it without the kernels' deps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pdx.checksum import checksum
from pdx.errors import ChunkFormatError, IntegrityError, LayoutError
from pdx.layout import CHUNK_FORMAT_VERSION, KVLayout

MAGIC = b"PDXC"
#: size of an encoded header in bytes.
HEADER_BYTES = 64
# magic, version, header size, fingerprint (8 bytes), num_tokens, head_start, head_end,
# payload bytes, payload checksum, 16 reserved bytes; then the header's own checksum.
_BODY = struct.Struct("<4sHH8sIHHQQ16s")
_TAIL = struct.Struct("<Q")
assert _BODY.size + _TAIL.size == HEADER_BYTES


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk's bytes are: format, content fingerprint, size and checksum.

    ``fingerprint`` is ``KVLayout.chunk_fingerprint_for_heads(head_start, head_end)``
    of the packing engine (16 hex chars); ``checksum`` is ``pdx.checksum.checksum`` of
    the payload.
    """

    fingerprint: str
    num_tokens: int
    head_start: int
    head_end: int
    payload_bytes: int
    checksum: int
    format_version: int = CHUNK_FORMAT_VERSION

    @property
    def heads(self) -> tuple[int, int]:
        return self.head_start, self.head_end


def payload_bytes(layout: KVLayout, num_tokens: int, heads: tuple[int, int] | None = None) -> int:
    """Payload size of a chunk of ``num_tokens`` tokens holding ``heads`` (default: the rank's)."""
    if num_tokens < 0:
        raise LayoutError(f"num_tokens must be >= 0, got {num_tokens}")
    start, end = layout.head_range if heads is None else heads
    if not 0 <= start < end <= layout.num_kv_heads:
        raise LayoutError(f"head range [{start}, {end}) outside [0, {layout.num_kv_heads})")
    return num_tokens * layout.token_bytes(end - start)


def payload_offsets(layout: KVLayout, num_tokens: int, layer: int, kv: int,
                    heads: tuple[int, int] | None = None) -> tuple[int, int]:
    """Byte range ``[start, end)`` of one layer's K (``kv=0``) or V (``kv=1``) in the payload."""
    if not 0 <= layer < layout.num_layers or kv not in (0, 1):
        raise LayoutError(f"no layer {layer} / kv {kv} in a {layout.num_layers}-layer chunk")
    part = payload_bytes(layout, num_tokens, heads) // (2 * layout.num_layers)
    start = (2 * layer + kv) * part
    return start, start + part


def make_header(layout: KVLayout, num_tokens: int, payload: bytes | bytearray | memoryview,
                heads: tuple[int, int] | None = None) -> ChunkHeader:
    """Header for ``payload`` (exactly the chunk's payload bytes), computing its checksum."""
    start, end = layout.head_range if heads is None else heads
    size = payload_bytes(layout, num_tokens, (start, end))
    view = memoryview(payload).cast("B")
    if view.nbytes != size:
        raise LayoutError(f"payload is {view.nbytes} bytes, a chunk of {num_tokens} tokens "
                          f"and heads [{start}, {end}) is {size}")
    return ChunkHeader(layout.chunk_fingerprint_for_heads(start, end), num_tokens, start, end,
                       size, checksum(view))


def encode_header(header: ChunkHeader) -> bytes:
    """The 64-byte record of ``header`` (little-endian, self-checksummed)."""
    try:
        fp = bytes.fromhex(header.fingerprint)
    except ValueError as exc:
        raise ChunkFormatError(f"fingerprint {header.fingerprint!r} is not hex") from exc
    if len(fp) != 8:
        raise ChunkFormatError(f"fingerprint {header.fingerprint!r} is not 16 hex chars")
    try:
        body = _BODY.pack(MAGIC, header.format_version, HEADER_BYTES, fp, header.num_tokens,
                          header.head_start, header.head_end, header.payload_bytes,
                          header.checksum, bytes(16))
    except struct.error as exc:
        raise ChunkFormatError(f"header field out of range: {header!r}: {exc}") from exc
    return body + _TAIL.pack(checksum(body))


def decode_header(data: bytes | bytearray | memoryview) -> ChunkHeader:
    """Parse the first ``HEADER_BYTES`` of ``data``; raises ``ChunkFormatError`` if they are not a header."""
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_BYTES:
        raise ChunkFormatError(f"need {HEADER_BYTES} header bytes, got {view.nbytes}")
    body = bytes(view[: _BODY.size])
    (tail,) = _TAIL.unpack(view[_BODY.size:HEADER_BYTES])
    magic, version, size, fp, num_tokens, h0, h1, nbytes, csum, _ = _BODY.unpack(body)
    if magic != MAGIC:
        raise ChunkFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != CHUNK_FORMAT_VERSION or size != HEADER_BYTES:
        raise ChunkFormatError(f"chunk format {version} (header {size} B); this build reads "
                               f"format {CHUNK_FORMAT_VERSION} ({HEADER_BYTES} B)")
    if checksum(body) != tail:
        raise ChunkFormatError("header checksum mismatch")
    return ChunkHeader(fp.hex(), num_tokens, h0, h1, nbytes, csum, version)


def check_payload(header: ChunkHeader, payload: bytes | bytearray | memoryview) -> None:
    """Raise ``IntegrityError`` unless ``payload`` has the header's size and checksum."""
    view = memoryview(payload).cast("B")
    if view.nbytes != header.payload_bytes:
        raise IntegrityError(f"payload is {view.nbytes} bytes, header says {header.payload_bytes}")
    if checksum(view) != header.checksum:
        raise IntegrityError("payload checksum mismatch")

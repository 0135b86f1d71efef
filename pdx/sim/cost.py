"""The simulator's cost model: how long a prefill, a load from a tier, a transfer and a decode
step take. Small on purpose: a few per-token figures and bandwidths, so every number can be
traced to a measurement or to a stated assumption.

* prefill of ``n`` new tokens after ``c`` cached ones:
  ``prefill_base_s + n * (prefill_token_s + prefill_ctx_token_s * (c + n / 2))``
  (linear layers cost per token; attention grows with the context each token sees);
* a load from a tier: ``latency + tokens * kv_bytes_per_token / bandwidth`` (L1, disk, shared);
* the P -> D transfer of the prompt's KV: the same over ``link_gbps``;
* a decode step of a batch of ``b``: ``decode_step_s + decode_batch_s * b``.

Presets (``COST_MODELS``): ``gpu-8b`` is given for a GPU (Llama-3.1-8B, bf16, on one H100-class
card; figures from public measurements, see each field); ``cpu-small`` comes from
``pdx-bench e2e --model small`` on the 2-core development VM (docs/connector.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pdx.errors import ConfigError


@dataclass(frozen=True)
class CostModel:
    """Times in seconds, bandwidths in GB/s (1e9 B/s). See the module docstring."""

    name: str
    kv_bytes_per_token: int
    prefill_base_s: float
    prefill_token_s: float
    prefill_ctx_token_s: float
    l1_gbps: float
    l1_latency_s: float
    disk_gbps: float
    disk_latency_s: float
    shared_gbps: float
    shared_latency_s: float
    link_gbps: float
    link_latency_s: float
    decode_step_s: float
    decode_batch_s: float
    source: str = ""

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.prefill_base_s + new_tokens * (
            self.prefill_token_s + self.prefill_ctx_token_s * (cached_tokens + new_tokens / 2))

    def _move(self, tokens: int, gbps: float, latency_s: float) -> float:
        if tokens <= 0:
            return 0.0
        return latency_s + tokens * self.kv_bytes_per_token / (gbps * 1e9)

    def load_s(self, tier: str, tokens: int) -> float:
        """Time to load ``tokens`` of KV from ``tier`` (``l1``, ``disk``, ``shared``)."""
        if tier == "l1":
            return self._move(tokens, self.l1_gbps, self.l1_latency_s)
        if tier == "disk":
            return self._move(tokens, self.disk_gbps, self.disk_latency_s)
        return self._move(tokens, self.shared_gbps, self.shared_latency_s)

    def transfer_s(self, tokens: int) -> float:
        return self._move(tokens, self.link_gbps, self.link_latency_s)

    def decode_step(self, batch: int) -> float:
        return self.decode_step_s + self.decode_batch_s * max(1, batch)


GIB = 1 << 30

COST_MODELS: dict[str, CostModel] = {
    # Given for a GPU. Llama-3.1-8B bf16: 128 KiB of KV per token (32 layers x 8 KV heads x 128 x 2 x 2 B).
    # Prefill on one H100: ~15k tokens/s on short contexts, attention adding ~1 ns per token of
    # context; decode step ~12 ms at batch 1 plus ~0.1 ms per running request (memory-bound).
    # L1 is pinned host DRAM over PCIe Gen5 (~25 GB/s), disk a local NVMe (~5 GB/s), the shared
    # tier a Mooncake/Redis cluster over RDMA (~10 GB/s, 0.5 ms), P->D one 400 Gb/s port (~45 GB/s).
    "gpu-8b": CostModel(
        name="gpu-8b", kv_bytes_per_token=128 * 1024, prefill_base_s=0.004,
        prefill_token_s=1 / 15000, prefill_ctx_token_s=1e-9,
        l1_gbps=25.0, l1_latency_s=0.0002, disk_gbps=5.0, disk_latency_s=0.0005,
        shared_gbps=10.0, shared_latency_s=0.0005, link_gbps=45.0, link_latency_s=0.0002,
        decode_step_s=0.012, decode_batch_s=0.0001,
        source="given for a GPU: Llama-3.1-8B bf16 on one H100-class card (public figures)"),
    # Measured here: pdx-bench e2e --model small (8 layers, hidden 1024, float32: 32 KiB of KV per
    # token) on one core: 4,096-token prefill 11.2 s (= 2.73 ms/token, the context term folded in),
    # an L1 hit loads at 6.83 GB/s, a P/D fetch over tcp at 0.51 GB/s (docs/connector.md). Disk and
    # shared-tier figures are assumptions of the same order (file read ~2 GB/s; Redis on loopback
    # ~1 GB/s). Decode step ~40 ms (the same model, one core, batch 1).
    "cpu-small": CostModel(
        name="cpu-small", kv_bytes_per_token=32 * 1024, prefill_base_s=0.02,
        prefill_token_s=0.00273, prefill_ctx_token_s=0.0,
        l1_gbps=6.83, l1_latency_s=0.001, disk_gbps=2.0, disk_latency_s=0.002,
        shared_gbps=1.0, shared_latency_s=0.002, link_gbps=0.51, link_latency_s=0.002,
        decode_step_s=0.04, decode_batch_s=0.004,
        source="measured: pdx-bench e2e --model small on a 2-core VM (docs/connector.md); disk, shared assumed"),
}


def cost_model(name: str, **overrides: float) -> CostModel:
    """The preset ``name`` with ``overrides`` (field=value); raises ``ConfigError``."""
    model = COST_MODELS.get(name)
    if model is None:
        raise ConfigError(f"cost model {name!r}: known ones are {', '.join(sorted(COST_MODELS))}")
    bad = sorted(set(overrides) - set(model.__dataclass_fields__) - {"name", "source"})
    if bad:
        raise ConfigError(f"cost model: unknown field {bad[0]!r}")
    return replace(model, **overrides)  # type: ignore[arg-type]

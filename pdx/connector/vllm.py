"""``PdxConnector``: vLLM's ``KVConnectorBase_V1`` backed by a pdx agent.

Loaded by vLLM from ``--kv-transfer-config`` (``pdx-agent`` writes it)::

    {"kv_connector": "PdxConnector", "kv_connector_module_path": "pdx.connector.vllm",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"agent_address": "ipc://..."}}

vLLM creates one instance in the scheduler (role SCHEDULER) and one in each
worker (role WORKER). This class only translates vLLM's objects and hooks; the
decisions live in ``PdxSchedulerSide`` (``pdx.connector.scheduler``) and the data
movement in ``PdxWorkerSide`` (``pdx.connector.worker``). Roles: ``kv_producer``
(prefill: stores, answers ``do_remote_decode`` with params for decode),
``kv_consumer`` (decode: loads from the prefill side named in its params), and
``kv_both`` (stores and reuses: offload and prefix reuse). Every role also
loads prefixes its own agent holds (``reuse``).

vLLM must recompute blocks pdx reports as not loaded; that needs
``kv_load_failure_policy="recompute"`` (vLLM's default is "fail", which would
turn a corrupt chunk into a failed request). The connector sets it, with a log
line, when the config says otherwise.

Limits: one KV cache group (no hybrid allocator), tensor parallel size 1, and the
tensors' block size equal to vLLM's block size; anything else is refused at start-up.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from pdx.config import ConnectorConfig, connector_config
from pdx.connector.agent import SchedulerPort, agent_info
from pdx.connector.metadata import StepPlan
from pdx.connector.scheduler import PdxSchedulerSide, SchedulerSettings
from pdx.connector.worker import KernelCodec, PdxWorkerSide, WorkerSettings
from pdx.errors import AgentUnavailable, LayoutError, PdxError
from pdx.layout import KVDtype, KVLayout, MemoryLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("pdx.connector")

_DTYPES = {torch.float32: KVDtype.FP32, torch.bfloat16: KVDtype.BF16, torch.float16: KVDtype.FP16}
_FP8 = {"fp8": KVDtype.FP8_E4M3, "fp8_e4m3": KVDtype.FP8_E4M3, "fp8_e5m2": KVDtype.FP8_E5M2}


def _route_logs_to_vllm() -> None:
    """Send pdx's log records through vLLM's handlers (its format, its stream) once per process:
    vLLM configures only its own ``vllm`` logger, so pdx's INFO lines would be lost."""
    pdx_log = logging.getLogger("pdx")
    if pdx_log.handlers:
        return
    handlers = logging.getLogger("vllm").handlers
    if not handlers:
        return
    for h in handlers:
        pdx_log.addHandler(h)
    pdx_log.setLevel(logging.getLogger("vllm").level or logging.INFO)
    pdx_log.propagate = False


#: worker counters exported through vLLM's Prometheus endpoint: stats field -> (metric, help)
_BLEND_METRICS = {
    "blend_loads": ("pdx_blend_requests", "Requests whose prompt region pdx blended from cached segments "
                    "(CacheBlend; approximate KV unless r = 1)"),
    "blend_tokens": ("pdx_blend_tokens", "Prompt tokens written from blended KV"),
    "blend_recomputed": ("pdx_blend_recomputed_tokens", "Tokens the blend pass recomputed above its check layer"),
    "blend_failures": ("pdx_blend_failures", "Blends that failed; vLLM recomputed those tokens exactly"),
}


@dataclass
class PdxConnectorStats(KVConnectorStats):
    """Counter increments since the last report (``_BLEND_METRICS`` keys), summed when aggregated."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class PdxPromMetrics(KVConnectorPromMetrics):
    """pdx's counters on vLLM's ``/metrics`` (``pdx_blend_tokens_total`` ...), per engine."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        self._counters = {
            key: create_metric_per_engine(self._counter_cls(name=name, documentation=doc, labelnames=labelnames),
                                          per_engine_labelvalues)
            for key, (name, doc) in _BLEND_METRICS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            v = transfer_stats_data.get(key, 0)
            if v and engine_idx in per_engine:
                per_engine[engine_idx].inc(v)  # type: ignore[union-attr]


class PdxConnectorMetadata(KVConnectorMetadata):
    """The step plan, as vLLM ships it from the scheduler to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class PdxConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[arg-type]
        _route_logs_to_vllm()
        ktc = self._kv_transfer_config
        self.config: ConnectorConfig = connector_config(ktc.kv_connector_extra_config)
        if not self.config.agent_address:
            raise PdxError("PdxConnector: no agent address: set kv_connector_extra_config.agent_address "
                           "or run vLLM under pdx-agent")
        if ktc.kv_load_failure_policy != "recompute":
            log.warning("PdxConnector: setting kv_load_failure_policy=recompute (was %r): a chunk that "
                        "fails to load must be recomputed, not fail the request", ktc.kv_load_failure_policy)
            ktc.kv_load_failure_policy = "recompute"
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise PdxError("PdxConnector supports tensor_parallel_size 1 only for now")
        self.kv_role = str(ktc.kv_role)
        store = self.config.store
        self.stores = (self.kv_role in ("kv_producer", "kv_both")) if store is None else store
        self.block_size = int(vllm_config.cache_config.block_size)
        self.model_id = self.config.model_id or str(vllm_config.model_config.model)
        self._scheduler: PdxSchedulerSide | None = None
        self._worker: PdxWorkerSide | None = None
        self._sources: dict[str, CacheHitSource] = {}
        self._idle_step = False
        self._clients: list[Any] = []
        self._stats_sent: dict[str, int] = {}
        self._layer_index: dict[str, int] = {}
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = self._make_scheduler(vllm_config)

    # --- construction --------------------------------------------------------------------------

    def _num_attn_layers(self) -> int | None:
        kcc = self._kv_cache_config
        groups = getattr(kcc, "kv_cache_groups", None) if kcc is not None else None
        if not groups:
            return None
        if len(groups) != 1:
            raise PdxError(f"PdxConnector supports one KV cache group, this model has {len(groups)}")
        return len(groups[0].layer_names)

    def _client(self) -> Any:
        from pdx.agent.client import AgentClient

        client = AgentClient(self.config.agent_address, timeout_s=self.config.agent_timeout_s)
        self._clients.append(client)
        return client

    def _make_scheduler(self, vllm_config: VllmConfig) -> PdxSchedulerSide:
        client = self._client()
        try:
            info = agent_info(client, wait_registered_s=10.0)
        except AgentUnavailable as exc:
            raise PdxError(f"PdxConnector: the pdx agent at {self.config.agent_address} does not "
                           f"answer: {exc}") from exc
        layout = scheduler_layout(vllm_config, self.model_id, self._num_attn_layers())
        if info.chunk_fingerprint and info.chunk_fingerprint != layout.chunk_fingerprint:
            raise LayoutError(f"PdxConnector: the agent holds chunks of fingerprint {info.chunk_fingerprint}, "
                              f"this engine's is {layout.chunk_fingerprint} (another model or dtype?)")
        settings = SchedulerSettings(
            chunk_tokens=info.chunk_tokens, block_size=self.block_size,
            chunk_fingerprint=layout.chunk_fingerprint, namespace=info.namespace, store=self.stores,
            reuse=self.config.reuse, peer_address=info.peer_address, lease_s=self.config.lease_s,
            min_load_tokens=self.config.min_load_tokens, sync_l1_loads=self.config.sync_l1_loads,
            layerwise=self.config.layerwise)
        port = SchedulerPort(client, self.config.lookup_timeout_s, self.config.lookup_remote,
                             self.config.agent_timeout_s)
        log.info("PdxConnector (%s, scheduler): agent %s, %d-token chunks, fingerprint %s, peer address %s",
                 self.kv_role, self.config.agent_address, info.chunk_tokens, layout.chunk_fingerprint,
                 info.peer_address or "none")
        return PdxSchedulerSide(settings, port)

    # --- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_order)
        layers = [kv_caches[n] for n in names]
        self._layer_index = {n: i for i, n in enumerate(names)}
        layout = self._detect(names, layers)
        client = self._client()
        cfg = self.config
        from pdx.kernels import payload_bytes

        def attach() -> tuple[KernelCodec, Any, int]:
            from pdx.store.pool import attach as attach_pool

            info = client.register_engine(layout, pid=os.getpid())
            if info.chunk_fingerprint != layout.chunk_fingerprint:
                raise LayoutError(f"agent computed chunk fingerprint {info.chunk_fingerprint}, the engine "
                                  f"{layout.chunk_fingerprint}")
            want = payload_bytes(layout, info.chunk_tokens)
            if info.chunk_bytes != want:
                raise LayoutError(f"agent says a chunk is {info.chunk_bytes} bytes, the kernels {want}")
            if info.chunk_tokens % self.block_size:
                raise LayoutError(f"agent store.chunk_tokens {info.chunk_tokens} is not a multiple of "
                                  f"vLLM's block size {self.block_size}")
            self._chunk_tokens = info.chunk_tokens
            log.info("PdxConnector (%s, worker pid %d): registered %s; pool %s (%s), %d-token chunks of "
                     "%d bytes", self.kv_role, os.getpid(), layout.memory_layout.value, info.shm_name,
                     "new" if info.created else "existing", info.chunk_tokens, info.chunk_bytes)
            # populate: map every page now, not on first touch in the middle of a request
            pool = attach_pool(info.shm_name, populate=True)
            return KernelCodec(layers, layout, cfg.kernel_impl), pool, info.chunk_bytes

        codec, pool, chunk_bytes = attach()
        settings = WorkerSettings(chunk_tokens=self._chunk_tokens, block_size=self.block_size,
                                  load_timeout_s=cfg.load_timeout_s, lease_s=cfg.lease_s,
                                  verify_checksums=cfg.verify_checksums)
        self._worker = PdxWorkerSide(settings, client, codec, pool, layout, chunk_bytes, reattach=attach)

    def _detect(self, names: Sequence[str], layers: Sequence[torch.Tensor]) -> KVLayout:
        from pdx.kernels import detect_layout

        if not layers:
            raise LayoutError("PdxConnector: vLLM registered no KV caches")
        vc = self._vllm_config
        ctx = vc.compilation_config.static_forward_context
        attn = ctx.get(names[0])
        if attn is None:
            raise LayoutError(f"PdxConnector: no attention layer named {names[0]!r}")
        backend = attn.attn_backend.get_name()
        heads, head_size = int(attn.num_kv_heads), int(attn.head_size)
        first = layers[0]
        kv_dtype = _kv_dtype(first.dtype, str(vc.cache_config.cache_dtype))
        cpu_isa = getattr(attn, "isa", None)
        block_size = self.block_size
        if first.dim() == 4 and int(first.shape[2]) != block_size:
            raise LayoutError(f"PdxConnector: KV tensors use {first.shape[2]}-token blocks, vLLM's block "
                              f"size is {block_size}: split kernel blocks are not supported")
        memory_layout = detect_layout(tuple(first.shape), backend, heads, head_size, block_size,
                                      tensor_stride=tuple(first.stride()), cpu_isa=cpu_isa, kv_dtype=kv_dtype)
        layout = KVLayout(model_id=self.model_id, dtype=kv_dtype, num_layers=len(layers),
                          num_kv_heads=heads, head_size=head_size, block_size=block_size,
                          memory_layout=memory_layout)
        if memory_layout in (MemoryLayout.CPU_VEC, MemoryLayout.CPU_AMX):
            from pdx.kernels.vllm_cpu import self_check

            self_check(layout, str(cpu_isa), _torch_dtype(vc.model_config.dtype))
        expect = scheduler_layout(vc, self.model_id, self._num_attn_layers())
        if expect.chunk_fingerprint != layout.chunk_fingerprint:
            raise LayoutError(f"PdxConnector: registered caches ({layout.to_dict()}) do not match the "
                              f"model config ({expect.to_dict()})")
        return layout

    def _plan(self) -> StepPlan | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.plan if isinstance(meta, PdxConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # No attention metadata: a step without a forward pass (vLLM polling for loads).
        self._idle_step = getattr(forward_context, "attn_metadata", None) is None
        plan = self._plan()
        if plan is not None and plan.loads:
            self._require_worker().start_loads(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: vLLM schedules a request only once its load finished (a layer-wise
        # P/D load included: the decode side starts once every layer landed and was verified).
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        # Stores run once per step in wait_for_save, after every layer wrote its KV; only a prefill
        # for a decode agent that asked for layer-wise streaming (StoreSpec.push) acts per layer.
        plan = self._plan()
        if plan is None or not plan.stores or self._worker is None:
            return
        if any(spec.push for spec in plan.stores):
            layer = self._layer_index.get(layer_name)
            if layer is not None:
                self._worker.save_layer(plan, layer)

    def wait_for_save(self) -> None:
        plan = self._plan()
        if plan is not None and plan.stores:
            self._require_worker().store(plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        if self._idle_step and self.config.idle_wait_ms > 0:
            self._idle_step = False
            self._worker.wait_idle(self.config.idle_wait_ms / 1e3)
        done = self._worker.finished()
        return None, (done or None)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        now = {k: int(getattr(self._worker.stats, k)) for k in _BLEND_METRICS}
        delta = {k: v - self._stats_sent.get(k, 0) for k, v in now.items()}
        if not any(delta.values()):
            return None
        self._stats_sent = now
        return PdxConnectorStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PdxConnectorStats(data=dict(data) if data is not None else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return PdxPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def _require_worker(self) -> PdxWorkerSide:
        if self._worker is None:
            raise PdxError("PdxConnector: register_kv_caches was never called in this worker")
        return self._worker

    # --- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        n, load_async = self._scheduler.matched_tokens(request, num_computed_tokens)
        salt = self._scheduler.take_resalt(request.request_id)
        if salt and not _resalt(request, salt):
            log.warning("request %s: cannot give it a cache_salt of its own in this vLLM; not blending",
                        request.request_id)
            self._scheduler.cancel_blend(request.request_id)
            n, load_async = self._scheduler.matched_tokens(request, num_computed_tokens)
        return n, load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        groups = blocks.get_block_ids()
        block_ids = groups[0] if groups else []
        if num_external_tokens > 0:
            peer = self._scheduler.pending_peer(request.request_id)
            self._sources[request.request_id] = CacheHitSource.P2P if peer else CacheHitSource.HOST
        self._scheduler.after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        return {self._sources.pop(request.request_id, CacheHitSource.HOST): num_external_tokens}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return PdxConnectorMetadata(self._scheduler.build_step(scheduler_output))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        from vllm.v1.request import RequestStatus

        self._sources.pop(request.request_id, None)
        completed = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        return self._scheduler.finished(request, completed)

    # --- both ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        for client in self._clients:
            client.close()
        self._clients = []


def _resalt(request: Any, salt: str) -> bool:
    """Give a blended request its own ``cache_salt`` and re-hash its blocks.

    Called in ``get_num_new_matched_tokens``, before vLLM allocates (and later caches) any block of
    the request: the blocks vLLM's prefix cache already matched (exact KV of earlier requests) stay
    as they are, every later block of this request is cached under hashes chained from the new salt,
    so no other request is ever handed one of them. False when this vLLM's ``Request`` lacks the
    fields (the caller then does not blend).
    """
    hashes = getattr(request, "block_hashes", None)
    update = getattr(request, "update_block_hashes", None)
    if not isinstance(hashes, list) or not callable(update) or not hasattr(request, "cache_salt"):
        return False
    request.cache_salt = salt
    hashes.clear()
    update()
    return True


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_order(name: str) -> tuple[int, str]:
    m = _LAYER_INDEX.search(f".{name}.")
    return (int(m.group(1)) if m else 1 << 30, name)


def _torch_dtype(dtype: Any) -> torch.dtype:
    """``ModelConfig.dtype`` is a ``torch.dtype`` once vLLM resolved it."""
    if not isinstance(dtype, torch.dtype):
        raise LayoutError(f"PdxConnector: model dtype {dtype!r} is not resolved")
    return dtype


def _kv_dtype(dtype: torch.dtype, cache_dtype: str) -> KVDtype:
    if cache_dtype in _FP8:
        return _FP8[cache_dtype]
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LayoutError(f"PdxConnector: KV cache dtype {dtype} is not supported") from None


def scheduler_layout(vllm_config: VllmConfig, model_id: str, num_layers: int | None = None) -> KVLayout:
    """The engine's ``KVLayout`` as far as the model config tells (what the chunk fingerprint needs).

    The memory layout and ISA are only known to the workers; they do not enter the chunk
    fingerprint, so the scheduler half can compute the same chunk keys as the workers.
    """
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    dtype = _kv_dtype(_torch_dtype(mc.dtype), str(vllm_config.cache_config.cache_dtype))
    layers = num_layers if num_layers is not None else int(mc.get_num_layers(pc))
    return KVLayout(model_id=model_id, dtype=dtype, num_layers=layers,
                    num_kv_heads=int(mc.get_total_num_kv_heads()), head_size=int(mc.get_head_size()),
                    block_size=int(vllm_config.cache_config.block_size), memory_layout=MemoryLayout.NHD)

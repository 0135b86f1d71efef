"""CacheBlend through the connector's halves: the scheduler plans segment stores and blend loads,
the worker stores pieces, blends with a model and writes the region into paged caches with pdx's
kernels. A fake agent; a small transformers Llama; real kernels on torch caches."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from connector_fakes import FakeAgent

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pdx.connector.agent import SchedulerPort  # noqa: E402
from pdx.connector.blend.load import kv_payload, payload_kv  # noqa: E402
from pdx.connector.blend.model import HFLlama, extend  # noqa: E402
from pdx.connector.blend.request import segment_pieces  # noqa: E402
from pdx.connector.metadata import StepPlan, token_spans  # noqa: E402
from pdx.connector.scheduler import PdxSchedulerSide, SchedulerSettings  # noqa: E402
from pdx.connector.worker import KernelCodec, PdxWorkerSide, WorkerSettings  # noqa: E402
from pdx.kernels import payload_bytes  # noqa: E402
from pdx.layout import KVDtype, KVLayout, MemoryLayout  # noqa: E402

BS, CT, BLOCKS = 16, 32, 40
LAYOUT = KVLayout(model_id="m", dtype=KVDtype.FP32, num_layers=4, num_kv_heads=2, head_size=32,
                  block_size=BS, memory_layout=MemoryLayout.CPU_VEC)
CHUNK = payload_bytes(LAYOUT, CT)
ANCHOR, DOC_A, DOC_B, Q = 8, 40, 24, 6


@pytest.fixture(scope="module")
def hf() -> HFLlama:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        initializer_range=0.02, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return HFLlama(model)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


ANCHOR_IDS, A_IDS, B_IDS, Q_IDS = _ids(1, ANCHOR), _ids(2, DOC_A), _ids(3, DOC_B), _ids(4, Q)


class Engine:
    """Both halves over one fake agent and one set of paged caches; ``forward`` plays vLLM."""

    def __init__(self, hf: HFLlama) -> None:
        self.hf = hf
        self.agent = FakeAgent(slab_size=CHUNK, chunk_tokens=CT)
        self.caches = [torch.zeros(BLOCKS, 2, BS, 64) for _ in range(LAYOUT.num_layers)]
        self.codec = KernelCodec(self.caches, LAYOUT, "cpu")
        self.side = PdxSchedulerSide(SchedulerSettings(chunk_tokens=CT, block_size=BS, chunk_fingerprint=LAYOUT.chunk_fingerprint),
                                     SchedulerPort(self.agent, 1.0, False, 1.0))
        self.worker = PdxWorkerSide(WorkerSettings(chunk_tokens=CT, block_size=BS), self.agent, self.codec,
                                    self.agent.pool(), LAYOUT, CHUNK, blend_model=lambda: hf)
        self.free = list(range(BLOCKS))

    def blocks(self, n_tokens: int) -> list[int]:
        out, self.free = self.free[: -(-n_tokens // BS)], self.free[-(-n_tokens // BS):]
        return out

    def write(self, blocks: list[int], kv: list[Any], start: int, end: int) -> None:
        self.codec.unpack_batch([(token_spans(blocks, BS, a, min(a + CT, end)), kv_payload(LAYOUT, kv, a, min(a + CT, end)))
                                 for a in range(start, end, CT)])

    def read(self, blocks: list[int], start: int, end: int) -> list[Any]:
        import numpy as np

        buf = np.empty(payload_bytes(LAYOUT, end - start), dtype=np.uint8)
        self.codec.pack(token_spans(blocks, BS, start, end), buf)
        return payload_kv(LAYOUT, buf, end - start)

    def run(self, req: SimpleNamespace, computed: int = 0) -> tuple[list[int], StepPlan, int]:
        """Schedule ``req`` like vLLM (``computed``: vLLM's own prefix-cache hit, whose exact KV is
        written into its blocks), run the step's loads, 'compute' the rest exactly, store."""
        ids = req.prompt_token_ids
        n, _ = self.side.matched_tokens(req, computed)
        blocks = self.blocks(len(ids))
        _, full = extend(self.hf, torch.tensor(ids))
        if computed:
            self.write(blocks, full, 0, computed)
        self.side.after_alloc(req, blocks, n)
        new = SimpleNamespace(req_id=req.request_id, block_ids=(blocks,), num_computed_tokens=computed + n)
        cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
        plan = self.side.build_step(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                                                    num_scheduled_tokens={req.request_id: len(ids) - computed - n}))
        self.worker.start_loads(plan)
        if not self.side._reqs[req.request_id].blended:  # the exact forward writes every computed token
            self.write(blocks, full, computed + n, len(ids))
        self.worker.store(plan)
        return blocks, plan, n


def _req(req_id: str, ids: list[int], blend: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(request_id=req_id, prompt_token_ids=ids,
                           kv_transfer_params={"pdx": {"blend": blend}} if blend else None)


def _stored(hf: HFLlama) -> Engine:
    eng = Engine(hf)
    for name, doc in (("sa", A_IDS), ("sb", B_IDS)):
        _, plan, n = eng.run(_req(name, ANCHOR_IDS + doc + Q_IDS,
                                  {"segments": [[ANCHOR, ANCHOR + len(doc)]], "store": True}))
        assert n == 0
        pieces = [c for s in plan.stores for c in s.chunks if c.start >= 0]
        assert [c.num_tokens for c in pieces] == [n for _, n in segment_pieces(b"k", len(doc), CT)]
        assert all(c.start == ANCHOR + i * CT for i, c in enumerate(pieces))
    assert eng.side.stats.segment_pieces_planned == 3  # 40 = 32 + 8 tokens, 24 tokens
    return eng


def rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("computed", [0, 16])
def test_r1_blend_writes_the_full_prefill_kv(hf: HFLlama, computed: int) -> None:
    eng = _stored(hf)
    ids = ANCHOR_IDS + B_IDS + A_IDS + Q_IDS
    spans = [[ANCHOR, ANCHOR + DOC_B], [ANCHOR + DOC_B, ANCHOR + DOC_B + DOC_A]]
    region = spans[-1][1]
    req = _req("x", ids, {"segments": spans, "recompute_ratio": 1.0})
    blocks, plan, n = eng.run(req, computed)
    assert n == region - computed
    assert eng.side.take_resalt("x") == "|pdx-blend|x" and eng.side.take_resalt("x") == ""
    (load,) = plan.loads
    assert load.sync and load.blend is not None and (load.blend.start, load.blend.end) == (computed, region)
    assert plan.stores == []  # a blended request stores nothing, ever
    assert eng.worker.take_load_errors() == set()
    assert eng.worker.stats.blend_loads == 1 and eng.worker.stats.blend_tokens == region - computed
    _, full = extend(hf, torch.tensor(ids))
    got = eng.read(blocks, 0, region)
    for (k, v), (fk, fv) in zip(got, full):
        assert rel(k, fk[:region]) < 1e-5 and rel(v, fv[:region]) < 1e-5


def test_r0_blend_is_the_reordered_cache_and_differs_from_exact(hf: HFLlama) -> None:
    eng = _stored(hf)
    ids = ANCHOR_IDS + B_IDS + A_IDS + Q_IDS
    spans = [[ANCHOR, ANCHOR + DOC_B], [ANCHOR + DOC_B, ANCHOR + DOC_B + DOC_A]]
    blocks, _, _ = eng.run(_req("x", ids, {"segments": spans, "recompute_ratio": 0.0}))
    assert eng.worker.take_load_errors() == set()
    _, full = extend(hf, torch.tensor(ids))
    got = eng.read(blocks, 0, spans[-1][1])
    # the anchor is computed exactly; the reordered documents keep their (approximate) cached KV
    assert rel(got[-1][0][:ANCHOR], full[-1][0][:ANCHOR]) < 1e-5
    assert rel(got[-1][1][ANCHOR:spans[-1][1]], full[-1][1][ANCHOR:spans[-1][1]]) > 1e-3


def test_missing_segment_is_an_exact_request(hf: HFLlama) -> None:
    eng = _stored(hf)
    other = _ids(9, 20)
    ids = ANCHOR_IDS + other + A_IDS + Q_IDS
    req = _req("z", ids, {"segments": [[ANCHOR, ANCHOR + 20], [ANCHOR + 20, ANCHOR + 20 + DOC_A]]})
    _, plan, n = eng.run(req)
    assert n == 0 and plan.loads == [] and eng.side.stats.blend_misses == 1
    assert eng.side.take_resalt("z") == ""
    # an exact request stores as usual: its full chunks, then its tail
    assert [(c.index, c.num_tokens > 0) for s in plan.stores for c in s.chunks] == [(0, False), (1, False), (2, True)]


def test_failed_blend_becomes_load_errors(hf: HFLlama) -> None:
    eng = _stored(hf)
    ids = ANCHOR_IDS + B_IDS + A_IDS + Q_IDS
    spans = [[ANCHOR, ANCHOR + DOC_B], [ANCHOR + DOC_B, ANCHOR + DOC_B + DOC_A]]
    req = _req("x", ids, {"segments": spans})
    n, sync = eng.side.matched_tokens(req, 0)
    assert (n, sync) == (spans[-1][1], False)
    for c in eng.agent.chunks.values():  # every stored piece now fails its checksum
        eng.agent.buf[c.offset] ^= 0xFF
    blocks = eng.blocks(len(ids))
    eng.side.after_alloc(req, blocks, n)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    plan = eng.side.build_step(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                               num_scheduled_tokens={}))
    eng.worker.start_loads(plan)
    assert eng.worker.take_load_errors() == set(blocks[: -(-n // BS)])
    assert eng.worker.stats.blend_failures == 1 and eng.worker.stats.blend_loads == 0


def test_unsupported_model_becomes_load_errors(hf: HFLlama) -> None:
    from pdx.connector.blend.errors import BlendUnsupported

    eng = _stored(hf)

    def no_model() -> Any:
        raise BlendUnsupported("no handle")

    eng.worker._blend_model = no_model
    ids = ANCHOR_IDS + B_IDS + A_IDS + Q_IDS
    spans = [[ANCHOR, ANCHOR + DOC_B], [ANCHOR + DOC_B, ANCHOR + DOC_B + DOC_A]]
    blocks, _, n = eng.run(_req("x", ids, {"segments": spans}))
    assert eng.worker.take_load_errors() == set(blocks[: -(-n // BS)])
    assert eng.worker.stats.blend_failures == 1


def test_bad_blend_block_is_ignored(hf: HFLlama) -> None:
    eng = Engine(hf)
    req = _req("b", ANCHOR_IDS + A_IDS + Q_IDS, {"segments": [[ANCHOR, ANCHOR + DOC_A]], "store": "yes"})
    assert eng.side.matched_tokens(req, 0) == (0, False)
    assert eng.side.stats.bad_params == 1


def test_payload_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(20, 2, 32, generator=g), torch.randn(20, 2, 32, generator=g)) for _ in range(4)]
    back = payload_kv(LAYOUT, kv_payload(LAYOUT, kv, 3, 17), 14)
    assert all(torch.equal(k[3:17], bk) and torch.equal(v[3:17], bv) for (k, v), (bk, bv) in zip(kv, back))

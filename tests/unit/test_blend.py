"""The blend pass (CacheBlend) on a small transformers Llama: the fidelity gates in pure torch.

The engine-side gates on real vLLM live in ``tests/e2e``; here the reference is transformers' own
forward of the same weights.
"""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pdx.connector.blend import (  # noqa: E402
    BlendOptions,
    BlendRequestError,
    BlendUnsupported,
    Policy,
    SegmentKV,
    Span,
    assemble,
    blend_pass,
)
from pdx.connector.blend.model import HFLlama, extend  # noqa: E402
from pdx.connector.blend.policy import select  # noqa: E402
from pdx.connector.blend.rope import Rope, check_rope_type  # noqa: E402


@pytest.fixture(scope="module")
def hf() -> HFLlama:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        initializer_range=0.02, tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    # sharper attention than the 0.02 init gives, so that a token's context matters
    with torch.no_grad():
        for blk in model.model.layers:
            blk.self_attn.q_proj.weight.mul_(8.0)
            blk.self_attn.k_proj.weight.mul_(8.0)
    return HFLlama(model)


def ids_of(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


def hf_forward(hf: HFLlama, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """transformers' own forward: last-token logits and per-layer KV as [T, kv_heads, d]."""
    out = hf.model(ids[None], use_cache=True)
    cache = out.past_key_values
    kv = [(cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1))
          for i in range(hf.num_layers)]
    return out.logits[0, -1], kv


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def segment(hf: HFLlama, anchor: torch.Tensor, doc: torch.Tensor) -> SegmentKV:
    """The doc's KV computed after ``anchor`` (what a segment cache holds)."""
    _, kv = extend(hf, torch.cat((anchor, doc)))
    a = len(anchor)
    return SegmentKV(kv=[(k[a:], v[a:]) for k, v in kv], base=a)


def greedy(hf: HFLlama, logits: torch.Tensor, kv: list, n: int) -> list[int]:
    out = []
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits, kv = extend(hf, torch.tensor([tok]), kv)
    return out


@torch.no_grad()
def test_rope_round_trip_and_shift_match_the_model(hf: HFLlama) -> None:
    k = torch.randn(50, 2, 32)
    for delta in (1, 37, 1000, 3000):
        back = hf.rope.rotate(hf.rope.rotate(k, delta), -delta)
        assert rel(back, k) <= 1e-6
    assert hf.rope.rotate(k, 0) is k
    # K computed at position p, rotated by +d, equals the model's K at p + d (float32 RoPE tables)
    h = hf.embed(ids_of(1, 20))
    _, k10, _ = hf.qkv(0, h, torch.arange(10, 30))
    _, k50, _ = hf.qkv(0, h, torch.arange(50, 70))
    assert rel(hf.rope.rotate(k10, 40), k50) < 1e-5


def test_rope_types_refused() -> None:
    for ok in (None, "default", "linear", "llama3"):
        check_rope_type(ok)
    for bad in ("dynamic", "yarn", "longrope", "mrope"):
        with pytest.raises(BlendUnsupported, match=bad):
            check_rope_type(bad)
    with pytest.raises(BlendUnsupported, match="NeoX"):
        check_rope_type("default", neox_style=False)
    assert Rope.of([1.0, 0.5]).rotary_dim == 4


@torch.no_grad()
def test_extend_matches_transformers_forward(hf: HFLlama) -> None:
    ids = ids_of(2, 90)
    ref_logits, ref_kv = hf_forward(hf, ids)
    logits, kv = extend(hf, ids[:40])
    logits, kv = extend(hf, ids[40:], kv)
    assert rel(logits[-1], ref_logits) < 1e-5
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        assert rel(k, rk) < 1e-5 and rel(v, rv) < 1e-5


def _rag(hf: HFLlama, seed: int):
    system = ids_of(seed, 16)
    docs = [ids_of(seed * 10 + i + 1, 40 + 7 * i) for i in range(3)]
    question = ids_of(seed + 99, 9)
    _, sys_kv = extend(hf, system)
    segs = [segment(hf, system, d) for d in docs]
    order = [2, 0, 1]
    region = torch.cat([system] + [docs[i] for i in order])
    spans, at = [], len(system)
    for i in order:
        spans.append(Span(at, at + len(docs[i]), segs[i]))
        at += len(docs[i])
    return system, sys_kv, region, spans, question


@torch.no_grad()
@pytest.mark.parametrize("check_layer", [1, 3])
def test_r1_equals_full_prefill(hf: HFLlama, check_layer: int) -> None:
    _system, sys_kv, region, spans, question = _rag(hf, 3)
    asm = assemble(hf, len(region), sys_kv, spans)
    res = blend_pass(hf, region, asm, BlendOptions(recompute_ratio=1.0, check_layer=check_layer))
    assert res.recomputed.tolist() == list(range(16, len(region)))
    full_logits, full_kv = hf_forward(hf, torch.cat((region, question)))
    for (k, v), (fk, fv) in zip(res.kv, full_kv):
        assert rel(k, fk[: len(region)]) < 1e-5 and rel(v, fv[: len(region)]) < 1e-5
    logits, kv = extend(hf, question, res.kv)
    assert rel(logits[-1], full_logits) < 1e-5
    ref_logits, ref_kv = extend(hf, torch.cat((region, question)))
    assert greedy(hf, logits, kv, 6) == greedy(hf, ref_logits, ref_kv, 6)


@torch.no_grad()
def test_r0_in_context_segments_equal_exact_reuse(hf: HFLlama) -> None:
    ids = ids_of(4, 120)
    question = ids_of(5, 6)
    _, kv = extend(hf, ids)
    cuts = [0, 20, 55, 90, 120]  # prefix, then three segments cut from the same context
    prefix = [(k[:20], v[:20]) for k, v in kv]
    spans = [Span(a, b, SegmentKV(kv=[(k[a:b], v[a:b]) for k, v in kv], base=a))
             for a, b in itertools.pairwise(cuts[1:])]
    asm = assemble(hf, 120, prefix, spans)
    res = blend_pass(hf, ids, asm, BlendOptions(recompute_ratio=0.0))
    assert res.recomputed.numel() == 0
    for (k, v), (ek, ev) in zip(res.kv, kv):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    blended, _ = extend(hf, question, res.kv)
    exact, _ = extend(hf, question, kv)
    assert torch.equal(blended, exact)


@torch.no_grad()
def test_reordered_segments_need_repair_and_hkvd_recomputes_some(hf: HFLlama) -> None:
    _system, sys_kv, region, spans, question = _rag(hf, 6)
    _, full_kv = hf_forward(hf, torch.cat((region, question)))
    asm = assemble(hf, len(region), sys_kv, spans)
    errs = {}
    for r in (0.0, 0.3, 1.0):
        res = blend_pass(hf, region, asm, BlendOptions(recompute_ratio=r, check_layer=1))
        n = len(region) - 16
        assert res.recomputed.numel() == (0 if r == 0 else math.ceil(r * n))
        errs[r] = rel(res.kv[-1][0], full_kv[-1][0][: len(region)])
        # the exact prefix is never touched
        assert torch.equal(res.kv[2][0][:16], sys_kv[2][0])
    assert errs[1.0] < 1e-5 < errs[0.0]
    assert errs[0.3] < errs[0.0]


@torch.no_grad()
def test_uncached_span_is_computed_exactly_at_r0(hf: HFLlama) -> None:
    ids = ids_of(7, 60)
    _, kv = extend(hf, ids)
    prefix = [(k[:30], v[:30]) for k, v in kv]
    asm = assemble(hf, 60, prefix, [Span(30, 60, None)])
    res = blend_pass(hf, ids, asm, BlendOptions(recompute_ratio=0.0))
    assert res.recomputed.tolist() == list(range(30, 60))
    for (k, v), (ek, ev) in zip(res.kv, kv):
        assert rel(k, ek) < 1e-5 and rel(v, ev) < 1e-5


def test_select_policies() -> None:
    dev = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 0.0])
    cached = torch.tensor([True, True, True, True, True, False])
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    off = torch.tensor([0, 1, 2, 0, 1, 2])

    def pick(**kw: object) -> list[int]:
        return select(BlendOptions(**kw), dev, cached, seg, off).tolist()  # type: ignore[arg-type]

    assert pick(recompute_ratio=0.4) == [1, 3, 5]  # top 2 of 5 cached, plus the uncached one
    assert pick(recompute_ratio=0.0) == [5]
    assert pick(recompute_ratio=1.0) == [0, 1, 2, 3, 4, 5]
    assert pick(recompute_ratio=0.4, policy="first_k") == [0, 1, 3, 4, 5]  # ceil(0.4*3)=2 per segment
    a = pick(recompute_ratio=0.4, policy="random", seed=1)
    assert a == pick(recompute_ratio=0.4, policy="random", seed=1) and 5 in a and len(a) == 3


def test_options_are_checked() -> None:
    assert BlendOptions(policy="hkvd_v").policy is Policy.HKVD_V  # type: ignore[arg-type]
    with pytest.raises(BlendRequestError, match="recompute_ratio"):
        BlendOptions(recompute_ratio=1.5)
    with pytest.raises(BlendRequestError, match="unknown blend policy"):
        BlendOptions(policy="best")  # type: ignore[arg-type]
    with pytest.raises(BlendRequestError, match="check_layer 9"):
        BlendOptions(check_layer=9).checked(4)


def test_attention_cut_to_visible_keys_equals_the_masked_whole(hf: HFLlama) -> None:
    from pdx.connector.blend import model as m

    g = torch.Generator().manual_seed(3)
    n = 700
    q = torch.randn(n - 50, hf.num_heads, hf.head_dim, generator=g)
    k = torch.randn(n, hf.num_kv_heads, hf.head_dim, generator=g)
    v = torch.randn(n, hf.num_kv_heads, hf.head_dim, generator=g)
    q_pos, k_pos = torch.arange(50, n), torch.arange(n)
    rep = hf.num_heads // hf.num_kv_heads
    whole = m._attend(hf, q, q_pos, k.repeat_interleave(rep, 1).transpose(0, 1)[None],
                      v.repeat_interleave(rep, 1).transpose(0, 1)[None], k_pos)
    assert rel(m.attend(hf, q, q_pos, k, v, k_pos), whole) < 1e-6
    pick = torch.sort(torch.randperm(n - 50, generator=g)[:300]).values  # scattered queries, as above c
    assert rel(m.attend(hf, q[pick], q_pos[pick], k, v, k_pos), whole[pick]) < 1e-6

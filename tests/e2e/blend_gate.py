"""The CacheBlend gates inside a real vLLM engine (run by ``test_blend.py`` in its own process).

``python tests/e2e/blend_gate.py MODEL_DIR OUT_JSON``: starts vLLM's offline engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so ``LLM.apply_model`` runs here), generates greedily with it,
then runs the blend pass with the engine's own modules (``VllmLlama``) on the loaded model and
writes the measurements as JSON; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main(model_dir: str, out_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pdx.connector.blend import BlendOptions, SegmentKV, Span, assemble, blend_pass
    from pdx.connector.blend.model import extend
    from pdx.connector.blend.vllm_model import VllmLlama

    gen = torch.Generator().manual_seed(11)

    def ids(n: int) -> list[int]:
        return torch.randint(10, 2000, (n,), generator=gen).tolist()

    system = [0, *ids(31)]
    docs = [ids(n) for n in (150, 120, 180)]
    order = [2, 0, 1]
    question = ids(12)
    region = system + [t for i in order for t in docs[i]]
    prompt = region + question
    decode = 8

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=2048, seed=0)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                       SamplingParams(temperature=0.0, max_tokens=decode, logprobs=10))[0].outputs[0]
    vllm_tokens = list(out.token_ids)
    vllm_logprobs = {int(t): float(lp.logprob) for t, lp in out.logprobs[0].items()}

    def greedy(model: Any, logits: torch.Tensor, kv: Any) -> list[int]:
        toks: list[int] = []
        for _ in range(decode):
            toks.append(int(logits[-1].argmax()))
            logits, kv = extend(model, torch.tensor([toks[-1]]), kv)
        return toks

    def logprob_err(logits: torch.Tensor) -> float:
        lp = torch.log_softmax(logits[-1].double(), -1)
        return max(abs(float(lp[t]) - v) for t, v in vllm_logprobs.items())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).double().norm() / b.double().norm())

    def gates(model: Any) -> dict[str, Any]:
        res: dict[str, Any] = {}
        with torch.no_grad():
            m = VllmLlama(model)
            k = torch.randn(64, m.num_kv_heads, m.head_dim)
            res["rope_round_trip"] = max(rel(m.rope.rotate(m.rope.rotate(k, d), -d), k) for d in (1, 500, 1900))
            p = torch.tensor(prompt)
            full_logits, full_kv = extend(m, p)
            res["exact_logprob_err"] = logprob_err(full_logits)
            res["exact_tokens"] = greedy(m, full_logits, full_kv)
            # segments cached after the system prompt, now reordered: r = 1 must equal a full prefill
            s = len(system)
            _, sys_kv = extend(m, torch.tensor(system))
            segs = []
            for d in docs:
                _, kv = extend(m, torch.tensor(system + d))
                segs.append(SegmentKV(kv=[(kk[s:], vv[s:]) for kk, vv in kv], base=s))
            spans, at = [], s
            for i in order:
                spans.append(Span(at, at + len(docs[i]), segs[i]))
                at += len(docs[i])
            n = len(region)
            asm = assemble(m, n, sys_kv, spans)
            r1 = blend_pass(m, torch.tensor(region), asm, BlendOptions(recompute_ratio=1.0))
            res["r1_kv_rel_err"] = max(max(rel(kk, fk[:n]), rel(vv, fv[:n]))
                                       for (kk, vv), (fk, fv) in zip(r1.kv, full_kv))
            logits, kv = extend(m, torch.tensor(question), r1.kv)
            res["r1_logits_rel_err"] = rel(logits[-1], full_logits[-1])
            res["r1_logprob_err"] = logprob_err(logits)
            res["r1_tokens"] = greedy(m, logits, kv)
            r0 = blend_pass(m, torch.tensor(region), asm, BlendOptions(recompute_ratio=0.0))
            res["r0_reordered_kv_rel_err"] = max(rel(kk, fk[:n]) for (kk, _), (fk, _) in zip(r0.kv, full_kv))
            # segments in their original order with in-context KV: r = 0 is today's exact reuse
            cut = [(a.start, a.end) for a in spans]
            ctx = [Span(a, b, SegmentKV(kv=[(kk[a:b], vv[a:b]) for kk, vv in full_kv], base=a)) for a, b in cut]
            prefix = [(kk[:s], vv[:s]) for kk, vv in full_kv]
            r0c = blend_pass(m, torch.tensor(region), assemble(m, n, prefix, ctx), BlendOptions(recompute_ratio=0.0))
            blended, _ = extend(m, torch.tensor(question), r0c.kv)
            exact, _ = extend(m, torch.tensor(question), [(kk[:n], vv[:n]) for kk, vv in full_kv])
            res["r0_in_context_bit_exact"] = bool(torch.equal(blended, exact)) and all(
                torch.equal(kk, fk[:n]) and torch.equal(vv, fv[:n]) for (kk, vv), (fk, fv) in zip(r0c.kv, full_kv))
            # an independent reference: transformers' forward of the same weights
            from transformers import LlamaForCausalLM

            hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            ref = hf(p[None]).logits[0, -1]
            res["hf_logits_rel_err_exact"] = rel(full_logits[-1], ref)
            res["hf_logits_rel_err_r1"] = rel(logits[-1], ref)
        return res

    res = llm.apply_model(gates)[0]
    res["vllm_tokens"] = vllm_tokens
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

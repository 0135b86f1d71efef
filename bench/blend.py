"""``pdx-bench blend``: CacheBlend fidelity and time to first token against a full prefill.

RANDOM WEIGHTS: the embedded model has no semantics, so every figure here validates the mechanism
(how close blended KV and outputs stay to a full prefill, and what it costs), not answer quality.

Workload (RAG-shaped): a fixed system prompt (the segments' anchor), then ``--docs`` documents of
300-800 tokens drawn from a pool in shuffled order and combinations, then a question. Every pool
document is cached once as a segment computed right after the system prompt. For each prompt:

* ``full_prefill_ms``: an exact forward of the whole prompt (the reference KV and continuation);
* ``prefix_only_ms``: today's exact reuse: the system prompt's KV is reused, the rest computed;
* per configuration (HKVD-K and HKVD-V at ``r``, random at ``r`` over ``--seeds`` seeds, first-k
  at ``r`` (EPIC), and ``r = 0``): re-rotate the segments, run the blend pass, compute the
  question on top; time it (TTFT), then measure per-layer relative KV error over the region
  (``||KV_blend - KV_full|| / ||KV_full||``, K and V together), the KL divergence
  ``KL(full || blend)`` of the last-token distribution, top-1 agreement of that distribution,
  and, over a ``--decode``-token greedy continuation of the full prefill fed back
  (teacher forcing), the fraction of positions whose top-1 agrees and the first index where
  greedy decoding diverges (equal to free-running greedy decoding up to that index; ``--decode``
  when it never does).

Times are in-process model forwards (transformers' Llama modules, float32, ``--threads`` torch
threads): no vLLM scheduling, HTTP or store load; they compare compute, not a served TTFT.
Every figure carries its spread over prompts (mean, std, p10, p90) in ``extra``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.report import Report, Result, median, percentile, progress

NOTE = ("random weights: these figures validate the blend mechanism (closeness to a full prefill, "
        "cost), not answer quality")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="embedded model preset (default small; tiny is quick)")
    p.add_argument("--prompts", type=int, default=10, help="RAG prompts (default 10)")
    p.add_argument("--docs", type=int, default=4, help="documents per prompt (default 4)")
    p.add_argument("--doc-tokens", type=int, default=600, help="mean document length, 300-800 (default 600)")
    p.add_argument("--pool", type=int, default=8, help="documents in the pool (default 8)")
    p.add_argument("--ratio", type=float, default=0.15, help="recompute ratio r (default 0.15)")
    p.add_argument("--check-layer", type=int, default=1, help="blend check layer (default 1)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random policy per prompt (default 3)")
    p.add_argument("--decode", type=int, default=32, help="greedy tokens compared (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--policies", default="hkvd_k,hkvd_v,random,first_k,r0",
                   help="configurations to run, comma-separated (default hkvd_k,hkvd_v,random,first_k,r0; "
                   "hkvd_k and random are always run: the headline rows compare them)")
    p.add_argument("--data-dir", default="", help="pdx data folder holding the built models")


@dataclass
class Samples:
    ttft_ms: list[float] = field(default_factory=list)
    kv_rel_err: list[float] = field(default_factory=list)
    layer_err: list[list[float]] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    last_top1: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    diverge: list[float] = field(default_factory=list)


def spread(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
            "p10": percentile(xs, 10), "p90": percentile(xs, 90), "n": len(xs)}


def run(args: argparse.Namespace) -> Report:
    import torch
    from transformers import LlamaForCausalLM

    from pdx.connector.blend import BlendOptions, Policy, SegmentKV, Span, assemble, blend_pass
    from pdx.connector.blend.model import HFLlama, extend
    from pdx.model import ensure_model, paragraph

    if not 300 <= args.doc_tokens <= 800:
        raise SystemExit("--doc-tokens must be within 300-800")
    torch.set_num_threads(args.threads)
    report = Report("blend")
    report.notes.append(NOTE)
    built = ensure_model(args.model, args.data_dir)
    hf = LlamaForCausalLM.from_pretrained(str(built.path), dtype=torch.float32).eval()
    model = HFLlama(hf)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built.path))
    rng = random.Random(args.seed)

    def text_ids(seed: int, n: int) -> list[int]:
        ids = tok.encode(paragraph(seed, n), add_special_tokens=False)
        while len(ids) < n:
            ids += tok.encode(paragraph(seed + 7919 * len(ids), n), add_special_tokens=False)
        return list(ids[:n])

    lo, hi = max(300, args.doc_tokens - 200), min(800, args.doc_tokens + 200)
    system = torch.tensor([tok.bos_token_id, *text_ids(args.seed * 1000 + 1, 63)])
    pool = [torch.tensor(text_ids(args.seed * 1000 + 100 + i, rng.randint(lo, hi))) for i in range(args.pool)]
    r = args.ratio
    wanted = {*args.policies.split(","), "hkvd_k", "random"}
    every: dict[str, tuple[str, list[BlendOptions]]] = {
        "hkvd_k": (f"hkvd_k r={r}", [BlendOptions(r, args.check_layer, Policy.HKVD_K)]),
        "hkvd_v": (f"hkvd_v r={r}", [BlendOptions(r, args.check_layer, Policy.HKVD_V)]),
        "random": (f"random r={r}", [BlendOptions(r, args.check_layer, Policy.RANDOM, seed=1000 * s + 1)
                                     for s in range(args.seeds)]),
        "first_k": (f"first_k r={r}", [BlendOptions(r, args.check_layer, Policy.FIRST_K)]),
        "r0": ("r=0", [BlendOptions(0.0, args.check_layer)]),
    }
    unknown = wanted - set(every)
    if unknown:
        raise SystemExit(f"--policies: unknown {sorted(unknown)}; known: {', '.join(every)}")
    configs = dict(v for k, v in every.items() if k in wanted)
    samples = {name: Samples() for name in configs}
    full_ms: list[float] = []
    prefix_ms: list[float] = []

    with torch.no_grad():
        _, sys_kv = extend(model, system)
        segments = []
        for doc in progress(pool, "blend: caching segments"):
            _, kv = extend(model, torch.cat((system, doc)))
            a = len(system)
            segments.append(SegmentKV(kv=[(k[a:], v[a:]) for k, v in kv], base=a))
        for i in progress(range(args.prompts), "blend: prompts", total=args.prompts):
            chosen = rng.sample(range(args.pool), args.docs)
            question = torch.tensor(text_ids(args.seed * 1000 + 5000 + i, 24))
            region = torch.cat([system] + [pool[d] for d in chosen])
            prompt = torch.cat((region, question))
            t0 = time.perf_counter()
            full_logits, full_kv = extend(model, prompt)
            full_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            extend(model, prompt[len(system):], sys_kv)
            prefix_ms.append((time.perf_counter() - t0) * 1e3)
            cont = _greedy(model, extend, full_logits, full_kv, args.decode)
            ref_tf, _ = extend(model, torch.tensor(cont[:-1]), full_kv, all_logits=True)
            ref_all = torch.cat((full_logits, ref_tf))
            spans, at = [], len(system)
            for d in chosen:
                spans.append(Span(at, at + len(pool[d]), segments[d]))
                at += len(pool[d])
            n = len(region)
            for name, variants in configs.items():
                s = samples[name]
                for opts in variants:
                    t0 = time.perf_counter()
                    res = blend_pass(model, region, assemble(model, n, sys_kv, spans), opts, in_place=True)
                    logits, kv = extend(model, question, res.kv)
                    s.ttft_ms.append((time.perf_counter() - t0) * 1e3)
                    errs = [_rel(k, v, fk[:n], fv[:n]) for (k, v), (fk, fv) in zip(res.kv, full_kv)]
                    s.layer_err.append(errs)
                    s.kv_rel_err.append(statistics.fmean(errs))
                    p = torch.log_softmax(full_logits[-1].double(), -1)
                    q = torch.log_softmax(logits[-1].double(), -1)
                    s.kl.append(float((p.exp() * (p - q)).sum()))
                    s.last_top1.append(float(int(logits[-1].argmax()) == int(full_logits[-1].argmax())))
                    tf, _ = extend(model, torch.tensor(cont[:-1]), kv, all_logits=True)
                    agree = (torch.cat((logits, tf)).argmax(-1) == ref_all.argmax(-1)).tolist()
                    s.top1.append(sum(agree) / len(agree))
                    s.diverge.append(float(agree.index(False)) if False in agree else float(len(agree)))

    _rows(report, args, samples, full_ms, prefix_ms, model.num_layers, len(system),
          sum(len(pool[d]) for d in range(args.pool)) / args.pool)
    return report


def _rel(k: Any, v: Any, fk: Any, fv: Any) -> float:
    num = float((k - fk).double().norm() ** 2 + (v - fv).double().norm() ** 2)
    den = float(fk.double().norm() ** 2 + fv.double().norm() ** 2)
    return math.sqrt(num / den)


def _greedy(model: Any, extend: Any, logits: Any, kv: Any, n: int) -> list[int]:
    import torch

    out: list[int] = []
    for _ in range(n):
        t = int(logits[-1].argmax())
        out.append(t)
        if len(out) < n:
            logits, kv = extend(model, torch.tensor([t]), kv)
    return out


def _rows(report: Report, args: argparse.Namespace, samples: dict[str, Samples], full_ms: list[float],
          prefix_ms: list[float], num_layers: int, system_tokens: int, mean_doc: float) -> None:
    cond = {"model": args.model, "prompts": args.prompts, "docs": args.docs, "mean_doc_tokens": round(mean_doc),
            "system_tokens": system_tokens, "check_layer": args.check_layer, "threads": args.threads,
            "note": NOTE}
    full = median(full_ms)
    report.add(Result("full_prefill_ms", full, "ms", lower_is_better=True, extra={**cond, **spread(full_ms)}))
    report.add(Result("prefix_only_ms", median(prefix_ms), "ms", "full_prefill_ms", full, lower_is_better=True,
                      extra={**cond, **spread(prefix_ms)}))
    r = args.ratio
    hk, rnd = samples[f"hkvd_k r={r}"], samples[f"random r={r}"]
    report.add(Result("blend_ttft_ms", median(hk.ttft_ms), "ms", "full_prefill_ms", full, lower_is_better=True,
                      extra={**cond, "policy": f"hkvd_k r={r}", **spread(hk.ttft_ms)}))
    report.add(Result("blend_ttft_vs_prefix_only_ms", median(hk.ttft_ms), "ms", "prefix_only_ms",
                      median(prefix_ms), lower_is_better=True, extra={"policy": f"hkvd_k r={r}"}))
    report.add(Result("blend_top1_agree", statistics.fmean(hk.top1), "fraction", "random_top1_agree",
                      statistics.fmean(rnd.top1),
                      extra={**cond, "policy": f"hkvd_k r={r}", **spread(hk.top1),
                             "baseline_spread": spread(rnd.top1),
                             "over": f"{args.decode} teacher-forced positions per prompt"}))
    report.add(Result("blend_kv_rel_err", statistics.fmean(hk.kv_rel_err), "rel", "random_kv_rel_err",
                      statistics.fmean(rnd.kv_rel_err), lower_is_better=True,
                      extra={**cond, "policy": f"hkvd_k r={r}", **spread(hk.kv_rel_err),
                             "baseline_spread": spread(rnd.kv_rel_err)}))
    for name, s in samples.items():
        tag = name.replace(" r=", "_r").replace("=", "").replace(".", "")
        layers = [statistics.fmean(e[i] for e in s.layer_err) for i in range(num_layers)]
        common = {"policy": name, "runs": len(s.ttft_ms)}
        report.add(Result(f"{tag}_ttft_ms", median(s.ttft_ms), "ms", "full_prefill_ms", full,
                          lower_is_better=True, extra={**common, **spread(s.ttft_ms)}))
        report.add(Result(f"{tag}_kv_rel_err", statistics.fmean(s.kv_rel_err), "rel",
                          extra={**common, **spread(s.kv_rel_err), "per_layer": [round(x, 5) for x in layers]}))
        report.add(Result(f"{tag}_kl", statistics.fmean(s.kl), "nats", extra={**common, **spread(s.kl)}))
        report.add(Result(f"{tag}_last_top1", statistics.fmean(s.last_top1), "fraction",
                          extra={**common, **spread(s.last_top1)}))
        report.add(Result(f"{tag}_top1_agree", statistics.fmean(s.top1), "fraction",
                          extra={**common, **spread(s.top1)}))
        report.add(Result(f"{tag}_first_divergence", statistics.fmean(s.diverge), "tokens",
                          extra={**common, **spread(s.diverge), "of": args.decode}))

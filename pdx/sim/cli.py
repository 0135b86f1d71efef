"""``pdx sim``: simulate a P/D fleet over a trace with pdx's real routing and eviction code.

  pdx sim TRACE --prefill 16 --decode 16 [--policy a,b] [--l1 64GiB,256GiB] [--disk SIZE]
          [--shared-tier SIZE] [--eviction lru] [--cost gpu-8b] [--json PATH]
  pdx sim generate OUT [--requests N --rate R --turns T ...]   write a synthetic trace

Every combination of ``--policy`` and ``--l1`` is one run; the table has one row per run.
``pdx`` hands ``sim`` to ``main`` here; ``python -m pdx.sim`` works as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Any

from pdx.config import CacheAwareConfig, format_size, parse_size
from pdx.errors import PdxError
from pdx.scheduler.policies import POLICIES
from pdx.sim.cost import COST_MODELS, cost_model
from pdx.sim.engine import SimConfig, SimResult, Simulation, percentile
from pdx.trace import DEFAULT_BLOCK_TOKENS, add_generator_arguments, generate_main, read_trace


def _sizes(text: str) -> list[int]:
    try:
        return [parse_size(s.strip()) for s in text.split(",") if s.strip()]
    except (ValueError, PdxError) as exc:
        raise PdxError(f"bad size list {text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdx sim", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("trace", help="trace file (JSON lines: timestamp, input_length, output_length, hash_ids)")
    p.add_argument("--prefill", type=int, default=16, help="prefill workers (default 16)")
    p.add_argument("--decode", type=int, default=16, help="decode workers (default 16)")
    p.add_argument("--policy", default=",".join(POLICIES.names()),
                   help=f"routing policies, comma-separated (default all: {', '.join(POLICIES.names())})")
    p.add_argument("--l1", default="64GiB", help="L1 (host memory) per worker; a comma list runs each")
    p.add_argument("--disk", default="0", help="local disk tier per worker (0 = none)")
    p.add_argument("--shared-tier", default="0", help="shared tier (Redis, Mooncake...) for the fleet (0 = none)")
    p.add_argument("--eviction", default="lru", help="L1 eviction policy: lru, lfu, s3fifo")
    p.add_argument("--no-decode-l1", action="store_true", help="decode agents keep nothing they received")
    p.add_argument("--cost", default="gpu-8b", choices=sorted(COST_MODELS), help="cost model preset")
    p.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS, help="tokens per hash id")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="agents' announcement period")
    p.add_argument("--max-imbalance", type=int, default=CacheAwareConfig().max_imbalance,
                   help="cache_aware / prefix_affinity load guard (requests)")
    p.add_argument("--limit", type=int, help="use only the first N requests")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (pdx-bench rows)")
    return p


def run(args: argparse.Namespace) -> list[SimResult]:
    trace = read_trace(args.trace, args.limit)
    cost = cost_model(args.cost)
    policies = [s.strip() for s in args.policy.split(",") if s.strip()]
    for name in policies:
        POLICIES.get(name)  # an unknown name fails before any run, listing the known ones
    settings = replace(CacheAwareConfig(), max_imbalance=args.max_imbalance)
    base = SimConfig(prefill=args.prefill, decode=args.decode, disk_bytes=parse_size(args.disk),
                     shared_bytes=parse_size(args.shared_tier), eviction=args.eviction,
                     block_tokens=args.block_tokens, heartbeat_s=args.heartbeat_s,
                     decode_l1=not args.no_decode_l1, settings=settings)
    results = []
    span = (trace[-1].timestamp - trace[0].timestamp) / 1000.0
    print(f"pdx sim: {len(trace)} requests over {span:.0f} s, {args.prefill}P x {args.decode}D, "
          f"cost model {cost.name} ({cost.source})", flush=True)
    for l1 in _sizes(args.l1):
        for name in policies:
            t0 = time.perf_counter()
            res = Simulation(replace(base, policy=name, l1_bytes=l1), cost).run(trace)
            wall = time.perf_counter() - t0
            results.append(res)
            print(f"  {name} l1={format_size(l1)}: done in {wall:.1f} s", file=sys.stderr, flush=True)
            res.reasons["_wall_s"] = int(wall * 1000)
    return results


def table(results: list[SimResult]) -> str:
    head = ("policy", "l1", "hit", "oracle", "hit/oracle", "imb P", "imb D", "queue p50", "queue p99",
            "TTFT p50", "TTFT p90", "TTFT p99", "L1", "disk", "shared", "decode", "computed")
    rows: list[tuple[str, ...]] = [head]
    for r in results:
        tt = r.tier_tokens
        total = max(1, r.prompt_tokens)
        rows.append((
            r.config.policy, format_size(r.config.l1_bytes), f"{r.hit_ratio:.3f}", f"{r.oracle_hit_ratio:.3f}",
            f"{r.hit_ratio / r.oracle_hit_ratio:.3f}" if r.oracle_hit_ratio else "-",
            f"{r.prefill_imbalance:.2f}", f"{r.decode_imbalance:.2f}",
            _ms(percentile(r.queue_s, 50)), _ms(percentile(r.queue_s, 99)),
            _ms(percentile(r.ttft_s, 50)), _ms(percentile(r.ttft_s, 90)), _ms(percentile(r.ttft_s, 99)),
            *(f"{tt.get(k, 0) / total:.1%}" for k in ("l1", "disk", "shared", "decode_local", "computed"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("hit = prompt tokens loaded instead of computed / all prompt tokens; oracle = an infinite cache "
                 "shared by all; imb = max/mean busy time (P) or decode work (D); tier columns: share of all "
                 "prompt tokens; times in ms")
    return "\n".join(lines)


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f}"


def to_json(results: list[SimResult], args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for r in results:
        tag = f"@{r.config.policy}" + (f"/l1={format_size(r.config.l1_bytes)}" if "," in args.l1 else "")
        rows.append({"name": f"sim_hit_ratio{tag}", "value": r.hit_ratio, "unit": "ratio",
                     "baseline_name": "oracle_hit_ratio", "baseline": r.oracle_hit_ratio,
                     "ratio": r.hit_ratio / r.oracle_hit_ratio if r.oracle_hit_ratio else None,
                     "extra": r.to_dict()})
        rows.append({"name": f"sim_load_imbalance{tag}", "value": r.load_imbalance, "unit": "max/mean",
                     "lower_is_better": True})
    return {"workload": "sim", "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "notes": [f"trace {args.trace}, {args.prefill}P x {args.decode}D, cost model {args.cost}"],
            "results": rows}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "generate":
            g = argparse.ArgumentParser(prog="pdx sim generate", description="write a synthetic trace")
            add_generator_arguments(g)
            return generate_main(g.parse_args(argv[1:]))
        args = build_parser().parse_args(argv)
        results = run(args)
        print(table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(results, args), f, indent=2)
                f.write("\n")
            print(f"wrote {args.json}")
        return 0
    except PdxError as exc:
        print(f"pdx sim: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

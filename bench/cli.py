"""``pdx-bench WORKLOAD [options]``: run one workload, print its table, optionally write JSON.

Each workload is a module ``bench.<name>`` with ``add_arguments(parser)`` and
``run(args) -> Report``; modules are imported only when their workload runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

WORKLOADS = {
    "store": "L1/disk/Redis/Mooncake/S3 tiers and lookups against memcpy, file I/O and the raw clients",
    "transfer": "chunk transfer per backend against the raw mechanism (socket, memcpy, NIXL, ucxx)",
    "kernels": "KV pack/unpack against a contiguous copy of the same bytes",
    "agent": "control-plane round trip and agent-to-agent fetch against bare ZMQ and transports",
    "e2e": "TTFT with cached vs recomputed KV, and P/D overhead, on real vLLM",
    "proxy": "time to first byte added by pdx-proxy, and its max request rate",
    "replay": "a trace sent to a running deployment at its arrival times: TTFT and hit ratio vs oracle",
    "blend": "CacheBlend fidelity (KV error, KL, top-1, divergence) and TTFT against a full prefill",
    "soak": "mixed load on a 'pdx up' deployment while faults hit it: ok ratio, wrong tokens, leaks",
    "fleet": "2P2D over two network namespaces on real vLLM: TTFT p50/p99 against plain vLLM, and a "
             "peer-to-peer fetch between the hosts' agents against the bare tcp transport (needs root)",
    "layerwise": "P/D over a shaped link (two network namespaces, tc tbf): layer-wise streaming of the "
                 "prefill's KV against whole-prompt transfer, TTFT and the transfer's share (needs root)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdx-bench",
        description="Measure pdx beside a raw baseline taken in the same run. "
        "Prints a table (figure, baseline, ratio: higher is better) and writes JSON with --json.",
    )
    sub = parser.add_subparsers(dest="workload", metavar="WORKLOAD", required=True)
    for name, help_text in WORKLOADS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
        try:
            module = importlib.import_module(f"bench.{name}")
        except ImportError as exc:
            p.set_defaults(_missing=str(exc))
            continue
        module.add_arguments(p)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"pdx-bench {args.workload}: unavailable: {args._missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{args.workload}")
    report = module.run(args)
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

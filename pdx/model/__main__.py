"""``python -m pdx.model``: build or locate the embedded model from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from pdx.errors import PdxError
from pdx.model.build import ensure_model, load, model_path, verify
from pdx.model.spec import PRESETS, preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdx.model",
        description="Build (on first use) or locate pdx's embedded random-weight Llama model.")
    sub = parser.add_subparsers(dest="command", required=True)
    names = sorted(PRESETS)
    for cmd, text in (("build", "build the model if missing and print its folder"),
                      ("path", "print where the model is or would be cached, without building"),
                      ("verify", "re-hash a built model's files against its manifest")):
        p = sub.add_parser(cmd, help=text, description=text)
        p.add_argument("--preset", default="tiny", choices=names, help="model preset (default: tiny)")
        p.add_argument("--data-dir", default="",
                       help="data folder (default: $PDX_DATA_DIR or ~/.cache/pdx); models go in <it>/models")
        if cmd == "build":
            p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    sub.add_parser("presets", help="list the presets and their sizes")
    args = parser.parse_args(argv)
    try:
        if args.command == "presets":
            for name in names:
                s = PRESETS[name]
                print(f"{name}: {s.num_layers} layers, hidden {s.hidden_size}, heads {s.num_heads}/"
                      f"{s.num_kv_heads} kv, head_dim {s.head_dim}, vocab {s.vocab_size}, "
                      f"~{s.num_params() / 1e6:.1f}M params, {s.kv_bytes_per_token()} KV bytes/token (fp32)")
        elif args.command == "path":
            print(model_path(preset(args.preset), args.data_dir))
        elif args.command == "verify":
            model = load(model_path(preset(args.preset), args.data_dir))
            verify(model)
            print(f"{model.path}: ok")
        else:
            model = ensure_model(args.preset, args.data_dir)
            if args.json:
                print(json.dumps({"path": str(model.path), "preset": model.spec.name,
                                  "num_params": model.num_params, "vocab_size": model.vocab_size}))
            else:
                print(model.path)
    except PdxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

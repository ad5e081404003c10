"""python -m glm4v_ms.parity dump|compare|run

  dump     --model HF_DIR --out ref.npz [--device cuda|cpu] [--dtype bfloat16|float32] [--cases FILE]
  compare  --model DIR --reference ref.npz [--dtype ...] [--report report.json]
  run      --model DIR [--reference-model HF_DIR] [--device ...] [--cases FILE]

dump imports torch and transformers, never MindSpore; compare imports MindSpore, never torch; run does both in one
process. Exit status: 0 all cases within tolerance, 1 a case beyond it, 2 an error (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import ParityError


def _tolerance_flags(p):
    g = p.add_argument_group("tolerance overrides (defaults depend on the dtype pair)")
    g.add_argument("--rtol", type=float, help="max relative diff, max|diff| / max|ref|, per state")
    g.add_argument("--min-cos", type=float, help="min cosine similarity per state")
    g.add_argument("--min-top1", type=float, help="min fraction of tokens whose argmax agrees")
    g.add_argument("--max-kl", type=float, help="max mean KL(ref || ours) of the next-token distributions")


def _overrides(a):
    return dict(rtol=a.rtol, min_cos=a.min_cos, min_top1=a.min_top1, max_kl=a.max_kl)


def parser():
    p = argparse.ArgumentParser(prog="python -m glm4v_ms.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dump", help="run the reference (torch) and write its states to a .npz")
    d.add_argument("--model", required=True, help="transformers checkpoint folder")
    d.add_argument("--out", required=True, help="dump file to write (.npz)")
    d.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when torch sees one)")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--cases", help="JSON list of chats with your own media (default: the built-in cases)")

    c = sub.add_parser("compare", help="run this port (MindSpore) on a dump's inputs and compare")
    c.add_argument("--model", required=True, help="checkpoint folder (transformers or glm4v_ms.convert)")
    c.add_argument("--reference", required=True, help="dump file written by `dump`")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="our dtype (default: bfloat16 on Ascend, float32 on CPU)")
    c.add_argument("--device", help="cpu, ascend or auto (default: GLM4V_MS_DEVICE, else auto)")
    c.add_argument("--report", help="write the JSON report here")
    _tolerance_flags(c)

    r = sub.add_parser("run", help="dump and compare in one process")
    r.add_argument("--model", required=True, help="checkpoint folder for this port")
    r.add_argument("--reference-model", help="transformers checkpoint (default: --model, when it is one)")
    r.add_argument("--device", default="auto", help="reference device: cuda, cpu or auto")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of both sides (default float32)")
    r.add_argument("--reference-dtype", choices=["float32", "bfloat16", "float16"],
                   help="the reference's dtype, when it differs from --dtype")
    r.add_argument("--cases", help="JSON list of chats with your own media (default: the built-in cases)")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--out", help="also save the reference dump here")
    _tolerance_flags(r)
    return p


def _is_transformers_folder(folder):
    from ..safetensors_io import Checkpoint, WeightError
    from ..weights import is_converted

    try:
        return not is_converted(Checkpoint(folder))
    except WeightError:
        return False


def _size(path):
    return f"{os.path.getsize(path) / 2**20:.1f} MiB"


def main(argv=None):
    a = parser().parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        if a.command == "dump":
            from . import reference

            meta, results = reference.dump(a.model, a.out, a.device, a.dtype, a.cases, log)
            log(f"wrote {a.out} ({_size(a.out)}): {len(results)} cases, {meta['dtype']} on {meta['device']}")
            return 0
        if a.command == "compare":
            from . import compare

            return 0 if compare.compare(a.model, a.reference, a.dtype, a.device, _overrides(a), a.report, log) else 1
        # run: the reference first (torch loads before MindSpore), freed before our model loads
        if not os.path.isdir(a.model):
            raise ParityError(f"model folder not found: {a.model}")
        ref_dir = a.reference_model
        if ref_dir is None:
            if not _is_transformers_folder(a.model):
                raise ParityError(f"{a.model} is not a transformers checkpoint: give --reference-model HF_DIR")
            ref_dir = a.model
        import gc
        import tempfile

        from . import dumpfile, reference

        ref = reference.Reference(ref_dir, a.device, a.reference_dtype or a.dtype)
        with tempfile.TemporaryDirectory(prefix="glm4v_parity_") as workdir:
            ref_meta, ref_cases = ref.run(reference.load_cases(a.cases, workdir), log)
        del ref
        gc.collect()
        if a.out:
            dumpfile.save(a.out, ref_meta, ref_cases)
            log(f"wrote {a.out} ({_size(a.out)})")
        from . import compare

        model = compare.load_model(a.model, a.dtype)
        return 0 if compare.compare_cases(model, a.model, ref_meta, ref_cases, _overrides(a), a.report, log) else 1
    except (ParityError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()
        print(f"glm4v_ms.parity: error: {text[0] if text else type(e).__name__}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (one line, never a traceback: the CLI's contract)
        text = str(e).strip().splitlines()
        print(f"glm4v_ms.parity: error: {type(e).__name__}: {text[0] if text else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Converter throughput against a plain copy of the same bytes, and the converter's peak memory.

    python benchmarks/bench_convert.py [--layers 1] [--vision-depth 2] [--shard-mb 1000] [--reps 3] [--dir /tmp]

Builds a synthetic checkpoint in the Hugging Face layout: the 9B model's real shapes (vocab 151552, hidden 4096,
MLP 13696, 32/2 heads, vision 1536 wide) with fewer layers, bf16 random bits, several shards. Then, alternately, it
times `python -m glm4v_ms.convert` (a fresh process, which reports its peak RSS, VmHWM) and shutil.copyfile of every
source shard, each once with the copied files fsync'ed (the converter fsyncs its output before the rename) and
once without, and SHA-256 of the same bytes (the converter's floor: it hashes the source for the manifest).
Every run starts after os.sync(), from a warm page cache (--cold: the source evicted first); runs alternate, and the best and the
median of each kind are reported (the best is the least disturbed by other work on the machine). The synthetic
files are removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from glm4v_ms.config import Glm4vConfig                     # noqa: E402
from glm4v_ms.convert import SafetensorsWriter               # noqa: E402
from glm4v_ms.weights import hf_shapes                      # noqa: E402


def synthetic_config(layers=2, vision_depth=4, vocab=151552, hidden=4096, intermediate=13696, heads=32, kv_heads=2,
                     vision_hidden=1536, vision_heads=12, merger=13696) -> dict:
    """config.json (transformers 5 layout) with the 9B model's shapes by default."""
    return {
        "model_type": "glm4v", "architectures": ["Glm4vForConditionalGeneration"], "tie_word_embeddings": False,
        "image_token_id": 151343, "video_token_id": 151344, "image_start_token_id": 151339,
        "image_end_token_id": 151340, "video_start_token_id": 151341, "video_end_token_id": 151342,
        "text_config": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
                        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                        "rms_norm_eps": 1e-5, "hidden_act": "silu", "dtype": "bfloat16",
                        "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12],
                                            "partial_rotary_factor": 0.5, "rope_theta": 10000.0}},
        "vision_config": {"depth": vision_depth, "hidden_size": vision_hidden, "num_heads": vision_heads,
                          "out_hidden_size": hidden, "intermediate_size": merger, "patch_size": 14,
                          "image_size": 336, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def write_synthetic(folder: str, config: dict, shard_bytes: int, seed: int = 0) -> int:
    """HF-named bf16 tensors of random bits, packed into shards of about shard_bytes in the table's order (so that
    some fused entries span two shards). Returns the total size of the shards."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = hf_shapes(Glm4vConfig.from_dict(config))
    block = np.random.default_rng(seed).bytes(64 << 20)
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, "BF16", shape))
        size += n
    shards.append(cur)
    wmap, total = {}, 0
    for i, specs in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(os.path.join(folder, fn), specs, {"format": "pt"})
        for k, (name, _, shape) in enumerate(specs):
            n = int(np.prod(shape)) * 2
            start = (k * 7919) % len(block)     # different bytes for different tensors
            w.write(_slices(block, start, n))
            wmap[name] = fn
            total += n
        w.close()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f)
    for fn, text in (("tokenizer_config.json", "{}"), ("chat_template.jinja", "{{ messages }}"),
                     ("generation_config.json", '{"eos_token_id": [151329]}')):
        with open(os.path.join(folder, fn), "w") as f:
            f.write(text)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _slices(block: bytes, start: int, n: int):
    mv, at = memoryview(block), start % len(block)
    while n:
        k = min(n, len(block) - at)
        yield mv[at:at + k]
        n, at = n - k, 0


def run_convert(src: str, dst: str, *extra) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one converter run in a fresh process."""
    code = "import sys; from glm4v_ms.convert import peak_rss; from glm4v_ms.convert.__main__ import main; rc = main(sys.argv[1:]); print(peak_rss())"
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, "--src", src, "--dst", dst, *extra],
                       cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"converter failed: {p.stderr.strip()}")
    line, peak = p.stdout.strip().splitlines()
    return secs, int(peak), line


def copy_shards(src: str, dst: str, fsync: bool) -> float:
    os.makedirs(dst)
    t = time.perf_counter()
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
            if fsync:
                fd = os.open(os.path.join(dst, fn), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    return time.perf_counter() - t


def evict(src: str) -> None:
    """Drop the (clean) source pages from the page cache, so that the next run reads the disk."""
    for f in os.listdir(src):
        fd = os.open(os.path.join(src, f), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def hash_shards(src: str) -> float:
    """SHA-256 of the shards, as the converter computes it for the manifest: the floor of its CPU cost."""
    from glm4v_ms.convert import _Hasher
    t = time.perf_counter()
    _Hasher([os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".safetensors")]).result()
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--cold", action="store_true", help="evict the source shards from the page cache before each run")
    args = ap.parse_args(argv)

    cfg = synthetic_config(args.layers, args.vision_depth)
    need = 3.5 * sum(int(np.prod(s)) * 2 for s in hf_shapes(Glm4vConfig.from_dict(cfg)).values())
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        t = time.perf_counter()
        total = write_synthetic(src, cfg, args.shard_mb * 10 ** 6)
        shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
        biggest = max(os.path.getsize(os.path.join(src, f)) for f in shards)
        print(f"synthetic checkpoint: {len(shards)} shards, {total / 1e9:.2f} GB (largest shard {biggest / 1e9:.2f} GB), "
              f"written in {time.perf_counter() - t:.1f} s", flush=True)
        res = {"convert": [], "copy": [], "copy+fsync": [], "sha256": []}
        rss = 0
        for r in range(args.reps):
            for kind in ("copy+fsync", "convert", "copy", "sha256"):
                out = os.path.join(work, "out")
                os.sync()
                if args.cold:
                    evict(src)
                if kind == "convert":
                    secs, peak, line = run_convert(src, out)
                    rss = max(rss, peak)
                elif kind == "sha256":
                    secs = hash_shards(src)
                else:
                    secs = copy_shards(src, out, kind == "copy+fsync")
                res[kind].append(secs)
                print(f"  rep {r + 1} {kind:<10} {secs:6.2f} s  {total / secs / 1e9:5.2f} GB/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        print()
        for how, pick in (("best", min), ("median", statistics.median)):
            t = {k: pick(v) for k, v in res.items()}
            print(f"{how} of {args.reps}: convert {total / t['convert'] / 1e9:.2f} GB/s, copy "
                  f"{total / t['copy'] / 1e9:.2f} GB/s, copy+fsync {total / t['copy+fsync'] / 1e9:.2f} GB/s, "
                  f"sha256 alone {total / t['sha256'] / 1e9:.2f} GB/s; "
                  f"convert / copy = {t['copy'] / t['convert']:.0%}, "
                  f"convert / copy+fsync = {t['copy+fsync'] / t['convert']:.0%}")
        print(f"converter peak RSS {rss / 2**20:.0f} MiB = {rss / biggest:.1%} of the largest source shard")
        print(f"converter's own line: {line}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

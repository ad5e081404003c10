"""Random checkpoints in the official hub layout, made with NumPy alone (no torch, no download).

`demo-tiny` lets a new user run the whole pipeline (processor, vision tower, decoder, streaming) on any machine;
`demo-150m` is the benchmark-sized model (text 8 x 1024, vocab 32768; vision 4 x 256). Their weights are random:
what they generate is noise, by design. The tiny tokenizer has 471 entries; demo-150m's gets made-up words for the
rest of its 32768 ids (decode only: no merges reach them), so that its random output shows as text.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from .config import Glm4vConfig
from .processing import tiny
from .weights import hf_shapes

SIZES = {
    "demo-tiny": dict(text=dict(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
                      vision=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=160)),
    "demo-150m": dict(text=dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12]),
                      vision=dict(depth=4, hidden_size=256, num_heads=2, intermediate_size=2816)),
}
MARKER = "RANDOM_WEIGHTS.txt"


def official_config(text: dict, vision: dict, max_position_embeddings=8192) -> dict:
    """config.json as the official checkpoint lays it out (rope_scaling + partial_rotary_factor + rope_theta)."""
    ids = dict(image_token_id=tiny.IMAGE_TOKEN_ID, video_token_id=tiny.VIDEO_TOKEN_ID,
               image_start_token_id=tiny.IMAGE_START_TOKEN_ID, image_end_token_id=tiny.IMAGE_END_TOKEN_ID,
               video_start_token_id=tiny.VIDEO_START_TOKEN_ID, video_end_token_id=tiny.VIDEO_END_TOKEN_ID)
    t = dict(text)
    section = t.pop("mrope_section")
    tc = dict(model_type="glm4v_text", hidden_act="silu", rms_norm_eps=1e-5, attention_bias=True,
              max_position_embeddings=max_position_embeddings, partial_rotary_factor=0.5, rope_theta=10000.0,
              rope_scaling={"rope_type": "default", "mrope_section": section},
              eos_token_id=tiny.EOS_TOKEN_IDS, pad_token_id=tiny.PAD_TOKEN_ID, tie_word_embeddings=False, **t)
    vc = dict(model_type="glm4v", hidden_act="silu", in_channels=3, image_size=336, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, rms_norm_eps=1e-5, attention_bias=False, out_hidden_size=t["hidden_size"], **vision)
    top = {k: tc[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings",
                              "partial_rotary_factor", "rope_theta", "pad_token_id")}
    return dict(architectures=["Glm4vForConditionalGeneration"], model_type="glm4v", torch_dtype="float32",
                text_config=tc, vision_config=vc, tie_word_embeddings=False, **ids, **top)


def random_weights(cfg: Glm4vConfig, seed=0) -> dict:
    """HF-named float32 tensors: norms near 1, biases and everything else scaled random."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        if len(shape) == 1:
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            a = base + 0.1 * rng.standard_normal(shape)
        elif "embed" in name:
            a = rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        out[name] = a.astype(np.float32)
    return out


def build(dst: str, size: str = "demo-tiny", seed: int = 0) -> str:
    """Write a random checkpoint (config, weights, tokenizer, template, processor and generation configs) into
    dst, which must not exist yet (a finished one is never replaced: a running process may be reading it)."""
    from safetensors.numpy import save_file
    spec = SIZES[size]
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        cfg_dict = official_config(spec["text"], spec["vision"])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2)
        cfg = Glm4vConfig.from_dict(cfg_dict)
        save_file(random_weights(cfg, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        # small pixel budgets keep a CPU demo quick: at most 256 image tokens, 1024 per video
        tiny.write_all(tmp, image_size={"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 256},
                       video_size={"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 1024})
        cover_vocabulary(tmp, cfg.text.vocab_size)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": tiny.EOS_TOKEN_IDS, "pad_token_id": tiny.PAD_TOKEN_ID, "do_sample": False,
                       "max_new_tokens": 128}, f, indent=2)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"{size}: random weights (seed {seed}) made by glm4v_ms.demo; its output is noise.\n")
        try:
            os.rename(tmp, dst)
        except OSError:
            # another process finished first: keep its folder (it may be memory-mapped by now), drop ours
            if not os.path.isfile(os.path.join(dst, MARKER)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _words(n: int, taken: set) -> list:
    """n made-up words in byte-level BPE spelling ("\u0120" is a leading space), fixed for a given n."""
    cons, vows = "bcdfghjklmnprstvwz", "aeiou"
    syl = [c + v for c in cons for v in vows]
    rng = np.random.default_rng(0)
    out, seen = [], set(taken)
    while len(out) < n:
        k = rng.integers(1, 4)
        w = "".join(syl[i] for i in rng.integers(0, len(syl), k))
        w = ("\u0120" + w) if rng.random() < 0.8 else w
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def cover_vocabulary(folder: str, vocab_size: int):
    """Give every id below vocab_size a token in folder's tokenizer.json (written atomically: a running process
    may be reading it)."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tj.get("added_tokens", [])}
    free = [i for i in range(vocab_size) if i not in used]
    if not free:
        return
    vocab.update(zip(_words(len(free), set(vocab)), free))
    # the added tokens enter the model's vocabulary at their ids too: else, on loading, `tokenizers` would give
    # them new ids after the (now larger) model vocabulary
    vocab.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    os.replace(tmp, path)


def cached(size: str) -> str:
    """The demo checkpoint in the cache folder ($GLM4V_MS_CACHE, default ~/.cache/glm4v_ms), built once (one
    built before its tokenizer covered its vocabulary gets the covering tokenizer)."""
    root = os.environ.get("GLM4V_MS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms")
    dst = os.path.join(root, size)
    if not os.path.isfile(os.path.join(dst, MARKER)):
        build(dst, size)
    else:
        cover_vocabulary(dst, SIZES[size]["text"]["vocab_size"])
    return dst

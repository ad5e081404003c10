"""Generation: prefill once, then one token at a time over the static KV cache. The one decoding engine.

The pieces, bottom up: steps.py (`prefill`, `decode_one`: the two device steps), sampling.py (host-side NumPy:
the logits processors, temperature, top-k, top-p, seeded), reuse.py (prefix reuse: `PromptCache`), batch.py
(`Sequence`, `Batch`: rows of one cache; `Batch.step` is the only decode loop body in the package). Here
`generate` (model.generate, the CLI) drives `Batch.step` over one batched prefill; the server's engine thread
(engine.py) drives it over rows admitted one at a time. The model knows nothing of tokenizers: the ids of the
thinking tags come from the checkpoint's tokenizer files (read as plain JSON) or from the caller.
"""
from __future__ import annotations

import time

import numpy as np

from . import compile_cache
from .batch import Batch, Sequence, select
from .generation_config import GenerationConfig, thinking_force
from .prompt import Prompt
from .reuse import PromptCache, prefill_reusing
from .shapes import cache_bucket, fit, graph_plan, prompt_bucket
from .steps import prefill


def _emit(streamer, tokens):
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens)
    else:
        streamer(tokens)


def plan_compiles(model, B: int, L: int, max_len: int, new: int):
    """Tell the persistent compile cache (compile_cache.py) which graphs this call compiles: its prompt's chunk
    graph, then the decode graph (shapes.py's rules, those model.run runs by)."""
    compile_cache.plan(model, [compile_cache.signature(*g) for g in graph_plan(model.config.text, B, L, max_len, new)])


def generate(model, p: Prompt, cfg: GenerationConfig, think_ids: dict | None = None, streamer=None,
             cache: PromptCache | None = None):
    """(token ids (B, prompt + new) as numpy int64, as transformers' generate returns them; timings).

    Rows that finished (an eos id after min_new_tokens) are filled with the pad id. With max_thinking_tokens,
    a row that has made that many tokens without </think> is made to continue with </think><answer>.
    `cache`: a PromptCache whose longest common prefix with this prompt is reused, and which keeps this call's
    cache for the next one. timings: prefill_s, first_step_s, decode_s, decode_steps, new_tokens, prompt_tokens,
    reused_tokens (with a cache)."""
    B, L = p.shape
    force = thinking_force(cfg, think_ids)
    new = fit(L, model.config.text.max_position_embeddings, cfg.max_new_tokens)
    max_len = cache_bucket(prompt_bucket(L) + new)   # the prompt sits left-padded to its bucket
    rng = np.random.default_rng(cfg.seed)            # one generator, drawn from row by row
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)

    select(model, np.zeros(B))   # a model serving several adapters (multi_lora): generate() runs the base
    got = prefill_reusing(model, p, cache, new) if cache is not None else None
    if got is None:
        plan_compiles(model, B, prompt_bucket(L), max_len, new)
        logits, st = prefill(model, p, max_len, owner=cache)
        if cache is not None:
            cache.reused, st.media, st.timings["reused_tokens"] = 0, p.media, 0
    else:
        logits, st = got
    if cache is not None:
        cache.hold(st, model)
    batch = Batch(model, st, logits, keep=cache is not None)
    batch.seqs = [Sequence(p.real(b), cfg, new, force, rng) for b in range(B)]
    out = np.full((B, new), pad, np.int64)
    t0 = t1 = time.perf_counter()
    n = 0
    while batch.active():
        tok = batch.step()
        out[:, n] = np.where(tok >= 0, tok, pad)
        _emit(streamer, out[:, n])
        n += 1
        if n == 1:   # the first step may compile the decode graph: timed apart from the steady state
            t1 = time.perf_counter()
            st.timings["first_step_s"] = t1 - t0
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    end = time.perf_counter()
    # decode_s: the steps after the first (n - 2 of them produce tokens 3..n); 0 when there were none
    st.timings.update(decode_s=end - t1 if n > 2 else 0.0, decode_steps=max(n - 2, 0), new_tokens=n, prompt_tokens=L)
    return np.concatenate([p.ids, out[:, :n]], 1), st.timings

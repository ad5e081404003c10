"""Static-shape and size rules: what a tensor's shape or a process's memory is, for a prompt of n tokens.

Every compiled graph's shape follows from these rules: the cache length (`cache_bucket`), the prompt's padded
length (`prompt_bucket`), the cache extent a prompt attends over (`extent_of`) and its chunk (`prompt_chunk`), so
`prompt_graph` / `decode_graph` name the graphs a call compiles for the compile cache's plan from the same rules
the model runs by. The memory bound (`activation_bytes`, `RUNTIME_BYTES`) and the context-fit rule (`fit`)
live here too. Host-side only (NumPy, ints): the kernel mode is the one device fact they read.
"""
from __future__ import annotations

import numpy as np

from .device import kernel_mode
from .generation_config import GenerationError


def host_array(x, dtype=None):
    """A host (NumPy) copy of a Tensor, array or list; None stays None."""
    if x is None:
        return None
    a = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
    return a.astype(dtype) if dtype is not None else a


def cache_bucket(n: int) -> int:
    """Cache length for n tokens: the next power of two (>= 256), so prompts of different lengths share one
    compiled decode graph (a new cache size costs a compile of ~2.5 s on the 150M CPU benchmark)."""
    return max(256, 1 << (int(n) - 1).bit_length())


LONG_PROMPT = 512   # prompts up to this many tokens run as one chunk (their length bucketed by 64), longer ones in 256-token chunks


def prompt_bucket(n: int) -> int:
    """Prompt length rounded up to a whole number of chunks: a multiple of 64 up to LONG_PROMPT tokens, of 256
    beyond (<= 255 padded slots on a prompt of > 512)."""
    step = 64 if int(n) <= LONG_PROMPT else 256
    return -(-int(n) // step) * step


def extent_of(end: int, max_len: int) -> int:
    """Cache slots a prompt ending at slot `end` attends over: the next power of two (>= 256), within the cache.
    Every chunk of one prompt uses its prompt's extent, so a long prompt compiles one graph, whatever its length."""
    return min(int(max_len), max(256, 1 << (max(int(end), 1) - 1).bit_length()))


SCORES_BUDGET = 256 << 20   # bytes of one (B, heads, chunk, extent) float32 score tensor in a prompt chunk


def live_layers(t) -> int:
    """Layers whose intermediates are alive at once in a compiled prompt graph: on CPU (plain or emulated) the
    graph keeps every layer's (measured: the peak rises ~0.35 GB per layer for a 256-token chunk over 8192
    slots, linear in depth), so the budget is shared by all of them. On Ascend the graph compiler reuses memory
    across layers; assumed one layer's worth there (only hardware can confirm)."""
    return 1 if kernel_mode() == "ascend" else t.num_hidden_layers


def prompt_chunk(t, batch: int, n: int, extent: int | None = None) -> int:
    """Tokens per prompt chunk for a prompt of n (bucketed) tokens attending over `extent` slots (default: the
    power of two >= n): the whole prompt up to LONG_PROMPT tokens, 256 beyond, halved (not below 16) until the
    float32 scores of all live layers (`live_layers`) fit SCORES_BUDGET. So a prompt graph's shape is its length
    bucket (<= 8 of them) or one chunk length per extent: the number of compiled prompt graphs is bounded, whatever
    the prompt length. (64-token chunks for short prompts too were tried: a 320-token prompt took 0.54 s against
    0.36 s in one piece; BENCHMARKS.md.)"""
    e = extent or (1 << (max(n, 1) - 1).bit_length())
    c = n if n <= LONG_PROMPT else 256
    while c > 16 and live_layers(t) * batch * t.num_attention_heads * 4 * e * c > SCORES_BUDGET:
        c = max(16, 1 << ((c - 1).bit_length() - 1)) if c & (c - 1) else c // 2
    return c


def fit(prompt_tokens: int, context: int, max_new: int | None = None, strict: bool = False,
        padded: bool = False) -> int:
    """The one context rule of every face: how many new tokens a prompt of `prompt_tokens` may make in a context
    of `context` tokens. max_new None: all that is left; beyond what is left it is cut to it, or with `strict`
    (the server, as OpenAI's API) refused. `padded`: the prompt fills its bucket's slots (a server row's cache
    holds it left-padded). GenerationError when not even one new token fits."""
    room = int(context) - (prompt_bucket(prompt_tokens) if padded else int(prompt_tokens))
    if room < 1:
        raise GenerationError(f"This model's maximum context length is {context} tokens. However, your prompt has "
                              f"{prompt_tokens} tokens.")
    if max_new is not None and max_new > room and strict:
        raise GenerationError(f"This model's maximum context length is {context} tokens. However, you requested "
                              f"{prompt_tokens + max_new} tokens ({prompt_tokens} in the messages, {max_new} in the "
                              f"completion).")
    return room if max_new is None else min(int(max_new), room)


def prompt_graph(t, batch: int, n: int, slot0: int, max_len: int) -> tuple:
    """(chunk, extent) of the graph a prompt of n tokens written from cache slot `slot0` runs in."""
    extent = extent_of(slot0 + n, max_len)
    return prompt_chunk(t, batch, n, extent), extent


def graph_plan(t, batch: int, n: int, max_len: int, new: int) -> list:
    """The graphs a generate() call compiles, in order, as (batch, tokens, cache, last_only, extent): its prompt's
    chunk graph, then (with more than one new token) the decode graph."""
    chunk, extent = prompt_graph(t, batch, n, 0, max_len)
    return [(batch, chunk, max_len, True, extent)] + ([decode_graph(batch, max_len)] if new > 1 else [])


def decode_graph(batch: int, max_len: int) -> tuple:
    """The decode step's graph: one token per row over the whole cache (the mask bounds it)."""
    return (batch, 1, max_len, True, max_len)


# The process beyond weights, KV cache and activations: Python, MindSpore's libraries, its runtime pools and graph
# compiler. Measured on CPU (peak resident set): 0.62 GB for demo-tiny (0.42 GB at load, tests/test_memory.py),
# 0.98 GB for demo-150m on a 32k-token prompt (0.43 GB at load + 0.55 GB while generating,
# benchmarks/mem_long_prompt.py). A measured allowance, not derived; on Ascend only hardware can confirm it.
RUNTIME_BYTES = int(1.25e9)


def activation_bytes(t, batch: int, n: int, item: int) -> int:
    """Bound on the text decoder's activations for a prompt of up to n tokens: per live layer (`live_layers`), a
    few copies of the float32 scores and the mask over a chunk's extent and the chunk's projections and MLP; plus
    the logits."""
    e = 1 << (max(n, 1) - 1).bit_length()
    c = max(prompt_chunk(t, batch, m, e) for m in {min(n, LONG_PROMPT), n})
    scores = batch * c * e * (4 * t.num_attention_heads * 4 + 5)
    rows = batch * c * (3 * (t.q_size + 2 * t.kv_size) + 4 * t.intermediate_size + 6 * t.hidden_size) * max(item, 4)
    return (scores + rows) * live_layers(t) + batch * t.vocab_size * 4 * 2

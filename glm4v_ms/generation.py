"""Generation: prefill once, then one token at a time over the static KV cache. The one decoding engine.

Small functions in the gpt-fast shape: `prefill` (vision tower + prompt, once), `decode_one` (one compiled
graph per token), `sample` (host-side NumPy: penalties, temperature, top-k, top-p, seeded). Above them:
`Sequence` (one request: its sampling settings and generator, the thinking budget, the stop rules) and `Batch`
(rows of one static cache, each at its own slot and position; `Batch.step` is the only decode loop body in
the package). `generate` (model.generate, generate.py) and the server's engine thread (engine.py) both drive
`Batch.step`: generate() fills every row with one batched prefill, the server admits requests into free rows
one at a time while the others keep decoding. The model knows nothing of tokenizers: the ids of the thinking
tags come from the checkpoint's tokenizer files (read as plain JSON) or from the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor, ops

from . import compile_cache
from .generation_config import GenerationConfig, GenerationError, thinking_force, thinking_ids  # noqa: F401
from .prompt import Prompt
from .sampling import sample
from .shapes import cache_bucket, fit, graph_plan, prompt_bucket
from .text import CachedDecoder


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput, as far as this port goes: sequences (B, prompt + new); ours:
    timings (prefill_s, first_step_s, decode_s, decode_steps, new_tokens, prompt_tokens, reused_tokens)."""
    sequences: np.ndarray
    timings: dict = field(default_factory=dict)

    def __getitem__(self, key):   # out["sequences"] as well as out.sequences, as transformers' ModelOutput
        return getattr(self, key)


@dataclass
class State:
    """What the decode loop carries: the cache, which slots are real, each row's next slot and position."""
    dec: object
    kv_valid: np.ndarray     # (B, S) bool
    slot: np.ndarray         # (B,) next cache slot of each row
    next_pos: np.ndarray     # (B,) next text position, rope delta included
    timings: dict = field(default_factory=dict)
    ids: np.ndarray | None = None     # (B, S) the token id held at each cache slot, -1 where none (for reuse)
    media: list | None = None         # per row: [(start, end, digest)] of each image's tokens among its real ids


def prefill(model, p: Prompt, max_len: int, owner=None, between=None):
    """Run the prompt (vision tower once) into the model's shared cache of max_len slots, claimed for `owner` (a
    PromptCache or None). Returns (last logits (B, V), State). `between()`: called between vision blocks and prompt
    chunks (the serving engine's chunked prefill)."""
    t0 = time.perf_counter()
    h, pos3, mask, deltas, pad = model.prompt(**p.network_inputs(), between=between)
    B, L = mask.shape
    dec = model.decoder(B, max_len, owner)
    kv_valid = np.zeros((B, max_len), bool)
    kv_valid[:, :L] = mask
    ids = np.full((B, max_len), -1, np.int64)
    ids[:, :L] = np.where(mask, np.pad(p.ids, ((0, 0), (pad, 0)), constant_values=-1), -1)
    logits = model.run(dec, h, pos3, 0, kv_valid, last_only=True, between=between)
    logits = logits.asnumpy()[:, -1]   # the host copy also waits for the device
    st = State(dec, kv_valid, np.full(B, L, np.int64), mask.sum(1) + deltas, {"prefill_s": time.perf_counter() - t0},
               ids)
    return logits, st


def decode_one(model, st: State, tokens: np.ndarray) -> np.ndarray:
    """Feed one token per row at that row's next slot; return the next logits (B, V)."""
    B = tokens.shape[0]
    h = model.text.embed(Tensor(tokens.reshape(B, 1).astype(np.int32)))
    st.kv_valid[np.arange(B), st.slot] = True
    if st.ids is not None:
        st.ids[np.arange(B), st.slot] = tokens
    pos3 = np.broadcast_to(st.next_pos[None, :, None], (3, B, 1))
    logits = model.run(st.dec, h, pos3, st.slot, st.kv_valid, last_only=True).asnumpy()[:, -1]
    st.slot = st.slot + 1
    st.next_pos = st.next_pos + 1
    return logits


class PromptCache:
    """`past_key_values` for generate(): keeps the static KV cache of the call that filled it, and the next call
    with the same batch size reuses, row by row, the longest common prefix of token ids (images compared by
    their pixels) with what that cache holds: only the rest of the prompt is run, its images alone through the
    vision tower. The output is that of a run without reuse. Where nothing can be reused (another batch size,
    videos, inputs_embeds, a cache too short for the new turn, or the model's shared cache taken meanwhile by a
    call without this PromptCache), the prompt is prefilled afresh into it."""

    def __init__(self):
        self.st = None
        self.reused = 0     # prompt tokens taken from the cache by the last call (summed over rows)

    def usable(self, B: int) -> bool:
        st = self.st
        return st is not None and st.ids is not None and st.ids.shape[0] == B and getattr(st.dec, "owner", None) is self


def prefill_reusing(model, p: Prompt, cache: PromptCache, new: int, between=None):
    """prefill() that starts from the longest prefix each row shares with `cache`; None where it cannot.

    Row b keeps its first k_b cached tokens (the slots they sit in); the rest of its prompt (s_b tokens) is
    left-padded to one length P for all rows and written at slots [S0, S0 + P), S0 past every kept token: a row's
    slots between its kept tokens and its suffix are masked holes (attention goes by the mask, positions by
    pos3, so holes change nothing). Slots the row held past k_b are dropped from its mask."""
    t0 = time.perf_counter()
    if p.inputs_embeds is not None or p.pixel_values_videos is not None:
        return None
    B, L = p.shape
    if not cache.usable(B):
        return None
    old = cache.st
    keep, tails, kept_slots = [], [], []
    for b in range(B):
        real = p.real(b)
        slots = np.nonzero(old.ids[b] >= 0)[0]
        k = _shared(old.ids[b][slots], real, old.media[b] if old.media is not None else [], p.media[b])
        keep.append(k)
        kept_slots.append(slots[:k])
        tails.append(real[k:])
    S0 = max(int(s[-1]) + 1 if len(s) else 0 for s in kept_slots)
    P = prompt_bucket(max(len(t) for t in tails))
    max_len = old.kv_valid.shape[1]
    if S0 + P + new > max_len:
        return None
    # the suffix's embeddings: its images only through the vision tower
    suffix = np.zeros((B, P), np.int64)
    smask = np.zeros((B, P), bool)
    for b, t in enumerate(tails):
        suffix[b, P - len(t):], smask[b, P - len(t):] = t, True
    pixels, grid = p.images([k for b in range(B) for a, e, d, k in p.media[b] if a >= keep[b]])
    h = model.embed(suffix, pixels, grid, between=between)
    # positions of the whole new prompt (host-side), then each row's suffix part
    pos_full, deltas = model.positions(p.ids, p.mask.astype(np.int64), p.image_grid if len(p.image_grid) else None)
    pos3 = np.zeros((3, B, P), np.int64)
    for b, t in enumerate(tails):
        pos3[:, b, P - len(t):] = pos_full[:, b][:, p.mask[b]][:, keep[b]:]
    kv_valid = np.zeros_like(old.kv_valid)
    cached = np.full_like(old.ids, -1)
    for b in range(B):
        kv_valid[b, kept_slots[b]] = True
        cached[b, kept_slots[b]] = old.ids[b, kept_slots[b]]
    kv_valid[:, S0:S0 + P] = smask
    cached[:, S0:S0 + P] = np.where(smask, suffix, -1)
    logits = model.run(old.dec, h, pos3, S0, kv_valid, last_only=True, between=between).asnumpy()[:, -1]
    cache.reused = int(sum(keep))
    st = State(old.dec, kv_valid, np.full(B, S0 + P, np.int64), p.mask.sum(1) + deltas,
               {"prefill_s": time.perf_counter() - t0, "reused_tokens": cache.reused}, cached, p.media)
    return logits, st


def _shared(held: np.ndarray, real: np.ndarray, held_media: list, media: list) -> int:
    """How many leading ids of a prompt row (`real`, its images `media`) a cache row holding `held` (its images
    `held_media`) can give: the common prefix, at least one token left to run (it gives the next logits), an
    image reused whole and only if it is the same image."""
    n = min(len(held), len(real) - 1)
    diff = np.nonzero(held[:n] != real[:n])[0]
    k = int(diff[0]) if len(diff) else n
    for i, (a, e, digest, _) in enumerate(media):
        if a < k and (i >= len(held_media) or held_media[i][:3] != (a, e, digest) or digest is None or e > k):
            return a
    return k


class Sequence:
    """One request being decoded: its settings and random generator, what it has made, its thinking budget and
    stop rules. `listener(kind, value)` hears ("token", id) per token and ("done", finish_reason) once;
    finish_reason is "stop" (an eos id), "length" (max_new tokens) or "cancelled"."""

    def __init__(self, prompt_ids, cfg: GenerationConfig, max_new: int, force=(), rng=None, listener=None):
        prompt = np.asarray(prompt_ids, np.int64).reshape(-1)
        self.cfg, self.max_new, self.force, self.listener = cfg, int(max_new), list(force), listener
        self.rng = rng if rng is not None else np.random.default_rng(cfg.seed)
        self.n_prompt = len(prompt)
        self.history = np.full((1, len(prompt) + self.max_new), -1, np.int64)
        self.history[0, :len(prompt)] = prompt
        self.tokens = []
        self.eos = set(int(e) for e in cfg.eos_token_id)
        self.thinking, self.closed, self.forced, self.queued = 0, False, False, []
        self.finish_reason = None
        self.cancelled = False      # set from any thread; the decode loop frees the row at its next step

    def cancel(self):
        self.cancelled = True

    def next_token(self, logits: np.ndarray) -> int:
        """Choose the next token from this row's logits (V,); apply the thinking budget and the stop rules."""
        step = len(self.tokens)
        tok = int(sample(logits[None], self.history, step, self.cfg, self.rng)[0])
        if self.queued:   # </think><answer> forced by the thinking budget
            tok = self.queued.pop(0)
        self.tokens.append(tok)
        self.history[0, self.n_prompt + step] = tok
        if self.force:
            self.closed |= tok == self.force[0]
            self.thinking += not self.closed
            if self.thinking >= self.cfg.max_thinking_tokens and not self.closed and not self.forced:
                self.queued, self.forced = list(self.force), True
        self._tell("token", tok)
        if tok in self.eos:
            self.finish("stop")
        elif len(self.tokens) >= self.max_new:
            self.finish("length")
        return tok

    def finish(self, reason):
        if self.finish_reason is None:
            self.finish_reason = reason
            self._tell("done", reason)

    def _tell(self, kind, value):
        if self.listener is not None:
            self.listener(kind, value)


class Batch:
    """Rows of one static KV cache, each with its own slots, positions and Sequence (None: a free row).

    `step` decodes every row at once with the one compiled (B, 1) graph, whatever rows are busy: a free row is
    fed a dummy token at its slot 0 (wasted work, harmless: rows never see each other's slots), as engines pad
    a live batch up to the captured graph's size."""

    def __init__(self, model, st: State, logits: np.ndarray, keep: bool = False):
        """keep: a finished row keeps its cache (parked) for a PromptCache rather than being freed."""
        self.model, self.st, self.keep = model, st, keep
        self.saved, self.last_reused = None, 0
        self.logits = logits                        # (B, V): each row's logits for its next token
        self.seqs = [None] * st.kv_valid.shape[0]

    @classmethod
    def empty(cls, model, rows: int, max_len: int, prefix_reuse: bool = False) -> "Batch":
        """A batch of free rows over its own cache (the server's: it lives as long as the engine).
        prefix_reuse: a freed row remembers what its cache holds, and a new prompt is admitted into the free row
        sharing the longest prefix with it, reusing that part of the cache (prefill_reusing)."""
        dec = CachedDecoder(model.text, model.lm_head.weight, rows, max_len)
        st = State(dec, np.zeros((rows, max_len), bool), np.zeros(rows, np.int64), np.zeros(rows, np.int64),
                   ids=np.full((rows, max_len), -1, np.int64) if prefix_reuse else None,
                   media=[[] for _ in range(rows)] if prefix_reuse else None)
        b = cls(model, st, np.zeros((rows, model.config.text.vocab_size), np.float32))
        b.saved = [None] * rows if prefix_reuse else None   # per free row: (ids (S,), media) its cache holds
        return b

    def shared(self, p: Prompt, row: int) -> int:
        """How many leading prompt ids free row `row`'s remembered cache holds (0 without prefix reuse)."""
        if self.saved is None or self.saved[row] is None:
            return 0
        real = p.real(0)
        held = self.saved[row][0][self.saved[row][0] >= 0][:len(real)]
        diff = np.nonzero(held != real[:len(held)])[0]
        return int(diff[0]) if len(diff) else len(held)

    @property
    def max_len(self) -> int:
        return self.st.kv_valid.shape[1]

    def free_rows(self) -> list:
        return [r for r, s in enumerate(self.seqs) if s is None]

    def active(self) -> bool:
        return any(s is not None and s.finish_reason is None for s in self.seqs)

    def admit(self, row: int, p: Prompt, seq: Sequence, origin: tuple | None = None, between=None):
        """Prefill one prompt (batch 1) into a scratch cache of the same length, then copy it into `row`: the
        other rows' state is untouched, so they keep decoding from where they were. With prefix reuse, the
        prefill starts from the remembered cache of free row `origin` = (batch, row) (default: this row), which
        may belong to another batch over caches of the same length (the engine's row groups). `between()` is
        called between the prefill's pieces (vision blocks, prompt chunks): the engine decodes the busy rows there
        (chunked prefill), so `row` and `origin` must be free rows it leaves alone."""
        assert self.seqs[row] is None
        src, srow = origin if origin is not None else (self, row)
        got = None
        if src.saved is not None and src.saved[srow] is not None:
            assert src.seqs[srow] is None and src.max_len == self.max_len
            # the row's remembered cache into the batch-1 scratch cache, then only the rest of the prompt runs
            pc = PromptCache()
            dec = self.model.decoder(1, self.max_len, pc)
            for a, dst in zip((*src.st.dec.k, *src.st.dec.v), (*dec.k, *dec.v)):
                ops.assign(dst, a[srow:srow + 1])
            held, media, _ = src.saved[srow]
            pc.st = State(dec, (held >= 0)[None], np.zeros(1, np.int64), np.zeros(1, np.int64), ids=held[None],
                          media=[media])
            got = prefill_reusing(self.model, p, pc, seq.max_new, between)
        logits, one = got if got is not None else prefill(self.model, p, self.max_len, between=between)
        for a, dst in zip((*one.dec.k, *one.dec.v), (*self.st.dec.k, *self.st.dec.v)):
            ops.scatter_nd_update(dst, Tensor(np.array([[row]], np.int32)), a)
        if self.st.ids is not None:
            self.st.ids[row] = one.ids[0] if one.ids is not None else -1
            self.st.media[row] = one.media[0] if one.media is not None else p.media[0]
        self.last_reused = one.timings.get("reused_tokens", 0)
        self.st.kv_valid[row] = one.kv_valid[0]
        self.st.slot[row], self.st.next_pos[row] = one.slot[0], one.next_pos[0]
        self.logits[row] = logits[0]
        self.seqs[row] = seq
        return one.timings["prefill_s"]

    def move(self, rows, other: "Batch", to):
        """Hand busy rows `rows` (their cache rows, slots, positions, next logits and Sequences) to free rows `to`
        of another batch over caches of the same length (ints or equal-length lists); `rows` are free afterwards
        and remember what their caches hold. One gather and one scatter per cache tensor, whatever the count."""
        rows, to = np.atleast_1d(rows).astype(np.int64), np.atleast_1d(to).astype(np.int64)
        assert len(rows) == len(to) and other.max_len == self.max_len and all(other.seqs[t] is None for t in to)
        src, idx = Tensor(rows.astype(np.int32)), Tensor(to.astype(np.int32)[:, None])
        for a, dst in zip((*self.st.dec.k, *self.st.dec.v), (*other.st.dec.k, *other.st.dec.v)):
            ops.scatter_nd_update(dst, idx, ops.gather(a, src, 0))
        for r, t in zip(rows, to):
            other.st.kv_valid[t] = self.st.kv_valid[r]
            other.st.slot[t], other.st.next_pos[t] = self.st.slot[r], self.st.next_pos[r]
            other.logits[t] = self.logits[r]
            other.seqs[t] = self.seqs[r]
            if other.st.ids is not None:   # what the cache row holds travels with it (prefix reuse)
                assert self.st.ids is not None, "both batches must remember their rows, or neither"
                other.st.ids[t], other.st.media[t] = self.st.ids[r], self.st.media[r]
            self._free(r)

    def warmup(self):
        """One decode step of dummy tokens in every (free) row, leaving the rows as they were: compiles this
        cache's decode graph before any request needs it."""
        assert not any(s is not None for s in self.seqs), "warm up a batch of free rows only"
        for r in range(len(self.seqs)):
            self._free(r)
        self.logits = decode_one(self.model, self.st, np.zeros(len(self.seqs), np.int64))
        for r in range(len(self.seqs)):
            self._free(r)

    def _free(self, row):
        if self.saved is not None:
            if self.seqs[row] is not None:   # a request ends: remember what the row's cache holds
                held = self.st.ids[row].copy()
                held[-1] = -1                # the slot free rows decode their dummy into
                self.saved[row] = (held, self.st.media[row], time.monotonic())   # when: the oldest goes first
            self.st.ids[row] = -1
        self.seqs[row] = None
        self.st.kv_valid[row] = False
        # a free row decodes a dummy at slot 0, or at the last slot where rows remember their cache (rarely used)
        self.st.slot[row] = self.max_len - 1 if self.saved is not None else 0
        self.st.next_pos[row] = 0

    def step(self) -> np.ndarray:
        """Each busy row picks its next token from its logits (its own sampler and stop rules); finished and
        cancelled rows are freed at once; then one decode step for all rows. Returns the tokens (B,), -1 for
        rows that made none."""
        tok = np.full(len(self.seqs), -1, np.int64)
        for r, seq in enumerate(self.seqs):
            if seq is None or seq.finish_reason is not None:   # free, or parked (keep)
                continue
            if seq.cancelled:
                seq.finish("cancelled")
            else:
                tok[r] = seq.next_token(self.logits[r])
            if seq.finish_reason is not None and not self.keep:
                self._free(r)
        if self.active():
            for r in self.free_rows():   # a free row decodes a dummy at its slot 0 (or last slot)
                self._free(r)
            parked = [r for r, s in enumerate(self.seqs) if s is not None and s.finish_reason is not None]
            self.logits = decode_one(self.model, self.st, np.maximum(tok, 0))
            for r in parked:   # its dummy went to its next unused slot: forget it, the row's cache stays as it was
                s = self.st.slot[r] - 1
                self.st.kv_valid[r, s] = False
                if self.st.ids is not None:
                    self.st.ids[r, s] = -1
                self.st.slot[r], self.st.next_pos[r] = s, self.st.next_pos[r] - 1
        return tok


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

    got = prefill_reusing(model, p, cache, new) if cache is not None else None
    if got is None:
        plan_compiles(model, B, prompt_bucket(L), max_len, new)
        logits, st = prefill(model, p, max_len, owner=cache)
        if cache is not None:
            cache.reused, st.media, st.timings["reused_tokens"] = 0, p.media, 0
    else:
        logits, st = got
    if cache is not None:
        cache.st = st
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

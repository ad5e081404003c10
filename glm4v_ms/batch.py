"""Rows of one static KV cache: `Sequence` (one request: its sampling settings and generator, the thinking budget,
the stop rules) and `Batch` (each row at its own slot and position; `Batch.step` is the only decode loop body in
the package). generate() fills every row with one batched prefill; the server's engine admits requests into free
rows one at a time while the others keep decoding, and moves rows between caches.
"""
from __future__ import annotations

import time

import numpy as np
from mindspore import Tensor, ops

from .generation_config import GenerationConfig
from .prompt import Prompt
from .reuse import PromptCache, prefill_reusing
from .sampling import sample
from .steps import State, decode_one, prefill
from .text import CachedDecoder


def select(model, slots):
    """Row b of the next device step takes the adapter in slot slots[b] (multi_lora.Bank; nothing without one)."""
    bank = getattr(model, "adapter_bank", None)
    if bank is not None:
        bank.select(slots)


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
        self.adapter = 0            # the server's adapter for this row (multi_lora.Adapter.uid: 0 is the base)
        self.slot = 0               # the bank's slot holding it (multi_lora.Bank.slot_for), 0 the base
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
        # per free row: (ids (S,), media, when, adapter) of what its cache holds
        b.saved = [None] * rows if prefix_reuse else None
        return b

    def shared(self, p: Prompt, row: int, adapter: int = 0) -> int:
        """How many leading prompt ids free row `row`'s remembered cache holds (0 without prefix reuse, or where
        it was computed under another adapter: its keys and values are that adapter's)."""
        if self.saved is None or self.saved[row] is None or self.saved[row][3] != adapter:
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
        select(self.model, [seq.slot])   # the batch-1 prefill's row 0
        if between is not None:   # the busy rows' steps in between select theirs: this prompt's again after them
            def between(run=between):
                run()
                select(self.model, [seq.slot])
        if src.saved is not None and src.saved[srow] is not None and src.saved[srow][3] == seq.adapter:
            assert src.seqs[srow] is None and src.max_len == self.max_len
            # the row's remembered cache into the batch-1 scratch cache, then only the rest of the prompt runs
            pc = PromptCache()
            dec = self.model.decoder(1, self.max_len, pc)
            for a, dst in zip((*src.st.dec.k, *src.st.dec.v), (*dec.k, *dec.v)):
                ops.assign(dst, a[srow:srow + 1])
            held, media = src.saved[srow][:2]
            pc.hold(State(dec, (held >= 0)[None], np.zeros(1, np.int64), np.zeros(1, np.int64), ids=held[None],
                          media=[media]), self.model)
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
        select(self.model, np.zeros(len(self.seqs)))
        self.logits = decode_one(self.model, self.st, np.zeros(len(self.seqs), np.int64))
        for r in range(len(self.seqs)):
            self._free(r)

    def _free(self, row):
        if self.saved is not None:
            if self.seqs[row] is not None:   # a request ends: remember what the row's cache holds
                held = self.st.ids[row].copy()
                held[-1] = -1                # the slot free rows decode their dummy into
                # when: the oldest goes first; the adapter: reused for that adapter's requests only
                self.saved[row] = (held, self.st.media[row], time.monotonic(), self.seqs[row].adapter)
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
            select(self.model, [0 if s is None else s.slot for s in self.seqs])   # each row its own adapter
            self.logits = decode_one(self.model, self.st, np.maximum(tok, 0))
            for r in parked:   # its dummy went to its next unused slot: forget it, the row's cache stays as it was
                s = self.st.slot[r] - 1
                self.st.kv_valid[r, s] = False
                if self.st.ids is not None:
                    self.st.ids[r, s] = -1
                self.st.slot[r], self.st.next_pos[r] = s, self.st.next_pos[r] - 1
        return tok

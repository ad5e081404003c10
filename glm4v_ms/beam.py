"""Beam search over the static KV cache, with the reference's rules (transformers' vectorised beam search).

Per prompt, `num_beams` running beams; each step keeps the best K = max(2, 1 + number of eos ids) * num_beams
continuations of all beams by accumulated log-probability, moves the ones that end (an eos id, or the last
allowed token) into the finished set scored by sum / generated_length ** length_penalty, and continues the best
num_beams unfinished ones. early_stopping: True stops a prompt once num_beams beams have finished; False stops
when the best running beam, scored at its current length, cannot beat the worst finished one; "never" the same,
at the longest possible length when length_penalty > 0.

Host side (NumPy, float32 like the reference): scores, candidates, bookkeeping. Device side: the prompt runs once
per prompt (not once per beam) and its cache rows are copied to the beams; after each step the cache rows are
gathered from the beams' parents.

Deviations: beam sampling (do_sample with num_beams > 1), the thinking budget and streaming are refused by name;
the repetition penalty sees the prompt's real tokens only (as greedy decoding here does), not its padding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, ops

from .outputs import GenerateOutput
from .generation_config import GenerationError
from .prompt import Prompt
from .batch import select
from .sampling import process_logits
from .shapes import cache_bucket, fit, prompt_bucket
from .steps import State, decode_one, prefill

NEG = np.float32(-1.0e9)   # the reference's "never pick this" offset, in float32 as it adds it


@dataclass
class BeamOutput(GenerateOutput):
    """transformers' GenerateBeamDecoderOnlyOutput: sequences (B * num_return_sequences, prompt + new); with
    output_scores, sequences_scores (B * n,) and scores: one (B * num_beams, vocab) array of processed
    log-probabilities per step; beam_indices (B * n, new): the flat beam each token came from."""
    sequences_scores: np.ndarray | None = None
    scores: tuple | None = None
    beam_indices: np.ndarray | None = None


def check(cfg, num_beams, num_return_sequences, length_penalty, early_stopping, streamer):
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise GenerationError(f"num_beams must be a positive integer, got {num_beams!r}")
    if num_return_sequences > num_beams:
        raise GenerationError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    if early_stopping not in (True, False, "never"):
        raise GenerationError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if cfg.do_sample:
        raise GenerationError("beam sampling (do_sample with num_beams > 1) is not supported: pass do_sample=False")
    if cfg.max_thinking_tokens is not None:
        raise GenerationError("max_thinking_tokens is not supported with num_beams > 1")
    if streamer is not None:
        raise GenerationError("a streamer cannot follow beam search (the beams change until the end)")
    float(length_penalty)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _top(x, k):
    """Indices of the k largest along the last axis, largest first (ties: the lower index first)."""
    return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def _take(a, idx):
    """a (B, N, ...) gathered along axis 1 by idx (B, M)."""
    return a[np.arange(a.shape[0])[:, None], idx]


def _expand_cache(model, st: State, num_beams: int) -> State:
    """The prompt's cache (B rows) copied into a cache of B * num_beams rows, each prompt's row per beam."""
    B = st.kv_valid.shape[0]
    dec = model.decoder(B * num_beams, st.dec.max_len)
    for src, dst in zip(tuple(st.dec.k) + tuple(st.dec.v), tuple(dec.k) + tuple(dec.v)):
        ops.assign(dst, ops.repeat_interleave(src, num_beams, 0))
    slot = np.repeat(np.broadcast_to(np.asarray(st.slot), (B,)), num_beams, 0)   # each row's next slot, per beam
    return State(dec, np.repeat(st.kv_valid, num_beams, 0), slot, np.repeat(st.next_pos, num_beams, 0),
                 st.timings)


def _reorder_cache(st: State, rows: np.ndarray):
    if np.array_equal(rows, np.arange(len(rows))):
        return
    idx = Tensor(rows.astype(np.int32))
    for p in tuple(st.dec.k) + tuple(st.dec.v):
        ops.assign(p, ops.gather(p, idx, 0))
    st.kv_valid = st.kv_valid[rows]
    st.slot = np.asarray(st.slot)[rows]
    st.next_pos = st.next_pos[rows]


def generate(model, p: Prompt, cfg, num_beams: int, num_return_sequences: int = 1, length_penalty: float = 1.0,
             early_stopping=False, output_scores: bool = False):
    """Beam search; returns what transformers' generate returns: the best num_return_sequences sequences per
    prompt (B * n, prompt + new) as numpy int64 in a BeamOutput (its scores with output_scores)."""
    ids = p.ids
    B, L = p.shape
    nb, V = num_beams, model.config.text.vocab_size
    new = fit(L, model.config.text.max_position_embeddings, cfg.max_new_tokens)
    eos = list(cfg.eos_token_id or [])
    fill = (cfg.pad_token_id or eos[0]) if eos else -1        # the reference's filler after a sequence ends
    K = max(2, 1 + len(eos)) * nb
    top_mask = np.arange(K) < nb

    t0 = time.perf_counter()
    select(model, ())   # a model serving several adapters (multi_lora): beam search runs the base, as generate()
    logits, st = prefill(model, p, cache_bucket(prompt_bucket(L) + new))
    st = _expand_cache(model, st, nb)
    logits = np.repeat(logits, nb, 0)
    prompt_hist = np.repeat(np.where(p.mask, ids, -1), nb, 0)                        # (B*nb, L)

    run_seq = np.full((B, nb, new), fill, np.int64)        # generated tokens of the running beams
    run_src = np.full((B, nb, new), -1, np.int64)          # the flat beam each token came from
    run_score = np.zeros((B, nb), np.float32)
    run_score[:, 1:] = NEG                                 # all beams start equal: only the first one expands
    seq, src = run_seq.copy(), run_src.copy()              # the finished set
    seq_len = np.zeros((B, nb), np.int64)
    fin_score = np.full((B, nb), NEG, np.float32)
    finished = np.zeros((B, nb), bool)
    can_improve = np.ones((B, 1), bool)
    all_scores = []
    offset = (np.arange(B) * nb)[:, None]
    for step in range(new):
        hist = np.concatenate([prompt_hist, run_seq[:, :, :step].reshape(B * nb, step)], 1)
        lp = process_logits(_log_softmax(logits.astype(np.float32)), hist, step, cfg)
        if output_scores:
            all_scores.append(lp.copy())
        acc = (lp.reshape(B, nb, V) + run_score[:, :, None]).reshape(B, nb * V)
        top = _top(acc, K)
        top_lp = np.take_along_axis(acc, top, 1)
        parent, tok = top // V, top % V
        cand_seq, cand_src = _take(run_seq, parent), _take(run_src, parent)
        cand_seq[:, :, step] = tok
        cand_src[:, :, step] = parent + offset
        hits = np.isin(tok, eos) | (step + 1 >= new)

        # the best num_beams candidates that did not end run on
        keep_lp = top_lp + hits.astype(np.float32) * NEG
        nxt = _top(keep_lp, nb)
        run_seq, run_src, run_score = _take(cand_seq, nxt), _take(cand_src, nxt), _take(keep_lp, nxt)

        # the ones among the top num_beams that ended join the finished set if they beat its worst
        ended = hits & top_mask[None]
        score = top_lp / np.float32((step + 1) ** length_penalty)
        score = score + (finished.all(-1, keepdims=True) & (early_stopping is True)).astype(np.float32) * NEG
        score = score + (~can_improve).astype(np.float32) * NEG
        score = score + (~ended).astype(np.float32) * NEG
        m_score = np.concatenate([fin_score, score], 1)
        best = _top(m_score, nb)
        seq = _take(np.concatenate([seq, cand_seq], 1), best)
        src = _take(np.concatenate([src, cand_src], 1), best)
        seq_len = _take(np.concatenate([seq_len, np.full((B, K), step + 1)], 1), best)
        finished = _take(np.concatenate([finished, ended], 1), best)
        fin_score = _take(m_score, best)

        # can a running beam still beat the worst finished one?
        best_len = new if (early_stopping == "never" and length_penalty > 0.0) else step + 1
        best_running = run_score[:, :1] / np.float32(best_len ** length_penalty)
        worst = np.where(finished, fin_score.min(1, keepdims=True), NEG)
        can_improve = can_improve & (best_running > worst).any(-1, keepdims=True)
        if not (can_improve.any() and not (finished.all() and early_stopping is True) and not hits.all()):
            break
        _reorder_cache(st, (run_src[:, :, step]).reshape(-1))
        logits = decode_one(model, st, run_seq[:, :, step].reshape(-1))

    n = num_return_sequences
    out_len = int(seq_len[:, :n].max())
    gen = seq[:, :n, :out_len].reshape(B * n, out_len)
    sequences = np.concatenate([np.repeat(ids, n, 0), gen], 1)
    st.timings.update(decode_s=time.perf_counter() - t0 - st.timings["prefill_s"], decode_steps=step,
                      new_tokens=out_len, prompt_tokens=L)
    return BeamOutput(sequences=sequences, timings=st.timings,
                      sequences_scores=fin_score[:, :n].reshape(-1) if output_scores else None,
                      scores=tuple(all_scores) if output_scores else None,
                      beam_indices=src[:, :n, :out_len].reshape(B * n, out_len))

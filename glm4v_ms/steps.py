"""The two device steps of decoding, in the gpt-fast shape: `prefill` (the vision tower and the prompt, once, into
a static cache) and `decode_one` (one token per row, one compiled graph for every token), and the `State` the
decode loop carries between them. The network they run is handed in (model.py's), never imported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor

from .prompt import Prompt


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

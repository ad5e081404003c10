"""Prefix reuse: a `PromptCache` keeps the static KV cache of the call that filled it, and `prefill_reusing` runs
only the part of the next prompt that differs from what it holds (a chat's next turn skips its history and its
images), row by row, with the output of a run without reuse.
"""
from __future__ import annotations

import time

import numpy as np

from .prompt import Prompt
from .shapes import prompt_bucket
from .steps import State


class PromptCache:
    """`past_key_values` for generate(): keeps the static KV cache of the call that filled it, and the next call
    with the same batch size reuses, row by row, the longest common prefix of token ids (images compared by
    their pixels) with what that cache holds: only the rest of the prompt is run, its images alone through the
    vision tower. The output is that of a run without reuse. Where nothing can be reused (another batch size,
    videos, inputs_embeds, a cache too short for the new turn, or the model's shared cache taken meanwhile by a
    call without this PromptCache, or another adapter loaded since: model.load_adapter), the prompt is prefilled
    afresh into it."""

    def __init__(self):
        self.st = None
        self.key = None     # adapter_key of the model that filled it
        self.reused = 0     # prompt tokens taken from the cache by the last call (summed over rows)

    def hold(self, st, model):
        self.st, self.key = st, adapter_key(model)

    def usable(self, B: int, model=None) -> bool:
        st = self.st
        return (st is not None and st.ids is not None and st.ids.shape[0] == B and
                getattr(st.dec, "owner", None) is self and (model is None or self.key == adapter_key(model)))


def adapter_key(model):
    """The adapters the model's linears hold (load_adapter changes the digest, LoRA cells and multi_lora's bank
    are new objects): keys and values cached under others are not this model's."""
    bank = getattr(model, "adapter_bank", None)
    return (getattr(model, "config_digest", None), tuple(id(x) for x in getattr(model, "loras", None) or ()),
            None if bank is None else id(bank))


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
    if not cache.usable(B, model):
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

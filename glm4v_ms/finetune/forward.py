"""The training forward: the same decoder layers as inference, taken the other way through (no KV cache: each
layer attends over the step's own keys and values under a causal + padding mask), and the loss.

Host side (NumPy, as for inference): embeddings with the frozen vision tower's features written in (computed
without gradient), M-RoPE positions from the attention mask (model.positions), the mask, and the rows that
predict a trained token. Device side: the decoder, the final norm, the head over those rows only, and the sum of
their cross-entropies. The loss is that sum over the step's trained tokens (transformers' Trainer:
num_items_in_batch, over every micro-batch of gradient accumulation), so the caller divides.

Shapes are bucketed (length to a multiple of 64, trained rows likewise) so that a compiled training step is
reused across batches: padded positions are masked keys with no label, padded rows have weight 0.

With LoRA on visual.merger (freeze_multi_modal_projector false) the tower still runs on the host without gradient,
up to the merger's input, one row per media token; the device side runs the merger over those rows, padded to the
full path's bucket (patch_bucket), and puts its output in place of the media tokens' embeddings by the same
per-token row index (`src`, below), so the media token count is no graph shape. Without LoRA on the merger the
host's features are written into the embeddings, whose shape is the bucketed length alone.

Full and freeze fine-tuning (full.py: model.trained_names) take the token ids instead: the embedding lookup runs in
the graph (the embedding may train). When a tensor of the tower trains, the whole tower runs in the graph too
(vision.VisionModel.features_padded: images, then video frames, in one call, their features taken by the image
tokens, then the video tokens), so its gradients and the ones flowing back through frozen
blocks to a trained position table are the reference's; otherwise its features come from the host, without
gradient. Its graph takes the image layout as data (vision.VisionModel.padded_inputs: per-patch segment ids,
rotary tables, rows of the position table's cubic matrices) over a patch count padded to patch_bucket, the padding
rows a segment of their own whose features no token reads: one graph per bucket, not per layout. The media
features reach their tokens by a per-token row index (`src`) over feature rows padded likewise, so the media token
count is no graph shape either.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .. import rope
from ..attention import rms_norm, training_mask

IGNORE = -100
_mm_nt = ops.MatMul(transpose_b=True)


def bucket(n: int, step: int = 64) -> int:
    return max(step, -(-int(n) // step) * step)


def patch_bucket(n: int, merge: int = 4) -> int:
    """The vision tower's patch count in the training graph, padded up. The text length's rule (a multiple of 64)
    up to 1023 patches; past that 8 sizes per doubling (the step is the power of two at or below n, over 8). Why:
    the text length is capped by cutoff_len, so a fixed step gives a bounded number of graphs (2048 / 64 = 32),
    but a batch's patch count spans orders of magnitude (a few hundred for a small picture, tens of thousands for
    several large ones at 9B), and the padded tower attends over every pair of its rows (attention.
    vision_attention_masked): a fixed step would compile hundreds of graphs, a relative one keeps the padding
    under 1/8 of the count (under ~27% more attention work) with 8 graphs per doubling. A multiple of `merge` (the
    spatial merge block, 4 patches), so the padding rows merge among themselves."""
    n = int(n)
    step = max(64, 1 << max(0, n.bit_length() - 4))
    step = step * merge // np.gcd(step, merge)
    return max(step, -(-n // step) * step)


@dataclass
class Step:
    h: Tensor          # (B, L, D) input embeddings (vision features written in)
    cos: Tensor        # (B, L, R)
    sin: Tensor
    seen: Tensor       # (B, L, L) bool: causal and key padding
    rows: Tensor       # (n,) int32: flat positions b * L + t whose next token is trained
    targets: Tensor    # (n,) int32: that next token
    weight: Tensor     # (n,) float32: 1, or 0 for bucket padding
    tokens: int        # trained tokens (the real rows)
    length: int        # real (unbucketed) length
    ids: Tensor = None  # full / freeze: (B, L) int32 token ids (h is None): the embedding runs in the graph
    src: Tensor = None  # full / freeze / LoRA on the merger, with media: (B * L,) int32, each token's row of
    #                     `feats` (or of the tower's features), -1 for none
    feats: Tensor = None  # full / freeze, tower untrained: the media features from the host; LoRA on the merger:
    #                       the merger's input rows (rows padded to the bucket)
    tower: tuple = None   # full / freeze, tower trained: (pixels, cos, sin, seg, ph, pw) (padded_inputs)


def prepare(model, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, pad_to_bucket: bool = True) -> Step:
    ids = np.asarray(input_ids, np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    B, L = ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool).reshape(B, L)
    lab = np.full((B, L), IGNORE, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(B, L)
    media = pixel_values is not None or pixel_values_videos is not None
    if getattr(model, "trained_names", None):
        return _prepare_full(model, ids, mask, lab, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                             pad_to_bucket)
    merger = media and trains_merger(model)
    embed = _embed_before_merger(model) if merger else model.embed
    h = embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    pos3, _ = model.positions(ids, mask, image_grid_thw, video_grid_thw)
    Lb = bucket(L) if pad_to_bucket else L
    if Lb > L:   # right padding: masked keys, no labels (_rows pads the rest)
        h = ops.cat([h, ops.zeros((B, Lb - L, h.shape[-1]), h.dtype)], 1)
    cos, sin, seen, rows, targets, weight, n = _rows(model, ids, mask, lab, pos3, Lb, pad_to_bucket)
    st = Step(h, cos, sin, seen, rows, targets, weight, n, L)
    if merger:   # the merger's input rows, read off the media tokens' rows in token order, padded to the bucket
        c = model.config
        types = rope.token_types(ids, c.image_token_id, c.video_start_token_id, c.video_end_token_id)
        b, t = np.nonzero((types == rope.IMAGE) | (types == rope.VIDEO))
        vis = b * Lb + t
        st.src, count = _media_rows(vis, B * Lb, c.vision.spatial_merge_size ** 2, pad_to_bucket)
        st.feats = _pad_rows(ops.gather(h.reshape(B * Lb, -1), Tensor(vis.astype(np.int32)), 0), count)
    return st


def _rows(model, ids, mask, lab, pos3, Lb, pad_to_bucket):
    """The padded mask, rotary tables, causal + padding mask and trained rows for a (B, L) batch bucketed to Lb."""
    B, L = ids.shape
    if Lb > L:   # right padding: masked keys, no labels
        pos3 = np.pad(pos3, ((0, 0), (0, 0), (0, Lb - L)))
        mask = np.pad(mask, ((0, 0), (0, Lb - L)))
        lab = np.pad(lab, ((0, 0), (0, Lb - L)), constant_values=IGNORE)
    t = model.config.text
    cos, sin = rope.text_cos_sin(pos3, t.rotary_dim, t.rope_theta, t.mrope_section)
    seen = np.tril(np.ones((Lb, Lb), bool))[None] & mask[:, None, :]
    nxt = np.concatenate([lab[:, 1:], np.full((B, 1), IGNORE)], 1)   # position t predicts token t + 1
    b, s = np.nonzero(nxt != IGNORE)
    n = len(b)
    nb = bucket(n, 16) if pad_to_bucket else n
    rows = np.zeros(nb, np.int32)
    rows[:n] = b * Lb + s
    targets = np.zeros(nb, np.int32)
    targets[:n] = nxt[b, s]
    weight = np.zeros(nb, np.float32)
    weight[:n] = 1
    return Tensor(cos), Tensor(sin), Tensor(seen), Tensor(rows), Tensor(targets), Tensor(weight), n


def trains_tower(model) -> bool:
    return any(n.startswith("visual.") for n in getattr(model, "trained_names", ()))


def _prepare_full(model, ids, mask, lab, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                  pad_to_bucket):
    B, L = ids.shape
    c = model.config
    pos3, _ = model.positions(ids, mask, image_grid_thw, video_grid_thw)
    Lb = bucket(L) if pad_to_bucket else L
    cos, sin, seen, rows, targets, weight, n = _rows(model, ids, mask, lab, pos3, Lb, pad_to_bucket)
    types = rope.token_types(ids, c.image_token_id, c.video_start_token_id, c.video_end_token_id)
    pixels, grids, where = [], [], []
    for kind, px, grid, split in ((rope.IMAGE, pixel_values, image_grid_thw,
                                   lambda g: np.asarray(g, np.int64).reshape(-1, 3)),
                                  (rope.VIDEO, pixel_values_videos, video_grid_thw, rope.split_video_grids)):
        b, t = np.nonzero(types == kind)
        if px is None:
            if len(b):
                raise ValueError(f"input_ids hold {len(b)} media tokens but no pixel values were given")
            continue
        pixels.append(np.asarray(px, np.float32))
        grids.append(split(grid))
        where.append(b * Lb + t)
    padded = np.zeros((B, Lb), np.int32)
    padded[:, :L] = ids
    st = Step(None, cos, sin, seen, rows, targets, weight, n, L, ids=Tensor(padded))
    if not pixels:
        return st
    px, grid, vis = np.concatenate(pixels), np.concatenate(grids), np.concatenate(where)
    merge = c.vision.spatial_merge_size ** 2
    if px.shape[0] != merge * len(vis):
        raise ValueError(f"media features and media tokens do not match: {px.shape[0] // merge} features, "
                         f"{len(vis)} tokens")
    st.src, count = _media_rows(vis, B * Lb, merge, pad_to_bucket)   # feature rows: images, then video frames
    if trains_tower(model):
        total = merge * count
        padded = np.zeros((total, px.shape[1]), np.float32)
        padded[:len(px)] = px
        st.tower = (Tensor(padded),) + model.visual.padded_inputs(grid, total)
    else:
        st.feats = _pad_rows(model.visual(Tensor(px), grid), count)
    return st


def _media_rows(vis, size: int, merge: int, pad_to_bucket: bool):
    """The per-token row index over the media feature rows (feature row k is token vis[k]'s; -1: no media) and
    the row count the graph takes: the media tokens' patches padded to patch_bucket, over the merge block, the
    padding rows read by no token (so their gradient is exactly zero)."""
    src = np.full(size, -1, np.int32)
    src[vis] = np.arange(len(vis), dtype=np.int32)
    return Tensor(src), patch_bucket(merge * len(vis), merge) // merge if pad_to_bucket else len(vis)


def _pad_rows(x, count: int):
    return ops.cat([x, ops.zeros((count - x.shape[0], x.shape[1]), x.dtype)], 0) if count > x.shape[0] else x


def embed_ids(model, ids, src=None, feats=None):
    """The embedding lookup in the graph, the media features put in place of their tokens' embeddings."""
    h = ops.gather(model.text.embed.weight, ids.reshape(-1), 0).reshape(ids.shape[0], ids.shape[1], -1)
    return h if src is None else place_media(h, src, feats)


def place_media(h, src, feats):
    """(B, L, D) embeddings with token t's row replaced by feature row src[t] where src[t] >= 0 (no gradient
    reaches the replaced rows, as in the reference's masked_scatter; feature rows no token names, the bucket's
    padding, get none)."""
    flat = h.reshape(-1, h.shape[-1])
    media = (src >= 0).reshape(-1, 1)
    return ops.where(media, ops.gather(feats, ops.maximum(src, 0), 0).astype(h.dtype), flat).reshape(h.shape)


def trains_merger(model) -> bool:
    return any(lo.site.ours.startswith("visual.merger.") for lo in getattr(model, "loras", []))


class _MergerInput(ms.nn.Cell):
    def construct(self, x):
        return x


def _embed_before_merger(model):
    """model.embed with the tower stopped before the merger (its input is out_hidden_size wide, as its output):
    the media tokens' rows hold the merger's input."""
    def embed(*media):
        merger = model.visual.merger
        model.visual.merger = _MergerInput()
        try:
            return model.embed(*media)
        finally:
            model.visual.merger = merger
    return embed


def hidden(model, h, cos, sin, seen):
    """The decoder without a cache, then the final norm: (B, L, D)."""
    text = model.text
    cos, sin = cos.astype(h.dtype), sin.astype(h.dtype)
    L = h.shape[1]
    mask = training_mask(seen)   # once for every layer
    for layer in text.layers:
        h = layer(h, cos, sin, mask, None, None, None, None, L)
    return rms_norm(h, text.norm.weight, text.cfg.rms_norm_eps)


def merge_media(merger, h, src, pre):
    """The merger's input rows `pre` (padded) through visual.merger, put in place of the media tokens' embeddings.
    `merger` is passed as itself: a graph that reaches it through model.visual parses the whole tower's construct."""
    return place_media(h, src, merger(pre))


def loss_sum(model, h, cos, sin, seen, rows, targets, weight, head=None):
    """Sum of the cross-entropies of the trained rows (float32), the head run over those rows only. `head`: a
    VocabParallelHead under tensor parallel (each rank holds a slice of lm_head's rows)."""
    x = hidden(model, h, cos, sin, seen)
    x = ops.gather(x.reshape(-1, x.shape[-1]), rows, 0)
    if head is not None:
        return head(x, model.lm_head.weight, targets, weight)
    return ce_sum(_mm_nt(x, model.lm_head.weight), targets, weight)   # the head in the model's dtype, as the reference


def ce_sum(logits, targets, weight):
    logits = logits.astype(ms.float32)
    lse = ops.logsumexp(logits, -1)
    picked = ops.gather_elements(logits, 1, targets.reshape(-1, 1).astype(ms.int64)).reshape(-1)
    return ((lse - picked) * weight).sum()


class VocabParallelHead(ms.nn.Cell):
    """The cross-entropy over a vocab-parallel head without gathering the logits (Megatron's vocab-parallel
    cross-entropy, on the collectives MindSpore's CPU backend has): each rank's log-sum-exp over its own vocab
    slice is all-gathered (n floats per rank) and combined; the target's logit comes from the rank holding it, summed.
    Every rank ends with the same loss; the backward gives each rank its slice's share."""

    def __init__(self, lay):
        super().__init__()
        from ..parallel import all_reduce, gather_rows, to_ranks
        self.enter, self.gather, self.sum = to_ranks(lay), gather_rows(lay), all_reduce(lay)
        self.lay = lay

    def construct(self, x, w, targets, weight):
        n = w.shape[0]
        v0 = self.lay.rank * n
        logits = _mm_nt(self.enter(x), w).astype(ms.float32)                     # (rows, V / world)
        lse = ops.logsumexp(self.gather(ops.logsumexp(logits, -1)[None]), 0)      # (rows,)
        local = targets - v0
        mine = (local >= 0) & (local < n)
        idx = ops.where(mine, local, ops.zeros_like(local)).reshape(-1, 1).astype(ms.int64)
        picked = self.sum(ops.gather_elements(logits, 1, idx).reshape(-1) * mine.astype(ms.float32))
        return ((lse - picked) * weight).sum()


def forward_with_loss(model, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None,
                      pixel_values_videos=None, video_grid_thw=None):
    """`model(**inputs, labels=labels)`: logits of every position and the mean cross-entropy over the shifted
    trained tokens (transformers' ForCausalLMLoss), through the training path."""
    from ..outputs import Output
    st = prepare(model, input_ids, attention_mask, labels, pixel_values, image_grid_thw, pixel_values_videos,
                 video_grid_thw, pad_to_bucket=False)
    h = st.h
    if h is None:   # full / freeze: the ids and media as the training graph takes them
        feats = st.feats if st.tower is None else model.visual.features_padded(*st.tower)
        h = embed_ids(model, st.ids, st.src, feats)
    elif st.src is not None:   # LoRA on the merger
        h = merge_media(model.visual.merger, h, st.src, st.feats)
    x = hidden(model, h, st.cos, st.sin, st.seen)
    logits = _mm_nt(x.reshape(-1, x.shape[-1]), model.lm_head.weight).reshape(x.shape[:2] + (-1,))
    logits = model.text.gather_logits(logits)   # tensor parallel: each rank's vocab slice -> the whole vocabulary
    total = ce_sum(ops.gather(logits.reshape(-1, logits.shape[-1]), st.rows, 0), st.targets, st.weight)
    loss = total / max(st.tokens, 1) if st.tokens else total * float("nan")
    ids = np.asarray(input_ids).reshape(logits.shape[0], -1)
    _, deltas = model.positions(ids, None if attention_mask is None else np.asarray(attention_mask), image_grid_thw,
                                video_grid_thw)
    return Output(logits=logits, rope_deltas=deltas, loss=loss)


class Grad:
    """(sum of the trained rows' cross-entropies, gradients of `params`) for one prepared micro-batch:
    mindspore.value_and_grad over the training forward, compiled (ms.jit) unless `jit` is False."""

    def __init__(self, model, params, jit: bool = True):
        self.model, self.params = model, list(params)
        lay = getattr(model, "layout", None)
        head = VocabParallelHead(lay) if lay is not None and lay.world > 1 else None

        def fn(h, cos, sin, seen, rows, targets, weight):
            return loss_sum(model, h, cos, sin, seen, rows, targets, weight, head=head)
        self.vg = ms.value_and_grad(fn, None, self.params)
        self.run = ms.jit(self.vg) if jit else self.vg
        self.jit, self.head = jit, head
        self._full, self._towers, self._mergers = {}, {}, {}

    def _compiled(self, fn):
        vg = ms.value_and_grad(fn, None, self.params)
        return ms.jit(vg) if self.jit else vg

    def _full_fn(self, media: bool):
        """full / freeze: ids in, the embedding in the graph; host media features written in when `media`."""
        if media not in self._full:
            model = self.model

            def fn(ids, cos, sin, seen, rows, targets, weight, src=None, feats=None):
                return loss_sum(model, embed_ids(model, ids, src, feats), cos, sin, seen, rows, targets, weight)
            self._full[media] = self._compiled(fn)
        return self._full[media]

    def _keyed(self, graphs: dict, args: tuple, fn):
        """One compiled graph of `fn` per key: the inputs' (bucketed) shapes, the recent 16 buckets kept."""
        shapes = tuple(tuple(a.shape) for a in args)
        if shapes not in graphs:
            if len(graphs) >= 16:
                graphs.pop(next(iter(graphs)))
            graphs[shapes] = self._compiled(fn)
        return graphs[shapes](*args)

    def _tower_fn(self, *args):
        """full / freeze with the tower trained: the tower in the graph too, the image layout in its inputs."""
        model, visual = self.model, self.model.visual

        def fn(ids, cos, sin, seen, rows, targets, weight, src, pixels, vcos, vsin, seg, ph, pw):
            feats = visual.features_padded(pixels, vcos, vsin, seg, ph, pw)
            return loss_sum(model, embed_ids(model, ids, src, feats), cos, sin, seen, rows, targets, weight)
        return self._keyed(self._towers, args, fn)

    def _merger_fn(self, *args):
        """LoRA on the merger, a batch with media: the merger in the graph over its padded input rows."""
        model, merger, head = self.model, self.model.visual.merger, self.head

        def fn(h, cos, sin, seen, rows, targets, weight, src, pre):
            return loss_sum(model, merge_media(merger, h, src, pre), cos, sin, seen, rows, targets, weight, head)
        return self._keyed(self._mergers, args, fn)

    def __call__(self, st: Step):
        if st.ids is not None:
            args = (st.ids, st.cos, st.sin, st.seen, st.rows, st.targets, st.weight)
            if st.tower is not None:
                loss, grads = self._tower_fn(*args, st.src, *st.tower)
            elif st.src is not None:
                loss, grads = self._full_fn(True)(*args, st.src, st.feats)
            else:
                loss, grads = self._full_fn(False)(*args)
            return loss, list(grads)
        args = (st.h, st.cos, st.sin, st.seen, st.rows, st.targets, st.weight)
        loss, grads = self.run(*args) if st.src is None else self._merger_fn(*args, st.src, st.feats)
        return loss, list(grads)

"""Host-side integer bookkeeping in NumPy: 3D (t, h, w) text positions, rope deltas, rotary angles.

Nothing here touches MindSpore, so the graphs only ever see ready-made cos/sin tables and index arrays.
"""
from __future__ import annotations

import itertools

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, image_token_id: int, video_start_id: int, video_end_id: int) -> np.ndarray:
    """0 text, 1 image, 2 video frame, per token. Video frames use the image token too; what makes them video is
    lying between <|begin_of_video|> and <|end_of_video|> (the same rule as the reference processor's
    mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    opened = np.cumsum(ids == video_start_id, axis=-1) - np.cumsum(ids == video_end_id, axis=-1)
    is_img = ids == image_token_id
    return np.where(is_img, np.where(opened > 0, VIDEO, IMAGE), TEXT).astype(np.int64)


def split_video_grids(video_grid_thw) -> np.ndarray:
    """(T', h, w) per video -> T' rows of (1, h, w): each temporal patch is its own image for positions, the
    position table and attention (the processor puts a timestamp between frames)."""
    if video_grid_thw is None or len(video_grid_thw) == 0:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(video_grid_thw, np.int64).reshape(-1, 3)
    rows = np.repeat(g, g[:, 0], axis=0)
    rows[:, 0] = 1
    return rows


def position_ids_3d(input_ids, attention_mask, image_grid_thw, video_grid_thw, merge: int,
                    image_token_id: int, video_start_id: int, video_end_id: int):
    """(3, B, L) positions and (B,) rope deltas.

    Walk each row's real tokens (padding dropped) in runs of one type: text advances all three axes by one per
    token; a vision run of merged grid (H, W) puts (cur, cur+i, cur+j) on its tokens and advances `cur` by
    max(H, W). delta = max position + 1 - number of real tokens: decode step n then sits at n + delta.
    Grids are consumed in order across the whole batch, as the processor emits them."""
    ids = np.asarray(input_ids)
    B, L = ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = token_types(ids, image_token_id, video_start_id, video_end_id)
    grids = {IMAGE: iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3) if image_grid_thw is not None else []),
             VIDEO: iter(split_video_grids(video_grid_thw))}
    pos = np.zeros((3, B, L), np.int64)
    deltas = np.zeros(B, np.int64)
    for b in range(B):
        t = types[b][mask[b]]
        chunks, cur, i = [], 0, 0
        for kind, run in itertools.groupby(t.tolist()):
            n = len(list(run))
            if kind == TEXT:
                chunks.append(np.broadcast_to(cur + np.arange(n), (3, n)))
                cur += n
            else:
                try:
                    gt, gh, gw = next(grids[kind])
                except StopIteration:
                    raise ValueError(f"more {'image' if kind == IMAGE else 'video'} runs in input_ids than grids") from None
                H, W = gh // merge, gw // merge
                if gt * H * W != n:
                    raise ValueError(f"a run of {n} vision tokens does not match its grid {(gt, gh, gw)} "
                                     f"({gt * H * W} tokens after the {merge}x{merge} merge)")
                tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(H), np.arange(W), indexing="ij")
                chunks.append(cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()]))
                cur += max(H, W)
            i += n
        p = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        pos[:, b, mask[b]] = p
        deltas[b] = (p.max() + 1 - p.shape[1]) if p.shape[1] else 0
    return pos, deltas


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/dim), computed in float32 as the reference does."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def text_cos_sin(pos3: np.ndarray, rotary_dim: int, theta: float, mrope_section):
    """cos/sin (B, L, rotary_dim) for the text M-RoPE.

    Frequency slot i takes its angle from the t, h or w position by mrope_section ([8, 12, 12]: slots 0-7 t,
    8-19 h, 20-31 w). The table is laid out for rotate-half (NeoX) form, cat(f, f): the checkpoint's interleaved
    q/k rows are permuted to that layout when loaded (weights.py), which leaves q.k unchanged."""
    f = inv_freq(rotary_dim, theta)                                       # (R/2,)
    axis = np.repeat(np.arange(3), mrope_section)                         # slot -> which of t/h/w
    p = np.asarray(pos3, np.float32)[axis, :, :]                          # (R/2, B, L)
    ang = np.moveaxis(p, 0, -1) * f                                       # (B, L, R/2), fp32 like the reference
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def vision_patch_hw(grid_rows: np.ndarray, merge: int) -> np.ndarray:
    """(N, 2) patch (row, col) for every patch, in the processor's order: frame, then merge block (row-major
    over blocks), then position inside the block."""
    out = []
    for t, h, w in np.asarray(grid_rows, np.int64).reshape(-1, 3):
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = (h // merge, merge, w // merge, merge)
        hw = np.stack([hh.reshape(blk).transpose(0, 2, 1, 3).ravel(), ww.reshape(blk).transpose(0, 2, 1, 3).ravel()], -1)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def vision_cos_sin(patch_hw: np.ndarray, head_dim: int, theta: float):
    """2D rotary for the vision tower: head_dim/4 frequencies per axis, [th | tw | th | tw] over the full head,
    applied in rotate-half form."""
    f = inv_freq(head_dim // 2, theta)
    hw = np.asarray(patch_hw, np.float32)
    ang = np.concatenate([hw[:, :1] * f, hw[:, 1:] * f], -1)
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def neox_permutation(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Row order that turns one head's interleaved rotary pairs (0,1),(2,3).. into halves (0..R/2-1 | R/2..R-1).
    Dims past rotary_dim pass through."""
    perm = np.arange(head_dim)
    perm[:rotary_dim] = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)])
    return perm

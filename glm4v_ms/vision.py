"""GLM-4.1V vision tower.

patch embed (a Dense over the flattened C*T*P*P patch, = the reference's Conv3d with kernel == stride)
-> RMSNorm -> + learned 24x24 position table resampled per image with bicubic interpolation
-> blocks (RMSNorm, attention with 2D rotary isolated per image / temporal patch, RMSNorm, SwiGLU MLP)
-> RMSNorm -> downsample (2x2 merge block as one Dense) -> merger (Dense, LayerNorm, exact GELU, SwiGLU).

The bicubic resampling reproduces `grid_sample(mode="bicubic", align_corners=False, padding_mode="border")`
at the patch centres. Bicubic grid sampling is separable, so it is two small matrices per grid size built on
the host (cubic convolution, A = -0.75, taps clamped to the border) and two matmuls; MindSpore's grid_sample
has no bicubic mode and bilinear would change the numbers.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .attention import layer_norm, rms_norm, rope, vision_attention, vision_attention_masked, vision_segment_mask
from .config import VisionConfig
from .layers import MLP, Linear, Norm, _param
from .rope import vision_cos_sin, vision_patch_hw

A = -0.75  # PyTorch's (and PIL's) cubic convolution coefficient


def cubic_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights: output sample o reads the input at x = (o + 0.5) * n_in / n_out - 0.5.

    The sample point is computed in float32 the way grid_sample does (normalise to [-1, 1], then unnormalise),
    so the weights match the reference to rounding."""
    o = np.arange(n_out, dtype=np.float32)
    g = ((o + np.float32(0.5)) / np.float32(n_out)) * np.float32(2) - np.float32(1)
    x = ((g + np.float32(1)) * np.float32(n_in) - np.float32(1)) / np.float32(2)
    x0 = np.floor(x)
    t = (x - x0).astype(np.float64)

    def near(d):  # |d| <= 1
        return ((A + 2) * d - (A + 3)) * d * d + 1

    def far(d):   # 1 < |d| < 2
        return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A
    w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)
    m = np.zeros((n_out, n_in), np.float64)
    for k in range(4):
        idx = np.clip(x0.astype(np.int64) - 1 + k, 0, n_in - 1)   # border padding: clamp every tap
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m.astype(np.float32)


def resample(table, mh, mw):
    """(G*G, C) table -> (n_w * n_h, C), row w * n_h + h = the table bicubically resampled at patch (h, w), with
    the two cubic matrices given ((n_h, G) and (n_w, G), built on the host): two matmuls, in a graph too."""
    G = mh.shape[1]
    C = table.shape[1]
    n_h, n_w = mh.shape[0], mw.shape[0]
    t = table.astype(ms.float32).reshape(G, G * C)                        # rows = table h
    a = ops.matmul(mh, t).reshape(n_h, G, C).transpose(1, 0, 2).reshape(G, n_h * C)
    return ops.matmul(mw, a).reshape(n_w * n_h, C)


class VisionAttention(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, dtype)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, dtype)

    def construct(self, x, cos, sin, seg_lens, between=None, mask=None):
        N = x.shape[0]
        # ops.split, not slicing: in eager mode each Tensor slice costs milliseconds of Python index work
        shape = (1, N, self.heads, self.head_dim)   # BSND for the rotary kernel
        q, k, v = (t.reshape(shape) for t in ops.split(self.qkv(x), self.heads * self.head_dim, -1))
        # rotary in float32 whatever the weights' dtype, as the reference does
        q = rope(q.astype(ms.float32), cos, sin).astype(x.dtype).reshape(shape[1:])
        k = rope(k.astype(ms.float32), cos, sin).astype(x.dtype).reshape(shape[1:])
        v = v.reshape(shape[1:])
        if mask is not None:   # segments as a runtime mask (features_padded)
            return self.proj(vision_attention_masked(q, k, v, mask, self.head_dim ** -0.5))
        return self.proj(vision_attention(q, k, v, seg_lens, self.head_dim ** -0.5, between))


class VisionBlock(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.norm1 = Norm(cfg.hidden_size, dtype)
        self.attn = VisionAttention(cfg, dtype)
        self.norm2 = Norm(cfg.hidden_size, dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.out_hidden_size, dtype)   # its width is out_hidden_size, not intermediate_size

    def construct(self, x, cos, sin, seg_lens, between=None, mask=None):
        x = x + self.attn(rms_norm(x, self.norm1.weight, self.eps), cos, sin, seg_lens, between, mask)
        return x + self.mlp(rms_norm(x, self.norm2.weight, self.eps))


class Merger(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        d = cfg.out_hidden_size
        self.proj = Linear(d, d, dtype)
        self.norm = Norm(d, dtype, bias=True)   # a LayerNorm, unlike every other norm here
        self.mlp_hidden = cfg.intermediate_size
        self.gate_up = Linear(d, 2 * cfg.intermediate_size, dtype)
        self.down = Linear(cfg.intermediate_size, d, dtype)

    def construct(self, x):
        h = self.proj(x)
        h = ops.gelu(layer_norm(h, self.norm.weight, self.norm.bias, 1e-5), approximate="none")
        gate, up = ops.split(self.gate_up(h), self.mlp_hidden, -1)
        return self.down(ops.silu(gate) * up)


class VisionModel(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, dtype, bias=True)
        self.post_conv_norm = Norm(cfg.hidden_size, dtype)
        self.pos_embed = _param((cfg.pos_grid ** 2, cfg.hidden_size), dtype)
        self.blocks = nn.CellList([VisionBlock(cfg, dtype) for _ in range(cfg.depth)])
        self.post_norm = Norm(cfg.hidden_size, dtype)
        m = cfg.spatial_merge_size ** 2
        self.downsample = Linear(cfg.hidden_size * m, cfg.out_hidden_size, dtype, bias=True)
        self.merger = Merger(cfg, dtype)

    def tower_inputs(self, grid_rows):
        """The host side of the tower for these grids: rotary tables (1, N, 1, D), the segment lengths (a tuple),
        the position table's two cubic matrices per distinct (h, w) grid and every patch's row in their results
        (resampled once per grid), and the patch count."""
        c = self.cfg
        grid_rows = np.asarray(grid_rows, np.int64).reshape(-1, 3)
        patch_hw = vision_patch_hw(grid_rows, c.spatial_merge_size)
        cos, sin = (Tensor(a)[None, :, None, :] for a in vision_cos_sin(patch_hw, c.head_dim, c.rope_theta))
        seg_lens = tuple(int(h * w) for t, h, w in grid_rows for _ in range(t))
        mats, offsets, index = [], {}, []
        start = n = 0
        for t, h, w in grid_rows:
            if (h, w) not in offsets:
                offsets[(h, w)] = start
                mats += [Tensor(cubic_matrix(int(h), c.pos_grid)), Tensor(cubic_matrix(int(w), c.pos_grid))]
                start += h * w
            hw = patch_hw[n:n + t * h * w]
            index.append(offsets[(h, w)] + hw[:, 1] * h + hw[:, 0])
            n += t * h * w
        index = Tensor(np.concatenate(index).astype(np.int32)) if index else None
        return cos, sin, seg_lens, tuple(mats), index, int(patch_hw.shape[0])

    def padded_inputs(self, grid_rows, total: int):
        """The host side of the tower with the image layout as data (features_padded), for `total` patch rows, the
        real patches first and `total - n` padding rows after them: rotary tables (1, total, 1, D) (padding: cos 1,
        sin 0), each patch's segment id (total,) int32 (one per image / temporal patch, the padding rows one segment
        of their own), and each patch's rows of the position table's two cubic matrices, (total, G) each (padding:
        0), whose outer product weights the G x G table rows (resample's two matmuls, one patch at a time). Only
        `total` shapes them, so one graph takes every layout of that many rows."""
        c = self.cfg
        G = c.pos_grid
        grid_rows = np.asarray(grid_rows, np.int64).reshape(-1, 3)
        patch_hw = vision_patch_hw(grid_rows, c.spatial_merge_size)
        n = int(patch_hw.shape[0])
        if n > total:
            raise ValueError(f"{n} patches do not fit {total} rows")
        cos, sin = np.ones((total, c.head_dim), np.float32), np.zeros((total, c.head_dim), np.float32)
        cos[:n], sin[:n] = vision_cos_sin(patch_hw, c.head_dim, c.rope_theta)
        lens = [int(h * w) for t, h, w in grid_rows for _ in range(t)]
        seg = np.full(total, len(lens), np.int32)
        seg[:n] = np.repeat(np.arange(len(lens), dtype=np.int32), lens)
        ph, pw = np.zeros((total, G), np.float32), np.zeros((total, G), np.float32)
        start, cubic = 0, {}
        for t, h, w in grid_rows:
            for k in (h, w):
                if k not in cubic:
                    cubic[k] = cubic_matrix(int(k), G)
            hw = patch_hw[start:start + t * h * w]
            ph[start:start + len(hw)], pw[start:start + len(hw)] = cubic[h][hw[:, 0]], cubic[w][hw[:, 1]]
            start += len(hw)
        return (Tensor(cos)[None, :, None, :], Tensor(sin)[None, :, None, :], Tensor(seg), Tensor(ph), Tensor(pw))

    def _embed(self, pixels):
        x = self.patch_embed(pixels.astype(self.pos_embed.dtype))
        return rms_norm(x, self.post_conv_norm.weight, self.cfg.rms_norm_eps)

    def _merge(self, x, states=None):
        c = self.cfg
        x = rms_norm(x, self.post_norm.weight, c.rms_norm_eps)
        x = self.downsample(x.reshape(-1, x.shape[-1] * c.spatial_merge_size ** 2))
        x = self.merger(x)
        if states is not None:
            states.append(("visual.merger", x))
        return x

    def features(self, pixels, cos, sin, seg_lens, mats, index, states=None, between=None):
        """The tower over host-prepared inputs (tower_inputs); construct runs it eagerly."""
        x = self._embed(pixels)
        tables = [resample(self.pos_embed, mats[2 * k], mats[2 * k + 1]) for k in range(len(mats) // 2)]
        table = tables[0] if len(tables) == 1 else ops.cat(tables, 0)
        x = x + ops.gather(table, index, 0).astype(x.dtype)
        for i, blk in enumerate(self.blocks):
            if i and between is not None:
                between()
            x = blk(x, cos, sin, seg_lens, between)
            if states is not None:
                states.append((f"visual.blocks.{i}", x))
        return self._merge(x, states)

    def features_padded(self, pixels, cos, sin, seg, ph, pw):
        """The tower over padded_inputs, the layout as runtime tensors (the training graph: its shapes are the row
        count alone). Patches attend within their segment (vision_segment_mask, built once for every block), so
        the padding rows change no real row; their merged rows, after the real ones, are for the caller to drop.
        The same maths as features: the position table's bicubic resampling as one matmul by the per-patch
        outer products of the cubic rows."""
        x = self._embed(pixels)
        G = ph.shape[1]
        weights = (ph[:, :, None] * pw[:, None, :]).reshape(ph.shape[0], G * G)
        x = x + ops.matmul(weights, self.pos_embed.astype(ms.float32)).astype(x.dtype)
        mask = vision_segment_mask(seg)
        for blk in self.blocks:
            x = blk(x, cos, sin, None, None, mask)
        return self._merge(x)

    def construct(self, pixels, grid_rows: np.ndarray, states=None, between=None):
        """pixels (N, C*T*P*P); grid_rows (n, 3) of (t, h, w) in patches, one row per image or video frame pair.
        Returns (N / merge^2, out_hidden_size) LLM embeddings. `states`, a list, receives each block's output.
        `between()` is called between blocks and between the query blocks of their attention (the serving engine
        decodes its other rows meanwhile)."""
        cos, sin, seg_lens, mats, index, n = self.tower_inputs(grid_rows)
        if n != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} patch rows in the pixel values, the grids describe {n}")
        return self.features(pixels, cos, sin, list(seg_lens), mats, index, states, between)

"""The one weight table: checkpoint names -> this port's parameter layout (the files: safetensors_io.py).

Every entry is (our name, source names, transform). Transforms are pure layout operations (reshape, permute,
concatenate), so they work on raw bf16 bits as well as on floats: the converter reuses this table and writes
bit-identical tensors. `{i}` stands for the layer index.

Layout changes against the Hugging Face checkpoint:
- patch embed Conv3d (o, C, T, P, P) -> Dense (o, C*T*P*P); downsample Conv2d (o, c, 2, 2) -> Dense (o, 4c) over
  the four patches of a merge block, row-major;
- text q/k/v -> one fused matmul; q and k rows permuted per head from interleaved rotary pairs to rotate-half
  halves (rope.neox_permutation) so that text and vision share one rotary kernel; q.k is unchanged;
- vision and merger gate/up -> one fused gate_up matmul (the text MLP is fused already);
- GLM-4.5V: q/k rows kept (already rotate-half); the dense MLP's gate/up fused; per-expert gate/up/down stacked
  into gate_up (E, H, 2I) and down (E, I, H), the grouped-matmul kernel's (E, K, N) layout; the router's weight and
  e_score_correction_bias in float32.
Tensor parallel: an entry's `split` names how each source tensor is cut between ranks (parallel.shard); the cut is
made on the memory map before the transform, so a rank reads only its slices. Expert entries list `per_expert`
sources per expert, so that expert parallelism reads only the rank's own experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import parallel
from .config import Glm4vConfig
from .rope import neox_permutation
from .safetensors_io import ST_DTYPES, Checkpoint, SafetensorsFile, WeightError, to_float32  # noqa: F401


# ----------------------------------------------------------------------------------------------- the table
def _same(cfg, x):
    return x


def _conv_to_dense(cfg, w):
    return w.reshape(w.shape[0], -1)


def _downsample_to_dense(cfg, w):
    # rows of a merge block are concatenated as (block row, block col, channel)
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def _cat(cfg, *xs):
    return np.concatenate(xs, axis=0)


def _text_qkv(cfg, q, k, v):
    t = cfg.text
    if not t.interleaved_rope_rows:   # GLM-4.5V: the checkpoint is already rotate-half
        return np.concatenate([q, k, v], axis=0)
    perm = neox_permutation(t.head_dim, t.rotary_dim)

    def per_head(x):
        heads = x.reshape(-1, t.head_dim, *x.shape[1:])
        return heads[:, perm].reshape(x.shape)
    return np.concatenate([per_head(q), per_head(k), v], axis=0)


def _stack_gate_up(cfg, *xs):
    """(gate_0, up_0, gate_1, up_1, ...), each (I, H) -> (E, H, 2I): gate columns first, then up."""
    return np.stack([np.concatenate([g, u], 0).T for g, u in zip(xs[0::2], xs[1::2])])


def _stack_down(cfg, *xs):
    """(down_0, down_1, ...), each (H, I) -> (E, I, H)."""
    return np.stack([x.T for x in xs])


@dataclass(frozen=True)
class Entry:
    ours: str
    sources: tuple
    fn: Callable = _same
    split: tuple = ()      # per source: a parallel split kind ("" replicated); empty: all replicated
    per_expert: int = 0    # sources per expert, for an entry stacking all experts


V, T = "model.visual.", "model.language_model."
_VISION = [
    Entry("visual.patch_embed.weight", (V + "patch_embed.proj.weight",), _conv_to_dense),
    Entry("visual.patch_embed.bias", (V + "patch_embed.proj.bias",)),
    Entry("visual.post_conv_norm.weight", (V + "post_conv_layernorm.weight",)),
    Entry("visual.pos_embed", (V + "embeddings.position_embedding.weight",)),
    Entry("visual.post_norm.weight", (V + "post_layernorm.weight",)),
    Entry("visual.downsample.weight", (V + "downsample.weight",), _downsample_to_dense),
    Entry("visual.downsample.bias", (V + "downsample.bias",)),
    Entry("visual.merger.proj.weight", (V + "merger.proj.weight",)),
    Entry("visual.merger.norm.weight", (V + "merger.post_projection_norm.weight",)),
    Entry("visual.merger.norm.bias", (V + "merger.post_projection_norm.bias",)),
    Entry("visual.merger.gate_up.weight", (V + "merger.gate_proj.weight", V + "merger.up_proj.weight"), _cat),
    Entry("visual.merger.down.weight", (V + "merger.down_proj.weight",)),
]
_VISION_BLOCK = [
    Entry("visual.blocks.{i}.norm1.weight", (V + "blocks.{i}.norm1.weight",)),
    Entry("visual.blocks.{i}.norm2.weight", (V + "blocks.{i}.norm2.weight",)),
    Entry("visual.blocks.{i}.attn.qkv.weight", (V + "blocks.{i}.attn.qkv.weight",)),
    Entry("visual.blocks.{i}.attn.proj.weight", (V + "blocks.{i}.attn.proj.weight",)),
    Entry("visual.blocks.{i}.mlp.gate_up.weight", (V + "blocks.{i}.mlp.gate_proj.weight", V + "blocks.{i}.mlp.up_proj.weight"), _cat),
    Entry("visual.blocks.{i}.mlp.down.weight", (V + "blocks.{i}.mlp.down_proj.weight",)),
]
_L = T + "layers.{i}."
_TEXT_LAYER = [
    Entry("text.layers.{i}.input_norm.weight", (_L + "input_layernorm.weight",)),
    Entry("text.layers.{i}.attn.qkv.weight", (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"), _text_qkv),
    Entry("text.layers.{i}.attn.qkv.bias", (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"), _text_qkv),
    Entry("text.layers.{i}.attn.o.weight", (_L + "self_attn.o_proj.weight",)),
    Entry("text.layers.{i}.post_attn_norm.weight", (_L + "post_self_attn_layernorm.weight",)),
    Entry("text.layers.{i}.pre_mlp_norm.weight", (_L + "post_attention_layernorm.weight",)),   # sic: the pre-MLP norm
    Entry("text.layers.{i}.mlp.gate_up.weight", (_L + "mlp.gate_up_proj.weight",)),
    Entry("text.layers.{i}.mlp.down.weight", (_L + "mlp.down_proj.weight",)),
    Entry("text.layers.{i}.post_mlp_norm.weight", (_L + "post_mlp_layernorm.weight",)),
]
_TEXT = [
    Entry("text.embed.weight", (T + "embed_tokens.weight",), split=("out",)),
    Entry("text.norm.weight", (T + "norm.weight",)),
]
# how each text entry is cut between ranks (by our name's suffix; everything else is replicated)
_SPLITS = {"attn.qkv.weight": ("out", "kv", "kv"), "attn.qkv.bias": ("out", "kv", "kv"), "attn.o.weight": ("in",),
           "mlp.down.weight": ("in",), "mlp.shared.down.weight": ("in",)}
_SPLIT_GATE_UP = {1: ("halves",), 2: ("out", "out")}   # GLM-4.1V's fused gate_up / separate gate and up
# GLM-4.5V: two norms, separate dense gate/up, MoE layers
_MOE_ATTN = [e for e in _TEXT_LAYER if ".attn." in e.ours or e.ours.endswith(("input_norm.weight", "pre_mlp_norm.weight"))]
_MOE_DENSE = [
    Entry("text.layers.{i}.mlp.gate_up.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), _cat),
    Entry("text.layers.{i}.mlp.down.weight", (_L + "mlp.down_proj.weight",)),
]
_MOE_SHARED = [
    Entry("text.layers.{i}.mlp.router_weight", (_L + "mlp.gate.weight",)),
    Entry("text.layers.{i}.mlp.router_bias", (_L + "mlp.gate.e_score_correction_bias",)),
    Entry("text.layers.{i}.mlp.shared.gate_up.weight", (_L + "mlp.shared_experts.gate_proj.weight",
                                                        _L + "mlp.shared_experts.up_proj.weight"), _cat),
    Entry("text.layers.{i}.mlp.shared.down.weight", (_L + "mlp.shared_experts.down_proj.weight",)),
]


def _expert_entries(i: int, E: int) -> list[Entry]:
    ex = _L.format(i=i) + "mlp.experts.{e}."
    gu = tuple(ex.format(e=e) + f"{w}_proj.weight" for e in range(E) for w in ("gate", "up"))
    dn = tuple(ex.format(e=e) + "down_proj.weight" for e in range(E))
    return [Entry(f"text.layers.{i}.mlp.gate_up", gu, _stack_gate_up, ("out",) * len(gu), per_expert=2),
            Entry(f"text.layers.{i}.mlp.down", dn, _stack_down, ("in",) * len(dn), per_expert=1)]


# kept in the checkpoint's dtype by the converter whatever --dtype says (the reference keeps it float32: it only
# steers the choice of experts, and rounding it to bf16 could flip near-ties)
KEEP_DTYPE = ("mlp.router_bias",)


def _expand(entries, n):
    return [Entry(e.ours.format(i=i), tuple(s.format(i=i) for s in e.sources), e.fn, e.split, e.per_expert)
            for i in range(n) for e in entries]


def _with_splits(e: Entry) -> Entry:
    if e.split or not e.ours.startswith("text.layers."):
        return e
    suffix = e.ours.split(".", 3)[3]
    split = _SPLITS.get(suffix) or (_SPLIT_GATE_UP[len(e.sources)] if suffix.endswith("gate_up.weight") else ())
    return Entry(e.ours, e.sources, e.fn, split, e.per_expert)


def _text_layers(cfg: Glm4vConfig) -> list[Entry]:
    t = cfg.text
    if t.n_routed_experts == 0:
        return _expand(_TEXT_LAYER, t.num_hidden_layers)
    attn = _MOE_ATTN if t.attention_bias else [e for e in _MOE_ATTN if not e.ours.endswith(".bias")]
    out = []
    for i in range(t.num_hidden_layers):
        out += _expand(attn, i + 1)[-len(attn):]
        if t.is_moe_layer(i):
            out += _expand(_MOE_SHARED, i + 1)[-len(_MOE_SHARED):] + _expert_entries(i, t.n_routed_experts)
        else:
            out += _expand(_MOE_DENSE, i + 1)[-len(_MOE_DENSE):]
    return out


def hf_table(cfg: Glm4vConfig) -> list[Entry]:
    """Hugging Face checkpoint -> ours, for this config."""
    head = "model.language_model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return (_VISION + _expand(_VISION_BLOCK, cfg.vision.depth) + _TEXT
            + [_with_splits(e) for e in _text_layers(cfg)] + [Entry("lm_head.weight", (head,), split=("out",))])


def converted_table(cfg: Glm4vConfig) -> list[Entry]:
    """A converted folder already holds our names and layout."""
    return [Entry(e.ours, (e.ours,)) for e in hf_table(cfg)]


def expected_shapes(cfg: Glm4vConfig) -> dict:
    v, t = cfg.vision, cfg.text
    s = {
        "visual.patch_embed.weight": (v.hidden_size, v.patch_dim), "visual.patch_embed.bias": (v.hidden_size,),
        "visual.post_conv_norm.weight": (v.hidden_size,), "visual.pos_embed": (v.pos_grid ** 2, v.hidden_size),
        "visual.post_norm.weight": (v.hidden_size,),
        "visual.downsample.weight": (v.out_hidden_size, v.hidden_size * v.spatial_merge_size ** 2),
        "visual.downsample.bias": (v.out_hidden_size,),
        "visual.merger.proj.weight": (v.out_hidden_size, v.out_hidden_size),
        "visual.merger.norm.weight": (v.out_hidden_size,), "visual.merger.norm.bias": (v.out_hidden_size,),
        "visual.merger.gate_up.weight": (2 * v.intermediate_size, v.out_hidden_size),
        "visual.merger.down.weight": (v.out_hidden_size, v.intermediate_size),
        "text.embed.weight": (t.vocab_size, t.hidden_size), "text.norm.weight": (t.hidden_size,),
        "lm_head.weight": (t.vocab_size, t.hidden_size),
    }
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        s.update({p + "norm1.weight": (v.hidden_size,), p + "norm2.weight": (v.hidden_size,),
                  p + "attn.qkv.weight": (3 * v.hidden_size, v.hidden_size), p + "attn.proj.weight": (v.hidden_size, v.hidden_size),
                  p + "mlp.gate_up.weight": (2 * v.out_hidden_size, v.hidden_size), p + "mlp.down.weight": (v.hidden_size, v.out_hidden_size)})
    qkv = t.q_size + 2 * t.kv_size
    if t.n_routed_experts:
        s.update(_moe_expected_shapes(t))
        return s
    for i in range(t.num_hidden_layers):
        p = f"text.layers.{i}."
        s.update({p + "input_norm.weight": (t.hidden_size,), p + "attn.qkv.weight": (qkv, t.hidden_size),
                  p + "attn.qkv.bias": (qkv,), p + "attn.o.weight": (t.hidden_size, t.q_size),
                  p + "post_attn_norm.weight": (t.hidden_size,), p + "pre_mlp_norm.weight": (t.hidden_size,),
                  p + "mlp.gate_up.weight": (2 * t.intermediate_size, t.hidden_size),
                  p + "mlp.down.weight": (t.hidden_size, t.intermediate_size), p + "post_mlp_norm.weight": (t.hidden_size,)})
    return s


def hf_shapes(cfg: Glm4vConfig) -> dict:
    """Every tensor of a Hugging Face checkpoint for this config, with its shape (checked before mapping, so
    that a wrong shape is reported under the checkpoint's own name; also what demo checkpoints are made of)."""
    v, t = cfg.vision, cfg.text
    hv, d, m = v.hidden_size, v.out_hidden_size, v.spatial_merge_size
    s = {V + "patch_embed.proj.weight": (hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
         V + "patch_embed.proj.bias": (hv,), V + "post_conv_layernorm.weight": (hv,),
         V + "embeddings.position_embedding.weight": (v.pos_grid ** 2, hv), V + "post_layernorm.weight": (hv,),
         V + "downsample.weight": (d, hv, m, m), V + "downsample.bias": (d,), V + "merger.proj.weight": (d, d),
         V + "merger.post_projection_norm.weight": (d,), V + "merger.post_projection_norm.bias": (d,),
         V + "merger.gate_proj.weight": (v.intermediate_size, d), V + "merger.up_proj.weight": (v.intermediate_size, d),
         V + "merger.down_proj.weight": (d, v.intermediate_size),
         T + "embed_tokens.weight": (t.vocab_size, t.hidden_size), T + "norm.weight": (t.hidden_size,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    for i in range(v.depth):
        p = V + f"blocks.{i}."
        s.update({p + "norm1.weight": (hv,), p + "norm2.weight": (hv,), p + "attn.qkv.weight": (3 * hv, hv),
                  p + "attn.proj.weight": (hv, hv), p + "mlp.gate_proj.weight": (d, hv), p + "mlp.up_proj.weight": (d, hv),
                  p + "mlp.down_proj.weight": (hv, d)})
    if t.n_routed_experts:
        s.update(_moe_hf_shapes(t))
        return s
    for i in range(t.num_hidden_layers):
        p = _L.format(i=i)
        s.update({p + "input_layernorm.weight": (t.hidden_size,), p + "post_self_attn_layernorm.weight": (t.hidden_size,),
                  p + "post_attention_layernorm.weight": (t.hidden_size,), p + "post_mlp_layernorm.weight": (t.hidden_size,),
                  p + "self_attn.q_proj.weight": (t.q_size, t.hidden_size), p + "self_attn.q_proj.bias": (t.q_size,),
                  p + "self_attn.k_proj.weight": (t.kv_size, t.hidden_size), p + "self_attn.k_proj.bias": (t.kv_size,),
                  p + "self_attn.v_proj.weight": (t.kv_size, t.hidden_size), p + "self_attn.v_proj.bias": (t.kv_size,),
                  p + "self_attn.o_proj.weight": (t.hidden_size, t.q_size),
                  p + "mlp.gate_up_proj.weight": (2 * t.intermediate_size, t.hidden_size),
                  p + "mlp.down_proj.weight": (t.hidden_size, t.intermediate_size)})
    return s


def _moe_expected_shapes(t) -> dict:
    H, qkv, E, I = t.hidden_size, t.q_size + 2 * t.kv_size, t.n_routed_experts, t.moe_intermediate_size
    S = I * t.n_shared_experts
    s = {}
    for i in range(t.num_hidden_layers):
        p = f"text.layers.{i}."
        s.update({p + "input_norm.weight": (H,), p + "attn.qkv.weight": (qkv, H), p + "attn.o.weight": (H, t.q_size),
                  p + "pre_mlp_norm.weight": (H,)})
        if t.attention_bias:
            s[p + "attn.qkv.bias"] = (qkv,)
        if t.is_moe_layer(i):
            s.update({p + "mlp.router_weight": (E, H), p + "mlp.router_bias": (E,), p + "mlp.gate_up": (E, H, 2 * I),
                      p + "mlp.down": (E, I, H), p + "mlp.shared.gate_up.weight": (2 * S, H),
                      p + "mlp.shared.down.weight": (H, S)})
        else:
            s.update({p + "mlp.gate_up.weight": (2 * t.intermediate_size, H),
                      p + "mlp.down.weight": (H, t.intermediate_size)})
    return s


def _moe_hf_shapes(t) -> dict:
    H, E, I = t.hidden_size, t.n_routed_experts, t.moe_intermediate_size
    S = I * t.n_shared_experts
    s = {}
    for i in range(t.num_hidden_layers):
        p = _L.format(i=i)
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_proj.weight": (t.q_size, H), p + "self_attn.k_proj.weight": (t.kv_size, H),
                  p + "self_attn.v_proj.weight": (t.kv_size, H), p + "self_attn.o_proj.weight": (H, t.q_size)})
        if t.attention_bias:
            s.update({p + "self_attn.q_proj.bias": (t.q_size,), p + "self_attn.k_proj.bias": (t.kv_size,),
                      p + "self_attn.v_proj.bias": (t.kv_size,)})
        if not t.is_moe_layer(i):
            s.update({p + "mlp.gate_proj.weight": (t.intermediate_size, H), p + "mlp.up_proj.weight": (t.intermediate_size, H),
                      p + "mlp.down_proj.weight": (H, t.intermediate_size)})
            continue
        s.update({p + "mlp.gate.weight": (E, H), p + "mlp.gate.e_score_correction_bias": (E,),
                  p + "mlp.shared_experts.gate_proj.weight": (S, H), p + "mlp.shared_experts.up_proj.weight": (S, H),
                  p + "mlp.shared_experts.down_proj.weight": (H, S)})
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            s.update({q + "gate_proj.weight": (I, H), q + "up_proj.weight": (I, H), q + "down_proj.weight": (H, I)})
    return s


def is_converted(ckpt: Checkpoint) -> bool:
    return any(k.startswith("text.layers.") for k in ckpt.keys())


def plan(cfg: Glm4vConfig, ckpt: Checkpoint) -> list[Entry]:
    """The table for this checkpoint, after checking that its keys are exactly the expected ones."""
    table = converted_table(cfg) if is_converted(ckpt) else hf_table(cfg)
    needed = {s for e in table for s in e.sources}
    have = set(ckpt.keys())
    missing = sorted(needed - have)
    if missing:
        raise WeightError(f"tensor {missing[0]} is missing from the checkpoint in {ckpt.folder}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(have - needed - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise WeightError(f"unexpected tensor {extra[0]} in the checkpoint in {ckpt.folder}"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    src_shapes = expected_shapes(cfg) if is_converted(ckpt) else hf_shapes(cfg)
    for name in sorted(needed):
        shape, got = src_shapes[name], ckpt.info(name)[1]
        if got != shape:
            raise WeightError(f"tensor {name} has shape {list(got)}, the config implies {list(shape)}")
    return table


def load(cfg: Glm4vConfig, ckpt, skip=(), layout: parallel.Layout | None = None):
    """Yield (our name, raw array, safetensors dtype) for every parameter but those in `skip`, shape-checked.
    ckpt: a Checkpoint, or a view of one that reads quantized weights as float (quant.view: the caller picks it, so
    that this table knows nothing of quantization), or a folder of float weights. With a layout of several ranks,
    each tensor is this rank's slice (the caller checks it against its parameter's shape)."""
    ckpt = Checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
    folder = ckpt.folder
    shapes = expected_shapes(cfg)
    lay = layout or parallel.Layout()
    if lay.world > 1 and is_converted(ckpt):
        raise WeightError(f"{folder}: tensor parallelism reads the Hugging Face checkpoint (it slices the original "
                          f"tensors); give the source folder, not a glm4v_ms.convert output")
    for e in plan(cfg, ckpt):
        if e.ours in skip:
            continue
        sources, split = e.sources, e.split or ("",) * len(e.sources)
        if lay.world > 1 and e.per_expert:
            if lay.expert_parallel:   # whole experts: only this rank's, uncut
                ex = lay.experts(len(sources) // e.per_expert)
                sources = sources[ex.start * e.per_expert:ex.stop * e.per_expert]
                split = ("",) * len(sources)
        t = cfg.text
        raws = [(parallel.shard(k, a, lay, t.head_dim, t.num_key_value_heads), d)
                for k, (a, d) in zip(split, (ckpt.read(s) for s in sources))]
        dtypes = {d for _, d in raws}
        if len(dtypes) != 1:
            raise WeightError(f"tensors {', '.join(e.sources)} mix dtypes {sorted(dtypes)}")
        try:
            arr = e.fn(cfg, *[a for a, _ in raws])
        except ValueError as err:
            raise WeightError(f"tensor {e.sources[0]}: cannot map to {e.ours} ({err})") from None
        if lay.world == 1 and tuple(arr.shape) != shapes[e.ours]:
            shown = [list(ckpt.info(s)[1]) for s in e.sources]
            raise WeightError(f"tensor {e.sources[0] if len(e.sources) == 1 else e.sources} has shape "
                              f"{shown[0] if len(shown) == 1 else shown}, the config implies {list(shapes[e.ours])} "
                              f"for {e.ours}")
        yield e.ours, arr, dtypes.pop()

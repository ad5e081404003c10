"""The one weight table: checkpoint names -> this port's parameter layout (the files: safetensors_io.py).

Every entry is (our name, source names, transform, the sources' shapes as functions of the config); our shape
follows from the transform's shape rule, so the checks (plan, load, the converter) and the demo checkpoints read
the shapes from this one table. Transforms are pure layout operations (reshape, permute, concatenate), so they work
on raw bf16 bits as well as on floats: the converter reuses this table and writes bit-identical tensors. `{i}`
stands for the layer index.

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

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from . import parallel
from .config import Glm4vConfig
from .rope import neox_permutation
from .safetensors_io import Checkpoint, WeightError


# ----------------------------------------------------------------------------------------------- the table
# A transform carries the rule that gives its output's shape from its sources' shapes, so that an entry's shape
# (what the loader and the converter check) follows from its sources' (what a checkpoint must hold).
def _shaped(rule):
    def mark(fn):
        fn.out_shape = rule
        return fn
    return mark


def _rows(shapes):   # sources concatenated along the rows
    return (sum(s[0] for s in shapes), *shapes[0][1:])


@_shaped(lambda s: s[0])
def _same(cfg, x):
    return x


@_shaped(lambda s: (s[0][0], int(np.prod(s[0][1:]))))
def _conv_to_dense(cfg, w):
    return w.reshape(w.shape[0], -1)


@_shaped(lambda s: (s[0][0], int(np.prod(s[0][1:]))))
def _downsample_to_dense(cfg, w):
    # rows of a merge block are concatenated as (block row, block col, channel)
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


@_shaped(_rows)
def _cat(cfg, *xs):
    return np.concatenate(xs, axis=0)


@_shaped(_rows)
def _text_qkv(cfg, q, k, v):
    t = cfg.text
    if not t.interleaved_rope_rows:   # GLM-4.5V: the checkpoint is already rotate-half
        return np.concatenate([q, k, v], axis=0)
    perm = neox_permutation(t.head_dim, t.rotary_dim)

    def per_head(x):
        heads = x.reshape(-1, t.head_dim, *x.shape[1:])
        return heads[:, perm].reshape(x.shape)
    return np.concatenate([per_head(q), per_head(k), v], axis=0)


@_shaped(lambda s: (len(s) // 2, s[0][1], 2 * s[0][0]))
def _stack_gate_up(cfg, *xs):
    """(gate_0, up_0, gate_1, up_1, ...), each (I, H) -> (E, H, 2I): gate columns first, then up."""
    return np.stack([np.concatenate([g, u], 0).T for g, u in zip(xs[0::2], xs[1::2])])


@_shaped(lambda s: (len(s), s[0][1], s[0][0]))
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
    shapes: Callable = None   # cfg -> the sources' shapes, one per source

    def source_shapes(self, cfg) -> list:
        return [tuple(s) for s in self.shapes(cfg)]

    def shape(self, cfg) -> tuple:
        """Ours: the transform's rule applied to the sources' shapes."""
        return tuple(self.fn.out_shape(self.source_shapes(cfg)))


def _vec(size):    # cfg -> one 1-D source of a size read from the config
    return lambda c: [(size(c),)]


def _mat(*dims):   # cfg -> one source of these dims
    return lambda c: [tuple(d(c) for d in dims)]


# the sizes the shapes are made of
_hv, _d, _vi = (lambda c: c.vision.hidden_size), (lambda c: c.vision.out_hidden_size), (lambda c: c.vision.intermediate_size)
_H, _I, _q, _kv = ((lambda c: c.text.hidden_size), (lambda c: c.text.intermediate_size), (lambda c: c.text.q_size),
                   (lambda c: c.text.kv_size))
_vocab = lambda c: c.text.vocab_size   # noqa: E731

V, T = "model.visual.", "model.language_model."
_VISION = [
    Entry("visual.patch_embed.weight", (V + "patch_embed.proj.weight",), _conv_to_dense, shapes=lambda c: [
        (c.vision.hidden_size, c.vision.in_channels, c.vision.temporal_patch_size, c.vision.patch_size,
         c.vision.patch_size)]),
    Entry("visual.patch_embed.bias", (V + "patch_embed.proj.bias",), shapes=_vec(_hv)),
    Entry("visual.post_conv_norm.weight", (V + "post_conv_layernorm.weight",), shapes=_vec(_hv)),
    Entry("visual.pos_embed", (V + "embeddings.position_embedding.weight",), shapes=_mat(lambda c: c.vision.pos_grid ** 2, _hv)),
    Entry("visual.post_norm.weight", (V + "post_layernorm.weight",), shapes=_vec(_hv)),
    Entry("visual.downsample.weight", (V + "downsample.weight",), _downsample_to_dense,
          shapes=lambda c: [(c.vision.out_hidden_size, c.vision.hidden_size, c.vision.spatial_merge_size,
                             c.vision.spatial_merge_size)]),
    Entry("visual.downsample.bias", (V + "downsample.bias",), shapes=_vec(_d)),
    Entry("visual.merger.proj.weight", (V + "merger.proj.weight",), shapes=_mat(_d, _d)),
    Entry("visual.merger.norm.weight", (V + "merger.post_projection_norm.weight",), shapes=_vec(_d)),
    Entry("visual.merger.norm.bias", (V + "merger.post_projection_norm.bias",), shapes=_vec(_d)),
    Entry("visual.merger.gate_up.weight", (V + "merger.gate_proj.weight", V + "merger.up_proj.weight"), _cat,
          shapes=lambda c: [(_vi(c), _d(c))] * 2),
    Entry("visual.merger.down.weight", (V + "merger.down_proj.weight",), shapes=_mat(_d, _vi)),
]
_VISION_BLOCK = [
    Entry("visual.blocks.{i}.norm1.weight", (V + "blocks.{i}.norm1.weight",), shapes=_vec(_hv)),
    Entry("visual.blocks.{i}.norm2.weight", (V + "blocks.{i}.norm2.weight",), shapes=_vec(_hv)),
    Entry("visual.blocks.{i}.attn.qkv.weight", (V + "blocks.{i}.attn.qkv.weight",), shapes=_mat(lambda c: 3 * _hv(c), _hv)),
    Entry("visual.blocks.{i}.attn.proj.weight", (V + "blocks.{i}.attn.proj.weight",), shapes=_mat(_hv, _hv)),
    Entry("visual.blocks.{i}.mlp.gate_up.weight", (V + "blocks.{i}.mlp.gate_proj.weight", V + "blocks.{i}.mlp.up_proj.weight"), _cat,
          shapes=lambda c: [(_d(c), _hv(c))] * 2),
    Entry("visual.blocks.{i}.mlp.down.weight", (V + "blocks.{i}.mlp.down_proj.weight",), shapes=_mat(_hv, _d)),
]
_L = T + "layers.{i}."
_TEXT_LAYER = [
    Entry("text.layers.{i}.input_norm.weight", (_L + "input_layernorm.weight",), shapes=_vec(_H)),
    Entry("text.layers.{i}.attn.qkv.weight", (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"), _text_qkv,
          shapes=lambda c: [(_q(c), _H(c)), (_kv(c), _H(c)), (_kv(c), _H(c))]),
    Entry("text.layers.{i}.attn.qkv.bias", (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"), _text_qkv,
          shapes=lambda c: [(_q(c),), (_kv(c),), (_kv(c),)]),
    Entry("text.layers.{i}.attn.o.weight", (_L + "self_attn.o_proj.weight",), shapes=_mat(_H, _q)),
    Entry("text.layers.{i}.post_attn_norm.weight", (_L + "post_self_attn_layernorm.weight",), shapes=_vec(_H)),
    Entry("text.layers.{i}.pre_mlp_norm.weight", (_L + "post_attention_layernorm.weight",), shapes=_vec(_H)),   # sic: the pre-MLP norm
    Entry("text.layers.{i}.mlp.gate_up.weight", (_L + "mlp.gate_up_proj.weight",), shapes=_mat(lambda c: 2 * _I(c), _H)),
    Entry("text.layers.{i}.mlp.down.weight", (_L + "mlp.down_proj.weight",), shapes=_mat(_H, _I)),
    Entry("text.layers.{i}.post_mlp_norm.weight", (_L + "post_mlp_layernorm.weight",), shapes=_vec(_H)),
]
_TEXT = [
    Entry("text.embed.weight", (T + "embed_tokens.weight",), split=("out",), shapes=_mat(_vocab, _H)),
    Entry("text.norm.weight", (T + "norm.weight",), shapes=_vec(_H)),
]
_LM_HEAD = _mat(_vocab, _H)
# how each text entry is cut between ranks (by our name's suffix; everything else is replicated)
_SPLITS = {"attn.qkv.weight": ("out", "kv", "kv"), "attn.qkv.bias": ("out", "kv", "kv"), "attn.o.weight": ("in",),
           "mlp.down.weight": ("in",), "mlp.shared.down.weight": ("in",)}
_SPLIT_GATE_UP = {1: ("halves",), 2: ("out", "out")}   # GLM-4.1V's fused gate_up / separate gate and up
# GLM-4.5V: two norms, separate dense gate/up, MoE layers
_MOE_ATTN = [e for e in _TEXT_LAYER if ".attn." in e.ours or e.ours.endswith(("input_norm.weight", "pre_mlp_norm.weight"))]
_MOE_DENSE = [
    Entry("text.layers.{i}.mlp.gate_up.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), _cat,
          shapes=lambda c: [(_I(c), _H(c))] * 2),
    Entry("text.layers.{i}.mlp.down.weight", (_L + "mlp.down_proj.weight",), shapes=_mat(_H, _I)),
]
_S = lambda c: c.text.moe_intermediate_size * c.text.n_shared_experts   # noqa: E731
_MOE_SHARED = [
    Entry("text.layers.{i}.mlp.router_weight", (_L + "mlp.gate.weight",), shapes=_mat(lambda c: c.text.n_routed_experts, _H)),
    Entry("text.layers.{i}.mlp.router_bias", (_L + "mlp.gate.e_score_correction_bias",),
          shapes=_vec(lambda c: c.text.n_routed_experts)),
    Entry("text.layers.{i}.mlp.shared.gate_up.weight", (_L + "mlp.shared_experts.gate_proj.weight",
                                                        _L + "mlp.shared_experts.up_proj.weight"), _cat,
          shapes=lambda c: [(_S(c), _H(c))] * 2),
    Entry("text.layers.{i}.mlp.shared.down.weight", (_L + "mlp.shared_experts.down_proj.weight",), shapes=_mat(_H, _S)),
]


def _expert_entries(i: int, E: int) -> list[Entry]:
    ex = _L.format(i=i) + "mlp.experts.{e}."
    gu = tuple(ex.format(e=e) + f"{w}_proj.weight" for e in range(E) for w in ("gate", "up"))
    dn = tuple(ex.format(e=e) + "down_proj.weight" for e in range(E))
    I = lambda c: c.text.moe_intermediate_size   # noqa: E731, E741
    return [Entry(f"text.layers.{i}.mlp.gate_up", gu, _stack_gate_up, ("out",) * len(gu), per_expert=2,
                  shapes=lambda c: [(I(c), _H(c))] * len(gu)),
            Entry(f"text.layers.{i}.mlp.down", dn, _stack_down, ("in",) * len(dn), per_expert=1,
                  shapes=lambda c: [(_H(c), I(c))] * len(dn))]


# kept in the checkpoint's dtype by the converter whatever --dtype says (the reference keeps it float32: it only
# steers the choice of experts, and rounding it to bf16 could flip near-ties)
KEEP_DTYPE = ("mlp.router_bias",)


def _expand(entries, n):
    return [replace(e, ours=e.ours.format(i=i), sources=tuple(s.format(i=i) for s in e.sources))
            for i in range(n) for e in entries]


def _with_splits(e: Entry) -> Entry:
    if e.split or not e.ours.startswith("text.layers."):
        return e
    suffix = e.ours.split(".", 3)[3]
    split = _SPLITS.get(suffix) or (_SPLIT_GATE_UP[len(e.sources)] if suffix.endswith("gate_up.weight") else ())
    return replace(e, split=split)


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
            + [_with_splits(e) for e in _text_layers(cfg)] + [Entry("lm_head.weight", (head,), split=("out",),
                                                                   shapes=_LM_HEAD)])


def converted_table(cfg: Glm4vConfig) -> list[Entry]:
    """A converted folder already holds our names and layout."""
    return [Entry(e.ours, (e.ours,), shapes=lambda c, s=e.shape(cfg): [s]) for e in hf_table(cfg)]


def expected_shapes(cfg: Glm4vConfig) -> dict:
    """Our name -> its shape, for every entry."""
    return {e.ours: e.shape(cfg) for e in hf_table(cfg)}


# the order in which hf_shapes lists a text layer's tensors (demo checkpoints draw their random weights in this
# order: changing it would change every demo weight)
_HF_LAYER_ORDER = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm",
                   "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
                   "self_attn.v_proj.weight", "self_attn.v_proj.bias")


def _hf_order(name: str):
    """(part, layer, rank): vision, text embeddings and norm, lm_head, vision blocks, then text layers."""
    if name.startswith(V + "blocks."):
        return 3, int(name.split(".")[3]), 0
    if name.startswith(T + "layers."):
        rest = name.split(".", 4)[4]
        rank = next((j for j, k in enumerate(_HF_LAYER_ORDER) if rest.startswith(k)), len(_HF_LAYER_ORDER))
        return 4, int(name.split(".")[3]), rank
    return (0 if name.startswith(V) else 2 if name == "lm_head.weight" else 1), 0, 0


def hf_shapes(cfg: Glm4vConfig) -> dict:
    """Every tensor of a Hugging Face checkpoint for this config, with its shape (what demo checkpoints are made
    of), from the table's entries."""
    shapes = {s: shape for e in hf_table(cfg) for s, shape in zip(e.sources, e.source_shapes(cfg))}
    return {k: shapes[k] for k in sorted(shapes, key=_hf_order)}   # sorted() is stable: table order within a rank


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
    src_shapes = {s: shape for e in table for s, shape in zip(e.sources, e.source_shapes(cfg))}
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

"""GLM-4 text decoder over a static, pre-allocated KV cache; GLM-4.1V and GLM-4.5V as config choices of one layer.

Layer (GLM-4.1V): x + post_attn_norm(attn(input_norm(x))), then + post_mlp_norm(mlp(pre_mlp_norm(.))) (four norms).
Layer (GLM-4.5V, cfg.sandwich_norms False): x + attn(input_norm(x)), then + mlp(pre_mlp_norm(.)); the MLP is the
MoE block (moe.py) from layer first_k_dense_replace on.
Attention: fused q/k/v matmul (bias per config), M-RoPE on the first `rotary_dim` dims of q and k (rotate-half
form: see weights.py for GLM-4.1V's row permutation), grouped-query attention over the cache.
Tensor parallel (parallel.py): each rank builds its share of heads, MLP width and vocabulary; row-parallel
linears end in an all-reduce, the vocab-parallel head in an all-gather. One rank: no collective at all.

`CachedDecoder` binds the layers to one cache of fixed (batch, length) and runs under ms.jit: it compiles once
per input length, so decode (length 1) is one graph reused for every token.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .attention import causal_attention, decoder_attention, rms_norm, rope
from .config import TextConfig
from .layers import MLP, Embedding, Linear, Norm, _param
from .moe import MoE
from .parallel import Layout, all_gather, all_reduce, to_ranks


class Attention(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, lay: Layout = Layout()):
        super().__init__()
        self.cfg = cfg
        self.heads, self.kv_heads = cfg.num_attention_heads // lay.world, lay.kv_heads(cfg.num_key_value_heads)
        self.q_size, self.kv_size = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, dtype, bias=cfg.attention_bias)
        self.o = Linear(self.q_size, cfg.hidden_size, dtype, reduce=all_reduce(lay))
        self.enter = to_ranks(lay)

    def construct(self, x, cos, sin, seen, kv_len, write_idx, k_cache, v_cache, extent: int):
        c = self.cfg
        B, L, _ = x.shape
        if self.enter is not None:
            x = self.enter(x)
        qkv = self.qkv(x)
        nq, nkv = self.q_size, self.kv_size
        q = qkv[..., :nq].reshape(B, L, self.heads, c.head_dim)
        k = qkv[..., nq:nq + nkv].reshape(B, L, self.kv_heads, c.head_dim)
        v = qkv[..., nq + nkv:].reshape(B, L, self.kv_heads, c.head_dim)
        r = c.rotary_dim
        cs, sn = cos[:, :, None, :], sin[:, :, None, :]
        q = ops.cat([rope(q[..., :r], cs, sn), q[..., r:]], -1)
        k = ops.cat([rope(k[..., :r], cs, sn), k[..., r:]], -1)
        if k_cache is None:   # training (finetune/forward.py): this step's own keys and values; `seen` is then
            return self.o(causal_attention(q, k, v, seen, c.head_dim ** -0.5))   # attention.training_mask's
        # write this step's keys/values at their explicit cache slots, then attend over the first `extent` slots:
        # a prompt reads only the filled part (its scores grow with the prompt, not with max_new_tokens)
        kc = ops.scatter_nd_update(k_cache, write_idx, k.transpose(0, 2, 1, 3))
        vc = ops.scatter_nd_update(v_cache, write_idx, v.transpose(0, 2, 1, 3))
        if extent < k_cache.shape[2]:   # slice the updated caches (the outputs), so the reads follow the writes
            kc, vc = kc[:, :, :extent], vc[:, :, :extent]
        o = decoder_attention(q, kc, vc, seen, kv_len, c.head_dim ** -0.5)
        return self.o(o)


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, index: int = 0, lay: Layout = Layout()):
        super().__init__()
        self.eps, self.sandwich = cfg.rms_norm_eps, cfg.sandwich_norms
        self.input_norm = Norm(cfg.hidden_size, dtype)
        self.attn = Attention(cfg, dtype, lay)
        self.post_attn_norm = Norm(cfg.hidden_size, dtype) if self.sandwich else None
        self.pre_mlp_norm = Norm(cfg.hidden_size, dtype)
        if cfg.is_moe_layer(index):
            self.mlp = MoE(cfg, dtype, lay)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, lay)
        self.post_mlp_norm = Norm(cfg.hidden_size, dtype) if self.sandwich else None

    def construct(self, x, cos, sin, seen, kv_len, write_idx, k_cache, v_cache, extent: int):
        e = self.eps
        a = self.attn(rms_norm(x, self.input_norm.weight, e), cos, sin, seen, kv_len, write_idx, k_cache, v_cache,
                      extent)
        x = x + (rms_norm(a, self.post_attn_norm.weight, e) if self.sandwich else a)
        m = self.mlp(rms_norm(x, self.pre_mlp_norm.weight, e))
        return x + (rms_norm(m, self.post_mlp_norm.weight, e) if self.sandwich else m)


class TextModel(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype, lay: Layout = Layout()):
        super().__init__()
        self.cfg, self.layout = cfg, lay
        self.kv_heads = lay.kv_heads(cfg.num_key_value_heads)   # per rank: the KV cache's head count
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, lay)
        self.layers = nn.CellList([DecoderLayer(cfg, dtype, i, lay) for i in range(cfg.num_hidden_layers)])
        self.norm = Norm(cfg.hidden_size, dtype)
        self.gather = all_gather(lay)   # the vocab-parallel lm_head's slices of the logits

    def share_layer_graphs(self):
        """Ascend: layers of the same structure become one subgraph, compiled once and called per layer (what
        `mindspore.lazy_inline` does for mindformers' decoders: its decorator sets `cell_init_args`, the key by
        which the compiler finds reusable cells; set here from each layer's structure, not its index, and again
        after GPTQ layers were swapped in, which may differ layer by layer). Compiling then does not grow with
        the depth. Not on CPU: its backend cannot run an un-inlined subgraph (MindSpore 2.10: "Input[0] must be
        a Primitive ValueNode"), and inlining after parsing (policy "front") compiled no faster there."""
        import hashlib
        for layer in self.layers:
            parts = [f"{n}:{type(c).__name__}" for n, c in layer.cells_and_names()]
            parts += [f"{tuple(p.shape)}:{p.dtype}" for p in layer.get_parameters()]
            layer.cell_init_args = "lazy_inline_DecoderLayer_" + hashlib.sha256("|".join(parts).encode()).hexdigest()

    def gather_logits(self, logits):
        """(B, L, V/world) on each rank -> (B, L, V) everywhere (all-gather concatenates on axis 0)."""
        if self.gather is None:
            return logits
        return self.gather(logits.transpose(2, 0, 1)).transpose(1, 2, 0)


class CachedDecoder(nn.Cell):
    """The decoder bound to one static KV cache of shape (batch, kv_heads, max_len, head_dim) per layer.

    Inputs are host-made (model.py): embeddings (B, L, D), cos/sin (B, L, R), the cache slot of each query
    (B, L), which cache slots hold real tokens (B, S), and scatter indices (B, Hkv, L, 3) for the writes.
    A query sees slot s when s <= its own slot and s is real: causal and left-padding masking in one rule.
    `extent` (a graph constant): the queries attend over cache slots [0, extent) only; model.run sets it to the
    end of the prompt chunk (rounded, so few graphs) and to the whole cache for a decode step."""

    def __init__(self, text: TextModel, lm_head: Parameter, batch: int, max_len: int):
        super().__init__()
        c = text.cfg
        self.text, self.lm_head, self.eps = text, lm_head, c.rms_norm_eps
        dtype = lm_head.dtype
        shape = (batch, text.kv_heads, max_len, c.head_dim)
        n = c.num_hidden_layers
        self.k = ParameterTuple([_param(shape, dtype, f"cache.k.{i}") for i in range(n)])
        self.v = ParameterTuple([_param(shape, dtype, f"cache.v.{i}") for i in range(n)])
        self.slots = Tensor(np.arange(max_len, dtype=np.int32))
        self.batch, self.max_len = batch, max_len

    @ms.jit
    def construct(self, h, cos, sin, q_slot, kv_valid, write_idx, last_only: bool, extent: int):
        return self.forward(h, cos, sin, q_slot, kv_valid, write_idx, last_only, extent)

    def forward(self, h, cos, sin, q_slot, kv_valid, write_idx, last_only: bool, extent: int, states=None):
        """The graph's body; called eagerly with a `states` list, it also records each layer's output and the
        final norm's (the parity harness)."""
        if extent < self.max_len:
            seen = (self.slots[None, None, :extent] <= q_slot[:, :, None]) & kv_valid[:, None, :extent]  # (B, L, E)
        else:
            seen = (self.slots[None, None, :] <= q_slot[:, :, None]) & kv_valid[:, None, :]              # (B, L, S)
        kv_len = (q_slot[:, -1] + 1).astype(ms.int64)   # slots written so far: the fused kernel reads no further
        cos, sin = cos.astype(h.dtype), sin.astype(h.dtype)   # the reference rotates in the activation dtype
        for i in range(len(self.text.layers)):
            h = self.text.layers[i](h, cos, sin, seen, kv_len, write_idx, self.k[i], self.v[i], extent)
            if states is not None:
                states.append((f"text.layers.{i}", h))
        if last_only:
            h = h[:, -1:]
        h = rms_norm(h, self.text.norm.weight, self.eps)
        if states is not None:
            states.append(("text.norm", h))
        return self.text.gather_logits(ops.dense(h, self.lm_head))

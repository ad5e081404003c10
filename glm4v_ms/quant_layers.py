"""GPTQ's MindSpore side: the quantized linear (WeightQuantBatchMatmul, or its CPU emulation), the swap of a model's
text linears for it, and the bytes it holds. The format (tensors, dynamic rules, dequantization, the kernel's
layout) is quant.py's, NumPy only; see its docstring for the layouts.

Training on a quantized base (LoRA, finetune/lora.py): the quantized weights stay frozen, a linear's `lora` delta
is added to its output as on text.Linear, and the gradient reaches earlier layers through dx = dy @ dequant(W)^T.
MindSpore 2.10 defines no backward for WeightQuantBatchMatmul ("bprop not defined"), so _QuantMatmul gives it one.
"""
from __future__ import annotations

import types

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from . import ascend_emulation, attention
from .quant import Packed, QuantView, pack_int4, view
from .safetensors_io import Checkpoint


def _kernel():
    if attention.mode() == "ascend":
        return ops.auto_generate.weight_quant_batch_matmul
    return ascend_emulation.weight_quant_batch_matmul


def _backward_kernel():
    """The same kernel as a distinct function object: MindSpore 2.10's graph mode fails ("The func graph is empty")
    when a Cell's bprop calls the very Python function its construct calls, and the forward calls _kernel()'s."""
    f = _kernel()
    return types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_bprop", f.__defaults__, f.__closure__)


_mm_nt = ops.MatMul(transpose_b=True)


class _QuantMatmul(nn.Cell):
    """x (m, k) @ dequant(W) (k, n) through the kernel, with the backward to x: dx = dy @ dequant(W)^T. W, its scales
    and offsets are inputs (a bprop may not read Parameters); they are frozen, so their "gradients" are never used:
    returned as themselves (there is no zeros kernel for qint4x2).
    dequant(W) for the backward: int8 by plain ops, (w + offset) * scale per group, the kernel's documented formula;
    int4 through the kernel itself on the identity, I @ dequant(W), since no other documented op reads qint4x2
    (exact: one nonzero term per output; costs k^2 n multiply-adds, k times a one-row forward)."""

    def __init__(self, group: int, int4: bool):
        super().__init__()
        self.group, self.int4 = group, int4
        self.fwd, self.bwd = _kernel(), _backward_kernel()

    def construct(self, x, w, scale, offset):
        return self.fwd(x, w, scale, offset, None, None, None, False, False, self.group)

    def bprop(self, x, w, scale, offset, out, dout):
        k = x.shape[1]
        if self.int4:
            dq = self.bwd(ops.eye(k, k, x.dtype), w, scale, offset, None, None, None, False, False, self.group)
        else:
            G, n = scale.shape
            gs = k // G
            s = scale.reshape(G, 1, n).broadcast_to((G, gs, n)).reshape(k, n)
            o = offset.reshape(G, 1, n).broadcast_to((G, gs, n)).reshape(k, n)
            dq = (w.astype(x.dtype) + o) * s
        return _mm_nt(dout, dq), w, scale, offset


def _const(arr, dtype, name):
    return Parameter(Tensor(arr, dtype), name=name, requires_grad=False)


def _floats(arr, dtype, name):
    t = Tensor(np.asarray(arr, np.float32))
    return Parameter(t if dtype == ms.float32 else t.astype(dtype), name=name, requires_grad=False)


class QuantLinear(nn.Cell):
    """y = x @ dequant(W) + b through WeightQuantBatchMatmul, W kept quantized (see the module docstring).
    The bias is added apart: the kernel wants it in float32 when x is bfloat16. `lora`: as text.Linear's."""

    def __init__(self, p: Packed, dtype, bias: bool):
        super().__init__()
        self.k, self.n = p.w.shape
        self.group = 0 if p.scale.shape[0] == 1 else p.group   # one group: the per-channel form
        self.qweight = (_const(pack_int4(p.w), ms.qint4x2, "qweight") if p.bits == 4
                        else _const(p.w, ms.int8, "qweight"))
        # in x's dtype (the kernel's contract): fp16 scales are exact in float32 and float16; bfloat16 rounds them
        self.scales = _floats(p.scale, dtype, "scales")
        self.offsets = _floats(p.offset, dtype, "offsets")   # integers up to 2^8: exact in every float dtype
        self.perm = None if p.perm is None else _const(p.perm, ms.int32, "perm")
        self.bias = Parameter(ms.common.initializer.initializer("zeros", (self.n,), dtype), name="bias",
                              requires_grad=False) if bias else None
        self.mm = _QuantMatmul(self.group, p.bits == 4)
        self.lora = None   # finetune/lora.py

    def construct(self, x):
        lead = x.shape[:-1]
        h = x.reshape(-1, self.k)
        if self.perm is not None:   # act-order: the rows were sorted by group, so the inputs are too
            h = ops.gather(h, self.perm, 1)
        y = self.mm(h, self.qweight, self.scales, self.offsets)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(lead + (self.n,))
        return y if self.lora is None else y + self.lora(x).astype(y.dtype)


class SplitLinear(nn.Cell):
    """A fused layer whose parts differ in bits / group size / row order: one quantized matmul each, outputs
    concatenated in the fused layer's order."""

    def __init__(self, parts: list, dtype, bias: bool):
        super().__init__()
        self.parts = nn.CellList([QuantLinear(p, dtype, False) for p in parts])
        self.k, self.n = parts[0].w.shape[0], sum(p.w.shape[1] for p in parts)
        self.bias = Parameter(ms.common.initializer.initializer("zeros", (self.n,), dtype), name="bias",
                              requires_grad=False) if bias else None
        self.lora = None   # one delta over the fused output, as on text.Linear (finetune/lora.py)

    def construct(self, x):
        y = ops.cat([p(x) for p in self.parts], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if self.lora is None else y + self.lora(x).astype(y.dtype)


def install(model, folder: str) -> set:
    """On the Ascend path (ascend or emulated kernels), replace the model's quantized text linears by QuantLinear /
    SplitLinear cells holding the checkpoint's integers; returns the table entries the float loader must skip.
    A module the kernel cannot take (group size not a multiple of 32, unequal act-order groups) stays float,
    dequantized at load. In plain mode nothing changes: every weight is dequantized at load."""
    from .kernel_limits import weight_quant_batch_matmul
    if attention.mode() == "plain" or weight_quant_batch_matmul(1, 1, 0, model.dtype, attention.mode() == "emulated"):
        return set()   # plain mode, or activations in a dtype the kernel does not take (float32 on Ascend)
    v = view(Checkpoint(folder), model.config)
    if not isinstance(v, QuantView):
        return set()
    skip, floats = set(), []
    for e in v.quantized_entries():
        parts = v.packed(e)
        if parts is None:
            floats.append(e.ours[:-len(".weight")])
            continue
        *path, attr = e.ours[:-len(".weight")].split(".")
        parent = model
        for a in path:
            parent = parent[int(a)] if a.isdigit() else getattr(parent, a)
        bias = getattr(parent, attr).bias is not None
        cell = QuantLinear(parts[0], model.dtype, bias) if len(parts) == 1 else SplitLinear(parts, model.dtype, bias)
        setattr(parent, attr, cell)
        for name, prm in cell.parameters_and_names():   # full paths, as the float ones: a gradient graph (LoRA
            prm.name = f"{e.ours[:-len('.weight')]}.{name}"   # training) refuses two parameters of one name
        skip.add(e.ours)
    if floats:   # said once, not silently: these cost float memory and speed
        import warnings
        warnings.warn(f"{len(floats)} GPTQ module(s) run dequantized in {model.dtype} (e.g. {floats[0]}): the "
                      f"quantized matmul needs equal-size groups, group sizes a multiple of 32, float16-range "
                      f"scales, and a split MLP quantized in both halves", stacklevel=3)
    return skip


_ITEM = {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2, ms.int8: 1, ms.qint4x2: 1, ms.int32: 4}


def weight_bytes(model) -> tuple:
    """(all weights, the quantized linears' share) in bytes: qint4x2 holds two values a byte (its shape is the
    packed one)."""
    total = quant = 0
    for name, p in model.parameters_and_names():
        if name.startswith("cache."):
            continue
        b = int(np.prod(p.shape)) * _ITEM[p.dtype]
        total += b
        if name.endswith((".qweight", ".scales", ".offsets", ".perm")):
            quant += b
    return total, quant




def _backward_bytes(k: int, n: int, bits: int, item: int) -> int:
    # _QuantMatmul.bprop: dequant(W) (k, n), and for int4 the identity (k, k) it is made from
    return item * (k * n + (k * k if bits == 4 else 0))


def backward_peak(model) -> int:
    """The largest transient of the quantized linears' backward in this model (they run one at a time)."""
    return max((_backward_bytes(c.k, c.n, 4 if c.qweight.dtype == ms.qint4x2 else 8, _ITEM[model.dtype])
                for _, c in model.cells_and_names() if isinstance(c, QuantLinear)), default=0)


def backward_peak_estimate(cfg, qcfg, item: int) -> int:
    """backward_peak from a config and a GPTQ quantization_config (the 9B plan), with quant.estimate_bytes'
    assumptions: q/k/v one matmul where they agree, GPTQModel's gate/up halves likewise, a split MLP with a float
    half dequantized (no quantized backward)."""
    from .quant import split_names
    from .weights import hf_shapes
    shapes, peak = hf_shapes(cfg), 0
    for i in range(cfg.text.num_hidden_layers):
        L = f"model.language_model.layers.{i}."
        groups = [[L + f"self_attn.{x}_proj" for x in "qkv"], [L + "self_attn.o_proj"],
                  list(split_names(L + "mlp.gate_up_proj")), [L + "mlp.down_proj"]]
        for mods in groups:
            if L + "mlp.gate_proj" in mods:
                N, K = shapes[L + "mlp.gate_up_proj.weight"]
                dims = [(N // 2, K)] * 2
            elif mods[0] + ".weight" in shapes:
                dims = [shapes[m + ".weight"] for m in mods]
            else:
                continue   # a MoE layer's MLP: not in the dense model's table
            specs = [qcfg.resolve(m)[0] for m in mods]
            if None in specs:
                continue
            if len({(s.bits, s.group_size, s.desc_act) for s in specs}) == 1:
                dims, specs = [(sum(d[0] for d in dims), dims[0][1])], specs[:1]
            peak = max([peak] + [_backward_bytes(K, N, s.bits, item) for (N, K), s in zip(dims, specs)])
    return peak

"""GPTQ's MindSpore side: the quantized linear (WeightQuantBatchMatmul, or its CPU emulation), the swap of a model's
text linears for it, and the bytes it holds. The format (tensors, dynamic rules, dequantization, the kernel's
layout) is quant.py's, NumPy only; see its docstring for the layouts.
"""
from __future__ import annotations

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


def _const(arr, dtype, name):
    return Parameter(Tensor(arr, dtype), name=name, requires_grad=False)


def _floats(arr, dtype, name):
    t = Tensor(np.asarray(arr, np.float32))
    return Parameter(t if dtype == ms.float32 else t.astype(dtype), name=name, requires_grad=False)


class QuantLinear(nn.Cell):
    """y = x @ dequant(W) + b through WeightQuantBatchMatmul, W kept quantized (see the module docstring).
    The bias is added apart: the kernel wants it in float32 when x is bfloat16."""

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

    def construct(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.k)
        if self.perm is not None:   # act-order: the rows were sorted by group, so the inputs are too
            x = ops.gather(x, self.perm, 1)
        y = _kernel()(x, self.qweight, self.scales, self.offsets, None, None, None, False, False, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(lead + (self.n,))


class SplitLinear(nn.Cell):
    """A fused layer whose parts differ in bits / group size / row order: one quantized matmul each, outputs
    concatenated in the fused layer's order."""

    def __init__(self, parts: list, dtype, bias: bool):
        super().__init__()
        self.parts = nn.CellList([QuantLinear(p, dtype, False) for p in parts])
        n = sum(p.w.shape[1] for p in parts)
        self.bias = Parameter(ms.common.initializer.initializer("zeros", (n,), dtype), name="bias",
                              requires_grad=False) if bias else None

    def construct(self, x):
        y = ops.cat([p(x) for p in self.parts], -1)
        return y if self.bias is None else y + self.bias


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



"""Tiny GPTQ checkpoints in the exact on-disk format, packed here with numpy (independently of glm4v_ms.quant),
and their reference: transformers' float model holding the same weights dequantized by the documented formula
W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]) (z = stored zero + 1 in the v1 format).

Round-to-nearest: the GPTQ Hessian update only changes which integers are stored, not the format.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

import tinyref
import torch

TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                "mlp.down_proj")


def rtn(W, bits, gs, sym, act_order, v2, rng, perm=None):
    """W (out, in) float32 -> GPTQ tensors and the dequantized (out, in) weight. perm: the act-order processing
    order (random when not given)."""
    out_f, in_f = W.shape
    maxq = 2 ** bits - 1
    gs = in_f if gs == -1 else gs
    G = in_f // gs
    g_idx = np.arange(in_f) // gs
    if act_order:   # the i-th processed column goes to group i // gs
        perm = rng.permutation(in_f) if perm is None else perm
        g_idx = np.empty(in_f, np.int64)
        g_idx[perm] = np.arange(in_f) // gs
    Wt = W.T.astype(np.float32)
    scale, zero = np.zeros((G, out_f), np.float32), np.zeros((G, out_f), np.int64)
    for g in range(G):
        rows = Wt[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        s = (hi - lo) / maxq
        s[s == 0] = 1
        scale[g] = s
        zero[g] = (maxq + 1) // 2 if sym else np.round(-lo / s)
    if not v2:
        zero = np.clip(zero, 1, maxq)      # v1 stores z - 1: it cannot hold a zero point of 0
    scale = scale.astype(np.float16)
    q = np.clip(np.round(Wt / scale.astype(np.float32)[g_idx] + zero[g_idx]), 0, maxq).astype(np.int64)
    stored_zero = zero if v2 else zero - 1
    pf = 32 // bits
    qw = np.zeros((in_f // pf, out_f), np.uint32)
    for j in range(pf):
        qw |= q[j::pf].astype(np.uint32) << np.uint32(bits * j)
    qz = np.zeros((G, out_f // pf), np.uint32)
    for j in range(pf):
        qz |= stored_zero[:, j::pf].astype(np.uint32) << np.uint32(bits * j)
    t = {"qweight": qw.view(np.int32), "qzeros": qz.view(np.int32), "scales": scale, "g_idx": g_idx.astype(np.int32)}
    deq = (scale.astype(np.float32)[g_idx] * (q - zero[g_idx]).astype(np.float32)).T
    return t, np.ascontiguousarray(deq)


def resolve(qc, module):
    """bits/group_size/desc_act/sym for a module, or None (float): dynamic keys, first re.match wins."""
    base = {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym")}
    for key, over in (qc.get("dynamic") or {}).items():
        pat = key[2:] if key[:2] in ("-:", "+:") else key
        if re.match(pat, module):
            return None if key.startswith("-:") else {**base, **over}
    return base


# GPTQModel's glm4v definition (gptqmodel/models/definitions/glm4v.py): before quantizing it replaces the text
# MLP by one with separate gate_proj and up_proj (Glm4vTextMLPNew: the fused weight split at intermediate_size, gate
# first), and quantizes module_tree's subsets `q_proj:0 k_proj:0 v_proj:0 o_proj:1` and `gate_proj:0 up_proj:0
# down_proj:1`. The modules of one `:0` subset see the same inputs, hence the same Hessian, hence (act-order sorts
# the columns by the Hessian's diagonal) the same processing order.
SPLIT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
SUBSETS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
           "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp"}


def gptqmodel_config(qc):
    """quantization_config as GPTQModel 7.6 writes it (config.json and quantize_config.json): its base fields, the
    `dynamic` rules as given (keys with their +:/-: prefixes), both format spellings, and its meta block."""
    fmt = qc.get("checkpoint_format", "gptq")
    return {"bits": qc["bits"], "group_size": qc["group_size"], "desc_act": qc["desc_act"], "sym": qc["sym"],
            "lm_head": False, "quant_method": "gptq", "method": "gptq", "checkpoint_format": fmt, "format": fmt,
            "pack_dtype": "int32", "dynamic": qc.get("dynamic") or {},
            "meta": {"quantizer": ["gptqmodel:7.6.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                     "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False,
                     "true_sequential": True, "mse": 0.0, "v2": False, "v2_alpha": 0.25}}


def split_mlp(tensors, intermediate):
    """GPTQModel's Glm4vTextMLPNew: mlp.gate_up_proj.weight -> mlp.gate_proj.weight (rows [0, I)) and up_proj."""
    for name in [k for k in tensors if k.endswith("mlp.gate_up_proj.weight") and ".language_model." in k]:
        w = tensors.pop(name)
        assert w.shape[0] == 2 * intermediate
        head = name[:-len("gate_up_proj.weight")]
        tensors[head + "gate_proj.weight"], tensors[head + "up_proj.weight"] = w[:intermediate], w[intermediate:]
    return tensors


def quantize_folder(float_dir, dst, qc, rng_seed=0, share_qkv_order=False, layout="fused"):
    """Copy a float checkpoint folder to dst with its text linears quantized per qc (a quantization_config);
    returns {float weight name of transformers' model: dequantized array}.
    layout "fused": transformers' modules (mlp.gate_up_proj) quantized as they are; share_qkv_order: q/k/v of a
    layer get one act-order permutation, otherwise each module draws its own.
    layout "gptqmodel": as GPTQModel makes it: the MLP split first, each module quantized with its `dynamic`
    spec, one act-order permutation per subset (q/k/v; gate/up), GPTQModel's quantization_config."""
    shutil.copytree(float_dir, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(os.path.join(float_dir, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    gm = layout == "gptqmodel"
    if gm:
        split_mlp(tensors, cfg["text_config"]["intermediate_size"])
    rng = np.random.default_rng(rng_seed)
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    deq, shared = {}, {}
    for name in sorted(tensors):
        m = name[:-len(".weight")]
        if not (name.endswith(".weight") and ".language_model.layers." in name
                and m.endswith(SPLIT_LINEARS if gm else TEXT_LINEARS)):
            continue
        spec = resolve(qc, m)
        if spec is None:
            continue
        W = tensors.pop(name)
        perm = None
        sub = next((v for k, v in SUBSETS.items() if m.endswith(k)), None) if gm else (
            "attn" if share_qkv_order and re.search(r"self_attn\.[qkv]_proj$", m) else None)
        if sub:
            perm = shared.setdefault((m.rsplit(".", 2)[0], sub), rng.permutation(W.shape[1]))
        t, d = rtn(W, spec["bits"], spec["group_size"], spec["sym"], spec["desc_act"], v2, rng, perm)
        tensors.update({f"{m}.{k}": v for k, v in t.items()})
        deq[name] = d
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if gm:
        deq = fuse_mlp({**{k: v for k, v in tensors.items() if k.endswith("_proj.weight")}, **deq})
        qconf = gptqmodel_config(qc)
        with open(os.path.join(dst, "quantize_config.json"), "w") as f:
            json.dump(qconf, f, indent=2)
    else:
        qconf = dict(qc, quant_method="gptq")
    cfg["quantization_config"] = qconf
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return deq


def fuse_mlp(weights):
    """The inverse of split_mlp for transformers' float model: gate_proj/up_proj weights (float or dequantized) ->
    gate_up_proj; other entries pass through."""
    out = dict(weights)
    for g in [k for k in weights if k.endswith("mlp.gate_proj.weight") and ".language_model." in k]:
        head = g[:-len("gate_proj.weight")]
        out[head + "gate_up_proj.weight"] = np.concatenate([out.pop(g), out.pop(head + "up_proj.weight")], 0)
    return out


def build(dst, qc, seed=0, rng_seed=0, share_qkv_order=False, layout="fused"):
    """A GPTQ folder at dst made from a tiny random transformers model; returns (the reference model holding the
    dequantized weights, dst)."""
    float_dir = str(dst) + "-float"
    ref = tinyref.build(float_dir, seed=seed)
    deq = quantize_folder(float_dir, str(dst), qc, rng_seed, share_qkv_order, layout)
    with torch.no_grad():
        sd = ref.state_dict()
        for name, d in deq.items():
            sd[name].copy_(torch.from_numpy(d))
    return ref, str(dst)


def dequantized_state(folder):
    """The float tensors of a GPTQ folder, dequantized by the formula (for a checkpoint written by someone else,
    e.g. our converter's --quantize), a split MLP fused back into transformers' gate_up_proj."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    qc = cfg["quantization_config"]
    v2 = qc.get("checkpoint_format") == "gptq_v2"
    t = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            t.update(load_file(os.path.join(folder, fn)))
    out = {}
    for k in list(t):
        if not k.endswith(".qweight"):
            if not k.endswith((".qzeros", ".scales", ".g_idx")):
                out[k] = t[k]
            continue
        m = k[:-len(".qweight")]
        bits = resolve(qc, m)["bits"]
        pf, mask = 32 // bits, (1 << bits) - 1
        w, zz = t[k].view(np.uint32), t[m + ".qzeros"].view(np.uint32)
        q = np.stack([(w >> np.uint32(bits * j)) & mask for j in range(pf)], 1).reshape(-1, w.shape[1]).astype(np.int64)
        z = np.stack([(zz >> np.uint32(bits * j)) & mask for j in range(pf)], 2).reshape(zz.shape[0], -1).astype(np.int64)
        z += 0 if v2 else 1
        g = t[m + ".g_idx"].astype(np.int64)
        out[m + ".weight"] = np.ascontiguousarray((t[m + ".scales"].astype(np.float32)[g] * (q - z[g]).astype(np.float32)).T)
    return fuse_mlp(out)

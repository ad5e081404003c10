"""Tiny random GLM-4.5V checkpoints made by transformers' own Glm4vMoeForConditionalGeneration.

Everything random that could hide a mistake: norms, q/k/v biases, the router's e_score_correction_bias (a
buffer, so set explicitly), every expert. head_dim (32) differs from hidden/heads (16), as GLM-4.5V's 128 does
from 4096/96. Two configs: `real`, routed like GLM-4.5V (one group, scaling 1.0), and `grouped`, with
group-limited selection (4 groups, 2 kept) and routed_scaling_factor 2.5, so that both are exercised.
"""
from __future__ import annotations

import numpy as np

import reference  # noqa: F401  (torchvision schemas before transformers)
import torch
from tinyref import IDS
from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

ROUTING = {
    "real": dict(n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True),
    "grouped": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
}


def tiny_config(routing="real", ids=None, **text_over):
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=3,
                n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=2048, attention_bias=True,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5},
                **ROUTING[routing])
    text.update(text_over)
    vision = dict(depth=2, hidden_size=64, num_heads=2, out_hidden_size=64, intermediate_size=80, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, image_size=336, rms_norm_eps=1e-5)
    return Glm4vMoeConfig(text_config=text, vision_config=vision, **(ids or IDS))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:   # experts are (E, out, in): the fan-in is the last dim
                fan_in = p.shape[-1] if ".experts." in name else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # comparable to the sigmoid scores: it changes choices
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
    return model


def build(folder, seed=0, routing="real", ids=None, **text_over):
    """Save a random reference model into folder; return it (fp32, eval). ids: the structure token ids."""
    torch.manual_seed(seed)
    model = randomize(Glm4vMoeForConditionalGeneration(tiny_config(routing, ids, **text_over)).eval(), seed)
    model.save_pretrained(folder)
    return model

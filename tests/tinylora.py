"""Fine-tuning fixtures: tiny transformers-made checkpoints (tinyref / tinymoe), PEFT adapters on them with nonzero
B (so that A gets gradients too), and trained samples (labels -100 outside the answer) in a right-padded batch, the
way the data pipeline's collate lays them out."""
from __future__ import annotations

import numpy as np

import reference  # noqa: F401  (torchvision schemas before transformers)
import tinymoe
import tinyref
import torch
from peft import LoraConfig, get_peft_model
from transformers import Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration

TEXT = {"v": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
        "moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
REF = {"v": Glm4vForConditionalGeneration, "moe": Glm4vMoeForConditionalGeneration}


def text_regex(kind):
    """The language model's linears (ms-swift's form of LLaMA-Factory's `all`)."""
    return r"^(model\.language_model(?=\.).*\.(" + "|".join(TEXT[kind]) + r"))$"


def build(kind, folder, seed=1):
    return (tinyref if kind == "v" else tinymoe).build(folder, seed=seed)


def reference(kind, folder):
    return REF[kind].from_pretrained(folder).eval()


def peft_model(kind, folder, target_modules=None, r=4, alpha=8, rslora=False, seed=0, b_scale=0.1):
    """transformers + PEFT on the base in `folder`, B filled with random values."""
    pm = get_peft_model(reference(kind, folder), LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=target_modules or text_regex(kind),
        task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(b_scale * torch.randn(p.shape, generator=g))
    return pm


def answer_labels(inputs, n):
    """The last n tokens trained, the rest -100."""
    lab = np.full_like(inputs["input_ids"], -100)
    lab[:, -n:] = inputs["input_ids"][:, -n:]
    return lab


def right_padded(*pairs):
    """(inputs, labels) pairs -> one right-padded batch (pads: id 0, mask 0, label -100)."""
    L = max(x["input_ids"].shape[1] for x, _ in pairs)

    def pad(a, v):
        return np.pad(a, ((0, 0), (0, L - a.shape[1])), constant_values=v)
    out = {k: np.concatenate([pad(x[k], 0) for x, _ in pairs]) for k in ("input_ids", "attention_mask",
                                                                          "mm_token_type_ids")}
    for k in ("pixel_values", "image_grid_thw"):
        parts = [x[k] for x, _ in pairs if k in x]
        if parts:
            out[k] = np.concatenate(parts)
    return out, np.concatenate([pad(y, -100) for _, y in pairs])


def one_sample(seed=1):
    x = tinyref.Prompt(seed).text(4).image(6, 8).text(9).inputs()
    return x, answer_labels(x, 6)


def padded_batch():
    a = tinyref.Prompt(1).text(4).image(6, 8).text(9).inputs()
    b = tinyref.Prompt(2).text(3).image(4, 4).text(5).inputs()
    return right_padded((a, answer_labels(a, 6)), (b, answer_labels(b, 4)))


def torch_inputs(x):
    return {k: torch.from_numpy(v) for k, v in x.items()}


def peft_loss_and_grads(pm, x, labels):
    pm.zero_grad()
    out = pm(**torch_inputs(x), labels=torch.from_numpy(labels))
    out.loss.backward()
    return out.loss.item(), {n.replace(".default", ""): p.grad.numpy().copy() for n, p in pm.named_parameters()
                             if "lora_" in n}

"""Which weights a full or freeze fine-tune trains: LLaMA-Factory 0.9.5's rules (model/adapter.py
`_setup_full_tuning`, `_setup_freeze_tuning`; model/model_utils/visual.py `get_forbidden_modules`), applied to
transformers' parameter names and carried over to ours through the one weight table (weights.hf_table).

- Forbidden keys (substrings of a transformers name): `visual.patch_embed`, `visual.blocks` while
  freeze_vision_tower; `visual.merger` while freeze_multi_modal_projector; `language_model`, `lm_head` while
  freeze_language_model. So with the tower "frozen" its other tensors (`visual.embeddings`,
  `post_conv_layernorm`, `post_layernorm`, `downsample`) still train, as in LLaMA-Factory: we keep that rule
  (the gradient then runs back through the frozen blocks to the position table).
- full: every parameter not forbidden.
- freeze: the layer ids are the text model's last n (freeze_trainable_layers n > 0) or first |n| (n < 0); each
  freeze_trainable_modules entry m (or `all`) gives the key `.{id}.{m}` (`.{id}.`), matched as a substring (so a
  vision block with the same index matches too, when the tower is not frozen); m must be a "hidden module" (the
  name after a `.0.` or `.1.`); freeze_extra_modules entries must be a "non-hidden module" (the next-to-last part
  of a name without a layer index) and are matched as substrings too; the projector joins when not frozen.
  An unknown name is refused naming its key and the choices.
- Buffers are never trained (GLM-4.5V's e_score_correction_bias: our router_bias).

Our tensors fuse what transformers keeps apart (text q/k/v; vision and merger gate/up; GLM-4.5V's dense gate/up):
a rule that trains part of a fused tensor (e.g. freeze_extra_modules gate_proj: the merger's gate_proj but not its
up_proj) is refused by name rather than masked, so that a trained tensor is trained whole and an untrained one is
never touched (no masked weight decay, no partial optimizer state). Tied embeddings with a trained embedding are
refused likewise (ours holds the head apart from the embedding).

Everything here reads the config alone (no MindSpore): `check(args, folder)` runs before the data and the model.
"""
from __future__ import annotations

import json
import os
import re

from ..config import Glm4vConfig
from ..weights import hf_table
from .args import FinetuneError

VISION_KEYS = ("visual.patch_embed", "visual.blocks")
PROJECTOR_KEYS = ("visual.merger",)
LANGUAGE_KEYS = ("language_model", "lm_head")
BUFFERS = (".mlp.gate.e_score_correction_bias",)


def hf_parameters(cfg: Glm4vConfig) -> dict:
    """Our parameter name -> the transformers 5 parameter names it holds (named_parameters' names: GLM-4.5V's
    routed experts are one fused 3-D parameter per layer there; buffers hold none)."""
    out = {}
    for e in hf_table(cfg):
        if e.per_expert:
            layer = e.sources[0].split(".mlp.experts.")[0]
            out[e.ours] = [f"{layer}.mlp.experts.{'gate_up_proj' if e.per_expert == 2 else 'down_proj'}"]
        elif cfg.tie_word_embeddings and e.ours == "lm_head.weight":
            out[e.ours] = []   # tied: transformers lists the embedding once
        else:
            out[e.ours] = [s for s in e.sources if not s.endswith(BUFFERS)]
    return out


def forbidden(args) -> set:
    keys = set()
    if args.freeze_vision_tower:
        keys.update(VISION_KEYS)
    if args.freeze_multi_modal_projector:
        keys.update(PROJECTOR_KEYS)
    if args.freeze_language_model:
        keys.update(LANGUAGE_KEYS)
    return keys


def trained_hf(names, num_layers: int, args) -> set:
    """LLaMA-Factory's trained set over transformers parameter names (see the module docstring)."""
    bad = forbidden(args)
    if args.finetuning_type == "full":
        return {n for n in names if not any(f in n for f in bad)}
    k = args.freeze_trainable_layers
    ids = range(max(0, num_layers - k), num_layers) if k > 0 else range(min(-k, num_layers))
    hidden, non_hidden = set(), set()
    for name in names:
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            non_hidden.add(name.split(".")[-2])
    keys = []
    for m in args.freeze_trainable_modules:
        if m != "all" and m not in hidden:
            raise FinetuneError(f"freeze_trainable_modules: {m} is not a module of this model's layers (choose "
                                f"from all, {', '.join(sorted(hidden))})")
        keys += [f".{i}.{m if m != 'all' else ''}" for i in ids]
    for m in args.freeze_extra_modules or []:
        if m not in non_hidden:
            raise FinetuneError(f"freeze_extra_modules: {m} is not a module of this model outside its layers "
                                f"(choose from {', '.join(sorted(non_hidden))})")
        keys.append(m)
    if not args.freeze_multi_modal_projector:
        keys += PROJECTOR_KEYS
    return {n for n in names if any(t in n for t in keys) and not any(f in n for f in bad)}


def select(cfg: Glm4vConfig, args) -> list:
    """Our trained parameter names, in the table's order; a partly trained fused tensor is refused by name."""
    table = hf_parameters(cfg)
    names = [n for ns in table.values() for n in ns]
    chosen = trained_hf(names, cfg.text.num_hidden_layers, args)
    out = []
    for ours, hf in table.items():
        on = [n for n in hf if n in chosen]
        if on and len(on) < len(hf):
            off = next(n for n in hf if n not in chosen)
            raise FinetuneError(f"finetuning_type {args.finetuning_type}: the modules asked for train {on[0]} but "
                                f"not {off}, which glm4v-ms holds in one tensor ({ours}): train both or neither")
        if on:
            out.append(ours)
    if cfg.tie_word_embeddings and "text.embed.weight" in out:
        raise FinetuneError("finetuning_type {}: this checkpoint ties lm_head to the embedding "
                            "(tie_word_embeddings), which glm4v-ms holds apart: training it is not "
                            "implemented".format(args.finetuning_type))
    if not out:
        raise FinetuneError(f"finetuning_type {args.finetuning_type}: these keys train no parameter")
    return out


def check(args, folder: str) -> list:
    """Before the data and the model: the base can be trained whole (not a GPTQ one) and saved as it came (a
    Hugging Face checkpoint, not a converted folder), and the keys select a trained set; returns our trained
    names."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        raise FinetuneError(f"model_name_or_path: {folder} holds no readable config.json") from None
    q = raw.get("quantization_config")
    if q:
        method = q.get("quant_method", "quantized") if isinstance(q, dict) else "quantized"
        raise FinetuneError(f"finetuning_type {args.finetuning_type}: {folder} is a {method.upper()} checkpoint; "
                            "quantized weights cannot be trained (LoRA on it: finetuning_type lora)")
    try:
        cfg = Glm4vConfig.from_pretrained(folder)
        from ..safetensors_io import Checkpoint
        from ..weights import is_converted
        converted = is_converted(Checkpoint(folder))
    except ValueError as e:
        raise FinetuneError(f"model_name_or_path: {' '.join(str(e).split())}") from None
    if converted:   # the output is a Hugging Face checkpoint shaped like the base (export.save_hf)
        raise FinetuneError(f"finetuning_type {args.finetuning_type}: {folder} is a glm4v_ms.convert output; give "
                            "the Hugging Face checkpoint it came from (the trained model is written in its layout)")
    return select(cfg, args)


def trainable(model) -> list:
    """The trained Parameters (model.trained_names, set by the trainer's setup) in the table's order."""
    params = dict(model.parameters_and_names())
    return [params[n] for n in getattr(model, "trained_names", ())]

"""GLM-4.1V / GLM-4.5V configuration, read from a checkpoint's config.json.

GLM-4.5V (model_type glm4v_moe) is a delta of the same dataclasses: two norms per layer instead of four, an
explicit head_dim, optional q/k/v bias, q/k rows already in rotate-half order, and MoE MLPs from layer
first_k_dense_replace on (TextConfig.n_routed_experts > 0).

Two layouts exist on the hub: the official one (`rope_scaling` with `mrope_section`, plus `partial_rotary_factor`
and `rope_theta` as plain fields, LLM fields often repeated at the top level) and transformers 5's
(`rope_parameters` inside `text_config`). Both become the same frozen dataclasses. A value that would change the
maths and that this port does not implement raises `ConfigError` instead of falling back to a default.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


MODEL_TYPES = ("glm4v", "glm4v_moe")


class ConfigError(ValueError):
    """config.json is missing, unreadable, or asks for something this port does not implement."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336
    out_hidden_size: int = 4096      # downsample output = LLM width; also the vision MLP width
    intermediate_size: int = 13696   # only the merger's GLU width
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def pos_grid(self) -> int:  # side of the learned position table (24 for the 9B model)
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple = (8, 12, 12)
    # GLM-4.5V deltas (the defaults are GLM-4.1V's)
    explicit_head_dim: int = 0          # config.json's head_dim where it differs from hidden/heads (GLM-4.5V: 128)
    attention_bias: bool = True
    sandwich_norms: bool = True         # four norms per layer (GLM-4.1V); False: plain pre-norm (GLM-4.5V)
    interleaved_rope_rows: bool = True  # checkpoint q/k rows in interleaved rotary pairs (GLM-4.1V), else rotate-half
    n_routed_experts: int = 0           # 0: every layer dense
    num_experts_per_tok: int = 1
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class Glm4vConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None   # the checkpoint's dtype, as config.json states it
    model_type: str = "glm4v"        # or "glm4v_moe" (GLM-4.5V)

    @classmethod
    def from_dict(cls, d: dict) -> "Glm4vConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json does not hold a JSON object")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {mt!r} in config.json (expected 'glm4v' or 'glm4v_moe')")
        vision = _vision_from(d.get("vision_config") or {})
        text = _text_from(d, moe=mt == "glm4v_moe")
        tie = d.get("tie_word_embeddings", (d.get("text_config") or {}).get("tie_word_embeddings", False))
        eos = _lookup(d, "eos_token_id", ())
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        ids = {k: int(d.get(k, getattr(cls, k))) for k in (
            "image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
            "video_start_token_id", "video_end_token_id")}
        if text.hidden_size != vision.out_hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size ({vision.out_hidden_size}) must equal the text "
                              f"hidden_size ({text.hidden_size})")
        return cls(vision=vision, text=text, tie_word_embeddings=bool(tie), eos_token_id=eos,
                   pad_token_id=_lookup(d, "pad_token_id", None),
                   torch_dtype=d.get("torch_dtype") or d.get("dtype") or (d.get("text_config") or {}).get("dtype"),
                   model_type=mt, **ids)

    @classmethod
    def from_pretrained(cls, folder: str) -> "Glm4vConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file (not a GLM-4.1V checkpoint folder)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _lookup(d: dict, key: str, default):
    """A text field: text_config first, then the top level (the official layout repeats LLM fields there)."""
    tc = d.get("text_config") or {}
    if key in tc and tc[key] is not None:
        return tc[key]
    if key in d and d[key] is not None:
        return d[key]
    return default


def _require(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def _vision_from(v: dict) -> VisionConfig:
    _require(v.get("hidden_act", "silu") == "silu", f"vision hidden_act {v.get('hidden_act')!r} is not implemented")
    _require(not v.get("attention_bias", False), "vision attention_bias=true is not implemented")
    rp = v.get("rope_parameters") or {}
    _require(rp.get("rope_type", "axial") == "axial", f"vision rope_type {rp.get('rope_type')!r} is not implemented")
    dflt = VisionConfig()
    kw = {k: type(getattr(dflt, k))(v[k]) for k in (
        "depth", "hidden_size", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
        "spatial_merge_size", "image_size", "out_hidden_size", "intermediate_size", "rms_norm_eps") if k in v}
    kw["rope_theta"] = float(rp.get("rope_theta", dflt.rope_theta))
    cfg = VisionConfig(**kw)
    _require(cfg.hidden_size % cfg.num_heads == 0, "vision hidden_size must be a multiple of num_heads")
    _require(cfg.head_dim % 4 == 0, "vision head_dim must be a multiple of 4 (2D rotary)")
    _require(cfg.image_size % cfg.patch_size == 0, "vision image_size must be a multiple of patch_size")
    return cfg


def _text_from(d: dict, moe: bool = False) -> TextConfig:
    tc = d.get("text_config") or {}
    act = _lookup(d, "hidden_act", "silu")
    _require(act == "silu", f"text hidden_act {act!r} is not implemented")
    dflt = TextConfig()
    kw = {}
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        val = _lookup(d, k, None)
        if val is not None:
            kw[k] = type(getattr(dflt, k))(val)
    # Rope: transformers 5 `rope_parameters`, else the official `rope_scaling` + plain fields.
    rp = tc.get("rope_parameters") or d.get("rope_parameters")
    if rp is None:
        rp = dict(_lookup(d, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", _lookup(d, "rope_theta", 10000.0))
        # The reference reads partial_rotary_factor with a default of 1.0 (rope over the whole head).
        rp.setdefault("partial_rotary_factor", _lookup(d, "partial_rotary_factor", 1.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    _require(rtype in ("default", "mrope"), f"text rope_type {rtype!r} is not implemented (only plain M-RoPE)")
    _require("mrope_section" in rp, "text rope parameters lack mrope_section")
    kw["rope_theta"] = float(rp.get("rope_theta", 10000.0))
    kw["partial_rotary_factor"] = float(rp.get("partial_rotary_factor", 1.0))
    kw["mrope_section"] = tuple(int(s) for s in rp["mrope_section"])
    hd = _lookup(d, "head_dim", None)
    if moe:
        kw.update(_moe_from(d))
        if hd is not None:
            kw["explicit_head_dim"] = int(hd)
    cfg = TextConfig(**kw)
    if not moe:
        _require(cfg.hidden_size % cfg.num_attention_heads == 0, "hidden_size must be a multiple of num_attention_heads")
        _require(hd is None or int(hd) == cfg.head_dim, f"head_dim {hd} != hidden_size/num_attention_heads")
    _require(cfg.num_attention_heads % cfg.num_key_value_heads == 0, "num_key_value_heads must divide num_attention_heads")
    _require(len(cfg.mrope_section) == 3, "mrope_section must have 3 entries (t, h, w)")
    _require(cfg.rotary_dim % 2 == 0 and 2 * sum(cfg.mrope_section) == cfg.rotary_dim,
             f"2*sum(mrope_section)={2 * sum(cfg.mrope_section)} must equal the rotary dim {cfg.rotary_dim} "
             f"(head_dim {cfg.head_dim} x partial_rotary_factor {cfg.partial_rotary_factor})")
    return cfg


def _moe_from(d: dict) -> dict:
    """GLM-4.5V's text fields (the defaults are transformers' Glm4vMoeTextConfig's)."""
    _require(not _lookup(d, "use_qk_norm", False), "use_qk_norm=true is not implemented (GLM-4.5V sets it false)")
    _require(_lookup(d, "topk_method", "noaux_tc") == "noaux_tc",
             f"topk_method {_lookup(d, 'topk_method', None)!r} is not implemented (only noaux_tc)")
    kw = dict(sandwich_norms=False, interleaved_rope_rows=False,
              attention_bias=bool(_lookup(d, "attention_bias", True)),
              n_routed_experts=int(_lookup(d, "n_routed_experts", 128)),
              num_experts_per_tok=int(_lookup(d, "num_experts_per_tok", 8)),
              n_shared_experts=int(_lookup(d, "n_shared_experts", 1)),
              moe_intermediate_size=int(_lookup(d, "moe_intermediate_size", 1408)),
              n_group=int(_lookup(d, "n_group", 1)), topk_group=int(_lookup(d, "topk_group", 1)),
              first_k_dense_replace=int(_lookup(d, "first_k_dense_replace", 1)),
              norm_topk_prob=bool(_lookup(d, "norm_topk_prob", True)),
              routed_scaling_factor=float(_lookup(d, "routed_scaling_factor", 1.0)))
    E, g = kw["n_routed_experts"], kw["n_group"]
    _require(E > 0 and g > 0 and E % g == 0, f"n_routed_experts {E} must be a positive multiple of n_group {g}")
    _require(E // g >= 2, f"each expert group needs at least 2 experts (its score is its top-2 sum), got {E // g}")
    _require(0 < kw["topk_group"] <= g, f"topk_group {kw['topk_group']} must be in 1..n_group ({g})")
    _require(0 < kw["num_experts_per_tok"] <= kw["topk_group"] * (E // g),
             f"num_experts_per_tok {kw['num_experts_per_tok']} exceeds the experts of the kept groups")
    return kw

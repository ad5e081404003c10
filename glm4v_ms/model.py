"""Glm4vForConditionalGeneration (GLM-4.1V) and Glm4vMoeForConditionalGeneration (GLM-4.5V): the vision tower's
features merged into the text, over a static KV cache. The two differ only in their config (text.py, moe.py).
AutoModelForImageTextToText picks one by config.json's model_type. `tensor_parallel_size` > 1 inside an msrun
launch splits the text model across the ranks (parallel.py); the vision tower runs whole on every rank.

Host side (NumPy): token types, 3D positions and rope deltas, cos/sin tables, cache slots and write indices.
Device side (MindSpore): the vision tower, then `CachedDecoder`: one jit graph per (batch, cache-length bucket)
and prompt-length bucket, reused for every decoded token.

Deliberate deviations from the reference:
- positions always come from the attention mask (real tokens only), also for text-only prompts; the reference
  does that in generate() but uses 0..L-1 in a plain forward of a left-padded text-only batch;
- an image and a video may share a prompt: image and video features go to their own tokens (told apart by
  <|begin_of_video|> ... <|end_of_video|>), where the reference rejects the mix;
- text q/k rows are permuted to rotate-half layout at load time (weights.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import attention, parallel, rope
from .config import ConfigError, Glm4vConfig
from .text import CachedDecoder, Linear, TextModel
from .vision import VisionModel
from .weights import load as load_weights, to_float32

_DTYPES = {"float32": ms.float32, "fp32": ms.float32, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
           "float16": ms.float16, "fp16": ms.float16}
_device = None


def _ascend_present() -> bool:
    # probe MindSpore only where a CANN runtime is installed: on a CPU host its probe prints a library error
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME") or os.path.isdir("/usr/local/Ascend")):
        return False
    return ms.hal.is_available("Ascend")


def select_device(device: str | None = None) -> str:
    """Ascend when present, else CPU; `device=` or GLM4V_MS_DEVICE overrides. Fixed for the process."""
    global _device
    want = (device or os.environ.get("GLM4V_MS_DEVICE") or "auto").strip()
    if want.lower() == "auto":
        want = "Ascend" if _ascend_present() else "CPU"
    want = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}.get(want.lower())
    if want is None:
        raise ValueError(f"unknown device {device or os.environ.get('GLM4V_MS_DEVICE')!r} (use cpu, ascend or auto)")
    if _device is None:
        if want == "Ascend" and not _ascend_present():
            raise ValueError("device Ascend requested but no Ascend NPU / CANN runtime is available")
        try:
            ms.set_device(want)
            if want == "CPU":
                ms.device_context.cpu.op_tuning.threads_num(os.cpu_count() or 1)
        except RuntimeError:
            # ops already ran (MindSpore's default device is CPU): keep it if that is what was asked for
            if ms.get_context("device_target") != want:
                raise ValueError(f"MindSpore already runs on {ms.get_context('device_target')}; "
                                 f"select the device before running any op") from None
        if want == "CPU":
            # GLM4V_MS_KERNELS=emulated runs the Ascend code path on CPU through emulations of the fused kernels
            attention.set_mode("emulated" if os.environ.get("GLM4V_MS_KERNELS") == "emulated" else "plain")
        else:
            attention.set_mode("ascend")
        _device = want
    elif want != _device:
        raise ValueError(f"this process already runs on {_device}; MindSpore cannot switch to {want}")
    return _device


def resolve_dtype(dtype, device: str):
    if dtype is None:
        return ms.bfloat16 if device == "Ascend" else ms.float32   # bf16 has no CPU kernels
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        dtype = _DTYPES[dtype.lower()]
    if dtype == ms.bfloat16 and device == "CPU":
        raise ValueError("bfloat16 has no CPU kernels in MindSpore; on CPU use float32 (the default) or float16")
    return dtype


def _np(x, dtype=None):
    if x is None:
        return None
    a = x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
    return a.astype(dtype) if dtype is not None else a


def cache_bucket(n: int) -> int:
    """Cache length for n tokens: the next power of two (>= 256), so prompts of different lengths share one
    compiled decode graph (a new cache size costs a compile of ~2.5 s on the 150M CPU benchmark)."""
    return max(256, 1 << (int(n) - 1).bit_length())


def prompt_bucket(n: int) -> int:
    """Prompt length rounded up to a multiple of 64, or of 1/16 of its power of two when longer (<= ~6% waste)."""
    step = max(64, 1 << max(0, int(n).bit_length() - 5))
    return -(-int(n) // step) * step


@dataclass
class Output:
    logits: Tensor               # (B, L, vocab)
    rope_deltas: np.ndarray      # (B,)


class Glm4vForConditionalGeneration(nn.Cell):
    model_type = "glm4v"

    def __init__(self, config: Glm4vConfig, dtype=ms.float32, layout: parallel.Layout | None = None):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.layout = layout or parallel.Layout()
        parallel.check(config, self.layout)
        self.visual = VisionModel(config.vision, dtype)
        self.text = TextModel(config.text, dtype, self.layout)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size // self.layout.world, dtype)
        self._decoders = {}
        from .generation import GenerationConfig
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        self.think_ids = {}
        self.last_timings = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, folder: str, dtype=None, device: str | None = None, tensor_parallel_size: int = 1,
                        expert_parallel: bool = False):
        """A Hugging Face folder (official or transformers 5 layout) or one made by glm4v_ms.convert.
        tensor_parallel_size: the ranks of this msrun launch to split the text model over (1: no split);
        expert_parallel: place whole experts on ranks instead of splitting every expert."""
        dev = select_device(device)
        cfg = Glm4vConfig.from_pretrained(folder)
        if cfg.model_type != cls.model_type:
            raise ConfigError(f"{folder} holds a {cfg.model_type} checkpoint; {cls.__name__} takes {cls.model_type} "
                              f"(AutoModelForImageTextToText picks the class by model_type)")
        want = parallel.Layout(0, int(tensor_parallel_size or 1), bool(expert_parallel))
        parallel.check(cfg, want)   # before joining the group: a bad size fails alike on every rank, none waits
        if expert_parallel and not cfg.text.n_routed_experts:
            raise parallel.ParallelError(f"expert_parallel: {cfg.model_type} has no experts")
        model = cls(cfg, resolve_dtype(dtype, dev), parallel.init(tensor_parallel_size, expert_parallel))
        model.load_weights(folder)
        from .generation import GenerationConfig, thinking_ids
        model.generation_config = GenerationConfig.from_pretrained(folder, fallback_eos=cfg.eos_token_id)
        if model.generation_config.pad_token_id is None and cfg.pad_token_id is not None:
            model.generation_config = model.generation_config.updated(pad_token_id=cfg.pad_token_id)
        model.think_ids = thinking_ids(folder)
        return model

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, streamer=None, mm_token_type_ids=None, **kwargs):
        """Token ids (B, prompt + new), numpy int64. kwargs: max_new_tokens, min_new_tokens, do_sample,
        temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id, max_thinking_tokens, seed.
        Defaults come from the checkpoint's generation_config.json. `streamer`: a callable taking the new
        token ids (B,), or an object with put(ids) / end()."""
        from .generation import generate
        cfg = self.generation_config.updated(**kwargs)
        if self.layout.world > 1 and cfg.do_sample and cfg.seed is None:
            # every rank samples from the same logits: one seed for all of them, or their tokens diverge
            cfg = cfg.updated(seed=parallel.broadcast_int(self.layout, int(np.random.SeedSequence().entropy % 2**31)))
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                      video_grid_thw=video_grid_thw)
        return generate(self, {k: v for k, v in inputs.items() if v is not None}, cfg, self.think_ids, streamer)

    def load_weights(self, folder: str):
        from .weights import WeightError
        params = dict(self.parameters_and_names())
        for name, arr, st in load_weights(self.config, folder, self.layout):
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise WeightError(f"{name}: this rank's slice has shape {list(arr.shape)}, the model {list(p.shape)}")
            if st == {ms.float32: "F32", ms.float16: "F16"}.get(p.dtype):
                p.set_data(Tensor(np.ascontiguousarray(arr)))
            else:  # bf16 bits or a dtype change: through float32, exact for bf16 -> bf16
                p.set_data(Tensor(to_float32(arr, st)).astype(p.dtype))

    def memory_plan(self, max_model_len: int | None = None) -> str:
        """Weights + static KV cache for a context of max_model_len tokens (default: the model's context)."""
        t = self.config.text
        n = max_model_len or t.max_position_embeddings
        item = {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2}[self.dtype]
        sizes = [(int(np.prod(p.shape)), p.dtype) for _, p in self.parameters_and_names()]
        params = sum(k for k, _ in sizes)
        nbytes = sum(k * (4 if d == ms.float32 else item) for k, d in sizes)   # the router stays float32
        per_tok = t.num_hidden_layers * 2 * self.text.kv_heads * t.head_dim * item
        gb = 1e9
        dt = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}[self.dtype]
        lay = self.layout
        where = f"rank {lay.rank} of {lay.world}{' (experts whole)' if lay.expert_parallel else ''}: " \
            if lay.world > 1 else ""
        return (f"{where}weights {params / 1e6:,.1f} M parameters = {nbytes / gb:.2f} GB in {dt}; "
                f"KV cache {per_tok / 1024:.1f} KB per token = {per_tok * n / gb:.2f} GB at {n} tokens; "
                f"total {(nbytes + per_tok * n) / gb:.2f} GB")

    # ------------------------------------------------------------------ building blocks for generation
    def decoder(self, batch: int, max_len: int) -> CachedDecoder:
        """The decoder bound to a static cache of this size; reused (and its graphs with it) across calls."""
        key = (batch, max_len)
        if key not in self._decoders:
            if len(self._decoders) >= 2:   # keep memory bounded: caches are large on the real model
                self._decoders.pop(next(iter(self._decoders)))
            self._decoders[key] = CachedDecoder(self.text, self.lm_head.weight, batch, max_len)
        return self._decoders[key]

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
              states=None):
        """Token embeddings with the vision features written over the image tokens, in order."""
        c = self.config
        ids = _np(input_ids, np.int64)
        B, L = ids.shape
        h = self.text.embed(Tensor(ids.astype(np.int32))).reshape(B * L, -1)
        types = rope.token_types(ids, c.image_token_id, c.video_start_token_id, c.video_end_token_id).reshape(-1)
        for kind, pixels, grid, rows in (
                (rope.IMAGE, pixel_values, image_grid_thw, lambda g: np.asarray(g, np.int64).reshape(-1, 3)),
                (rope.VIDEO, pixel_values_videos, video_grid_thw, rope.split_video_grids)):
            where = np.nonzero(types == kind)[0]
            what = "image" if kind == rope.IMAGE else "video"
            if pixels is None:
                if len(where):
                    raise ValueError(f"input_ids hold {len(where)} {what} tokens but no {what} pixel values were given")
                continue
            if grid is None:
                raise ValueError(f"{what} pixel values given without {what}_grid_thw")
            sub = None if states is None else []
            feats = self.visual(Tensor(_np(pixels, np.float32)), rows(_np(grid)), sub)
            if states is not None:
                states += [(f"{what}.{name}", x) for name, x in sub]
            if feats.shape[0] != len(where):
                raise ValueError(f"{what} features and {what} tokens do not match: {feats.shape[0]} features, "
                                 f"{len(where)} tokens")
            h = ops.tensor_scatter_update(h, Tensor(where[:, None].astype(np.int32)), feats.astype(h.dtype))
        return h.reshape(B, L, -1)

    def run(self, dec: CachedDecoder, h, pos3: np.ndarray, slot0: int, kv_valid: np.ndarray, last_only=False,
            states=None):
        """Run L new tokens (embeddings h) at cache slots slot0..slot0+L-1 with 3D positions pos3 (3, B, L).
        kv_valid (B, S): which slots hold real tokens once these are written. With a `states` list the layers run
        eagerly (not compiled) and record their outputs."""
        B, L = h.shape[0], h.shape[1]
        c = self.config.text
        if slot0 + L > dec.max_len:
            raise ValueError(f"{slot0 + L} tokens do not fit the cache of {dec.max_len}")
        cos, sin = rope.text_cos_sin(pos3, c.rotary_dim, c.rope_theta, c.mrope_section)
        slots = slot0 + np.arange(L, dtype=np.int32)
        q_slot = np.broadcast_to(slots, (B, L)).astype(np.int32)
        b, hh, s = np.meshgrid(np.arange(B), np.arange(self.text.kv_heads), slots, indexing="ij")
        write = np.stack([b, hh, s], -1).astype(np.int32)
        args = (h, Tensor(cos), Tensor(sin), Tensor(q_slot), Tensor(np.asarray(kv_valid, bool)), Tensor(write), last_only)
        return dec(*args) if states is None else dec.forward(*args, states=states)

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        c = self.config
        return rope.position_ids_3d(_np(input_ids), _np(attention_mask), _np(image_grid_thw), _np(video_grid_thw),
                                    c.vision.spatial_merge_size, c.image_token_id, c.video_start_token_id,
                                    c.video_end_token_id)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, **unused) -> Output:
        """Logits for every position of a full prompt (extra processor keys such as mm_token_type_ids are ignored)."""
        return self._forward(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

    def trace(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, **unused) -> dict:
        """Hidden states for the parity harness, run eagerly: {"image.visual.blocks.{i}", "image.visual.merger"
        (and "video.*"), "text.layers.{i}", "text.norm", "logits"} -> numpy arrays. Vision states are (N, D) over
        all patches / merged tokens; text states (B, L, D)."""
        states = []
        out = self._forward(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                            video_grid_thw, states)
        d = {k: v.astype(ms.float32).asnumpy() for k, v in states}
        d["logits"] = out.logits.astype(ms.float32).asnumpy()
        return d

    def _forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                 states=None):
        h, pos3, mask, deltas, pad = self.prompt(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                 pixel_values_videos, video_grid_thw, states)
        B, L = mask.shape
        S = cache_bucket(L)
        dec = self.decoder(B, S)
        kv_valid = np.zeros((B, S), bool)
        kv_valid[:, :L] = mask
        logits = self.run(dec, h, pos3, 0, kv_valid, states=states)
        return Output(logits=logits[:, pad:] if pad else logits, rope_deltas=deltas)

    def prompt(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
               video_grid_thw=None, states=None):
        """Embeddings (B, L', D), 3D positions (3, B, L'), mask (B, L'), rope deltas (B,) and the padding added.

        The prompt is left-padded to its length bucket with masked slots (the rule that serves batch padding),
        so that nearby prompt lengths share one compiled prefill graph. Not when tracing states."""
        ids = _np(input_ids, np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        B, L = ids.shape
        mask = np.ones((B, L), bool) if attention_mask is None else _np(attention_mask).astype(bool).reshape(B, L)
        h = self.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, states)
        pos3, deltas = self.positions(ids, mask, image_grid_thw, video_grid_thw)
        pad = 0 if states is not None else prompt_bucket(L) - L
        if pad:
            h = ops.cat([ops.zeros((B, pad, h.shape[-1]), h.dtype), h], 1)
            pos3 = np.pad(pos3, ((0, 0), (0, 0), (pad, 0)))
            mask = np.pad(mask, ((0, 0), (pad, 0)))
        return h, pos3, mask, deltas, pad


class Glm4vMoeForConditionalGeneration(Glm4vForConditionalGeneration):
    """GLM-4.5V: the same model with GLM-4.5V's config (two norms per layer, MoE MLPs); the same API."""
    model_type = "glm4v_moe"


class AutoModelForImageTextToText:
    """from_pretrained picks the class from config.json's model_type (glm4v or glm4v_moe)."""
    CLASSES = {"glm4v": Glm4vForConditionalGeneration, "glm4v_moe": Glm4vMoeForConditionalGeneration}

    def __init__(self):
        raise TypeError("use AutoModelForImageTextToText.from_pretrained(folder)")

    @classmethod
    def from_pretrained(cls, folder: str, **kwargs):
        return cls.CLASSES[Glm4vConfig.from_pretrained(folder).model_type].from_pretrained(folder, **kwargs)

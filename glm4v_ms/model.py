"""Glm4vForConditionalGeneration (GLM-4.1V) and Glm4vMoeForConditionalGeneration (GLM-4.5V): the vision tower's
features merged into the text, over a static KV cache. The two differ only in their config (text.py, moe.py).
AutoModelForImageTextToText picks one by config.json's model_type. `tensor_parallel_size` > 1 inside an msrun
launch splits the text model across the ranks (parallel.py); the vision tower runs whole on every rank.

Host side (NumPy): token types, 3D positions and rope deltas, cos/sin tables, cache slots and write indices.
Device side (MindSpore): the vision tower, then `CachedDecoder`: one jit graph per (batch, cache-length bucket)
and prompt-length bucket, reused for every decoded token (the shapes follow shapes.py's rules).

This module is the package's transformers face: the network (`embed`, `prompt`, `run`) and the surface
(`from_pretrained`, `generate`, a forward, `trace`). Generation, beam search and the serving engine drive the
network they are handed and never import this module; `generate` hands over to them.

Deliberate deviations from the reference:
- positions always come from the attention mask (real tokens only), also for text-only prompts; the reference
  does that in generate() but uses 0..L-1 in a plain forward of a left-padded text-only batch;
- an image and a video may share a prompt: image and video features go to their own tokens (told apart by
  <|begin_of_video|> ... <|end_of_video|>), where the reference rejects the mix;
- text q/k rows are permuted to rotate-half layout at load time (weights.py).
"""
from __future__ import annotations

import hashlib
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import attention, beam, compile_cache, parallel, rope
from .config import ConfigError, Glm4vConfig
from .device import ITEM_BYTES, NAMES, kernel_mode, resolve_dtype, select_device
from .generation import generate
from .generation_config import GenerationConfig, thinking_ids
from .layers import Linear
from .outputs import GenerateOutput, Output
from .prompt import Prompt
from .reuse import PromptCache
from .safetensors_io import to_float32
from .shapes import RUNTIME_BYTES, activation_bytes, cache_bucket, host_array as _np, prompt_bucket, prompt_graph
from .text import CachedDecoder, TextModel
from .vision import VisionModel
from .weights import load as load_weights


def _refuse(extra: dict, what: str):
    """The processor's token-type arrays are accepted (derived from the ids here); anything else is named."""
    bad = sorted(k for k in extra if k not in ("mm_token_type_ids", "token_type_ids"))
    if bad:
        raise TypeError(f"{what}() does not take {', '.join(bad)} (this port computes logits for a whole prompt; "
                        f"use generate() for decoding, past_key_values=PromptCache() for reuse)")


class Glm4vForConditionalGeneration(nn.Cell):
    model_type = "glm4v"

    def __init__(self, config: Glm4vConfig, dtype=ms.float32, layout: parallel.Layout | None = None):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.layout = layout or parallel.Layout()
        parallel.check(config, self.layout)
        # fused Ascend kernels where this configuration fits their documented limits, the plain maths past them
        self.plain_kernels = attention.choose_kernels(config, dtype, self.layout.world)
        self.visual = VisionModel(config.vision, dtype)
        self.text = TextModel(config.text, dtype, self.layout)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size // self.layout.world, dtype)
        self._decoders = {}
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        self.think_ids = {}
        self.config_digest = None

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
        from .quant_layers import install
        skip = install(model, folder)   # GPTQ linears kept quantized on the Ascend path
        if skip and model.layout.world > 1:
            raise parallel.ParallelError("GPTQ weights kept quantized (the Ascend path) are not split across ranks "
                                         "yet: run a quantized checkpoint with tensor_parallel_size 1")
        if kernel_mode() == "ascend":
            model.text.share_layer_graphs()   # after the GPTQ swap: layer structures are final
        model.load_weights(folder, skip=skip)
        with open(os.path.join(folder, "config.json"), "rb") as f:   # part of the compile cache's key
            model.config_digest = hashlib.sha256(f.read()).hexdigest()
        model.generation_config = GenerationConfig.from_pretrained(folder, fallback_eos=cfg.eos_token_id)
        if model.generation_config.pad_token_id is None and cfg.pad_token_id is not None:
            model.generation_config = model.generation_config.updated(pad_token_id=cfg.pad_token_id)
        model.think_ids = thinking_ids(folder)
        return model

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, streamer=None, mm_token_type_ids=None,
                 inputs_embeds=None, past_key_values=None, **kwargs):
        """Token ids (B, prompt + new), numpy int64. kwargs: max_new_tokens, min_new_tokens, do_sample,
        temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id, max_thinking_tokens, seed.
        Defaults come from the checkpoint's generation_config.json. `streamer`: a callable taking the new
        token ids (B,), or an object with put(ids) / end(). Beam search (beam.py): num_beams,
        num_return_sequences, length_penalty, early_stopping. return_dict_in_generate returns an output with
        `sequences` and `timings` (prefill_s, decode_s, decode_steps, new_tokens, prompt_tokens, ...); with beams
        (and output_scores) also sequences_scores, scores and beam_indices, as transformers does.

        `inputs_embeds` (B, L, D), as transformers takes it: the prompt runs from these embeddings (positions
        then run 0..L-1, no M-RoPE, as in the reference); given without input_ids, only the new tokens return.

        `past_key_values`: a glm4v_ms.PromptCache (as transformers takes a Cache object): the next call reuses the
        KV cache of the longest prefix its prompt shares with the last one (multi-turn chat), same output."""
        beam_args = {k: kwargs.pop(k) for k in ("num_beams", "num_return_sequences", "length_penalty",
                                                "early_stopping", "output_scores") if k in kwargs}
        as_dict = kwargs.pop("return_dict_in_generate", False)
        cfg = self.generation_config.updated(**kwargs)
        if self.layout.world > 1 and cfg.do_sample and cfg.seed is None:
            # every rank samples from the same logits: one seed for all of them, or their tokens diverge
            cfg = cfg.updated(seed=parallel.broadcast_int(self.layout, int(np.random.SeedSequence().entropy % 2**31)))
        p = Prompt.of(self.config, dict(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            inputs_embeds=inputs_embeds))
        if past_key_values is not None and not isinstance(past_key_values, PromptCache):
            raise ValueError("past_key_values must be a glm4v_ms.PromptCache (the static cache is this package's own)")
        if past_key_values is not None and (beam_args.get("num_beams", 1) > 1 or self.layout.world > 1):
            raise ValueError("past_key_values (prefix reuse) works with greedy or sampled search on one rank only")
        if beam_args.get("num_beams", 1) > 1:
            beam.check(cfg, **{k: beam_args.get(k, d) for k, d in (("num_beams", 1), ("num_return_sequences", 1),
                       ("length_penalty", 1.0), ("early_stopping", False))}, streamer=streamer)
            out = beam.generate(self, p, cfg, **beam_args)
        else:
            if beam_args.get("num_return_sequences", 1) != 1:
                raise ValueError("num_return_sequences > 1 needs num_beams >= num_return_sequences (no sampling "
                                 "of several sequences here)")
            out = GenerateOutput(*generate(self, p, cfg, self.think_ids, streamer, past_key_values))
        if not p.given_ids:   # the reference returns only the new tokens when it was given embeddings alone
            out.sequences = out.sequences[:, p.shape[1]:]
        return out if as_dict else out.sequences

    def load_adapter(self, folder: str):
        """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on top of these weights, as
        transformers' load_adapter (finetune/adapter.py); replaces any adapter loaded before. Under tensor
        parallel each rank keeps the slices of A and B that match its slice of each linear (finetune/lora.py)."""
        from .finetune.adapter import load
        load(self, folder)
        with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as f:   # the compile cache's key
            self.config_digest = hashlib.sha256((self.config_digest or "").encode() + f.read()).hexdigest()

    def load_weights(self, folder: str, skip=()):
        from .quant import view
        from .safetensors_io import Checkpoint, WeightError
        params = dict(self.parameters_and_names())
        for name, arr, st in load_weights(self.config, view(Checkpoint(folder), self.config), skip, self.layout):
            p = params[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise WeightError(f"{name}: this rank's slice has shape {list(arr.shape)}, the model {list(p.shape)}")
            if st == {ms.float32: "F32", ms.float16: "F16"}.get(p.dtype):
                p.set_data(Tensor(np.ascontiguousarray(arr)))
            else:  # bf16 bits or a dtype change: through float32, exact for bf16 -> bf16
                p.set_data(Tensor(to_float32(arr, st)).astype(p.dtype))

    def memory_plan(self, max_model_len: int | None = None, batch: int = 1) -> str:
        """Weights + static KV cache for a context of max_model_len tokens (default: the model's context) + the
        bound on the text decoder's activations (a prompt runs in chunks over the filled cache only) + the rest of
        the process (RUNTIME_BYTES): the total bounds the process's peak resident set on CPU."""
        t = self.config.text
        n = max_model_len or t.max_position_embeddings
        item = ITEM_BYTES[self.dtype]
        params = sum(int(np.prod(p.shape)) for _, p in self.parameters_and_names())
        per_tok = t.num_hidden_layers * 2 * self.text.kv_heads * t.head_dim * item
        act = activation_bytes(t, batch, n, item)
        gb = 1e9
        dt = NAMES[self.dtype]
        from .quant_layers import weight_bytes
        wbytes, qbytes = weight_bytes(self)   # real bytes: the router stays float32, qint4x2 packs two a byte
        lay = self.layout
        where = f"rank {lay.rank} of {lay.world}{' (experts whole)' if lay.expert_parallel else ''}: " \
            if lay.world > 1 else ""
        what = (f"weights {wbytes / gb:.2f} GB ({qbytes / gb:.2f} GB of them quantized linears, the rest {dt})"
                if qbytes else f"weights {params / 1e6:,.1f} M parameters = {wbytes / gb:.2f} GB in {dt}")
        return (f"{where}{what}; KV cache {per_tok / 1024:.1f} KB per token = {per_tok * n / gb:.2f} GB at {n} "
                f"tokens; activations <= {act / gb:.2f} GB; runtime <= {RUNTIME_BYTES / gb:.2f} GB; total "
                f"{(wbytes + per_tok * n + act + RUNTIME_BYTES) / gb:.2f} GB")

    # ------------------------------------------------------------------ building blocks for generation
    def decoder(self, batch: int, max_len: int, owner=None) -> CachedDecoder:
        """The decoder bound to a static cache of this size; reused (and its graphs with it) across calls.
        `owner`: the PromptCache that now holds its contents (None: nobody's); a PromptCache reuses the cache only
        while it is still the owner, i.e. no other call has written into it since."""
        key = (batch, max_len)
        if key not in self._decoders:
            if len(self._decoders) >= 2:   # keep memory bounded: caches are large on the real model
                self._decoders.pop(next(iter(self._decoders)))
            self._decoders[key] = CachedDecoder(self.text, self.lm_head.weight, batch, max_len)
        self._decoders[key].owner = owner
        return self._decoders[key]

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
              states=None, inputs_embeds=None, between=None):
        """Token embeddings with the vision features written over the image tokens, in order. With inputs_embeds
        (and no input_ids), the image tokens are the rows equal to the image token's embedding (the reference's
        rule); video frames share that token, so videos need input_ids. `between()`: called between the vision
        tower's pieces and once after it (the serving engine's other rows decode meanwhile)."""
        c = self.config
        if inputs_embeds is None:
            ids = _np(input_ids, np.int64)
            B, L = ids.shape
            h = self.text.embed(Tensor(ids.astype(np.int32))).reshape(B * L, -1)
        else:
            e = _np(inputs_embeds, np.float32)
            if e.ndim != 3 or e.shape[-1] != c.text.hidden_size:
                raise ValueError(f"inputs_embeds must be (batch, length, {c.text.hidden_size}), got {e.shape}")
            B, L = e.shape[:2]
            h = Tensor(e.reshape(B * L, -1)).astype(self.dtype)
            ids = None if input_ids is None else _np(input_ids, np.int64).reshape(B, L)
            if ids is None or (ids < 0).all():
                if pixel_values_videos is not None:
                    raise ValueError("videos with inputs_embeds need input_ids too (video frames share the image token)")
                row = self.text.embed.weight[c.image_token_id].astype(ms.float32).asnumpy()
                ids = np.where((e == row).all(-1), c.image_token_id, -1)
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
            feats = self.visual(Tensor(_np(pixels, np.float32)), rows(_np(grid)), sub, between)
            if states is not None:
                states += [(f"{what}.{name}", x) for name, x in sub]
            if feats.shape[0] != len(where):
                raise ValueError(f"{what} features and {what} tokens do not match: {feats.shape[0]} features, "
                                 f"{len(where)} tokens")
            h = ops.tensor_scatter_update(h, Tensor(where[:, None].astype(np.int32)), feats.astype(h.dtype))
            if between is not None:   # the vision tower's end and what follows it (the first chunk): two pieces
                between()
        return h.reshape(B, L, -1)

    def run(self, dec: CachedDecoder, h, pos3: np.ndarray, slot0, kv_valid: np.ndarray, last_only=False,
            states=None, between=None):
        """Run L new tokens (embeddings h) at cache slots slot0..slot0+L-1 with 3D positions pos3 (3, B, L).
        slot0: one int for all rows, or one per row (B,) (the serving engine: each row at its own slots).
        kv_valid (B, S): which slots hold real tokens once these are written. With a `states` list the layers run
        eagerly (not compiled) and record their outputs.

        A prompt (L > 1) runs in one piece (up to LONG_PROMPT tokens) or in chunks of 256 (`prompt_chunk`),
        attending over the cache up to the prompt's `extent_of` only: the prompt graphs are bounded in number, and
        the activations stay within `activation_bytes` whatever the cache length (max_new_tokens). `between()`
        is called between chunks (the serving engine's other rows decode meanwhile: chunked prefill)."""
        B, L = h.shape[0], h.shape[1]
        first = np.broadcast_to(np.asarray(slot0, np.int64).reshape(-1), (B,))
        if first.max() + L > dec.max_len:
            raise ValueError(f"{first.max() + L} tokens do not fit the cache of {dec.max_len}")
        if L == 1:   # a decode step: one graph for every token, over the whole cache (the mask bounds it)
            return self._run(dec, h, pos3, first, kv_valid, last_only, dec.max_len, states)
        if first.min() != first.max():
            raise ValueError("a prompt of several tokens starts at one cache slot for all rows")
        slot0 = int(first[0])
        if states is not None:   # eager (the parity harness's trace): the whole prompt at once, no graph to share
            return self._run(dec, h, pos3, slot0, kv_valid, last_only, slot0 + L, states)
        step, extent = prompt_graph(self.config.text, B, L, slot0, dec.max_len)
        out = []
        for s in range(0, L, step):
            if s and between is not None:
                between()
            out.append(self._run(dec, h[:, s:s + step], pos3[:, :, s:s + step], slot0 + s, kv_valid, last_only,
                                 extent, states))
        return out[-1] if last_only or len(out) == 1 else ops.cat(out, 1)

    def _run(self, dec, h, pos3, slot0, kv_valid, last_only, extent, states):
        """slot0: the first slot of these tokens, one int for all rows or one per row (B,)."""
        B, L = h.shape[0], h.shape[1]
        c = self.config.text
        cos, sin = rope.text_cos_sin(pos3, c.rotary_dim, c.rope_theta, c.mrope_section)
        first = np.broadcast_to(np.asarray(slot0, np.int64).reshape(-1), (B,))
        q_slot = (first[:, None] + np.arange(L)).astype(np.int32)                                     # (B, L)
        b, hh, s = np.meshgrid(np.arange(B), np.arange(self.text.kv_heads), np.arange(L), indexing="ij")
        write = np.stack([b, hh, q_slot[b, s]], -1).astype(np.int32)
        args = (h, Tensor(cos), Tensor(sin), Tensor(q_slot), Tensor(np.asarray(kv_valid, bool)), Tensor(write),
                last_only, int(extent))
        if states is not None:
            return dec.forward(*args, states=states)
        compile_cache.before_compile(compile_cache.signature(B, L, dec.max_len, last_only, extent))
        out = dec(*args)
        compile_cache.after_call()
        return out

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        c = self.config
        return rope.position_ids_3d(_np(input_ids), _np(attention_mask), _np(image_grid_thw), _np(video_grid_thw),
                                    c.vision.spatial_merge_size, c.image_token_id, c.video_start_token_id,
                                    c.video_end_token_id)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, inputs_embeds=None, labels=None, **extra) -> Output:
        """Logits for every position of a full prompt. Exactly one of input_ids and inputs_embeds (B, L, D), as in
        transformers. The processor's mm_token_type_ids / token_type_ids are taken and not needed (the token types
        follow from the ids); any other argument is refused by name. With `labels` (B, L), -100 where not trained:
        the training path (no cache, finetune/forward.py) and `.loss`, as transformers computes it."""
        _refuse(extra, "forward")
        if labels is not None:
            if input_ids is None:
                raise ValueError("labels need input_ids")
            from .finetune.forward import forward_with_loss
            return forward_with_loss(self, input_ids, attention_mask, labels, pixel_values, image_grid_thw,
                                     pixel_values_videos, video_grid_thw)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        return self._forward(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                             inputs_embeds=inputs_embeds)

    def trace(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, **extra) -> dict:
        """Hidden states for the parity harness, run eagerly: {"image.visual.blocks.{i}", "image.visual.merger"
        (and "video.*"), "text.layers.{i}", "text.norm", "logits"} -> numpy arrays. Vision states are (N, D) over
        all patches / merged tokens; text states (B, L, D)."""
        _refuse(extra, "trace")
        states = []
        out = self._forward(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                            video_grid_thw, states)
        d = {k: v.astype(ms.float32).asnumpy() for k, v in states}
        d["logits"] = out.logits.astype(ms.float32).asnumpy()
        return d

    def _forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                 states=None, inputs_embeds=None):
        h, pos3, mask, deltas, pad = self.prompt(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                 pixel_values_videos, video_grid_thw, states, inputs_embeds)
        B, L = mask.shape
        S = cache_bucket(L)
        dec = self.decoder(B, S)
        kv_valid = np.zeros((B, S), bool)
        kv_valid[:, :L] = mask
        logits = self.run(dec, h, pos3, 0, kv_valid, states=states)
        return Output(logits=logits[:, pad:] if pad else logits, rope_deltas=deltas)

    def prompt(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
               video_grid_thw=None, states=None, inputs_embeds=None, between=None):
        """Embeddings (B, L', D), 3D positions (3, B, L'), mask (B, L'), rope deltas (B,) and the padding added.

        The prompt is left-padded to its length bucket with masked slots (the rule that serves batch padding),
        so that nearby prompt lengths share one compiled prefill graph. Not when tracing states."""
        if inputs_embeds is not None:
            B, L = np.shape(inputs_embeds)[:2]
            ids = None if input_ids is None else _np(input_ids, np.int64).reshape(B, L)
        else:
            ids = _np(input_ids, np.int64)
            if ids.ndim == 1:
                ids = ids[None]
            B, L = ids.shape
        mask = np.ones((B, L), bool) if attention_mask is None else _np(attention_mask).astype(bool).reshape(B, L)
        h = self.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, states, inputs_embeds,
                       between)
        if inputs_embeds is None:
            pos3, deltas = self.positions(ids, mask, image_grid_thw, video_grid_thw)
        else:   # the reference's positions for embeddings: text positions, no M-RoPE (it cannot see the grids' tokens)
            pos = np.where(mask, np.cumsum(mask, -1) - 1, 0)
            pos3, deltas = np.broadcast_to(pos[None], (3, B, L)).astype(np.int64), np.zeros(B, np.int64)
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

"""The training memory plan: frozen weights, trainable (LoRA) weights, gradients, optimizer state, activations at
cutoff_len (with and without recompute per decoder layer) and the runtime term of the inference plan
(shapes.RUNTIME_BYTES). The sum bounds the process's peak resident set on CPU (tests/test_finetune_train.py).

Activations, per token of a micro-batch (item = the activation dtype's size, 4 on CPU), what the backward keeps of
one decoder layer: the residual stream and norms (8 D), q/k/v before and after rotary (3 Q + 4 KV), the attention
output (Q), the MLP (4 I: gate_up, silu(gate), the product); float32 scores, probabilities and their gradients
(SCORE_COPIES x 4 H L) on the plain path, the flash kernel's softmax statistics (2 x 8 x 4 H) on Ascend; the LoRA inputs in float32 (4 of width D, Q, I). MoE layers (GLM-4.5V) on the plain CPU path run every
local expert on every token: E (3 I + D) instead of 4 I; on the grouped path k (3 I + D). With recompute only each
layer's input (D) is kept, plus one layer's full set while it is recomputed. Then the head over the trained rows
(logits, log-sum-exp and their gradient: 3 x 4 V per row) and the inputs (embeddings, rotary tables, mask).

Per rank on N ranks (data parallel, distributed.py), with T the trainable bytes: the reduction's flat vector (T) is
added; ZeRO 1 and 2 keep the optimizer state of a 1/N slice, ZeRO 2 also the reduced and clipped gradient (so
2 T + T/N + one bucket instead of 3 T + the flat vector: the backward's own gradients and their sum are whole on
every rank, and stage 2 reduces one bucket of reduce_bucket_size elements at a time, bucket_bytes).

Full / freeze fine-tuning (full_parts): every weight in the model's dtype (item bytes); the trained ones also as
float32 masters when item < 4 (LLaMA-Factory upcasts trainable parameters to float32; optim.py keeps the master
beside the model's copy and the moments), the backward's gradients and their sum in the model's dtype, the
reduction's float32 flat vector (one bucket of it with ZeRO-2) and the clipped gradient (float32; a 1/N slice
with ZeRO-2), AdamW's two float32 moments; ZeRO-1/2 shard the masters with the moments. ZeRO-3 (distributed.Zero3) holds the decoder layers' linear
weights above the persistence threshold as 1/N slices (trained and frozen), with their gradients, masters and
moments; the other tensors (norms, biases, embedding, head, vision tower) whole, their trained ones through ZeRO-2
(masters and moments sliced, one bucket of the reduction); plus the largest decoder layer's sharded weights
gathered at once, with their whole gradient and its float32 reduction.
"""
from __future__ import annotations

import numpy as np

from .. import attention
from .args import REDUCE_BUCKET_DEFAULT

GB = 1e9
# float32 (B, H, L, L) tensors alive per layer at the peak of a training step on CPU: measured on demo-tiny at
# 2 x 1024 and 2 x 2048 tokens (MindSpore 2.10 graph mode: the peak grows 895 bytes per L^2 over 2 layers x 2 rows
# x 4 heads, ~14 float32 copies: scores, scaled, masked, probabilities and the backward's); an allowance, not
# derived. The CPU graph keeps every layer's (model.live_layers).
SCORE_COPIES = 14


def _item(model) -> int:
    import mindspore as ms
    return {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2}[model.dtype]


def layer_bytes(t, i: int, tokens: int, length: int, item: int, plain: bool) -> int:
    """One decoder layer's activations kept for the backward, for `tokens` tokens in rows of `length`; plain:
    the CPU path (every expert on every token), else the grouped one."""
    D, Q, KV, H = t.hidden_size, t.q_size, t.kv_size, t.num_attention_heads
    if t.is_moe_layer(i):
        E = t.n_routed_experts if plain else t.num_experts_per_tok
        I = t.moe_intermediate_size
        mlp = E * (3 * I + D) + 4 * I * t.n_shared_experts
    else:
        I = t.intermediate_size
        mlp = 4 * I
    # plain: the scores are materialised; flash attention (Ascend) keeps its float32 softmax max and sum (8 each)
    scores = SCORE_COPIES * 4 * H * length if plain else 2 * 8 * 4 * H
    per_tok = item * (8 * D + 3 * Q + 4 * KV + Q + mlp) + 4 * (4 * D + Q + I) + scores
    return tokens * per_tok


def bucket_bytes(n: int, ranks: int, bucket: int) -> int:
    """float32 bytes of the largest bucket the stage-2 reduction holds for n trainable elements (distributed.Flat:
    N chunks of ceil(bucket / N) elements, at most the whole padded vector; bucket 0: the whole vector)."""
    k = -(-n // ranks)
    return 4 * ranks * (k if bucket <= 0 else min(k, -(-bucket // ranks)))


def parts(cfg, item: int, total_w: int, batch: int, length: int, n_trainable: int, optim: str,
          plain: bool | None = None, ranks: int = 1, stage: int = 0, bucket: int = REDUCE_BUCKET_DEFAULT) -> dict:
    """Bytes of each term for micro-batches of `batch` rows of `length` tokens; total_w: all weights' bytes;
    per rank of `ranks` data-parallel ranks with ZeRO `stage` (stage 2: reducing `bucket` elements at a time)."""
    t = cfg.text
    plain = attention.mode() == "plain" if plain is None else plain
    tokens = batch * length
    lora_b = 4 * n_trainable
    full = sum(layer_bytes(t, i, tokens, length, item, plain) for i in range(t.num_hidden_layers))
    one = max(layer_bytes(t, i, tokens, length, item, plain) for i in range(t.num_hidden_layers))
    inputs = tokens * (t.hidden_size * item + 2 * t.rotary_dim * 4) + batch * length * length
    head = tokens * (3 * 4 * t.vocab_size + t.hidden_size * item)
    from ..shapes import RUNTIME_BYTES
    state = 2 * lora_b if optim.startswith("adamw") else 0
    grads = 3 * lora_b   # a micro-batch's, the sum, clipped
    if ranks > 1:
        sliced = -(-lora_b // ranks)
        if stage == 2:   # + one bucket of the reduction
            grads = bucket_bytes(n_trainable, ranks, bucket) + 2 * lora_b + sliced
        else:            # + the flat vector of the reduction
            grads = lora_b + 3 * lora_b
        state = state // ranks if stage >= 1 else state
    return {"frozen": total_w - lora_b, "trainable": lora_b, "grads": grads,
            "optimizer": state,
            "activations": full + inputs + head,
            "activations_recompute": t.num_hidden_layers * tokens * t.hidden_size * item + one + inputs + head,
            "runtime": RUNTIME_BYTES}


def total(p: dict, recompute: bool) -> int:
    act = p["activations_recompute"] if recompute else p["activations"]
    return p["frozen"] + p["trainable"] + p["grads"] + p["optimizer"] + act + p["runtime"] + p.get("dequant", 0)


def training_parts(model, args, n_trainable: int, world=None, stage: int | None = None) -> dict:
    """The plan's terms for this model and these keys, per rank of `world` (stage: another ZeRO stage than the
    world's, for comparison)."""
    bs, L, opt = args.per_device_train_batch_size, args.cutoff_len, args.optim
    from ..quant_layers import backward_peak, weight_bytes
    n, st = (world.size, world.stage) if world is not None else (1, 0)
    stage = st if stage is None else stage
    bucket = world.bucket if world is not None else REDUCE_BUCKET_DEFAULT
    trained = getattr(model, "trained_names", None)
    if trained and st == 3:   # the model holds slices: the counts from its config
        from .args import persistence_threshold
        return full_config_plan(model.config, _item(model), bs, L, args, opt, attention.mode() == "plain", n, stage,
                                args.gradient_accumulation_steps, bucket,
                                persistence_threshold(args.deepspeed, model.config.text.hidden_size))
    if trained:   # full / freeze: parameter counts, every weight in the model's dtype
        n_all = sum(int(np.prod(q.shape)) for _, q in model.parameters_and_names())
        return full_parts(model.config, _item(model), n_all - n_trainable, n_trainable, bs, L, opt, ranks=n,
                          stage=stage, accum=args.gradient_accumulation_steps, bucket=bucket)
    p = parts(model.config, _item(model), weight_bytes(model)[0], bs, L, n_trainable, opt, ranks=n, stage=stage,
              bucket=bucket)
    p["dequant"] = backward_peak(model)   # a GPTQ base on the kernel path (its weights counted at their bytes)
    return p


def training_plan(model, args, n_trainable: int, world=None) -> str:
    rec = bool(getattr(model, "recompute_layers", False))
    n, st = (world.size, world.stage) if world is not None else (1, 0)
    trained = getattr(model, "trained_names", None)
    p = training_parts(model, args, n_trainable, world)
    line = describe(p, args.per_device_train_batch_size, args.cutoff_len, rec, n_trainable if trained else None,
                    _item(model))
    if n > 1 and st:
        saved = total(training_parts(model, args, n_trainable, world, stage=0), rec) - total(p, rec)
        line += f"; ZeRO-{st} saves {saved / 1e6:,.3f} MB per rank against unsharded state"
    return line


def describe(p: dict, batch: int, length: int, recompute: bool, n_trained: int | None = None, item: int = 4) -> str:
    """The plan line; n_trained: a full / freeze fine-tune's trained parameter count (None: LoRA)."""
    f = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    if n_trained is None:
        what = f"LoRA {p['trainable'] // 4 / 1e6:,.2f} M parameters = {f(p['trainable'])} float32"
    else:
        what = (f"trained {n_trained / 1e6:,.2f} M parameters = {f(p['trainable'])}"
                + (" with float32 masters" if item < 4 else ""))
    return (f"frozen weights {f(p['frozen'])}; {what}, gradients {f(p['grads'])}, optimizer state "
            f"{f(p['optimizer'])}; "
            f"activations at {batch} x {length} tokens {f(p['activations'])} without recompute, "
            f"{f(p['activations_recompute'])} with (recompute {'on' if recompute else 'off'}); "
            + (f"quantized backward <= {f(p['dequant'])}; " if p.get("dequant") else "") + "runtime "
            f"<= {f(p['runtime'])}; total {f(total(p, recompute))}")


def config_plan(cfg, dtype_bytes: int, batch: int, length: int, rank: int, optim: str = "adamw_torch",
                plain: bool = False, ranks: int = 1, stage: int = 0, qcfg=None,
                bucket: int = REDUCE_BUCKET_DEFAULT) -> dict:
    """The plan from a config alone (no weights loaded): the README's figures for the 9B model and GLM-4.5V.
    qcfg: a GPTQ quantization_config (quant.GPTQConfig): the frozen base quantized, on the kernel path."""
    t = cfg.text
    n_lora = 0
    for i in range(t.num_hidden_layers):
        D = t.hidden_size
        n_lora += rank * (D + t.q_size) + 2 * rank * (D + t.kv_size) + rank * (t.q_size + D)   # q, k, v, o
        if t.is_moe_layer(i):
            S = t.moe_intermediate_size * t.n_shared_experts
            n_lora += 2 * rank * (D + S) + rank * (S + D)
        elif t.n_routed_experts:
            n_lora += 2 * rank * (D + t.intermediate_size) + rank * (t.intermediate_size + D)
        else:
            n_lora += rank * (D + 2 * t.intermediate_size) + rank * (t.intermediate_size + D)
    from ..weights import hf_shapes
    n_w = sum(int(np.prod(s)) for s in hf_shapes(cfg).values())
    if qcfg is None:
        return parts(cfg, dtype_bytes, n_w * dtype_bytes + 4 * n_lora, batch, length, n_lora, optim, plain, ranks,
                     stage, bucket)
    from ..quant import estimate_bytes
    from ..quant_layers import backward_peak_estimate
    p = parts(cfg, dtype_bytes, estimate_bytes(cfg, qcfg, dtype_bytes)[0] + 4 * n_lora, batch, length, n_lora, optim,
              plain, ranks, stage, bucket)
    p["dequant"] = backward_peak_estimate(cfg, qcfg, dtype_bytes)
    return p


# ---------------------------------------------------------------------------------------------- full / freeze
def full_parts(cfg, item: int, n_frozen: int, n_trained: int, batch: int, length: int, optim: str,
               plain: bool | None = None, ranks: int = 1, stage: int = 0, gathered: int = 0, accum: int = 1,
               bucket: int = REDUCE_BUCKET_DEFAULT, sharded: tuple = (0, 0)) -> dict:
    """Bytes of each term for a full / freeze fine-tune (module docstring): n_frozen / n_trained parameters;
    gathered: the parameters of the largest group ZeRO-3 gathers at once (stage 3 only); accum: the micro-batches
    per step (with one, the backward's gradients are the step's sum: no second copy); bucket: the stage-2
    reduction's elements per bucket; sharded: (frozen, trained) parameters ZeRO-3 holds as slices."""
    p = parts(cfg, item, 0, batch, length, 0, optim, plain)   # the activation and runtime terms
    N = ranks
    sl = lambda b: -(-b // N) if N > 1 and stage else b  # noqa: E731   (a 1/N slice under ZeRO)
    master = 4 * n_trained if item < 4 else 0
    state = 8 * n_trained if optim.startswith("adamw") else 0
    copies = 2 if accum > 1 else 1   # the backward's gradients (model dtype), and their sum over micro-batches
    if stage == 3:   # the sliced weights' part (ceil: 1/N of each) and the whole ones'; one layer gathered
        sf, st = sharded
        wf, wt = n_frozen - sf, n_trained - st
        frozen = item * (wf + -(-sf // N) + gathered)
        trainable = item * (wt + -(-st // N))
        grads = (copies * item * (wt + -(-st // N)) + (item + 4) * gathered + bucket_bytes(wt, N, bucket)
                 + 4 * -(-n_trained // N))
    elif N == 1:   # + the clipped copy
        frozen, trainable = n_frozen * item, n_trained * item
        grads = (copies + 1) * item * n_trained
    elif stage == 2:   # + one bucket of the reduction, then this rank's slice (reduced, clipped)
        frozen, trainable = n_frozen * item, n_trained * item
        grads = copies * item * n_trained + bucket_bytes(n_trained, N, bucket) + sl(4 * n_trained)
    else:          # + the reduction's float32 flat vector, then the clipped one
        frozen, trainable = n_frozen * item, n_trained * item
        grads = copies * item * n_trained + 8 * n_trained
    p.update(frozen=frozen, trainable=trainable + sl(master), grads=grads, optimizer=sl(state))
    return p


def trained_counts(cfg, args) -> tuple:
    """(frozen, trained) parameter counts and the largest group's parameter count (a decoder layer, a vision
    block, or one tensor outside them) for the trained set the args select (full.select)."""
    import re

    from ..weights import hf_shapes
    from .full import hf_parameters, select
    shapes = hf_shapes(cfg)
    table = hf_parameters(cfg)
    trained = set(select(cfg, args))
    n = {True: 0, False: 0}
    groups = {}
    for ours, names in table.items():
        k = sum(int(np.prod(shapes[h])) for h in names) if names else 0
        n[ours in trained] += k
        m = re.match(r"(.*?\.(layers|blocks)\.\d+)\.", ours)
        g = m.group(1) if m else ours
        groups[g] = groups.get(g, 0) + k
    return n[False], n[True], max(groups.values())


def zero3_counts(cfg, args, threshold: int) -> tuple:
    """(frozen, trained) parameters ZeRO-3 holds as slices (distributed.sharded_name) and the largest decoder
    layer's count of them (gathered at once)."""
    import re

    from ..weights import hf_shapes
    from .distributed import sharded_name
    from .full import hf_parameters, select
    shapes, trained = hf_shapes(cfg), set(select(cfg, args))
    n, layers = {True: 0, False: 0}, {}
    for ours, names in hf_parameters(cfg).items():
        k = sum(int(np.prod(shapes[h])) for h in names) if names else 0
        if sharded_name(ours, k, threshold):
            n[ours in trained] += k
            g = re.match(r"text\.layers\.\d+", ours).group(0)
            layers[g] = layers.get(g, 0) + k
    return n[False], n[True], max(layers.values(), default=0)


def full_config_plan(cfg, dtype_bytes: int, batch: int, length: int, args, optim: str = "adamw_torch",
                     plain: bool = False, ranks: int = 1, stage: int = 0, accum: int = 1,
                     bucket: int | None = None, threshold: int | None = None) -> dict:
    """full_parts from a config and the finetuning keys alone (no weights loaded): the README's full fine-tuning
    figures for the 9B model. bucket / threshold (ZeRO-2/3's reduce_bucket_size, ZeRO-3's persistence threshold)
    default to what LLaMA-Factory's examples/deepspeed files give: ds_z2_config's 5e8 and ds_z3_config's "auto"
    (hidden_size squared, 10 x hidden_size)."""
    D = cfg.text.hidden_size
    bucket = (D * D if stage == 3 else REDUCE_BUCKET_DEFAULT) if bucket is None else bucket
    frozen, trained, _ = trained_counts(cfg, args)
    sf, st, largest = zero3_counts(cfg, args, 10 * D if threshold is None else threshold) if stage == 3 \
        else (0, 0, 0)
    return full_parts(cfg, dtype_bytes, frozen, trained, batch, length, optim, plain, ranks, stage, largest, accum,
                      bucket, (sf, st))


def tensor_parallel_plan(cfg, dtype_bytes: int, batch: int, length: int, rank: int, tp: int,
                         expert_parallel: bool = False, optim: str = "adamw_torch", plain: bool = False,
                         n_lora: int | None = None) -> dict:
    """One rank's plan for LoRA under tensor parallel (tensor_parallel_size tp, finetune/tensor_parallel.py), from
    the config alone: the frozen weights as the loader slices them (parallel.py: heads, KV heads or one replicated
    head, dense and shared MLPs, vocabulary split; routed experts split inside, or 1/tp of them whole under
    expert_parallel: the same bytes; norms, router (float32) and vision tower whole), the rank's LoRA slices (A
    whole and B sliced on column-parallel linears, A sliced and B whole on row-parallel ones), their gradients and
    AdamW state, and the activations of one rank's share of every layer (the residual stream whole; under
    expert_parallel each token's experts counted at full width: a bound). n_lora: the rank's LoRA parameters when
    known (default: rank `rank` on attention, the dense MLPs and the shared experts, lora_target all)."""
    import dataclasses

    from .. import parallel
    from ..weights import hf_shapes, hf_table
    t, shapes = cfg.text, hf_shapes(cfg)
    kv_rank = max(1, t.num_key_value_heads // tp)
    w = 0
    for e in hf_table(cfg):
        kinds = e.split or (parallel.REPLICATED,) * len(e.sources)
        item = 4 if ".router_" in e.ours else dtype_bytes   # the router is kept float32
        for s, k in zip(e.sources, kinds):
            n = int(np.prod(shapes[s]))
            if e.per_expert:
                n //= tp   # split inside each expert, or whole experts on 1/tp of the ranks
            elif k == parallel.KV:
                n = n // t.num_key_value_heads * kv_rank
            elif k != parallel.REPLICATED:
                n //= tp
            w += n * item
    D, Q, KV = t.hidden_size, t.q_size // tp, kv_rank * t.head_dim
    count = 0
    for i in range(t.num_hidden_layers):
        count += rank * (D + Q) + 2 * rank * (D + KV) + rank * (Q + D)   # q, k, v (column), o (row)
        if t.is_moe_layer(i):
            S = t.moe_intermediate_size * t.n_shared_experts // tp
            count += 2 * rank * (D + S) + rank * (S + D)
        elif t.n_routed_experts:
            count += 2 * rank * (D + t.intermediate_size // tp) + rank * (t.intermediate_size // tp + D)
        else:   # GLM-4.1V's fused gate_up: one A, B of its 2 I rows sliced
            count += rank * (D + 2 * t.intermediate_size // tp) + rank * (t.intermediate_size // tp + D)
    n_lora = count if n_lora is None else n_lora
    # one rank's layer widths for the activations (parts: heads, KV heads, MLP widths, experts, vocabulary)
    experts = dict(n_routed_experts=t.n_routed_experts // tp,
                   num_experts_per_tok=min(t.num_experts_per_tok, t.n_routed_experts // tp)) if expert_parallel \
        else dict(moe_intermediate_size=t.moe_intermediate_size // tp)
    text = dataclasses.replace(t, num_attention_heads=t.num_attention_heads // tp, num_key_value_heads=kv_rank,
                               explicit_head_dim=t.head_dim, intermediate_size=t.intermediate_size // tp,
                               vocab_size=t.vocab_size // tp, **(experts if t.n_routed_experts else {}))
    return parts(dataclasses.replace(cfg, text=text), dtype_bytes, w + 4 * n_lora, batch, length, n_lora, optim,
                 plain)

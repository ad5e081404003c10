"""The documented limits of the fused Ascend kernels, one function per kernel: None when a configuration fits,
else the reason it does not. The dispatch reads them when a model is built (attention.choose_kernels,
moe_kernels.choose, quant.kernel_ok) and runs the plain path past a limit, as vllm-mindspore does; the emulations
(ascend_emulation.py, moe_kernels.py) check each call against the same numbers.

Sources, cited below by tag:
  [ms-fas]   MindSpore 2.10 FlashAttentionScore / ops.flash_attention_score docstrings
             (mindspore/ops/auto_generate/gen_ops_prim.py, ops/operations/manually_defined/ops_def.py)
  [ms-aclnn] mindspore-ai/mindspore kernel/ascend/aclnn/kernel_mod_impl/customize/flash_attention_score_aclnn_kernel.cc:
             only "TND" goes to aclnnFlashAttentionVarLenScore ("increasing array and the last number is equal to
             T"); every other layout goes to aclnnFlashAttentionScore, which takes no sequence lengths
  [ms-int]   mindspore-ai/mindspore kernel/ascend/internal/flash_attention_score.cc (lengths read as
             batch_valid_length, per sequence) and kernel_select_ascend.cc IsEnableInternalNode: the internal
             (ATB) kernels are selected only when MsContext::IsEnableInferBoost (jit_config infer_boost "on", or
             MS_ENABLE_INTERNAL_KERNELS=on), minus MS_DISABLE_INTERNAL_KERNELS_LIST; infer_boost is deprecated
             from 2.10 (mindspore/graph/jit_config.py) and this port does not set it
  [cann-vl]  CANN ops-transformer attention/flash_attention_score/docs/aclnnFlashAttentionVarLenScore.md: Atlas A2
             training series only; T <= 1M, D <= 768, N <= 256; no mask: full attention per sequence
  [ms-fia]   MindSpore 2.10 ops.fused_infer_attention_score docstring (Constraints)
  [ms-rope]  MindSpore 2.10 ops.rotary_position_embedding docstring; CANN aclnnRotaryPositionEmbedding.md
             (CANN 8.3: Atlas A2 / A3 only)
  [ms-rms]   MindSpore 2.10 ops.rms_norm docstring
  [akg-fatd] mindspore-ai/akg yaml/doc/fused_add_topk_div.md, special notes; the op exists in MindSpore 2.10 only
             as an internal kernel (libmindspore_internal_kernels.so; no aclnn kernel in libmindspore_ops_ascend.so)
  [vllm-moe] mindspore-ai/vllm-mindspore model_executor/layers/fused_moe/layer.py: fused router only when
             experts / groups <= 32, plain sigmoid + top-k otherwise
  [ms-unp]   mindspore-ai/mindspore ops/op_def/yaml/doc/moe_token_unpermute_doc.yaml: "only supported on Atlas A2
             Training Series Products", permuted_tokens and probs "only support the bfloat16 data type" (the 2.10
             docstring dropped both warnings; CANN's aclnnMoeTokenUnpermute lists fp16/bf16/fp32 on A2/A3: only
             hardware can settle it, so the stricter reading is kept)
  [ms-gmm]   MindSpore 2.10 grouped_matmul_v4 docstring (parameter limitations 1-3)
  [ms-mir]   MindSpore 2.10 ops.moe_init_routing_v2 docstring
  [ms-wqbmm] MindSpore 2.10 WeightQuantBatchMatmul docstring / aclnnWeightQuantBatchMatmulV2
Chips are named by MSContext.get_ascend_soc_version(): "ascend910b" (Atlas A2), "ascend910_93" (Atlas A3). A
chip gate is written only where a source lists the products; the others are unstated and left open.
"""
from __future__ import annotations

import os

import mindspore as ms

A2, A3 = "ascend910b", "ascend910_93"
HALF = (ms.float16, ms.bfloat16)


def soc(emulated: bool) -> str:
    """The chip: the emulations stand for an Atlas A2 (the generation every fused kernel here supports)."""
    if emulated:
        return A2
    from mindspore._c_expression import MSContext
    return MSContext.get_instance().get_ascend_soc_version()


def internal_kernels(op: str) -> bool:
    """Whether MindSpore would select its internal kernel for `op` [ms-int]."""
    on = (os.environ.get("MS_ENABLE_INTERNAL_KERNELS") == "on"
          or (ms.get_context("jit_config") or {}).get("infer_boost") == "on")
    return on and op not in os.environ.get("MS_DISABLE_INTERNAL_KERNELS_LIST", "").split(",")


def _dtype(dtype, allowed, emulated) -> str | None:
    # CPU has no bfloat16 kernels: the emulations take float32 in its place, never a dtype the document excludes;
    # None: not checked here (the caller checks the dtype apart)
    if dtype is None or dtype in allowed or (emulated and dtype == ms.float32 and ms.bfloat16 in allowed):
        return None
    return f"dtype {dtype} (documented: {', '.join(str(d) for d in allowed)})"


def _first(*reasons):
    return next((r for r in reasons if r), None)


# ----------------------------------------------------------------------------------------------- attention
VARLEN_MAX_SEGMENTS = 1024   # [ms-fas] TND: "batch is less than or equal to 1024"
VARLEN_MAX_TOKENS = 1 << 20  # [cann-vl] T in [1, 1M]


def flash_attention_varlen(heads, kv_heads, head_dim, dtype, chip, emulated) -> str | None:
    """The vision tower's FlashAttentionScore (varlen, no mask)."""
    return _first(
        _dtype(dtype, HALF, emulated),                                                        # [ms-fas]
        None if head_dim % 16 == 0 and head_dim <= 512 else f"head size {head_dim}: a multiple of 16, <= 512",
        None if heads <= 256 and heads % kv_heads == 0 else f"heads {heads}/{kv_heads}: <= 256, kv heads dividing",
        None if chip == A2 else f"chip {chip!r}: aclnnFlashAttentionVarLenScore is Atlas A2 only [cann-vl]")


def varlen_segments(seg_lens) -> str | None:
    """Per call: the segment count and total length one varlen call takes."""
    return _first(None if len(seg_lens) <= VARLEN_MAX_SEGMENTS else f"{len(seg_lens)} segments > {VARLEN_MAX_SEGMENTS}",
                  None if sum(seg_lens) <= VARLEN_MAX_TOKENS else f"{sum(seg_lens)} tokens > {VARLEN_MAX_TOKENS}")


FIA_MAX_BATCH = 65535   # [ms-fia] prompt branch (65536 for the incremental one)


def fused_infer_attention(heads, kv_heads, head_dim, dtype, chip, emulated) -> str | None:
    """The decoder's fused_infer_attention_score, BNSD (chips: not listed in the MindSpore document)."""
    return _first(
        _dtype(dtype, HALF, emulated),
        None if head_dim % 16 == 0 and head_dim <= 512 else f"head size {head_dim}: 16-aligned, <= 512",
        None if heads <= 256 else f"{heads} heads > 256",
        None if heads % kv_heads == 0 and heads // kv_heads <= 64
        else f"GQA {heads}/{kv_heads}: must divide, ratio <= 64")


ROPE_MAX_BN = 1000   # [ms-rope] "B, N < 1000"


def rotary_position_embedding(heads, head_dim, dtype, chip, emulated) -> str | None:
    return _first(
        _dtype(dtype, HALF + (ms.float32,), emulated),
        None if head_dim % 2 == 0 and head_dim < 896 else f"head size {head_dim}: even, < 896",
        None if heads < ROPE_MAX_BN else f"{heads} heads: B, N < {ROPE_MAX_BN}",
        None if chip in (A2, A3) else f"chip {chip!r}: aclnnRotaryPositionEmbedding is Atlas A2/A3 only")


def rms_norm(dtype, chip, emulated) -> str | None:
    return _dtype(dtype, HALF + (ms.float32,), emulated)                                        # [ms-rms]


# ----------------------------------------------------------------------------------------------- MoE
FATD_MAX_PER_GROUP = 32   # [akg-fatd] b <= groupNum * 32
FATD_GROUPS_AT_32 = 8     # [akg-fatd] if b >= 32 then groupNum = 8


def fused_add_topk_div(n_experts, n_group, topk_group, top_k, chip, internal) -> str | None:
    """The fused router; the group score is the sum of each group's top n = 2 (GLM-4.5's rule)."""
    E, G = n_experts, n_group
    return _first(
        None if internal else "an internal kernel only: needs jit_config infer_boost (deprecated from 2.10) [ms-int]",
        None if G > 0 and E % G == 0 and 0 < topk_group <= G else f"{E} experts / {G} groups / topk_group {topk_group}",
        None if 0 < top_k <= E and E >= 2 * G else f"top-k {top_k}, {E} experts in {G} groups of >= 2",
        None if E <= G * FATD_MAX_PER_GROUP else f"{E // G} experts per group > {FATD_MAX_PER_GROUP}",
        None if E < 32 or G == FATD_GROUPS_AT_32 else f"{E} experts (>= 32) need {FATD_GROUPS_AT_32} groups, got {G}")


def moe_token_unpermute(dtype, top_k, chip, emulated) -> str | None:
    return _first(_dtype(dtype, (ms.bfloat16,), emulated),                                     # [ms-unp]
                  None if top_k <= 512 else f"top-k {top_k} > 512",
                  None if chip == A2 else f"chip {chip!r}: Atlas A2 only [ms-unp]")


def grouped_matmul(dtype, emulated) -> str | None:
    return _dtype(dtype, HALF + (ms.float32,), emulated)                                       # [ms-gmm] tables 2-3


def moe_init_routing(dtype, emulated) -> str | None:
    return _dtype(dtype, HALF + (ms.float32,), emulated)                                       # [ms-mir]


# ----------------------------------------------------------------------------------------------- weight-only quant
WQBMM_MAX_KN = 65535


def weight_quant_batch_matmul(k, n, group, dtype, emulated) -> str | None:
    """group 0: per channel; else per group of `group` input rows."""
    return _first(
        _dtype(dtype, HALF, emulated),
        None if 1 <= k <= WQBMM_MAX_KN and 1 <= n <= WQBMM_MAX_KN else f"k={k}, n={n}: each in [1, {WQBMM_MAX_KN}]",
        None if not group or (group % 32 == 0 and 32 <= group <= k - 1)
        else f"group size {group}: a multiple of 32 in [32, k-1]")

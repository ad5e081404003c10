"""The fine-tuning keys: LLaMA-Factory's names and defaults, from a YAML file and/or `--key value` flags.

`parse(argv)` reads `[config.yaml] [--key value ...]` as `llamafactory-cli train config.yaml key=value` reads its
inputs: the file first, then each flag overrides. A key LLaMA-Factory does not know is an error naming it; one it
knows that we do not implement is refused by name (LLAMAFACTORY_KEYS lists all 352 of 0.9.5's training keys); a bad
value is an error naming its key. Errors are FinetuneError, one line each.

Deviations: `per_device_train_batch_size` and the other transformers TrainingArguments keep transformers 5's
defaults as LLaMA-Factory does (batch 8, logging and saving every 500 steps); `optim` defaults to `adamw_torch`
(transformers' `adamw_torch_fused` is the same update, and is taken as a name for it); `warmup_ratio` (gone from
transformers 5's TrainingArguments, still in LLaMA-Factory's recipes) is taken; `report_to` takes only `none`.
Keys that only tune LLaMA-Factory's own machinery (dataset caching and worker counts, `ddp_timeout`,
`trust_remote_code`, `use_fast_tokenizer`) are taken and change nothing here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field


class FinetuneError(ValueError):
    """Bad fine-tuning input (a key, a value, a data sample or a folder): one line for the user."""


# Every key `llamafactory-cli train` takes in 0.9.5 (ModelArguments, DataArguments, transformers' training
# arguments, FinetuningArguments, GeneratingArguments), so that a known key we do not implement is named as such.
LLAMAFACTORY_KEYS = frozenset("""
accelerator_config activation_checkpointing activation_checkpointing_kwargs adam_beta1 adam_beta2 adam_epsilon
adapter_folder adapter_name_or_path add_special_tokens add_tokens additional_target apollo_layerwise apollo_proj
apollo_proj_type apollo_rank apollo_scale apollo_scale_front apollo_scale_type apollo_target apollo_update_interval
asft_alpha audio_sampling_rate auto_find_batch_size average_tokens_across_devices badam_mask_mode badam_mode
badam_start_block badam_switch_interval badam_switch_mode badam_update_ratio badam_verbose batch_eval_metrics bf16
bf16_full_eval block_diag_attn buffer_size cache_dir compute_accuracy compute_dtype create_new_adapter
crop_to_patches cutoff_len data_seed data_shared_file_system dataloader_drop_last dataloader_in_order
dataloader_multiprocessing_context dataloader_num_workers dataloader_persistent_workers dataloader_pin_memory
dataloader_prefetch_factor dataset dataset_dir ddp_backend ddp_broadcast_buffers ddp_bucket_cap_mb
ddp_find_unused_parameters ddp_static_graph ddp_timeout debug deepspeed default_system device_map
disable_gradient_checkpointing disable_shuffling disable_tqdm do_eval do_predict do_sample do_train
double_quantization dpo_label_smoothing eaft_alpha early_stopping_steps enable_jit_checkpoint enable_liger_kernel
enable_thinking enable_torch_profiler eval_accumulation_steps eval_dataset eval_delay eval_do_concat_batches
eval_num_beams eval_on_each_dataset eval_on_start eval_steps eval_strategy eval_use_gather_object export_device
export_dir export_hub_model_id export_legacy_format export_quantization_bit export_quantization_dataset
export_quantization_maxlen export_quantization_nsamples export_size finetuning_type flash_attn fp16 fp16_full_eval
fp8 fp8_backend fp8_enable_fsdp_float8_all_gather freeze_extra_modules freeze_language_model
freeze_multi_modal_projector freeze_trainable_layers freeze_trainable_modules freeze_vision_tower fsdp fsdp_config
full_determinism galore_layerwise galore_proj_type galore_rank galore_scale galore_target galore_update_interval
generation_config generation_max_length generation_num_beams gradient_accumulation_steps gradient_checkpointing
gradient_checkpointing_kwargs greater_is_better hf_hub_token hub_always_push hub_model_id hub_private_repo
hub_revision hub_strategy hub_token hyper_parallel_args ignore_data_skip ignore_pad_token_for_loss
image_do_pan_and_scan image_max_pixels image_min_pixels include_effective_tokens_per_second include_for_metrics
include_num_input_tokens_seen infer_backend infer_dtype init_special_tokens interleave_probs
kt_expert_checkpoint_path kt_lora_expert_intermediate_size kt_lora_expert_num kt_use_lora_experts kt_weight_path
kto_chosen_weight kto_rejected_weight label_names label_smoothing_factor ld_alpha learning_rate length_column_name
length_penalty liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica log_on_each_node
logging_first_step logging_nan_inf_filter logging_steps logging_strategy lora_alpha lora_dropout lora_rank
lora_target loraplus_lr_embedding loraplus_lr_ratio low_cpu_mem_usage lr_scheduler_kwargs lr_scheduler_type
mask_history master_addr master_port max_grad_norm max_length max_new_tokens max_samples max_steps media_dir
metric_for_best_model mix_strategy mixture_of_depths model_max_length model_name_or_path model_revision
module_dropout moe_aux_loss_coef ms_hub_token neat_packing neftune_noise_alpha new_special_tokens_config num_beams
num_train_epochs offload_folder oft_block_size oft_rank oft_target om_hub_token optim optim_args
optim_target_modules output_dir overwrite_cache overwrite_output_dir packing parallelism_config
per_device_eval_batch_size per_device_train_batch_size pissa_convert pissa_init pissa_iter plot_loss ppo_buffer_size
ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards predict_with_generate prediction_loss_only pref_bco_weight
pref_beta pref_ftx pref_loss preprocessing_batch_size preprocessing_num_workers preserve_thinking print_param_status
profile_modules profiler_active_steps profiler_output_dir profiler_profile_memory profiler_record_shapes
profiler_repeat profiler_wait_steps profiler_warmup_steps profiler_with_stack project pure_bf16 push_to_hub
quantization_bit quantization_device_map quantization_method quantization_type ray_init_kwargs ray_num_workers
ref_model ref_model_adapters ref_model_quantization_bit remove_unused_columns repetition_penalty report_to
resize_vocab restore_callback_states_from_checkpoint resume_from_checkpoint reward_model reward_model_adapters
reward_model_quantization_bit reward_model_type rope_scaling run_name save_on_each_node save_only_model save_steps
save_strategy save_total_limit seed sglang_config sglang_lora_backend sglang_maxlen sglang_mem_fraction
sglang_tp_size shift_attn simpo_gamma skip_memory_metrics skip_special_tokens sortish_sampler split_special_tokens
stage streaming swanlab_api_key swanlab_lark_secret swanlab_lark_webhook_url swanlab_logdir swanlab_mode
swanlab_project swanlab_run_name swanlab_workspace temperature template tf32 tokenized_path tool_format top_k top_p
torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps trackio_bucket_id trackio_space_id
trackio_static_space_id train_from_scratch train_on_prompt train_sampling_strategy trust_remote_code
upcast_layernorm upcast_lmhead_output use_adam_mini use_apollo use_asft_loss use_audio_in_video use_badam use_cache
use_cpu use_dft_loss use_dora use_eaft_loss use_fast_tokenizer use_galore use_hyper_parallel use_kt use_kv_cache
use_liger_kernel use_llama_pro use_mca use_muon use_reentrant_gc use_rslora use_swanlab use_unsloth use_unsloth_gc
use_v1_kernels val_size video_fps video_max_pixels video_maxlen video_min_pixels vllm_config vllm_enforce_eager
vllm_gpu_util vllm_max_lora_rank vllm_maxlen warmup_steps weight_decay
""".split())

# Taken so that recipes move over unchanged; they tune LLaMA-Factory's machinery and change nothing here.
NO_EFFECT = ("trust_remote_code", "use_fast_tokenizer", "overwrite_cache", "preprocessing_num_workers",
             "preprocessing_batch_size", "dataloader_num_workers", "ddp_timeout", "logging_first_step")

TEMPLATES = ("glm4v", "glm4_5v")
SCHEDULERS = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")
FINETUNING_TYPES = ("lora", "full", "freeze")


@dataclass
class FinetuneArgs:
    # model
    model_name_or_path: str = None
    adapter_name_or_path: str = None
    template: str = None                     # default: from the checkpoint's model_type (glm4v / glm4v_moe)
    # data
    dataset: list = None                     # names in dataset_dir/dataset_info.json or .json/.jsonl paths
    dataset_dir: str = "data"
    media_dir: str = None                    # default: dataset_dir (a name) or the file's folder (a path)
    cutoff_len: int = 2048
    max_samples: int = None
    train_on_prompt: bool = False
    mask_history: bool = False
    enable_thinking: bool = True             # None: keep CoT as written, empty CoT goes to the prompt
    preserve_thinking: bool = False
    default_system: str = None
    val_size: float = 0.0
    tokenized_path: str = None
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    # method
    stage: str = "sft"
    do_train: bool = True
    finetuning_type: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = None                   # None: 2 * lora_rank
    lora_dropout: float = 0.0
    lora_target: list = field(default_factory=lambda: ["all"])
    use_rslora: bool = False
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    freeze_language_model: bool = False
    freeze_trainable_layers: int = 2         # freeze: the last n text layers (n > 0) or the first |n| (n < 0)
    freeze_trainable_modules: list = field(default_factory=lambda: ["all"])
    freeze_extra_modules: list = None
    # output
    output_dir: str = None
    overwrite_output_dir: bool = False
    logging_steps: float = 500
    save_steps: float = 500
    save_total_limit: int = None
    save_only_model: bool = False
    plot_loss: bool = False
    report_to: str = "none"
    resume_from_checkpoint: str = None
    # training
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0                  # under 1: a fraction of the steps (transformers 5)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0               # 0: no clipping
    optim: str = "adamw_torch"
    seed: int = 42
    disable_shuffling: bool = False
    gradient_checkpointing: bool = None
    disable_gradient_checkpointing: bool = False
    bf16: bool = False
    deepspeed: str = None                    # a DeepSpeed JSON: its zero_optimization.stage (0-3) under msrun
    # taken, no effect here (NO_EFFECT)
    trust_remote_code: bool = False
    use_fast_tokenizer: bool = True
    overwrite_cache: bool = False
    preprocessing_num_workers: int = None
    preprocessing_batch_size: int = 1000
    dataloader_num_workers: int = 0
    ddp_timeout: int = 1800
    logging_first_step: bool = False
    # tensor / expert parallel under msrun (generate.py's flags; not LLaMA-Factory keys): finetune/tensor_parallel.py
    tensor_parallel_size: int = 1
    expert_parallel: bool = False

    @property
    def recompute(self) -> bool:
        """LLaMA-Factory turns gradient checkpointing on unless disable_gradient_checkpointing."""
        return bool(self.gradient_checkpointing) or not self.disable_gradient_checkpointing

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)


FIELDS = {f.name: f for f in dataclasses.fields(FinetuneArgs)}
PARALLEL_KEYS = ("tensor_parallel_size", "expert_parallel")
OPTIONAL = {"model_name_or_path", "adapter_name_or_path", "template", "dataset", "media_dir", "max_samples",
            "default_system", "tokenized_path", "lora_alpha", "output_dir", "save_total_limit",
            "resume_from_checkpoint", "gradient_checkpointing", "preprocessing_num_workers", "enable_thinking",
            "deepspeed", "freeze_extra_modules"}
assert set(FIELDS) <= LLAMAFACTORY_KEYS | {"warmup_ratio", *PARALLEL_KEYS}, set(FIELDS) - LLAMAFACTORY_KEYS


def parse(argv) -> FinetuneArgs:
    """`[config.yaml] [--key value ...]` -> FinetuneArgs (flags override the file)."""
    argv = list(argv)
    values = {}
    if argv and not argv[0].startswith("--"):
        values.update(_read_yaml(argv.pop(0)))
    i = 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--") or flag == "--":
            raise FinetuneError(f"expected --key value, got {flag!r} (a config file comes first, once)")
        key, eq, value = flag[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            elif key in FIELDS and _kind(key) is bool:
                value = True   # a bare --overwrite_output_dir, as transformers' parser takes it
            else:
                raise FinetuneError(f"--{key} needs a value")
        values[key] = value
        i += 1
    return build(values)


def _read_yaml(path):
    try:
        import yaml
    except ImportError:
        raise FinetuneError("reading a YAML config needs PyYAML (pip install pyyaml)") from None
    if not os.path.isfile(path):
        raise FinetuneError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FinetuneError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def build(values: dict) -> FinetuneArgs:
    """A dict of keys (YAML values, or strings from flags) -> checked FinetuneArgs."""
    unknown = [k for k in values if k not in FIELDS and k not in LLAMAFACTORY_KEYS]
    if unknown:
        raise FinetuneError(f"unknown key: {unknown[0]}" + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else ""))
    refused = [k for k in values if k not in FIELDS]
    if refused:
        raise FinetuneError(f"{refused[0]}: a LLaMA-Factory key that glm4v-ms does not implement"
                            + (f" (also: {', '.join(refused[1:])})" if refused[1:] else ""))
    args = FinetuneArgs(**{k: _convert(k, v) for k, v in values.items()})
    check(args)
    return args


_BOOL = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _kind(name):
    default = FIELDS[name].default
    if name in ("dataset", "lora_target", "freeze_trainable_modules", "freeze_extra_modules"):
        return list
    if name in ("enable_thinking", "gradient_checkpointing"):
        return bool
    if name in ("logging_steps", "save_steps", "warmup_steps", "val_size", "num_train_epochs"):
        return float
    if name in ("max_samples", "lora_alpha", "save_total_limit", "preprocessing_num_workers"):
        return int
    return str if default is None else type(default)


def _convert(name, value):
    """One value as YAML or a flag gives it -> the field's type; an impossible one is an error naming the key."""
    kind = _kind(name)
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and (
            name in OPTIONAL or name == "report_to"):
        return None if name != "report_to" else "none"
    if value is None:
        if name in OPTIONAL:
            return None
        raise FinetuneError(f"{name}: a value is needed, got null")
    bad = FinetuneError(f"{name}: expected {kind.__name__ if kind is not list else 'a name or a list'}, "
                        f"got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL:
            return _BOOL[value.strip().lower()]
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            try:
                f = float(str(value).strip())
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
            raise bad from None
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            f = float(value)   # YAML reads "1e-4" as a string: float() takes it
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(f):
            raise bad
        return f
    if kind is list:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            raise bad
        if not items or any(not v for v in items):
            raise FinetuneError(f"{name}: empty name in {value!r}")
        return items
    if isinstance(value, (dict, list)):
        raise bad
    return str(value)


def check(a: FinetuneArgs):
    """Value rules, each error naming its key."""
    def need(ok, key, rule):
        if not ok:
            raise FinetuneError(f"{key}: {rule}, got {getattr(a, key)!r}")

    if a.model_name_or_path is None:
        raise FinetuneError("model_name_or_path: required (a checkpoint folder, a hub id, demo-tiny or demo-150m)")
    if not a.dataset:
        raise FinetuneError("dataset: required (a name in dataset_dir/dataset_info.json, or a .json/.jsonl file)")
    if a.output_dir is None and a.tokenized_path is None:
        raise FinetuneError("output_dir: required (where the adapter and checkpoints go)")
    need(a.stage == "sft", "stage", "only sft (supervised fine-tuning) is implemented")
    need(a.do_train, "do_train", "must be true (evaluation and prediction runs are not implemented)")
    need(a.finetuning_type in FINETUNING_TYPES, "finetuning_type", f"must be one of {', '.join(FINETUNING_TYPES)}")
    if a.finetuning_type == "lora":
        need(a.freeze_vision_tower, "freeze_vision_tower", "training the vision tower with LoRA is not implemented "
             "(finetuning_type full or freeze trains it; LoRA on visual.merger: freeze_multi_modal_projector false)")
    else:
        need(a.adapter_name_or_path is None, "adapter_name_or_path", f"with finetuning_type {a.finetuning_type}: "
             "not implemented (merge it into the base first: python -m glm4v_ms.convert --adapter)")
    if a.finetuning_type == "lora":
        need(not a.freeze_language_model, "freeze_language_model", "with lora: not implemented (the LoRA targets "
             "are the language model's linears)")
    need(a.template is None or a.template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}")
    if a.train_on_prompt:   # both GLM templates use efficient_eos; LLaMA-Factory's own message
        raise FinetuneError("train_on_prompt: Current template does not support `train_on_prompt`.")
    need(a.cutoff_len >= 1, "cutoff_len", "must be >= 1")
    need(a.max_samples is None or a.max_samples >= 1, "max_samples", "must be >= 1")
    need(a.val_size >= 0, "val_size", "must be >= 0 (a fraction under 1, or a count)")
    need(a.val_size < 1 or a.val_size.is_integer(), "val_size", "must be a fraction under 1 or a whole count")
    for key in ("image_max_pixels", "image_min_pixels", "video_max_pixels", "video_min_pixels", "video_maxlen"):
        need(getattr(a, key) >= 1, key, "must be >= 1")
    need(a.image_max_pixels >= a.image_min_pixels, "image_max_pixels", "cannot be smaller than image_min_pixels")
    need(a.video_max_pixels >= a.video_min_pixels, "video_max_pixels", "cannot be smaller than video_min_pixels")
    need(a.video_fps > 0, "video_fps", "must be > 0")
    need(a.lora_rank >= 1, "lora_rank", "must be >= 1")
    need(a.lora_alpha is None or a.lora_alpha > 0, "lora_alpha", "must be > 0")
    need(0 <= a.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(a.per_device_train_batch_size >= 1, "per_device_train_batch_size", "must be >= 1")
    need(a.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
    need(a.learning_rate >= 0, "learning_rate", "must be >= 0")
    need(a.num_train_epochs > 0 or a.max_steps > 0, "num_train_epochs", "must be > 0 (or set max_steps)")
    need(a.max_steps == -1 or a.max_steps >= 1, "max_steps", "must be -1 (use num_train_epochs) or >= 1")
    need(a.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type", f"must be one of {', '.join(SCHEDULERS)}")
    need(a.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(0 <= a.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(a.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(a.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: no clipping)")
    need(a.optim in OPTIMIZERS, "optim", f"must be one of {', '.join(OPTIMIZERS)}")
    need(a.logging_steps > 0, "logging_steps", "must be > 0")
    need(a.save_steps > 0, "save_steps", "must be > 0")
    need(a.save_total_limit is None or a.save_total_limit >= 1, "save_total_limit", "must be >= 1")
    need(a.report_to in ("none", "", None), "report_to", "only none (no logging integrations here)")
    if a.deepspeed is not None:   # read now: a bad config fails before the data and the model
        stage = zero_stage(a.deepspeed)
        reduce_bucket_size(a.deepspeed, 1)
        persistence_threshold(a.deepspeed, 1)
        if stage == 3 and a.finetuning_type == "lora":
            raise FinetuneError(f"deepspeed: {a.deepspeed} asks for ZeRO stage 3 (sharded parameters) with "
                                "finetuning_type lora: not implemented (stage 3 is for full and freeze; with LoRA "
                                "use stage 2)")
    check_parallel(a)


def zero_stage(path) -> int:
    """The ZeRO stage of a DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z{0,2,3}_config.json);
    its other keys are DeepSpeed's engine settings ("auto" ones follow our keys) and are not read, except that
    offloading and a numeric batch setting that contradicts ours are refused."""
    if path is None:
        return 0
    zero = _zero_section(path)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise FinetuneError(f"deepspeed: {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if dev not in ("none", None):
            raise FinetuneError(f"deepspeed: {path}: zero_optimization.{key} to {dev}: offloading is not implemented")
    return int(stage)


def _zero_section(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FinetuneError(f"deepspeed: {path} not found (a DeepSpeed JSON config)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FinetuneError(f"deepspeed: cannot read {path} as JSON: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise FinetuneError(f"deepspeed: {path} is not a JSON object")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise FinetuneError(f"deepspeed: {path}: zero_optimization must be an object")
    return zero


REDUCE_BUCKET_DEFAULT = 500_000_000   # DeepSpeed's zero_optimization.reduce_bucket_size default (elements)


def reduce_bucket_size(path, hidden_size: int) -> int:
    """Elements per bucket of the gradient reduction: the config's zero_optimization.reduce_bucket_size (DeepSpeed's
    default 5e8 when absent; "auto" as transformers' integration fills it: hidden_size ** 2, the text model's
    hidden size for a config that nests it)."""
    if path is None:
        return REDUCE_BUCKET_DEFAULT
    v = _zero_section(path).get("reduce_bucket_size", REDUCE_BUCKET_DEFAULT)
    return _elements(path, "reduce_bucket_size", v, int(hidden_size) * int(hidden_size), 1)


PERSISTENCE_DEFAULT = 100_000   # DeepSpeed's zero_optimization.stage3_param_persistence_threshold default


def persistence_threshold(path, hidden_size: int) -> int:
    """ZeRO-3: a parameter of at most this many elements is held whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold: 1e5 when absent; "auto" as transformers fills it: 10 x hidden_size)."""
    v = _zero_section(path).get("stage3_param_persistence_threshold", PERSISTENCE_DEFAULT) if path else \
        PERSISTENCE_DEFAULT
    return _elements(path, "stage3_param_persistence_threshold", v, 10 * int(hidden_size), 0)


def _elements(path, key, v, auto, least):
    if v == "auto":
        return auto
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < least or v != int(v):
        sign = "positive" if least else "non-negative"
        raise FinetuneError(f"deepspeed: {path}: zero_optimization.{key} must be a {sign} whole number of elements "
                            f"or \"auto\", got {v!r}")
    return int(v)


def check_batch_keys(path, per_device: int, accum: int, world: int):
    """DeepSpeed's own batch keys, when numbers rather than "auto", must agree with ours (as the HF integration
    insists)."""
    if path is None:
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    for key, ours in (("train_micro_batch_size_per_gpu", per_device), ("gradient_accumulation_steps", accum),
                      ("train_batch_size", per_device * accum * world)):
        v = cfg.get(key, "auto")
        if v != "auto" and v != ours:
            raise FinetuneError(f"deepspeed: {path} sets {key} {v}, this run has {ours} (use \"auto\")")


def check_parallel(a: FinetuneArgs):
    """tensor_parallel_size / expert_parallel on their own (against the launch and the model: tensor_parallel.py)."""
    if a.tensor_parallel_size < 1:
        raise FinetuneError(f"tensor_parallel_size: must be >= 1, got {a.tensor_parallel_size!r}")
    if a.expert_parallel and a.tensor_parallel_size == 1:
        raise FinetuneError("expert_parallel: needs tensor_parallel_size > 1 (the ranks to place experts on)")
    if a.tensor_parallel_size > 1 and a.finetuning_type != "lora":
        raise FinetuneError(f"finetuning_type {a.finetuning_type} with tensor_parallel_size {a.tensor_parallel_size}: "
                            f"not implemented (LoRA only under tensor parallel)")
    if a.tensor_parallel_size > 1 and a.deepspeed is not None:
        raise FinetuneError(f"deepspeed with tensor_parallel_size {a.tensor_parallel_size}: sharded optimizer state "
                            f"(ZeRO) under tensor parallel is not implemented; drop one of them")

"""LoRA fine-tuning under tensor / expert parallel as a user runs it: the README's `msrun ... finetune.py
demo_tiny_lora.yaml --tensor_parallel_size 2 --expert_parallel true` on a tiny GLM-4.5V (made by transformers'
Glm4vMoeForConditionalGeneration, with the tiny tokenizer and processor files) writes the PEFT adapter and the log
of `python -m glm4v_ms.finetune` on one process (one msrun launch). The trainer's maths on 2 ranks (SGD, AdamW,
the replicated KV head, resuming) is tested in tests/test_parallel.py's launch. Bad layouts: one line, exit 2,
nothing written, checked before any process group is joined (so alike on every rank)."""
import json
import os
import subprocess
import time

import numpy as np
import pytest

import tinymoe
from glm4v_ms.finetune.adapter import WEIGHTS, SafetensorsFile
from glm4v_ms.processing import tiny
from test_finetune_dp import YAML, env, free_port, logs_of

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN_FIELDS = dict(image_token_id="<|image|>", video_token_id="<|video|>", image_start_token_id="<|begin_of_image|>",
                    image_end_token_id="<|end_of_image|>", video_start_token_id="<|begin_of_video|>",
                    video_end_token_id="<|end_of_video|>")
START = "msrun --worker_num=2 --local_worker_num=2 --master_port=8120"   # the README's tensor-parallel command


def glm45v_tiny(folder):
    """transformers' tiny GLM-4.5V with the tiny tokenizer's ids, and its tokenizer and processor files."""
    ids = tiny.special_token_ids()
    tinymoe.build(folder, seed=8, ids={f: ids[t] for f, t in TOKEN_FIELDS.items()})
    tiny.write_all(folder)
    return folder


def test_readme_command_tp2_ep(tmp_path):
    """The README's command (2 ranks, tensor_parallel_size 2, experts whole per rank): rank 0 speaks and writes; the
    adapter equals one process's (AdamW: within 5e-3 x lr, as Adam's near-zero gradients carry the summation order;
    see tests/test_parallel.py) and so do the logged losses (rounded to 4 decimals by the log)."""
    from test_readme_commands import readme_command
    from glm4v_ms.finetune.__main__ import main
    base = glm45v_tiny(str(tmp_path / "glm45v"))
    two, one, logs = tmp_path / "two", tmp_path / "one", tmp_path / "logs"
    cmd = readme_command(START)
    assert cmd[cmd.index("finetune.py"):][:2] == ["finetune.py", YAML], cmd
    assert cmd[-6:] == ["--tensor_parallel_size", "2", "--expert_parallel", "true", "--model_name_or_path",
                        "path/to/GLM-4.5V"], cmd
    cmd = [f"--master_port={free_port()}" if c.startswith("--master_port=") else f"--log_dir={logs}"
           if c.startswith("--log_dir=") else base if c == "path/to/GLM-4.5V" else c for c in cmd]
    # the 4 samples in one micro-batch: one shape, so one compiled step (each new shape compiles, ~20 s here)
    flags = ["--template", "glm4_5v", "--max_steps", "2", "--save_steps", "2", "--plot_loss", "false",
             "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["--output_dir", str(two), *flags], env=env(), capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    print(f"msrun: {time.perf_counter() - t0:.1f} s")
    text = logs_of(logs)
    assert p.returncode == 0, "\n".join(f"== {k}\n{v[-3000:]}" for k, v in text.items())
    assert "[memory per rank (2 ranks, tensor parallel, experts whole): " in text["worker_0.log"]
    assert "[train] step 2/2" in text["worker_0.log"] and "[train]" not in text["worker_1.log"]
    assert sorted(os.listdir(two)) == ["adapter_config.json", WEIGHTS, "checkpoint-2", "trainer_log.jsonl"]

    t0 = time.perf_counter()
    assert main([YAML, "--model_name_or_path", base, "--output_dir", str(one), *flags]) == 0
    print(f"one process: {time.perf_counter() - t0:.1f} s")
    a, b = (SafetensorsFile(os.path.join(d, WEIGHTS)) for d in (two, one))
    assert sorted(a.keys()) == sorted(b.keys())
    assert any("shared_experts" in k for k in b.keys())
    print("adapter: max abs difference", max(float(np.abs(a.read(k)[0] - b.read(k)[0]).max()) for k in b.keys()))
    for k in b.keys():
        assert a.read(k)[0].shape == b.read(k)[0].shape, k
        assert np.abs(a.read(k)[0] - b.read(k)[0]).max() <= 5e-3 * 1e-3, k   # the yaml's learning_rate 1e-3
        if "lora_B" in k:
            assert np.abs(b.read(k)[0]).max() > 1e-5, k   # trained
    la, lb = ([json.loads(ln)["loss"] for ln in open(d / "trainer_log.jsonl")] for d in (two, one))
    np.testing.assert_allclose(la, lb, atol=1e-4)
    assert la[1] < la[0]   # the second step sees the first one's update
    shapes = []
    for d in (two, one):   # the checkpoint's optimizer state is whole: the same tensors as one process's
        with np.load(d / "checkpoint-2" / "optimizer.npz") as z:
            shapes.append({k: z[k].shape for k in z.files})
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("workers,flags,msg", [
    (2, ["--tensor_parallel_size", "4"], "tensor_parallel_size 4 but 2 worker process(es) were launched: tensor "
                                         "parallel takes every rank (data parallel combined with it is not "
                                         "implemented); start msrun --worker_num=4 --local_worker_num=4 ..."),
    (3, ["--tensor_parallel_size", "3"], "tensor_parallel_size 3 does not divide the "),
    (2, ["--tensor_parallel_size", "2", "--expert_parallel", "true"], "expert_parallel: glm4v has no experts"),
    (2, ["--tensor_parallel_size", "2", "--deepspeed", "ds.json"], "deepspeed with tensor_parallel_size 2: sharded "
                                                                   "optimizer state (ZeRO) under tensor parallel is "
                                                                   "not implemented; drop one of them"),
    (1, ["--expert_parallel", "true"], "expert_parallel: needs tensor_parallel_size > 1"),
])
def test_bad_layout(tmp_path, monkeypatch, workers, flags, msg, capsys):
    """What each msrun rank runs (the launch's variables as msrun sets them): one line, exit 2, nothing written,
    before any process group is joined (so every rank exits alike, none waits)."""
    from glm4v_ms import demo
    from glm4v_ms.finetune.__main__ import main
    demo.cached("demo-tiny")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    flags = [str(tmp_path / f) if f == "ds.json" else f for f in flags]
    if workers > 1:
        for k, v in dict(MS_ROLE="MS_WORKER", MS_WORKER_NUM=str(workers), MS_NODE_ID="0", MS_SCHED_HOST="127.0.0.1",
                         MS_SCHED_PORT=str(free_port())).items():
            monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    assert main([YAML, "--output_dir", str(out), "--per_device_train_batch_size", "1", *flags]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: " + msg), err[-2000:]
    assert "Traceback" not in err and not out.exists()


GLM45V = {"model_type": "glm4v_moe", "image_token_id": 151363, "video_token_id": 151364,
          "text_config": {"vocab_size": 151552, "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
                          "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 10944,
                          "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8,
                          "n_shared_experts": 1, "first_k_dense_replace": 1, "attention_bias": True,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}},
          "vision_config": {"depth": 24, "hidden_size": 1536, "num_heads": 12, "out_hidden_size": 4096,
                            "intermediate_size": 10944, "patch_size": 14, "spatial_merge_size": 2,
                            "temporal_patch_size": 2, "image_size": 336}}
LAYOUTS = [("1 card", 1, False, ""), ("TP 4", 4, False, ""), ("TP 4 + EP 4", 4, True, "4 x 66 GiB"),
           ("TP 8 + EP 8", 8, True, "")]


def plan_rows():
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.finetune import plan
    cfg = Glm4vConfig.from_dict(GLM45V)
    rows = []
    for label, tp, ep, swift in LAYOUTS:
        p = plan.tensor_parallel_plan(cfg, 2, 1, 2048, 8, tp, ep)
        total = plan.total(p, True)
        rows.append(f"| {label} | {p['frozen'] / 1e9:.2f} GB | {p['trainable'] // 4 / 1e6:.1f} M | "
                    f"{(p['grads'] + p['optimizer']) / 1e6:.0f} MB | {p['activations_recompute'] / 1e9:.2f} GB | "
                    f"{total / 1e9:.2f} GB = {total / 2 ** 30:.1f} GiB | {swift} |")
    return rows


def test_readme_tensor_parallel_plan():
    """The README's per-rank GLM-4.5V LoRA table is plan.tensor_parallel_plan's (GLM-4.5V's config.json sizes);
    on one card it is config_plan's LoRA count, and its frozen weights split as the inference loader splits them
    (README: 55.23 GB per rank at TP 4)."""
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.finetune import plan
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for row in plan_rows():
        assert row in readme, row
    cfg = Glm4vConfig.from_dict(GLM45V)
    one = plan.config_plan(cfg, 2, 1, 2048, 8)
    assert plan.tensor_parallel_plan(cfg, 2, 1, 2048, 8, 1)["trainable"] == one["trainable"]
    tp4 = plan.tensor_parallel_plan(cfg, 2, 1, 2048, 8, 4, True)
    assert f"{tp4['frozen'] / 1e9:.2f}" == "55.23"

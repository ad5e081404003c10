"""GLM-4.5V as a user runs it: generate.py in one process, and under msrun split over 2 ranks (rank 0 prints the
same greedy answer, rank 1 nothing); the thinking switch through the chat template; a bad tensor-parallel size."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tinymoe
from glm4v_ms import Glm4vProcessor
from glm4v_ms.processing import split_thinking, tiny
from test_parallel import msrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A GLM-4.5-style template written for these tests (the real GLM-4.5V file is not in our reference material): it
# implements the documented switch, a '/nothink' suffix on user turns and an empty <think></think> in the
# generation prompt when enable_thinking is false.
TEMPLATE = (
    "[gMASK]<sop>{%- for m in messages %}{%- if m.role == 'user' %}<|user|>\n"
    "{%- if m.content is string %}{{ m.content }}{%- else %}{%- for item in m.content %}"
    "{%- if item.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '/nothink' if (enable_thinking is defined and not enable_thinking) else '' }}"
    "{%- elif m.role == 'assistant' %}<|assistant|>\n<think></think>\n{{ m.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{{- '\\n<think></think>\\n' if (enable_thinking is defined and not enable_thinking) else '' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("glm45v_cli"))
    ids = dict(image_token_id=tiny.IMAGE_TOKEN_ID, video_token_id=tiny.VIDEO_TOKEN_ID,
               image_start_token_id=tiny.IMAGE_START_TOKEN_ID, image_end_token_id=tiny.IMAGE_END_TOKEN_ID,
               video_start_token_id=tiny.VIDEO_START_TOKEN_ID, video_end_token_id=tiny.VIDEO_END_TOKEN_ID)
    tinymoe.build(d, seed=8, ids=ids)
    tiny.write_tokenizer_files(d, chat_template=TEMPLATE)
    tiny.write_processor_configs(d, image_size={"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 64})
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": tiny.EOS_TOKEN_IDS, "pad_token_id": tiny.PAD_TOKEN_ID, "do_sample": False}, f)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(
        os.path.join(d, "cat.png"))
    return d


def cli(folder, *args):
    env = dict(os.environ, GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model_name", folder, *args], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


ARGS = ["--prompt", "Describe this image.", "--greedy", "--max_new_tokens", "6"]


def args(folder):
    return ["--image", os.path.join(folder, "cat.png"), *ARGS]


def prompt_tokens(err):
    return int(re.search(r"prompt tokens: (\d+)", err).group(1))


def test_enable_thinking_reaches_the_template(folder):
    proc = Glm4vProcessor.from_pretrained(folder)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    on = proc.apply_chat_template(msgs, add_generation_prompt=True)
    off = proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|assistant|>") and off.endswith("Hi/nothink<|assistant|>\n<think></think>\n")


def test_split_thinking_glm45v_format():
    """GLM-4.5V: no <answer> tags; the answer follows </think>; boxes are left to the caller."""
    assert split_thinking("<think>look</think>\nA cat <|begin_of_box|>1<|end_of_box|>") == \
        ("look", "A cat <|begin_of_box|>1<|end_of_box|>")
    assert split_thinking("<think></think>\nNo thinking.") == ("", "No thinking.")
    assert split_thinking("<think>a</think><answer>b</answer>") == ("a", "b")   # GLM-4.1V's still works


@pytest.fixture(scope="module")
def single(folder):
    rc, out, err = cli(folder, *args(folder))
    assert rc == 0, err
    return out, err


def test_generate_cli_single_process(folder, single):
    out, err = single
    assert out.strip() and "tokens/s" in err.strip().splitlines()[-1]
    rc, _, err_off = cli(folder, *args(folder), "--enable_thinking", "false")
    assert rc == 0, err_off
    assert prompt_tokens(err_off) > prompt_tokens(err)   # '/nothink' and '<think></think>' were added
    rc, _, err_bad = cli(folder, *ARGS, "--enable_thinking", "maybe")
    assert rc == 2 and err_bad.strip() == "generate.py: error: argument --enable_thinking: expected true or false, got 'maybe'"


def test_generate_under_msrun_tp2_ep(folder, single, tmp_path):
    """2 ranks, experts whole per rank: rank 0 prints what the single process printed, rank 1 prints nothing."""
    p, secs = msrun([os.path.join(ROOT, "generate.py"), "--model_name", folder, "--tensor_parallel_size", "2",
                     "--expert_parallel", *args(folder)], str(tmp_path / "logs"))
    w0, w1 = (open(tmp_path / "logs" / f"worker_{r}.log").read() for r in (0, 1))
    assert p.returncode == 0, w0[-3000:] + w1[-3000:]
    assert single[0] in w0 and "prompt tokens: " in w0
    assert single[0] not in w1 and "prompt tokens" not in w1 and "memory" not in w1
    print(f"msrun generate.py, 2 processes: {secs:.1f} s")


def test_bad_tensor_parallel_size_under_msrun(folder, tmp_path):
    """A size the config cannot take: one clear line from rank 0, none from rank 1, every process exits."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["text_config"]["intermediate_size"] = 95
    json.dump(cfg, open(bad / "config.json", "w"))
    p, _ = msrun([os.path.join(ROOT, "generate.py"), "--model_name", str(bad), "--tensor_parallel_size", "2",
                  *args(folder)], str(tmp_path / "logs"))
    w0, w1 = (open(tmp_path / "logs" / f"worker_{r}.log").read() for r in (0, 1))
    assert p.returncode != 0
    errors = [line for line in w0.splitlines() if line.startswith("error:")]
    assert errors == ["error: tensor_parallel_size 2 does not divide the text intermediate_size (95)"], w0[-2000:]
    assert "Traceback" not in w0 and "error" not in w1.lower()


def test_parity_harness_runs_on_glm45v(folder, tmp_path):
    """The harness's `run` (reference = transformers' GLM-4.5V class, picked by model_type) passes on it."""
    from glm4v_ms.parity.__main__ import main
    rc = main(["run", "--model", folder, "--report", str(tmp_path / "r.json")])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and rep["pass"], json.dumps(rep)[:2000]
    assert all(c["rows"][-1]["state"] == "logits" and c["rows"][-1]["top1"] == 1.0 for c in rep["cases"])


def test_converter_and_verify_cover_glm45v(folder, tmp_path):
    """Converted with --verify: experts stacked, in bf16 the router bias kept float32; a float32 conversion
    loads and gives exactly the source's logits."""
    from glm4v_ms import AutoModelForImageTextToText
    from glm4v_ms.convert import convert
    from glm4v_ms.safetensors_io import Checkpoint
    convert(folder, str(tmp_path / "c"), dtype="BF16", verify=True)
    ck = Checkpoint(str(tmp_path / "c"))
    assert ck.info("text.layers.1.mlp.router_bias") == ("F32", (8,))
    assert ck.info("text.layers.1.mlp.gate_up") == ("BF16", (8, 64, 64))
    assert ck.info("text.layers.2.mlp.down") == ("BF16", (8, 32, 64))
    convert(folder, str(tmp_path / "f"), verify=True)
    x = {"input_ids": np.array([[5, 17, 99, 23, 8]]), "attention_mask": np.ones((1, 5), np.int64)}
    got = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "f"))(**x).logits.asnumpy()
    np.testing.assert_array_equal(got, AutoModelForImageTextToText.from_pretrained(folder)(**x).logits.asnumpy())

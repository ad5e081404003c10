"""python -m glm4v_ms.finetune as the README runs it, in a subprocess: bad input is one line on stderr, exit 2, no
traceback, nothing in output_dir, and it comes before the model (or MindSpore) loads; --tokenized_path writes what
the in-process encoding gives."""
import json
import os
import subprocess
import sys

import pytest

from processing_fixtures import drawn_image

from glm4v_ms import demo
from glm4v_ms.finetune import args as fa
from glm4v_ms.finetune import data
from glm4v_ms.processing import Glm4vProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_CMD = ["-m", "glm4v_ms.finetune", "examples/finetune/demo_tiny_lora.yaml"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ftcache")
    demo.build(str(cache / "demo-tiny"), "demo-tiny")   # what demo.cached("demo-tiny") finds
    return dict(os.environ, GLM4V_MS_CACHE=str(cache), GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT)


def run(env, *argv, cwd=ROOT):
    p = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_tokenized_path_equals_in_process_encoding(env, tmp_path):
    recipe_out = os.path.join(ROOT, "out", "demo-tiny-lora")
    before = os.listdir(recipe_out) if os.path.isdir(recipe_out) else None
    rc, out, err = run(env, *README_CMD, "--tokenized_path", str(tmp_path / "tok"))
    assert rc == 0, err
    lines = [json.loads(line) for line in open(tmp_path / "tok" / "train.jsonl")]
    args = fa.parse(["examples/finetune/demo_tiny_lora.yaml"])
    folder = os.path.join(env["GLM4V_MS_CACHE"], "demo-tiny")
    args.model_name_or_path = folder
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        train, _ = data.load(args, Glm4vProcessor.from_pretrained(folder), log=lambda m: None)
    finally:
        os.chdir(cwd)
    assert [(x["input_ids"], x["labels"]) for x in lines] == [(s.input_ids.tolist(), s.labels.tolist()) for s in train]
    assert len(lines) == 4 and "[data] 4 training samples" in err
    assert (os.listdir(recipe_out) if os.path.isdir(recipe_out) else None) == before   # the recipe's output_dir


GOOD = [{"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Them."}],
         "images": ["a.png"]}]


def _bad_cases(tmp_path):
    """(name, extra flags or a dataset file's text, the line expected on stderr)."""
    msg = lambda *m: [{"role": r, "content": c} for r, c in m]  # noqa: E731
    rows = {
        "missing_image": ([{**GOOD[0], "images": ["nope.png"]}],
                          "d.json sample 0: images[0]: file not found: nope.png"),
        "unreadable_image": ([{**GOOD[0], "images": ["broken.png"]}],
                             "d.json sample 0: images[0]: cannot read image"),
        "unreadable_video": ([{"messages": msg(("user", "<video>What?"), ("assistant", "A.")),
                               "videos": ["broken.mp4"]}], "d.json sample 0: videos[0]: cannot read video"),
        "fewer_tags": ([{**GOOD[0], "messages": msg(("user", "Who?"), ("assistant", "Them."))}],
                       "d.json sample 0: images: 0 <image> tag(s) in the messages but 1 images given"),
        "missing_video": ([{"messages": msg(("user", "<video>What?"), ("assistant", "A.")), "videos": ["v.mp4"]}],
                          "d.json sample 0: videos[0]: file not found: v.mp4"),
        "more_tags": ([{**GOOD[0], "messages": msg(("user", "<image><image>Who?"), ("assistant", "Them."))}],
                      "d.json sample 0: images: 2 <image> tag(s) in the messages but 1 images given"),
        "roles": ([GOOD[0], {"messages": msg(("assistant", "Hi"), ("user", "Hello"))}],
                  "d.json sample 1: messages[0].role: expected 'user' (roles alternate user, assistant), got "
                  "'assistant'"),
        "empty_reply": ([{"messages": msg(("user", "Hi"), ("assistant", "  "))}],
                        "d.json sample 0: messages[1].content: empty assistant turn"),
        "empty": ([], "dataset d.json: empty (no samples)"),
    }
    cases = [(name, rows_, expected) for name, (rows_, expected) in rows.items()]
    cases.append(("not_json", "[{\"messages\": ", "d.json: not JSON"))
    return cases


@pytest.fixture
def workdir(tmp_path):
    drawn_image(40, 30, 1).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return tmp_path


@pytest.mark.parametrize("case", range(10))
def test_bad_data_one_line_before_the_model(env, workdir, case):
    name, rows, expected = _bad_cases(workdir)[case]
    (workdir / "d.json").write_text(rows if isinstance(rows, str) else json.dumps(rows))
    out_dir = workdir / "out"
    rc, out, err = run(env, "-m", "glm4v_ms.finetune", "--model_name_or_path", "demo-tiny", "--dataset", "d.json",
                       "--output_dir", str(out_dir), cwd=workdir)
    lines = [l for l in err.strip().splitlines() if not l.startswith("[demo-tiny")]
    assert rc == 2 and len(lines) == 1, (name, err)
    assert lines[0].startswith("error: " + expected), (name, lines[0])
    assert "Traceback" not in err and not out_dir.exists()


def test_bad_keys_and_output_dir(env, workdir):
    (workdir / "d.json").write_text(json.dumps(GOOD))
    out_dir = workdir / "out"
    base = ["-m", "glm4v_ms.finetune", "--model_name_or_path", "demo-tiny", "--dataset", "d.json",
            "--output_dir", str(out_dir)]
    cases = [(["--lora_rankk", "8"], "error: unknown key: lora_rankk"),
             (["--use_dora", "true"], "error: use_dora: a LLaMA-Factory key that glm4v-ms does not implement"),
             (["--lora_rank", "0"], "error: lora_rank: must be >= 1, got 0"),
             (["--learning_rate", "-1e-4"], "error: learning_rate: must be >= 0, got -0.0001"),
             (["--train_on_prompt", "true"],
              "error: train_on_prompt: Current template does not support `train_on_prompt`."),
             (["--freeze_vision_tower", "false"],
              "error: freeze_vision_tower: training the vision tower with LoRA is not implemented (finetuning_type "
              "full or freeze trains it; LoRA on visual.merger: freeze_multi_modal_projector false), got False"),
             (["--adapter_name_or_path", "nope"],
              "error: adapter_name_or_path: nope is not a folder with adapter_config.json")]
    for flags, expected in cases:
        rc, out, err = run(env, *base, *flags, cwd=workdir)
        lines = [l for l in err.strip().splitlines() if not l.startswith("[demo-tiny")]
        assert (rc, lines) == (2, [expected]), flags
    out_dir.mkdir()
    (out_dir / "adapter_config.json").write_text("{}")
    rc, out, err = run(env, *base, cwd=workdir)
    lines = [l for l in err.strip().splitlines() if not l.startswith("[demo-tiny")]
    assert rc == 2 and lines == [f"error: output_dir: {out_dir} exists and is not empty; set overwrite_output_dir "
                                 "true (or resume_from_checkpoint)"]
    assert os.listdir(out_dir) == ["adapter_config.json"]


def test_errors_come_before_mindspore(env, workdir):
    """The data are checked with the processor alone: neither MindSpore nor the model is imported first."""
    (workdir / "d.json").write_text(json.dumps([{**GOOD[0], "images": ["nope.png"]}]))
    code = ("import sys, runpy; sys.argv = ['x', '--model_name_or_path', 'demo-tiny', '--dataset', 'd.json', "
            "'--output_dir', 'out']\n"
            "try:\n    runpy.run_module('glm4v_ms.finetune', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, 'mindspore' in sys.modules, 'glm4v_ms.model' in sys.modules)\n")
    rc, out, err = run(env, "-c", code, cwd=workdir)
    assert out.split() == ["2", "False", "False"], err

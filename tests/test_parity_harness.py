"""The parity harness (issue 6) on tiny random checkpoints whose token ids are the tiny tokenizer's.

`run` in this process; `dump` and `compare` in subprocesses (three in all), each checking on exit that the other
side's framework never got imported.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import reference  # noqa: F401  (torchvision schemas before transformers)
import tinyref
import torch
from safetensors.numpy import load_file, save_file
from transformers import Glm4vForConditionalGeneration

from glm4v_ms.parity import ParityError, cases, dumpfile, report
from glm4v_ms.parity.__main__ import main
from glm4v_ms.processing import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SABOTAGED = "model.language_model.layers.1.post_attention_layernorm.weight"
TOKEN_FIELDS = dict(image_token_id="<|image|>", video_token_id="<|video|>", image_start_token_id="<|begin_of_image|>",
                    image_end_token_id="<|end_of_image|>", video_start_token_id="<|begin_of_video|>",
                    video_end_token_id="<|end_of_video|>")


def build_checkpoint(folder, seed=0):
    """tinyref's tiny model (3 text layers) with the tiny tokenizer's ids, plus tokenizer and processor files."""
    cfg = tinyref.tiny_config(num_hidden_layers=3)
    ids = tiny.special_token_ids()
    for field, token in TOKEN_FIELDS.items():
        setattr(cfg, field, ids[token])
    assert cfg.text_config.vocab_size >= tiny.VOCAB_SIZE
    torch.manual_seed(seed)
    tinyref.randomize(Glm4vForConditionalGeneration(cfg).eval(), seed).save_pretrained(folder)
    tiny.write_all(folder)
    return folder


def run_cli(*args):
    """main() in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


_CHILD = """
import runpy, sys
sys.argv = ["glm4v_ms.parity"] + sys.argv[2:]
forbidden = {forbidden!r}
code = 0
try:
    runpy.run_module("glm4v_ms.parity", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("IMPORTED-FORBIDDEN:", sorted(m for m in sys.modules if m.split(".")[0] == forbidden))
sys.exit(code)
"""


def subprocess_cli(forbidden, *args):
    """The CLI in a fresh interpreter; asserts that `forbidden` (a top-level package) was never imported."""
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", GLM4V_MS_DEVICE="cpu")
    p = subprocess.run([sys.executable, "-c", _CHILD.format(forbidden=forbidden), "-", *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "IMPORTED-FORBIDDEN: []" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def hf_dir(work):
    return build_checkpoint(str(work / "tiny_hf"))


@pytest.fixture(scope="module")
def run_fp32(hf_dir, work):
    path = work / "run.json"
    rc, out, err = run_cli("run", "--model", hf_dir, "--report", path)
    return rc, out, err, json.loads(path.read_text())


def rows(case):
    return {r["state"]: r for r in case["rows"]}


def test_faithful_checkpoint_passes(run_fp32):
    rc, out, err, rep = run_fp32
    assert rc == 0, out + err
    assert "result: PASS" in out and "float32 tolerance" in out
    assert rep["pass"] and rep["tolerance"]["rtol"] == report.TOLERANCES["float32"]["rtol"]
    assert [c["name"] for c in rep["cases"]] == list(cases.BUILTIN)
    by_name = {c["name"]: rows(c) for c in rep["cases"]}
    text_states = ["text.layers.0", "text.layers.1", "text.layers.2", "text.norm", "logits"]
    assert list(by_name["text"]) == text_states
    for name, kind in (("one_image", "image"), ("several_images", "image"), ("video", "video")):
        assert list(by_name[name]) == [f"{kind}.visual.blocks.0", f"{kind}.visual.blocks.1",
                                       f"{kind}.visual.merger"] + text_states
    for case in by_name.values():
        logits = case["logits"]
        assert logits["top1"] == 1.0 and logits["top5"] == 1.0 and logits["kl"] < 1e-8
        assert all(r["rel"] < 1e-4 and r["cos"] > 0.99999 for r in case.values())
    assert rep["reference"]["dtype"] == "float32" and rep["ours"]["dtype"] == "float32"


def test_sabotaged_checkpoint_names_the_layer(hf_dir, work):
    bad = str(work / "sabotaged")
    shutil.copytree(hf_dir, bad)
    weights = load_file(os.path.join(bad, "model.safetensors"))
    weights[SABOTAGED] = weights[SABOTAGED] * np.float32(1.1)
    save_file(weights, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})

    rc, out, err = run_cli("run", "--model", bad, "--reference-model", hf_dir, "--report", work / "bad.json")
    assert rc == 1, out + err
    assert out.count("first beyond tolerance: text.layers.1 (") == len(cases.BUILTIN), out
    assert "result: FAIL (4 of 4 cases" in out
    rep = json.loads((work / "bad.json").read_text())
    assert not rep["pass"]
    for case in rep["cases"]:
        assert case["first_failure"] == "text.layers.1"
        r = rows(case)
        assert all(r[s]["ok"] for s in r if s.startswith(("image.", "video.")) or s == "text.layers.0")
        assert not r["text.layers.2"]["ok"] and not r["logits"]["ok"]


@pytest.fixture(scope="module")
def fp32_dump(hf_dir, work):
    """The torch side, in its own process (which must never import MindSpore)."""
    dump = work / "ref_fp32.npz"
    p = subprocess_cli("mindspore", "dump", "--model", hf_dir, "--out", dump, "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    return dump


def test_dump_then_compare_in_separate_processes_agrees_with_run(hf_dir, work, run_fp32, fp32_dump):
    dump = fp32_dump
    meta, ref_cases = dumpfile.load(str(dump))
    assert meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert meta["versions"]["torch"] == torch.__version__ and "transformers" in meta["versions"]
    assert [c["name"] for c in ref_cases] == list(cases.BUILTIN)
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos",
            "video_grid_thw"} <= set(ref_cases[3]["inputs"])
    assert ref_cases[2]["inputs"]["image_grid_thw"].shape == (3, 3)

    path = work / "compare.json"
    p = subprocess_cli("torch", "compare", "--model", hf_dir, "--reference", dump, "--report", path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "result: PASS" in p.stdout
    got, want = json.loads(path.read_text()), run_fp32[3]
    assert got["pass"] == want["pass"] and got["tolerance"] == want["tolerance"]
    for g, w in zip(got["cases"], want["cases"]):
        assert g["name"] == w["name"] and list(rows(g)) == list(rows(w))
        for state, r in rows(g).items():
            assert r["shape"] == rows(w)[state]["shape"]
            assert abs(r["max_abs"] - rows(w)[state]["max_abs"]) <= 1e-6 + 0.05 * rows(w)[state]["max_abs"], state


def test_bf16_dump_compares_to_fp32_with_the_bf16_tolerance(hf_dir, work):
    """The user's own cases file; torch in bfloat16 vs MindSpore in float32."""
    media = work / "media"
    media.mkdir()
    cases.picture(100, 150, seed=7).save(media / "mine.png")
    cases._clip(str(media / "mine.mp4"), seconds=1.0, fps=4, seed=8)
    (media / "cases.json").write_text(json.dumps([
        {"name": "my_image", "messages": [{"role": "user", "content": [
            {"type": "image", "path": "mine.png"}, {"type": "text", "text": "What is this?"}]}]},
        {"name": "my_video", "messages": [{"role": "user", "content": [
            {"type": "video", "path": str(media / "mine.mp4")}, {"type": "text", "text": "And this?"}]}]},
    ]))
    dump = work / "ref_bf16.npz"
    p = subprocess_cli("mindspore", "dump", "--model", hf_dir, "--out", dump, "--dtype", "bfloat16",
                       "--cases", media / "cases.json")
    assert p.returncode == 0, p.stdout + p.stderr

    rc, out, err = run_cli("compare", "--model", hf_dir, "--reference", dump, "--dtype", "float32",
                           "--report", work / "bf16.json")
    assert rc == 0, out + err
    tol = report.TOLERANCES["bfloat16"]
    assert "bfloat16 reference vs float32 ours: bfloat16 tolerance" in out
    assert f"rel <= {tol['rtol']:.2g}" in out and "case my_image" in out and "case my_video" in out
    rep = json.loads((work / "bf16.json").read_text())
    assert rep["pass"] and rep["tolerance"]["rtol"] == tol["rtol"] and rep["reference"]["dtype"] == "bfloat16"
    # the half-precision differences are real: under the fp32 tolerance the same dump fails
    rc, out, _ = run_cli("compare", "--model", hf_dir, "--reference", dump, "--rtol", "1e-4")
    assert rc == 1 and "(overridden)" in out and "first beyond tolerance:" in out


@pytest.mark.parametrize("args, message", [
    (["dump", "--model", "/nonexistent/model", "--out", "x.npz"], "reference model folder not found"),
    (["compare", "--model", "/nonexistent/model", "--reference", "GARBAGE"], "cannot read reference dump"),
    (["compare", "--model", "/nonexistent/model", "--reference", "/nonexistent/ref.npz"], "reference dump not found"),
    (["run", "--model", "/nonexistent/model"], "model folder not found"),
])
def test_errors_are_one_line(args, message, work):
    garbage = work / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    rc, out, err = run_cli(*[str(garbage) if a == "GARBAGE" else a for a in args])
    assert rc == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_compare_reports_a_missing_model_folder(work, tmp_path):
    dumpfile.save(str(tmp_path / "r.npz"), {"dtype": "float32"}, [])
    rc, _, err = run_cli("compare", "--model", tmp_path / "nope", "--reference", tmp_path / "r.npz")
    assert rc == 2 and err.strip() == f"glm4v_ms.parity: error: model folder not found: {tmp_path / 'nope'}"


def test_run_needs_a_reference_model_for_a_converted_folder(tmp_path):
    """--reference-model defaults to --model only when --model holds transformers' weight names."""
    save_file({"text.layers.0.input_norm.weight": np.ones(4, np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    rc, _, err = run_cli("run", "--model", tmp_path)
    assert rc == 2 and "is not a transformers checkpoint: give --reference-model" in err


def test_cases_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for content, message in [("{not json", "not valid JSON"), ("[]", "non-empty JSON list"),
                             ('[[{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}]]',
                              "no such image file"),
                             ('[[{"role": "user", "content": [{"type": "image", "path": "a.png"}, '
                              '{"type": "video", "path": "a.png"}]}]]', "both an image and a video")]:
        (tmp_path / "a.png").write_bytes(b"")
        bad.write_text(content)
        with pytest.raises(ParityError, match=message):
            cases.load_file(str(bad))


def test_tolerance_follows_the_less_precise_dtype():
    assert report.tolerance("float32", "float32")[1] == report.TOLERANCES["float32"]
    assert report.tolerance("bfloat16", "float32")[1] == report.TOLERANCES["bfloat16"]
    assert report.tolerance("float32", "float16")[1] == report.TOLERANCES["float16"]
    assert report.tolerance("float16", "bfloat16")[1] == report.TOLERANCES["bfloat16"]
    label, tol = report.tolerance("float32", "float32", rtol=1e-3, max_kl=None)
    assert tol["rtol"] == 1e-3 and tol["max_kl"] == report.TOLERANCES["float32"]["max_kl"] and "overridden" in label


def test_metrics_on_known_values():
    ref = np.zeros((1, 3, 4), np.float32)
    ref[0, :, 0] = [5, 1, 1]
    ours = ref.copy()
    ours[0, 1, 1] = 2   # token 1: argmax moves from 0 to 1
    mask = np.array([[True, True, False]])
    m = report.state_metrics(ref, ours, mask, logits=True)
    assert m["max_abs"] == 2 and m["rel"] == pytest.approx(2 / 5) and m["top1"] == 0.5
    assert m["top5"] == 1.0 and m["kl"] > 0
    assert report.state_metrics(ref, ours[:, :2], mask)["error"].startswith("shape")
    case = report.compare_case("c", {"logits": ref, "text.layers.0": ref[..., :2]},
                               {"logits": ours, "text.layers.0": ref[..., :2]}, report.TOLERANCES["float32"], mask)
    assert [r["state"] for r in case["rows"]] == ["text.layers.0", "logits"] and case["first_failure"] == "logits"


def test_converted_folder_compares_like_the_source(hf_dir, work, fp32_dump):
    """The user's path: convert, then check the converted folder against a dump of the original. The converted
    weights are the same bits, so every state's difference is the same as for the source folder."""
    from glm4v_ms.convert import convert
    converted = work / "converted"
    convert(hf_dir, str(converted))
    reports = []
    for model in (converted, hf_dir):
        path = work / f"compare_{os.path.basename(str(model))}.json"
        rc, out, err = run_cli("compare", "--model", model, "--reference", fp32_dump, "--report", path)
        assert rc == 0, out + err
        reports.append(json.loads(path.read_text()))
    for a, b in zip(*(r["cases"] for r in reports)):
        assert [(r["state"], r["max_abs"]) for r in a["rows"]] == [(r["state"], r["max_abs"]) for r in b["rows"]]

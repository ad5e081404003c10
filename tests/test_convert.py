"""The converter (python -m glm4v_ms.convert) on sharded tiny random checkpoints made by transformers.

Round trip: the converted folder gives bit-identical logits to the source folder; a dtype change gives
bit-identical logits to the same model cast by torch and saved (fp16 from bf16, bf16 from fp32: round to nearest
even, as torch does). Then --verify, interrupted runs, and bad input through the real CLI.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tinyref
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.config import Glm4vConfig
from glm4v_ms.convert import MANIFEST, to_bfloat16, verify_folder
from glm4v_ms.safetensors_io import Checkpoint, WeightError
from glm4v_ms.weights import hf_table, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUX = {"tokenizer.json": '{"added_tokens": [{"id": 7, "content": "<think>"}]}', "tokenizer_config.json": "{}",
       "chat_template.jinja": "{{ messages }}", "special_tokens_map.json": "{}", "preprocessor_config.json": "{}",
       "video_preprocessor_config.json": "{}", "processor_config.json": "{}", "merges.txt": "a b",
       "tokenizer.model": "x", "LICENSE": "MIT"}
NOT_COPIED = {"README.md": "hi", "model.bin.index.json": "{}"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """fp32 (15 shards, q/k/v split over shards), bf16 (torch cast), fp16 cast from that bf16."""
    root = tmp_path_factory.mktemp("convert")
    model = tinyref.build(str(root / "single"), seed=11)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model.to(dtype).save_pretrained(str(root / name), max_shard_size="200KB")   # in place: fp16 from bf16
        for fn, text in {**AUX, **NOT_COPIED}.items():
            (root / name / fn).write_text(text)
        out[name] = str(root / name)
    (root / "fp32" / "sub").mkdir()
    ckpt, cfg = Checkpoint(out["fp32"]), Glm4vConfig.from_pretrained(out["fp32"])
    assert any(len({ckpt.where[s] for s in e.sources}) > 1 for e in hf_table(cfg)), "no entry spans two shards"
    return out


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "glm4v_ms.convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120, **kw)


INPUTS = tinyref.Prompt(12).text(5).image(6, 8).text(4).inputs()
_logits = {}


def logits(folder):
    if folder not in _logits:
        _logits[folder] = Glm4vForConditionalGeneration.from_pretrained(folder)(**INPUTS).logits.asnumpy()
    return _logits[folder]


def no_leftovers(dst):
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    return [f for f in os.listdir(parent) if f.startswith(f".{base}.")]


def test_round_trip(ckpts, tmp_path):
    src, dst = ckpts["fp32"], str(tmp_path / "out")
    r = cli("--src", src, "--dst", dst, "--verify")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "verified" in r.stdout and len(r.stdout.splitlines()) == 1
    assert np.array_equal(logits(dst), logits(src))
    # tensor by tensor: the loader's own mapping of the source, bit for bit, and read without any transform
    cfg = Glm4vConfig.from_pretrained(src)
    ours = {n: (a, d) for n, a, d in load(cfg, dst)}
    for n, a, d in load(cfg, src):
        assert ours[n][1] == d and np.array_equal(ours[n][0], a), n
    assert all(k.startswith(("visual.", "text.", "lm_head.")) for k in Checkpoint(dst).keys())
    files = set(os.listdir(dst))
    assert set(AUX) | {"config.json", "generation_config.json", MANIFEST, "model.safetensors.index.json"} <= files
    assert not files & set(NOT_COPIED) and "sub" not in files and not no_leftovers(dst)
    for fn in AUX:
        assert open(os.path.join(dst, fn)).read() == AUX[fn]
    m = json.load(open(os.path.join(dst, MANIFEST)))
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    rec = {f["name"]: f for f in m["source_files"]}
    assert set(shards) <= set(rec) and m["tensors"] == len(hf_table(cfg))
    import hashlib
    for fn in shards:
        data = open(os.path.join(src, fn), "rb").read()
        assert rec[fn]["size"] == len(data) and rec[fn]["sha256"] == hashlib.sha256(data).hexdigest()
    for fn in m["files"]:   # readable by the reference safetensors library too
        load_file(os.path.join(dst, fn))


@pytest.mark.parametrize("src,dtype,ref,st", [
    ("bf16", None, "bf16", "BF16"),          # default: the source's dtype, bits unchanged
    ("bf16", "float32", "bf16", "F32"),      # exact widening
    ("bf16", "float16", "fp16", "F16"),      # as torch casts
    ("fp32", "bfloat16", "bf16", "BF16"),    # round to nearest even, as torch
])
def test_dtypes(ckpts, tmp_path, src, dtype, ref, st):
    dst = str(tmp_path / "out")
    r = cli("--src", ckpts[src], "--dst", dst, *(["--dtype", dtype] if dtype else []))
    assert r.returncode == 0, r.stderr
    got = Checkpoint(dst)
    assert {got.info(k)[0] for k in got.keys()} == {st}
    assert np.array_equal(logits(dst), logits(ckpts[ref]))


def test_bfloat16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    x[:4] = [np.nan, np.inf, -np.inf, 3.4e38]   # 3.4e38 rounds up to inf, as in torch
    x[4:8] = np.array([0x3F808000, 0x3F818000, 0x00008000, 0x80018000], np.uint32).view(np.float32)  # ties
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = to_bfloat16(x)
    assert got[0] == 0x7FC0   # torch's NaN bits differ between its scalar and vector paths; any NaN will do
    assert np.array_equal(got[1:], want[1:])


def test_verify_catches_a_corrupted_tensor(ckpts, tmp_path):
    src, dst = ckpts["bf16"], str(tmp_path / "out")
    assert cli("--src", src, "--dst", dst).returncode == 0
    assert verify_folder(src, dst) == len(hf_table(Glm4vConfig.from_pretrained(src)))
    name = "text.layers.1.attn.qkv.weight"
    ck = Checkpoint(dst)
    st = ck.files[ck.where[name]]
    with open(st.path, "r+b") as f:
        f.seek(st.base + st.tensors[name]["data_offsets"][0] + 10)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(WeightError, match=name):
        verify_folder(src, dst)
    with pytest.raises(WeightError, match="dtypes|F32|BF16"):
        verify_folder(src, dst, "F32")


def _paused_run(src, dst):
    p = subprocess.Popen([sys.executable, "-m", "glm4v_ms.convert", "--src", src, "--dst", dst], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "GLM4V_MS_CONVERT_TEST_PAUSE": "60"})
    line = p.stderr.readline()
    assert "paused after shard 1" in line, line
    return p


def test_killed_run_leaves_no_dst(ckpts, tmp_path):
    dst = str(tmp_path / "out")
    p = _paused_run(ckpts["fp32"], dst)
    p.kill()
    p.wait()
    assert not os.path.exists(dst)
    assert no_leftovers(dst)              # SIGKILL: the temporary folder stays...
    r = cli("--src", ckpts["fp32"], "--dst", dst)
    assert r.returncode == 0, r.stderr
    assert os.path.isdir(dst) and not no_leftovers(dst)   # ...and the next run removes it


def test_terminated_run_cleans_up(ckpts, tmp_path):
    dst = str(tmp_path / "out")
    p = _paused_run(ckpts["fp32"], dst)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not os.path.exists(dst) and not no_leftovers(dst)


def test_overwrite(ckpts, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    r = cli("--src", ckpts["bf16"], "--dst", dst)
    assert r.returncode != 0 and "--overwrite" in r.stderr and (dst / "old.txt").exists()
    r = cli("--src", ckpts["bf16"], "--dst", dst, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert not (dst / "old.txt").exists() and (dst / MANIFEST).exists() and not no_leftovers(str(dst))
    r = cli("--src", ckpts["bf16"], "--dst", ckpts["bf16"], "--overwrite")
    assert r.returncode != 0 and "source" in r.stderr and os.path.isfile(os.path.join(ckpts["bf16"], "config.json"))


# ----------------------------------------------------------------------------------------------- bad input
def _shard_of(d, name):
    return d / json.load(open(d / "model.safetensors.index.json"))["weight_map"][name]


def _edit_shard(d, name, fn):
    p = _shard_of(d, name)
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p), metadata={"format": "pt"})


def _edit_index(d, fn):
    idx = json.load(open(d / "model.safetensors.index.json"))
    fn(idx["weight_map"])
    json.dump(idx, open(d / "model.safetensors.index.json", "w"))


Q = "model.language_model.layers.1.self_attn.q_proj.weight"
NORM = "model.language_model.layers.0.post_mlp_layernorm.weight"


def truncate(d):
    p = _shard_of(d, Q)
    p.write_bytes(p.read_bytes()[:-100])
    return p.name


def missing_from_shards(d):      # gone from its shard and from the index
    _edit_shard(d, NORM, lambda t: t.pop(NORM))
    _edit_index(d, lambda w: w.pop(NORM))
    return NORM


def missing_from_index(d):       # still in its shard
    _edit_index(d, lambda w: w.pop(NORM))
    return NORM


def indexed_not_in_shard(d):     # still in the index
    _edit_shard(d, NORM, lambda t: t.pop(NORM))
    return NORM


def unexpected(d):
    name = "model.visual.blocks.0.attn.qkv.bias"
    _edit_shard(d, NORM, lambda t: t.update({name: t[NORM].clone()}))
    _edit_index(d, lambda w: w.update({name: w[NORM]}))
    return name


def wrong_shape(d):
    _edit_shard(d, Q, lambda t: t.update({Q: t[Q][:-1].clone()}))
    return Q


def config_not_json(d):
    (d / "config.json").write_text("{not json")
    return "config.json"


def missing_src(d):
    shutil.rmtree(d)
    return d.name


@pytest.mark.parametrize("damage", [truncate, missing_from_shards, missing_from_index, indexed_not_in_shard,
                                    unexpected, wrong_shape, config_not_json, missing_src])
def test_bad_input(ckpts, tmp_path, damage):
    src, dst = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ckpts["bf16"], src)
    named = damage(src)
    r = cli("--src", src, "--dst", dst)
    assert r.returncode != 0
    assert len(r.stderr.splitlines()) == 1 and named in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not dst.exists() and not no_leftovers(str(dst))


def test_existing_dst(ckpts, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    r = cli("--src", ckpts["bf16"], "--dst", dst)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and str(dst) in r.stderr
    assert "Traceback" not in r.stderr and os.listdir(dst) == [] and not no_leftovers(str(dst))


def test_peak_memory_within_a_shard(tmp_path):
    """A 360 MB synthetic checkpoint (3 shards): the converter's peak RSS stays under its largest shard + 10%."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_convert import synthetic_config, write_synthetic
    cfg = synthetic_config(layers=4, vision_depth=2, vocab=40960, hidden=1024, intermediate=4096, heads=8,
                           kv_heads=2, vision_hidden=1024, vision_heads=8, merger=4096)
    src = str(tmp_path / "src")
    write_synthetic(src, cfg, 150 * 10 ** 6)
    biggest = max(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    code = "import sys; from glm4v_ms.convert import peak_rss; from glm4v_ms.convert.__main__ import main; rc = main(sys.argv[1:]); print(peak_rss())"
    r = subprocess.run([sys.executable, "-c", code, "--src", src, "--dst", str(tmp_path / "out"), "--verify"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    assert peak <= 1.1 * biggest, f"peak RSS {peak / 2**20:.0f} MiB, largest shard {biggest / 2**20:.0f} MiB"

"""Fine-tuning on several ranks (msrun, 2 processes, MCCL on CPU) equals one process with the same global batch:
SGD and AdamW, two steps, with and without sharded optimizer state (ZeRO 1/2 from a DeepSpeed JSON), a short
last batch split unevenly, ZeRO-2 reducing in many buckets, full fine-tuning under ZeRO-2 and ZeRO-3 (sharded
parameters: full SGD, freeze AdamW); the 2-rank ZeRO-2 checkpoint resumes on the 2 ranks under ZeRO-1 and on one
process, and the ZeRO-3 one on one process, each to the straight run's weights; the
README's command (msrun ... finetune.py demo_tiny_lora.yaml --deepspeed ...) trains with only rank 0 writing and
speaking. Two msrun launches in all (each ~20 s before any work); the one-process references run in this process.

Tolerances (fp32, CPU): the ranks sum their gradients in another order than one process's batched backward.
SGD: every LoRA weight within rel 1e-5 of the one-process run; losses rel 1e-6. AdamW: within 1e-3 x lr absolute
(Adam divides by sqrt(v): an element whose gradient is near eps carries the summation-order noise of that
gradient, measured 4.7e-6 at lr 1e-2 on 3 of 28k elements); losses rel 1e-6. Sharded state against unsharded on
the same ranks: the same reduced gradient and per-element update, the clip norm summed over slices in another
order: within 1e-6 of each tensor's largest element (measured: AdamW bit for bit, SGD 1.5e-7)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import finetune_dp_worker as worker
import tinyref
from glm4v_ms.finetune import distributed
from glm4v_ms.finetune.adapter import WEIGHTS, SafetensorsFile
from glm4v_ms.finetune.args import FinetuneError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
YAML = "examples/finetune/demo_tiny_lora.yaml"
LR = 1e-2
# name, samples, keys of the 2-rank run (per device); the one-process reference has twice the per-device batch
SPECS = [
    ("sgd", 6, dict(optim="sgd", per_device_train_batch_size=1, gradient_accumulation_steps=2)),
    ("sgd_z2", 6, dict(optim="sgd", per_device_train_batch_size=1, gradient_accumulation_steps=2, deepspeed="z2")),
    ("adamw", 7, dict(per_device_train_batch_size=2)),       # 7 over batches of 4: the last splits 2 + 1
    ("adamw_z1", 7, dict(per_device_train_batch_size=2, deepspeed="z1")),
    ("adamw_z2", 7, dict(per_device_train_batch_size=2, deepspeed="z2")),
    # ZeRO-2 reducing 1000 elements at a time: every bucket is a chunk of each rank's slice, cut across tensors
    ("adamw_z2bucket", 7, dict(per_device_train_batch_size=2, deepspeed="z2bucket")),
    # resumed on the 2 ranks from the ZeRO-2 run's checkpoint-1, with ZeRO-1 (the state is saved whole)
    ("adamw_resumed", 7, dict(per_device_train_batch_size=2, deepspeed="z1",
                              resume_from_checkpoint="@adamw_z2/checkpoint-1")),
    # full fine-tuning (the tower frozen, LLaMA-Factory's default), SGD (AdamW turns the summation-order noise of
    # the exactly-zero k-bias gradient into +-lr steps), ZeRO-2; its output a Hugging Face folder
    ("full_z2", 6, dict(finetuning_type="full", optim="sgd", per_device_train_batch_size=1,
                        gradient_accumulation_steps=2, deepspeed="z2")),
    # ZeRO-3 (LLaMA-Factory's ds_z3_config: the threshold "auto" = 10 x hidden_size): the decoder's linear weights
    # held as slices; full SGD as above, and freeze AdamW (the last layer's MLP trained, both layers sliced)
    ("full_z3", 6, dict(finetuning_type="full", optim="sgd", per_device_train_batch_size=1,
                        gradient_accumulation_steps=2, deepspeed="z3")),
    ("freeze_z3", 7, dict(finetuning_type="freeze", freeze_trainable_layers=1, freeze_trainable_modules=["mlp"],
                          per_device_train_batch_size=2, deepspeed="z3")),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                PYTHONPATH=os.pathsep.join([ROOT, HERE]), GLM4V_MS_DEVICE="cpu", GLOG_v="3")


def logs_of(folder):
    return {f: open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))}


def ds_config(folder, stage, tag="", **zero):
    path = os.path.join(folder, f"ds_z{stage}{tag}_config.json")
    with open(path, "w") as f:   # LLaMA-Factory's examples/deepspeed/ds_z2_config.json, shortened
        json.dump({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                   "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                                         **zero}}, f)
    return path


def keys(spec, cfgs):
    kw = dict(spec)
    if "deepspeed" in kw:
        kw["deepspeed"] = cfgs[kw["deepspeed"]]
    return kw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dp")
    tinyref.build(str(base / "model"), seed=1)
    cfgs = {"z1": ds_config(str(base), 1), "z2": ds_config(str(base), 2),
            "z2bucket": ds_config(str(base), 2, "bucket", reduce_bucket_size=1000),
            "z3": os.path.join(ROOT, "examples", "deepspeed", "ds_z3_config.json")}
    return base, cfgs


@pytest.fixture(scope="module")
def launched(setup):
    """Launch 1: tests/finetune_dp_worker.py on 2 ranks runs every spec in turn."""
    base, cfgs = setup
    out = base / "two"
    out.mkdir()
    specs = [dict(name=n, n=k, **keys(s, cfgs)) for n, k, s in SPECS]
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "--join=True", f"--log_dir={base / 'logs'}", "--cluster_time_out=90",
           os.path.join(HERE, "finetune_dp_worker.py"), str(out), str(base / "model"), json.dumps(specs)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    logs = logs_of(base / "logs")
    assert p.returncode == 0, f"msrun exit {p.returncode}:\n" + "\n".join(f"== {k}\n{v[-3000:]}"
                                                                      for k, v in logs.items())
    print(f"2-rank launch, {len(SPECS)} runs: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def single(setup):
    """The one-process references (this process): per-device batch x 2, the same accumulation."""
    base, _ = setup
    got = {}
    for name, n, spec in SPECS:
        if reference_of(name) in got or "resume_from_checkpoint" in spec:
            continue
        kw = {k: v for k, v in spec.items() if k != "deepspeed"}
        kw["per_device_train_batch_size"] = 2 * spec["per_device_train_batch_size"]
        tr, losses = worker.run(worker.args(str(base / "one" / reference_of(name)), str(base / "model"), **kw), n)
        got[reference_of(name)] = ({p.name: p.asnumpy() for p in tr.params}, losses)
    return got


# AdamW on whole weights (freeze_z3): Adam turns the summation-order noise of a near-zero gradient into a step of
# up to lr, on a few elements (measured: 16 of 74k, up to 6.7e-4 at lr 1e-2); the rest as LoRA's AdamW
OPTIM = {n: "sgd" if s.get("optim") == "sgd" else "adamw_full" if n.startswith("freeze") else "adamw"
         for n, _, s in SPECS}


def reference_of(name):
    return name.split("_")[0]   # the one-process run of the same keys


def assert_close(kind, got, want, what):
    for k in want:
        d = np.abs(got[k] - want[k]).max()
        if kind == "sgd":
            assert d <= 1e-5 * np.abs(want[k]).max() + 1e-12, f"{what} {k}: {d:.3g}"
        elif kind == "adamw_full":
            off = np.abs(got[k] - want[k]) > 1e-3 * LR
            assert off.mean() <= 1e-3 and d <= 2 * LR, f"{what} {k}: {off.sum()} of {off.size} off, {d:.3g}"
        else:
            assert d <= 1e-3 * LR, f"{what} {k}: {d:.3g}"


@pytest.mark.parametrize("name", [s[0] for s in SPECS])
def test_two_ranks_equal_one_process(launched, single, name):
    want, want_loss = single[reference_of(name)]
    r0, r1 = (dict(np.load(launched / f"{name}.rank{r}.npz")) for r in (0, 1))
    for k in r0:   # the ranks hold the same weights, bit for bit
        np.testing.assert_array_equal(r0[k], r1[k])
    assert_close(OPTIM[name], r0, want, name)
    info = json.load(open(launched / f"{name}.rank0.json"))
    resumed = name.endswith("resumed")
    assert info["world"] == 2 and len(info["losses"]) == (1 if resumed else 2)
    np.testing.assert_allclose(info["losses"], want_loss[1:] if resumed else want_loss, rtol=1e-6)
    if name.startswith(("full", "freeze")):   # rank 0 alone wrote a Hugging Face folder holding the ranks' weights
        from glm4v_ms import AutoModelForImageTextToText
        files = set(os.listdir(launched / name))
        assert {"config.json", "model.safetensors", "checkpoint-1", "checkpoint-2", "trainer_log.jsonl"} <= files
        assert WEIGHTS not in files and (len(r0) > 20 if name.startswith("full") else len(r0) == 2)
        params = dict(AutoModelForImageTextToText.from_pretrained(str(launched / name)).parameters_and_names())
        for k, v in r0.items():
            np.testing.assert_array_equal(params[k].asnumpy(), v)
        return
    # rank 0 alone wrote the outputs, and the saved adapter is what the ranks hold
    saved = SafetensorsFile(os.path.join(launched, name, WEIGHTS))
    assert len(saved.keys()) == len(r0)
    assert sorted(os.listdir(launched / name)) == ["adapter_config.json", WEIGHTS] + (
        [] if resumed else ["checkpoint-1"]) + ["checkpoint-2", "trainer_log.jsonl"]
    log = [json.loads(ln) for ln in open(launched / name / "trainer_log.jsonl")]
    assert [e["current_steps"] for e in log] == ([2] if resumed else [1, 2])


@pytest.mark.parametrize("name,unsharded", [("sgd_z2", "sgd"), ("adamw_z1", "adamw"), ("adamw_z2", "adamw")])
def test_sharded_state_equals_unsharded(launched, name, unsharded):
    a = dict(np.load(launched / f"{name}.rank0.npz"))
    b = dict(np.load(launched / f"{unsharded}.rank0.npz"))
    for k in a:   # the clip norm is summed over slices in another order: within 1e-6 of each tensor's largest
        assert np.abs(a[k] - b[k]).max() <= 1e-6 * np.abs(b[k]).max(), k
    i, j = (json.load(open(launched / f"{n}.rank0.json")) for n in (name, unsharded))
    assert i["stage"] == int(name[-1]) and j["stage"] == 0
    n_params = sum(v.size for v in a.values())
    if name.startswith("adamw"):   # each rank holds its half of exp_avg and exp_avg_sq (the vector padded to even)
        assert j["state_numel"] == 2 * n_params and i["state_numel"] == 2 * -(-n_params // 2)
        assert i["parts"]["optimizer"] == j["parts"]["optimizer"] // 2 > 0
    else:
        assert i["state_numel"] == j["state_numel"] == 0
    # the plan per rank: stage 2 keeps a slice of the reduced and clipped gradient
    if name.endswith("z2"):
        T = 4 * n_params
        assert j["parts"]["grads"] - i["parts"]["grads"] == T - T // 2
    saved = sum(j["parts"].values()) - sum(i["parts"].values())
    assert saved > 0   # the plan line each rank prints says so
    assert f"; ZeRO-{name[-1]} saves {saved / 1e6:,.3f} MB per rank against unsharded state" in i["plan"]


def test_bucketed_reduction_equals_whole(launched):
    """ZeRO-2 reducing 1000 elements at a time ends bit for bit where one whole-vector reduction does (each element
    is the same sum of the two ranks' values), across many buckets, the last one shorter."""
    a, b = (dict(np.load(launched / f"{n}.rank{r}.npz")) for n, r in (("adamw_z2bucket", 0), ("adamw_z2", 0)))
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])
    i, j = (json.load(open(launched / f"{n}.rank0.json")) for n in ("adamw_z2bucket", "adamw_z2"))
    k = -(-sum(v.size for v in b.values()) // 2)   # a rank's slice
    assert len(j["buckets"]) == 1 and j["buckets"] == [k]   # 5e8 by default: the whole vector
    assert len(i["buckets"]) == -(-k // 500) > 10 and set(i["buckets"][:-1]) == {500} and sum(i["buckets"]) == k
    assert 0 < i["buckets"][-1] < 500   # the last bucket is shorter
    assert j["parts"]["grads"] - i["parts"]["grads"] == 4 * 2 * (k - 500)   # the plan counts one bucket


def test_reduce_bucket_size(tmp_path):
    """reduce_bucket_size: DeepSpeed's 5e8 when absent, "auto" as transformers fills it (hidden_size ** 2), a
    number as given; anything else refused by name."""
    from glm4v_ms.finetune.args import reduce_bucket_size
    assert reduce_bucket_size(None, 64) == reduce_bucket_size(ds_config(str(tmp_path), 2), 64) == 500_000_000
    assert reduce_bucket_size(ds_config(str(tmp_path), 2, "a", reduce_bucket_size="auto"), 4096) == 4096 ** 2
    assert reduce_bucket_size(ds_config(str(tmp_path), 2, "n", reduce_bucket_size=2e5), 64) == 200_000
    with pytest.raises(FinetuneError, match=r"reduce_bucket_size must be a positive whole number of elements or "
                                            r"\"auto\", got 'big'"):
        reduce_bucket_size(ds_config(str(tmp_path), 2, "b", reduce_bucket_size="big"), 64)
    # the buckets (distributed.Flat): chunk j of every rank's slice, in rank order, pieces cut across tensors
    flat = distributed.Flat([np.zeros((3, 5)), np.zeros(7)], distributed.World(1, 2, 2))
    assert (flat.n, flat.k) == (22, 11)
    assert flat.buckets(8) == ((4, ((0, 0, 4),), ((0, 11, 15),)), (4, ((0, 4, 8),), ((1, 0, 4),)),
                               (3, ((0, 8, 11),), ((1, 4, 7),)))
    assert flat.buckets(0) == flat.buckets(10 ** 9) == ((11, ((0, 0, 11),), ((0, 11, 15), (1, 0, 7))),)
    odd = distributed.Flat([np.zeros(5)], distributed.World(0, 2, 2))   # padded to 6: one padding element
    assert odd.buckets(0) == ((3, ((0, 0, 3),), ((0, 3, 5), (-1, 0, 1))),)


@pytest.mark.parametrize("name", ["full_z3", "freeze_z3"])
def test_zero3_ranks_hold_slices(launched, setup, name):
    """Under ZeRO-3 each rank holds half (rounded up) of every decoder linear weight above the threshold, trained
    or frozen, and every other tensor whole (the sizes each rank's Parameters have, against the checkpoint's)."""
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.finetune.distributed import sharded_name
    from glm4v_ms.weights import hf_table
    base, _ = setup
    cfg = Glm4vConfig.from_pretrained(str(base / "model"))
    size = {e.ours: int(np.prod(e.shape(cfg))) for e in hf_table(cfg)}
    infos = [json.load(open(launched / f"{name}.rank{r}.json")) for r in (0, 1)]
    sliced = infos[0]["sliced"]
    assert infos[0]["stage"] == 3 and sliced == infos[1]["sliced"]
    assert len(sliced) == 8 and all(".layers." in k and k.endswith(".weight") for k in sliced)   # 2 layers x 4
    threshold = 10 * cfg.text.hidden_size   # ds_z3_config's "auto"
    assert sorted(sliced) == sorted(k for k in size if sharded_name(k, size[k], threshold))
    for info in infos:
        assert set(info["held"]) == set(size)
        for k, n in size.items():
            assert info["held"][k] == (-(-n // 2) if k in sliced else n), k
    held = sum(infos[0]["held"][k] for k in sliced)
    assert held == sum(size[k] for k in sliced) // 2 > 0
    whole = {k: v.size for k, v in np.load(launched / f"{name}.rank0.npz").items()}
    assert all(whole[k] == size[k] for k in whole)   # gathered whole
    if name == "freeze_z3":   # only the last layer's MLP trains: every trained tensor is a slice
        assert sorted(whole) == sorted(k for k in sliced if ".layers.1.mlp." in k)


def test_zero3_output_loads_in_transformers(launched, setup):
    """Rank 0's Hugging Face folder of the ZeRO-3 run (the slices gathered) loads in transformers with the logits
    of the one-process run's model."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    from glm4v_ms import AutoModelForImageTextToText
    base, _ = setup
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int64)
    ref = Glm4vForConditionalGeneration.from_pretrained(str(launched / "full_z3")).eval()
    with torch.no_grad():
        got = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    want = AutoModelForImageTextToText.from_pretrained(str(base / "one" / "full"))(input_ids=ids).logits.asnumpy()
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())
    untrained = AutoModelForImageTextToText.from_pretrained(str(base / "model"))(input_ids=ids).logits.asnumpy()
    assert float(np.abs(untrained - want).max()) > 1e-3 * float(np.abs(want).max())   # the steps moved them


def test_zero3_checkpoint_resumes_on_one_process(launched, single, setup, tmp_path):
    """checkpoint-1 of the 2-rank ZeRO-3 AdamW run (weights and moments gathered whole) goes on in one process at
    the same global batch to the straight one-process run's weights."""
    base, _ = setup
    ck = launched / "freeze_z3" / "checkpoint-1"
    st = json.load(open(ck / "trainer_state.json"))
    assert st["ranks"] == 2 and st["zero_stage"] == 3
    spec = next(s for n, _, s in SPECS if n == "freeze_z3")
    kw = {k: v for k, v in spec.items() if k != "deepspeed"}
    kw.update(per_device_train_batch_size=4, resume_from_checkpoint=str(ck))
    with np.load(ck / "optimizer.npz") as d, np.load(base / "one" / "freeze" / "checkpoint-1" / "optimizer.npz") as w:
        assert sorted(d) == sorted(w) and len(d) == 5   # step, and the two trained tensors' moments, whole
        for k in w:   # the moments are linear in the gradients: no Adam amplification of noise
            np.testing.assert_allclose(d[k], w[k], rtol=0, atol=1e-5 * np.abs(w[k]).max(), err_msg=k)
    tr, losses = worker.run(worker.args(str(tmp_path / "resumed"), str(base / "model"), **kw), 7)
    assert tr._start_step == 1 and len(losses) == 1
    assert_close("adamw_full", {p.name: p.asnumpy() for p in tr.params}, single["freeze"][0], "resumed")
    np.testing.assert_allclose(losses[0], single["freeze"][1][1], rtol=1e-6)


def test_zero3_unsupported_is_refused(setup, tmp_path, capsys):
    """ZeRO-3 with LoRA (not implemented): one line, exit 2, nothing written, before any process group or model
    (args.check, which every rank runs alike)."""
    from glm4v_ms.finetune.__main__ import main
    _, cfgs = setup
    out = tmp_path / "out"
    assert main([YAML, "--output_dir", str(out), "--deepspeed", cfgs["z3"]]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"error: deepspeed: {cfgs['z3']} asks for ZeRO stage 3 (sharded parameters) with finetuning_type "
                     "lora: not implemented (stage 3 is for full and freeze; with LoRA use stage 2)"], err
    assert not out.exists()


def test_checkpoint_of_two_ranks_resumes_on_one_process(launched, single, setup, tmp_path):
    """checkpoint-1 of the sharded AdamW run (its state gathered whole) goes on in one process, per-device batch 4:
    the straight one-process run's weights, and the 2-rank run's."""
    base, _ = setup
    ck = launched / "adamw_z2" / "checkpoint-1"
    st = json.load(open(ck / "trainer_state.json"))
    assert st["ranks"] == 2 and st["zero_stage"] == 2 and st["batch"] == 4
    with np.load(ck / "optimizer.npz") as d:
        n = len([k for k in d if k.startswith("exp_avg.")])
        assert n == len(single["adamw"][0]) and int(d["step"]) == 1
    out = str(tmp_path / "resumed")
    tr, losses = worker.run(worker.args(out, str(base / "model"), per_device_train_batch_size=4,
                                        resume_from_checkpoint=str(ck)), 7)
    assert tr._start_step == 1 and len(losses) == 1
    got = {p.name: p.asnumpy() for p in tr.params}
    assert_close("adamw", got, single["adamw"][0], "resumed")
    assert_close("adamw", got, dict(np.load(launched / "adamw_z2.rank0.npz")), "resumed vs 2 ranks")
    np.testing.assert_allclose(losses[0], single["adamw"][1][1], rtol=1e-6)
    # and a run that changes the global batch is refused by name
    with pytest.raises(FinetuneError, match=r"batch \(per_device_train_batch_size x ranks\) 4, this run has 2"):
        worker.run(worker.args(str(tmp_path / "other"), str(base / "model"), per_device_train_batch_size=2,
                               resume_from_checkpoint=str(ck)), 7)


def test_split_rule():
    """Every rank gets a sample of every global batch; a short last batch splits unevenly; one with fewer samples
    than ranks is refused (nothing repeated, nothing dropped)."""
    assert [distributed.share(list(range(10, 13)), r, 2) for r in (0, 1)] == [[10, 11], [12]]
    assert [distributed.share(list(range(4)), r, 2) for r in (0, 1)] == [[0, 1], [2, 3]]
    distributed.check_split(7, 2, 2)          # batches of 4, 4, ..., the last 3: 2 + 1
    distributed.check_split(8, 1, 4)
    with pytest.raises(FinetuneError, match="the 5 training samples leave a last batch of 1 per epoch, fewer than "
                                            "the 2 ranks"):
        distributed.check_split(5, 2, 2)
    with pytest.raises(FinetuneError, match="the 1 training samples"):
        distributed.check_split(1, 1, 2)


def test_bad_global_batch_every_rank_exits(tmp_path):
    """What each msrun rank runs (the launch's variables set as msrun sets them for a worker): the demo's 4 samples
    do not split over 3 ranks at batch 1 x 3: one line, exit 2, nothing written, before any process group."""
    out = tmp_path / "out"
    e = dict(env(), MS_ROLE="MS_WORKER", MS_WORKER_NUM="3", MS_NODE_ID="1", MS_SCHED_HOST="127.0.0.1",
             MS_SCHED_PORT=str(free_port()))
    p = subprocess.run([sys.executable, "finetune.py", YAML, "--output_dir", str(out), "--per_device_train_batch_size",
                        "1"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == "" and p.stderr == "", (p.returncode, p.stderr[-2000:])   # rank 1: silent
    e["MS_NODE_ID"] = "0"
    p = subprocess.run([sys.executable, "-m", "glm4v_ms.finetune", YAML, "--output_dir", str(out),
                        "--per_device_train_batch_size", "1"], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
    assert p.returncode == 2 and lines == ["error: per_device_train_batch_size 1 x 3 ranks: the 4 training samples "
                                           "leave a last batch of 1 per epoch, fewer than the 3 ranks (every rank "
                                           "needs a sample of every batch); use a sample count whose remainder over "
                                           "3 is 0 or at least 3"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not out.exists()


@pytest.mark.parametrize("bad,msg", [({"zero_optimization": {"stage": 3}}, "asks for ZeRO stage 3 (sharded "
                                                                          "parameters) with finetuning_type lora: "
                                                                          "not implemented"),
                                     ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                                      "offload_optimizer to cpu: offloading is not implemented")])
def test_deepspeed_config_refused(tmp_path, bad, msg):
    from glm4v_ms.finetune.args import parse
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(FinetuneError, match=re.escape(msg)):
        parse(["--model_name_or_path", "x", "--dataset", "d", "--output_dir", "o", "--deepspeed", str(path)])


def test_readme_command(setup, tmp_path):
    """Launch 2, as the README writes it: msrun ... finetune.py demo_tiny_lora.yaml --deepspeed ds_z2_config.json.
    Rank 0 prints the plan per rank and the progress and writes the outputs; rank 1 says nothing; the adapter and
    the logged losses equal `python -m glm4v_ms.finetune` on one process with per-device batch 2."""
    from glm4v_ms import demo
    from glm4v_ms.finetune.__main__ import main
    demo.cached("demo-tiny")   # built once here, not once per rank
    _, cfgs = setup
    two, one, logs = tmp_path / "two", tmp_path / "one", tmp_path / "logs"
    flags = ["--max_steps", "3", "--save_steps", "3", "--plot_loss", "false", "--learning_rate", "1e-3"]
    from test_readme_commands import readme_command
    cmd = readme_command("msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=")
    assert cmd[-2:] == ["finetune.py", YAML], cmd
    cmd = [f"--master_port={free_port()}" if c.startswith("--master_port=") else f"--log_dir={logs}"
           if c.startswith("--log_dir=") else c for c in cmd]
    cmd += ["--output_dir", str(two), "--deepspeed", cfgs["z2"], *flags]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    text = logs_of(logs)
    assert p.returncode == 0, "\n".join(f"== {k}\n{v[-3000:]}" for k, v in text.items())
    assert "[memory per rank (2 ranks, data parallel, ZeRO stage 2)" in text["worker_0.log"]
    assert "[train] step 3/3" in text["worker_0.log"]
    assert "[train]" not in text["worker_1.log"] and "[memory" not in text["worker_1.log"]
    assert sorted(os.listdir(two)) == ["adapter_config.json", WEIGHTS, "checkpoint-3", "trainer_log.jsonl"]

    assert main([YAML, "--output_dir", str(one), "--per_device_train_batch_size", "2", *flags]) == 0
    a, b = (SafetensorsFile(os.path.join(d, WEIGHTS)) for d in (two, one))
    for k in b.keys():
        assert np.abs(a.read(k)[0] - b.read(k)[0]).max() <= 1e-3 * 1e-3, k
        if "lora_B" in k:
            assert np.abs(b.read(k)[0]).max() > 1e-4, k   # trained
    la, lb = ([json.loads(ln)["loss"] for ln in open(d / "trainer_log.jsonl")] for d in (two, one))
    np.testing.assert_allclose(la, lb, atol=1e-4)   # the log rounds to 4 decimals


GLM41V_9B = {   # GLM-4.1V-9B's config.json sizes (the README's plan tables; tests/test_finetune_full.py too)
    "model_type": "glm4v", "text_config": {
        "vocab_size": 151552, "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696,
        "rope_parameters": {"mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5, "rope_theta": 10000.0}},
    "vision_config": {"depth": 24, "hidden_size": 1536, "num_heads": 12, "out_hidden_size": 4096,
                      "intermediate_size": 13696, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "image_size": 336}}


def test_readme_plan_per_rank():
    """The README's per-rank table for GLM-4.1V-9B is what plan.config_plan gives (its config.json's text and
    vision sizes; bf16, LoRA rank 8, batch 1 per rank, cutoff_len 2048, recompute, AdamW)."""
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.finetune import plan
    cfg = Glm4vConfig.from_dict(GLM41V_9B)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for n, stage in ((1, 0), (4, 0), (4, 1), (4, 2), (8, 2)):
        p = plan.config_plan(cfg, 2, 1, 2048, 8, ranks=n, stage=stage)
        row = (f"| {n} | {stage if n > 1 else '-'} | {p['grads'] / 1e6:.1f} MB | {p['optimizer'] / 1e6:.1f} MB | "
               f"{plan.total(p, True) / 1e9:.2f} GB |")
        assert row in readme, row

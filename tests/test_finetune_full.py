"""Full and freeze fine-tuning against transformers + LLaMA-Factory (fp32, CPU): the trained set is what
LLaMA-Factory's own _setup_full_tuning / _setup_freeze_tuning leave trainable on the transformers model (our
names carried over to transformers' by hf_params), and one SGD step changes every trained weight by
-lr * transformers' gradient on the same batch (per transformers tensor, fusion and row orders undone) and every
other weight not at all."""
import numpy as np
import pytest

import export_standin
import lf_reference  # noqa: F401  (LLaMA-Factory importable: stubs, version check off)
import tinylora
import torch
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.config import Glm4vConfig
from glm4v_ms.finetune import forward, full, optim
from glm4v_ms.finetune.args import FinetuneArgs, FinetuneError
from llamafactory.hparams import FinetuningArguments
from llamafactory.model.adapter import _setup_freeze_tuning, _setup_full_tuning

export_standin.install()
from glm4v_ms.finetune.export import hf_params  # noqa: E402

TOL = 1e-4   # measured worst gradient rel error 3.3e-5 (vision norm weights), tower trained

# LLaMA-Factory's keys as its yaml gives them (comma-separated strings); ours takes the same values
CASES = {
    "full, tower frozen (the default)": dict(finetuning_type="full"),
    "full, tower and merger trained": dict(finetuning_type="full", freeze_vision_tower=False,
                                           freeze_multi_modal_projector=False),
    "full, language model frozen": dict(finetuning_type="full", freeze_vision_tower=False,
                                        freeze_language_model=True),
    "freeze (the default: last 2 layers)": dict(finetuning_type="freeze"),
    "freeze, first layer's attention + mlp, embedding, norm": dict(
        finetuning_type="freeze", freeze_trainable_layers=-1, freeze_trainable_modules="self_attn,mlp",
        freeze_extra_modules="embed_tokens,norm"),
    "freeze, last layer, tower and merger": dict(finetuning_type="freeze", freeze_trainable_layers=1,
                                                 freeze_vision_tower=False, freeze_multi_modal_projector=False),
}


def ours_args(kw):
    lists = ("freeze_trainable_modules", "freeze_extra_modules")
    return FinetuneArgs(model_name_or_path="m", dataset=["x"], output_dir="o",
                        **{k: v.split(",") if k in lists else v for k, v in kw.items()})


def lf_model(base, kw):
    """The transformers model with LLaMA-Factory's full / freeze setup run on it (no fp32 cast: fp32 already)."""
    ref = tinylora.reference("v", base)
    setup = _setup_full_tuning if kw["finetuning_type"] == "full" else _setup_freeze_tuning
    setup(ref, FinetuningArguments(**kw), True, False)
    return ref


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full_v"))
    tinylora.build("v", d)
    return d


@pytest.fixture(scope="module")
def model(base):
    return AutoModelForImageTextToText.from_pretrained(base)


@pytest.mark.parametrize("case", list(CASES))
def test_trained_set_is_llamafactory(base, model, case):
    kw = CASES[case]
    want = {n for n, p in lf_model(base, kw).named_parameters() if p.requires_grad}
    names = hf_params(model)
    got = {h for n in full.select(model.config, ours_args(kw)) for h in names[n]}
    assert got == want, sorted(got ^ want)


def test_refusals(base, tmp_path):
    """An unknown module is refused naming its key and the choices (LLaMA-Factory raises ValueError there too);
    a rule that trains half of one of our fused tensors is refused naming both halves (GLM-4.5V: the extra module
    gate_proj matches the dense and shared-expert MLPs' gate_proj as a substring, not their up_proj)."""
    cfg = Glm4vConfig.from_pretrained(base)
    with pytest.raises(FinetuneError, match=r"^freeze_trainable_modules: attention is not a module of this model's "
                                            r"layers \(choose from all, .*self_attn"):
        full.select(cfg, ours_args(dict(finetuning_type="freeze", freeze_trainable_modules="attention")))
    with pytest.raises(ValueError, match="Module attention is not found"):   # LLaMA-Factory's own refusal
        lf_model(base, dict(finetuning_type="freeze", freeze_trainable_modules="attention"))
    with pytest.raises(FinetuneError, match=r"train .*gate_proj.* but not .*up_proj.*in one tensor"):
        tinylora.build("moe", str(tmp_path))
        full.select(Glm4vConfig.from_pretrained(str(tmp_path)),
                    ours_args(dict(finetuning_type="freeze", freeze_extra_modules="gate_proj")))


SGD = {"tower trained": "full, tower and merger trained", "tower frozen": "full, tower frozen (the default)",
       "freeze": "freeze (the default: last 2 layers)"}


@pytest.mark.parametrize("case", list(SGD))
def test_sgd_step(base, case):
    kw = CASES[SGD[case]]
    ours = AutoModelForImageTextToText.from_pretrained(base)
    ours.trained_names = full.select(ours.config, ours_args(kw))
    params = full.trainable(ours)
    before = {n: p.asnumpy().copy() for n, p in ours.parameters_and_names()}
    x, y = tinylora.padded_batch()
    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    # the tower runs in the graph whenever one of its tensors trains (the frozen-tower default trains its position
    # table and norms, LLaMA-Factory's rule); freeze's text layers take the host's features
    assert (st.tower is not None) == (case != "freeze")
    loss, grads = forward.Grad(ours, params, jit=True)(st)
    lr = 10.0
    optim.Optimizer(params, "sgd").step([g / st.tokens for g in grads], lr)
    ref = lf_model(base, kw)
    out = ref(**tinylora.torch_inputs(x), labels=torch.from_numpy(y))
    out.loss.backward()
    assert abs(float(loss.asnumpy()) / st.tokens - out.loss.item()) <= TOL * out.loss.item()
    after = {n: p.asnumpy() for n, p in ours.parameters_and_names()}
    delta = full.to_hf(ours.config, {n: after[n].astype(np.float64) - before[n] for n in ours.trained_names})
    want = {n: -lr * p.grad.numpy() for n, p in ref.named_parameters() if p.requires_grad}
    assert set(delta) == set(want)
    for n, w in want.items():
        assert np.abs(w).max() > 0, n
        err = float(np.abs(delta[n] - w).max() / np.abs(w).max())
        assert err <= TOL, (n, err)
    for n in before:
        if n not in ours.trained_names:
            np.testing.assert_array_equal(after[n], before[n])

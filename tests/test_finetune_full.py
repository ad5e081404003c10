"""Full fine-tuning against transformers (fp32, CPU): the tower in the training graph, one SGD step changes every
trained weight by -lr * transformers' gradient (per transformers tensor, fusion and row orders undone), and every
untrained weight not at all."""
import numpy as np
import pytest

import tinylora
import torch
from glm4v_ms import AutoModelForImageTextToText
from glm4v_ms.finetune import forward, full, optim
from glm4v_ms.finetune.args import FinetuneArgs

TOL = 1e-4   # measured worst gradient rel error 3.3e-5 (vision norm weights), tower trained


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full_v"))
    tinylora.build("v", d)
    return d


def test_sgd_step_tower_trained(base):
    a = FinetuneArgs(model_name_or_path=base, dataset=["x"], output_dir="o", finetuning_type="full",
                     freeze_vision_tower=False, freeze_multi_modal_projector=False)
    ours = AutoModelForImageTextToText.from_pretrained(base)
    ours.trained_names = full.select(ours.config, a)
    params = full.trainable(ours)
    before = {n: p.asnumpy().copy() for n, p in ours.parameters_and_names()}
    x, y = tinylora.padded_batch()
    st = forward.prepare(ours, x["input_ids"], x["attention_mask"], y, x["pixel_values"], x["image_grid_thw"])
    assert st.tower is not None
    loss, grads = forward.Grad(ours, params, jit=True)(st)
    lr = 10.0
    optim.Optimizer(params, "sgd").step([g / st.tokens for g in grads], lr)
    ref = tinylora.reference("v", base)
    out = ref(**tinylora.torch_inputs(x), labels=torch.from_numpy(y))
    out.loss.backward()
    assert abs(float(loss.asnumpy()) / st.tokens - out.loss.item()) <= TOL * out.loss.item()
    after = {n: p.asnumpy() for n, p in ours.parameters_and_names()}
    delta = full.to_hf(ours.config, {n: after[n].astype(np.float64) - before[n] for n in ours.trained_names})
    want = {n: -lr * p.grad.numpy() for n, p in ref.named_parameters()}
    assert set(delta) == set(want)   # full, tower and projector trained: every transformers parameter
    for n, w in want.items():
        assert np.abs(w).max() > 0, n
        err = float(np.abs(delta[n] - w).max() / np.abs(w).max())
        assert err <= TOL, (n, err)
    for n in before:
        if n not in ours.trained_names:
            np.testing.assert_array_equal(after[n], before[n])

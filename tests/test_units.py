"""Unit tests against the reference's own functions: bicubic resampling, 3D positions, rotary permutation."""
import numpy as np
import pytest

import tinyref
import torch
import torch.nn.functional as F
from mindspore import Tensor

from glm4v_ms import rope
from glm4v_ms.vision import cubic_matrix, resample


def torch_grid_sample(table, n_h, n_w):
    """The reference's call (Glm4vVisionEmbeddings): grid_sample bicubic, align_corners=False, border."""
    G = int(table.shape[0] ** 0.5)
    t = torch.from_numpy(table).view(G, G, -1).permute(2, 0, 1)[None]
    hh, ww = torch.meshgrid(torch.arange(n_h, dtype=torch.float32), torch.arange(n_w, dtype=torch.float32), indexing="ij")
    gx = ((ww.reshape(-1) + 0.5) / n_w) * 2 - 1
    gy = ((hh.reshape(-1) + 0.5) / n_h) * 2 - 1
    grid = torch.stack((gx, gy), -1)[None, :, None, :]
    out = F.grid_sample(t, grid, mode="bicubic", align_corners=False, padding_mode="border")
    return out[0, :, :, 0].T.reshape(n_h, n_w, -1).numpy()


@pytest.mark.parametrize("n_h,n_w", [(24, 24), (48, 36), (160, 208), (6, 10), (2, 2), (4, 94), (23, 25), (1, 7)])
def test_bicubic_matches_grid_sample(n_h, n_w):
    rng = np.random.default_rng(n_h * 1000 + n_w)
    table = rng.standard_normal((576, 8)).astype(np.float32)
    ref = torch_grid_sample(table, n_h, n_w)
    ours = resample(Tensor(table), Tensor(cubic_matrix(n_h, 24)), Tensor(cubic_matrix(n_w, 24))).asnumpy().reshape(n_w, n_h, -1).transpose(1, 0, 2)
    np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_bicubic_is_not_bilinear():
    """Guard against the silent bilinear substitute: the two must differ on a random table."""
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.standard_normal((1, 1, 24, 24)).astype(np.float32))
    bil = F.interpolate(t, size=(40, 40), mode="bilinear", align_corners=False)[0, 0].numpy()
    ours = cubic_matrix(40, 24) @ t[0, 0].numpy() @ cubic_matrix(40, 24).T
    assert np.abs(ours - bil).max() > 1e-2
    np.testing.assert_allclose(cubic_matrix(40, 24).sum(1), 1.0, atol=1e-6)   # rows are partitions of unity


def _layouts():
    P = tinyref.Prompt
    return {
        "image_then_video": [P(0).text(2).image(8, 12).text(1).video(2, 4, 4).text(2)],
        "video_then_images": [P(1).video(3, 6, 4).text(3).image(4, 4).image(10, 2).text(1)],
        "padded_batch_mixed": [P(2).text(5).image(6, 6).text(2), P(3).text(1).video(2, 8, 4).text(3).image(2, 2)],
        "text_only": [P(4).text(9)],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_positions_match_get_rope_index(layout):
    ref = tinyref.Glm4vForConditionalGeneration(tinyref.tiny_config())
    inputs = tinyref.batch(*[p.inputs() for p in _layouts()[layout]])
    t = {k: torch.from_numpy(v) for k, v in inputs.items() if "pixel" not in k}
    if "image_grid_thw" not in t and "video_grid_thw" not in t:
        # the reference has no 3D positions without vision: plain text positions, delta 0
        ref_pos = np.broadcast_to(np.arange(inputs["input_ids"].shape[1]), (3,) + inputs["input_ids"].shape)
        ref_delta = np.zeros(1)
    else:
        rp, rd = ref.model.get_rope_index(t["input_ids"], mm_token_type_ids=t["mm_token_type_ids"],
                                          image_grid_thw=t.get("image_grid_thw"), video_grid_thw=t.get("video_grid_thw"),
                                          attention_mask=t["attention_mask"])
        ref_pos, ref_delta = rp.numpy(), rd.numpy().reshape(-1)
    pos, delta = rope.position_ids_3d(inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"),
                                      inputs.get("video_grid_thw"), 2,
                                      image_token_id=tinyref.IDS["image_token_id"],
                                      video_start_id=tinyref.IDS["video_start_token_id"],
                                      video_end_id=tinyref.IDS["video_end_token_id"])
    real = inputs["attention_mask"].astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos[:, real])
    np.testing.assert_array_equal(delta, ref_delta)
    # our token typing is the processor's mm_token_type_ids
    types = rope.token_types(inputs["input_ids"], tinyref.IDS["image_token_id"], tinyref.IDS["video_start_token_id"],
                             tinyref.IDS["video_end_token_id"])
    np.testing.assert_array_equal(types[real], inputs["mm_token_type_ids"][real])


def test_neox_permutation_preserves_dot_products():
    """Permuting q and k rows from interleaved to rotate-half form leaves q.k after rotary unchanged."""
    rng = np.random.default_rng(0)
    hd, r = 32, 16
    q, k = rng.standard_normal((2, hd))
    ang = rng.standard_normal(r // 2)

    def interleaved(x):
        x = x.copy()
        a, b = x[0:r:2].copy(), x[1:r:2].copy()
        x[0:r:2], x[1:r:2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
        return x

    def halves(x):
        x = x.copy()
        c, s = np.cos(np.r_[ang, ang]), np.sin(np.r_[ang, ang])
        x[:r] = x[:r] * c + np.r_[-x[r // 2:r], x[:r // 2]] * s
        return x
    p = rope.neox_permutation(hd, r)
    assert np.isclose(interleaved(q) @ interleaved(k), halves(q[p]) @ halves(k[p]))


def test_layers_share_a_graph_key_by_structure_not_index():
    """Ascend compiles each layer structure once (lazy_inline's reuse key): dense and MoE layers get different
    keys, layers of one structure one key, and a layer whose linear was swapped (GPTQ, per layer) its own."""
    import mindspore as ms
    import tinymoe
    from glm4v_ms.config import Glm4vConfig
    from glm4v_ms.layers import Linear
    from glm4v_ms.text import TextModel
    cfg = Glm4vConfig.from_dict(tinymoe.tiny_config(num_hidden_layers=4).to_dict()).text
    t = TextModel(cfg, ms.float32)
    t.share_layer_graphs()
    keys = [layer.cell_init_args for layer in t.layers]
    assert keys[0] != keys[1] and keys[1] == keys[2] == keys[3] and keys[0].startswith("lazy_inline_")
    t.layers[3].attn.o = Linear(t.layers[3].attn.q_size, cfg.hidden_size, ms.float16)
    t.share_layer_graphs()
    assert t.layers[3].cell_init_args != t.layers[2].cell_init_args == keys[2]


def test_forward_refuses_unknown_arguments_by_name(tmp_path):
    """The processor's extra arrays are taken; an argument the port does not implement is named, not dropped."""
    from glm4v_ms import Glm4vForConditionalGeneration
    tinyref.build(str(tmp_path), seed=3)
    m = Glm4vForConditionalGeneration.from_pretrained(str(tmp_path))
    inputs = {k: v for k, v in tinyref.Prompt(3).text(5).inputs().items() if "type_ids" not in k}
    ids = inputs["input_ids"]
    base = m(**inputs).logits.asnumpy()
    np.testing.assert_array_equal(m(**inputs, mm_token_type_ids=np.zeros_like(ids),
                                    token_type_ids=np.zeros_like(ids)).logits.asnumpy(), base)
    with pytest.raises(TypeError, match="logits_to_keep"):
        m(**inputs, logits_to_keep=1)
    with pytest.raises(TypeError, match="output_hidden_states"):
        m.trace(**inputs, output_hidden_states=True)

"""Video vs transformers' Glm4vVideoProcessor (torchvision resize): identical frame indices, timestamps, grids and
input_ids; pixels within 0.1 max / 0.01 mean (PIL vs torchvision bicubic rounding)."""
from fractions import Fraction

import numpy as np
import pytest

import reference  # noqa: F401
from transformers.video_utils import VideoMetadata as RefMetadata
from transformers.video_utils import load_video as ref_load_video

from glm4v_ms.processing import load_video, sample_frame_indices
from processing_fixtures import *  # noqa: F401,F403
from processing_fixtures import encode_clip

CLIPS = {  # name: (seconds, fps, (width, height), codec)
    "10fps_3s": (3.0, Fraction(10), (96, 64), "libx264"),
    "ntsc_29.97": (2.5, Fraction(30000, 1001), (80, 60), "libx264"),
    "7.5fps_odd_count": (2.2, Fraction(15, 2), (120, 50), "mpeg4"),
    "small_upscaled": (1.0, Fraction(4), (30, 30), "libx264"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {name: encode_clip(d / f"{name}.mp4", s, fps, size, codec, seed=i)
            for i, (name, (s, fps, size, codec)) in enumerate(CLIPS.items())}


def _reference(ref, path, prompt):
    frames, meta = ref_load_video(path, backend="pyav")
    return ref(text=prompt, videos=[frames], video_metadata=[meta], do_sample_frames=True, return_metadata=True,
               return_tensors="np")


@pytest.mark.parametrize("name", list(CLIPS))
def test_video_chat_parity(name, clips, ours, ref):
    chat = [{"role": "user", "content": [{"type": "video", "path": clips[name]},
                                         {"type": "text", "text": "Describe this video."}]}]
    prompt = ours.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(chat, add_generation_prompt=True)
    got = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    want = _reference(ref, clips[name], prompt)

    _, meta = load_video(clips[name])
    ref_meta = want["video_metadata"][0]
    assert list(meta.frames_indices) == [int(i) for i in ref_meta.frames_indices]
    assert meta.timestamps == pytest.approx(ref_meta.timestamps, abs=0)
    assert len(meta.frames_indices) % 2 == 0
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (got["mm_token_type_ids"] == 2).sum() == want["video_grid_thw"].prod() // 4
    # the whole-second labels are in the prompt: frame k of the grid is labelled int(timestamps[2k])
    text = ours.decode(got["input_ids"][0])
    labels = [int(s) for s in meta.timestamps[::2]]
    assert text.count("<|end_of_image|>") == len(labels)
    assert "".join(part[0] for part in text.split("<|end_of_image|>")[1:]) == "".join(str(s)[0] for s in labels)

    diff = np.abs(got["pixel_values_videos"] - want["pixel_values_videos"])
    assert got["pixel_values_videos"].shape == want["pixel_values_videos"].shape
    print(f"{name}: max {diff.max():.4f} mean {diff.mean():.5f}")
    assert diff.max() <= 0.1 and diff.mean() <= 0.01


def test_sampler_matches_reference(ref):
    vp = ref.video_processor
    cases = [(30, 10.0), (75, 29.97), (17, 7.5), (4, 4.0), (1, 25.0), (2, 1.0), (9000, 30.0), (18010, 59.94),
             (601, 2.0), (700, 2.0), (310 * 24, 24.0), (12, 0.5), (1000, 3.3)]
    for total, fps in cases:
        for req in (None, 1, 2, 3.5):
            for duration in (total / fps, None):
                m = RefMetadata(total_num_frames=total, fps=fps, duration=duration)
                want = [int(i) for i in vp.sample_frames(m, fps=req)]
                got = sample_frame_indices(total, fps, duration, req or 2, 300)
                assert got == want, (total, fps, req, duration)
                assert len(got) % 2 == 0


def test_long_video_is_spread_over_300_s(ref):
    got = sample_frame_indices(25 * 600, 25.0, 600.0)  # 10 minutes at 25 fps
    assert len(got) == 600 and got[0] == 0 and got[-1] == 25 * 600 - 1


def test_frames_as_arrays_without_metadata(ours, ref):
    """Pre-sampled frames without timing (do_sample_frames=False): 24 fps timestamps, as the reference assumes."""
    frames = np.stack([np.full((56, 56, 3), 10 * i, np.uint8) for i in range(50)])
    text = "<|begin_of_video|><|video|><|end_of_video|>"
    got = ours(text=text, videos=[frames], do_sample_frames=False)
    want = ref(text=text, videos=[frames], do_sample_frames=False, return_tensors="np")
    for key in ("input_ids", "video_grid_thw", "mm_token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key])
    assert np.abs(got["pixel_values_videos"] - want["pixel_values_videos"]).max() <= 0.1

"""transformers' Glm4vProcessor argument surface against transformers itself: video forms, metadata and frame
sampling, tokenizer options, image/video settings per call and as from_pretrained overrides, refusals by name.

Frames here have sides that are multiples of 28 inside the pixel budget, so no resize runs and video pixels agree to
1e-6 (float32 rounding of the normalisation; resized video pixels are covered in test_processing_video.py).
"""
import os

import numpy as np
import pytest
from PIL import Image

import reference  # noqa: F401
from transformers import AutoProcessor

from glm4v_ms.processing import Glm4vProcessor, ProcessorError
from processing_fixtures import *  # noqa: F401,F403
from processing_fixtures import drawn_image, encode_clip

VIDEO = "<|begin_of_video|><|video|><|end_of_video|>"
KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
        "video_grid_thw")


def frames(n=12, h=56, w=84, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def same(got, want, keys=KEYS, atol=0.0):
    compared = [k for k in keys if k in want]
    assert compared and set(compared) <= set(got), (sorted(got), sorted(want))
    for k in compared:
        w = np.asarray(want[k])
        assert got[k].shape == w.shape, (k, got[k].shape, w.shape)
        if got[k].dtype.kind == "f":
            # video pixels: torchvision's fused rescale+normalise rounds differently, by up to one float32 ulp
            tol = max(atol, 1e-6) if k == "pixel_values_videos" else atol
            np.testing.assert_allclose(got[k], w, rtol=0, atol=tol, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], w, err_msg=k)


def both(ours, ref, **kwargs):
    got = ours(**kwargs)
    want = ref(return_tensors="np", **kwargs)
    same(got, want)
    return got


# --- videos in every form ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["thwc", "tchw", "pil_list", "array_list", "chw_list"])
def test_video_forms_unsampled(ours, ref, form):
    v = frames(6)
    video = {"thwc": v, "tchw": v.transpose(0, 3, 1, 2), "pil_list": [Image.fromarray(f) for f in v],
             "array_list": list(v), "chw_list": list(v.transpose(0, 3, 1, 2))}[form]
    both(ours, ref, text=VIDEO, videos=video, do_sample_frames=False)


def test_batch_of_videos_nested_per_sample(ours, ref):
    a, b = frames(6, seed=1), frames(4, 84, 56, seed=2)
    got = both(ours, ref, text=[VIDEO, "two " + VIDEO], videos=[[a], [b]], do_sample_frames=False, padding=True)
    assert got["video_grid_thw"].tolist() == [[3, 4, 6], [2, 6, 4]]


@pytest.mark.parametrize("meta", [
    {"total_num_frames": 12, "fps": 3},                        # no frame indices: this used to crash
    {"total_num_frames": 12, "fps": 3, "duration": 4.0},
    {"total_num_frames": 12, "fps": 6.5, "width": 84, "height": 56},
])
@pytest.mark.parametrize("fps", [None, 1, 3.5])
def test_arrays_are_sampled_by_the_metadata(ours, ref, meta, fps):
    v = frames(12)
    kw = dict(text=VIDEO, videos=[v], video_metadata=[dict(meta)], return_metadata=True)
    if fps is not None:
        kw["fps"] = fps
    got = ours(**kw)
    want = ref(return_tensors="np", **{**kw, "video_metadata": [dict(meta)]})
    same(got, want)
    assert got["video_metadata"][0].frames_indices == [int(i) for i in want["video_metadata"][0].frames_indices]
    assert len(got["video_metadata"][0].frames_indices) < 12 or fps == 3.5   # frames were dropped


def test_metadata_as_transformers_object_and_unsampled_indices(ours, ref):
    from transformers.video_utils import VideoMetadata

    v = frames(6)
    for meta in ({"total_num_frames": 60, "fps": 3.0, "frames_indices": [0, 10, 20, 30, 40, 50]},):
        both(ours, ref, text=VIDEO, videos=[v], video_metadata=VideoMetadata(**meta), do_sample_frames=False)
        both(ours, ref, text=VIDEO, videos=[v], video_metadata=meta, do_sample_frames=False)  # labels 0 3 6 ...
    v = frames(12)
    got = ours(text=VIDEO, videos=[v], video_metadata=VideoMetadata(total_num_frames=12, fps=4.0))
    want = ref(text=VIDEO, videos=[v], video_metadata=VideoMetadata(total_num_frames=12, fps=4.0),
               return_tensors="np")
    same(got, want)


def test_sampling_without_metadata_is_refused_as_transformers_does(ours, ref):
    for kw in ({}, {"do_sample_frames": True}, {"fps": 1}):
        with pytest.raises(ValueError) as theirs:
            ref(text=VIDEO, videos=[frames(6)], return_tensors="np", **kw)
        with pytest.raises(ProcessorError) as mine:
            ours(text=VIDEO, videos=[frames(6)], **kw)
        assert str(mine.value) == str(theirs.value)


def test_video_file_sampling_arguments(ours, ref, tmp_path):
    from transformers.video_utils import load_video as ref_load_video

    clip = encode_clip(tmp_path / "clip.mp4", 3.0, size=(84, 56))
    all_frames, meta = ref_load_video(clip, backend="pyav")   # every frame; the reference samples afterwards
    prompt = "watch " + VIDEO
    for kw in ({}, {"fps": 1}, {"fps": 4}, {"do_sample_frames": False}):
        got = ours(text=prompt, videos=clip, **kw)
        want = ref(text=prompt, videos=[all_frames], video_metadata=[meta], return_tensors="np",
                   **({"do_sample_frames": True} | kw))
        for k in ("input_ids", "mm_token_type_ids", "video_grid_thw"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} {kw}")
        assert np.abs(got["pixel_values_videos"] - want["pixel_values_videos"]).max() <= 0.1   # codec frames
    with pytest.raises(ProcessorError, match="video_metadata is for videos given as frames"):
        ours(text=prompt, videos=clip, video_metadata={"total_num_frames": 3, "fps": 1})


def test_chat_template_videos_and_fps(ours, ref, tmp_path):
    """Frames in a chat item, a list of frame files as one video, and fps through apply_chat_template."""
    v = frames(8)
    paths = []
    for i, f in enumerate(v):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(f).save(paths[-1])
    chat = lambda video: [{"role": "user", "content": [{"type": "video", "video": video},  # noqa: E731
                                                       {"type": "text", "text": "What happens?"}]}]
    args = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    same(ours.apply_chat_template(chat(v), do_sample_frames=False, **args),
         ref.apply_chat_template(chat(v), do_sample_frames=False, return_tensors="np", **args))
    meta = {"total_num_frames": 8, "fps": 2.0}
    same(ours.apply_chat_template(chat(v), fps=1, video_metadata=[meta], **args),
         ref.apply_chat_template(chat(v), fps=1, video_metadata=[dict(meta)], return_tensors="np", **args))
    # frame files: the reference's own image loader needs torchvision's image extension, absent here, so its side
    # gets the same frames as PIL images (its loader opens each file as load_image does: EXIF, RGB)
    got = ours.apply_chat_template(chat(paths), do_sample_frames=False, **args)
    same(got, ref.apply_chat_template(chat([Image.open(p) for p in paths]), do_sample_frames=False,
                                      return_tensors="np", **args))
    with pytest.raises(ProcessorError, match="Sampling frames from a list of images is not supported"):
        ours.apply_chat_template(chat(paths), **args)   # the reference refuses to sample frame files too


def test_num_frames_is_refused_by_name(ours, ref):
    meta = {"total_num_frames": 12, "fps": 4}
    # transformers takes num_frames and ignores it: the same frames as without it
    a = ref(text=VIDEO, videos=[frames(12)], video_metadata=[dict(meta)], num_frames=4, return_tensors="np")
    b = ref(text=VIDEO, videos=[frames(12)], video_metadata=[dict(meta)], return_tensors="np")
    np.testing.assert_array_equal(a["video_grid_thw"], b["video_grid_thw"])
    with pytest.raises(ProcessorError, match="num_frames"):
        ours(text=VIDEO, videos=[frames(12)], video_metadata=[meta], num_frames=4)


@pytest.mark.parametrize("meta, match", [({"fps": 2}, "total_num_frames"), ({"total_num_frames": 6, "rate": 2},
                                                                          "rate"),
                                         ({"total_num_frames": 60, "fps": 30}, "the video has 6")])
def test_bad_metadata_is_one_clear_error(ours, meta, match):
    with pytest.raises(ProcessorError, match=match):
        ours(text=VIDEO, videos=[frames(6)], video_metadata=meta)


# --- tokenizer options -------------------------------------------------------------------------------------


TEXTS = ["a short one", "a longer prompt with <|image|> in the middle of it, and more words after"]


@pytest.mark.parametrize("kw", [
    {"padding": True}, {"padding": "longest", "padding_side": "right"}, {"padding": "longest", "padding_side": "left"},
    {"padding": "max_length", "max_length": 120}, {"padding": True, "pad_to_multiple_of": 16},
    {"padding": True, "return_attention_mask": False}, {"padding": True, "add_special_tokens": False},
    {"padding": True, "return_token_type_ids": True}, {"padding": True, "return_mm_token_type_ids": False},
])
def test_tokenizer_options(ours, ref, kw):
    images = [drawn_image(56, 56, 1)]
    got = ours(text=TEXTS, images=images, **kw)
    want = ref(text=TEXTS, images=images, return_tensors="np", **kw)
    same(got, want, keys=KEYS + ("token_type_ids",))
    assert set(got) == set(want), (sorted(got), sorted(want))


def test_truncation(ours, ref):
    text = ["one two three four five six seven eight nine ten"]
    same(ours(text=text, truncation=True, max_length=4), ref(text=text, truncation=True, max_length=4,
                                                              return_tensors="np"))
    same(ours(text=text, padding="max_length", truncation=True, max_length=6),
         ref(text=text, padding="max_length", truncation=True, max_length=6, return_tensors="np"))
    with pytest.raises(ValueError, match="Mismatch in `image` token count"):
        ref(text="hi <|image|>", images=[drawn_image(56, 56)], truncation=True, max_length=5, return_tensors="np")
    with pytest.raises(ProcessorError, match="cuts into an image"):
        ours(text="hi <|image|>", images=[drawn_image(56, 56)], truncation=True, max_length=5)


def test_no_padding(ours, ref):
    same(ours(text=["a b", "c d"], padding=False), ref(text=["a b", "c d"], padding=False, return_tensors="np"))
    with pytest.raises(ProcessorError, match="different lengths"):
        ours(text=TEXTS[:1] + ["x"], padding="do_not_pad")


# --- image and video settings --------------------------------------------------------------------------------


SETTINGS = [
    {"size": {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 6}},
    {"patch_size": 7, "merge_size": 2}, {"merge_size": 1}, {"temporal_patch_size": 1},
    {"do_rescale": False}, {"rescale_factor": 1 / 127.5}, {"do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}, {"image_mean": 0.5, "image_std": 0.5},
    {"do_resize": False}, {"do_convert_rgb": True},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(kw))
def test_image_and_video_settings_per_call(ours, ref, kw):
    images = [drawn_image(84, 112, 3), drawn_image(140, 56, 4)]
    text = "<|image|> and <|image|>"
    same(ours(text=text, images=images, **kw), ref(text=text, images=images, return_tensors="np", **kw),
         atol=1e-5 if "rescale_factor" in kw else 0.0)
    video = frames(4, 112, 84)
    # where the setting makes the frames resize, torchvision's bicubic and PIL's differ by 1-2 levels (see
    # test_processing_video.py): ids and grids stay exact
    same(ours(text=VIDEO, videos=[video], do_sample_frames=False, **kw),
         ref(text=VIDEO, videos=[video], do_sample_frames=False, return_tensors="np", **kw), atol=0.05)


def test_settings_nested_per_modality(ours, ref):
    kw = dict(images_kwargs={"merge_size": 1}, videos_kwargs={"patch_size": 7}, text_kwargs={"padding_side": "right"})
    text = ["<|image|>", "a longer one: " + VIDEO]
    args = dict(text=text, images=[drawn_image(56, 84)], videos=[frames(4)], do_sample_frames=False, padding=True)
    same(ours(**args, **kw), ref(**args, return_tensors="np", **kw), atol=1e-5)


@pytest.mark.parametrize("kw", [{"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 8}},
                                {"patch_size": 7, "image_mean": [0.5, 0.5, 0.5], "do_rescale": False},
                                {"fps": 1}])
def test_from_pretrained_overrides(model_dir, kw):
    mine = Glm4vProcessor.from_pretrained(model_dir, **kw)
    theirs = AutoProcessor.from_pretrained(model_dir, use_fast=False, **kw)
    images = [drawn_image(300, 200, 5)]
    same(mine(text="<|image|>", images=images), theirs(text="<|image|>", images=images, return_tensors="np"),
         atol=1e-5)
    meta = {"total_num_frames": 12, "fps": 4.0}
    same(mine(text=VIDEO, videos=[frames(12)], video_metadata=[meta]),
         theirs(text=VIDEO, videos=[frames(12)], video_metadata=[dict(meta)], return_tensors="np"),
         atol=0.05)   # a smaller budget resizes the frames: bicubic rounding, as in test_processing_video.py


def test_model_input_names(ours, ref):
    assert ours.model_input_names == ref.model_input_names


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, name", [({"bogus": 1}, "bogus"), ({"images_kwargs": {"fps": 2}}, "fps"),
                                      ({"return_tensors": "pt"}, "return_tensors"), ({"resample": 2}, "resample"),
                                      ({"padding": "sideways"}, "padding"), ({"truncation": "only_second"},
                                                                             "truncation")])
def test_unknown_or_unsupported_arguments_are_named(ours, kw, name):
    with pytest.raises(ProcessorError, match=name):
        ours(text="<|image|>", images=[drawn_image(56, 56)], **kw)


def test_chat_template_refuses_what_neither_template_nor_processor_takes(ours):
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ProcessorError, match="bogus"):
        ours.apply_chat_template(chat, bogus=1)
    with pytest.raises(ProcessorError, match="bogus"):
        ours.apply_chat_template(chat, tokenize=True, processor_kwargs={"bogus": 1})
    assert ours.apply_chat_template(chat, tokenize=True, padding_side="right", max_length=50, truncation=True).ndim == 2


def test_chat_template_variables_reach_the_template(ours, ref):
    template = "{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}{% if tools %}{{ tools[0].name }}{% endif %}"
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"name": "t"}]
    got = ours.apply_chat_template(chat, chat_template=template, greeting="hello", tools=tools)
    assert got == ref.apply_chat_template(chat, chat_template=template, greeting="hello", tools=tools) == "hello hit"
    with pytest.raises(ProcessorError, match="does not use tools"):
        ours.apply_chat_template(chat, tools=[{"name": "t"}])   # the checkpoint's template has no tools


def test_from_pretrained_refuses_unknown_names(model_dir):
    with pytest.raises(ProcessorError, match="use_fats"):
        Glm4vProcessor.from_pretrained(model_dir, use_fats=False)
    # what ported code passes and changes nothing here is taken
    assert Glm4vProcessor.from_pretrained(model_dir, use_fast=True, trust_remote_code=True).image_processor.size


def test_do_convert_rgb_off_refuses_what_is_not_rgb(ours):
    with pytest.raises(ProcessorError, match="do_convert_rgb"):
        ours(text="<|image|>", images=[drawn_image(56, 56, mode="L")], do_convert_rgb=False)
    with pytest.raises(ProcessorError, match="do_convert_rgb"):
        ours(text=VIDEO, videos=[frames(4)[..., :1]], do_convert_rgb=False, do_sample_frames=False)
    gray = ours(text=VIDEO, videos=[frames(4)[..., :1]], do_sample_frames=False)   # converted when on
    rgb = ours(text=VIDEO, videos=[np.repeat(frames(4)[..., :1], 3, -1)], do_sample_frames=False)
    np.testing.assert_array_equal(gray["pixel_values_videos"], rgb["pixel_values_videos"])


def test_do_resize_off_needs_tiling_sides(ours):
    with pytest.raises(ProcessorError, match="multiples of 28"):
        ours(text="<|image|>", images=[drawn_image(60, 56)], do_resize=False)


def test_unsupported_url_scheme_is_named(ours):
    for item in ({"type": "image", "url": "ftp://example.com/cat.png"},
                 {"type": "video", "url": "ftp://example.com/clip.mp4"}):
        chat = [{"role": "user", "content": [item, {"type": "text", "text": "hi"}]}]
        with pytest.raises(ProcessorError, match="unsupported URL scheme 'ftp'"):
            ours.apply_chat_template(chat, tokenize=True)


def test_positional_order_is_transformers(ours, ref):
    """images first, then text, as transformers' processor takes them; a prompt given first still reads as text."""
    images = [drawn_image(56, 84, 6)]
    same(ours(images, "look: <|image|>"), ref(images, "look: <|image|>", return_tensors="np"))
    v = frames(4)
    same(ours("see " + VIDEO, videos=[v], do_sample_frames=False),
         ref(text="see " + VIDEO, videos=[v], do_sample_frames=False, return_tensors="np"))


def test_decode_arguments(ours, ref):
    ids = ours(text=["Hi , there . It 's <|image|> fine !"], images=[drawn_image(56, 56)])["input_ids"]
    for kw in ({}, {"skip_special_tokens": True}, {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}):
        assert ours.batch_decode(ids, **kw) == ref.batch_decode(ids, **kw), kw
        assert ours.decode(ids[0], **kw) == ref.decode(ids[0], **kw), kw
        assert ours.post_process_image_text_to_text(ids, **kw) == ref.post_process_image_text_to_text(ids, **kw)
    # transformers 5 skips the clean-up for a BPE tokenizer (with a warning): so do we, and we say so too
    with pytest.warns(UserWarning, match="ignored for this BPE tokenizer"):
        got = ours.decode(ids[0], clean_up_tokenization_spaces=True)
    assert got == ref.decode(ids[0], clean_up_tokenization_spaces=True) and " ." in got

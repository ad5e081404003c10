"""Fine-tuning data against LLaMA-Factory 0.9.5 (tests/lf_reference.py): the same input_ids and labels as its
template + SupervisedDatasetProcessor._encode_data_example, and the same pixel values as its GLM4VPlugin, on
image, multi-image multi-turn, video, system and text samples; its defaults, mask_history, enable_thinking false
and null, preserve_thinking, cutoff_len; its dataset_info.json reading; its key set and defaults."""
import dataclasses
import json
import os
from fractions import Fraction

import numpy as np
import pytest

from processing_fixtures import drawn_image, encode_clip, palette_image

from glm4v_ms import demo
from glm4v_ms.finetune import args as fa
from glm4v_ms.finetune import data
from glm4v_ms.processing import Glm4vProcessor

import lf_reference  # noqa: E402  (after processing_fixtures: torchvision schemas, then LLaMA-Factory)

SYSTEM = "You answer briefly."
SEED_COT = "<think>\nTwo shapes, I think.\n</think>\n<answer>A circle and a square.</answer>"   # GLM-V README form
LF_COT = "<think>\nLet me look.\n</think>\n\nIt is red."                                        # LLaMA-Factory's form


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo.build(str(tmp_path_factory.mktemp("ft") / "demo-tiny"), "demo-tiny")


@pytest.fixture(scope="module")
def ours(folder):
    return Glm4vProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("ftmedia")
    files = {"a": drawn_image(120, 90, 1), "b": drawn_image(37, 91, 2), "big": drawn_image(333, 211, 3),
             "small": drawn_image(20, 24, 4), "palette": palette_image()}
    out = {}
    for name, im in files.items():
        out[name] = str(d / f"{name}.png")
        im.save(out[name])
    out["clip"] = encode_clip(d / "clip.mp4", seconds=3.0, fps=Fraction(10), size=(96, 64))
    return out


def _args(folder, **kw):
    return fa.build({"model_name_or_path": folder, "dataset": "x.json", "output_dir": "unused", **kw})


def _lf_media(kw):
    return {k: kw[k] for k in lf_reference.MEDIA_DEFAULTS if k in kw}


def _lf_data(kw):
    names = ("template", "cutoff_len", "mask_history", "enable_thinking", "preserve_thinking", "default_system")
    return {k: kw[k] for k in names if k in kw}


def _compare(folder, ours, messages, system="", images=(), videos=(), **kw):
    """Our Sample for a conversation == LLaMA-Factory's ids and labels; returns both for further checks."""
    ref = lf_reference.LFReference(folder, media=_lf_media(kw), **_lf_data(kw))
    sample = data.encode(data.Record("t", messages, system, list(images), list(videos)), _args(folder, **kw), ours)
    ids, labels = ref.encode(messages[:-1], messages[-1:], system, images, videos)
    return sample, np.array(ids), np.array(labels), ref


def _exact(folder, ours, messages, system="", images=(), **kw):
    sample, ids, labels, ref = _compare(folder, ours, messages, system, images, **kw)
    assert sample is not None
    np.testing.assert_array_equal(sample.input_ids, ids)
    np.testing.assert_array_equal(sample.labels, labels)
    if images:
        mm = ref.mm_inputs(images)
        np.testing.assert_array_equal(sample.media["image_grid_thw"], mm["image_grid_thw"])
        np.testing.assert_array_equal(sample.media["pixel_values"], mm["pixel_values"])
    return sample, labels


def _multi_turn():
    return [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": SEED_COT},
            {"role": "user", "content": "And this one?<image>"}, {"role": "assistant", "content": LF_COT},
            {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}]


@pytest.mark.parametrize("template", ["glm4v", "glm4_5v"])
def test_image_sample(folder, ours, media, template):
    msgs = [{"role": "user", "content": "<image>Describe this image."}, {"role": "assistant", "content": SEED_COT}]
    sample, labels = _exact(folder, ours, msgs, images=[media["a"]], template=template)
    assert (labels != data.IGNORE).sum() > 5 and labels[-1] == ours.tokenizer.eos_token_id


@pytest.mark.parametrize("kw", [{}, {"mask_history": True}, {"enable_thinking": False}, {"enable_thinking": None},
                                {"mask_history": True, "preserve_thinking": True},
                                {"mask_history": True, "enable_thinking": False}],
                         ids=["defaults", "mask_history", "no_thinking", "thinking_null", "mask_preserve",
                              "mask_no_thinking"])
def test_multi_image_multi_turn(folder, ours, media, kw):
    sample, labels = _exact(folder, ours, _multi_turn(), SYSTEM, [media["a"], media["b"]], **kw)
    trained = labels != data.IGNORE
    if kw.get("mask_history"):   # only the last turn (+ the eos labels efficient_eos puts at turn starts)
        assert ours.decode(sample.input_ids[trained]).count("You are welcome.") == 1
        assert "circle" not in ours.decode(sample.input_ids[trained])
    else:
        assert "circle" in ours.decode(sample.input_ids[trained])


def test_system_and_text_samples(folder, ours):
    msgs = [{"role": "user", "content": "你好, hello"}, {"role": "assistant", "content": "Hi."}]
    _exact(folder, ours, msgs, SYSTEM)
    _exact(folder, ours, msgs)
    _exact(folder, ours, msgs, default_system="Default system.")
    _exact(folder, ours, [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": LF_COT}],
           enable_thinking=False)


@pytest.mark.parametrize("name, kw", [("big", {"image_max_pixels": 100 * 100}),
                                      ("small", {"image_min_pixels": 60 * 60}),
                                      ("palette", {}), ("b", {})])
def test_image_resizing(folder, ours, media, name, kw):
    """image_max_pixels / image_min_pixels, a side under 28, a palette image: the pixels LLaMA-Factory's plugin
    hands the model, exactly."""
    msgs = [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Hello."}]
    _exact(folder, ours, msgs, images=[media[name]], **kw)


def test_video_sample(folder, ours, media):
    """Equal but for the frame labels: ours are the whole seconds the model's processor writes, LLaMA-Factory 0.9.5
    writes 0 for every frame (it reads timestamps transformers 5 no longer returns). Pixels: torchvision's
    resize against PIL's, a few levels (as tests/test_processing_video.py)."""
    msgs = [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "A red box moves."}]
    sample, ids, labels, ref = _compare(folder, ours, msgs, videos=[media["clip"]], video_max_pixels=48 * 64)
    assert sample.input_ids.shape == ids.shape
    np.testing.assert_array_equal(sample.labels, labels)
    differ = np.flatnonzero(sample.input_ids != ids)
    end_of_image = ours.tokenizer.token_to_id("<|end_of_image|>")
    assert (sample.input_ids[differ - 1] == end_of_image).all()          # only frame labels differ
    labels_ours = [ours.decode([i]) for i in sample.input_ids[np.flatnonzero(sample.input_ids == end_of_image) + 1]]
    assert labels_ours == ["0", "1", "2"] and set(ours.decode(ids[differ])) <= {"0"}
    mm = ref.mm_inputs(videos=[media["clip"]])
    np.testing.assert_array_equal(sample.media["video_grid_thw"], mm["video_grid_thw"])
    diff = np.abs(sample.media["pixel_values_videos"] - mm["pixel_values_videos"])
    assert diff.max() < 0.1 and diff.mean() < 0.01


def test_cutoff(folder, ours, media):
    """Text cut by infer_seqlen as LLaMA-Factory cuts it; a cut through an image span is dropped (LLaMA-Factory
    keeps the sample with part of the span)."""
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6},
            {"role": "assistant", "content": "A cat is sitting on the table next to a cup of tea. " * 6}]
    for cutoff in (8, 31, 64):
        sample, _ = _exact(folder, ours, long, cutoff_len=cutoff)
        assert len(sample.input_ids) == cutoff
    text_turns = [{**m, "content": m["content"].replace("<image>", "")} for m in _multi_turn()]
    for mask in (False, True):   # the budget spent turn by turn (with mask_history: the last turn first)
        _exact(folder, ours, text_turns, SYSTEM, cutoff_len=40, mask_history=mask)
    msgs = [{"role": "user", "content": "<image>" + "Describe this image. " * 4},
            {"role": "assistant", "content": "Ok."}]
    sample, ids, _, _ = _compare(folder, ours, msgs, images=[media["a"]], cutoff_len=12)
    image = ours.tokenizer.token_to_id("<|image|>")
    assert sample is None and 0 < (ids == image).sum() < 12   # LLaMA-Factory kept a part of the image's tokens


def test_load_drops_and_counts(folder, ours, media, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi " * k + "<image>"},
                          {"role": "assistant", "content": "Hello."}],
             "images": [media["a"]]} for k in (1, 30)]
    rows.append({"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "Yes."}]})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    logged = []
    args = fa.build({"model_name_or_path": folder, "dataset": str(path), "output_dir": "o", "cutoff_len": 60})
    train, evaluation = data.load(args, ours, log=logged.append)
    assert len(train) == 2 and evaluation == [] and "dropped 1 of 3 train samples" in logged[0]
    assert args.template == "glm4v"   # from the checkpoint's model_type
    path.write_text(json.dumps(rows[:2]))
    args = fa.build({"model_name_or_path": folder, "dataset": str(path), "output_dir": "o", "cutoff_len": 8})
    with pytest.raises(fa.FinetuneError, match="cutoff_len: 8 cuts into the image or video tokens of every"):
        data.load(args, ours, log=logged.append)


def test_split_and_max_samples(folder, ours, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = {"model_name_or_path": folder, "dataset": str(path), "output_dir": "o"}
    train, evaluation = data.load(fa.build({**base, "val_size": 0.25}), ours, log=lambda m: None)
    assert (len(train), len(evaluation)) == (7, 3)   # ceil(0.25 * 10) as the datasets library rounds
    texts = [ours.decode(s.input_ids) for s in train]
    assert [int(t.split("q")[1][0]) for t in texts] == sorted(int(t.split("q")[1][0]) for t in texts)  # in order
    train, evaluation = data.load(fa.build({**base, "val_size": 2, "max_samples": 4}), ours, log=lambda m: None)
    assert (len(train), len(evaluation)) == (2, 2)
    with pytest.raises(fa.FinetuneError, match="val_size: 4.0 leaves no training samples of 4"):
        data.load(fa.build({**base, "val_size": 4, "max_samples": 4}), ours, log=lambda m: None)


def test_collate(folder, ours, media):
    args = _args(folder)
    a = data.encode(data.Record("a", [{"role": "user", "content": "<image>Hi"},
                                      {"role": "assistant", "content": "Hello."}], "", [media["a"]], []), args, ours)
    b = data.encode(data.Record("b", [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello there."}], "", [], []), args, ours)
    assert a._media is None and b.media == {}   # made again on each access, not held
    np.testing.assert_array_equal(a.media["pixel_values"], a.media["pixel_values"])
    batch = data.collate([b, a], pad_id=ours.tokenizer.pad_token_id)
    n = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    k = len(b.input_ids)
    np.testing.assert_array_equal(batch["input_ids"][0, :k], b.input_ids)
    assert (batch["input_ids"][0, k:] == ours.tokenizer.pad_token_id).all() and (batch["labels"][0, k:] == -100).all()
    assert batch["attention_mask"][0].sum() == k and batch["attention_mask"][1].all()
    np.testing.assert_array_equal(batch["pixel_values"], a.media["pixel_values"])
    assert "pixel_values_videos" not in batch


# --- reading a dataset as LLaMA-Factory reads it ----------------------------------------------------------------

INFO = {
    "demo": {"file_name": "demo.json", "formatting": "sharegpt",
             "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}},
    "nosys": {"file_name": "demo.json", "formatting": "sharegpt",
              "columns": {"messages": "messages", "images": "images"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
    "plain": {"file_name": "plain.json", "formatting": "sharegpt"},
    "alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                       "system": "system", "history": "history"}},
}
DEMO = [
    {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Them."}],
     "images": ["imgs/a.png"]},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]
PLAIN = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                            {"from": "gpt", "value": "A"}]}]
ALPACA = [{"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Math.", "history": [["Hi", "Hello"]]},
          {"instruction": "Say hi", "input": "", "output": "hi"}]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsdir")
    (d / "imgs").mkdir()
    drawn_image(40, 40, 9).save(d / "imgs" / "a.png")
    for name, rows in (("demo.json", DEMO), ("plain.json", PLAIN), ("alpaca.json", ALPACA)):
        (d / name).write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps(INFO))
    return str(d)


def _read(folder, dataset_dir, name):
    return data.read(fa.build({"model_name_or_path": folder, "dataset": name, "dataset_dir": dataset_dir,
                               "output_dir": "o"}))


@pytest.mark.parametrize("name", ["demo", "plain", "alpaca"])
def test_dataset_info_reading(folder, dataset_dir, name):
    ref = lf_reference.LFReference(folder).read(name, dataset_dir)
    records = _read(folder, dataset_dir, name)
    assert len(records) == len(ref)
    for r, x in zip(records, ref):
        assert r.messages == x["_prompt"] + x["_response"]
        assert r.system == (x["_system"] or "")   # a column missing from a row: None there, "" here
        assert r.images == (x["_images"] or [])


def test_dataset_info_without_system_tag(folder, dataset_dir):
    """An entry whose tags name no system_tag (LLaMA-Factory's own mllm_demo entry) reads a leading system message
    as a role out of order: LLaMA-Factory skips the sample with a warning, we name it."""
    ref = lf_reference.LFReference(folder).read("nosys", dataset_dir)
    assert ref[1]["_prompt"] == [] and ref[1]["_response"] == []
    with pytest.raises(fa.FinetuneError, match=r"demo.json sample 1: messages\[0\].role: expected 'user'.*"
                                               "got 'system'.*system_tag"):
        _read(folder, dataset_dir, "nosys")


def test_media_dir_and_dataset_paths(folder, dataset_dir, tmp_path):
    records = data.read(fa.build({"model_name_or_path": folder, "dataset": os.path.join(dataset_dir, "demo.json"),
                                  "output_dir": "o"}))   # a path: media relative to its folder, system tag read
    assert records[0].images == [os.path.join(dataset_dir, "imgs/a.png")] and records[1].system == "Be kind."
    other = tmp_path / "media"
    (other / "imgs").mkdir(parents=True)
    drawn_image(30, 30, 1).save(other / "imgs" / "a.png")
    records = data.read(fa.build({"model_name_or_path": folder, "dataset": "demo,plain", "dataset_dir": dataset_dir,
                                  "media_dir": str(other), "output_dir": "o"}))
    assert records[0].images == [str(other / "imgs" / "a.png")] and len(records) == 3


# --- keys -------------------------------------------------------------------------------------------------------

def test_keys_are_llamafactorys(folder):
    """LLAMAFACTORY_KEYS is 0.9.5's training key set; our defaults are its defaults where we share a key (but for
    the documented differences)."""
    from llamafactory.hparams.parser import _TRAIN_ARGS

    theirs = {f.name: f for c in _TRAIN_ARGS for f in dataclasses.fields(c)}
    assert fa.LLAMAFACTORY_KEYS == set(theirs)
    ours = fa.FinetuneArgs()
    differ = {"dataset": ["x"], "lora_target": ["all"], "freeze_trainable_modules": ["all"], "optim": "adamw_torch",
              "do_train": True}   # LLaMA-Factory splits "all" into ["all"] after parsing; we hold the list
    for name in fa.FIELDS:
        if name in differ or name not in theirs:
            continue
        f = theirs[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = getattr(default, "value", default)   # enums
        assert getattr(ours, name) == default, name
    assert set(fa.FIELDS) - set(theirs) == {"warmup_ratio", *fa.PARALLEL_KEYS}   # ours: generate.py's TP flags

"""generate.py end to end on the demo-tiny checkpoint, as a user runs it: a subprocess, real files."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    e = dict(os.environ, GLM4V_MS_CACHE=str(cache), GLM4V_MS_DEVICE="cpu", PYTHONPATH=ROOT)
    return e


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(d / "cat.png")
    import av
    with av.open(str(d / "clip.mp4"), "w") as out:
        s = out.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = np.full((48, 64, 3), i * 30, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return d


def cli(env, *args, stdin=None):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], env=env, input=stdin,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def stats_line(err):
    last = err.strip().splitlines()[-1]
    assert last.startswith("prompt tokens: ") and "tokens/s" in last, err
    return last


def test_image(env, media):
    rc, out, err = cli(env, "--model_name", "demo-tiny", "--image", str(media / "cat.png"), "--prompt",
                       "Describe this image.", "--max_new_tokens", "8", "--greedy")
    assert rc == 0, err
    assert "random" in err            # says plainly that the weights are random
    assert "new tokens: 8" in stats_line(err)


def test_video_and_thinking_budget(env, media):
    rc, out, err = cli(env, "--model_name", "demo-tiny", "--video", str(media / "clip.mp4"), "--prompt",
                       "What happens?", "--max_new_tokens", "10", "--max_thinking_tokens", "3", "--seed", "0")
    assert rc == 0, err
    stats_line(err)
    assert "Answer:" in out           # the budget closed the thinking and opened the answer


def test_text_only_with_system(env):
    rc, out, err = cli(env, "--model_name", "demo-tiny", "--system", "Be brief.", "--prompt", "你好, hello",
                       "--max_new_tokens", "5", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "20", "--seed", "1")
    assert rc == 0, err
    stats_line(err)


def test_chat_through_stdin(env, media):
    rc, out, err = cli(env, "--model_name", "demo-tiny", "--image", str(media / "cat.png"), "--chat",
                       "--max_new_tokens", "4", "--greedy", stdin="first question\nsecond question\n\n")
    assert rc == 0, err
    lines = [l for l in err.splitlines() if l.startswith("prompt tokens: ")]
    assert len(lines) == 2
    first, second = (int(l.split(",")[0].split(": ")[1]) for l in lines)
    assert second > first            # the second turn carries the history (and the image stays in turn one)
    # and reuses the first turn's cache for it: at least the whole first prompt
    assert "reused from the last turn" not in lines[0]
    assert int(lines[1].split("reused from the last turn: ")[1].split()[0]) >= first


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "corrupt_video", "not_a_checkpoint",
                                  "bad_flag_value", "over_context", "missing_model", "image_and_video",
                                  "bf16_on_cpu", "adapter_not_peft"])
def test_bad_input(env, media, tmp_path, case):
    base = ["--model_name", "demo-tiny", "--prompt", "hi", "--max_new_tokens", "2"]
    if case == "missing_image":
        args = base + ["--image", str(tmp_path / "nope.png")]
    elif case == "corrupt_image":
        args = base + ["--image", str(media / "broken.png")]
    elif case == "corrupt_video":
        args = base + ["--video", str(media / "broken.mp4")]
    elif case == "not_a_checkpoint":
        (tmp_path / "notes.txt").write_text("hello")
        args = ["--model_name", str(tmp_path), "--prompt", "hi"]
    elif case == "bad_flag_value":
        args = base + ["--dtype", "float8"]
    elif case == "missing_model":
        args = ["--model_name", str(tmp_path / "absent"), "--prompt", "hi"]
    elif case == "bf16_on_cpu":
        args = base + ["--dtype", "bfloat16"]
    elif case == "adapter_not_peft":   # a folder without adapter_config.json
        args = base + ["--adapter", str(tmp_path)]
    elif case == "image_and_video":
        args = base + ["--image", str(media / "cat.png"), "--video", str(media / "clip.mp4")]
    else:  # a copy of the demo checkpoint whose context is shorter than the prompt
        rc, _, err = cli(env, *base, "--greedy")          # makes sure the demo exists
        assert rc == 0, err
        small = tmp_path / "small"
        shutil.copytree(os.path.join(env["GLM4V_MS_CACHE"], "demo-tiny"), small)
        cfg = json.load(open(small / "config.json"))
        cfg["text_config"]["max_position_embeddings"] = cfg["max_position_embeddings"] = 16
        json.dump(cfg, open(small / "config.json", "w"))
        args = ["--model_name", str(small), "--image", str(media / "cat.png"), "--prompt", "hi"]
    rc, out, err = cli(env, *args)
    assert rc != 0
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if not l.startswith(("[demo-tiny", "[memory"))]
    assert len(lines) == 1 and "error" in lines[0], err


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A demo-tiny checkpoint with a 128-token context."""
    from glm4v_ms import demo
    folder = demo.build(str(tmp_path_factory.mktemp("short") / "ckpt"), "demo-tiny")
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["text_config"]["max_position_embeddings"] = cfg["max_position_embeddings"] = 128
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    return folder


@pytest.mark.parametrize("case", ["missing_image", "folder_as_image", "ftp_url", "corrupt_image", "corrupt_video",
                                  "missing_video"])
def test_media_errors_come_before_the_model_loads(env, media, tmp_path, case):
    """A bad image or video fails before the model loads (the memory plan is printed once it has loaded)."""
    arg = {"missing_image": ["--image", str(tmp_path / "nope.png")],
           "folder_as_image": ["--image", str(tmp_path)],
           "ftp_url": ["--image", "ftp://example.com/cat.png"],
           "corrupt_image": ["--image", str(media / "broken.png")],
           "corrupt_video": ["--video", str(media / "broken.mp4")],
           "missing_video": ["--video", str(tmp_path / "nope.mp4")]}[case]
    rc, out, err = cli(env, "--model_name", "demo-tiny", "--prompt", "hi", "--max_new_tokens", "2", *arg)
    assert rc == 1 and "Traceback" not in err
    assert "[memory" not in err, err
    lines = [l for l in err.strip().splitlines() if not l.startswith("[demo-tiny")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if case == "ftp_url":
        assert "ftp:// URLs are not supported" in lines[0]
    elif case.startswith("missing") or case == "folder_as_image":
        assert "not found" in lines[0]


def test_help_lists_every_demo(env):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--help"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "demo-tiny" in p.stdout and "demo-150m" in p.stdout


def test_control_characters_from_the_model_are_shown_escaped():
    import io

    from glm4v_ms import generate_cli

    class Tok:   # a tokenizer whose ids are code points
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    out = io.StringIO()
    d = generate_cli.Display(Tok(), hide_thinking=False, out=out)
    for ch in "a\x1b[2Jb\rc\td\ne\x07\x9b":
        d.put([ord(ch)])
    d.end()
    assert out.getvalue() == "a\\x1b[2Jb\\rc\td\ne\\x07\\x9b\n"


def test_chat_turn_over_the_context_says_so_and_goes_on(env, short_context):
    rc, out, err = cli(env, "--model_name", short_context, "--chat", "--max_new_tokens", "4", "--greedy",
                       stdin="word " * 300 + "\nhi\n\n")
    assert rc == 0, err
    assert "this turn does not fit" in err and "128" in err
    assert len([l for l in err.splitlines() if l.startswith("prompt tokens: ")]) == 1   # the next turn ran


def test_max_new_tokens_beyond_the_context_is_noted(env, short_context):
    rc, out, err = cli(env, "--model_name", short_context, "--prompt", "hi", "--max_new_tokens", "1000", "--greedy")
    assert rc == 0, err
    note = [l for l in err.splitlines() if l.startswith("note: max_new_tokens 1000 is cut to ")]
    assert len(note) == 1, err
    cut = int(note[0].split("cut to ")[1].split(":")[0])
    prompt = int(stats_line(err).split(",")[0].split(": ")[1])
    assert cut == 128 - prompt
    assert int(stats_line(err).split("new tokens: ")[1].split(",")[0]) <= cut


def test_convert_a_file_as_src_says_it_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    p = subprocess.run([sys.executable, "-m", "glm4v_ms.convert", "--src", str(tmp_path / "model.safetensors"),
                        "--dst", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "not a folder" in p.stderr and "no such folder" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_parity_text_file_as_reference_is_one_clear_line(tmp_path):
    (tmp_path / "ref.npz").write_text("not a dump\n")
    p = subprocess.run([sys.executable, "-m", "glm4v_ms.parity", "compare", "--model", str(tmp_path),
                        "--reference", str(tmp_path / "ref.npz")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an .npz file" in lines[0] and "pickle" not in lines[0], p.stderr


def test_demo_150m_tokenizer_covers_its_vocabulary(tmp_path):
    """demo-150m's vocabulary has 32768 ids and the tiny tokenizer 471: the rest get made-up words, so random ids
    decode to visible text (ours and transformers' tokenizer alike), and GLM's structure tokens keep their ids."""
    from transformers import AutoTokenizer

    from glm4v_ms import Glm4vProcessor, demo
    from glm4v_ms.processing import tiny
    tiny.write_all(str(tmp_path))
    vocab = demo.SIZES["demo-150m"]["text"]["vocab_size"]
    demo.cover_vocabulary(str(tmp_path), vocab)
    ours, ref = Glm4vProcessor.from_pretrained(str(tmp_path)).tokenizer, AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(ref) == vocab
    assert all(ref.convert_tokens_to_ids(t) == i for t, i in tiny.TOKEN_IDS.items())
    ids = np.random.default_rng(0).integers(tiny.VOCAB_SIZE, vocab, 40).tolist()
    text = ours.decode(ids, skip_special_tokens=True)
    assert text == ref.decode(ids, skip_special_tokens=True)
    assert len(text.split()) >= 20 and text.replace(" ", "").isalpha()   # ~80% of the words start with a space
    before = open(tmp_path / "tokenizer.json").read()
    demo.cover_vocabulary(str(tmp_path), vocab)            # idempotent: a cached demo is upgraded once
    assert open(tmp_path / "tokenizer.json").read() == before

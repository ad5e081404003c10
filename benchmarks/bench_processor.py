"""Time our processor against transformers' on the same inputs, in one run, and print the ratios.

    .venv/bin/python benchmarks/bench_processor.py [--repeats 5] [--video-seconds 30]

1. image: a drawn 3840x2160 PIL image through the image processors (ours vs transformers' PIL backend);
2. image chat: the same image as a PNG file, through apply_chat_template(tokenize=True) end to end;
3. video: a clip encoded here (H.264, 480x270, 24 fps), decoded + sampled + preprocessed from its path
   (transformers: video_utils.load_video with PyAV, then its torchvision video processor).
Times are the best of --repeats runs (video: of 2), wall clock, after one warm-up run.
"""
import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import reference  # noqa: E402,F401  (torchvision op schemas, then transformers)
from transformers import AutoProcessor  # noqa: E402
from transformers.video_utils import load_video as ref_load_video  # noqa: E402

from glm4v_ms.processing import Glm4vProcessor, tiny  # noqa: E402
from processing_fixtures import drawn_image, encode_clip  # noqa: E402


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name, ours, ref):
    print(f"{name:<34} ours {ours * 1e3:9.1f} ms   transformers {ref * 1e3:9.1f} ms   speed-up {ref / ours:5.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--video-seconds", type=float, default=30.0)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_processor_")
    model = tiny.write_all(os.path.join(tmp, "model"))  # the real checkpoint's processor settings
    ours = Glm4vProcessor.from_pretrained(model)
    ref = AutoProcessor.from_pretrained(model, use_fast=False)

    image = drawn_image(3840, 2160, seed=10)
    report("image 3840x2160 (image processor)",
           best_of(lambda: ours.image_processor([image]), args.repeats),
           best_of(lambda: ref.image_processor(images=[image], return_tensors="np"), args.repeats))

    png = os.path.join(tmp, "4k.png")
    image.save(png)
    chat = [{"role": "user", "content": [{"type": "image", "path": png}, {"type": "text", "text": "Describe."}]}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    report("image 3840x2160 PNG (chat, e2e)",
           best_of(lambda: ours.apply_chat_template(chat, **kw), args.repeats),
           best_of(lambda: ref.apply_chat_template(chat, return_tensors="np", **kw), args.repeats))

    clip = encode_clip(os.path.join(tmp, "clip.mp4"), args.video_seconds, Fraction(24), (480, 270))
    vchat = [{"role": "user", "content": [{"type": "video", "path": clip}, {"type": "text", "text": "Describe."}]}]
    prompt = ours.apply_chat_template(vchat, add_generation_prompt=True)

    def ref_video():
        frames, meta = ref_load_video(clip, backend="pyav")
        return ref(text=prompt, videos=[frames], video_metadata=[meta], do_sample_frames=True, return_tensors="np")

    out = ours.apply_chat_template(vchat, **kw)
    report(f"video {args.video_seconds:.0f} s 480x270 24 fps (e2e)",
           best_of(lambda: ours.apply_chat_template(vchat, **kw), 2), best_of(ref_video, 2))
    print(f"video grid {out['video_grid_thw'].tolist()}, {out['input_ids'].shape[1]} tokens")


if __name__ == "__main__":
    main()

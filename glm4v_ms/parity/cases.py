"""The chats the harness runs: four built-in ones drawn on the spot, or the user's own from a JSON file.

Built-in (no download; media drawn with a fixed seed, so every host makes the same files):
  text            a two-turn text chat
  one_image       one 140x112 picture
  several_images  three pictures of different sizes and aspect ratios in one turn
  video           a 2 s, 4 fps clip with a moving square

A cases file is a JSON list; each entry is a chat (a list of messages) or {"name": ..., "messages": [...]}.
Media items are {"type": "image", "path": "a.jpg"} / {"type": "video", "path": "b.mp4"} ("image"/"video"/"url"
may hold the path instead); relative paths are read from the file's folder. Only this module's chats are encoded:
the reference processor turns them into token ids and pixels, and the dump keeps those, so the MindSpore side
never needs the media. An image and a video cannot share a chat (the reference model rejects the mix).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from . import ParityError

BUILTIN = ("text", "one_image", "several_images", "video")


@dataclass
class Case:
    name: str
    messages: list
    images: list = field(default_factory=list)   # absolute paths, in order of appearance
    videos: list = field(default_factory=list)


def picture(width, height, seed=0):
    """Gradient + noise + a few shapes: busy enough that a wrong resize or patch order shows (also the benchmarks'
    picture)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    im = Image.fromarray(np.clip(base + rng.integers(-32, 32, (height, width, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle([x0, y0, x0 + width // 4, y0 + height // 4], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw.ellipse([width // 3, height // 3, 2 * width // 3, 2 * height // 3], outline=(255, 255, 0), width=2)
    return im


def _clip(path, seconds=2.0, fps=4, size=(112, 84), seed=0):
    import av
    from PIL import ImageDraw

    w, h = size
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            im = picture(w, h, seed)
            x = (i * 12) % (w - 16)
            ImageDraw.Draw(im).rectangle([x, 10, x + 16, 26], fill=(255, 0, 0))
            for packet in stream.encode(av.VideoFrame.from_image(im)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _user(*items):
    return {"role": "user", "content": list(items)}


def _text(s):
    return {"type": "text", "text": s}


def builtin(workdir, names=BUILTIN):
    """The built-in cases, their media written into workdir."""
    os.makedirs(workdir, exist_ok=True)
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise ParityError(f"unknown built-in case {unknown[0]!r} (have {', '.join(BUILTIN)})")
    cases = []
    for name in names:
        if name == "text":
            messages = [_user(_text("Name three colours of the sky.")),
                        {"role": "assistant", "content": "Blue, grey and orange at sunset."},
                        _user(_text("Why is it blue? 请简单回答。"))]
        elif name == "one_image":
            path = os.path.join(workdir, "one_image.png")
            picture(140, 112, seed=1).save(path)
            messages = [_user({"type": "image", "path": path}, _text("Describe this image."))]
        elif name == "several_images":
            paths = []
            for k, (w, h) in enumerate(((84, 168), (196, 112), (60, 60))):
                paths.append(os.path.join(workdir, f"several_images_{k}.png"))
                picture(w, h, seed=10 + k).save(paths[-1])
            messages = [_user(*[{"type": "image", "path": p} for p in paths],
                              _text("What differs between these pictures?"))]
        else:
            path = _clip(os.path.join(workdir, "video.mp4"), seed=3)
            messages = [_user({"type": "video", "path": path}, _text("What moves in this video?"))]
        cases.append(_with_media(name, messages))
    return cases


def _with_media(name, messages):
    case = Case(name, messages)
    for m in messages:
        if isinstance(m.get("content"), list):
            for item in m["content"]:
                if item.get("type") in ("image", "video"):
                    (case.images if item["type"] == "image" else case.videos).append(item["path"])
    if case.images and case.videos:
        raise ParityError(f"case {name!r} holds both an image and a video; the reference takes one or the other")
    return case


def load_file(path):
    """A JSON cases file -> cases, media paths made absolute and checked."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except OSError as e:
        raise ParityError(f"cannot read cases file {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ParityError(f"cases file {path} is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ParityError(f"cases file {path} must hold a non-empty JSON list of chats")
    base = os.path.dirname(os.path.abspath(path))
    cases = []
    for k, entry in enumerate(entries):
        name, messages = f"case{k}", entry
        if isinstance(entry, dict):
            name, messages = str(entry.get("name", name)), entry.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ParityError(f"cases file {path}: entry {k} is not a chat (a list of messages)")
        out = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), list):
                m["content"] = [_resolve(item, base, path, k) for item in m["content"]]
            out.append(m)
        cases.append(_with_media(name, out))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ParityError(f"cases file {path}: case names repeat")
    return cases


def _resolve(item, base, file, k):
    if not isinstance(item, dict):
        raise ParityError(f"cases file {file}: entry {k} has a content item that is not an object")
    kind = item.get("type")
    if kind not in ("image", "video"):
        return item
    source = next((item[key] for key in ("path", kind, "url") if isinstance(item.get(key), str)), None)
    if source is None:
        raise ParityError(f"cases file {file}: entry {k} has a {kind} item without a path")
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" in source:
        raise ParityError(f"cases file {file}: entry {k}: only local media paths are supported, got {source}")
    source = os.path.join(base, os.path.expanduser(source))
    if not os.path.isfile(source):
        raise ParityError(f"cases file {file}: entry {k}: no such {kind} file {source}")
    return {"type": kind, "path": source}

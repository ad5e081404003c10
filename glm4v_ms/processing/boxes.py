"""Grounding boxes: GLM-V answers `<|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|>` in coordinates relative to the
image, scaled to 0-1000 on each axis (not pixels of the resized image the model saw: users keep misreading them,
GLM-V issues). Here they become pixel boxes of the original image, and can be drawn on it.

One marker may hold one box `[x1,y1,x2,y2]` or several `[[x1,y1,x2,y2],[...]]`; numbers may be decimals.
"""
from __future__ import annotations

import re

BEGIN_BOX, END_BOX = "<|begin_of_box|>", "<|end_of_box|>"
_MARKED = re.compile(re.escape(BEGIN_BOX) + r"(.*?)" + re.escape(END_BOX), re.S)
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_FOUR = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
SCALE = 1000.0


def parse_boxes(text: str, width: int | None = None, height: int | None = None) -> list:
    """Every box in `text` -> [{"box": [x1, y1, x2, y2] in pixels of a width x height image (rounded, clipped,
    ordered so x1 <= x2 and y1 <= y2), "relative": the 0-1000 numbers as written}]. Without a size, "box"
    is left out."""
    out = []
    for marked in _MARKED.finditer(text):
        for four in _FOUR.finditer(marked.group(1)):
            rel = [float(v) for v in four.groups()]
            item = {"relative": [int(v) if v.is_integer() else v for v in rel]}
            if width and height:
                xs = sorted(min(max(v, 0.0), SCALE) * width / SCALE for v in rel[0::2])
                ys = sorted(min(max(v, 0.0), SCALE) * height / SCALE for v in rel[1::2])
                item["box"] = [round(xs[0]), round(ys[0]), round(xs[1]), round(ys[1])]
            out.append(item)
    return out


def strip_box_tags(text: str) -> str:
    """The text with the box markers removed and their coordinates kept (what skip_special_tokens gives)."""
    return text.replace(BEGIN_BOX, "").replace(END_BOX, "")


def draw_boxes(image, boxes: list, color=(255, 0, 0), width: int | None = None):
    """A copy of the PIL image with each box (pixel "box" entries from parse_boxes) outlined."""
    from PIL import ImageDraw
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    w = width or max(2, round(min(im.size) / 150))
    for b in boxes:
        if "box" in b:
            d.rectangle(b["box"], outline=color, width=w)
    return im

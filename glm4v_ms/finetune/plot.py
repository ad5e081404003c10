"""training_loss.png with plot_loss, drawn with Pillow (matplotlib is not a dependency): LLaMA-Factory's figure
(extras/ploting.py): the logged losses ("original") and their exponential moving average ("smoothed", its weight
1.8 * (sigmoid(0.05 n) - 0.5)), step on x, loss on y, titled "training loss of <output_dir>"."""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw


def smooth(scalars: list) -> list:
    if not scalars:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(scalars))) - 0.5)
    last, out = scalars[0], []
    for v in scalars:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def plot_loss(folder: str, losses: list, steps: list, name: str = "training_loss.png") -> str | None:
    if not losses:
        return None
    W, H, l, r, t, b = 640, 480, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, x1 = min(steps), max(steps)
    lo, hi = min(losses), max(losses)
    if hi == lo:
        hi, lo = hi + 0.5, lo - 0.5
    if x1 == x0:
        x1 = x0 + 1

    def xy(s, v):
        return l + (s - x0) / (x1 - x0) * (W - l - r), t + (hi - v) / (hi - lo) * (H - t - b)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for k in range(5):   # ticks and labels
        v = lo + (hi - lo) * k / 4
        y = xy(x0, v)[1]
        d.line([l - 4, y, l, y], fill="black")
        d.text((5, y - 6), f"{v:.3g}", fill="black")
        s = x0 + (x1 - x0) * k / 4
        x = xy(s, lo)[0]
        d.line([x, H - b, x, H - b + 4], fill="black")
        d.text((x - 10, H - b + 8), f"{s:.0f}", fill="black")
    if len(losses) > 1:
        d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(31, 119, 180), width=1)
        d.line([xy(s, v) for s, v in zip(steps, smooth(losses))], fill=(255, 127, 14), width=2)
    else:
        x, y = xy(steps[0], losses[0])
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    d.text((l, 12), f"training loss of {folder}", fill="black")
    d.text((W // 2 - 10, H - 18), "step", fill="black")
    d.text((W - r - 150, t + 8), "original (blue), smoothed (orange)", fill="black")
    path = os.path.join(folder, name)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path

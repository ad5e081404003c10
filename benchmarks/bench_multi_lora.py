"""What serving adapters costs a decode step: the base alone, one adapter loaded (model.load_adapter), and the
server's bank of two slots of rank --rank (glm4v_ms.multi_lora: --max-loras 2) holding two adapters, with every row
the base's and with the rows mixed (base, first, second, ...).

    python benchmarks/bench_multi_lora.py [--model demo-150m] [--rows 4] [--rank 16] [--steps 60] [--rounds 3]

Two random adapters (rank --rank on every text linear, B nonzero) are written in PEFT's format into a temporary
folder; the three setups alternate for --rounds rounds, each timing --steps decode steps of --rows rows (the first
10 not counted) over a 1024-slot cache; the best and the median step are printed per setup (the best is the least
disturbed by other work on the machine).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo-150m")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    from mindspore import Tensor

    from glm4v_ms import AutoModelForImageTextToText, multi_lora
    from glm4v_ms.batch import Batch, select
    from glm4v_ms.faces import resolve_model
    from glm4v_ms.finetune import adapter, lora
    from glm4v_ms.steps import decode_one
    folder = resolve_model(a.model)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    mods, rng, tmp = lora.select(model, "all"), np.random.default_rng(0), tempfile.mkdtemp()
    paths = []
    for k in range(2):
        for lo in lora.inject(model, mods, a.rank, 2.0 * a.rank, seed=k):
            for b in lo.B:
                b.set_data(Tensor(0.01 * rng.standard_normal(b.shape).astype(np.float32)))
        paths.append(os.path.join(tmp, f"a{k}"))
        adapter.save(model, paths[-1], adapter.config_dict(a.rank, 2.0 * a.rank, 0.0, False, mods, folder))
        lora.remove(model)

    def steps(mix):
        g = Batch.empty(model, a.rows, 1024)
        g.warmup()
        ts = []
        for _ in range(a.steps):
            select(model, mix)
            t = time.perf_counter()
            decode_one(model, g.st, np.zeros(a.rows, np.int64))
            ts.append(time.perf_counter() - t)
            g.st.slot[:] = 5
        return ts[10:]

    got = {"base": [], "one adapter (load_adapter)": [], "bank of 2, base rows only": [], "bank of 2, rows mixed": []}
    for _ in range(a.rounds):
        got["base"] += steps([0] * a.rows)
        model.load_adapter(paths[0])
        got["one adapter (load_adapter)"] += steps([0] * a.rows)
        lora.remove(model)
        multi_lora.install(model, [("a0", paths[0]), ("a1", paths[1])], a.rows, max_loras=2, max_rank=a.rank)
        got["bank of 2, base rows only"] += steps([0] * a.rows)
        got["bank of 2, rows mixed"] += steps(([0, 1, 2] * a.rows)[:a.rows])
        multi_lora.uninstall(model)
    for k, ts in got.items():
        print(f"{a.model}, {a.rows} rows, rank {a.rank} on every text linear: {k}: best {min(ts) * 1e3:.1f} ms, "
              f"median {np.median(ts) * 1e3:.1f} ms per step")


if __name__ == "__main__":
    main()

"""Comparison side: this port (MindSpore) on the dump's inputs, state by state against the reference. Never torch."""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from . import ParityError
from . import report


def load_model(folder, dtype=None, device=None):
    from ..config import ConfigError
    from ..model import AutoModelForImageTextToText
    from ..safetensors_io import WeightError

    if not os.path.isdir(folder):
        raise ParityError(f"model folder not found: {folder}")
    try:
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device=device)   # GLM-4.1V or 4.5V
    except (ConfigError, WeightError) as e:
        raise ParityError(str(e).splitlines()[0]) from None
    except ValueError as e:   # unknown dtype / device
        raise ParityError(str(e).splitlines()[0]) from None


def ours_meta(model, folder):
    import mindspore as ms

    from .. import __version__
    from ..device import select_device

    return {"side": "ours (glm4v_ms)", "model": os.path.abspath(folder), "device": select_device(),
            "dtype": report.dtype_name(str(model.dtype).split(".")[-1].lower()),
            "versions": {"python": platform.python_version(), "mindspore": ms.__version__, "glm4v_ms": __version__,
                         "numpy": np.__version__},
            "host": platform.platform()}


def compare_cases(model, folder, ref_meta, ref_cases, overrides=None, report_path=None, print_fn=print):
    """Run the port on each case's inputs, print one table per case and the verdict; -> True when all pass."""
    meta = ours_meta(model, folder)
    label, tol = report.tolerance(ref_meta["dtype"], meta["dtype"], **(overrides or {}))
    print_fn(f"reference: {ref_meta.get('model')} on {ref_meta.get('device')}, {ref_meta.get('dtype')}, "
             f"transformers {ref_meta.get('versions', {}).get('transformers')}")
    print_fn(f"ours:      {meta['model']} on {meta['device']}, {meta['dtype']}, "
             f"mindspore {meta['versions']['mindspore']}")
    print_fn(f"tolerance: {label}: {report.describe(tol)}\n")
    results = []
    for case in ref_cases:
        t0 = time.time()
        try:
            ours = model.trace(**case["inputs"])
        except ValueError as e:
            raise ParityError(f"case {case['name']!r}: ours failed on the reference inputs: "
                              f"{str(e).splitlines()[0]}") from None
        mask = case["inputs"].get("attention_mask")
        mask = None if mask is None else np.asarray(mask).astype(bool)
        res = report.compare_case(case["name"], case["states"], ours, tol, mask)
        res["tokens"] = int(case["inputs"]["input_ids"].shape[-1])
        res["seconds"] = round(time.time() - t0, 2)
        results.append(res)
        print_fn(report.table(res) + "\n")
    print_fn(report.summary(results, label, tol))
    if report_path:
        report.write_json(report_path, results, label, tol, ref_meta, meta)
        print_fn(f"report: {report_path}")
    return all(r["pass"] for r in results)


def compare(model_dir, reference_path, dtype=None, device=None, overrides=None, report_path=None, print_fn=print):
    """The `compare` command."""
    from . import dumpfile

    ref_meta, ref_cases = dumpfile.load(reference_path)
    model = load_model(model_dir, dtype, device)
    return compare_cases(model, model_dir, ref_meta, ref_cases, overrides, report_path, print_fn)

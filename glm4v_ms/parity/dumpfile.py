"""The dump: one portable .npz (no pickles) holding, per case, the model inputs and the reference's states.

Keys: "meta" (a JSON string: format, versions, device, dtype, model, and per case its name, input keys and the
state names in forward order), "{k}/inputs/{name}" and "{k}/states/{name}" for case k. States are float32
whatever dtype the reference ran in (NumPy has no bfloat16; bf16 -> fp32 is exact).
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from . import ParityError

FORMAT = "glm4v-ms-parity/1"


def save(path, meta, cases):
    """cases: [{"name", "inputs": {key: array}, "states": {name: array} in forward order}]."""
    meta = dict(meta, format=FORMAT, cases=[
        {"name": c["name"], "inputs": list(c["inputs"]), "states": list(c["states"]), **c.get("info", {})}
        for c in cases])
    arrays = {"meta": np.array(json.dumps(meta))}
    for k, c in enumerate(cases):
        arrays.update({f"{k}/inputs/{n}": np.asarray(a) for n, a in c["inputs"].items()})
        arrays.update({f"{k}/states/{n}": np.asarray(a, np.float32) for n, a in c["states"].items()})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:   # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load(path):
    """-> (meta, cases) as save() takes them; any unreadable or foreign file is a ParityError."""
    if not os.path.isfile(path):
        raise ParityError(f"reference dump not found: {path}")
    if not zipfile.is_zipfile(path):   # else numpy guesses a pickle and says so
        raise ParityError(f"cannot read reference dump {path}: not an .npz file (write one with `dump` or "
                          f"`run --out`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise ParityError(f"{path} is not a parity dump (no metadata)")
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ParityError(f"{path}: dump format {meta.get('format')!r}, this harness reads {FORMAT!r}")
            cases = []
            for k, c in enumerate(meta["cases"]):
                cases.append({"name": c["name"],
                              "inputs": {n: z[f"{k}/inputs/{n}"] for n in c["inputs"]},
                              "states": {n: z[f"{k}/states/{n}"] for n in c["states"]}})
    except ParityError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ParityError(f"cannot read reference dump {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    return meta, cases

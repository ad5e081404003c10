"""Metrics, tolerances and the printed/JSON report (NumPy only).

Per state: max |diff|, relative diff = max |diff| / max |ref|, and cosine over the whole tensor (text states and
logits over real tokens only). Logits add top-1 agreement, top-5 overlap and KL(ref || ours) (mean over tokens).
A state passes when rel <= rtol and cosine >= min_cos; the logits must also meet min_top1 and max_kl. Top-5 is
reported, not gated.
"""
from __future__ import annotations

import json
import re

import numpy as np

# Keyed by the less precise dtype of the pair. fp32: the port does the reference's math, so what is left is
# summation order (measured on tiny random checkpoints: rel <= 2e-5, KL <= 1e-10). Half precision: one rounding
# per op, compounded over the layers; measured there with torch in half precision against MindSpore fp32:
# bf16 rel up to 0.18, cosine >= 0.996, top-1 >= 0.875, KL <= 1e-2; fp16 rel up to 0.016, top-1 >= 0.978.
# Random tiny models have flat next-token distributions, so top-1 flips more than on a trained model.
TOLERANCES = {
    "float32": dict(rtol=1e-4, min_cos=0.99999, min_top1=1.0, max_kl=1e-5),
    "float16": dict(rtol=4e-2, min_cos=0.999, min_top1=0.9, max_kl=5e-3),
    "bfloat16": dict(rtol=2.5e-1, min_cos=0.99, min_top1=0.8, max_kl=5e-2),
}
_LOOSENESS = ["float32", "float16", "bfloat16"]
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}


def dtype_name(d):
    name = DTYPE_NAMES.get(str(d).lower().replace("torch.", "").replace("mindspore.", ""))
    if name is None:
        raise ValueError(f"unknown dtype {d!r} (use float32, bfloat16 or float16)")
    return name


def tolerance(ref_dtype, our_dtype, **overrides):
    """-> (label, dict) for this dtype pair, with any non-None override applied."""
    ref_dtype, our_dtype = dtype_name(ref_dtype), dtype_name(our_dtype)
    key = max(ref_dtype, our_dtype, key=_LOOSENESS.index)
    tol = dict(TOLERANCES[key])
    changed = {k: v for k, v in overrides.items() if v is not None}
    tol.update(changed)
    label = f"{ref_dtype} reference vs {our_dtype} ours: {key} tolerance" + (" (overridden)" if changed else "")
    return label, tol


def describe(tol):
    return (f"rel <= {tol['rtol']:.2g}, cosine >= {tol['min_cos']}, logits top-1 >= {tol['min_top1']:.3f}, "
            f"KL <= {tol['max_kl']:.2g}")


def _order_key(name):
    """Forward order: image/video tower (blocks, then merger), text layers, final norm, logits."""
    section = 0 if name.startswith("image.") else 1 if name.startswith("video.") else 2 if name.startswith("text.") \
        else 3
    return (section, "merger" in name or "norm" == name.rsplit(".", 1)[-1],
            [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def forward_order(names):
    return sorted(names, key=_order_key)


def _tokens(x, mask):
    """Text states and logits (B, L, ...) -> (real tokens, ...); vision states as they are."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        return x[mask]
    return x


def state_metrics(ref, ours, mask=None, logits=False):
    if ref.shape != ours.shape:
        return {"shape": list(ref.shape), "error": f"shape {list(ours.shape)} vs reference {list(ref.shape)}"}
    r = _tokens(np.asarray(ref, np.float64), mask)
    o = _tokens(np.asarray(ours, np.float64), mask)
    if not (np.isfinite(o).all() and np.isfinite(r).all()):
        return {"shape": list(ref.shape), "error": "non-finite values"}
    diff = np.abs(o - r).max() if r.size else 0.0
    ref_max = np.abs(r).max() if r.size else 0.0
    denom = np.linalg.norm(r) * np.linalg.norm(o)
    m = {"shape": list(ref.shape), "max_abs": float(diff), "rel": float(diff / ref_max) if ref_max else float(diff),
         "cos": float((r * o).sum() / denom) if denom else float(diff == 0)}
    if logits:
        r2, o2 = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
        m["top1"] = float((r2.argmax(-1) == o2.argmax(-1)).mean())
        k = min(5, r2.shape[-1])
        top_r = np.argpartition(-r2, k - 1, -1)[:, :k]
        top_o = np.argpartition(-o2, k - 1, -1)[:, :k]
        m["top5"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_r, top_o)]))
        lp_r = r2 - r2.max(-1, keepdims=True)
        lp_r -= np.log(np.exp(lp_r).sum(-1, keepdims=True))
        lp_o = o2 - o2.max(-1, keepdims=True)
        lp_o -= np.log(np.exp(lp_o).sum(-1, keepdims=True))
        m["kl"] = float(max((np.exp(lp_r) * (lp_r - lp_o)).sum(-1).mean(), 0.0))
    return m


def check(m, tol):
    """-> None when within tolerance, else why not (one phrase)."""
    if "error" in m:
        return m["error"]
    if not m["rel"] <= tol["rtol"]:
        return f"rel {m['rel']:.2e} > {tol['rtol']:.2g}"
    if not m["cos"] >= tol["min_cos"]:
        return f"cosine {m['cos']:.6f} < {tol['min_cos']}"
    if "top1" in m and not m["top1"] >= tol["min_top1"]:
        return f"top-1 {m['top1']:.3f} < {tol['min_top1']:.3f}"
    if "kl" in m and not m["kl"] <= tol["max_kl"]:
        return f"KL {m['kl']:.2e} > {tol['max_kl']:.2g}"
    return None


def compare_case(name, ref_states, our_states, tol, mask=None):
    """One case -> {"name", "pass", "first_failure", "why", "rows": [...]} in forward order."""
    rows, first, why = [], None, None
    for state in forward_order(ref_states):
        if state not in our_states:
            m = {"shape": list(ref_states[state].shape), "error": "not produced by ours"}
        else:
            m = state_metrics(ref_states[state], our_states[state], mask, logits=state == "logits")
        fail = check(m, tol)
        rows.append({"state": state, **m, "ok": fail is None, **({"why": fail} if fail else {})})
        if fail and first is None:
            first, why = state, fail
    return {"name": name, "pass": first is None, "first_failure": first, "why": why, "rows": rows}


def _g(x, fmt):
    return "" if x is None else format(x, fmt)


def table(case):
    head = f"{'state':<28}{'shape':<18}{'max|diff|':>11}{'rel diff':>11}{'cosine':>13}{'top-1':>8}{'top-5':>8}" \
           f"{'KL':>10}  status"
    lines = [f"case {case['name']}", head, "-" * len(head)]
    for r in case["rows"]:
        shape = "x".join(str(s) for s in r["shape"])
        if "error" in r:
            lines.append(f"{r['state']:<28}{shape:<18}  {r['error']:<69}FAIL")
            continue
        lines.append(f"{r['state']:<28}{shape:<18}{_g(r['max_abs'], '11.3e')}{_g(r['rel'], '11.3e')}"
                     f"{_g(r['cos'], '13.8f')}{_g(r.get('top1'), '8.3f'):>8}{_g(r.get('top5'), '8.3f'):>8}"
                     f"{_g(r.get('kl'), '10.2e'):>10}  {'ok' if r['ok'] else 'FAIL'}")
    if case["pass"]:
        lines.append("all states within tolerance")
    else:
        lines.append(f"first beyond tolerance: {case['first_failure']} ({case['why']})")
    return "\n".join(lines)


def summary(results, label, tol):
    failed = [c["name"] for c in results if not c["pass"]]
    verdict = "PASS" if not failed else f"FAIL ({len(failed)} of {len(results)} cases: {', '.join(failed)})"
    return f"tolerance: {label}\n           {describe(tol)}\nresult: {verdict}"


def write_json(path, results, label, tol, reference_meta, ours_meta):
    doc = {"pass": all(c["pass"] for c in results), "tolerance": {"label": label, **tol},
           "reference": {k: v for k, v in reference_meta.items() if k != "cases"}, "ours": ours_meta,
           "cases": results}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

"""The device, the dtype and the kernel mode of this process: chosen once, before any op runs.

Ascend when present, else CPU (`device=` or GLM4V_MS_DEVICE overrides); bfloat16 on Ascend, float32 on CPU. The
kernel mode follows the device: "ascend" (the fused kernels), "plain" on CPU, or "emulated" on CPU with
GLM4V_MS_KERNELS=emulated (the Ascend code path through emulations of the fused kernels). attention.py holds
the mode; this module decides it.
"""
from __future__ import annotations

import os

import mindspore as ms

from . import attention

_DTYPES = {"float32": ms.float32, "fp32": ms.float32, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
           "float16": ms.float16, "fp16": ms.float16}
NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}
ITEM_BYTES = {ms.float32: 4, ms.float16: 2, ms.bfloat16: 2}
_device = None


def _ascend_present() -> bool:
    # probe MindSpore only where a CANN runtime is installed: on a CPU host its probe prints a library error
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME") or os.path.isdir("/usr/local/Ascend")):
        return False
    return ms.hal.is_available("Ascend")


def _start(want: str):
    """Point MindSpore at `want` (once per process) and set the kernel mode that goes with it."""
    try:
        ms.set_device(want)
        if want == "CPU":
            ms.device_context.cpu.op_tuning.threads_num(os.cpu_count() or 1)
            # eager ops (the vision tower, the embedding) launch synchronously: MindSpore's async launch
            # queue costs more than it overlaps on CPU (vision tower of the benchmark image: 0.55-0.65 s
            # blocking against 0.9-1.5 s queued; BENCHMARKS.md, issue 14)
            ms.runtime.launch_blocking()
    except RuntimeError:
        # ops already ran (MindSpore's default device is CPU): keep it if that is what was asked for
        if ms.get_context("device_target") != want:
            raise ValueError(f"MindSpore already runs on {ms.get_context('device_target')}; "
                             f"select the device before running any op") from None
    if want == "CPU":
        attention.set_mode("emulated" if os.environ.get("GLM4V_MS_KERNELS") == "emulated" else "plain")
    else:
        attention.set_mode("ascend")


def select_device(device: str | None = None) -> str:
    """Ascend when present, else CPU; `device=` or GLM4V_MS_DEVICE overrides. Fixed for the process."""
    global _device
    want = (device or os.environ.get("GLM4V_MS_DEVICE") or "auto").strip()
    if want.lower() == "auto":
        want = "Ascend" if _ascend_present() else "CPU"
    want = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}.get(want.lower())
    if want is None:
        raise ValueError(f"unknown device {device or os.environ.get('GLM4V_MS_DEVICE')!r} (use cpu, ascend or auto)")
    if _device is None:
        if want == "Ascend" and not _ascend_present():
            raise ValueError("device Ascend requested but no Ascend NPU / CANN runtime is available")
        _start(want)
        _device = want
    elif want != _device:
        raise ValueError(f"this process already runs on {_device}; MindSpore cannot switch to {want}")
    return _device


def resolve_dtype(dtype, device: str):
    if dtype is None:
        return ms.bfloat16 if device == "Ascend" else ms.float32   # bf16 has no CPU kernels
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        dtype = _DTYPES[dtype.lower()]
    if dtype == ms.bfloat16 and device == "CPU":
        raise ValueError("bfloat16 has no CPU kernels in MindSpore; on CPU use float32 (the default) or float16")
    return dtype


def kernel_mode() -> str:
    """"plain", "emulated" or "ascend" (attention.py's, set by select_device)."""
    return attention.mode()

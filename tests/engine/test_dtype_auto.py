"""`--dtype auto` on CPU: bf16 where the CPU has AMX or AVX512-BF16, fp32 elsewhere; explicit dtypes win."""

from __future__ import annotations

import torch

from softserve import model_loader
from softserve.model_loader import resolve_dtype

CPU = torch.device("cpu")


def test_auto_is_bf16_only_on_cpus_with_fast_bf16(monkeypatch):
    monkeypatch.setattr(model_loader, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == torch.float32  # the fp32 path stays one flag away
    monkeypatch.setattr(model_loader, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_fast_bf16_detection_agrees_with_the_kernel_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return  # not Linux: only the torch probes decide
    assert model_loader.cpu_has_fast_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)

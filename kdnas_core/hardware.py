"""Where students train and in which precision: ``distill.device`` and ``distill.precision``
resolved for this machine. Imports torch only, so the config can key "auto" by what it means here."""

from __future__ import annotations

import torch

from kdnas_core.errors import KdnasError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise KdnasError("distill.device = 'cuda' but torch sees no GPU (use 'auto' or 'cpu')")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively, so bf16 autocast is faster than fp32 there
    (on a CPU without AVX512-BF16 or AMX it is emulated and many times slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def precision_name(precision: str, device: str) -> str:
    """``distill.precision`` with "auto" resolved for ``distill.device`` on this machine: "bf16"
    or "fp32"."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(resolve_device(device)) else "fp32"

"""Device, dtype and seed handling shared by every command.

Code never calls ``.cuda()``: it asks ``resolve_device`` and moves tensors with ``.to(device)``.
"""

from __future__ import annotations

import torch

from blindsr.errors import BlindSRError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BlindSRError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BlindSRError("--device mps: MPS is not available on this machine (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as e:  # e.g. "--device gpu"
        raise BlindSRError(f"--device {name}: not a device (choose auto, cpu, cuda, cuda:N or mps)") from e


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """fp32 by default; fp16 on CPU is refused (most CPU kernels lack it)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.float32
    try:
        dtype = DTYPES[name.lower()]
    except KeyError:
        raise BlindSRError(f"--dtype {name}: choose one of fp32, bf16, fp16") from None
    if dtype == torch.float16 and device is not None and device.type == "cpu":
        raise BlindSRError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
    return dtype


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g

"""Device, dtype and seed handling shared by every command.

Code never calls ``.cuda()``: it asks ``resolve_device`` and moves tensors with ``.to(device)``.
"""

from __future__ import annotations

import contextlib

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


GIB = 1024**3
DEFAULT_MAX_MEMORY = 3 * GIB  # the CLI's ceiling for --max-memory auto


def available_memory(device: torch.device) -> int:
    """Bytes this process may still use: free VRAM on CUDA, MemAvailable (Linux) on the CPU; 0 if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_memory() -> int:
    """Bytes this process holds now (RSS on Linux; 0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA's allocator peak on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_budget(spec: str | float | None, device: torch.device) -> int | None:
    """``--max-memory``: ``auto`` (min(3 GiB, 75% of what is available); on CUDA 75% of free VRAM), a number
    of GiB, or ``none``/None (no automatic tiling). Returns bytes or None (also when CUDA reports nothing free)."""
    import math

    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str) and spec.lower() == "auto":
        avail = available_memory(device)
        if device.type == "cuda":
            return int(0.75 * avail) if avail else None
        return int(min(DEFAULT_MAX_MEMORY, 0.75 * avail)) if avail else DEFAULT_MAX_MEMORY
    try:
        gib = float(spec)
    except ValueError:
        raise BlindSRError(f"--max-memory {spec!r}: give a number of GiB, 'auto' or 'none'") from None
    if not math.isfinite(gib) or gib < 1 / 64:
        raise BlindSRError(f"--max-memory {spec!r}: give a finite number of GiB, at least 1/64")
    return int(gib * GIB)


def sampling_budget(spec: str | float | None, device: torch.device) -> int | None:
    """What sampling may use on top of what the process already holds: :func:`memory_budget` less, on the CPU,
    the resident memory now (call it once, after loading the model, so that a tile depends only on the image
    size and the budget, never on earlier images)."""
    budget = memory_budget(spec, device)
    if budget is not None and device.type == "cpu":
        budget -= resident_memory()
    return budget


def check_compiler(device: torch.device) -> None:
    """What ``--compile`` (torch inductor) needs: Triton on CUDA; on the CPU a C++ compiler on PATH (``CXX``, else
    c++ / g++ / clang++) and Python's C headers where inductor looks for them (``sysconfig``'s include folder).
    A one-line error instead of inductor's traceback at the first step."""
    import os
    import shutil
    import sysconfig
    from pathlib import Path

    if device.type == "cuda":  # inductor's GPU kernels are Triton kernels
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise BlindSRError("--compile on CUDA needs Triton (pip install triton); drop --compile without it")
        return
    if device.type != "cpu":
        return
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if not any(shutil.which(n) for n in names):
        raise BlindSRError(f"--compile on the CPU needs a C++ compiler ({' / '.join(names)}) on PATH; "
                           "install one (e.g. apt-get install g++) or drop --compile")
    headers = Path(sysconfig.get_path("include")) / "Python.h"
    if not headers.is_file():
        raise BlindSRError(f"--compile on the CPU needs Python's C headers ({headers} is missing); install them "
                           "(e.g. apt-get install python3-dev) or drop --compile")


def keep_freed_memory(on: bool = True) -> bool:
    """Have glibc serve every allocation from its heap and keep freed memory for reuse (``mallopt``), on Linux;
    ``on=False`` restores glibc's mmap for large blocks and returns the free heap to the kernel (``malloc_trim``).

    glibc maps each block over 32 MiB afresh from the kernel and unmaps it on free, so on CPU every large
    activation (a 256² map of 128 channels is 32 MiB) is page-faulted and zeroed again at every step: about a
    fifth of a guided BlindDiff step's CPU time at 256² outputs, one thread (docs/results.md, "blindsr vs the
    official BlindDiff code"). With mmap off and a 1 GiB trim threshold freed blocks are reused; the peak RSS
    is unchanged (measured). Process-wide, so it is scoped with :func:`freed_memory_kept`, which ``blindsr sr``
    wraps around its sampling (the RSS it measures for ``--max-memory`` is taken before, and the kept memory is
    given back after). ``BLINDSR_MALLOC=default`` turns it off. Returns True when the setting was changed."""
    import ctypes
    import os
    import sys

    if os.environ.get("BLINDSR_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim  # glibc; absent (AttributeError) on musl and others
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>; glibc's defaults: 128 KiB, 65536
    if on:
        return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, GIB))
    ok = bool(mallopt(m_mmap_max, 65536)) and bool(mallopt(m_trim_threshold, 128 * 1024))
    trim(ctypes.c_size_t(0))
    return ok


@contextlib.contextmanager
def freed_memory_kept():
    """:func:`keep_freed_memory` for the duration of a ``with`` block (yields whether it applied)."""
    applied = keep_freed_memory(True)
    try:
        yield applied
    finally:
        if applied:
            keep_freed_memory(False)

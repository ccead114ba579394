"""Load any checkpoint format safely; save safetensors atomically.

Safety: pickled checkpoints (.pth/.pt/.ckpt/.bin) are read ONLY with ``torch.load(weights_only=True)``,
which refuses to construct arbitrary Python objects; a file that needs more is refused, never executed.

Unwrapping (:func:`load_state_dict`): training checkpoints nest the weights. Without ``key=`` the first
present of :data:`WRAPPER_KEYS` is taken, repeatedly, until a flat ``name -> tensor`` dict is left:
BasicSR ``params_ema`` (preferred) then ``params``; Lightning ``state_dict``; ``model_ema``/``ema`` (EMA
weights are the ones to sample with) before ``model``; then ``net``/``network``/``module``. A prefix
shared by every key from DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) is stripped.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blindsr.errors import BlindSRError, WeightsError
from blindsr.io.images import atomic_path

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_ema", "ema", "model", "net", "network", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
_SHOW = 3  # names shown per category in mismatch messages


def load_state_dict(path: str | Path, *, map_location: str | torch.device = "cpu",
                    key: str | None = None) -> dict[str, Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` dict (see the module docstring).

    ``key``: take this entry (dotted for nesting, e.g. ``"ema.model"``) instead of guessing.
    Missing, empty, corrupt or unsafe files raise a one-line :class:`WeightsError`.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file")
    kind = _kind(path)
    obj = _load_safetensors(path, map_location) if kind == "safetensors" else _load_pickle(path, map_location)
    sd = _unwrap(obj, path, key)
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = strip_prefix(sd, prefix)
    return sd


def check_finite(sd: Mapping[str, Tensor], path: str | Path) -> None:
    """A one-line :class:`WeightsError` naming the first floating-point tensor with NaN or inf values (a broken
    checkpoint would otherwise run a whole sampling and only then produce NaNs)."""
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise WeightsError(f"{path}: tensor {name!r} has {bad} NaN/inf value(s); the checkpoint is broken")


def _kind(path: Path) -> str:
    """"safetensors" or "pickle", by suffix, else by the first bytes."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length then the JSON header
        return "safetensors"
    raise WeightsError(f"{path}: unknown checkpoint format (expected .safetensors, .pth, .pt, .ckpt or .bin)")


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:  # SafetensorError, OSError, ValueError: all mean an unreadable file
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _load_pickle(path: Path, map_location: str | torch.device) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # a raw (non-torch) pickle: torch warns about its protocol, then fails;
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # our error says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "weights only" in str(e).lower():
            raise WeightsError(
                f"{path}: this pickle holds Python objects beyond tensors and plain containers; blindsr only "
                "loads safe pickles (torch.load weights_only=True). Re-save its state dict as safetensors "
                "in an environment you trust") from None
        raise WeightsError(f"{path}: corrupt checkpoint ({_first_line(e)})") from None
    except Exception as e:  # zip/EOF/RuntimeError from a truncated or foreign file
        raise WeightsError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None


def _unwrap(obj: Any, path: Path, key: str | None) -> dict[str, Tensor]:
    if key is not None:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                have = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
                raise WeightsError(f"{path}: no entry {key!r} in the checkpoint (top-level entries: {have})")
            obj = obj[part]
    for _ in range(4):  # a few levels of nesting at most
        if not isinstance(obj, Mapping) or _is_flat(obj):
            break
        found = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if found is None:
            break
        obj = obj[found]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        have = ", ".join(map(str, list(obj)[:8]))
        raise WeightsError(f"{path}: no tensors found (entries: {have}); pick the weights with key=")
    return sd


def _is_flat(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _first_line(e: BaseException) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text.split(". ")[0] if len(text) > 150 else text


def _dot(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` (a trailing "." is implied) from the keys that have it; other keys are kept."""
    p = _dot(prefix)
    return {(k[len(p):] if p and k.startswith(p) else k): v for k, v in sd.items()}


def select_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Only the keys under ``prefix`` (a trailing "." is implied), with the prefix removed."""
    p = _dot(prefix)
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def load_into(model: nn.Module, sd: Mapping[str, Tensor], strict: bool = True) -> None:
    """``model.load_state_dict(sd)`` with a one-line :class:`WeightsError` on mismatch.

    ``strict=False`` tolerates missing and unexpected keys (like torch) but never a shape mismatch.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if shapes or (strict and (missing or unexpected)):
        raise WeightsError(f"checkpoint does not match {type(model).__name__}: "
                           + mismatch_summary(missing if strict else [], unexpected if strict else [],
                                              [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in shapes]))
    try:
        model.load_state_dict(dict(sd), strict=strict)
    except RuntimeError as e:
        raise WeightsError(f"checkpoint does not match {type(model).__name__}: {_first_line(e)}") from None


def mismatch_summary(missing: list[str], unexpected: list[str],
                     shapes: list[tuple[str, tuple, tuple]]) -> str:
    """"3 missing (a, b, c), 1 unexpected (d), 1 shape mismatch (e: checkpoint (3, 4) vs model (3, 5))"."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({names(unexpected)})")
    if shapes:
        shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes]
        parts.append(f"{len(shapes)} shape mismatch{'es' if len(shapes) > 1 else ''} ({names(shown)})")
    return ", ".join(parts)


def save_safetensors(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None,
                     overwrite: bool = True) -> Path:
    """Write ``sd`` as safetensors, atomically. Tensors are detached, moved to CPU and made contiguous;
    tensors sharing memory are cloned (safetensors refuses aliases). Non-string metadata values are
    JSON-encoded."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[str(k)] = t
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=meta or None)
    except BlindSRError as e:
        raise WeightsError(str(e)) from None
    return Path(path)


def load_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} when none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None

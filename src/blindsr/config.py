"""One config mechanism for every dataclass config: ``from_dict`` / ``to_dict`` / ``apply_overrides``.

Method configs (``BlindDiffConfig``, ``MCFormerConfig``, ``DiffBIRConfig``, degradation presets, the run
config's sections) are plain dataclasses whose typed fields are the config; this module turns YAML/JSON dicts
into them (types checked and coerced, nested dataclasses, unknown keys a one-line :class:`BlindSRError`
naming the key) and back. Sampling-time overrides of a config use ``dataclasses.replace(config, **changes)``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from blindsr.errors import BlindSRError


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type (int->float, list->tuple, nested dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except BlindSRError:
                pass
        raise BlindSRError(f"config: {where} = {value!r} has the wrong type (expected {tp})")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):  # an already-built config object
            return value
        if not isinstance(value, dict):
            raise BlindSRError(f"config: {where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise BlindSRError(f"config: {where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise BlindSRError(f"config: {where} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
        return origin(_coerce(v, args[0], where) for v in value) if args else origin(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise BlindSRError(f"config: {where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads no/off as False (mixed_precision: no)
    if tp is str and isinstance(value, int | float):
        return str(value)  # e.g. diffusion.train_respacing: 500
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e6 in YAML
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise BlindSRError(f"config: {where} = {value!r} has the wrong type (expected {tp.__name__})")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise a one-line error naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise BlindSRError(f"config: unknown key '{path}' (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict of a dataclass config."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(obj))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b=value`` items (value parsed as YAML) to a nested dict, in place."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise BlindSRError(f"--set {item!r}: expected KEY.SUB=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise BlindSRError(f"--set {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return data

"""Where DiffBIR's weights are: flag > environment variable > ``~/.config/blindsr/weights.json`` (or
``$BLINDSR_CONFIG``) > the embedded file (the pixel backend's parts, ``blindsr.weights``); the weight names, flags,
variables and file names are in ``configs/diffbir_presets.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from blindsr.errors import BlindSRError, WeightsError
from blindsr.methods.diffbir.config import presets

CONFIG_ENV = "BLINDSR_CONFIG"
DEFAULT_CONFIG_FILE = Path("~/.config/blindsr/weights.json")


def config_file() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_FILE).expanduser()


def read_config_file() -> dict[str, str]:
    path = config_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BlindSRError(f"cannot read the weights config {path}: {e}") from None
    if not isinstance(data, dict):
        raise BlindSRError(f"{path} must hold a JSON object of weight name -> path")
    return {str(k): str(v) for k, v in data.items()}


def resolve_weight(key: str, given: str | Path | None = None) -> Path:
    """The path for weight ``key`` (e.g. ``diffbir_v2``): ``given`` (a flag), else ``$ENV``, else the config file.

    A missing setting or file is one ``WeightsError`` line that names the flag and environment variable.
    """
    info = presets()["weights"].get(key)
    if info is None:
        raise BlindSRError(f"unknown weight name {key!r}")
    how = f"pass {info['flag']} PATH or set {info['env']} (or \"{key}\" in {config_file()})"
    source, value = info["flag"], given
    if value is None and os.environ.get(info["env"]):
        source, value = info["env"], os.environ[info["env"]]
    if value is None:
        value = read_config_file().get(key)
        source = str(config_file())
    if value is None and info.get("embedded"):
        from blindsr.weights import PRIORS, part_path, prior_path

        name = info["embedded"]
        path = (prior_path if name in PRIORS else part_path)(name)
        if path.is_file():
            return path
        source, value = "the package (not trained yet)", str(path)
    if value is None:
        raise WeightsError(f"no {info['what']} ({info['file']}): {how}")
    path = Path(value).expanduser()
    if not path.exists():
        raise WeightsError(f"{info['what']} not found: {path} (from {source}); {how}")
    return path


@dataclass
class WeightPaths:
    cleaner_kind: str
    cleaner: Path
    sd: Path | None = None  # SD 2.1 (backend sd)
    controlnet: Path | None = None
    prior: Path | None = None  # the pixel-space prior (backend pixel)


def resolve_weights(version: str, task: str, *, sd: str | Path | None = None, controlnet: str | Path | None = None,
                    cleaner: str | Path | None = None, cleaner_kind: str | None = None,
                    prior: str | Path | None = None, stage1_only: bool = False) -> WeightPaths:
    """All paths a run needs; stage-1-only runs need the cleaner alone."""
    p = presets()["versions"][version]
    pixel = p.get("backend") == "pixel"
    if pixel and sd is not None:
        raise BlindSRError("--sd is for --backend sd; the pixel backend takes --prior")
    if not pixel and prior is not None:
        raise BlindSRError("--prior is for --backend pixel")
    kind, cleaner_key = p["cleaner"][task]
    if cleaner is not None and not cleaner_kind:  # a file the user names: its architecture from its tensors
        kind = "auto"
    elif cleaner_kind and cleaner_kind != kind:  # another cleaner family: its preset weight key, if any
        kind = cleaner_kind
        cleaner_key = {"bsrnet": "bsrnet", "rrdbnet": "bsrnet", "realesrgan": "bsrnet",
                      "scunet": "scunet_psnr"}.get(kind, "swinir_general")
    paths = WeightPaths(kind, resolve_weight(cleaner_key, cleaner))
    if not stage1_only:
        if pixel:
            paths.prior = resolve_weight(p["prior"], prior)
        else:
            paths.sd = resolve_weight(p["sd"], sd)
        paths.controlnet = resolve_weight(p["controlnet"][task], controlnet)
    return paths

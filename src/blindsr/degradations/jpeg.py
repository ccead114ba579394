"""JPEG compression: a real encoder (Pillow, per image) and a differentiable torch model of it.

``jpeg_pil``: encode/decode each image with libjpeg through Pillow (4:2:0 chroma, standard IJG tables; bit-
identical to OpenCV's ``imencode``/``imdecode`` at the same quality); not differentiable.

``jpeg_torch``: our own batched model of baseline JPEG -- full-range YCbCr, 4:2:0 chroma by 2x2 averaging,
8x8 orthonormal DCT, quantisation with the standard tables scaled by the quality factor, rounding (hard /
cubic ``r + (x - r)^3`` / straight-through), dequantise, inverse DCT, chroma upsampling. Quality is per sample.
Two variants (``model=``):
- ``"libjpeg"`` (default): integer tables as libjpeg scales them (clamped to [1, 255]) and libjpeg's "fancy"
  (triangular = bilinear, half-pixel) chroma upsampling -- the closest to a real codec.
- ``"diffjpeg"``: Real-ESRGAN's DiffJPEG -- continuous ``table * factor`` (no rounding) and nearest chroma
  upsampling. The realesrgan/stablesr/resshift presets use it, as the official code does.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F

from blindsr.errors import BlindSRError

# ITU-T T.81 Annex K tables, natural (row-major) order: row = vertical frequency.
LUMA_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]]
CHROMA_TABLE = [
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]] + [[99] * 8] * 4

# JFIF full-range YCbCr (rows: Y, Cb, Cr); Cb/Cr offset by 128.
RGB_TO_YCC = [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
YCC_TO_RGB = [[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]]


def quality_scale(quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's percentage scaling: ``5000/q`` below 50, ``200 - 2q`` from 50 (q clamped to [1, 100])."""
    q = quality.clamp(1, 100)
    return torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)


def quant_tables(quality: torch.Tensor, tables: str = "ijg", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (B, 8, 8) luma and chroma quantisation tables for qualities (B,)."""
    s = quality_scale(quality.to(torch.float64)).view(-1, 1, 1).to(device)
    out = []
    for base in (LUMA_TABLE, CHROMA_TABLE):
        t = torch.tensor(base, dtype=torch.float64, device=device)
        if tables == "ijg":
            out.append(torch.floor((t * s + 50) / 100).clamp(1, 255))
        elif tables == "diffjpeg":
            out.append((t * s / 100).clamp_min(1e-3))  # q -> 100 gives factor 0; keep it finite
        else:
            raise BlindSRError(f"unknown JPEG tables {tables!r} (ijg, diffjpeg)")
    return out[0], out[1]


def dct_matrix(n: int = 8, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D: ``coef = D @ block @ D^T`` equals JPEG's 1/4 C(u)C(v) sum cos cos."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos((2 * i[None, :] + 1) * i[:, None] * torch.pi / (2 * n)) * (2.0 / n) ** 0.5
    d[0] /= 2**0.5
    return d.to(device=device, dtype=dtype)


def _round(x: torch.Tensor, rounding: str) -> torch.Tensor:
    if rounding == "hard":
        return torch.round(x)
    if rounding == "cubic":  # Shin & Song 2017, used by DiffJPEG(differentiable=True)
        r = torch.round(x)
        return r + (x - r) ** 3
    if rounding == "ste":
        return x + (torch.round(x) - x).detach()
    raise BlindSRError(f"unknown JPEG rounding {rounding!r} (hard, cubic, ste)")


def _code_plane(p: torch.Tensor, table: torch.Tensor, rounding: str) -> torch.Tensor:
    """Compress-decompress planes (B, n, H, W) (H, W multiples of 8; values 0..255) with tables (B, 8, 8)."""
    b, n, h, w = p.shape
    d = dct_matrix(8, p.device, p.dtype)
    blocks = p.view(b, n, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5) - 128.0
    coef = d @ blocks @ d.T
    t = table.to(p.dtype).view(b, 1, 1, 1, 8, 8)
    coef = _round(coef / t, rounding) * t
    blocks = d.T @ coef @ d + 128.0
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, n, h, w)


def _as_quality(quality, b: int, device) -> torch.Tensor:
    q = torch.as_tensor(quality, dtype=torch.float64, device=device).reshape(-1)
    if q.numel() not in (1, b):
        raise BlindSRError(f"JPEG quality must be a scalar or one value per image ({b}), got {q.numel()}")
    return q.expand(b)


MODELS = {"libjpeg": ("ijg", "fancy"), "diffjpeg": ("diffjpeg", "nearest")}  # model -> (tables, upsampling)


def _upsample_chroma(c: torch.Tensor, how: str) -> torch.Tensor:
    if how == "nearest":
        return c.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    # libjpeg h2v2 fancy upsampling: weights 3/4, 1/4 towards the nearer / farther sample, edges replicated
    return F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)


def jpeg_torch(x: torch.Tensor, quality, model: str = "libjpeg", rounding: str = "hard") -> torch.Tensor:
    """Batched JPEG model of (B, C, H, W) in [0, 1], C in {1, 3}; ``quality`` scalar or (B,).

    Differentiable with ``rounding="cubic"`` or ``"ste"`` (the input is clamped to [0, 1] first, as
    Real-ESRGAN does, so gradients vanish outside). Images are replicate-padded to multiples of 16.
    """
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise BlindSRError(f"JPEG needs 1 or 3 channels, got {c}")
    if model not in MODELS:
        raise BlindSRError(f"unknown JPEG model {model!r} (libjpeg, diffjpeg)")
    tables, upsampling = MODELS[model]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    qy, qc = quant_tables(_as_quality(quality, b, x.device), tables, x.device)
    ph, pw = (-h) % 16, (-w) % 16
    v = F.pad(x.to(work).clamp(0, 1) * 255.0, (0, pw, 0, ph), mode="replicate")
    if c == 1:
        out = _code_plane(v, qy, rounding)
    else:
        m = torch.tensor(RGB_TO_YCC, dtype=work, device=x.device)
        ycc = torch.einsum("ij,bjhw->bihw", m, v) + torch.tensor([0.0, 128.0, 128.0], dtype=work,
                                                                   device=x.device).view(1, 3, 1, 1)
        y = _code_plane(ycc[:, :1], qy, rounding)
        cbcr = _code_plane(F.avg_pool2d(ycc[:, 1:], 2), qc, rounding)
        cbcr = _upsample_chroma(cbcr, upsampling) - 128.0
        mi = torch.tensor(YCC_TO_RGB, dtype=work, device=x.device)
        out = torch.einsum("ij,bjhw->bihw", mi, torch.cat([y, cbcr], dim=1))
    return (out[..., :h, :w].clamp(0, 255) / 255.0).to(x.dtype)


def jpeg_pil(x: torch.Tensor, quality, subsampling: int = 2) -> torch.Tensor:
    """Real JPEG round trip per image through Pillow/libjpeg (8-bit; ``quality`` int per sample, 1..100).

    ``subsampling``: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0 (libjpeg's and OpenCV's default). Not differentiable.
    """
    import numpy as np
    from PIL import Image

    b, c = x.shape[:2]
    if c not in (1, 3):
        raise BlindSRError(f"JPEG needs 1 or 3 channels, got {c}")
    qs = [int(q) for q in _as_quality(quality, b, "cpu").tolist()]
    out = []
    for img, q in zip(x.detach(), qs, strict=True):
        arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=max(1, min(100, q)), subsampling=subsampling)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(dec.copy())
        out.append(t[None] if c == 1 else t.permute(2, 0, 1))
    return torch.stack(out).to(device=x.device, dtype=x.dtype)


def jpeg(x: torch.Tensor, quality, backend: str = "torch", **kwargs) -> torch.Tensor:
    """Dispatch to ``jpeg_torch`` (``backend="torch"``) or ``jpeg_pil`` (``backend="pil"``)."""
    if backend == "torch":
        return jpeg_torch(x, quality, **kwargs)
    if backend == "pil":
        return jpeg_pil(x, quality, **kwargs)
    raise BlindSRError(f"unknown JPEG backend {backend!r} (torch, pil)")

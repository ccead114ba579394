"""PSNR and SSIM in the BasicSR convention (the numbers SR papers report). Our own implementation.

Convention (BasicSR ``calculate_psnr`` / ``calculate_ssim``, which BlindDiff and most SR papers use):

1. Both images go to float64 on the [0, 255] scale: float inputs in [0, 1] are multiplied by 255 and
   **not rounded** (a float prediction is scored as is; BasicSR scores uint8 files, so to reproduce its
   validation numbers exactly, quantise first, e.g. pass uint8 arrays or ``(x * 255).round() / 255``).
   uint8 inputs are used as they are.
2. ``crop_border`` pixels are removed from every side (crop_border = scale is the standard).
3. With ``y_channel``, only the Y of ITU-R BT.601 YCbCr in *limited* range (16-235) is scored
   (:func:`rgb_to_y`). This is not pyiqa's default YIQ/full-range gray, which reads about
   20*log10(255/219) = 1.32 dB lower.
4. PSNR = 10 log10(255^2 / MSE); identical images give ``inf``.
5. SSIM (Wang et al. 2004, eq. 13): 11x11 Gaussian window with sigma 1.5, C1 = (0.01*255)^2,
   C2 = (0.03*255)^2, statistics over 'valid' windows only (no padding: the map is (H-10, W-10)),
   no downsampling; the mean of the map, averaged over channels for RGB.

Accepted inputs: torch tensors ``(C, H, W)`` (or ``(H, W)``) in [0, 1], returning a float, or
``(B, C, H, W)`` batches, returning a ``list[float]`` with one value per image (papers average the per-image
values over a test set, never the MSE); numpy arrays ``(H, W, C)`` or ``(H, W)`` that are uint8 ([0, 255])
or float ([0, 1]). C is 1 or 3. A 1-channel image counts as gray replicated to RGB, which is how BasicSR
(via ``cv2.imread(..., IMREAD_COLOR)``) reads a gray file: so a gray ground truth can be scored against an
RGB prediction, and gray vs gray gives the same numbers as BasicSR on the same files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from blindsr.errors import BlindSRError

# ITU-R BT.601, limited range, RGB in [0, 1] -> Y in [16, 235] (BasicSR rgb2ycbcr / MATLAB rgb2ycbcr).
_Y_OFFSET = 16.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)  # = 219 * (0.299, 0.587, 0.114)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def rgb_to_y(img: Any) -> Any:
    """Y of BT.601 limited-range YCbCr: Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255, RGB in [0, 1].

    Output is on the same [0, 1] scale as the input (so Y lies in [16/255, 235/255]), computed in the
    input's float dtype (float64 for integer numpy input) without rounding. Takes a tensor ``(..., 3, H, W)``
    (returns ``(..., 1, H, W)``) or a numpy array ``(H, W, 3)`` (returns ``(H, W)``; uint8 input is read as
    [0, 255] and the result is still on the [0, 1] scale).
    """
    if isinstance(img, np.ndarray):
        x = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img
        if x.ndim != 3 or x.shape[-1] != 3:
            raise BlindSRError(f"rgb_to_y: expected an (H, W, 3) array, got shape {tuple(img.shape)}")
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
    else:
        if img.ndim < 3 or img.shape[-3] != 3:
            raise BlindSRError(f"rgb_to_y: expected a (..., 3, H, W) tensor, got shape {tuple(img.shape)}")
        r, g, b = img[..., 0:1, :, :], img[..., 1:2, :, :], img[..., 2:3, :, :]
    wr, wg, wb = _Y_WEIGHTS
    return (_Y_OFFSET + wr * r + wg * g + wb * b) / 255.0


# --------------------------------------------------------------------------------------------------
# input handling: everything becomes a list of float64 (H, W, C) arrays on the [0, 255] scale


def _to_hwc255(img: Any, what: str) -> list[np.ndarray]:
    """Convert one image or a batch to a list of float64 HWC arrays on the [0, 255] scale (no rounding)."""
    if isinstance(img, np.ndarray):
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3:
            raise BlindSRError(f"{what}: numpy images must be (H, W) or (H, W, C), got shape {img.shape}")
        if img.dtype == np.uint8:
            arr = img.astype(np.float64)
        elif np.issubdtype(img.dtype, np.floating):
            arr = img.astype(np.float64) * 255.0
        else:
            raise BlindSRError(f"{what}: numpy images must be uint8 or float in [0, 1], got {img.dtype}")
        return [_check_channels(arr, what)]
    if not hasattr(img, "detach"):
        raise BlindSRError(f"{what}: expected a torch tensor or numpy array, got {type(img).__name__}")
    t = img.detach().cpu()
    scale = 1.0 if not t.is_floating_point() else 255.0  # uint8 tensors are already on the 0-255 scale
    x = t.double().numpy() * scale
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        return [_check_channels(x.transpose(1, 2, 0), what)]
    if x.ndim == 4:
        return [_check_channels(xi.transpose(1, 2, 0), what) for xi in x]
    raise BlindSRError(f"{what}: tensors must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(img.shape)}")


def _check_channels(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape[2] not in (1, 3):
        raise BlindSRError(f"{what}: expected 1 (gray) or 3 (RGB) channels, got {arr.shape[2]}")
    return arr


def _prepare(pred: np.ndarray, gt: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Shape check, gray->RGB, crop, optional Y. Returns two float64 (H, W, C) arrays on the 0-255 scale."""
    if pred.shape[:2] != gt.shape[:2]:
        raise BlindSRError(f"image sizes differ: prediction {pred.shape[1]}x{pred.shape[0]} vs ground truth "
                           f"{gt.shape[1]}x{gt.shape[0]} (W x H)")
    if pred.shape[2] != gt.shape[2]:  # one is gray: replicate it to RGB, as BasicSR's reader does
        pred, gt = np.repeat(pred, 3 // pred.shape[2], axis=2), np.repeat(gt, 3 // gt.shape[2], axis=2)
    if crop_border < 0:
        raise BlindSRError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        h, w = pred.shape[:2]
        if 2 * crop_border >= min(h, w):
            raise BlindSRError(f"crop_border {crop_border} leaves nothing of a {w}x{h} image")
        pred = pred[crop_border:-crop_border, crop_border:-crop_border]
        gt = gt[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        pred, gt = _y255(pred), _y255(gt)
    return pred, gt


def _y255(x: np.ndarray) -> np.ndarray:
    """BT.601 limited-range Y on the 0-255 scale, (H, W, 1); a gray channel counts as R = G = B."""
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return (rgb_to_y(x / 255.0) * 255.0)[:, :, None]


def _pairs(pred: Any, gt: Any, crop_border: int, y_channel: bool):
    preds, gts = _to_hwc255(pred, "prediction"), _to_hwc255(gt, "ground truth")
    if len(preds) != len(gts):
        raise BlindSRError(f"batch sizes differ: {len(preds)} predictions vs {len(gts)} ground truths")
    batched = hasattr(pred, "detach") and pred.dim() == 4
    return [_prepare(p, g, int(crop_border), y_channel) for p, g in zip(preds, gts, strict=True)], batched


# --------------------------------------------------------------------------------------------------
# the metrics


def _psnr255(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian, as ``cv2.getGaussianKernel(size, sigma)``; the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation of (H, W) with outer(g, g), 'valid' region only: (H-k+1, W-k+1)."""
    win = np.lib.stride_tricks.sliding_window_view
    x = win(x, g.size, axis=0) @ g
    return win(x, g.size, axis=1) @ g


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of one (H, W) channel pair on the 0-255 scale (Wang et al. 2004, eq. 13)."""
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    g = gaussian_window_1d()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def _ssim255(a: np.ndarray, b: np.ndarray) -> float:
    h, w = a.shape[:2]
    if min(h, w) < SSIM_WINDOW:
        raise BlindSRError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, got {w}x{h}")
    return float(np.mean([_ssim_channel(a[:, :, c], b[:, :, c]) for c in range(a.shape[2])]))


def psnr(pred: Any, gt: Any, crop_border: int = 0, y_channel: bool = False) -> float | list[float]:
    """PSNR in dB, BasicSR convention (see the module docstring); ``inf`` for identical images.

    One image (tensor ``(C, H, W)`` or numpy ``(H, W, C)``) gives a float; a ``(B, C, H, W)`` batch gives one
    value per image. Raises :class:`BlindSRError` on a size mismatch.
    """
    pairs, batched = _pairs(pred, gt, crop_border, y_channel)
    values = [_psnr255(p, g) for p, g in pairs]
    return values if batched else values[0]


def ssim(pred: Any, gt: Any, crop_border: int = 0, y_channel: bool = False) -> float | list[float]:
    """SSIM, BasicSR/MATLAB convention (see the module docstring); 1.0 for identical images.

    Same inputs and return convention as :func:`psnr`. Needs at least 11x11 pixels after cropping.
    """
    pairs, batched = _pairs(pred, gt, crop_border, y_channel)
    values = [_ssim255(p, g) for p, g in pairs]
    return values if batched else values[0]

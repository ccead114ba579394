"""Image operators of the degradation models: blur, MATLAB bicubic imresize, decimation, noise, USM, quantise.

All take images ``(B, C, H, W)`` in [0, 1] (``imresize`` and ``blur`` accept any leading dims / batch), follow
the input's device and dtype, and draw randomness only from a ``torch.Generator``. JPEG lives in ``jpeg.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blindsr.errors import BlindSRError

# BT.601 luma weights as torchvision's rgb_to_grayscale (used by BasicSR's gray Poisson noise).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------- blur
def blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Blur ``x`` (B, C, H, W) with one kernel (h, w) or per-sample kernels (B, h, w).

    BlindDiff's ``BatchBlur(l)`` convention: reflect padding of ``l//2`` (for even ``l``: ``l//2`` before,
    ``l//2 - 1`` after), a grouped ``conv2d`` -- i.e. cross-correlation, the kernel is NOT flipped -- and the
    same kernel for every channel of a sample. Images smaller than the padding fall back to replicate padding
    (reflection needs pad < size).
    """
    if x.dim() != 4:
        raise BlindSRError(f"blur expects images (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    k = k.to(device=x.device, dtype=x.dtype)
    if k.dim() == 2:
        k = k.unsqueeze(0)
    if k.dim() != 3 or k.shape[0] not in (1, b):
        raise BlindSRError(f"blur kernel must be (h, w) or ({b}, h, w), got {tuple(k.shape)}")
    k = k.expand(b, -1, -1)
    kh, kw = k.shape[-2:]
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    mode = "reflect" if max(pad[0], pad[1]) < w and max(pad[2], pad[3]) < h else "replicate"
    xp = F.pad(x.reshape(1, b * c, h, w), pad, mode=mode)
    weight = k.repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, kh, kw)
    if torch.is_grad_enabled() and (xp.requires_grad or weight.requires_grad):
        return _DepthwiseCorrelation.apply(xp, weight).view(b, c, h, w)
    return F.conv2d(xp, weight, groups=b * c).view(b, c, h, w)


class _DepthwiseCorrelation(torch.autograd.Function):
    """``conv2d(xp, weight, groups=n)`` for xp (1, n, Hp, Wp), weight (n, 1, kh, kw), with both gradients formed
    as forward convolutions: d/dxp = the gradient fully padded, correlated with the flipped kernel; d/dweight =
    xp correlated with the gradient (one kh × kw output per channel). Mathematically autograd's; about 3.5x
    faster on CPU for the guidance's 21 × 21 kernels (oneDNN has no fast weight gradient for a large
    depthwise kernel: 90 of autograd's 110 ms at 256², one thread)."""

    @staticmethod
    def forward(ctx, xp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xp, weight)
        return F.conv2d(xp, weight, groups=xp.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xp, weight = ctx.saved_tensors
        n, (kh, kw) = xp.shape[1], weight.shape[-2:]
        g_x = g_w = None
        if ctx.needs_input_grad[0]:
            g_x = F.conv2d(F.pad(grad, (kw - 1, kw - 1, kh - 1, kh - 1)), weight.flip(-2, -1), groups=n)
        if ctx.needs_input_grad[1]:
            g_w = F.conv2d(xp, grad.transpose(0, 1), groups=n).transpose(0, 1)
        return g_x, g_w


# ------------------------------------------------------------------------------ MATLAB imresize
def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True,
                   device=None) -> torch.Tensor:
    """MATLAB ``imresize`` (bicubic) as a dense (out_len, in_len) float64 matrix.

    MATLAB's ``contributions``: output pixel ``x`` (1-based) maps to ``u = x/scale + 0.5(1 - 1/scale)``;
    when downsampling with antialiasing the kernel is stretched, ``h(t) = scale*cubic(scale*t)`` with width
    ``4/scale``; taps ``floor(u - width/2) + (0..ceil(width)+1)``; rows normalised to sum 1; out-of-range taps
    are mirrored symmetrically (``[1..n, n..1]``, the edge pixel repeated).
    """
    f64 = torch.float64
    stretch = antialias and scale < 1
    width = 4.0 / scale if stretch else 4.0
    x = torch.arange(1, out_len + 1, dtype=f64, device=device)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=f64, device=device)[None]  # 1-based
    dist = u[:, None] - idx
    w = scale * cubic(scale * dist) if stretch else cubic(dist)
    w = w / w.sum(dim=1, keepdim=True)
    m = (idx.long() - 1) % (2 * in_len)  # mirror: aux = [1..n, n..1]
    src = torch.where(m < in_len, m, 2 * in_len - 1 - m)
    mat = torch.zeros(out_len, in_len, dtype=f64, device=device)
    return mat.scatter_add_(1, src, w)


def imresize(x: torch.Tensor, scale: float | tuple[float, float] | None = None,
             size: tuple[int, int] | None = None, antialias: bool = True) -> torch.Tensor:
    """MATLAB-compatible bicubic ``imresize`` of (..., H, W) tensors, up or down.

    Give ``scale`` (output ``ceil(H*scale)``, weights from ``scale`` as MATLAB does) or ``size`` (H', W')
    (``scale = H'/H``). Computed in float32 (float64 for float64 input), returned in the input dtype.
    No clamping: bicubic overshoot is kept, as in MATLAB for floating-point images.
    """
    if (scale is None) == (size is None):
        raise BlindSRError("imresize: give exactly one of scale or size")
    h, w = x.shape[-2:]
    if size is not None:
        oh, ow = int(size[0]), int(size[1])
        sh, sw = oh / h, ow / w
    else:
        sh, sw = (scale, scale) if isinstance(scale, int | float) else (float(scale[0]), float(scale[1]))
        if sh <= 0 or sw <= 0:
            raise BlindSRError(f"imresize: scale must be positive, got {scale}")
        oh, ow = math.ceil(h * sh - 1e-9), math.ceil(w * sw - 1e-9)
    if oh < 1 or ow < 1:
        raise BlindSRError(f"imresize: output size {oh}x{ow} is empty")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(work)
    # MATLAB resizes the dimension with the smaller scale first (rows first on ties).
    order = ("h", "w") if sh <= sw else ("w", "h")
    for dim in order:
        if dim == "h":
            mat = resize_weights(h, oh, sh, antialias, x.device).to(work)
            out = torch.einsum("oh,...hw->...ow", mat, out)
        else:
            mat = resize_weights(w, ow, sw, antialias, x.device).to(work)
            out = torch.einsum("ow,...hw->...ho", mat, out)
    return out.to(x.dtype)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """``F.interpolate`` resize as Real-ESRGAN uses it (``area``/``bilinear``/``bicubic``/``nearest``, no
    antialias, half-pixel centres); ``matlab`` selects MATLAB bicubic ``imresize``."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "matlab":
        return imresize(x, size=size)
    if mode not in ("area", "bilinear", "bicubic", "nearest"):
        raise BlindSRError(f"unknown resize mode {mode!r} (area, bilinear, bicubic, nearest, matlab)")
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kw)


def downsample_stride(x: torch.Tensor, scale: int, offset: int = 0) -> torch.Tensor:
    """s-fold decimation ``x[..., offset::s, offset::s]`` (USRNet/DPIR keep the top-left pixel, offset 0;
    ``offset = s//2`` keeps the block centre). DAN/IKC and BlindDiff use bicubic, not decimation."""
    if not 0 <= offset < scale:
        raise BlindSRError(f"decimation offset must be in [0, {scale}), got {offset}")
    return x[..., offset::scale, offset::scale]


def modcrop(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop (..., H, W) to multiples of ``scale`` (bottom/right), as DAN's test-set builder does."""
    h, w = x.shape[-2:]
    return x[..., : h - h % scale, : w - w % scale]


# ------------------------------------------------------------------------------------------- noise
def _per_sample(v, b: int, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a (B, 1, 1, 1) tensor like ``ref``."""
    return torch.as_tensor(v, dtype=ref.dtype, device=ref.device).reshape(-1, 1, 1, 1).expand(b, 1, 1, 1)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def randn_like(x: torch.Tensor, generator: torch.Generator | None, shape=None) -> torch.Tensor:
    """Standard normal draws shaped like ``x`` (or ``shape``), drawn on the generator's device then moved
    to ``x``'s, so a CPU generator gives the same numbers whatever device the images are on."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    n = torch.randn(shape, generator=generator, device=_gen_device(generator, x), dtype=torch.float32)
    return n.to(device=x.device, dtype=x.dtype)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision/BT.601 weights."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def gaussian_noise(x: torch.Tensor, sigma, gray=False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like ``x``: colour or gray (one channel, broadcast) per sample; ``sigma`` in [0, 1] units.

    ``sigma`` and ``gray`` are scalars or (B,) tensors. Both a colour and a gray field are always drawn so the
    generator advances the same way whatever ``gray`` is (Real-ESRGAN mixes them as n(1-g) + n_gray g).
    """
    b, c, h, w = x.shape
    n = randn_like(x, generator)
    ng = randn_like(x, generator, (b, 1, h, w)).expand(b, c, h, w)
    g = _per_sample(gray, b, x)
    return (n * (1 - g) + ng * g) * _per_sample(sigma, b, x)


def add_gaussian_noise(x: torch.Tensor, sigma, gray=False, generator: torch.Generator | None = None,
                       clip: bool = True) -> torch.Tensor:
    """``x + n``, ``n ~ N(0, sigma^2)`` (sigma in [0, 1] units; sigma_255 / 255), clipped to [0, 1]."""
    out = x + gaussian_noise(x, sigma, gray, generator)
    return out.clamp(0, 1) if clip else out


def _poisson(img: torch.Tensor, generator) -> torch.Tensor:
    """BasicSR: quantised image, ``vals = 2^ceil(log2(#unique values))`` per sample, Poisson(img*vals)/vals - img."""
    img = (img * 255.0).round().clamp(0, 255) / 255.0
    uniq = [max(int(torch.unique(img[i]).numel()), 1) for i in range(img.shape[0])]
    dev = _gen_device(generator, img)
    vals = torch.tensor([2.0 ** math.ceil(math.log2(u)) if u > 1 else 1.0 for u in uniq],
                        device=dev, dtype=torch.float32).view(-1, 1, 1, 1)
    rate = (img.to(device=dev, dtype=torch.float32) * vals).clamp_min(0)
    return (torch.poisson(rate, generator=generator) / vals).to(device=img.device, dtype=img.dtype) - img


def poisson_noise(x: torch.Tensor, scale, gray=False, generator: torch.Generator | None = None) -> torch.Tensor:
    """BasicSR ``generate_poisson_noise_pt``: signal-dependent noise times ``scale`` (scalar or (B,)).

    Gray noise (per sample, ``gray`` scalar or (B,)) is computed on the BT.601 luma and broadcast to the
    channels. Both fields are always drawn so the generator advances the same way.
    """
    b, c = x.shape[:2]
    color = _poisson(x, generator)
    if c == 3:
        gray_n = _poisson(to_gray(x), generator).expand_as(x)
        g = _per_sample(gray, b, x)
        color = color * (1 - g) + gray_n * g
    return color * _per_sample(scale, b, x)


def add_poisson_noise(x: torch.Tensor, scale, gray=False, generator: torch.Generator | None = None,
                      clip: bool = True) -> torch.Tensor:
    """``x + poisson_noise(x)``, clipped to [0, 1] (Real-ESRGAN ``random_add_poisson_noise_pt``)."""
    out = x + poisson_noise(x, scale, gray, generator)
    return out.clamp(0, 1) if clip else out


# ------------------------------------------------------------------------------- USM and quantise
def cv2_gaussian_1d(ksize: int, sigma: float = 0.0) -> torch.Tensor:
    """OpenCV ``getGaussianKernel``: sigma <= 0 means ``0.3*((ksize-1)*0.5 - 1) + 0.8``."""
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    ax = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(ax**2) / (2 * sigma**2))
    return k / k.sum()


def usm_sharp(x: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN's ``USMSharp`` (radius 50 -> a 51-tap Gaussian, sigma 8).

    ``residual = x - G*x``; ``mask = |residual|*255 > threshold``, softened by the same Gaussian;
    ``out = soft*clip(x + weight*residual) + (1 - soft)*x``.
    """
    if radius % 2 == 0:
        radius += 1
    k1 = cv2_gaussian_1d(radius)
    k = torch.outer(k1, k1)
    residual = x - blur(x, k)
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft = blur(mask, k)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


def quantize(x: torch.Tensor, bits: int = 8, straight_through: bool = False) -> torch.Tensor:
    """Round to ``2^bits - 1`` levels in [0, 1]; ``straight_through`` passes the gradient unchanged."""
    levels = 2**bits - 1
    q = (x.clamp(0, 1) * levels).round() / levels
    return x + (q - x).detach() if straight_through else q

"""UDDM's P-DDM (paper Eq. 5): a physics-based degradation network, HR -> a real-looking LR of size HR / r.

A dynamic parameter generator (a small CNN on the HR image) predicts the parameters of a fixed chain of
differentiable operators, so the degradation is content-aware and, where it matters, spatially varying:

    LR = JPEG_q( fade_{a,b,β}( (k ⊛ HR)↓r ) + σ(x) · n )

1. **blur + downsampling**: one kernel per image (``kernel="global"``: the library's ``operators.blur`` --
   BlindDiff's BatchBlur, reflect padding, cross-correlation), or one kernel per LR pixel (``kernel="spatial"``:
   the same sum with each pixel's own kernel); softmax-normalised, started as a narrow Gaussian; then MATLAB
   bicubic ↓r (``down="bicubic"``, the classic model: a delta kernel gives exactly Eq. 5's target HR↓r) or
   decimation ``[::r, ::r]`` (``down="stride"``, PDM's).
2. **colour fading**: a per-channel affine ``a_c x + b_c`` then a posterisation-like activation, a blend (β) of the
   identity and a smooth staircase with ``levels`` steps: ``x - β Σ_{i=1..n} (-1)^{i+1} sin(2π i L x) / (π i L)``
   (the Fourier series of ``x - round(L x) / L``; ``n → ∞`` at β = 1 is the library's ``quantize``).
3. **noise**: a per-pixel standard deviation map σ(x) (signal- and content-dependent) times the library's
   ``gaussian_noise`` field (colour / gray mixed by a predicted weight, as Real-ESRGAN), drawn from a generator.
4. **JPEG-like blocks**: the library's differentiable ``jpeg_torch`` (DiffJPEG tables, cubic rounding) at a
   predicted quality.

The paper does not give the generator's architecture, the operator ranges or the initialisation; ours are in
:class:`PDDMConfig` (every operator can be switched off: ``ops``). The heads start mild: a Gaussian kernel
(``init_sigma``, 0.6 HR pixels at x4), no fading, no noise (σ ≈ 6e-5 · noise_max), JPEG quality ≈ 95.

The bounded heads (tanh / sigmoid) can saturate: nothing bounds the trunk's features, and once a head's
pre-activation is far outside its live range its gradient is ~0, so neither loss can bring it back (found on
RealSRSet: pre-activations of 10-170, every fade / JPEG parameter frozen at a bound). :meth:`PDDM.saturation` is
the hinge penalty the recipe adds (``loss.live``) to keep them within ``LIVE`` (|z| <= 3 for tanh, 8 for sigmoid:
the sigmoid heads start at ±6); it is exactly 0 inside, so a run that never saturates trains exactly as without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blindsr.degradations.jpeg import jpeg_torch
from blindsr.degradations.operators import blur, gaussian_noise, imresize
from blindsr.errors import BlindSRError

OPS = ("blur", "fade", "noise", "jpeg")
# live range of the global head's pre-activations: gain, bias (tanh), β, gray, quality (sigmoid); σ (sigmoid)
LIVE = (3.0,) * 6 + (8.0,) * 3
LIVE_SIGMA = 8.0


@dataclass
class PDDMConfig:
    """P-DDM's operators and parameter generator (paper-silent choices, with the defaults named)."""

    scale: int = 4                       # r: HR / LR
    kernel_size: int = 21                # blur kernel side (odd)
    kernel: str = "global"               # global (one per image) | spatial (one per LR pixel)
    down: str = "bicubic"                # bicubic (MATLAB imresize after the blur) | stride (decimation, PDM's)
    init_sigma: float = 0.6              # width of the initial Gaussian kernel, in HR pixels (x r / 4)
    levels: int = 32                     # steps of the posterisation staircase
    terms: int = 5                       # Fourier terms of the staircase (PDM's quantisation uses 5)
    noise_max: float = 25.0 / 255        # σ(x) in [0, noise_max]
    jpeg_range: tuple[float, float] = (30.0, 95.0)  # predicted quality range (DiffJPEG)
    width: int = 32                      # generator channels
    blocks: int = 3                      # residual blocks at LR resolution
    ops: list[str] = field(default_factory=lambda: list(OPS))  # the operators in the chain (order fixed)

    def __post_init__(self) -> None:
        if self.scale < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise BlindSRError("P-DDM: scale >= 1 and an odd kernel_size are required")
        if self.kernel not in ("global", "spatial"):
            raise BlindSRError(f"P-DDM: kernel must be global or spatial, not {self.kernel!r}")
        if self.down not in ("bicubic", "stride"):
            raise BlindSRError(f"P-DDM: down must be bicubic or stride, not {self.down!r}")
        if unknown := set(self.ops) - set(OPS):
            raise BlindSRError(f"P-DDM: unknown operator(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
        lo, hi = self.jpeg_range
        if not 1 <= lo <= hi <= 100 or self.levels < 1 or self.terms < 1 or self.noise_max < 0:
            raise BlindSRError("P-DDM: jpeg_range within [1, 100], levels >= 1, terms >= 1, noise_max >= 0")


@dataclass
class PDDMParams:
    """One batch's operator parameters (what the generator predicts; also settable by hand)."""

    kernel: Tensor          # (B, k, k) global or (B, k*k, h, w) spatial, each summing to 1
    gain: Tensor            # (B, 3) a
    bias: Tensor            # (B, 3) b
    posterize: Tensor       # (B,) β in [0, 1]
    sigma: Tensor           # (B, 1, h, w) noise standard deviation
    gray: Tensor            # (B,) share of gray noise
    quality: Tensor         # (B,) JPEG quality
    logits: Tensor | None = None        # (B, 9) the global head's pre-activations (None when set by hand)
    sigma_logits: Tensor | None = None  # (B, 1, h, w) the σ head's pre-activations


# ------------------------------------------------------------------------------------------------ operators
def blur_down(hr: Tensor, kernel: Tensor, scale: int, down: str = "bicubic") -> Tensor:
    """``(k ⊛ hr)↓r``. ``kernel``: (B, k, k), one per image (the library's ``blur``: BatchBlur), or (B, k², h, w),
    one per LR pixel (the same cross-correlation with each pixel's own kernel, tap by tap: memory of one image).
    ``down``: ``bicubic`` (MATLAB ``imresize``, the classic model; a delta kernel gives exactly HR↓r bicubic,
    Eq. 5's target) or ``stride`` (decimation ``[::r, ::r]``, PDM's)."""
    b, c, H, W = hr.shape
    if kernel.dim() == 3:
        y = blur(hr, kernel)
    else:
        k = math.isqrt(kernel.shape[1])
        pad = (k // 2, k - 1 - k // 2) * 2
        xp = F.pad(hr, pad, mode="reflect" if k // 2 < min(H, W) else "replicate")
        if down == "stride":  # each LR pixel's kernel at its decimated position
            return sum(kernel[:, i * k + j, None] * xp[..., i:i + H:scale, j:j + W:scale]
                       for i in range(k) for j in range(k))
        kmap = F.interpolate(kernel, size=(H, W), mode="nearest")  # the LR pixel's kernel over its r x r block
        y = sum(kmap[:, i * k + j, None] * xp[..., i:i + H, j:j + W] for i in range(k) for j in range(k))
    return imresize(y, 1 / scale) if down == "bicubic" else y[..., ::scale, ::scale]


def fade(x: Tensor, gain: Tensor, bias: Tensor, posterize: Tensor, levels: int, terms: int) -> Tensor:
    """Per-channel affine, then the β-blend of the identity and the smooth staircase (module docstring)."""
    y = x * gain[..., None, None] + bias[..., None, None]
    i = torch.arange(1, terms + 1, device=x.device, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    sign = 1 - 2 * ((i + 1) % 2)  # (-1)^(i+1)
    wave = (sign * torch.sin(2 * math.pi * i * levels * y[None]) / (math.pi * i * levels)).sum(0)
    return y - posterize.view(-1, 1, 1, 1) * wave


def add_noise(x: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator | None) -> Tensor:
    """``x + σ(x) n`` with ``n`` the library's colour/gray Gaussian field (unit σ)."""
    return x + gaussian_noise(x, 1.0, gray, generator) * sigma


def degrade(hr: Tensor, p: PDDMParams, config: PDDMConfig, generator: torch.Generator | None = None) -> Tensor:
    """The operator chain of Eq. 5 with parameters ``p`` (the enabled ``config.ops``, in the fixed order)."""
    r, ops = config.scale, set(config.ops)
    if "blur" in ops:
        x = blur_down(hr, p.kernel, r, config.down)
    else:
        x = imresize(hr, 1 / r) if config.down == "bicubic" else hr[..., ::r, ::r]
    if "fade" in ops:
        x = fade(x, p.gain, p.bias, p.posterize, config.levels, config.terms)
    if "noise" in ops:
        x = add_noise(x, p.sigma, p.gray, generator)
    if "jpeg" in ops:
        return jpeg_torch(x, p.quality, model="diffjpeg", rounding="cubic")  # clamps to [0, 1] first
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ network
class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def gaussian_logits(k: int, sigma: float) -> Tensor:
    """log of an isotropic Gaussian kernel (k, k) (softmax of it is the normalised kernel)."""
    ax = torch.arange(k, dtype=torch.float32) - k // 2
    return -(ax[:, None] ** 2 + ax[None] ** 2) / (2 * sigma**2)


class PDDM(nn.Module):
    """The parameter generator + the operator chain: ``pddm(hr, generator) -> lr`` (B, 3, ⌈H/r⌉, ⌈W/r⌉)."""

    def __init__(self, config: PDDMConfig | None = None):
        super().__init__()
        self.config = c = config or PDDMConfig()
        steps = max(int(math.log2(c.scale)), 0) if c.scale & (c.scale - 1) == 0 else None
        if steps is None:
            raise BlindSRError(f"P-DDM: scale must be a power of 2, not {c.scale}")
        layers: list[nn.Module] = [nn.Conv2d(3, c.width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(steps):  # to LR resolution
            layers += [nn.Conv2d(c.width, c.width, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers, *[_Res(c.width) for _ in range(c.blocks)])
        kk = c.kernel_size**2
        self.kernel_head = nn.Conv2d(c.width, kk, 1) if c.kernel == "spatial" else nn.Linear(c.width, kk)
        self.global_head = nn.Linear(c.width, 3 + 3 + 1 + 1 + 1)  # gain, bias, β, gray, quality
        self.sigma_head = nn.Conv2d(c.width, 1, 3, padding=1)
        for head in (self.kernel_head, self.global_head, self.sigma_head):
            nn.init.zeros_(head.weight)
        with torch.no_grad():  # start mild: the Gaussian kernel, no fading, no noise, quality ~ 95
            self.kernel_head.bias.copy_(gaussian_logits(c.kernel_size, c.init_sigma * c.scale / 4).flatten())
            self.global_head.bias.copy_(torch.tensor([0.0] * 6 + [-6.0, 0.0, 6.0]))
            self.sigma_head.bias.fill_(-6.0)

    def params(self, hr: Tensor) -> PDDMParams:
        c = self.config
        f = self.trunk(hr * 2 - 1)  # (B, w, ⌈H/r⌉, ⌈W/r⌉) at LR resolution
        g = f.mean((2, 3))
        b, k = hr.shape[0], c.kernel_size
        if c.kernel == "spatial":
            logits = self.kernel_head(f)
            kernel = logits.softmax(1)
        else:
            kernel = self.kernel_head(g).softmax(-1).view(b, k, k)
        gl, sl = self.global_head(g), self.sigma_head(f)
        lo, hi = c.jpeg_range
        return PDDMParams(kernel=kernel, gain=1 + 0.5 * torch.tanh(gl[:, 0:3]), bias=0.2 * torch.tanh(gl[:, 3:6]),
                          posterize=torch.sigmoid(gl[:, 6]), sigma=c.noise_max * torch.sigmoid(sl),
                          gray=torch.sigmoid(gl[:, 7]), quality=lo + (hi - lo) * torch.sigmoid(gl[:, 8]),
                          logits=gl, sigma_logits=sl)

    @staticmethod
    def saturation(p: PDDMParams) -> Tensor:
        """Mean squared excess of the heads' pre-activations over their live range (``LIVE``); 0 inside."""
        live = torch.tensor(LIVE, device=p.logits.device, dtype=p.logits.dtype)
        over = F.relu(p.logits.abs() - live).pow(2).mean()
        return over + F.relu(p.sigma_logits.abs() - LIVE_SIGMA).pow(2).mean()

    def run(self, hr: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, PDDMParams]:
        """The LR and the parameters that made it (the recipe's live-range penalty reads them)."""
        c = self.config
        lr_shape = ((hr.shape[-2] - 1) // c.scale + 1, (hr.shape[-1] - 1) // c.scale + 1)
        p = self.params(hr)
        if p.sigma.shape[-2:] != lr_shape:  # odd sizes: the strided trunk rounds differently
            p.sigma = F.interpolate(p.sigma, size=lr_shape, mode="nearest")
            if p.kernel.dim() == 4:
                p.kernel = F.interpolate(p.kernel, size=lr_shape, mode="nearest")
        return degrade(hr, p, c, generator), p

    def forward(self, hr: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``generator``: one, or one per image (image i then does not depend on the batch it is in)."""
        if isinstance(generator, list | tuple):
            return torch.cat([self(hr[i:i + 1], g) for i, g in enumerate(generator)])
        return self.run(hr, generator)[0]


class PatchDiscriminator(nn.Module):
    """An unconditional PatchGAN on LR images (real camera LR vs P-DDM output): a logit per patch."""

    def __init__(self, width: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = []
        c_in = 3
        for i in range(layers):
            c_out = width * 2**i
            mods += [nn.utils.spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2 if i < layers - 1 else 1, padding=1)),
                     nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        mods.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


__all__ = ["OPS", "LIVE", "LIVE_SIGMA", "PDDMConfig", "PDDMParams", "PDDM", "PatchDiscriminator", "blur_down", "fade", "add_noise",
           "degrade", "gaussian_logits"]

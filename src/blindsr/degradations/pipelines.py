"""Named degradation presets: ``get_preset(name, **overrides)(hr, generator) -> DegradeResult``.

| preset               | model                                                                   | source                    |
|----------------------|-------------------------------------------------------------------------|---------------------------|
| classic              | y = (k * x)↓s + n (BlindDiff Eq. 1); defaults = setting 1, noise off    | DAN/IKC SRMDPreprocessing |
| blinddiff-setting1   | iso Gaussian sigma~U[0.2, 4], 21x21, MATLAB bicubic ↓4, 8-bit           | BlindDiff yml, DANv1      |
| blinddiff-setting2   | aniso sigma~U[0.6, 5], theta~U[-pi, pi], multiplicative disturbance     | BlindDiff yml, DANv1      |
| blinddiff-real       | setting 2 kernels + noise sigma~U[0, 15] + JPEG q~U[40, 95] (p = 0.75)  | blindsr (real-photo model)|
| gaussian8            | fixed iso sigma = 1.8..3.2 (8 kernels), modcrop, bicubic ↓4 (test sets) | DAN test-set script       |
| diffbir-stage1       | blur(41, sigma [0.1, 12]) → ↓r∈[1, 12] → noise [0, 15] → JPEG [30, 100] → ↑ | DiffBIR Eq. 9 / codeformer.py |
| realesrgan           | second-order Real-ESRGAN (USM'd GT, all official ranges/probabilities)   | Real-ESRGAN x4plus yml    |
| stablesr             | Real-ESRGAN with StableSR's milder ranges, no final rounding            | StableSR v2 yml           |
| resshift             | ResShift/InvSR ImageNet-Test degradation (single order, mild)           | degradation_testing_realesrgan.yaml |
| motion-deblur        | random camera-shake kernel, scale 1, small Gaussian noise               | BlindDPS/BlindDiff deblurring |

Noise levels in configs are in 0..255 units (as in the papers); images are in [0, 1]. Every preset returns
the HR it paired with (modcropped to the scale; USM-sharpened for ``realesrgan``/``stablesr`` like RealESRNet),
the first blur kernel per sample, and JSON-serialisable per-sample parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from blindsr.degradations import jpeg as J
from blindsr.degradations import kernels as K
from blindsr.degradations import operators as O
from blindsr.errors import BlindSRError

MIXED_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # Real-ESRGAN kernel-type probabilities
RANGE_7_21 = tuple(range(7, 22, 2))  # BasicSR kernel_range = [2v + 1 for v in range(3, 11)]


@dataclass
class DegradeResult:
    lr: torch.Tensor  # (B, C, h, w) in [0, 1]
    hr: torch.Tensor  # (B, C, H, W): the target the LR pairs with (modcropped; USM'd where the preset says)
    kernel: torch.Tensor | None  # (B, kh, kw): the (first) blur kernel of each sample
    params: list[dict[str, Any]]  # per sample, JSON-serialisable


class Degradation:
    """Base class: a named preset with a dataclass ``config``; call it on HR images (B, C, H, W).

    ``progress`` (``ops.progress``: False, True or a callable) is for presets whose one image is long work (the
    ``uddm`` preset's reverse diffusion); the others ignore it."""

    def __init__(self, config, name: str):
        self.config, self.name = config, name
        self.progress = False
        self.validate()

    @property
    def scale(self) -> int:
        """HR size / LR size (1 for presets whose output keeps the input size)."""
        return int(getattr(self.config, "scale", 1))

    def validate(self) -> None:
        s = getattr(self.config, "scale", 1)
        if int(s) != s or s < 1:
            raise BlindSRError(f"preset {self.name}: scale must be a positive integer, got {s}")

    def check_input(self, hr: torch.Tensor) -> torch.Tensor:
        if hr.dim() == 3:
            hr = hr.unsqueeze(0)
        if hr.dim() != 4 or not hr.is_floating_point():
            raise BlindSRError(f"preset {self.name}: expected float images (B, C, H, W), got {tuple(hr.shape)}")
        hr = O.modcrop(hr, self.scale)
        if min(hr.shape[-2:]) < self.scale:
            raise BlindSRError(f"preset {self.name}: image {tuple(hr.shape[-2:])} is smaller than scale {self.scale}")
        return hr

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None) -> DegradeResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Degradation({self.name!r}, {self.config})"


def _u(lo: float, hi: float, g) -> float:
    return float(K.uniform(1, lo, hi, g)[0])


# ------------------------------------------------------------------------------ classic (Eq. 1)
@dataclass
class ClassicConfig:
    scale: int = 4  # s; HR is modcropped to a multiple of s
    kernel_size: int = 21  # l (DAN/IKC/BlindDiff use 21 for x4)
    sig_min: float = 0.2  # Gaussian sigma ~ U[sig_min, sig_max] (x4 setting 1: [0.2, 4.0])
    sig_max: float = 4.0
    rate_iso: float = 1.0  # probability of an isotropic kernel (setting 1: 1, setting 2: 0)
    random_disturb: bool = False  # k <- k + U(0, .25) k, renormalised (setting 2)
    downsampler: str = "bicubic"  # "bicubic" (MATLAB imresize, DAN/BlindDiff) | "stride" (x[..., ::s, ::s])
    noise_min: float = 0.0  # additive Gaussian noise sigma ~ U[noise_min, noise_max], 0..255 units (off)
    noise_max: float = 0.0
    quantize: bool = True  # round the LR to 8 bits (BlindDiff/DAN)
    jpeg_prob: float = 0.0  # probability of a JPEG round trip of the 8-bit LR, per sample (off: Eq. 1)
    jpeg_range: tuple[float, float] = (40.0, 95.0)  # quality = int(U[lo, hi])
    jpeg_backend: str = "pil"  # "pil" = a real encoder (libjpeg) | "torch"


class Classic(Degradation):
    """y = (k ⊗ x)↓s + n (BlindDiff Eq. 1) with DAN/IKC random Gaussian kernels."""

    def validate(self) -> None:
        super().validate()
        if self.config.downsampler not in ("bicubic", "stride"):
            raise BlindSRError(f"preset {self.name}: downsampler must be bicubic or stride")
        lo, hi = self.config.jpeg_range
        if not 0 <= self.config.jpeg_prob <= 1 or not 1 <= lo <= hi <= 100:
            raise BlindSRError(f"preset {self.name}: need 0 <= jpeg_prob <= 1 and 1 <= jpeg_range[0] <= "
                               f"jpeg_range[1] <= 100")

    def __call__(self, hr, generator=None):
        c = self.config
        hr = self.check_input(hr)
        b = hr.shape[0]
        k, params = K.random_gaussian_kernels(b, c.kernel_size, c.sig_min, c.sig_max, c.rate_iso,
                                              c.random_disturb, generator)
        x = O.blur(hr, k)
        x = O.imresize(x, 1 / c.scale) if c.downsampler == "bicubic" else O.downsample_stride(x, c.scale)
        sigma = K.uniform(b, c.noise_min, c.noise_max, generator)
        if c.noise_max > 0:
            x = x + O.gaussian_noise(x, sigma.to(x) / 255.0, False, generator)
        x = x.clamp(0, 1)
        x = O.quantize(x) if c.quantize else x
        for p, s in zip(params, sigma.tolist(), strict=True):
            p.update(scale=c.scale, noise_sigma=s if c.noise_max > 0 else 0.0)
        if c.jpeg_prob > 0:  # after the 8-bit rounding, as a camera would; the blur kernel stays the ground truth
            hit = K.uniform(b, 0.0, 1.0, generator) < c.jpeg_prob
            q = K.uniform(b, *c.jpeg_range, generator).long()
            x = torch.cat([J.jpeg(xi, int(qi), c.jpeg_backend) if h else xi
                           for xi, qi, h in zip(x.split(1), q.tolist(), hit.tolist(), strict=True)])
            for p, qi, h in zip(params, q.tolist(), hit.tolist(), strict=True):
                p.update(jpeg_quality=int(qi) if h else None)
        return DegradeResult(x, hr, k.to(hr), params)


# ----------------------------------------------------------------------------------- Gaussian8
@dataclass
class Gaussian8Config:
    scale: int = 4  # DAN's x4 Gaussian8 (sigma 1.8..3.2); IKC gives [0.8, 1.6] x2 and [1.35, 2.4] x3
    kernel_size: int = 21
    sigmas: tuple[float, ...] = K.GAUSSIAN8_SIGMAS  # linspace(1.8, 3.2, 8)
    kernel_index: int | None = None  # one of the 8 kernels; None: all of them (the batch grows x8)
    quantize: bool = True


class Gaussian8(Degradation):
    """Deterministic Gaussian8 test-set builder: modcrop, blur with fixed iso kernels, bicubic ↓s, 8-bit.

    With ``kernel_index=None`` sample ``i * n + j`` of the result is image ``i`` with kernel ``j`` (hr repeated).
    """

    def validate(self) -> None:
        super().validate()
        n = len(self.config.sigmas)
        ki = self.config.kernel_index
        if ki is not None and not 0 <= ki < n:
            raise BlindSRError(f"preset {self.name}: kernel_index must be in 0..{n - 1}, got {ki}")

    def __call__(self, hr, generator=None):
        c = self.config
        hr = self.check_input(hr)
        bank = K.bivariate_kernels(c.kernel_size, torch.tensor(list(c.sigmas), dtype=torch.float64))
        idx = list(range(len(c.sigmas))) if c.kernel_index is None else [c.kernel_index]
        hr = hr.repeat_interleave(len(idx), dim=0)
        ids = idx * (hr.shape[0] // len(idx))
        k = bank[ids].to(hr)
        x = O.imresize(O.blur(hr, k), 1 / c.scale).clamp(0, 1)
        x = O.quantize(x) if c.quantize else x
        params = [{"kernel_type": "iso", "kernel_index": j, "sigma": float(c.sigmas[j]), "scale": c.scale}
                  for j in ids]
        return DegradeResult(x, hr, k, params)


@dataclass
class BicubicConfig:
    scale: int = 4
    quantize: bool = True  # round to 8 bits, as a saved LR file is


class Bicubic(Degradation):
    """The plain baseline: MATLAB bicubic ↓s (antialiased), no blur kernel, no noise (``kernel`` is None)."""

    def __call__(self, hr, generator=None):
        c = self.config
        hr = self.check_input(hr)
        x = O.imresize(hr, 1 / c.scale).clamp(0, 1)
        x = O.quantize(x) if c.quantize else x
        return DegradeResult(x, hr, None, [{"scale": c.scale} for _ in range(hr.shape[0])])


# ------------------------------------------------------------------------------ DiffBIR stage 1
@dataclass
class DiffBIRStage1Config:
    kernel_size: int = 41  # blur_kernel_size
    kernel_list: tuple[str, ...] = ("iso", "aniso")
    kernel_prob: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 12.0)  # sigma_x (and sigma_y) range
    downsample_range: tuple[float, float] = (1.0, 12.0)  # r; LR size = floor(size / r)
    noise_range: tuple[float, float] = (0.0, 15.0)  # Gaussian sigma, 0..255 units, colour
    jpeg_range: tuple[float, float] = (30.0, 100.0)  # quality = int(U[30, 100])
    resize_back: bool = True  # resize to the input size (the stage-1 model works at HR size)
    resize_mode: str = "bilinear"  # cv2.INTER_LINEAR in the official code (no antialias)
    jpeg_backend: str = "pil"  # "pil" = a real encoder (official: cv2.imencode) | "torch"


class DiffBIRStage1(Degradation):
    """DiffBIR Eq. 9 (CodeFormer-style first order): blur -> ↓r -> noise -> JPEG -> ↑r (per sample)."""

    def __call__(self, hr, generator=None):
        c = self.config
        hr = self.check_input(hr)
        outs, ks, params = [], [], []
        for x in hr.split(1):
            h, w = x.shape[-2:]
            k, p = K.random_mixed_kernel(c.kernel_size, c.kernel_list, c.kernel_prob, c.blur_sigma,
                                         generator=generator)
            y = O.blur(x, k)
            r = _u(*c.downsample_range, generator)
            y = O.resize(y, (int(h // r), int(w // r)), c.resize_mode)
            sigma = _u(*c.noise_range, generator)
            y = O.add_gaussian_noise(y, sigma / 255.0, False, generator)
            q = int(_u(*c.jpeg_range, generator))
            y = J.jpeg(y, q, c.jpeg_backend)
            if c.resize_back:
                y = O.resize(y, (h, w), c.resize_mode).clamp(0, 1)
            p.update(downsample=r, noise_sigma=sigma, jpeg_quality=q)
            outs.append(y), ks.append(k), params.append(p)
        lr = torch.cat(outs) if c.resize_back else _stack_or_list(outs)
        return DegradeResult(lr, hr, torch.stack(ks).to(hr), params)


def _stack_or_list(xs: list[torch.Tensor]) -> torch.Tensor:
    if len({tuple(x.shape) for x in xs}) != 1:
        raise BlindSRError("resize_back=False gives a different LR size per sample; degrade one image at a time")
    return torch.cat(xs)


# ------------------------------------------------------------------- Real-ESRGAN second order
@dataclass
class RealESRGANConfig:
    scale: int = 4
    use_usm: bool = True  # degrade USM(gt) and return USM(gt) as hr (gt_usm: True, RealESRNet)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    # first-order kernel (dataset side)
    kernel_sizes: tuple[int, ...] = RANGE_7_21  # kernel size drawn from these, zero-padded to kernel_pad
    kernel_pad: int = 21
    kernel_list: tuple[str, ...] = K.MIXED_TYPES
    kernel_prob: tuple[float, ...] = MIXED_PROB
    sinc_prob: float = 0.1  # omega_c ~ U[pi/3, pi] if size < 13 else U[pi/5, pi]
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    # second-order kernel
    kernel_sizes2: tuple[int, ...] = RANGE_7_21
    kernel_pad2: int = 21
    kernel_list2: tuple[str, ...] = K.MIXED_TYPES
    kernel_prob2: tuple[float, ...] = MIXED_PROB
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    # final sinc (else a delta): omega_c ~ U[pi/3, pi]
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = RANGE_7_21
    final_sinc_pad: int = 21
    # first degradation
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # 0..255 units
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_order_prob: float = 1.0  # Real-ESRGAN: always; ResShift: a probability
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)  # relative to the final LR size
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)  # the final JPEG
    final_round: bool = True  # lq = round(255 out) / 255
    jpeg_backend: str = "torch"  # official: DiffJPEG(differentiable=False); "pil": a real encoder
    jpeg_model: str = "diffjpeg"  # torch backend: "diffjpeg" (official) | "libjpeg" (closer to a real codec)


class RealESRGAN(Degradation):
    """Real-ESRGAN's second-order pipeline (also StableSR's and ResShift's variants), one sample at a time so
    random resizes can differ per sample and each sample's draws are independent of the batch."""

    def _kernel(self, sizes, pad, klist, kprob, sinc_prob, sigma, betag, betap, g):
        size = K.choice(list(sizes), g)
        if K.rand01(g) < sinc_prob:
            wc = _u(math.pi / 3, math.pi, g) if size < 13 else _u(math.pi / 5, math.pi, g)
            k, p = K.circular_lowpass_kernel(wc, size), {"kernel_type": "sinc", "kernel_size": size, "omega_c": wc}
        else:
            k, p = K.random_mixed_kernel(size, klist, kprob, sigma, betag_range=betag, betap_range=betap,
                                         generator=g)
        return K.pad_kernel(k, pad), p

    def _resize_noise(self, x, size_fn, probs, rng, gauss_p, noise, poisson, gray_p, g, p: dict, tag: str):
        kind = K.choice(["up", "down", "keep"], g, probs)
        s = _u(1, rng[1], g) if kind == "up" else _u(rng[0], 1, g) if kind == "down" else 1.0
        mode = K.choice(list(self.config.resize_modes), g)
        x = O.resize(x, size_fn(s), mode)
        gray = float(K.rand01(g) < gray_p)
        if K.rand01(g) < gauss_p:
            sigma = _u(*noise, g)
            x = O.add_gaussian_noise(x, sigma / 255.0, gray, g)
            p[f"noise{tag}"] = {"type": "gaussian", "sigma": sigma, "gray": bool(gray)}
        else:
            sc = _u(*poisson, g)
            x = O.add_poisson_noise(x, sc, gray, g)
            p[f"noise{tag}"] = {"type": "poisson", "scale": sc, "gray": bool(gray)}
        p[f"resize{tag}"] = {"scale": s, "mode": mode}
        return x

    def _jpeg(self, x, rng, g):
        q = _u(*rng, g)
        q = float(int(q)) if self.config.jpeg_backend == "pil" else q
        kw = {"model": self.config.jpeg_model} if self.config.jpeg_backend == "torch" else {}
        return J.jpeg(x.clamp(0, 1), q, self.config.jpeg_backend, **kw), q

    def _one(self, gt: torch.Tensor, g) -> tuple[torch.Tensor, torch.Tensor, dict]:
        c = self.config
        h, w = gt.shape[-2:]
        k1, p1 = self._kernel(c.kernel_sizes, c.kernel_pad, c.kernel_list, c.kernel_prob, c.sinc_prob,
                              c.blur_sigma, c.betag_range, c.betap_range, g)
        k2, p2 = self._kernel(c.kernel_sizes2, c.kernel_pad2, c.kernel_list2, c.kernel_prob2, c.sinc_prob2,
                              c.blur_sigma2, c.betag_range2, c.betap_range2, g)
        if K.rand01(g) < c.final_sinc_prob:
            size, wc = K.choice(list(c.final_sinc_sizes), g), _u(math.pi / 3, math.pi, g)
            sinc, ps = K.circular_lowpass_kernel(wc, size, c.final_sinc_pad), {"kernel_size": size, "omega_c": wc}
        else:
            sinc, ps = K.pad_kernel(torch.ones(1, 1), c.final_sinc_pad), None
        p: dict[str, Any] = {"kernel1": p1}
        # first order
        x = O.blur(gt, k1)
        x = self._resize_noise(x, lambda s: (int(h * s), int(w * s)), c.resize_prob, c.resize_range,
                               c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob,
                               g, p, "1")
        x, p["jpeg1"] = self._jpeg(x, c.jpeg_range, g)
        # second order
        p["second_order"] = K.rand01(g) < c.second_order_prob
        if p["second_order"]:
            if K.rand01(g) < c.second_blur_prob:
                x, p["kernel2"] = O.blur(x, k2), p2
            x = self._resize_noise(x, lambda s: (int(h / c.scale * s), int(w / c.scale * s)), c.resize_prob2,
                                   c.resize_range2, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2,
                                   c.gray_noise_prob2, g, p, "2")
        # final: [resize back + sinc] then JPEG, or JPEG then [resize back + sinc], p = 1/2 each
        mode = K.choice(list(c.resize_modes), g)
        size = (h // c.scale, w // c.scale)
        p["final_sinc"], p["final_resize_mode"] = ps, mode
        if K.rand01(g) < 0.5:
            p["final_order"] = "resize-sinc-jpeg"
            x = O.blur(O.resize(x, size, mode), sinc)
            x, p["jpeg2"] = self._jpeg(x, c.jpeg_range2, g)
        else:
            p["final_order"] = "jpeg-resize-sinc"
            x, p["jpeg2"] = self._jpeg(x, c.jpeg_range2, g)
            x = O.blur(O.resize(x, size, mode), sinc)
        x = x.clamp(0, 1)
        x = O.quantize(x) if c.final_round else x
        p["scale"] = c.scale
        return x, k1, p

    def __call__(self, hr, generator=None):
        hr = self.check_input(hr)
        if min(hr.shape[-2:]) < 2 * self.scale:
            raise BlindSRError(f"preset {self.name}: image {tuple(hr.shape[-2:])} is too small")
        gt = O.usm_sharp(hr) if self.config.use_usm else hr
        outs = [self._one(x, generator) for x in gt.split(1)]
        lr = torch.cat([o[0] for o in outs])
        return DegradeResult(lr, gt, torch.stack([o[1] for o in outs]).to(hr), [o[2] for o in outs])


def stablesr_config() -> RealESRGANConfig:
    """StableSR's milder Real-ESRGAN ranges (v2-finetune_text_T_512.yaml; issue #27/#76)."""
    return RealESRGANConfig(
        blur_sigma=(0.2, 1.5), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
        blur_sigma2=(0.2, 1.0), betag_range2=(0.5, 2.0), betap_range2=(1.0, 1.5),
        resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0),
        second_blur_prob=0.5, resize_range2=(0.6, 1.2), noise_range2=(1.0, 12.0),
        poisson_scale_range2=(0.05, 1.0), jpeg_range2=(60.0, 100.0), final_round=False)


def resshift_config() -> RealESRGANConfig:
    """ResShift/InvSR ImageNet-Test degradation (configs/degradation_testing_realesrgan.yaml): kernel sizes
    range(3, 13, 2) padded to 13, second kernel / final sinc sizes range(3, 7, 2) padded to 7, no USM,
    second order off. (The test-set GT is SmallestMaxSize + CenterCrop 256 (ResShift) / 512 (InvSR) first.)"""
    only_gauss = (0.6, 0.4, 0.0, 0.0, 0.0, 0.0)
    return RealESRGANConfig(
        use_usm=False,
        kernel_sizes=(3, 5, 7, 9, 11), kernel_pad=13, kernel_prob=only_gauss, sinc_prob=0.1,
        blur_sigma=(0.2, 0.8), betag_range=(1.0, 1.5), betap_range=(1.0, 1.2),
        kernel_sizes2=(3, 5), kernel_pad2=7, kernel_prob2=only_gauss, sinc_prob2=0.0,
        blur_sigma2=(0.2, 0.5), betag_range2=(0.5, 0.8), betap_range2=(1.0, 1.2),
        final_sinc_prob=0.2, final_sinc_sizes=(3, 5), final_sinc_pad=7,
        resize_range=(0.5, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 0.3), jpeg_range=(70.0, 95.0),
        second_order_prob=0.0, second_blur_prob=0.2, resize_range2=(0.8, 1.2), noise_range2=(1.0, 10.0),
        poisson_scale_range2=(0.05, 0.2), jpeg_range2=(80.0, 100.0))


# ------------------------------------------------------------------------------- motion deblur
@dataclass
class MotionDeblurConfig:
    kernel_size: int = 21  # MCFormer's kernel head predicts 21x21 (BlindDPS uses 64x64 with its own prior)
    intensity: float = 0.5  # trajectory intensity (BlindDPS motion-blur setting)
    noise_sigma: float = 2.55  # Gaussian noise sigma, 0..255 units (BlindDPS: 0.02 on [-1, 1])
    quantize: bool = True


class MotionDeblur(Degradation):
    """y = k ⊗ x + n with a random camera-shake kernel, scale 1 (BlindDiff's deblurring extension)."""

    def __call__(self, hr, generator=None):
        c = self.config
        hr = self.check_input(hr)
        k, params = K.random_motion_kernels(hr.shape[0], c.kernel_size, c.intensity, generator=generator)
        x = O.blur(hr, k)
        if c.noise_sigma > 0:
            x = x + O.gaussian_noise(x, c.noise_sigma / 255.0, False, generator)
        x = x.clamp(0, 1)
        x = O.quantize(x) if c.quantize else x
        for p in params:
            p.update(noise_sigma=c.noise_sigma, scale=1)
        return DegradeResult(x, hr, k.to(hr), params)


# ------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class PresetSpec:
    """A named degradation: its class, the factory of its default config and a one-line description."""

    cls: type[Degradation]
    config: Any  # () -> config dataclass
    description: str


# Each is registered by name in blindsr.registry (REGISTRY["preset"]).
CLASSIC = PresetSpec(Classic, ClassicConfig, "y = (k*x)↓s + n with random Gaussian kernels (BlindDiff Eq. 1)")
BLINDDIFF_SETTING1 = PresetSpec(Classic, ClassicConfig, "iso Gaussian sigma in [0.2, 4], 21x21, bicubic x4")
BLINDDIFF_SETTING2 = PresetSpec(Classic, lambda: ClassicConfig(sig_min=0.6, sig_max=5.0, rate_iso=0.0,
                                                               random_disturb=True),
                                "aniso Gaussian sigma in [0.6, 5] with disturbance, 21x21, bicubic x4")
BLINDDIFF_REAL = PresetSpec(Classic, lambda: ClassicConfig(sig_min=0.6, sig_max=5.0, rate_iso=0.0,
                                                           random_disturb=True, noise_max=15.0, jpeg_prob=0.75),
                            "setting 2 kernels + Gaussian noise sigma in [0, 15] + JPEG q in [40, 95] (p 0.75), x4")
BICUBIC = PresetSpec(Bicubic, BicubicConfig, "MATLAB bicubic ↓s only (the baseline pairs), x4")
GAUSSIAN8 = PresetSpec(Gaussian8, Gaussian8Config, "fixed iso kernels sigma 1.8..3.2, bicubic x4 (test sets)")
DIFFBIR_STAGE1 = PresetSpec(DiffBIRStage1, DiffBIRStage1Config, "blur/down/noise/JPEG/up first order (DiffBIR Eq. 9)")
REALESRGAN = PresetSpec(RealESRGAN, RealESRGANConfig, "Real-ESRGAN second-order degradation, x4")
STABLESR = PresetSpec(RealESRGAN, stablesr_config, "Real-ESRGAN with StableSR's milder ranges, x4")
RESSHIFT = PresetSpec(RealESRGAN, resshift_config, "ResShift/InvSR ImageNet-Test degradation, x4")
MOTION_DEBLUR = PresetSpec(MotionDeblur, MotionDeblurConfig, "random motion blur + small noise, scale 1")


def register_preset(name: str, spec: PresetSpec | str) -> None:
    """Make ``name`` a preset everywhere presets are accepted (``get_preset``, ``data.degradation``, the CLI of
    this process): ``spec`` is a :class:`PresetSpec` or ``"module:attr"`` naming one (imported when used).
    A learned degradation (e.g. one trained by UDDM) becomes a preset this way."""
    from blindsr import registry

    registry.register("preset", name, spec)


def _spec(name: str) -> PresetSpec:
    from blindsr import registry

    if name not in registry.names("preset"):
        raise BlindSRError(f"unknown degradation preset {name!r}; choose one of: {', '.join(list_presets())}")
    return registry.resolve("preset", name)


def list_presets() -> list[str]:
    """Names accepted by ``get_preset``."""
    from blindsr import registry

    return registry.names("preset")


def describe_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {k: _spec(k).description for k in list_presets()}


def preset_config(name: str):
    """The default config dataclass of a preset."""
    return _spec(name).config()


def get_preset(name: str, **overrides) -> Degradation:
    """A preset with its paper defaults, any config field overridden by keyword (unknown ones are errors)."""
    from blindsr.config import from_dict, to_dict

    cfg = preset_config(name)
    valid = [f.name for f in fields(cfg)]
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise BlindSRError(f"preset {name}: unknown option(s) {', '.join(bad)}; valid: {', '.join(valid)}")
    return _spec(name).cls(from_dict(type(cfg), {**to_dict(cfg), **overrides}, f"preset {name}"), name)


def config_dict(d: Degradation) -> dict[str, Any]:
    """The preset's config as a JSON-serialisable dict (for manifests)."""
    from blindsr.config import to_dict

    return to_dict(d.config)


__all__ = ["DegradeResult", "Degradation", "PresetSpec", "get_preset", "list_presets", "describe_presets",
           "preset_config", "config_dict", "register_preset"]

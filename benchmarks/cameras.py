"""Camera simulators for issue 12's UDDM protocol: HR scene -> the LR photo a given camera would take (x4).

There is no real paired camera data here, so these stand in for "a user's camera". Each one is a small physical
chain, in the order a real camera applies it, and they differ in every stage:

    sRGB scene -> linear light -> lens PSF (per colour: chromatic aberration) -> sensor sampling x4
    (area integration or point sampling) -> Bayer RGGB mosaic -> Poisson-Gaussian sensor noise (shot a*x + read b,
    in linear raw) -> demosaicing (bilinear, or nearest for a cheap pipeline) -> white-balance/colour matrix ->
    gamma + tone curve -> ISP denoise (Gaussian) -> ISP sharpening (unsharp mask) -> 8-bit JPEG (Pillow, 4:2:0)

| camera  | optics                         | sampling | noise (a, b)      | demosaic | ISP                     | JPEG |
|---------|--------------------------------|----------|-------------------|----------|-------------------------|------|
| phone   | Gaussian, sigma 1.0/1.1/1.3 px | area     | 0.006, 4e-5       | bilinear | sharpen 0.8             | 82   |
| compact | defocus disk r 1.8 + Gaussian  | area     | 0.010, 2e-4       | bilinear | denoise 0.8, sharpen .4 | 65   |
| webcam  | anisotropic Gaussian 0.8 x 0.4 | point    | 0.008, 2e-4       | nearest  | none                    | 45   |

Every draw comes from a generator seeded by (camera, file name), so a photo is the same each time.

    python benchmarks/cameras.py --camera phone --input HR_DIR --output LR_DIR [--hr-output HR_MODCROP_DIR]
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from blindsr.degradations.jpeg import jpeg_pil
from blindsr.degradations.kernels import gaussian_kernel
from blindsr.degradations.operators import blur, modcrop, usm_sharp

SCALE = 4


@dataclass(frozen=True)
class Camera:
    psf_sigma: tuple[float, float, float]  # Gaussian PSF sigma per channel (R, G, B), HR pixels
    psf_ratio: float = 1.0                 # minor / major axis of the Gaussian (1 = isotropic)
    psf_theta: float = 0.0                 # its orientation, radians
    defocus: float = 0.0                   # radius of a defocus disk convolved with the Gaussian (HR px; 0 = none)
    sampling: str = "area"                 # "area" (pixel integration) | "point" (centre sample: aliasing)
    shot: float = 0.0                      # Poisson-Gaussian noise: var = shot * x + read (linear raw, [0, 1])
    read: float = 0.0
    demosaic: str = "bilinear"             # bilinear | nearest
    color_matrix: float = 0.0              # saturation change of the colour matrix (0 = identity)
    tone: float = 0.0                      # S-curve strength after gamma
    denoise: float = 0.0                   # ISP Gaussian denoise sigma (LR px; 0 = off)
    sharpen: float = 0.0                   # ISP unsharp-mask amount (0 = off)
    quality: int = 90                      # JPEG quality


CAMERAS: dict[str, Camera] = {
    "phone": Camera(psf_sigma=(1.0, 1.1, 1.3), shot=0.006, read=4e-5, color_matrix=0.15, tone=0.2,
                    sharpen=0.8, quality=82),
    "compact": Camera(psf_sigma=(0.9, 0.9, 1.1), defocus=1.8, shot=0.010, read=2e-4, color_matrix=-0.1,
                      tone=0.1, denoise=0.8, sharpen=0.4, quality=65),
    "webcam": Camera(psf_sigma=(0.8, 0.8, 0.8), psf_ratio=0.5, psf_theta=0.6, sampling="point", shot=0.008,
                     read=2e-4, demosaic="nearest", color_matrix=-0.2, quality=45),
}


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8) ** (1 / 2.4) - 0.055)


def psf(cam: Camera, channel: int) -> torch.Tensor:
    """The lens PSF of one colour channel (HR pixels): a Gaussian, optionally convolved with a defocus disk."""
    sx = cam.psf_sigma[channel]
    k = gaussian_kernel(21, sx, sx * cam.psf_ratio, cam.psf_theta)
    if cam.defocus > 0:
        ax = torch.arange(21, dtype=torch.float64) - 10
        disk = ((ax[:, None] ** 2 + ax[None, :] ** 2) <= cam.defocus**2).to(torch.float64)
        k = F.conv2d(k[None, None].to(torch.float64), (disk / disk.sum())[None, None], padding=10)[0, 0]
    return (k / k.sum()).float()


def bayer_masks(h: int, w: int) -> torch.Tensor:
    """(3, h, w) RGGB masks: R at (even, even), G at (even, odd) and (odd, even), B at (odd, odd)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = (y % 2 == 0) & (x % 2 == 0)
    b = (y % 2 == 1) & (x % 2 == 1)
    return torch.stack([r, ~(r | b), b]).float()


def demosaic(raw: torch.Tensor, masks: torch.Tensor, how: str) -> torch.Tensor:
    """(1, 3, h, w) masked raw -> full colour: normalised convolution (bilinear) or 2x2 block copy (nearest)."""
    if how == "bilinear":
        k = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])[None, None].expand(3, 1, 3, 3)
        num = F.conv2d(F.pad(raw, (1,) * 4, mode="reflect"), k, groups=3)
        den = F.conv2d(F.pad(masks[None], (1,) * 4, mode="reflect"), k, groups=3)
        return num / den
    if how == "nearest":  # every 2x2 cell gets its R, mean G and B
        cell = F.avg_pool2d(raw, 2) / F.avg_pool2d(masks[None], 2)
        return F.interpolate(cell, scale_factor=2, mode="nearest")
    raise ValueError(f"unknown demosaic {how!r}")


def capture(hr: torch.Tensor, cam: Camera, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) sRGB HR in [0, 1] (H, W multiples of 8) -> (3, H/4, W/4) LR photo in [0, 1] (8-bit values)."""
    x = srgb_to_linear(hr)[None]
    x = torch.cat([blur(x[:, c:c + 1], psf(cam, c)) for c in range(3)], dim=1)       # optics
    if cam.sampling == "area":                                                         # the sensor
        x = F.avg_pool2d(x, SCALE)
    else:
        x = x[..., SCALE // 2::SCALE, SCALE // 2::SCALE]
    h, w = x.shape[-2:]
    masks = bayer_masks(h, w)
    raw = (x * masks).sum(1, keepdim=True)                                             # one value per photosite
    std = (cam.shot * raw.clamp_min(0) + cam.read).sqrt()
    raw = (raw + std * torch.randn(raw.shape, generator=generator)).clamp(0, 1)
    x = demosaic(raw * masks[None], masks, cam.demosaic)
    gray = x.mean(1, keepdim=True)
    x = (gray + (1 + cam.color_matrix) * (x - gray)).clamp(0, 1)                        # colour matrix
    x = linear_to_srgb(x)
    if cam.tone:
        x = x + cam.tone * x * (1 - x) * (2 * x - 1)                                    # S-curve around 0.5
        x = x.clamp(0, 1)
    if cam.denoise:
        x = blur(x, gaussian_kernel(7, cam.denoise))
    if cam.sharpen:
        x = usm_sharp(x, weight=cam.sharpen, radius=5, threshold=2)
    return jpeg_pil(x, cam.quality)[0]


def camera_generator(camera: str, name: str, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{camera}/{name}/{seed}".encode()))


def prepare_hr(hr: torch.Tensor) -> torch.Tensor:
    """HR crop to a multiple of 2·scale (so the Bayer grid tiles the LR image exactly)."""
    return modcrop(hr[None], 2 * SCALE)[0]


def main() -> None:
    from blindsr.io.images import list_images, read_image, write_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--camera", required=True, choices=sorted(CAMERAS))
    ap.add_argument("--input", required=True, type=Path)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--hr-output", type=Path, help="also write the cropped HR ground truth here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    files = list_images([args.input])[0]
    for f in files:
        hr = prepare_hr(read_image(f))
        lr = capture(hr, CAMERAS[args.camera], camera_generator(args.camera, f.name, args.seed))
        write_image(args.output / f"{f.stem}.png", lr, overwrite=True)
        if args.hr_output:
            write_image(args.hr_output / f"{f.stem}.png", hr, overwrite=True)
    print(f"{args.camera}: {len(files)} images -> {args.output}")


if __name__ == "__main__":
    main()

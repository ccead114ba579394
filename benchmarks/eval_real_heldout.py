"""Held-out comparison of BlindDiff models on realistic degradations (how the real-photo default was chosen).

    python benchmarks/eval_real_heldout.py --models blinddiff-s blinddiff-s-real \
        --restorer realesrgan_x4plus.safetensors --presets realesrgan blinddiff-real --crop 192

The held-out images are the 9 train-hr photos that no shipped model trained on (``val_fraction 0.05`` of
``configs/blinddiff_s_real.yaml``, the same split as BlindDiff-S). Each is centre-cropped to ``--crop`` HR
pixels and degraded once per preset with a fixed seed (the same LR for every method). Rows: bicubic, each
BlindDiff model with its own sampling defaults (seed 0), and optionally an x4 restorer (the converted
RealESRGAN-x4plus, DiffBIR's stage 1). PSNR/SSIM on Y (BT.601), border 4; ``--json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations.operators import imresize  # noqa: E402
from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.io.images import read_image, write_bytes_atomic  # noqa: E402
from blindsr.methods.blinddiff import load_pipeline  # noqa: E402
from blindsr.metrics import psnr, ssim  # noqa: E402
from blindsr.train.common import split_data  # noqa: E402
from blindsr.train.config import load_config  # noqa: E402
from blindsr.weights import EMBEDDED, embedded_path  # noqa: E402


def heldout_crops(crop: int) -> list[tuple[str, torch.Tensor]]:
    cfg = load_config(REPO / "configs" / "blinddiff_s_real.yaml", [f"data.root={REPO.parent / 'shared/data/train-hr'}"])
    _, held = split_data(cfg)
    out = []
    for f in held:
        img = read_image(f)
        h, w = img.shape[-2:]
        c = min(crop, h, w) // 4 * 4
        top, left = (h - c) // 2, (w - c) // 2
        out.append((f.stem, img[:, top:top + c, left:left + c]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(EMBEDDED), help="embedded names or checkpoint paths")
    ap.add_argument("--restorer", help="an x4 RRDBNet checkpoint (e.g. the converted RealESRGAN-x4plus)")
    ap.add_argument("--presets", nargs="+", default=["realesrgan", "blinddiff-real"])
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--images", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    crops = heldout_crops(args.crop)[: args.images]
    methods = {"bicubic": lambda lr, g: imresize(lr, scale=4).clamp(0, 1)}
    for m in args.models:
        pipe = load_pipeline(embedded_path(m) if m in EMBEDDED else m)
        methods[m] = lambda lr, g, pipe=pipe: pipe(lr, generator=g).sr
    if args.restorer:
        from blindsr.models.restorers import load_restorer

        net = load_restorer("realesrgan", args.restorer)
        methods["RealESRGAN-x4plus"] = lambda lr, g: net(lr).clamp(0, 1)
    results: dict = {}
    print(f"# {len(crops)} held-out train-hr crops of {args.crop}², seed 0; PSNR (dB) / SSIM, Y, border 4")
    for preset in args.presets:
        deg = get_preset(preset)
        pairs = []
        for i, (name, hr) in enumerate(crops):
            r = deg(hr[None], torch.Generator().manual_seed(1000 + i))
            pairs.append((name, r.lr, hr[None]))  # the photo itself (realesrgan degrades a USM-sharpened copy)
        for method, fn in methods.items():
            t0, ps, ss = time.perf_counter(), [], []
            for _name, lr, hr in pairs:
                with torch.no_grad() if method in ("bicubic", "RealESRGAN-x4plus") else torch.enable_grad():
                    sr = fn(lr, torch.Generator().manual_seed(0))[0]
                ps.append(psnr(sr, hr[0], crop_border=4, y_channel=True))
                ss.append(ssim(sr, hr[0], crop_border=4, y_channel=True))
            p, s = sum(ps) / len(ps), sum(ss) / len(ss)
            results.setdefault(preset, {})[method] = {"psnr": p, "ssim": s, "per_image_psnr": ps}
            print(f"{preset:15s} {method:22s} {p:6.2f} / {s:.4f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        write_bytes_atomic(Path(args.json), json.dumps(results, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

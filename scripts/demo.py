"""`make demo`: super-resolve two images with the default embedded model, offline, and show the results.

1. the bundled example `examples/lr/zebra_g8sigma2.6_x4.png` (a Set14 crop blurred with the Gaussian8 kernel
   sigma=2.6, x4 bicubic-downsampled; its HR is in examples/hr/), and
2. a real-world photo at full size: RealSRSet's Lincoln.png, 160x160 -> 640x640 (from ../shared/data/real-lr;
   skipped with a note if absent). The output is tiled automatically to stay within the default 3 GiB.

Runs `blindsr sr` (the CLI, in-process) with no model flags, then writes per image a side-by-side comparison
PNG (bicubic | the model | HR when known, plus the estimated kernel) and prints PSNR (Y channel, border 4).
Outputs go to demo-output/. Budget: <= 90 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]

REAL_PHOTO = "Lincoln.png"  # RealSRSet image, uncropped (160x160)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default=str(REPO / "demo-output"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    args = ap.parse_args()

    import torch

    from blindsr.cli.main import main as blindsr
    from blindsr.degradations.operators import imresize
    from blindsr.io.images import read_image, write_image
    from blindsr.io.visual import contact_sheet, kernel_image
    from blindsr.metrics import psnr
    from blindsr.weights import DEFAULT_MODEL as name

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.output)
    inputs = out / "inputs"
    # 1. inputs: the bundled example and a crop of a real photo
    example = REPO / "examples" / "lr" / "zebra_g8sigma2.6_x4.png"
    hr_of = {example.stem: REPO / "examples" / "hr" / example.name}
    write_image(inputs / example.name, read_image(example), overwrite=True)
    real = Path(args.data) / "real-lr" / "RealSRSet" / REAL_PHOTO
    if real.is_file():
        write_image(inputs / f"realsrset_{real.stem}.png", read_image(real), overwrite=True)
    else:
        print(f"note: {real} not found; the real-photo part of the demo is skipped")

    # 2. blindsr sr with the default model (no --ckpt)
    print("$ blindsr sr demo-output/inputs -o demo-output/sr --save-kernel --overwrite --seed 0")
    argv = [str(inputs), "-o", str(out / "sr"), "--save-kernel", "--overwrite", "--seed", "0", "--device", "cpu"]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    rc = blindsr(["sr", *argv])
    if rc:
        return rc

    # 3. comparisons: bicubic | the default model | HR (when known) | estimated kernel
    for lr_path in sorted(inputs.glob("*.png")):
        lr = read_image(lr_path)
        bicubic = imresize(lr[None], scale=4)[0].clamp(0, 1)
        sr = read_image(out / "sr" / lr_path.name)
        kernel = torch.from_numpy(__import__("numpy").load(out / "sr" / f"{lr_path.stem}_kernel.npy"))
        panels, labels = [bicubic, sr], ["input, bicubic x4", f"{name} x4"]
        line = f"{lr_path.name}: {tuple(lr.shape[-2:])} -> {tuple(sr.shape[-2:])}"
        hr_path = hr_of.get(lr_path.stem)
        if hr_path is not None:
            hr = read_image(hr_path)
            pb, ps = (psnr(x, hr, crop_border=4, y_channel=True) for x in (bicubic, sr))
            labels = [f"bicubic {pb:.2f} dB", f"{name} {ps:.2f} dB"]
            panels.append(hr)
            labels.append("HR")
            line += f"; PSNR (Y, border 4): bicubic {pb:.2f} dB, {name} {ps:.2f} dB"
        k = kernel_image(kernel, size=sr.shape[-1] // 2)
        panels.append(k)
        labels.append("estimated kernel")
        sheet = out / f"compare_{lr_path.stem}.png"
        contact_sheet(panels, labels, sheet, height=sr.shape[-2], overwrite=True)
        print(line + f"\n  comparison: {sheet.relative_to(REPO) if sheet.is_relative_to(REPO) else sheet}")
    print(f"demo finished in {time.perf_counter() - T0:.1f} s (outputs in {out})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())

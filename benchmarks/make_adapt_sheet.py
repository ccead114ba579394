"""Before/after sheet of ``blindsr adapt`` on real photos: bicubic x4 | each adapted SR model, 1:1 centre crops.

    .venv/bin/python benchmarks/make_adapt_sheet.py \
        "8 + 4 min=runs/adapt_realsrset/srnet/final.safetensors" \
        "40 + 15 min (defaults)=runs/adapt_realsrset_full/srnet/final.safetensors" \
        --photos Lincoln oldphoto2 comic1 building --out docs/images/adapt_realsrset.png

Each photo is super-resolved uncropped (as ``blindsr sr --ckpt``), then every panel shows the same centre crop of
``--crop`` output pixels, so what is compared is seen at 1:1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.data.datasets import centre_crop  # noqa: E402
from blindsr.degradations.operators import imresize  # noqa: E402
from blindsr.io.images import read_image  # noqa: E402
from blindsr.io.visual import contact_grid  # noqa: E402
from blindsr.methods.srnet.pipeline import load_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=CKPT (an SR model of blindsr adapt / train srnet)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "real-lr" / "RealSRSet")
    ap.add_argument("--photos", nargs="+", default=["Lincoln", "oldphoto2", "comic1", "building"])
    ap.add_argument("--crop", type=int, default=384, help="side of the 1:1 centre crop, in output pixels")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "adapt_realsrset.png")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    pipes = {label: load_pipeline(ckpt) for label, _, ckpt in (m.partition("=") for m in args.models)}
    rows, labels = [], []
    for photo in args.photos:
        lr = read_image(args.data / f"{photo}.png")[:3][None]
        rows.append([centre_crop(imresize(lr, scale=4).clamp(0, 1)[0], args.crop)]
                    + [centre_crop(pipe(lr).sr[0].clamp(0, 1), args.crop) for pipe in pipes.values()])
        labels.append([f"{photo}: bicubic x4"] + [f"{photo}: adapt, {label}" for label in pipes])
        print(f"{photo} done", flush=True)
    contact_grid(rows, labels, args.out, overwrite=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

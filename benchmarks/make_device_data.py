"""Pack the training and test images for a GPU machine that only receives the repository (<= 64 MiB in all).

    python benchmarks/make_device_data.py            # -> .device-data/{train-hr,val/Set5,val/Set14}
    python benchmarks/make_device_data.py --init bd=src/blindsr/weights/blinddiff_s.safetensors \
        --init reg=benchmarks/weights/regression_s.safetensors   # + .device-data/init/{bd,reg}.safetensors

train-hr, Set5 and Set14 are re-encoded as *lossless* WebP (72 MB of PNG -> ~49 MB; every file is read back with
blindsr's reader and must be pixel-identical). The hold-out split does not change: files are sorted by name and every
file gets the same suffix. ``--init`` adds fp16 copies of checkpoints to fine-tune from (half the bytes; a relative
rounding of <= 2^-11 per weight, far below one optimiser step); two fp32 copies would not fit beside the images.
``.device-data/`` is git-ignored; carry it with the run (see benchmarks/gpu_retrain_eval.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default=str(REPO / ".device-data"))
    ap.add_argument("--init", action="append", default=[], metavar="NAME=PATH",
                    help="also write an fp16 copy of checkpoint PATH to OUT/init/NAME.safetensors")
    args = ap.parse_args()
    import torch
    from PIL import Image
    from safetensors.torch import load_file, safe_open, save_file

    from blindsr.io.images import read_image

    src, out = Path(args.data), Path(args.out)
    for sub in ("train-hr", "val/Set5", "val/Set14"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob("*.png")):
            dst = out / sub / (f.stem + ".webp")
            if not dst.exists():
                with Image.open(f) as im:
                    im.convert("RGB").save(dst, lossless=True, quality=100, method=6)
                if not torch.equal(read_image(dst), read_image(f)):  # lossless means lossless
                    dst.unlink()
                    raise SystemExit(f"{dst}: WebP round trip is not exact")
    for spec in args.init:
        name, _, path = spec.partition("=")
        with safe_open(path, "pt") as fh:
            meta = fh.metadata()
        half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        (out / "init").mkdir(exist_ok=True)
        save_file(half, str(out / "init" / f"{name}.safetensors"), metadata=meta)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

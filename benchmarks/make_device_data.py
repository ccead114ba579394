"""Pack the training and test images for a GPU machine that only receives the repository (<= 64 MiB in all).

    python benchmarks/make_device_data.py            # -> .device-data/{train-hr,val/Set5,val/Set14}

train-hr is re-encoded as *lossless* WebP (66 MB of PNG -> ~43 MB, pixel-identical); Set5/Set14 are copied.
The hold-out split does not change: files are sorted by name and every file gets the same suffix.
``.device-data/`` is git-ignored; carry it with the run (see benchmarks/gpu_retrain_eval.sh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default=str(REPO / ".device-data"))
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    src, out = Path(args.data), Path(args.out)
    (out / "train-hr").mkdir(parents=True, exist_ok=True)
    for f in sorted((src / "train-hr").glob("*.png")):
        dst = out / "train-hr" / (f.stem + ".webp")
        if not dst.exists():
            with Image.open(f) as im:
                rgb = im.convert("RGB")
            rgb.save(dst, lossless=True, quality=100, method=6)
            with Image.open(dst) as back:  # lossless means lossless
                if not np.array_equal(np.asarray(back.convert("RGB")), np.asarray(rgb)):
                    raise SystemExit(f"{dst}: WebP round trip is not exact")
    for name in ("Set5", "Set14"):
        shutil.copytree(src / "val" / name, out / "val" / name, dirs_exist_ok=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

"""Regenerate the bundled demo example in examples/{lr,hr}/ (run once; the outputs are committed).

A 192x192 HR crop of Set14 `zebra.png` (a validation image, never used for training), degraded with the
Gaussian8 kernel sigma=2.6 (index 4) and MATLAB bicubic x1/4, quantised to 8 bits: a 48x48 LR input.

    python scripts/make_examples.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blindsr.degradations.pipelines import get_preset  # noqa: E402
from blindsr.io.images import read_image, write_bytes_atomic, write_image  # noqa: E402

NAME, TOP, LEFT, SIZE, KERNEL_INDEX = "zebra", 120, 200, 192, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = ap.parse_args()
    hr = read_image(Path(args.data) / "val" / "Set14" / f"{NAME}.png")[:, TOP:TOP + SIZE, LEFT:LEFT + SIZE]
    res = get_preset("gaussian8", kernel_index=KERNEL_INDEX)(hr[None])
    out = REPO / "examples"
    stem = f"{NAME}_g8sigma{res.params[0]['sigma']:.1f}_x4"
    write_image(out / "lr" / f"{stem}.png", res.lr[0], overwrite=True)
    write_image(out / "hr" / f"{stem}.png", res.hr[0], overwrite=True)  # same name: paired by name
    meta = {"source": f"Set14/{NAME}.png", "crop": [TOP, LEFT, SIZE, SIZE], **res.params[0],
            "preset": "gaussian8", "made_by": "scripts/make_examples.py"}
    write_bytes_atomic(out / f"{stem}.json", (json.dumps(meta, indent=1) + "\n").encode())
    print(f"wrote {out}/lr/{stem}.png ({tuple(res.lr.shape[-2:])}) and its HR")


if __name__ == "__main__":
    main()
